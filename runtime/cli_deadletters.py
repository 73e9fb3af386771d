"""``ecom bus dead-letters list|show|replay|discard``: a service's dead letters from the command line.

    ecom bus dead-letters list [--service S]          dead letters per queue/subscription (every service)
    ecom bus dead-letters list --service S [--queue Q] the dead letters of one queue, oldest first
    ecom bus dead-letters show --service S MESSAGE_ID  one, with its body, headers and reason
    ecom bus dead-letters replay --service S MESSAGE_ID    back through the service's outbox, same message id
    ecom bus dead-letters discard --service S MESSAGE_ID   delete it
    (--queue defaults to the service's own queue or subscription; --json prints the admin API's JSON)

Where the dead letters are decides how the command reaches them:

- **RabbitMQ and Azure Service Bus** (``ECOM_BUS=rabbitmq|azure``): the command connects to the broker with
  the configured ``ECOM_BUS_URL`` and to the service's database (``ECOM_<SERVICE>_DATABASE_URL``) itself. A
  replay is written to that database's outbox, which the running service's relay sends within its poll
  interval (or the service does when it next starts); replays and discards are recorded in the service's
  audit log as ``cli:<your OS user>``. No service needs to be running, and no token is involved: whoever
  holds the broker and database credentials is trusted, as with ``ecom db``.
- **In-memory bus** (``ECOM_BUS=memory``, the default): the dead letters live inside the running ``ecom
  run`` process, so the command calls that process's admin API (``/api/<service>/admin/dead-letters``, at
  ``--url`` or the service's configured address) with an admin's access token from ``ECOM_ADMIN_TOKEN`` or
  ``--token-stdin`` (never on the command line, where process lists and shell history would show it). Sign
  in as an admin to get one (README, "An admin token"); the audit log names that admin.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable
from typing import Any
from urllib.parse import quote

from config import Settings
from runtime.errors import Problem

__all__ = ["register"]

TOKEN_VARIABLE = "ECOM_ADMIN_TOKEN"
HTTP_TIMEOUT = 30.0


class CliError(Exception):
    """One line for the user, exit status 1."""


def register(subparsers: Any) -> None:
    """Adds ``dead-letters`` under ``ecom bus`` (made by ``runtime.cli.register_bus``, or here if it is absent)."""
    bus_parser = subparsers.choices.get("bus") or subparsers.add_parser("bus", help="message bus administration")
    bus_sub = next((a for a in bus_parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if bus_sub is None:
        bus_sub = bus_parser.add_subparsers(dest="bus_command", required=True)
    parser = bus_sub.add_parser(
        "dead-letters",
        help="list, show, replay or discard a service's dead letters",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="dead_letters_command", required=True)
    for name, text in (
        ("list", "dead letters per queue (or of one queue with --queue / --service)"),
        ("show", "one dead letter with its body, headers and reason"),
        ("replay", "send it again through the service's outbox, keeping its message id (recorded)"),
        ("discard", "delete it (recorded)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--service", help="the service whose queues to look at (list: default every service)")
        command.add_argument("--queue", help="queue or subscription name (default: the service's own)")
        if name != "list":
            command.add_argument("message_id", metavar="MESSAGE_ID")
        if name == "list":
            command.add_argument("--page", type=int, default=1)
            command.add_argument("--page-size", type=int, default=100)
        command.add_argument("--json", action="store_true", help="print the admin API's JSON")
        command.add_argument("--url", help="in-memory bus: the running service's base URL (default: its address)")
        command.add_argument(
            "--token-stdin",
            action="store_true",
            help=f"in-memory bus: read the admin access token from standard input (else ${TOKEN_VARIABLE})",
        )
        command.set_defaults(handler=_main)


# -- the two ways to the dead letters -----------------------------------------------------------------


def _main(settings: Settings, args: argparse.Namespace) -> int:
    try:
        services = _services(settings, args)
        if settings.bus.backend == "memory":
            token = _token(args)
            result = asyncio.run(_over_http(settings, args, services, token))
        else:
            result = asyncio.run(_direct(settings, args, services))
    except CliError as exc:
        print(f"ecom: {exc}", file=sys.stderr)
        return 1
    _print(args, result)
    return 0


def _services(settings: Settings, args: argparse.Namespace) -> list[str]:
    from runtime import services
    from runtime.deadletters import service_sources

    if args.dead_letters_command == "list" and not (args.page >= 1 and 1 <= args.page_size <= 500):
        raise CliError("--page must be 1 or more and --page-size between 1 and 500")

    with_queues = [name for name in services.SERVICE_MODULES if service_sources(name)]
    if args.service is None:
        if args.dead_letters_command != "list" or args.queue is not None:
            raise CliError(f"--service is needed (one of {', '.join(with_queues)})")
        return with_queues
    if args.service not in services.SERVICE_MODULES:
        raise CliError(f"--service: no service {args.service!r} (one of {', '.join(services.SERVICE_MODULES)})")
    if args.service not in with_queues:
        raise CliError(f"the {args.service} service consumes no bus queue (those that do: {', '.join(with_queues)})")
    return [args.service]


def _queue(args: argparse.Namespace, service: str) -> str:
    from runtime.deadletters import service_sources

    return args.queue or service_sources(service)[0][0]


def _token(args: argparse.Namespace) -> str:
    token = sys.stdin.readline().strip() if args.token_stdin else os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise CliError(
            "with the in-memory bus the dead letters live in the running `ecom run` process, reached through its "
            f"admin API: give an admin's access token in ${TOKEN_VARIABLE} or on standard input with --token-stdin"
        )
    return token


async def _direct(settings: Settings, args: argparse.Namespace, services: list[str]) -> Any:
    """RabbitMQ / Azure: the broker and the service's database, straight from this process."""
    from runtime import migrate
    from runtime.cli import start_bus, with_database
    from runtime.deadletters import DeadLetterAdmin, Operator
    from runtime.store import create_engine

    operator = Operator(f"cli:{getpass.getuser()}", "cli")
    bus = await start_bus(settings)
    try:
        results: list[Any] = []
        for service in services:
            engine = create_engine(settings.database_url(service))
            try:
                # The audit log's table may be newer than the database: the runtime component only.
                await with_database(settings, service, migrate.upgrade(engine, [migrate.RUNTIME]))
                admin = DeadLetterAdmin(service, engine, bus)
                results.append(await with_database(settings, service, _problems(_run(args, service, admin, operator))))
            finally:
                await engine.dispose()
        return results if args.dead_letters_command == "list" and args.service is None else results[0]
    finally:
        await bus.close()


