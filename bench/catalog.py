"""Catalog service benchmark: reads over HTTP against a bare aiohttp JSON handler, and stock reservations.

    python -m bench.catalog [--quick] [--no-pg] [--pg-url URL] [--all-cores] [--aiohttp-client]

Load generator: ``wrk`` (Debian: ``apt-get install wrk``), one thread, a fixed number of connections, each
scenario bounded to a few seconds; with ``--aiohttp-client`` (or without wrk) an aiohttp client bounded in
requests and seconds, which saturates less (one Python core is slower than wrk at sending).

Reads: each server runs in a child process pinned to one core (``sched_setaffinity``, as ``taskset``), the load
generator on another core when there is one. First a bare aiohttp app answering a product-sized JSON body
(uvloop, no middleware): the ceiling of one core. Then the catalog service exactly as ``ecom serve catalog``
builds it, on the seeded demo catalog (111 products), and again after bulk-loading 100,000 products (straight
into the query tables, as the actors' hooks would write them). Every line prints requests/s, p50, p99 and the
ratio to the bare handler measured in the same run; the issue-14 targets are detail >= 0.3, list and search
pages >= 0.1, search over 100,000 products >= 0.05 with p99 < 50 ms.

Reservations: ReserveStock asks to ProductActors in this process (pinned to one core), each turn committed
to the database: all on one hot product (turns of one actor run one after another) versus spread over many
products (turns run concurrently and share transactions through group commit).

Numbers are printed, never judged; the machine may be shared (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
from bench.report import figure
from config import load_settings
from runtime.actors import ActorSystem
from runtime.store import StateStore, create_engine

HOST = "127.0.0.1"
BIG_CATALOG = 100_000
COLOURS = ("Slate", "Moss", "Ember", "Glacier", "Sand", "Midnight", "Fern", "Rust", "Sky", "Charcoal")
EDITIONS = ("Classic", "Pro", "Lite", "Trail", "Summit", "Explorer", "Coastal", "Nordic", "Urban")


@dataclass(frozen=True)
class Budget:
    requests: int  # per read scenario (the aiohttp client; wrk is bounded by seconds)
    seconds: float  # per read scenario
    concurrency: int  # open connections of the load generator
    hot: int  # reservations on the hot product
    spread: int  # reservations spread over many products
    spread_products: int


FULL = Budget(requests=60000, seconds=8.0, concurrency=32, hot=2000, spread=8000, spread_products=400)
QUICK = Budget(requests=20000, seconds=3.0, concurrency=32, hot=500, spread=2000, spread_products=200)

# What each read scenario is held to (issue 14): a share of the bare handler's requests/s, and a p99 bound.
TARGETS = {"detail": (0.3, None), "list": (0.1, None), "search": (0.1, None), "search 100k": (0.05, 50.0)}


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


def serve_bare(port: int, core: int | None) -> None:
    """Child process: the ceiling, a bare aiohttp JSON handler (uvloop, no middleware) on one core."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    import orjson
    from aiohttp import web

    from runtime.cli import install_uvloop

    install_uvloop()
    body = orjson.dumps(_sample_product())

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/json", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def _sample_product() -> dict[str, Any]:
    """A product-sized JSON object, as the catalog answers one."""
    p = service.load_demo_catalog()["products"][0]
    return {
        "id": str(uuid.UUID(int=1)),
        **{k: p[k] for k in ("name", "description", "price")},
        "currency": "USD",
        **{k: str(uuid.UUID(int=2)) for k in ("brand_id", "type_id")},
        "brand": p["brand"],
        "type": p["type"],
        "picture_url": p.get("picture_url"),
        **{k: p[k] for k in ("available_stock", "restock_threshold", "max_stock")},
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_service(url: str | None, core: int | None) -> AsyncIterator[str]:
    """The catalog service on ``url`` in a child process (the bare handler when ``url`` is None)."""
    port = _free_port()
    args = ["-m", "bench.catalog", "--serve", url or "bare", "--port", str(port)]
    if core is not None:
        args += ["--core", str(core)]
    child = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=180)  # 100,000 products load first
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
# Load generators


@dataclass(frozen=True)
class Result:
    rate: float  # requests/s
    p50: float  # ms
    p99: float  # ms
    failures: int  # answers other than 2xx/3xx


WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
"""


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]  # wrk's format
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


async def measure_wrk(base: str, paths: list[str], budget: Budget, core: int | None, tmp: str) -> Result:
    """wrk on ``core`` (taskset), one thread, ``budget.concurrency`` connections, ``budget.seconds``; the paths
    are requested round-robin. A one-second warm-up run first (connections, caches)."""
    script, listing = os.path.join(tmp, "paths.lua"), os.path.join(tmp, "paths.txt")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    pin = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
    env = {**os.environ, "BENCH_PATHS": listing}
    out = ""
    for seconds in (1, budget.seconds):
        args = [*pin, "wrk", "-t1", f"-c{budget.concurrency}", f"-d{seconds:g}s", "--latency", "-s", script, base]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, env=env)
        out = (await asyncio.wait_for(proc.communicate(), timeout=seconds + 60))[0].decode()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]  # wrk's format
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]  # wrk's format
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]  # wrk's format
    failed = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = (int(failed.group(1)) if failed else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return Result(rate, p50, p99, failures)


async def measure_aiohttp(base: str, paths: list[str], budget: Budget) -> Result:
    """GETs of ``paths`` round-robin from ``budget.concurrency`` workers, bounded in requests and seconds."""
    latencies: list[float] = []
    failures = 0
    issued = 0
    connector = aiohttp.TCPConnector(limit=budget.concurrency)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def get(i: int) -> None:
            nonlocal failures
            start = time.perf_counter()
            async with session.get(paths[i % len(paths)]) as resp:
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
    return Result(len(latencies) / elapsed, p50, p99, failures)


@dataclass
class Reads:
    """How reads are measured in this run, and the bare handler's rate they are compared with."""

    budget: Budget
    cores: tuple[int | None, int | None]
    use_wrk: bool
    tmp: str
    bare: float = 0.0
    bares: list[float] = field(default_factory=list)  # every bare measurement of the run
    lines: list[tuple[str, int | str, str, Result, str]] = field(default_factory=list)  # lines with a target

    async def measure(self, base: str, paths: list[str]) -> Result:
        if self.use_wrk:
            return await measure_wrk(base, paths, self.budget, self.cores[1], self.tmp)
        return await measure_aiohttp(base, paths, self.budget)

    def line(self, label: str, products: int | str, name: str, r: Result, target: str | None) -> None:
        ratio = r.rate / self.bare if self.bare else 1.0
        verdict = ""
        if target is not None:
            share, p99_max = TARGETS[target]
            verdict = f"  (target >= {share:g}" + (f", p99 < {p99_max:g} ms" if p99_max else "") + ")"
        note = f"  {r.failures} failed!" if r.failures else ""
        if target is not None:
            self.lines.append((label, products, name, r, target))
        print(
            f"  {label:10} {products!s:>7}  {name:28} {r.rate:8.0f} req/s  p50 {r.p50:6.1f} ms  "
            f"p99 {r.p99:6.1f} ms  x{ratio:5.3f} of bare{verdict}{note}",
            flush=True,
        )

    async def bare_handler(self) -> None:
        async with running_service(None, self.cores[0]) as base:
            r = await self.measure(base, ["/json"])
        self.bare = self.bare or r.rate
        self.line("aiohttp", "-", "bare JSON handler", r, None)
        self.bares.append(r.rate)

    def summary(self) -> None:
        """The ratios again, against the best bare rate of the run: on a shared machine the bare handler's
        rate moves during the run, and the best one is the strictest reference."""
        best = max(self.bares)
        print(f"ratios to the best bare rate of the run ({best:.0f} req/s), with the issue-14 targets:")
        for label, products, name, r, target in self.lines:
            share, p99_max = TARGETS[target]
            ok = r.rate / best >= share and (p99_max is None or r.p99 < p99_max)
            figure("catalog", f"{label}, {products} products, {name}: share of bare aiohttp", r.rate / best, "x",
                   f">= {share:g}")  # fmt: skip
            if p99_max is not None:
                figure("catalog", f"{label}, {products} products, {name}: p99", r.p99, "ms", f"< {p99_max:g}")
            print(f"  {label:10} {products!s:>7}  {name:28} x{r.rate / best:5.3f}  p99 {r.p99:6.1f} ms  "
                  f"target >= {share:g}{f', p99 < {p99_max:g} ms' if p99_max else ''}: {'met' if ok else 'NOT met'}")  # fmt: skip


