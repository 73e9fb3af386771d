"""Checkout benchmark: completed orders/s end to end (checkout to ``paid``) and the checkout -> paid latency.

    python -m bench.checkout [--quick] [--no-pg] [--no-sqlite] [--orders N] [--pg-url URL] [--concurrency N] [--log-level L] [--all-cores]
                             [--count] [--profile FILE]

The catalog, cart and order services run in this process, each on its own database, listening on 127.0.0.1
over real HTTP and joined by one memory bus, as in the embedded mode. Buyers fill their carts first (not timed);
then, per database:

- load: ``--concurrency`` buyers at a time each check out and wait for their order to be paid before the next
  buyer takes a cart (a closed loop, so the system runs at capacity without unbounded queues); orders/s is paid
  orders over the phase's time, and the latency of each order (checkout request sent -> its
  ``OrderStatusChanged(paid)`` event seen on the bus) is reported as p50/p99;
- one at a time: orders checked out one after the other (checkout, wait for ``paid``, next), so nothing queues:
  the bare checkout -> paid latency of the saga (cart turn, outbox relays, stock reservations, charge, commits).

Payments go to the SimulatedPaymentProvider with no latency, so the numbers are the system's own. Each phase is
bounded in time and prints what it got; afterwards every order is checked to be paid and every product's stock
to have gone down by exactly what was ordered. ``ECOM_*`` settings apply (e.g. ``ECOM_BUS_OUTBOX_POLL_INTERVAL``).
Pinned to one core (the database server runs where the OS puts it). Numbers only: it never fails on speed.

``--count`` adds, per paid order of the load phase, what the work was made of: SQL statements per service and per
kind, transactions (commits), turns committed, bus deliveries per queue, HTTP requests per service, outbox relay
passes. ``--profile FILE`` runs the load phase under cProfile (the event loop's thread) and writes the stats there.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import event
from sqlalchemy.engine import Engine

from actors.cart import service as cart_service
from actors.catalog import service as catalog_service
from actors.order import service as order_service
from actors.order.messages import OrderStatusChanged
from actors.order.payment import SimulatedPaymentProvider
from actors.order.repository import count_by_status
from bench.actors import _pg_url
from bench.report import machine_line
from bus import Envelope, MemoryBus
from config import Settings, load_settings
from identity.keys import KeyRing, generate_key
from identity.tokens import TokenIssuer
from runtime.auth import TokenVerifier
from runtime.cli import install_uvloop
from runtime.messages import from_body
from runtime.migrate import RUNTIME, upgrade
from runtime.store import create_engine

HOST = "127.0.0.1"
SERVICES = {"catalog": catalog_service, "cart": cart_service, "order": order_service}
ADDRESS = {
    "name": "Bench Buyer",
    "street": "1 Load Street",
    "city": "Testville",
    "postal_code": "12345",
    "country": "US",
}
PAYMENT = {"method": "card", "token": "tok_visa"}
PRODUCTS = 50
STOCK = 1_000_000
LINES_PER_CART = 2


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # ms


class Identity:
    """Signs access tokens and gives each service a verifier holding the public keys (no identity service)."""

    def __init__(self, settings: Settings) -> None:
        self.issuer, self.audience = settings.issuer, settings.general.audience
        self.ring = KeyRing(publish_ahead=0)
        self.ring.add(generate_key("ES256"))
        self.tokens = TokenIssuer(self.ring, self.issuer, self.audience)

    def headers(self, sub: str, roles: tuple[str, ...] = ("customer",)) -> dict[str, str]:
        token, _ = self.tokens.issue_access_token(sub, "storefront", ["openid", "ecom"], list(roles))
        return {"Authorization": f"Bearer {token}"}

    def verifier(self) -> TokenVerifier:
        verifier = TokenVerifier(issuer=self.issuer, audience=self.audience)
        verifier.set_jwks(self.ring.jwks())
        return verifier


@dataclass
class PaidWatch:
    """Times the ``paid`` event of each order, as the bus delivers it."""

    paid: dict[str, float] = field(default_factory=dict)
    cancelled: dict[str, str] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def handle(self, env: Envelope) -> None:
        event = from_body(OrderStatusChanged, env.body)
        if event.new_status == "paid":
            self.paid[event.order_id] = time.perf_counter()
        elif event.new_status == "cancelled":
            self.cancelled[event.order_id] = event.reason
        else:
            return
        waiter = self.waiters.pop(event.order_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, order_id: str) -> None:
        if order_id in self.paid or order_id in self.cancelled:
            return
        self.waiters[order_id] = asyncio.get_running_loop().create_future()
        await self.waiters[order_id]

    def done(self) -> int:
        return len(self.paid) + len(self.cancelled)


class Counts:
    """What the load phase's work was made of (``--count``): SQL per service and kind, commits, HTTP requests."""

    def __init__(self, databases: dict[str, str]) -> None:
        from sqlalchemy.engine import make_url

        self.services = {str(make_url(url).database): name for name, url in databases.items()}
        self.sql: Counter[str] = Counter()
        self.commits: Counter[str] = Counter()
        self.http: Counter[str] = Counter()
        self.on = False

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self._statement)
        event.listen(Engine, "commit", self._commit)

    def uninstall(self) -> None:
        event.remove(Engine, "before_cursor_execute", self._statement)
        event.remove(Engine, "commit", self._commit)

    def _service(self, conn: Any) -> str:
        return self.services.get(str(conn.engine.url.database), "other")

    @staticmethod
    def _kind(statement: str) -> str:
        words = statement.split()
        verb = words[0].upper() if words else "?"
        table = "?"
        for marker in ("FROM", "INTO", "UPDATE"):
            if marker in (w.upper() for w in words):
                i = [w.upper() for w in words].index(marker)
                if i + 1 < len(words):
                    table = words[i + 1].strip('"')
                    break
        return f"{verb} {table}"

    def _statement(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.on:
            self.sql[f"{self._service(conn)}: {self._kind(statement)}"] += 1

    def _commit(self, conn: Any) -> None:
        if self.on:
            self.commits[self._service(conn)] += 1

    def count_http(self, service: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
        async def prepared(_request: web.Request, _response: web.StreamResponse) -> None:
            if self.on:
                self.http[service] += 1

        return prepared

    def report(self, orders: int, bus_before: dict[str, dict[str, int]], bus_after: dict[str, dict[str, int]]) -> None:
        n = max(1, orders)
        print(f"    per paid order ({orders} orders):")
        for service in SERVICES:
            sql = {k.split(": ", 1)[1]: v for k, v in self.sql.items() if k.startswith(service + ": ")}
            total = sum(sql.values())
            detail = ", ".join(f"{kind} {v / n:.2f}" for kind, v in sorted(sql.items(), key=lambda kv: -kv[1]))
            print(
                f"      {service:8} commits {self.commits[service] / n:5.2f} statements {total / n:5.2f}"
                f" http requests {self.http[service] / n:4.2f} | {detail}"
            )
        for label, after in bus_after.items():
            delivered = after["delivered"] - bus_before.get(label, {}).get("delivered", 0)
            print(f"      bus {label:30} deliveries {delivered / n:5.2f}")


@dataclass
class System:
    urls: dict[str, str]
    runners: list[web.AppRunner]
    bus: MemoryBus
    http: aiohttp.ClientSession
    identity: Identity
    watch: PaidWatch

    async def close(self) -> None:
        await self.http.close()
        for runner in reversed(self.runners):
            await runner.cleanup()
        await self.bus.close()


async def start_system(settings: Settings, databases: dict[str, str], counts: Counts | None = None) -> System:
    for name, module in SERVICES.items():
        engine = create_engine(databases[name])
        try:
            await upgrade(engine, [RUNTIME, module.SCHEMA])
        finally:
            await engine.dispose()
    bus = MemoryBus(
        max_attempts=settings.bus.max_attempts, max_concurrent_sessions=settings.bus.max_concurrent_sessions
    )
    await bus.start()
    watch = PaidWatch()
    await bus.subscribe("bench", [OrderStatusChanged.__name__], watch.handle)
    identity = Identity(settings)
    urls: dict[str, str] = {}
    runners: list[web.AppRunner] = []
    for name, module in SERVICES.items():
        kwargs: dict[str, Any] = {"bus": bus, "database_url": databases[name], "verifier": identity.verifier()}
        if name == "cart":
            kwargs["catalog_url"] = urls["catalog"]
        if name == "order":
            kwargs["payment_provider"] = SimulatedPaymentProvider(limit=STOCK * 100)
            kwargs["cart_url"] = urls["cart"]
        app = module.create_app(settings, **kwargs)
        if counts is not None:
            app.on_response_prepare.append(counts.count_http(name))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, HOST, 0, backlog=1024).start()
        runners.append(runner)
        urls[name] = f"http://{HOST}:{runner.addresses[0][1]}"
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=30))
    return System(urls, runners, bus, http, identity, watch)


