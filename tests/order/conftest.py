"""The order service alone over real HTTP, on SQLite and on the real PostgreSQL (the ``db_url`` fixture).

* the order app is built exactly as in production (``create_app`` with a memory bus, a real token verifier and
  the simulated payment provider), and consumes the ``"order"`` queue;
* :class:`ScriptedCatalog` plays the catalog's side of the stock contract: a real consumer of the ``"catalog"``
  queue with per-product stock that answers like the ProductActor does (idempotently per order, replies on the
  order queue with session = order id). Unlike the real catalog it can hold, drop and reorder its answers, which
  the saga tests need; the end-to-end tests (tests/e2e) run the real catalog and cart;
* checkouts are real ``CheckoutRequested`` envelopes put on the order queue, as the cart sends them;
* every event the order service publishes is collected (``OrderService.events``).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from actors.order import api, service
from actors.order.actor import OrderActor, SagaTimings
from actors.order.payment import PaymentProcessor, RetryPolicy, SimulatedPaymentProvider
from bus import Envelope, MemoryBus
from config import Settings, load_settings
from contracts.checkout import (
    Address,
    CheckoutLine,
    CheckoutRequested,
    OrderStarted,
    OrderStatusChanged,
    PaymentDetails,
)
from contracts.queues import CATALOG_QUEUE, ORDER_QUEUE
from contracts.stock import (
    CommitReservation,
    RejectReason,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)
from runtime.host import AppKeyRuntime
from runtime.messages import envelope, from_body
from runtime.migrate import RUNTIME, Component, upgrade
from runtime.store import create_engine, outbox
from tests.support.auth import TestIdentity

ADDRESS = Address("Ada Lovelace", "1 Analytical Way", "London", "NW1 2AB", "GB")
FINAL = ("paid", "cancelled", "shipped")
# Short enough for tests, long enough that a slow CI database does not trip them by accident.
TIMINGS = SagaTimings(validation_timeout=20.0, payment_timeout=10.0, retry_interval=10.0)
POLICY = RetryPolicy(call_timeout=1.0, first_delay=0.01, max_delay=0.1)


async def migrate(url: str, schema: Component) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine, [RUNTIME, schema])
    finally:
        await engine.dispose()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` (plain or async) until it returns something truthy, which is returned; fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def service_env(tmp_path: Any, **extra: str) -> dict[str, str]:
    """The environment the test services are configured from (``extra``: more ECOM_* variables)."""
    return {
        "ECOM_DATA_DIR": str(tmp_path),
        "ECOM_ACTORS_MAILBOX_SIZE": "2000",
        "ECOM_ACTORS_REMINDER_POLL_INTERVAL": "0.05",
        "ECOM_BUS_OUTBOX_POLL_INTERVAL": "0.05",
        **extra,
    }


@pytest.fixture
def settings(tmp_path) -> Settings:
    return load_settings(service_env(tmp_path))


async def outbox_of(engine: Any, order_id: str) -> list[Envelope]:
    """Every outbox row (sent or not) that belongs to the order: its events, commands and payment messages."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.envelope).order_by(outbox.c.id))).all()
    envelopes = [Envelope.decode(row.envelope) for row in rows]
    return [e for e in envelopes if order_id in (e.session_id, e.correlation_id)]


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    yield bus
    await bus.close()  # after the apps: their fixtures were set up later, so they are torn down first


# ---------------------------------------------------------------------------------------------------
# The catalog's side of the stock contract


