"""A harness for tests that run the real ``ecom`` processes: ports, databases, a RabbitMQ vhost, start/kill/restart.

:class:`ProcessCluster` runs ``python -m runtime.cli run --processes --instances N`` on PostgreSQL + RabbitMQ:

* every cluster gets its own PostgreSQL databases (one per service) and its own RabbitMQ vhost, created before the
  start and dropped by :meth:`ProcessCluster.destroy`, so tests never see each other's data or messages;
* ports are below 32768 (the kernel's ephemeral range starts there): a random base in 20000-32000 whose whole range
  (every service and every extra instance) is checked to be free;
* the parent and its children share one process group, so :meth:`kill` (SIGKILL to the group) is a crash of the
  whole system; :meth:`start` again brings it back on the same databases and vhost.

:func:`embedded_env` gives the environment of a one-process ``ecom run`` (SQLite + memory bus) on such ports.
The HTTP helpers (:func:`register`, :func:`admin_token`, :func:`with_retries`) are what the tests share to act as
storefront clients through the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from bench.shop import free_base_port
from tests.conftest import PG_HOST, PG_PORT, PG_USER, pg_admin, require_server

SERVICES = ("identity", "catalog", "cart", "order")  # services with a database
ACTOR_SERVICES = ("catalog", "cart", "order")  # the ones ``--instances`` scales
PORT_OFFSET = {"gateway": 0, "identity": 1, "catalog": 2, "cart": 3, "order": 4}
INSTANCE_PORT_STEP = 10  # as runtime.processes: extra instances listen on port + 10, + 20...
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "correct-horse-battery-staple-9"
PASSWORD = "plum tractor velvet 83 orbit"  # passes the password policy (zxcvbn score 3+)
ADDRESS = {"name": "Bob", "street": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Ports


def ports_span(instances: int) -> int:
    return INSTANCE_PORT_STEP * max(0, instances - 1) + len(PORT_OFFSET)


# ---------------------------------------------------------------------------------------------------
# Servers


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}"
        )
    return out.stdout


def require_cluster_servers() -> None:
    """Skip (fail under CI=true) unless PostgreSQL, RabbitMQ and ``rabbitmqctl`` (for vhosts) are there."""
    require_server("PostgreSQL", PG_HOST, PG_PORT)
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    if shutil.which("rabbitmqctl") is None:
        reason = "rabbitmqctl is not installed (needed to give the test its own RabbitMQ vhost)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: real-server tests must run)")
        pytest.skip(reason)


def pg_url(database: str, driver: str = "postgresql+asyncpg") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def pg_connect(database: str) -> Any:
    import asyncpg

    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)


def _clean_env() -> dict[str, str]:
    """This process's environment without any ECOM_ setting (a developer's shell must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def embedded_env(base: int, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a one-process ``ecom run`` (SQLite files in ``data_dir``, memory bus) on ports from ``base``."""
    env = _clean_env()
    env.update(
        ECOM_DATA_DIR=str(data_dir),
        ECOM_ADMIN_PASSWORD=ADMIN_PASSWORD,
        ECOM_AUTH_REGISTRATIONS_PER_ADDRESS="0",  # load tests sign many shoppers up from 127.0.0.1
    )
    for name, offset in PORT_OFFSET.items():
        env[f"ECOM_{name.upper()}_PORT"] = str(base + offset)
    env.update(extra)
    return env


@dataclass(frozen=True)
class EmbeddedShop:
    """A running one-process ``ecom run``: its base port, the gateway's URL and the log file."""

    base: int
    url: str  # the gateway: the shop's public URL
    log_path: Path

    def port(self, service: str) -> int:
        return self.base + PORT_OFFSET[service]


@contextlib.asynccontextmanager
async def embedded_shop(workdir: Path, *, ready_within: float = 60.0, **extra_env: str) -> AsyncIterator[EmbeddedShop]:
    """Start the embedded default (``python -m runtime.cli run``: SQLite files in ``workdir``, the memory bus) on
    free ports, wait until the gateway is ready, and stop it (SIGINT, then kill) on the way out."""
    base = free_base_port(max(PORT_OFFSET.values()) + 1)
    env = embedded_env(base, workdir / "var", **{"ECOM_LOG_LEVEL": "WARNING", **extra_env})
    shop = EmbeddedShop(base, f"http://127.0.0.1:{base + PORT_OFFSET['gateway']}", workdir / "shop.log")
    with open(shop.log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + ready_within
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.poll() is None, shop.log_path.read_text()[-3000:]
                try:
                    async with http.get(f"{shop.url}/health/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, (
                    f"shop not ready in {ready_within:.0f} s\n" + shop.log_path.read_text()[-3000:]
                )
                await asyncio.sleep(0.3)
        yield shop
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------
# The process cluster


@dataclass
class ProcessCluster:
    """``ecom run --processes --instances N`` on its own databases and vhost (see the module docstring)."""

    workdir: Path
    instances: int = 2
    extra_env: Mapping[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    base: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: Any = None

    # -- names -------------------------------------------------------------------------------------

    @property
    def databases(self) -> dict[str, str]:
        return {name: f"ecom_pc_{name}_{self.tag}" for name in SERVICES}

    @property
    def vhost(self) -> str:
        return f"ecom_pc_{self.tag}"

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "processes.log"

    def port(self, service: str, instance: int = 0) -> int:
        return self.base + PORT_OFFSET[service] + INSTANCE_PORT_STEP * instance

    def instance_ports(self, service: str) -> list[int]:
        count = self.instances if service in ACTOR_SERVICES else 1
        return [self.port(service, k) for k in range(count)]

    def all_ports(self) -> list[int]:
        return [p for name in PORT_OFFSET for p in self.instance_ports(name)]

    def env(self) -> dict[str, str]:
        env = _clean_env()
        env.update(
            ECOM_BUS="rabbitmq",
            ECOM_BUS_URL=f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{quote(self.vhost, safe='')}",
            ECOM_BUS_REDELIVERY_DELAY="0.2",
            ECOM_ADMIN_PASSWORD=ADMIN_PASSWORD,
            ECOM_DATA_DIR=str(self.workdir / "var"),
            ECOM_GATEWAY_RATE_LIMIT="0",
            ECOM_AUTH_REGISTRATIONS_PER_ADDRESS="0",  # many shoppers sign up from 127.0.0.1
        )
        for name in PORT_OFFSET:
            env[f"ECOM_{name.upper()}_PORT"] = str(self.port(name))
        for name, db in self.databases.items():
            env[f"ECOM_{name.upper()}_DATABASE_URL"] = pg_url(db)
        env.update(self.extra_env)
        return env

    # -- lifecycle ---------------------------------------------------------------------------------

    async def create(self) -> None:
        """Databases and vhost (empty); the first :meth:`start` migrates and seeds."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.base = free_base_port(ports_span(self.instances))
        for db in self.databases.values():
            await pg_admin(f'CREATE DATABASE "{db}"')
        await asyncio.to_thread(rabbitmqctl, "add_vhost", self.vhost)
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    async def start(self, ready_within: float = 120.0) -> float:
        """Start the parent (which starts every instance) and wait until every instance is ready; returns seconds."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        started = time.monotonic()
        self.starts += 1
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by destroy()
        self._log.write(f"\n===== start {self.starts} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", "--processes", "--instances", str(self.instances)],
            env=self.env(),
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: kill() takes the parent and every child
        )
        await self.wait_ready(deadline=started + ready_within)
        return time.monotonic() - started

    async def wait_ready(self, *, deadline: float) -> None:
        pending = set(self.all_ports())
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while pending:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"ecom run exited with {self.proc.returncode}\n{self.log_tail()}")
                for port in sorted(pending):
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                            if resp.status == 200:
                                pending.discard(port)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"not ready in time: ports {sorted(pending)}\n{self.log_tail()}")
                await asyncio.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the whole system (parent and every instance) and wait until it is gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._wait_group_gone(self.proc.pid, 10)

    def stop(self, timeout: float = 40.0) -> None:
        """Ctrl-C (the parent passes it on), then SIGKILL what is left after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned children of a parent that died
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._wait_group_gone(self.proc.pid, 10)

    @staticmethod
    def _wait_group_gone(pgid: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and _group_members(pgid):
            time.sleep(0.1)

    async def destroy(self) -> None:
        """Stop whatever runs, drop the databases and the vhost."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        for db in self.databases.values():
            with contextlib.suppress(Exception):
                await pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            await asyncio.to_thread(rabbitmqctl, "delete_vhost", self.vhost)

    # -- instances ---------------------------------------------------------------------------------

    def service_pids(self, service: str) -> dict[int, int]:
        """pid -> listening port of this cluster's live ``ecom serve <service>`` processes (never other clusters')."""
        if self.proc is None:
            return {}
        out = subprocess.run(["pgrep", "-f", f"runtime.cli serve {service}"], capture_output=True, text=True).stdout
        found: dict[int, int] = {}
        for pid in (int(p) for p in out.split()):
            try:
                if os.getpgid(pid) != self.proc.pid:
                    continue
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            prefix = f"ECOM_{service.upper()}_PORT=".encode()
            port = next((int(e[len(prefix) :]) for e in environ if e.startswith(prefix)), self.port(service))
            found[pid] = port
        return found

    def kill_instance(self, service: str, instance: int = 1) -> tuple[int, int]:
        """SIGKILL one instance of ``service`` (the one on port + 10 * ``instance``, else any); returns (pid, port)."""
        pids = self.service_pids(service)
        if not pids:
            raise AssertionError(f"no live {service} instance to kill\n{self.log_tail()}")
        wanted = self.port(service, instance)
        pid = next((p for p, port in pids.items() if port == wanted), next(iter(pids)))
        os.kill(pid, signal.SIGKILL)
        return pid, pids[pid]

    def log_tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except FileNotFoundError:
            return ""