async def call(
    system: System, method: str, service: str, path: str, headers: dict[str, str], json: Any = None, expect: int = 200
) -> Any:
    async with system.http.request(method, system.urls[service] + path, json=json, headers=headers) as resp:
        body = await resp.json(content_type=None)
        if resp.status != expect:
            raise RuntimeError(f"{method} {path} answered {resp.status}: {body}")
        return body


async def make_products(system: System) -> list[str]:
    admin = system.identity.headers("bench-admin", roles=("admin",))
    for kind in ("brands", "types"):
        await call(system, "POST", "catalog", f"/api/catalog/{kind}", admin, {"name": "Bench"}, expect=201)
    ids = []
    for i in range(PRODUCTS):
        body = {
            "name": f"Bench item {i}",
            "price": "9.99",
            "brand": "Bench",
            "type": "Bench",
            "available_stock": STOCK,
            "max_stock": STOCK,
        }
        ids.append((await call(system, "POST", "catalog", "/api/catalog/products", admin, body, expect=201))["id"])
    return ids


async def fill_carts(
    system: System, products: list[str], buyers: int, rng: random.Random
) -> list[tuple[dict[str, str], dict[str, int]]]:
    """Carts of ``buyers`` buyers with LINES_PER_CART products each (not timed); returns (headers, ordered units)."""
    carts = []
    gate = asyncio.Semaphore(64)

    async def one() -> None:
        headers = system.identity.headers(str(uuid.uuid4()))
        lines = {p: rng.randint(1, 3) for p in rng.sample(products, LINES_PER_CART)}
        async with gate:
            for product_id, quantity in lines.items():
                await call(system, "PUT", "cart", f"/api/cart/items/{product_id}", headers, {"quantity": quantity})
        carts.append((headers, lines))

    await asyncio.gather(*(one() for _ in range(buyers)))
    return carts