@dataclass
class ScriptedCatalog:
    bus: MemoryBus
    stock: dict[str, int] = field(default_factory=dict)
    prices: dict[str, Decimal] = field(default_factory=dict)
    reservations: dict[tuple[str, str], int] = field(default_factory=dict)  # (order, product) -> units
    committed: dict[tuple[str, str], int] = field(default_factory=dict)
    released: set[tuple[str, str]] = field(default_factory=set)
    received: list[Any] = field(default_factory=list)  # every command, in arrival order
    replies: list[Envelope] = field(default_factory=list)  # every answer sent
    hold: bool = False  # keep answers in ``held`` instead of sending them
    held: list[Envelope] = field(default_factory=list)
    drop: int = 0  # answers to lose (as a crashed process would), before answering again

    def add(self, stock: int = 10, price: str = "10.00") -> str:
        product_id = str(uuid.uuid4())
        self.stock[product_id], self.prices[product_id] = stock, Decimal(price)
        return product_id

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    async def handle(self, env: Envelope) -> None:
        kind = {c.__name__: c for c in (ReserveStock, ReleaseStock, CommitReservation)}[env.type]
        message = from_body(kind, env.body)
        self.received.append(message)
        key = (message.order_id, message.product_id)
        if isinstance(message, ReserveStock):
            await self._answer(self._reserve(message, key))
        elif isinstance(message, ReleaseStock):
            units = self.reservations.pop(key, None)
            if units is not None:
                self.stock[message.product_id] += units
                self.released.add(key)
        elif key in self.reservations:
            self.committed[key] = self.reservations.pop(key)

    def _reserve(self, msg: ReserveStock, key: tuple[str, str]) -> StockReserved | StockRejected:
        price = self.prices.get(msg.product_id)
        earlier = self.reservations.get(key, self.committed.get(key))
        if earlier is not None:
            return StockReserved(msg.order_id, msg.product_id, earlier, price or Decimal(0))
        if price is None:
            return StockRejected(msg.order_id, msg.product_id, msg.quantity, 0, RejectReason.UNKNOWN_PRODUCT)
        if key in self.released:
            return StockRejected(
                msg.order_id, msg.product_id, msg.quantity, self.stock[msg.product_id], RejectReason.ALREADY_RELEASED
            )
        available = self.stock[msg.product_id]
        if msg.quantity > available:
            return StockRejected(msg.order_id, msg.product_id, msg.quantity, available, RejectReason.INSUFFICIENT_STOCK)
        self.stock[msg.product_id] -= msg.quantity
        self.reservations[key] = msg.quantity
        return StockReserved(msg.order_id, msg.product_id, msg.quantity, price)

    async def _answer(self, reply: StockReserved | StockRejected) -> None:
        env = envelope(reply, session_id=reply.order_id, correlation_id=reply.order_id)
        if self.drop:
            self.drop -= 1
        elif self.hold:
            self.held.append(env)
        else:
            await self.send(env)

    async def send(self, env: Envelope) -> None:
        self.replies.append(env)
        await self.bus.send(ORDER_QUEUE, env)

    async def let_go(self, *, reverse: bool = False) -> None:
        """Send the held answers (in reverse order when asked) and stop holding."""
        held, self.held, self.hold = self.held, [], False
        for env in reversed(held) if reverse else held:
            await self.send(env)


@pytest.fixture
async def catalog(bus) -> ScriptedCatalog:
    desk = ScriptedCatalog(bus)
    await bus.consume(CATALOG_QUEUE, desk.handle)
    return desk


# ---------------------------------------------------------------------------------------------------
# The order service


