"""The packages' layers: each imports only from the layers below it, lazily imported names included.

config, contracts  <  bus  <  runtime  <  gateway, identity, actors (the services)

``bus`` is the transport and knows nothing of actors or services; ``runtime`` is the host every service shares and
reaches the services only through :mod:`runtime.services`' registry (by module name, never by import); the gateway
routes to services by their light ``public.py`` tables through that registry, never by importing their code.
A cycle between packages, or a service importing another service, fails here (issue 13: no package cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"config", "contracts", "bus", "runtime", "gateway", "identity", "actors"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "contracts": set(),
    "bus": {"config", "contracts"},
    "runtime": {"config", "contracts", "bus"},
    "gateway": {"config", "contracts", "bus", "runtime"},
    "identity": {"config", "contracts", "bus", "runtime"},
    "actors": {"config", "contracts", "bus", "runtime"},
}
# actors/<service> packages: one service never imports another's code (they talk through contracts and HTTP).


def imports_of(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside functions (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in OURS}


def files_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files_of(package)
        for name in imports_of(path)
        if name.split(".")[0] not in ALLOWED[package] | {package}
    }
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: " + "; ".join(sorted(wrong))


def test_a_service_does_not_import_another_service() -> None:
    wrong = set()
    for path in files_of("actors"):
        service = path.relative_to(ROOT / "actors").parts[0]
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "actors" and len(parts) > 1 and parts[1] != service:
                wrong.add(f"{path.relative_to(ROOT)}: {name}")
    assert not wrong, "; ".join(sorted(wrong))


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from runtime.services import bus_plan\n    import gateway.routes\n")
    assert imports_of(module) == {"runtime.services", "gateway.routes"}
