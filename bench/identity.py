"""Identity service benchmark over real HTTP on 127.0.0.1: password grants, refresh grants, token verification.

    python -m bench.identity [--quick] [--no-pg] [--pg-url URL] [--all-cores]

The identity service runs in this process on a free 127.0.0.1 port in 20000-32000 with the argon2id parameters
of the settings (``ECOM_AUTH_ARGON2_*``; default OWASP's m=19 MiB, t=2, p=1); the process (event loop, argon2
threads, client) is pinned to one core like bench/actors.py, the database server runs where the OS puts it.
Every phase has a fixed amount of work and a time limit. It prints numbers; it never fails on speed.

- password grants/s on one core (target >= 15, Keycloak's sizing figure), by the wall clock and per CPU-second
  of this process (steadier on a shared machine): dominated by one argon2id verification each; the raw argon2id
  verify rate on the same core is printed next to it.
- refresh grants/s: the rotation transaction (conditional UPDATE + INSERT) and the signature of a new token.
- refresh-grant latency (p50/p99) alone, then while a sign-in flood runs (more concurrent password grants than
  the argon2 pool admits: the surplus is refused with 503 + Retry-After), side by side.
- verifications/s of runtime/auth.TokenVerifier (in-process, ES256): cache hit vs full verification (cache off).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
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
from bench.report import figure
from bench.shop import free_port
from config import Settings, load_settings
from identity.accounts import register_user
from identity.core import IDENTITY
from identity.passwords import Passwords
from identity.seed import open_repository, seed
from identity.service import create_app
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


def argon2_verify_rate(rounds: int) -> tuple[float, float]:
    """Raw argon2id verifications/s on this core (what a password grant cannot beat): by the wall clock and per
    CPU-second of this thread."""
    pw = Passwords.from_settings(load_settings({}).auth)
    stored = pw.hash_sync(PASSWORD)
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(rounds):
        assert pw.verify_sync(PASSWORD, stored)
    return rate(rounds, time.perf_counter() - start), rate(rounds, time.thread_time() - cpu)


class Server:
    """The identity app on 127.0.0.1 and an HTTP client for it."""

    def __init__(self, settings: Settings, database_url: str, runner: web.AppRunner, session: aiohttp.ClientSession):
        self.settings = settings
        self.database_url = database_url
        self.runner = runner
        self.session = session
        self.url = settings.base_url("identity")  # identity itself (the issuer is the public URL, the gateway's)

    async def token(
        self, form: dict[str, str], refused: list[float] | None = None, session: aiohttp.ClientSession | None = None
    ) -> dict[str, Any]:
        """The token response; with ``refused``, a 503 + Retry-After is recorded there (Retry-After seconds)."""
        async with (session or self.session).post(f"{self.url}/connect/token", data=form) as resp:
            body = await resp.json(content_type=None)
            if resp.status == 503 and refused is not None and resp.headers.get("Retry-After"):
                refused.append(float(resp.headers["Retry-After"]))
                return {}
            if resp.status != 200:
                raise RuntimeError(f"token endpoint answered {resp.status}: {body}")
            return body

    async def password_grant(
        self, email: str, refused: list[float] | None = None, session: aiohttp.ClientSession | None = None
    ) -> dict[str, Any]:
        return await self.token(
            {
                "grant_type": "password",
                "client_id": "storefront",
                "username": email,
                "password": PASSWORD,
                "scope": "offline_access ecom",
            },
            refused,
            session,
        )

    async def refresh(self, refresh_token: str, session: aiohttp.ClientSession | None = None) -> dict[str, Any]:
        return await self.token(
            {"grant_type": "refresh_token", "client_id": "storefront", "refresh_token": refresh_token}, None, session
        )


async def start_server(database_url: str, data_dir: str, users: int) -> tuple[Server, list[str]]:
    port = free_port()  # chosen before start so the issuer URL (part of every token) is right
    settings = load_settings(
        {"ECOM_DATA_DIR": data_dir, "ECOM_IDENTITY_PORT": str(port), "ECOM_ADMIN_PASSWORD": PASSWORD}
    )
    await seed(settings, database_url)
    emails = [f"bench-{i}-{uuid.uuid4().hex[:6]}@example.com" for i in range(users)]
    passwords = Passwords.from_settings(settings.auth)
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


async def bench_password_grants(server: Server, emails: list[str], per_user: int) -> tuple[float, float]:
    """Password grants/s by the wall clock and per CPU-second of this process (server, argon2 and client)."""
    cpu = time.process_time()
    start = time.perf_counter()
    await run_workers(len(emails), per_user, lambda w: server.password_grant(emails[w]))
    count = len(emails) * per_user
    return rate(count, time.perf_counter() - start), rate(count, time.process_time() - cpu)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def refresh_latencies(server: Server, chains: list[str], count: int, stop: asyncio.Event) -> list[float]:
    """Milliseconds of ``count`` refresh grants (one chain after another), or fewer if ``stop`` is set. Its own
    client connection: the flood's connections never make it wait on the client side."""
    samples: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            if stop.is_set():
                break
            w = i % len(chains)
            start = time.perf_counter()
            chains[w] = (await server.refresh(chains[w], session))["refresh_token"]
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def flood_process(url: str, flooders: int, stop: Any, results: Any) -> None:
    """A sign-in flood in a process of its own, on any core (the server's core keeps only the server's work):
    ``flooders`` loops, each attempt with an email of its own (no account: one full argon2 verification against
    the dummy hash, then 400), as a credential-stuffing flood would. Attempts on one email would queue in its
    login actor instead, one at a time, and never reach the hashing pool together. More loops than the pool admits,
    a refused one back within a second: the hashing queue stays full. Bounded: 50 attempts a loop,
    until ``stop`` is set. Puts (attempts checked, Retry-After of each refused one, failures) on ``results``."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))

    async def run() -> tuple[int, list[float], list[str]]:
        checked, refused, failures = 0, [], []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=flooders)) as session:

            async def loop(w: int) -> None:
                nonlocal checked
                for i in range(50):
                    if stop.is_set():
                        return
                    form = {
                        "grant_type": "password",
                        "client_id": "storefront",
                        "username": f"flood-{w}-{i}@example.com",
                        "password": PASSWORD,
                    }
                    async with session.post(f"{url}/connect/token", data=form) as resp:
                        await resp.read()
                        if resp.status == 503 and resp.headers.get("Retry-After"):
                            refused.append(float(resp.headers["Retry-After"]))
                            # back again within a second whatever Retry-After says: the queue stays full, and the
                            # flood stays one of sign-ins (a plain HTTP flood is the gateway's per-address limits')
                            await asyncio.sleep(random.uniform(0.5, 1.0))
                        elif resp.status == 400:
                            checked += 1
                        else:
                            failures.append(f"status {resp.status}")
                            return

            await asyncio.gather(*(loop(w) for w in range(flooders)))
        return checked, refused, failures

    results.put(asyncio.run(run()))


async def bench_refresh_under_flood(
    server: Server, emails: list[str], count: int, flooders: int
) -> tuple[list[float], list[float], int, list[float]]:
    """Refresh-grant latencies alone, then while :func:`flood_process` runs; also the flood's attempts checked
    and the Retry-After of each refused one."""
    chains = [(await server.password_grant(e))["refresh_token"] for e in emails]
    alone = await refresh_latencies(server, chains, count, asyncio.Event())
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    flooder = ctx.Process(target=flood_process, args=(server.url, flooders, stop, results), daemon=True)
    flooder.start()
    try:
        await asyncio.sleep(2.0)  # the process starts and the queue fills
        during = await refresh_latencies(server, chains, count, asyncio.Event())
    finally:
        stop.set()
    checked, refused, failures = await asyncio.to_thread(results.get, True, PHASE_LIMIT)
    await asyncio.to_thread(flooder.join, 30)
    if failures:
        print(f"  {len(failures)} flood loops failed, the first with: {failures[0]}")
    return alone, during, checked, refused


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
        verifier = TokenVerifier(
            issuer=settings.issuer,
            jwks_url=settings.jwks_url,
            audience=settings.general.audience,
            cache_size=cache_size,
        )
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
            grants = await bounded("password grants", bench_password_grants(server, emails, 3 if args.quick else 8))
            if grants is not None:
                wall, per_cpu = grants
                print(
                    f"  {label:10} password grant  {wall:8.1f} grants/s on one core ({per_cpu:.1f} per CPU-second "
                    f"of the process; argon2id alone: {argon2_rate:.1f} verifies/s)"
                )
                figure("identity", f"{label}: password grants/s on one core", wall, "/s", ">= 15")
                figure("identity", f"{label}: password grants per CPU-second", per_cpu, "/s", ">= 15")
            refreshes = await bounded("refresh grants", bench_refresh(server, emails, 50 if args.quick else 250))
            if refreshes is not None:
                print(
                    f"  {label:10} refresh grant   {refreshes:8.0f} grants/s  (rotation transaction + new ES256 "
                    f"token, {users} concurrent chains)"
                )
            count = 100 if args.quick else 400
            workers = server.runner.app[IDENTITY].passwords.max_workers + server.runner.app[IDENTITY].passwords.queue
            flooders = workers * 2  # twice what the pool admits: some sign-ins are refused
            flooded = await bounded("refresh under flood", bench_refresh_under_flood(server, emails, count, flooders))
            if flooded is not None:
                alone, during, checked, refused = flooded
                p99_alone, p99_during = percentile(alone, 0.99), percentile(during, 0.99)
                print(
                    f"  {label:10} refresh latency alone        p50 {percentile(alone, 0.5):6.1f} ms  "
                    f"p99 {p99_alone:6.1f} ms"
                )
                print(
                    f"  {label:10} refresh latency during flood p50 {percentile(during, 0.5):6.1f} ms  "
                    f"p99 {p99_during:6.1f} ms  ({flooders} sign-in loops: {checked} checked, {len(refused)} refused "
                    f"with 503, Retry-After median {statistics.median(refused) if refused else 0:.0f} s)"
                )
                figure("identity", f"{label}: refresh p99 alone", p99_alone, "ms")
                figure("identity", f"{label}: refresh p99 during a sign-in flood", p99_during, "ms")
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
    rounds = 10 if args.quick else 40
    argon2_rate, argon2_cpu = argon2_verify_rate(rounds)
    p = Passwords.from_settings(load_settings({}).auth).parameters
    print(
        f"argon2id m={p.memory_cost} KiB t={p.time_cost} p={p.parallelism}: {argon2_rate:.1f} verifies/s "
        f"({1000 / argon2_rate:.0f} ms each) on one thread; {argon2_cpu:.1f} per CPU-second"
    )
    figure("identity", f"argon2id m={p.memory_cost} KiB t={p.time_cost} p={p.parallelism} verifies/s", argon2_rate)
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
