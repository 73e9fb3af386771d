"""``ecom run --processes``: every service in its own process, as in production, on one machine.

The parent migrates and seeds each database once, then starts ``ecom serve <service>`` per instance and
passes Ctrl-C on to them. Instances of one service share its database and the bus; extra instances
listen on the service's port + 10, + 20, ... and the gateway gets them all as upstreams, so requests
for one entity reach one instance (affinity) and bus sessions reach one consumer.

It needs what processes can share: a bus other than the in-memory one (``ECOM_BUS=rabbitmq``) and
databases other than SQLite files (``ECOM_<SERVICE>_DATABASE_URL=postgresql+asyncpg://...``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping

from config import ConfigError, Settings
from runtime import services

INSTANCE_PORT_STEP = 10
SCALABLE = ("cart", "order", "catalog")  # actor services: more instances share the load by affinity


def plan(settings: Settings, instances: Mapping[str, int]) -> list[tuple[str, dict[str, str]]]:
    """(service, extra environment) per process to start; the gateway last, knowing every instance."""
    built = [s.name for s in services.available()]
    procs: list[tuple[str, dict[str, str]]] = []
    upstreams: dict[str, list[str]] = {}
    for name in built:
        if name == "gateway":
            continue
        base = settings.services[name].port
        for k in range(instances.get(name, 1)):
            port = base + k * INSTANCE_PORT_STEP
            procs.append((name, {f"ECOM_{name.upper()}_PORT": str(port)}))
            upstreams.setdefault(name, []).append(f"http://{settings.general.host}:{port}")
    # Every process learns every instance: the gateway routes over them, and services calling each other
    # (cart -> catalog, cart -> order) spread their calls and fail over the same way.
    known = {f"ECOM_{name.upper()}_UPSTREAMS": ",".join(urls) for name, urls in upstreams.items()}
    procs = [(name, {**known, **extra}) for name, extra in procs]
    if "gateway" in built:
        procs.append(("gateway", dict(known)))
    return procs


def check_shareable(settings: Settings) -> None:
    if settings.bus.backend == "memory":
        raise ConfigError("ECOM_BUS: --processes needs a bus processes can share (rabbitmq or azure), not memory")
    for service in services.available():
        if service.schema is not None and settings.database_url(service.name).startswith("sqlite"):
            raise ConfigError(
                f"ECOM_{service.name.upper()}_DATABASE_URL: --processes needs a server database "
                "(postgresql+asyncpg:// or mssql+aioodbc://), not a SQLite file"
            )


def planned_ports(settings: Settings, procs: list[tuple[str, dict[str, str]]]) -> list[tuple[str, int]]:
    """(service, port) of every process of the plan."""
    return [(name, int(extra.get(f"ECOM_{name.upper()}_PORT", settings.services[name].port))) for name, extra in procs]


async def run_processes(settings: Settings, instances: Mapping[str, int]) -> int:
    from runtime.cli import check_ports, start_bus, with_database

    check_shareable(settings)
    procs = plan(settings, instances)
    # Failures a user can cause stop the parent with one line before any child starts: a port in use, a broker
    # or a database that does not answer.
    check_ports(settings, planned_ports(settings, procs))
    bus = await start_bus(settings)
    await bus.close()
    for service in services.available():
        await with_database(settings, service.name, services.upgrade_database(settings, service))
    for service in services.available():
        await with_database(settings, service.name, service.seed(settings))
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    for name, extra in procs:
        env = {**os.environ, **extra}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "runtime.cli", "serve", name, env=env)
        children.append((name, proc))
        print(f"started {name} (pid {proc.pid}) {' '.join(f'{k}={v}' for k, v in extra.items())}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = {asyncio.ensure_future(p.wait()): name for name, p in children}
    stopper = asyncio.ensure_future(stop.wait())
    # A child that dies on its own is reported and not restarted: a supervisor (systemd, Kubernetes)
    # does that in production; here the survivors keep serving, which is what failover tests want.
    while not stop.is_set() and waiters:
        done, _ = await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if fut in waiters:
                print(f"{waiters.pop(fut)} exited with {fut.result()}", file=sys.stderr, flush=True)
    stopper.cancel()
    for _, proc in children:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
    await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for _, p in children), return_exceptions=True)
    for _, proc in children:
        if proc.returncode is None:
            proc.kill()
    return 0