async def _run(args: argparse.Namespace, service: str, admin: Any, operator: Any) -> Any:
    """The command on ``admin`` (a DeadLetterAdmin), answered as the admin API would."""
    from runtime.deadletters import letter_json, letter_summary

    command, queue = args.dead_letters_command, _queue(args, service)
    if command == "list" and args.queue is None and args.service is None:
        queues = await admin.summary()
        return {"service": service, "bus": admin.bus.name, "queues": queues, "total": sum(q["count"] for q in queues)}
    if command == "list":
        items = [letter_summary(x) for x in await admin.list(queue)]
        start = (args.page - 1) * args.page_size
        return {
            "items": items[start : start + args.page_size],
            "page": args.page,
            "page_size": args.page_size,
            "total": len(items),
        }
    if command == "show":
        return letter_json(await admin.show(queue, args.message_id))
    if command == "replay":
        return await admin.replay(queue, args.message_id, operator)
    return {"status": "discarded", **letter_json(await admin.discard(queue, args.message_id, operator))}


async def _problems(work: Awaitable[Any]) -> Any:
    try:
        return await work
    except Problem as exc:
        raise CliError(exc.detail) from None


async def _over_http(settings: Settings, args: argparse.Namespace, services: list[str], token: str) -> Any:
    """In-memory bus: the running process's admin API, with the admin's token."""
    import aiohttp

    results: list[Any] = []
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for service in services:
            base = (args.url or settings.base_url(service)).rstrip("/") + f"/api/{service}/admin/dead-letters"
            command = args.dead_letters_command
            quoted = [quote(part, safe="") for part in (_queue(args, service), getattr(args, "message_id", ""))]
            if command == "list" and args.queue is None and args.service is None:
                method, url, params = "GET", base, {}
            elif command == "list":
                method, url, params = "GET", f"{base}/{quoted[0]}", {"page": args.page, "page_size": args.page_size}
            elif command == "show":
                method, url, params = "GET", f"{base}/{quoted[0]}/{quoted[1]}", {}
            elif command == "replay":
                method, url, params = "POST", f"{base}/{quoted[0]}/{quoted[1]}/replay", {}
            else:
                method, url, params = "DELETE", f"{base}/{quoted[0]}/{quoted[1]}", {}
            try:
                async with session.request(method, url, params=params) as response:
                    body = await response.json(content_type=None)
                    if response.status >= 400:
                        detail = body.get("detail") if isinstance(body, dict) else None
                        raise CliError(f"{service}: {response.status} {detail or response.reason}")
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise CliError(
                    f"{service}: cannot reach its admin API at {url} ({type(exc).__name__}); is `ecom run` going? "
                    "(ECOM_BUS=memory: the dead letters live in that process)"
                ) from None
            except ValueError:
                raise CliError(f"{service}: {url} did not answer JSON") from None
            results.append(body)
    return results if args.dead_letters_command == "list" and args.service is None else results[0]


# -- output ---------------------------------------------------------------------------------------


def _print(args: argparse.Namespace, result: Any) -> None:
    import orjson

    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    command = args.dead_letters_command
    if command == "list" and isinstance(result, list):
        rows = [[s["service"], q["queue"], q["kind"], str(q["count"])] for s in result for q in s["queues"]]
        _table(rows, ["SERVICE", "QUEUE", "KIND", "DEAD LETTERS"])
    elif command == "list":
        rows = [
            [x["message_id"], x["type"], x["session_id"], str(x["attempts"]), x["dead_lettered_at"], x["reason"][:60]]
            for x in result["items"]
        ]
        _table(rows, ["MESSAGE ID", "TYPE", "SESSION", "ATTEMPTS", "DEAD-LETTERED AT", "REASON"])
        print(f"({len(result['items'])} of {result['total']})")
    elif command == "show":
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    elif command == "replay":
        note = "" if result.get("dead_letter_removed", True) else " (still listed: removing it failed, discard it)"
        print(f"replayed {result['message_id']} to {result['kind']} {result['queue']} through the outbox{note}")
    else:
        print(f"discarded {result['message_id']} from {result['kind']} {result['queue']}")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