async def checkout(system: System, headers: dict[str, str]) -> tuple[str, float]:
    started = time.perf_counter()
    body = await call(
        system,
        "POST",
        "cart",
        "/api/cart/checkout",
        headers,
        {"shipping_address": ADDRESS, "payment": PAYMENT},
        expect=202,
    )
    return body["order_id"], started


async def phase_load(system: System, carts: list[Any], concurrency: int, timeout: float) -> tuple[list[float], float]:
    """``concurrency`` buyers at a time, each checking out and waiting for ``paid`` before the next takes a cart
    (a closed loop: the system runs at its capacity, queues stay bounded). Returns (latencies, seconds)."""
    latencies: list[float] = []
    todo = iter(carts)
    began = time.perf_counter()

    async def worker() -> None:
        for headers, _ in todo:
            order_id, started = await checkout(system, headers)
            await system.watch.wait(order_id)
            if order_id in system.watch.paid:
                latencies.append(system.watch.paid[order_id] - started)

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    except TimeoutError:
        print(f"    load phase timed out after {timeout:g}s: {len(latencies)} of {len(carts)} orders paid")
    return latencies, time.perf_counter() - began


async def phase_one_at_a_time(system: System, carts: list[Any], timeout: float) -> list[float]:
    latencies = []
    try:
        async with asyncio.timeout(timeout):
            for headers, _ in carts:
                order_id, started = await checkout(system, headers)
                await system.watch.wait(order_id)
                if order_id in system.watch.paid:
                    latencies.append(system.watch.paid[order_id] - started)
    except TimeoutError:
        print(f"    one-at-a-time phase timed out after {timeout:g}s with {len(latencies)} orders")
    return latencies


async def verify(system: System, databases: dict[str, str], carts: list[Any], products: list[str]) -> str:
    """Every order paid, and every product's stock down by exactly the units ordered."""
    engine = create_engine(databases["order"])
    try:
        by_status = await count_by_status(engine)
    finally:
        await engine.dispose()
    ordered = dict.fromkeys(products, 0)
    for _, lines in carts:
        for product_id, units in lines.items():
            ordered[product_id] += units
    wrong = 0
    for product_id in products:
        product = await call(system, "GET", "catalog", f"/api/catalog/products/{product_id}", {})
        wrong += product["available_stock"] != STOCK - ordered[product_id]
    cancelled = list(system.watch.cancelled.values())[:3]
    return f"orders by status {by_status}; products with wrong stock: {wrong}" + (
        f"; cancelled e.g. {cancelled}" if cancelled else ""
    )


