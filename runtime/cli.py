"""The ``ecom`` command.

    ecom run                 every service that exists, in one process (embedded: SQLite + memory bus)
    ecom serve <service>     one service in this process
    ecom db upgrade [svc..]  create or migrate the databases
    ecom db status           schema versions per database
    ecom bench <name>        run a benchmark from bench/ (e.g. ``ecom bench actors``)
    ecom bus provision       create the queues, subscriptions and topic the services declare (RabbitMQ, Azure)

Services may add their own commands (``ecom users``, ``ecom keys``) through a ``cli.py`` with
``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from config import ConfigError, Settings, StartupError, load_settings
from runtime import logs, migrate, services, tracing
from runtime.host import request_id_var
from runtime.store import create_engine

log = logging.getLogger("ecom")

EXTRA_COMMANDS = ("identity.cli", "runtime.cli_deadletters")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Start-up failures a user can cause, each turned into one line naming the cause


def _root_cause(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def describe_error(exc: BaseException) -> str:
    """A short, one-line reason for a failed connection (no traceback, no password)."""
    root = _root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return "connection refused (is the server running and listening there?)"
    if isinstance(root, socket.gaierror):
        return "unknown host name"
    if isinstance(root, TimeoutError):
        return "no answer in time"
    text = " ".join(str(root).split()) or type(root).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(root).__name__}: {text}" if not str(root).startswith(type(root).__name__) else text


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: nothing to hide that we can find
        return url.partition("://")[0] + "://…" if "://" in url else url


def _database_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    errors: list[type[BaseException]] = [OSError, TimeoutError, SQLAlchemyError]
    try:
        import asyncpg

        errors.append(asyncpg.PostgresError)
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        pass
    return tuple(errors)


async def with_database(settings: Settings, service: str, work: Awaitable[T]) -> T:
    """Await ``work`` on ``service``'s database; a database that cannot be reached is a :class:`StartupError`."""
    url = settings.database_url(service)
    try:
        return await work
    except _database_errors() as exc:
        raise StartupError(f"{service}: cannot use the database {safe_url(url)}: {describe_error(exc)}") from exc


