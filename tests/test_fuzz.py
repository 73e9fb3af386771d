"""Property test of every operation of every service's OpenAPI document: no generated input gives a 5xx.

Starts the embedded shop (``ecom run``: every service in one process, real HTTP, SQLite, memory bus), then runs
schemathesis' CLI against each service's own document and against the gateway's merged one, with an admin
token (so the generated requests get past authentication into validation and the handlers) and without one.
Bounded: a fixed number of examples per operation and a fixed seed, so a failure reproduces.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.cluster import PORT_OFFSET, admin_token, embedded_shop

EXAMPLES = 12  # per operation; about 50 operations per document
SEED = 20261201


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if found is None:
        pytest.fail("schemathesis (the `st` command) is not installed: pip install -e '.[test]'")
    return found


@pytest.fixture
async def shop(tmp_path):
    async with embedded_shop(tmp_path, ECOM_GATEWAY_RATE_LIMIT="0") as running:
        async with aiohttp.ClientSession() as http:
            token = await admin_token(http, running.url)
        yield running.base, token, running.log_path


def _schemathesis(url: str, token: str | None, report: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        _st(), "run", f"{url}/api/docs/swagger.json",
        "--url", url,
        "--checks", "not_a_server_error",
        "--max-examples", str(EXAMPLES),
        "--seed", str(SEED),
        "--request-timeout", "10",
        "--max-failures", "10",
        "--report", "junit", "--report-junit-path", str(report),
    ]  # fmt: skip
    if token is not None:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)


@pytest.mark.parametrize("authenticated", [True, False], ids=["admin-token", "anonymous"])
async def test_no_generated_request_gives_a_server_error(shop, tmp_path, authenticated):
    base, token, log_path = shop
    failures = []
    for service in ("gateway", "identity", "catalog", "cart", "order"):
        url = f"http://127.0.0.1:{base + PORT_OFFSET[service]}"
        result = await asyncio.to_thread(
            _schemathesis, url, token if authenticated else None, tmp_path / f"{service}.xml"
        )
        if result.returncode != 0:
            failures.append(
                f"--- {service} ({url}) exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-1000:]}"
            )
    assert not failures, "\n".join(failures) + "\n--- shop log tail\n" + log_path.read_text()[-3000:]
