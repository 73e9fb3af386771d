"""`ecom run` / `ecom db upgrade` as a user runs them: a real process, real ports, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from runtime import migrate, services
from tests.support.cluster import free_base_port


def _free_ports(n: int) -> list[int]:
    """Free ports below 32768 (above it they can collide with the machine's outgoing connections)."""
    base = free_base_port(n)
    return [base + i for i in range(n)]


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env["ECOM_DATA_DIR"] = str(tmp_path / "var")
    env["ECOM_ADMIN_PASSWORD"] = "correct-horse-battery-staple-9"
    for name, port in zip(services.SERVICE_MODULES, _free_ports(len(services.SERVICE_MODULES)), strict=True):
        env[f"ECOM_{name.upper()}_PORT"] = str(port)
    return env


def test_db_upgrade_is_idempotent(tmp_path):
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "runtime.cli", "db", "upgrade"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    built = [s for s in services.available() if s.schema is not None]
    head = migrate.RUNTIME.head
    for service in built:
        assert f"{service.name}: runtime schema 0 -> {head}" in first.stdout
        assert f"{service.name}: runtime schema {head} (up to date)" in second.stdout


def test_run_starts_every_built_service_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = _env(tmp_path)
    # Output goes to a file, not a pipe nobody reads while waiting: a full pipe would block the server.
    log_path = tmp_path / "run.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
    )
    built = services.available()
    try:
        if not built:
            proc.wait(timeout=60)
            assert "nothing to run" in log_path.read_text()
            return
        deadline = time.monotonic() + 60
        pending = {s.name for s in built}
        while pending and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-5000:]
            for name in list(pending):
                url = f"http://127.0.0.1:{env[f'ECOM_{name.upper()}_PORT']}/health/ready"
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            pending.discard(name)
                except OSError:
                    pass
            time.sleep(0.2)
        assert not pending, f"not ready within 60 s: {pending}\n{log_path.read_text()[-5000:]}"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        out = log_path.read_text()
        assert proc.returncode == 0, out[-5000:]
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