@dataclass
class OrderService:
    client: TestClient
    bus: MemoryBus
    identity: TestIdentity
    provider: SimulatedPaymentProvider
    events: list[Envelope]

    @property
    def runtime(self) -> Any:
        return self.client.app[AppKeyRuntime]

    @property
    def engine(self) -> Any:
        return self.runtime.engine

    def buyer(self, sub: str) -> dict[str, str]:
        return self.identity.headers(self.identity.token(sub))

    def admin(self) -> dict[str, str]:
        return self.identity.headers(self.identity.admin_token())

    async def checkout(
        self, *lines: tuple[str, str, int], token: str = "tok_visa", buyer: str = "buyer-1", total: str | None = None
    ) -> CheckoutRequested:
        """Put a CheckoutRequested on the order queue, as the cart does; ``lines`` are (product id, price, quantity)."""
        request = checkout_request(*lines, token=token, buyer=buyer, total=total)
        await self.bus.send(ORDER_QUEUE, envelope(request, session_id=request.order_id))
        return request

    async def ask(self, order_id: str, message: Any) -> Any:
        """Deliver a message straight to the order's actor (as the payment processor does), with a fresh id."""
        ctx = self.client.app[api.ORDERS]
        return await ctx.system.ref(ctx.actor_class, order_id).ask(message, message_id=str(uuid.uuid4()))

    @property
    def payments(self) -> PaymentProcessor:
        return self.client.app[service.PAYMENTS]

    async def state(self, order_id: str) -> dict[str, Any] | None:
        info = await self.runtime.system.inspect(OrderActor.type_name, order_id)
        return info["state"] if info else None

    async def wait_status(self, order_id: str, *statuses: str, timeout: float = 10.0) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            state = await self.state(order_id)
            return state if state and state["status"] in statuses else None

        return await eventually(reached, timeout, f"order {order_id} to be {' or '.join(statuses)}")

    async def settle(self) -> None:
        """Until every message committed so far was relayed and handled (and what that produced, too)."""
        relay = self.runtime.relay
        async with asyncio.timeout(10):
            while True:
                await self.bus.wait_idle()
                if not await relay.pending():
                    return
                relay.notify()
                await asyncio.sleep(0.01)

    def events_of(self, kind: type) -> list[Any]:
        return [from_body(kind, e.body) for e in self.events if e.type == kind.__name__]

    def statuses(self, order_id: str) -> list[str]:
        return [e.new_status for e in self.events_of(OrderStatusChanged) if e.order_id == order_id]


def checkout_request(
    *lines: tuple[str, str, int], token: str = "tok_visa", buyer: str = "buyer-1", total: str | None = None
) -> CheckoutRequested:
    checkout_lines = tuple(
        CheckoutLine(product_id, f"Product {product_id[:8]}", Decimal(price), quantity, "")
        for product_id, price, quantity in lines
    )
    amount = (
        Decimal(total)
        if total is not None
        else sum((line.unit_price * line.quantity for line in checkout_lines), Decimal("0.00"))
    )
    return CheckoutRequested(
        order_id=str(uuid.uuid4()),
        buyer_id=buyer,
        cart_id=buyer,
        lines=checkout_lines,
        shipping_address=ADDRESS,
        payment=PaymentDetails("card", token),
        total=amount,
        currency="USD",
        requested_at=datetime.now(UTC),
    )


MakeOrders = Callable[..., Awaitable[OrderService]]


@pytest.fixture
async def make_orders(bus, settings, db_url, test_identity) -> AsyncIterator[MakeOrders]:
    """``make_orders(**create_app_kwargs)``: an order service on the test database, on a real port. Call it again
    (after stopping the first one) to restart the service on the same database, bus and payment provider."""
    await migrate(db_url, service.SCHEMA)
    events: list[Envelope] = []

    async def collect(env: Envelope) -> None:
        events.append(env)

    await bus.subscribe("watch", [OrderStarted.__name__, OrderStatusChanged.__name__], collect)
    provider = SimulatedPaymentProvider()
    clients: list[TestClient] = []

    async def make(*, settings: Settings = settings, **kwargs: Any) -> OrderService:
        """``timings=None`` takes the saga timings from ``settings`` as production does."""
        kwargs.setdefault("timings", TIMINGS)
        kwargs.setdefault("payment_policy", POLICY)
        kwargs.setdefault("payment_provider", provider)
        app = service.create_app(settings, bus=bus, database_url=db_url, verifier=test_identity.verifier(), **kwargs)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return OrderService(client, bus, test_identity, kwargs["payment_provider"], events)

    yield make
    for client in clients:
        await stop_bounded("order", client)  # closing twice is a no-op


async def stop_bounded(name: str, client: TestClient, timeout: float = 30.0) -> None:
    """Close a service's server and runtime; a shutdown that hangs fails the test instead of hanging it."""
    try:
        async with asyncio.timeout(timeout):
            await client.close()
    except TimeoutError:
        raise AssertionError(f"the {name} service did not stop within {timeout:g}s") from None


@pytest.fixture
async def orders(make_orders) -> OrderService:
    return await make_orders()
