"""Start-up failures a user can cause: each is one line on stderr naming the cause, a non-zero exit status and no
traceback. Every case runs the real command (``python -m runtime.cli ...``) in a subprocess, on ports below 32768."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import services
from tests.support.cluster import free_base_port

ADMIN_PASSWORD = "correct-horse-battery-staple-9"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env["ECOM_DATA_DIR"] = str(tmp_path / "var")
    env["ECOM_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    base = free_base_port(len(services.SERVICE_MODULES))
    for k, name in enumerate(services.SERVICE_MODULES):
        env[f"ECOM_{name.upper()}_PORT"] = str(base + k)
    env.update(extra)
    return env


def _closed_port() -> int:
    """A port below 32768 nobody listens on: connecting to it is refused at once."""
    return free_base_port(1)


def ecom(env: dict[str, str], *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", *argv], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exactly one line on stderr, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ecom: ")
    return lines[0]


def test_port_already_taken(tmp_path: Path) -> None:
    env = _env(tmp_path)
    port = int(env["ECOM_CATALOG_PORT"])
    with socket.socket() as taken:  # as a second `make run` finds the first one's ports
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = ecom(env, "run")
    line = one_line(proc)
    assert proc.returncode == 1
    assert f"port {port}" in line and "already in use" in line and "ECOM_CATALOG_PORT" in line


def test_port_taken_with_processes_stops_before_any_child(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/x"
    env = _env(
        tmp_path,
        ECOM_BUS="rabbitmq",
        **{f"ECOM_{s.upper()}_DATABASE_URL": url for s in ("identity", "catalog", "cart", "order")},
    )
    port = int(env["ECOM_GATEWAY_PORT"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = ecom(env, "run", "--processes")
    line = one_line(proc)
    assert f"port {port}" in line and "already in use" in line
    assert "started" not in proc.stdout


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://shop:secret@127.0.0.1/shop", "unsupported database 'postgres'"),
        ("postgresql://shop@127.0.0.1/shop", "postgresql needs the async driver: use postgresql+asyncpg://"),
        ("sqlite:///var/catalog.db", "sqlite needs the async driver: use sqlite+aiosqlite://"),
        ("catalog.db", "not a database URL"),
    ],
)
def test_bad_database_url(tmp_path: Path, url: str, expected: str) -> None:
    proc = ecom(_env(tmp_path, ECOM_CATALOG_DATABASE_URL=url), "run")
    line = one_line(proc)
    assert line.startswith("ecom: configuration error: ECOM_CATALOG_DATABASE_URL: ")
    assert expected in line
    assert "secret" not in line, "the password is never shown"


def test_database_unreachable(tmp_path: Path) -> None:
    port = _closed_port()
    url = f"postgresql+asyncpg://postgres:secret@127.0.0.1:{port}/shop"
    proc = ecom(_env(tmp_path, ECOM_CATALOG_DATABASE_URL=url), "run")
    line = one_line(proc)
    assert proc.returncode == 1
    assert f"catalog: cannot use the database postgresql+asyncpg://postgres:***@127.0.0.1:{port}/shop" in line
    assert "connection refused" in line and "secret" not in line


def test_database_unreachable_in_admin_commands(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/shop"
    env = _env(tmp_path, ECOM_IDENTITY_DATABASE_URL=url)
    for argv in (("users", "list"), ("db", "upgrade", "identity"), ("db", "status")):
        line = one_line(ecom(env, *argv))
        assert "identity: cannot use the database" in line and "connection refused" in line, argv


def test_broker_unreachable(tmp_path: Path) -> None:
    port = _closed_port()
    env = _env(tmp_path, ECOM_BUS="rabbitmq", ECOM_BUS_URL=f"amqp://guest:secret@127.0.0.1:{port}/")
    line = one_line(ecom(env, "run"))
    assert f"cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{port}/" in line
    assert "ECOM_BUS_URL" in line and "secret" not in line


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("ECOM_CATLOG_PORT", "ECOM_CATLOG_PORT: unknown setting; did you mean ECOM_CATALOG_PORT?"),
        ("ECOM_LOGLEVEL", "ECOM_LOGLEVEL: unknown setting; did you mean ECOM_LOG_LEVEL?"),
        ("ECOM_NOTHING_LIKE_IT", "ECOM_NOTHING_LIKE_IT: unknown setting; see the settings table in README.md"),
    ],
)
def test_unknown_environment_variable(tmp_path: Path, variable: str, expected: str) -> None:
    proc = ecom(_env(tmp_path, **{variable: "8002"}), "run")
    assert proc.returncode == 2
    assert one_line(proc) == f"ecom: configuration error: {expected}"


def test_commands_keep_migrations_to_themselves(tmp_path: Path) -> None:
    """A first `ecom users list` migrates identity's database without a log line; `ecom db upgrade` reports it."""
    env = _env(tmp_path)
    listed = ecom(env, "users", "list")
    assert listed.returncode == 0, listed.stderr
    assert "migrat" not in listed.stderr and "alembic" not in listed.stderr
    upgraded = ecom(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "identity: runtime schema" in upgraded.stdout and "alembic" not in upgraded.stderr
