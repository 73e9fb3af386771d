"""Catalog service benchmark: product reads over HTTP, and stock reservations through the ProductActor.

    python -m bench.catalog [--quick] [--no-pg] [--pg-url URL] [--all-cores]

Reads: the catalog service runs in a child process pinned to one core (the load generator gets another core
when there is one, so it does not steal the service's), listening on 127.0.0.1 only. Product-list and
product-detail requests/s are measured with the seeded demo catalog, then again with 100,000 products
(bulk-loaded straight into the query tables, as the actors' hooks would write them; those rows have no
actor state, which reads never look at).

Reservations: ReserveStock asks to ProductActors in this process (pinned to one core), each turn committed
to the database: all on one hot product (turns of one actor run one after another) versus spread over many
products (turns run concurrently and share transactions through group commit).

Every phase is bounded in requests and in seconds. Numbers are printed, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from actors.catalog import repository as repo
from actors.catalog import service
from actors.catalog.actor import ProductActor
from actors.catalog.messages import CreateProduct, ReserveStock, StockReserved
from bench.actors import _pg_url
from config import load_settings
from runtime.actors import ActorSystem
from runtime.store import StateStore, create_engine

HOST = "127.0.0.1"
BIG_CATALOG = 100_000
COLOURS = ("Slate", "Moss", "Ember", "Glacier", "Sand", "Midnight", "Fern", "Rust", "Sky", "Charcoal")
EDITIONS = ("Classic", "Pro", "Lite", "Trail", "Summit", "Explorer", "Coastal", "Nordic", "Urban")


@dataclass(frozen=True)
class Budget:
    requests: int  # per read scenario
    seconds: float  # per read scenario
    concurrency: int  # open connections of the load generator
    hot: int  # reservations on the hot product
    spread: int  # reservations spread over many products
    spread_products: int


FULL = Budget(requests=6000, seconds=15.0, concurrency=32, hot=2000, spread=8000, spread_products=400)
QUICK = Budget(requests=1500, seconds=4.0, concurrency=32, hot=500, spread=2000, spread_products=200)


# ---------------------------------------------------------------------------------------------------
# The service under test, in its own process


def serve(url: str, port: int, core: int | None) -> None:
    """Child process: the catalog app exactly as ``ecom serve catalog`` builds it (without a bus)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from aiohttp import web

    from runtime.cli import install_uvloop

    install_uvloop()

    async def main() -> None:
        settings = load_settings({})
        app = service.create_app(settings, database_url=url)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_service(url: str, core: int | None) -> AsyncIterator[str]:
    port = _free_port()
    args = ["-m", "bench.catalog", "--serve", url, "--port", str(port)]
    if core is not None:
        args += ["--core", str(core)]
    child = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the catalog service did not start (exit code {child.returncode})")
        yield f"http://{HOST}:{port}"
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)  # only the child this function started
            try:
                await asyncio.wait_for(child.wait(), timeout=10)
            except TimeoutError:
                child.kill()
                await child.wait()


# ---------------------------------------------------------------------------------------------------
# Load generator


