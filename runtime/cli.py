"""The ``ecom`` command.

    ecom run                 every service that exists, in one process (embedded: SQLite + memory bus)
    ecom serve <service>     one service in this process
    ecom db upgrade [svc..]  create or migrate the databases
    ecom db status           schema versions per database
    ecom bench <name>        run a benchmark from bench/ (e.g. ``ecom bench actors``)

Services may add their own commands (``ecom users``, ``ecom keys``) through a ``cli.py`` with
``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from config import ConfigError, Settings, load_settings
from runtime import migrate, services
from runtime.host import request_id_var
from runtime.store import create_engine

log = logging.getLogger("ecom")

EXTRA_COMMANDS = ("identity.cli", "bus.azure")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Below WARNING these log SQL and its parameters: password hashes and private signing keys would
    # reach the log. Keep them at WARNING whatever the configured level.
    for name in ("aiosqlite", "sqlalchemy.engine", "asyncpg"):
        logging.getLogger(name).setLevel(logging.WARNING)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not on Windows; asyncio's own loop works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_bus(settings: Settings):  # -> bus.base.Bus
    backend = settings.bus.backend
    if backend == "memory":
        from bus.memory import MemoryBus

        return MemoryBus(
            max_attempts=settings.bus.max_attempts,
            max_concurrent_sessions=settings.bus.max_concurrent_sessions,
            redelivery_delay=settings.bus.redelivery_delay,
        )
    try:
        module = importlib.import_module(f"bus.{backend}")
    except ModuleNotFoundError:
        raise ConfigError(f"ECOM_BUS: the {backend} backend is not available in this build") from None
    return module.create_bus(settings)


async def upgrade(settings: Settings, names: Sequence[str] = ()) -> None:
    unknown = set(names) - set(services.SERVICE_MODULES)
    if unknown:
        raise ConfigError(f"unknown service(s): {', '.join(sorted(unknown))}")
    for service in services.available():
        if names and service.name not in names:
            continue
        result = await services.upgrade_database(settings, service)
        if result is None:
            continue
        for component, (before, after) in result.items():
            state = f"{before} -> {after}" if before != after else f"{after} (up to date)"
            print(f"{service.name}: {component} schema {state}")


async def status(settings: Settings) -> None:
    for service in services.available():
        if service.schema is None:
            continue
        engine = create_engine(settings.database_url(service.name))
        try:
            versions = await migrate.current_versions(engine)
        finally:
            await engine.dispose()
        heads = {"runtime": migrate.RUNTIME.head, service.name: service.schema.head}
        for component, head in heads.items():
            print(f"{service.name}: {component} at {versions.get(component, 0)} of {head}")


async def serve(settings: Settings, names: Sequence[str]) -> None:
    """Start the named services (all that exist when empty) and run until SIGINT/SIGTERM."""
    chosen = [s for s in services.available() if not names or s.name in names]
    unknown = set(names) - {s.name for s in chosen}
    if unknown:
        raise ConfigError(f"unknown or not yet built service(s): {', '.join(sorted(unknown))}")
    if not chosen:
        print("no services are built yet; nothing to run", file=sys.stderr)
        return
    for service in chosen:
        await services.upgrade_database(settings, service)
        await service.seed(settings)
    # One bus for the whole process: in embedded mode that is what connects the services.
    bus = make_bus(settings)
    await bus.start()
    runners: list[web.AppRunner] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover - Windows
            pass
    try:
        for service in chosen:
            app = service.create_app(settings, bus=bus)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            port = settings.services[service.name].port
            await web.TCPSite(runner, settings.general.host, port, backlog=1024, reuse_address=True).start()
            log.info("%s listening on http://%s:%d", service.name, settings.general.host, port)
        print(f"EcomGateway running: {', '.join(s.name for s in chosen)} (Ctrl-C to stop)", flush=True)
        await stop.wait()
    finally:
        log.info("stopping")
        for runner in reversed(runners):
            await runner.cleanup()
        await bus.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecom", description="EcomGateway: microservice e-commerce backend")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run every built service (in this process, or one process each)")
    p_run.add_argument(
        "--processes", action="store_true", help="one process per service instance (needs a shared bus and databases)"
    )
    p_run.add_argument(
        "--instances", type=int, default=1, metavar="N", help="with --processes: instances of cart, order and catalog"
    )
    p_serve = sub.add_parser("serve", help="run one service")
    p_serve.add_argument("service", choices=list(services.SERVICE_MODULES))
    p_db = sub.add_parser("db", help="database schema")
    db_sub = p_db.add_subparsers(dest="db_command", required=True)
    p_up = db_sub.add_parser("upgrade", help="create or migrate databases")
    p_up.add_argument("services", nargs="*", help=f"any of {', '.join(services.SERVICE_MODULES)} (default: all)")
    db_sub.add_parser("status", help="show schema versions")
    p_bench = sub.add_parser("bench", help="run a benchmark from bench/")
    p_bench.add_argument("name", help="benchmark module in bench/, e.g. actors")
    p_bench.add_argument("args", nargs=argparse.REMAINDER)
    for module_name in EXTRA_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Every file the shop creates (databases, their -wal/-shm, the identity KEK) is private to its user.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"ecom: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.general.log_level)
    install_uvloop()
    try:
        if args.command == "run" and args.processes:
            from runtime.processes import SCALABLE, run_processes

            if not 1 <= args.instances <= 8:
                raise ConfigError("--instances: expected 1 to 8")
            return asyncio.run(run_processes(settings, dict.fromkeys(SCALABLE, args.instances)))
        if args.command in ("run", "serve"):
            asyncio.run(serve(settings, [] if args.command == "run" else [args.service]))
        elif args.command == "db":
            asyncio.run(upgrade(settings, args.services) if args.db_command == "upgrade" else status(settings))
        elif args.command == "bench":
            module = importlib.import_module(f"bench.{args.name}")
            return int(module.main(args.args) or 0)
        else:
            return int(args.handler(settings, args) or 0)
    except ConfigError as exc:
        print(f"ecom: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
