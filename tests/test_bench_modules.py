"""Every benchmark module imports and answers ``--help``: benchmarks are not run by the suite (they measure, they do
not assert), so a rename elsewhere would otherwise break them unnoticed until someone runs ``make bench-all``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = sorted(
    p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__" and "def main(" in p.read_text()
)


def test_the_benchmarks_are_found() -> None:
    assert {"actors", "catalog", "checkout", "gateway", "identity", "storefront", "all"} <= set(RUNNABLE)


@pytest.mark.parametrize("name", RUNNABLE)
def test_a_benchmark_module_imports_and_prints_its_help(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