async def measure(base: str, next_path: Callable[[int], str], budget: Budget) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-200 answers) for GETs of ``next_path(i)``, bounded by the budget."""
    latencies: list[float] = []
    failures = 0
    issued = 0
    connector = aiohttp.TCPConnector(limit=budget.concurrency)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def get(i: int) -> None:
            nonlocal failures
            start = time.perf_counter()
            async with session.get(next_path(i)) as resp:
                await resp.read()
                failures += resp.status != 200
            latencies.append(time.perf_counter() - start)

        async def worker(deadline: float) -> None:
            nonlocal issued
            while issued < budget.requests and time.perf_counter() < deadline:
                issued += 1
                await get(issued)

        # Warm up (connections, the service's statement caches) before the clock starts.
        await asyncio.gather(*(get(i) for i in range(budget.concurrency)))
        latencies.clear()
        failures = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + budget.seconds) for _ in range(budget.concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return len(latencies) / elapsed, p50, p99, failures


async def read_scenarios(engine: AsyncEngine) -> dict[str, Callable[[int], str]]:
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one()
        ids = list((await conn.execute(select(repo.products.c.id).limit(2000))).scalars())
        brands = [b["name"] for b in await repo.list_named(conn, repo.brands)]
    rng = random.Random(7)
    random.Random(7).shuffle(ids)
    pages = max(1, min(50, total // 20))
    queries = ("waterproof", "insulated bottle", "tent", "merino socks", "headlamp", "down")
    products = "/api/catalog/products"
    return {
        "list: page 1-50, by name": lambda i: f"{products}?{urlencode({'page': rng.randint(1, pages)})}",
        "list: brand, by price": lambda i: (
            f"{products}?{urlencode({'brand': brands[i % len(brands)], 'sort': 'price'})}"
        ),
        "list: search 1-2 words": lambda i: f"{products}?{urlencode({'q': queries[i % len(queries)]})}",
        "detail": lambda i: f"{products}/{ids[i % len(ids)]}",
    }


async def bench_reads(
    label: str, url: str, engine: AsyncEngine, budget: Budget, cores: tuple[int | None, int | None]
) -> None:
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one()
    scenarios = await read_scenarios(engine)
    async with running_service(url, cores[0]) as base:
        for name, next_path in scenarios.items():
            rate, p50, p99, failures = await measure(base, next_path, budget)
            note = f"  ({failures} non-200!)" if failures else ""
            print(
                f"  {label:10} {total:>7} products  {name:26} {rate:8.0f} req/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms{note}"
            )


# ---------------------------------------------------------------------------------------------------
# 100,000 products


def _big_catalog_values(count: int, brand_ids: dict[str, str], type_ids: dict[str, str]) -> list[dict[str, Any]]:
    """Variants of the demo products (colour, edition, model number): real words to search, varied prices."""
    demo = service.load_demo_catalog()["products"]
    now = datetime.now(UTC)
    rng = random.Random(42)
    values = []
    for n in range(count):
        p = demo[n % len(demo)]
        price = (Decimal(p["price"]) * Decimal(rng.randint(80, 130)) / 100).quantize(Decimal("0.01"))
        values.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "name": f"{p['name']} {rng.choice(EDITIONS)} {rng.choice(COLOURS)} {n:06d}",
                "description": p["description"],
                "price": price,
                "currency": "USD",
                "brand_id": brand_ids[p["brand"]],
                "type_id": type_ids[p["type"]],
                "picture_url": p.get("picture_url"),
                "available_stock": p["available_stock"],
                "restock_threshold": p["restock_threshold"],
                "max_stock": p["max_stock"],
                "created_at": now,
                "updated_at": now,
            }
        )
    return values


async def _copy_rows(engine: AsyncEngine, rows: list[dict[str, Any]], terms: list[dict[str, Any]]) -> None:
    """Bulk insert the classic way: secondary indexes dropped and rebuilt once at the end (a sort instead
    of millions of random b-tree inserts), rows handed to the driver itself (PostgreSQL: COPY; SQLite: the C
    ``executemany``; SQLAlchemy's per-row work alone would take minutes for two million term rows), and no
    per-row foreign-key checks: the rows are consistent by construction."""
    tables = ((repo.products, rows), (repo.product_terms, terms))
    indexes = [ix for table, _ in tables for ix in table.indexes]
    terms.sort(key=lambda t: (t["term"], t["product_id"]))  # primary-key order: appends, not page splits
    postgres = engine.dialect.name == "postgresql"
    async with engine.connect() as conn:
        for ix in indexes:
            await conn.run_sync(ix.drop)
        await conn.commit()
        driver = (await conn.get_raw_connection()).driver_connection
        await driver.execute("SET session_replication_role = replica" if postgres else "PRAGMA foreign_keys = OFF")
        for table, data in tables:
            columns = list(data[0])
            records = [tuple(r[c] for c in columns) for r in data] if postgres else _sqlite_records(data, columns)
            if postgres:
                await driver.copy_records_to_table(table.name, records=records, columns=columns)
            else:
                marks = ", ".join("?" * len(columns))
                await driver.executemany(f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})", records)
                await driver.commit()
        await driver.execute("SET session_replication_role = DEFAULT" if postgres else "PRAGMA foreign_keys = ON")
        for ix in indexes:
            await conn.run_sync(ix.create)
        await repo.rebuild_counts(conn)
        await conn.execute(text("ANALYZE"))  # statistics for the planner, as a grown production table has
        await conn.commit()


def _sqlite_records(data: list[dict[str, Any]], columns: list[str]) -> list[tuple[Any, ...]]:
    """Rows as SQLAlchemy's SQLite types store them: Numeric as a float, DateTime as naive UTC ISO text."""

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return float(value)
        if isinstance(value, datetime):
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
        return value

    special = {c for c in columns if isinstance(data[0][c], (Decimal, datetime))}  # only these need work
    return [tuple(convert(r[c]) if c in special else r[c] for c in columns) for r in data]


async def grow_catalog(engine: AsyncEngine, target: int) -> float:
    """Bulk-load products until the catalog has ``target``; returns the seconds it took."""
    started = time.perf_counter()
    async with engine.connect() as conn:
        have = (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one()
        brand_ids = {b["name"]: b["id"] for b in await repo.list_named(conn, repo.brands)}
        type_ids = {t["name"]: t["id"] for t in await repo.list_named(conn, repo.product_types)}
    rows, terms = repo.bulk_rows(_big_catalog_values(target - have, brand_ids, type_ids))
    await _copy_rows(engine, rows, terms)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------
# Reservations


async def _create_products(system: ActorSystem, engine: AsyncEngine, count: int, stock: int) -> list[str]:
    async with engine.connect() as conn:
        brand = (await repo.list_named(conn, repo.brands))[0]["id"]
        kind = (await repo.list_named(conn, repo.product_types))[0]["id"]
    ids = [str(uuid.uuid4()) for _ in range(count)]
    await asyncio.gather(
        *(
            system.ref(ProductActor, pid).ask(
                CreateProduct(
                    pid, f"Bench item {pid[:8]}", "", Decimal("9.99"), "USD", brand, kind, None, stock, 0, stock
                )
            )
            for pid in ids
        )
    )
    return ids


async def reserve_all(
    system: ActorSystem, product_ids: list[str], count: int, window: int, seconds: float
) -> tuple[float, int, int]:
    """Up to ``count`` one-unit reservations from distinct orders, round-robin over the products, at most
    ``window`` in flight, no new window after ``seconds``; returns (reservations/s, made, reserved)."""
    reserved = made = 0
    started = time.perf_counter()
    while made < count and time.perf_counter() - started < seconds:
        batch = []
        for i in range(made, min(count, made + window)):
            pid = product_ids[i % len(product_ids)]
            batch.append(system.ref(ProductActor, pid).ask(ReserveStock(f"order-{uuid.uuid4()}", pid, 1)))
        reserved += sum(isinstance(r, StockReserved) for r in await asyncio.gather(*batch))
        made += len(batch)
    return made / (time.perf_counter() - started), made, reserved


async def bench_reservations(label: str, engine: AsyncEngine, budget: Budget) -> None:
    store = StateStore(engine)
    system = ActorSystem(
        store, mailbox_size=budget.hot + 10, ask_timeout=120, max_activations=budget.spread_products + 100
    )
    system.register(ProductActor)
    await system.start()
    try:
        hot = await _create_products(system, engine, 1, budget.hot)
        rate, made, reserved = await reserve_all(system, hot, budget.hot, budget.hot, budget.seconds)
        assert reserved == made, f"hot product: {reserved} of {made} reserved"
        print(f"  {label:10} one hot product             {rate:8.0f} reservations/s ({made} orders)")
        per = budget.spread // budget.spread_products
        spread = await _create_products(system, engine, budget.spread_products, per)
        commits, turns = store.commits, store.turns_committed
        rate, made, reserved = await reserve_all(system, spread, budget.spread, 1000, budget.seconds)
        assert reserved == made, f"spread: {reserved} of {made} reserved"
        per_txn = (store.turns_committed - turns) / max(1, store.commits - commits)
        print(f"  {label:10} spread over {len(spread)} products    {rate:8.0f} reservations/s "
              f"({made} orders, {per_txn:.1f} turns per transaction)")  # fmt: skip
    finally:
        await system.stop()


# ---------------------------------------------------------------------------------------------------
# Driver


async def bench_database(label: str, url: str, budget: Budget, cores: tuple[int | None, int | None]) -> None:
    settings = load_settings({})
    await service.seed(settings, database_url=url)
    # A small pool: PostgreSQL's connection limit is shared with the service process (and anyone else).
    engine = create_engine(url, pool_size=5)
    try:
        await bench_reads(label, url, engine, budget, cores)
        # Reservations before the bulk load: its aftermath (checkpoints, autovacuum) would be measured too.
        _pin(cores[0])  # the service process is gone: the actors get its core
        await bench_reservations(label, engine, budget)
        _pin(cores[1])
        seconds = await grow_catalog(engine, BIG_CATALOG)
        print(f"  {label:10} (bulk-loaded up to {BIG_CATALOG} products with their search words in {seconds:.1f}s)")
        await bench_reads(label, url, engine, budget, cores)
    finally:
        await engine.dispose()


def _pin(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


async def run(args: argparse.Namespace) -> None:
    budget = QUICK if args.quick else FULL
    cores: tuple[int | None, int | None] = (None, None)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        cores = (available[0], available[1] if len(available) > 1 else available[0])
        _pin(cores[1])
        if len(available) == 1:
            print("note: one core only: the load generator shares it with the service")
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work on this machine skews every number)"
    )
    print(f"catalog reads over HTTP (service on core {cores[0]}, load generator on core {cores[1]}, "
          f"{budget.concurrency} connections, up to {budget.requests} requests or {budget.seconds:g}s per line)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        await bench_database("sqlite", f"sqlite+aiosqlite:///{tmp}/catalog.db", budget, cores)
    if not args.no_pg:
        made = await _pg_url(args.pg_url)
        if made is not None:
            url, drop = made
            try:
                await bench_database("postgresql", url, budget, cores)
            finally:
                await drop()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.catalog", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the work, for a smoke run")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--all-cores", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--serve", metavar="DATABASE_URL", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.core)
        return 0
    from runtime.cli import install_uvloop

    install_uvloop()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