async def read_scenarios(engine: AsyncEngine, big: bool) -> list[tuple[str, str, list[str]]]:
    """(name, target key, paths) of each read scenario, the paths in a fixed random order."""
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one()
        ids = list((await conn.execute(select(repo.products.c.id).limit(5000))).scalars())
        brands = [b["name"] for b in await repo.list_named(conn, repo.brands)]
    rng = random.Random(7)
    rng.shuffle(ids)
    pages = max(1, min(50, total // 20))
    queries = ("waterproof", "insulated bottle", "tent", "merino socks", "headlamp", "down", "slate tent",
               "trail", "glacier jacket", "stove")  # fmt: skip
    products = "/api/catalog/products"
    search = [f"{products}?{urlencode({'q': q, 'page': p})}" for q in queries for p in (1, 2)]
    rng.shuffle(search)
    scenarios = [
        ("detail", "detail", [f"{products}/{i}" for i in ids[:2000]]),
        ("list: page 1-50, by name", "list", [f"{products}?{urlencode({'page': rng.randint(1, pages)})}" for _ in range(500)]),
        ("list: brand, by price", "list", [f"{products}?{urlencode({'brand': b, 'sort': 'price'})}" for b in brands]),
        ("search: 1-2 words, pages 1-2", "search 100k" if big else "search", search),
    ]  # fmt: skip
    return scenarios


async def bench_reads(label: str, url: str, engine: AsyncEngine, reads: Reads) -> None:
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one()
    scenarios = await read_scenarios(engine, total >= BIG_CATALOG)
    async with running_service(url, reads.cores[0]) as base:
        for name, target, paths in scenarios:
            reads.line(label, total, name, await reads.measure(base, paths), target)


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


async def bench_database(label: str, url: str, reads: Reads) -> None:
    settings = load_settings({})
    await service.seed(settings, database_url=url)
    # A small pool: PostgreSQL's connection limit is shared with the service process (and anyone else).
    engine = create_engine(url, pool_size=5)
    cores = reads.cores
    try:
        await bench_reads(label, url, engine, reads)
        # Reservations before the bulk load: its aftermath (checkpoints, autovacuum) would be measured too.
        _pin(cores[0])  # the service process is gone: the actors get its core
        await bench_reservations(label, engine, reads.budget)
        _pin(cores[1])
        seconds = await grow_catalog(engine, BIG_CATALOG)
        print(f"  {label:10} (bulk-loaded up to {BIG_CATALOG} products with their search words in {seconds:.1f}s)")
        await bench_reads(label, url, engine, reads)
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
    use_wrk = not args.aiohttp_client and shutil.which("wrk") is not None
    generator = "wrk, 1 thread" if use_wrk else "an aiohttp client"
    if not use_wrk and not args.aiohttp_client:
        print("note: wrk is not installed (apt-get install wrk): an aiohttp client generates the load")
    print(f"reads over HTTP (server on core {cores[0]}, {generator} on core {cores[1]}, "
          f"{budget.concurrency} connections, {budget.seconds:g}s per line)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        reads = Reads(budget, cores, use_wrk, tmp)
        await reads.bare_handler()
        await bench_database("sqlite", f"sqlite+aiosqlite:///{tmp}/catalog.db", reads)
        if not args.no_pg:
            made = await _pg_url(args.pg_url)
            if made is not None:
                url, drop = made
                try:
                    await bench_database("postgresql", url, reads)
                finally:
                    await drop()
        await reads.bare_handler()  # again: how much the machine's load moved during the run
        reads.summary()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.catalog", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the work, for a smoke run")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--all-cores", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--aiohttp-client", action="store_true", help="generate the load with aiohttp, not wrk")
    parser.add_argument("--serve", metavar="DATABASE_URL", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "bare":
        serve_bare(args.port, args.core)
        return 0
    if args.serve:
        serve(args.serve, args.port, args.core)
        return 0
    from runtime.cli import install_uvloop

    install_uvloop()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