def port_in_use(host: str, port: int) -> bool:
    """Somebody listens on ``host:port`` (checked the way the server binds: SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # the real bind will say what is wrong with the host
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def port_taken_message(host: str, port: int, service: str) -> str:
    return (
        f"port {port} on {host} ({service}) is already in use: is another `ecom run` or `make run` going? "
        f"Stop it, or choose another port with ECOM_{service.upper()}_PORT"
    )


def check_ports(settings: Settings, ports: Sequence[tuple[str, int]]) -> None:
    """Stop before any work when a port we are about to listen on is taken."""
    for service, port in ports:
        if port_in_use(settings.general.host, port):
            raise StartupError(port_taken_message(settings.general.host, port, service))


async def start_bus(settings: Settings):  # -> bus.base.Bus, started
    """Make and start the configured bus; a broker that cannot be reached is a :class:`StartupError`."""
    bus = make_bus(settings)
    # The client library logs each failed attempt as an ERROR with its own wording; the one line below says it.
    amqp_log = logging.getLogger("aiormq.connection")
    level = amqp_log.level
    amqp_log.setLevel(logging.CRITICAL)
    try:
        await bus.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await bus.close()
        backend = settings.bus.backend
        detail = str(exc).splitlines()[0] if str(exc) else describe_error(exc)
        if "cannot connect" not in detail:
            detail = f"cannot connect to the {backend} broker at {safe_url(settings.bus.url or '(default)')}: {describe_error(exc)}"
        raise StartupError(f"bus ({backend}): {detail}; set ECOM_BUS_URL, or ECOM_BUS=memory for one process") from exc
    finally:
        amqp_log.setLevel(level)
    return bus


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(level: str, log_format: str = "text") -> None:
    # Neither format prints a record's source line, thread or process, which logging otherwise works out for every
    # record (a stack walk for the caller, among them): the gateway writes an access record per request. These are
    # the switches the logging HOWTO's "Optimization" section names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logs.formatter(log_format))  # JSON lines carry the trace and span ids
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
        result = await with_database(settings, service.name, services.upgrade_database(settings, service))
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
            versions = await with_database(settings, service.name, migrate.current_versions(engine))
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
    # What a user can get wrong is checked before any work, each failure one line: the ports, the broker, the
    # databases (their URLs were checked with the settings).
    check_ports(settings, [(s.name, settings.services[s.name].port) for s in chosen])
    try:  # before any app or client session is made: they are instrumented when they are created
        tracing.configure("ecom" if len(chosen) > 1 else f"ecom-{chosen[0].name}", install_global=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # One bus for the whole process: in embedded mode that is what connects the services.
    bus = await start_bus(settings)
    runners: list[web.AppRunner] = []
    fronts: list[Any] = []  # the gateway's gateway.front.Front, when it serves the gateway's port
    try:
        # Every database is migrated before any is seeded: one that cannot be reached stops start-up before
        # anything else happens (the first-run seed creates keys and prints the admin password).
        for service in chosen:
            await with_database(settings, service.name, services.upgrade_database(settings, service))
        for service in chosen:
            await with_database(settings, service.name, service.seed(settings))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # pragma: no cover - Windows
                pass
        for service in chosen:
            app = service.create_app(settings, bus=bus)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            port = settings.services[service.name].port
            try:
                if _fast_front(settings, service.name):
                    # by module name, like runtime.services reaches the services (runtime never imports them)
                    front = importlib.import_module("gateway.front").Front(runner)
                    await front.start(settings.general.host, port, backlog=1024, reuse_address=True)
                    fronts.append(front)
                else:
                    await web.TCPSite(runner, settings.general.host, port, backlog=1024, reuse_address=True).start()
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(port_taken_message(settings.general.host, port, service.name)) from None
                raise StartupError(
                    f"cannot listen on {settings.general.host}:{port} ({service.name}): {exc.strerror or exc}"
                ) from None
            log.info("%s listening on http://%s:%d", service.name, settings.general.host, port)
        print(f"EcomGateway running: {', '.join(s.name for s in chosen)} (Ctrl-C to stop)", flush=True)
        await stop.wait()
    finally:
        if runners:
            log.info("stopping")
        for front in fronts:  # stop listening, finish in-flight requests; then the runners close the rest
            await front.stop()
        for runner in reversed(runners):
            await runner.cleanup()
        await bus.close()
        tracing.shutdown()  # flushes the spans still batched for the exporter


def _fast_front(settings: Settings, name: str) -> bool:
    """Whether ``name``'s port is served by the gateway's front (``[gateway] front = "fast"``)."""
    if name != "gateway":
        return False
    return getattr(settings.services[name], "front", "aiohttp") == "fast"


# ---------------------------------------------------------------------------------------------------
# ecom bus provision


def register_bus(subparsers: argparse._SubParsersAction) -> None:
    """``ecom bus provision``: create what the services' descriptions consume (:func:`runtime.services.bus_plan`)
    on the configured broker."""
    parser = subparsers.add_parser("bus", help="message bus administration (RabbitMQ, Azure Service Bus)")
    sub = parser.add_subparsers(dest="bus_command", required=True)
    prov = sub.add_parser(
        "provision",
        help="create the queues, subscriptions and events topic/exchange the services consume",
        description="Creates exactly what the services' descriptions declare they consume (or the --queue and "
        "--subscription given) on ECOM_BUS: Azure Service Bus (ECOM_BUS_URL, a connection string with Manage "
        "rights, or ECOM_BUS_NAMESPACE with an Azure identity; rules are set to exactly the given event types) "
        "or RabbitMQ (ECOM_BUS_URL). Existing entities are kept. --dry-run prints the plan only.",
    )
    prov.add_argument(
        "--queue", action="append", metavar="NAME", help="a queue to create (repeatable; default: the declared ones)"
    )
    prov.add_argument(
        "--subscription",
        action="append",
        metavar="SERVICE=Type1,Type2",
        help="a subscription and its event types (repeatable; default: the declared ones)",
    )
    prov.add_argument(
        "--ca-file",
        metavar="PATH",
        help="Azure: CA bundle to verify the namespace's TLS certificate with (default: the system's)",
    )
    prov.add_argument("--dry-run", action="store_true", help="print what would be provisioned, change nothing")
    prov.set_defaults(handler=_cli_bus)


def _parse_subscriptions(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    if not values:
        return None
    parsed: dict[str, list[str]] = {}
    for value in values:
        name, sep, types = value.partition("=")
        event_types = [t.strip() for t in types.split(",") if t.strip()]
        if not sep or not name.strip() or not event_types:
            raise ConfigError(f"--subscription {value!r}: expected SERVICE=Type1,Type2")
        parsed.setdefault(name.strip(), []).extend(event_types)
    return parsed


def _cli_bus(settings: Settings, args: argparse.Namespace) -> int:
    if args.bus_command != "provision":  # pragma: no cover - argparse enforces the choices
        return 2
    plan = services.bus_plan()
    queues: list[str] = args.queue or list(plan.queues)
    subscriptions = _parse_subscriptions(args.subscription) or {n: list(t) for n, t in plan.subscriptions.items()}
    backend = settings.bus.backend
    if args.dry_run:
        print(f"ecom bus provision ({backend}), would create:")
        for line in services.BusPlan(tuple(queues), {n: tuple(t) for n, t in subscriptions.items()}, True).lines():
            print(f"  {line}")
        return 0
    try:
        if backend == "azure":
            report = asyncio.run(_provision_azure(settings, queues, subscriptions, args.ca_file))
        elif backend == "rabbitmq":
            report = asyncio.run(_provision_rabbitmq(settings, queues, subscriptions))
        else:
            print(f"ecom bus provision: the {backend} bus lives in one process; there is nothing to provision")
            return 0
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for line in report:
        print(line)
    return 0


async def _provision_azure(
    settings: Settings, queues: list[str], subscriptions: dict[str, list[str]], ca_file: str | None
) -> list[str]:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    from bus.azure import provision

    try:
        options = {"connection_verify": ca_file} if ca_file else None
        return await provision(settings, queues=queues, subscriptions=subscriptions, admin_options=options)
    except (HttpResponseError, ClientAuthenticationError) as exc:
        raise StartupError(f"bus provision: Service Bus refused: {exc}") from exc


async def _provision_rabbitmq(settings: Settings, queues: list[str], subscriptions: dict[str, list[str]]) -> list[str]:
    bus = await start_bus(settings)  # an unreachable broker is a StartupError naming it
    try:
        report: list[str] = await bus.provision(queues, subscriptions)
        return report
    finally:
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
    register_bus(sub)
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
    setup_logging(settings.general.log_level, settings.general.log_format)
    if not (args.command == "db" and args.db_command == "upgrade") and settings.general.log_level.upper() != "DEBUG":
        # Migrations are applied by every command that opens a database; only `ecom db upgrade` reports them
        # (it prints one line per component as well), the others keep quiet about them.
        logging.getLogger("runtime.migrate").setLevel(logging.WARNING)
    if settings.general.log_level.upper() != "DEBUG":
        logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl SQLiteImpl." and the like
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
    except StartupError as exc:
        print(f"ecom: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