def _group_members(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@contextlib.asynccontextmanager
async def process_cluster(workdir: Path, *, instances: int = 2, **extra_env: str) -> AsyncIterator[ProcessCluster]:
    """A started :class:`ProcessCluster`, destroyed (processes, databases, vhost) on the way out."""
    require_cluster_servers()
    cluster = ProcessCluster(workdir, instances=instances, extra_env=extra_env)
    try:
        await cluster.create()
        await cluster.start()
        yield cluster
    finally:
        await cluster.destroy()


# ---------------------------------------------------------------------------------------------------
# Storefront clients


class GaveUp(Exception):
    """A request kept failing (503 or no connection) until its retry budget ran out."""


RETRYABLE_STATUS = frozenset({502, 503, 504})


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    budget: float = 60.0,
    first_delay: float = 0.1,
    max_delay: float = 2.0,
    on_failure: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``attempt`` until it returns; a :class:`Retry` or a connection error is retried with doubling back-off
    (jittered, capped at ``max_delay``) for at most ``budget`` seconds, then :class:`GaveUp`."""
    end = time.monotonic() + budget
    delay = first_delay
    while True:
        try:
            return await attempt()
        except (TimeoutError, Retry, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            if on_failure is not None:
                on_failure(exc)
            wait = exc.retry_after if isinstance(exc, Retry) and exc.retry_after is not None else delay
            wait = min(max_delay, wait) * random.uniform(0.7, 1.3)
            if time.monotonic() + wait > end:
                raise GaveUp(f"gave up after {budget:g}s: {exc!r}") from exc
            await asyncio.sleep(wait)
            delay = min(max_delay, delay * 2)


class Retry(Exception):
    """Raised by an attempt that got a retryable answer (503...)."""

    def __init__(self, status: int, body: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.retry_after = retry_after


def retry_after_of(resp: aiohttp.ClientResponse | Mapping[str, str]) -> float | None:
    """Seconds of a Retry-After header (of a response, or of its headers); None when absent or not a number."""
    headers = resp.headers if isinstance(resp, aiohttp.ClientResponse) else resp
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


async def request_json(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Mapping[str, str]]:
    """One attempt: (status, JSON body or text, headers) for any answer below 500; :class:`Retry` for 5xx."""
    async with http.request(method, url, **kwargs) as resp:
        text = await resp.text()
        if resp.status in RETRYABLE_STATUS or resp.status >= 500:
            raise Retry(resp.status, text, retry_after_of(resp))
        try:
            body: Any = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            body = text
        return resp.status, body, resp.headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the tests only need ``sub``)."""
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def password_token(
    http: aiohttp.ClientSession, gateway: str, email: str, password: str, scope: str = "openid ecom"
) -> str:
    form = {
        "grant_type": "password",
        "client_id": "storefront",
        "username": email,
        "password": password,
        "scope": scope,
    }

    async def attempt() -> str:
        status, body, _ = await request_json(http, "POST", f"{gateway}/connect/token", data=form)
        assert status == 200, f"token for {email}: {status} {body}"
        return body["access_token"]

    return await with_retries(attempt, budget=60)


async def register(http: aiohttp.ClientSession, gateway: str, email: str, name: str = "Bob") -> str:
    """A new customer account and its access token (through the gateway)."""
    body = {"email": email, "password": PASSWORD, "name": name}

    async def attempt() -> None:
        status, answer, _ = await request_json(http, "POST", f"{gateway}/api/identity/users", json=body)
        assert status in (201, 202, 409), f"register {email}: {status} {answer}"  # 202: accepted, taken or not

    await with_retries(attempt, budget=60)
    return await password_token(http, gateway, email, PASSWORD)


async def admin_token(http: aiohttp.ClientSession, gateway: str) -> str:
    return await password_token(http, gateway, ADMIN_EMAIL, ADMIN_PASSWORD)


def new_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
