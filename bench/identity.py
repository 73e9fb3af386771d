"""Identity service benchmark over real HTTP on 127.0.0.1: password grants, refresh grants, token verification.

    python -m bench.identity [--quick] [--no-pg] [--pg-url URL] [--all-cores]

The identity service runs in this process on an ephemeral 127.0.0.1 port with production argon2id parameters
(RFC 9106 low-memory: 64 MiB, t=3, p=4); the process (event loop, argon2 threads, client) is pinned to one core
like bench/actors.py, the database server runs where the OS puts it. Every phase has a fixed amount of work and
a time limit. It prints numbers; it never fails on speed.

- password grant tokens/s: dominated by one argon2id verification each; the raw argon2id verify rate on the same
  core is printed next to it, and the share of the grant's time it accounts for.
- refresh grants/s: the rotation transaction (conditional UPDATE + INSERT) and the signature of a new token.
- verifications/s of runtime/auth.TokenVerifier (in-process, ES256): cache hit vs full verification (cache off).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from bench.actors import (
    _pg_url as pg_database,  # a throw-away database on the server, dropped after
)
from config import Settings, load_settings
from identity.accounts import register_user
from identity.core import IDENTITY
from identity.passwords import DEFAULT_PARAMETERS, Passwords
from identity.service import create_app, open_repository, seed
from runtime.auth import TokenVerifier

PASSWORD = "Bench-Password-42"
PHASE_LIMIT = 300.0  # seconds: a phase that takes longer is cut off (the numbers so far are still printed)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


async def bounded(label: str, work: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(work, PHASE_LIMIT)
    except TimeoutError:
        print(f"  {label}: stopped after {PHASE_LIMIT:.0f} s")
        return None


def argon2_verify_rate(rounds: int) -> float:
    """Raw argon2id verifications/s on this core (what a password grant cannot beat)."""
    pw = Passwords(DEFAULT_PARAMETERS, max_workers=1)
    stored = pw.hash_sync(PASSWORD)
    start = time.perf_counter()
    for _ in range(rounds):
        assert pw.verify_sync(PASSWORD, stored)
    return rate(rounds, time.perf_counter() - start)


class Server:
    """The identity app on 127.0.0.1 and an HTTP client for it."""

    def __init__(self, settings: Settings, database_url: str, runner: web.AppRunner, session: aiohttp.ClientSession):
        self.settings = settings
        self.database_url = database_url
        self.runner = runner
        self.session = session
        self.url = settings.issuer

    async def token(self, form: dict[str, str]) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/connect/token", data=form) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"token endpoint answered {resp.status}: {body}")
            return body

    async def password_grant(self, email: str) -> dict[str, Any]:
        return await self.token(
            {
                "grant_type": "password",
                "client_id": "storefront",
                "username": email,
                "password": PASSWORD,
                "scope": "offline_access ecom",
            }
        )

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        return await self.token(
            {"grant_type": "refresh_token", "client_id": "storefront", "refresh_token": refresh_token}
        )


def free_port() -> int:
    """A free port on 127.0.0.1, chosen before start so the issuer URL (part of every token) is right."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(database_url: str, data_dir: str, users: int) -> tuple[Server, list[str]]:
    port = free_port()
    settings = load_settings(
        {"ECOM_DATA_DIR": data_dir, "ECOM_IDENTITY_PORT": str(port), "ECOM_ADMIN_PASSWORD": PASSWORD}
    )
    await seed(settings, database_url)
    emails = [f"bench-{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(users)]
    passwords = Passwords(DEFAULT_PARAMETERS)
    async with open_repository(settings, database_url) as repo:
        for email in emails:
            await register_user(repo, passwords, email=email, password=PASSWORD, name="Bench")
    passwords.shutdown()
    runner = web.AppRunner(create_app(settings, database_url=database_url), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    return Server(settings, database_url, runner, session), emails


async def run_workers(workers: int, per_worker: int, step: Callable[[int], Awaitable[None]]) -> float:
    async def worker(w: int) -> None:
        for _ in range(per_worker):
            await step(w)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return rate(workers * per_worker, time.perf_counter() - start)


async def bench_password_grants(server: Server, emails: list[str], per_user: int) -> float:
    return await run_workers(len(emails), per_user, lambda w: server.password_grant(emails[w]))


async def bench_refresh(server: Server, emails: list[str], per_user: int) -> float:
    chains = [(await server.password_grant(e))["refresh_token"] for e in emails]

    async def step(w: int) -> None:
        chains[w] = (await server.refresh(chains[w]))["refresh_token"]  # each worker walks its own rotation chain

    return await run_workers(len(emails), per_user, step)


async def bench_verifications(server: Server, emails: list[str], count: int) -> tuple[float, float]:
    token = (await server.password_grant(emails[0]))["access_token"]
    jwks = server.runner.app[IDENTITY].keys.jwks()
    results = []
    for cache_size in (100_000, 0):
        settings = server.settings
        verifier = TokenVerifier(issuer=settings.issuer, audience=settings.general.audience, cache_size=cache_size)
        verifier.set_jwks(jwks)
        await verifier.verify(token)
        start = time.perf_counter()
        for _ in range(count):
            await verifier.verify(token)
        results.append(rate(count, time.perf_counter() - start))
        assert (verifier.cache_hits > 0) == (cache_size > 0)
        await verifier.close()
    return results[0], results[1]


async def bench_database(label: str, database_url: str, args: argparse.Namespace, argon2_rate: float) -> None:
    users = 4
    with tempfile.TemporaryDirectory() as data_dir:
        server, emails = await start_server(database_url, data_dir, users)
        try:
            grants = await bounded("password grants", bench_password_grants(server, emails, 2 if args.quick else 8))
            if grants is not None:
                share = min(1.0, grants / argon2_rate)
                print(
                    f"  {label:10} password grant  {grants:8.1f} tokens/s  (argon2id alone: {argon2_rate:.1f} "
                    f"verifies/s -> argon2 is ~{share:.0%} of each grant's time on this core)"
                )
            refreshes = await bounded("refresh grants", bench_refresh(server, emails, 50 if args.quick else 250))
            if refreshes is not None:
                print(
                    f"  {label:10} refresh grant   {refreshes:8.0f} grants/s  (rotation transaction + new ES256 "
                    f"token, {users} concurrent chains)"
                )
            if label == "sqlite":
                count = 2_000 if args.quick else 10_000
                verified = await bounded("verifications", bench_verifications(server, emails, count))
                if verified is not None:
                    cached, full = verified
                    print(
                        f"  runtime/auth verify   cached {cached:10,.0f}/s | no cache {full:8,.0f}/s "
                        "(ES256, in-process)"
                    )
        finally:
            await server.session.close()
            await server.runner.cleanup()


async def run(args: argparse.Namespace) -> None:
    rounds = 5 if args.quick else 20
    argon2_rate = argon2_verify_rate(rounds)
    p = DEFAULT_PARAMETERS
    print(
        f"argon2id m={p.memory_cost // 1024} MiB t={p.time_cost} p={p.parallelism}: {argon2_rate:.1f} verifies/s "
        f"({1000 / argon2_rate:.0f} ms each) on one thread"
    )
    print("identity over HTTP on 127.0.0.1 (4 users, concurrent)")
    with tempfile.TemporaryDirectory() as tmp:
        await bench_database("sqlite", f"sqlite+aiosqlite:///{tmp}/identity.db", args, argon2_rate)
    if not args.no_pg:
        made = await pg_database(args.pg_url)
        if made is not None:
            url, drop = made
            try:
                await bench_database("postgresql", url, args, argon2_rate)
            finally:
                await drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.identity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a fraction of the work, for a smoke run")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    parser.add_argument("--cpu", type=int, help="the core to pin to (default: the first one allowed)")
    args = parser.parse_args(argv)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {args.cpu if args.cpu in allowed else allowed[0]})
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