async def bench_database(label: str, databases: dict[str, str], settings: Settings, args: argparse.Namespace) -> None:
    load_orders, single_orders = (200, 20) if args.quick else (args.orders, 50)
    counts = Counts(databases) if args.count else None
    system = await start_system(settings, databases, counts)
    try:
        rng = random.Random(7)
        products = await make_products(system)
        carts = await fill_carts(system, products, load_orders + single_orders, rng)
        load_carts, single_carts = carts[:load_orders], carts[load_orders:]

        bus_before = system.bus.stats()
        if counts is not None:
            counts.install()
            counts.on = True
        profiler = cProfile.Profile() if args.profile else None
        if args.announce:
            print(f"  {label:10} load phase starts (pid {os.getpid()})", flush=True)
        cpu_before = time.process_time()
        if profiler is not None:
            profiler.enable()
        paid, seconds = await phase_load(system, load_carts, args.concurrency, args.phase_timeout)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{args.profile}.{label}")
        # CPU of this process (every thread: the event loop and the database driver's), per paid order.
        cpu_per_order = (time.process_time() - cpu_before) / max(1, len(paid)) * 1000
        if counts is not None:
            # Let the tail of the phase (events after the last paid order) settle before reading the counters.
            await system.bus.wait_idle(timeout=10)
            counts.on = False
            counts.uninstall()
        rate = len(paid) / seconds
        print(
            f"  {label:10} load, {len(load_carts)} orders, {args.concurrency} buyers at a time: {rate:7.1f} paid orders/s"
            f" | checkout->paid p50 {pct(paid, 0.5):7.1f} ms p99 {pct(paid, 0.99):7.1f} ms"
            f" | CPU {cpu_per_order:5.1f} ms/order"
        )
        if counts is not None:
            counts.report(len(paid), bus_before, system.bus.stats())
        single = await phase_one_at_a_time(system, single_carts, args.phase_timeout)
        print(
            f"  {label:10} one at a time, {len(single)} orders: checkout->paid p50 {pct(single, 0.5):6.1f} ms "
            f"p99 {pct(single, 0.99):6.1f} ms"
        )
        print(f"  {label:10} check: {await verify(system, databases, carts, products)}")
    finally:
        await system.close()


async def run(args: argparse.Namespace) -> None:
    # Numbers only by default; --log-level WARNING shows the runtime's retries and redeliveries.
    logging.basicConfig(level=args.log_level, format="%(relativeCreated)8.0f ms %(levelname)s %(name)s %(message)s")
    print("checkout -> paid end to end: catalog, cart and order over HTTP on 127.0.0.1, one memory bus, one process")
    print(f"  {machine_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        # ECOM_* variables apply (e.g. ECOM_BUS_OUTBOX_POLL_INTERVAL); the databases are the benchmark's own.
        settings = load_settings({**os.environ, "ECOM_DATA_DIR": tmp})
        sqlite = {name: f"sqlite+aiosqlite:///{tmp}/{name}.db" for name in SERVICES}
        if not args.no_sqlite:
            await bench_database("sqlite", sqlite, settings, args)
        if not args.no_pg:
            await bench_postgres(settings, args)


async def bench_postgres(settings: Settings, args: argparse.Namespace) -> None:
    made: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    try:
        for _ in SERVICES:
            one = await _pg_url(args.pg_url)
            if one is None:
                return
            made.append(one)
        await bench_database(
            "postgresql", {name: url for name, (url, _) in zip(SERVICES, made, strict=False)}, settings, args
        )
    finally:
        for _, drop in made:
            await drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.checkout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer orders, for a smoke run")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--orders", type=int, default=1000, help="orders in the load phase (without --quick)")
    parser.add_argument("--concurrency", type=int, default=32, help="buyers checking out at once in the load phase")
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="seconds a phase may take at most")
    parser.add_argument("--log-level", default="ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    parser.add_argument("--count", action="store_true", help="count SQL, commits, HTTP and bus work per paid order")
    parser.add_argument("--announce", action="store_true", help="say when the load phase starts (to attach py-spy)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the load phase into FILE.<database>")
    args = parser.parse_args(argv)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    install_uvloop()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
