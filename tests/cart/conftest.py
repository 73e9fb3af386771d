"""The cart service over real HTTP with a real catalog service next to it, on one memory bus.

* the cart runs on the ``db_url`` database (SQLite and the real PostgreSQL);
* the catalog is the real ``actors.catalog.service`` app on its own SQLite database, listening on a real port
  (``aiohttp_server``) that the cart calls like in production; products are made through its admin API, and
  its price changes reach the cart through its outbox and the bus;
* what the cart sends to the order queue is collected (``Shop.orders``); ``Shop.publish`` plays the order
  service's events; :class:`OrderLoad` is a small real HTTP server answering the order service's
  ``/api/order/internal/load`` contract, which checkout admission reads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from actors.cart import service as cart_service
from actors.catalog import service as catalog_service
from bus import Envelope, MemoryBus
from config import Settings, load_settings
from contracts.checkout import CheckoutRequested
from contracts.queues import ORDER_QUEUE
from runtime.host import AppKeyRuntime
from runtime.messages import envelope, from_body
from runtime.migrate import RUNTIME, Component, upgrade
from runtime.store import create_engine, outbox
from tests.support.auth import TestIdentity

BRAND, TYPE = "Cart Test Brand", "Cart Test Type"
ADDRESS = {
    "name": "Ada Lovelace",
    "street": "1 Analytical Way",
    "city": "London",
    "postal_code": "NW1 2AB",
    "country": "GB",
}
PAYMENT = {"method": "card", "token": "tok_visa"}


async def migrate(url: str, schema: Component) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine, [RUNTIME, schema])
    finally:
        await engine.dispose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return load_settings(
        {
            "ECOM_DATA_DIR": str(tmp_path),
            "ECOM_ACTORS_MAILBOX_SIZE": "2000",
            "ECOM_ACTORS_REMINDER_POLL_INTERVAL": "0.05",
            "ECOM_BUS_OUTBOX_POLL_INTERVAL": "0.05",
        }
    )


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    yield bus
    await bus.close()  # after the apps: their fixtures were set up later, so they are torn down first


# ---------------------------------------------------------------------------------------------------
# The catalog


@dataclass
class Catalog:
    server: TestServer
    client: TestClient
    identity: TestIdentity

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def admin(self) -> dict[str, str]:
        return self.identity.headers(self.identity.admin_token())

    async def add(self, name: str = "Lantern", price: str = "10.00", stock: int = 50, **extra: Any) -> str:
        body = {"name": name, "price": price, "brand": BRAND, "type": TYPE, "available_stock": stock, **extra}
        resp = await self.client.post("/api/catalog/products", json=body, headers=self.admin())
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]

    async def add_many(self, count: int, price: str = "2.50") -> list[str]:
        return list(await asyncio.gather(*(self.add(f"Item {i:03d}", price) for i in range(count))))

    async def change(self, product_id: str, **fields: Any) -> None:
        resp = await self.client.patch(f"/api/catalog/products/{product_id}", json=fields, headers=self.admin())
        assert resp.status == 200, await resp.text()

    async def delete(self, product_id: str) -> None:
        resp = await self.client.delete(f"/api/catalog/products/{product_id}", headers=self.admin())
        assert resp.status == 204, await resp.text()

    async def settle(self) -> None:
        """Until every event the catalog committed has left its outbox."""
        relay = self.client.app[AppKeyRuntime].relay
        await eventually(lambda: _relayed(relay), what="catalog outbox empty")


async def _relayed(relay: Any) -> bool:
    relay.notify()
    return await relay.pending() == 0


@pytest.fixture
async def catalog(bus, settings, tmp_path, aiohttp_server, aiohttp_client, test_identity) -> Catalog:
    url = f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    await migrate(url, catalog_service.SCHEMA)
    app = catalog_service.create_app(settings, bus=bus, database_url=url, verifier=test_identity.verifier())
    server = await aiohttp_server(app)
    cat = Catalog(server, await aiohttp_client(server), test_identity)
    for kind, name in (("brands", BRAND), ("types", TYPE)):
        resp = await cat.client.post(f"/api/catalog/{kind}", json={"name": name}, headers=cat.admin())
        assert resp.status == 201, await resp.text()
    return cat


@pytest.fixture
async def catalog_replica(catalog, settings, tmp_path, aiohttp_server, test_identity) -> TestServer:
    """A second instance of the real catalog service on the same database, as ``ecom run --processes`` starts
    one: it answers every lookup the first one does. (No bus: the first instance relays the shared outbox.)"""
    url = f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    app = catalog_service.create_app(settings, database_url=url, verifier=test_identity.verifier())
    return await aiohttp_server(app)


# ---------------------------------------------------------------------------------------------------
# The order service's load endpoint (the counterpart of checkout admission)


@dataclass
class OrderLoad:
    """Answers ``GET /api/order/internal/load`` like an order instance: ``{"open_orders", "outbox_backlog"}``."""

    open_orders: int = 0
    outbox_backlog: int = 0
    calls: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/order/internal/load", self._load)
        return app

    async def _load(self, _request: web.Request) -> web.Response:
        self.calls += 1
        return web.json_response({"open_orders": self.open_orders, "outbox_backlog": self.outbox_backlog})


MakeOrderLoad = Callable[[], Awaitable[OrderLoad]]


@pytest.fixture
def make_order_load(aiohttp_server) -> MakeOrderLoad:
    async def make() -> OrderLoad:
        load = OrderLoad()
        load.server = await aiohttp_server(load.app())
        return load

    return make


@pytest.fixture
async def order_load(make_order_load) -> OrderLoad:
    return await make_order_load()


# ---------------------------------------------------------------------------------------------------
# The cart


@dataclass
class Shopper:
    client: TestClient
    sub: str
    headers: dict[str, str]

    async def get(self) -> dict[str, Any]:
        resp = await self.client.get("/api/cart", headers=self.headers)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def put(self, product_id: str, quantity: Any, *, status: int = 200) -> dict[str, Any]:
        resp = await self.client.put(f"/api/cart/items/{product_id}", json={"quantity": quantity}, headers=self.headers)
        assert resp.status == status, await resp.text()
        return await resp.json()

    async def checkout(self, key: str | None = None, *, address: Any = ADDRESS, payment: Any = PAYMENT) -> Any:
        headers = {**self.headers, **({"Idempotency-Key": key} if key else {})}
        return await self.client.post(
            "/api/cart/checkout", json={"shipping_address": address, "payment": payment}, headers=headers
        )


@dataclass
class Shop:
    client: TestClient
    bus: MemoryBus
    identity: TestIdentity
    orders: list[Envelope] = field(default_factory=list)  # what the cart sent to the order queue

    def shopper(self, sub: str | None = None) -> Shopper:
        sub = sub or str(uuid.uuid4())
        return Shopper(self.client, sub, self.identity.headers(self.identity.token(sub)))

    @property
    def engine(self) -> Any:
        return self.client.app[AppKeyRuntime].engine

    async def publish(self, message: Any, session_id: str) -> Envelope:
        env = envelope(message, session_id=session_id)
        await self.bus.publish(env)
        return env

    async def settle(self) -> None:
        """Until the cart's outbox is relayed and the bus has delivered everything."""
        relay = self.client.app[AppKeyRuntime].relay
        if relay is not None:
            await eventually(lambda: _relayed(relay), what="cart outbox empty")
        await self.bus.wait_idle()

    async def outbox_rows(self, destination: str = ORDER_QUEUE) -> int:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).where(outbox.c.destination == destination))).scalar_one()

    def checkout_requests(self) -> list[CheckoutRequested]:
        return [from_body(CheckoutRequested, env.body) for env in self.orders if env.type == CheckoutRequested.__name__]


MakeShop = Callable[..., Awaitable[Shop]]


@pytest.fixture
async def make_shop(bus, settings, db_url, aiohttp_client, test_identity, order_load) -> MakeShop:
    """``make_shop(catalog_url, *, with_bus=True, settings=None, **create_app_kwargs)``: a cart service on the test
    database; its checkout admission reads ``order_load`` unless ``order_url`` is given."""
    await migrate(db_url, cart_service.SCHEMA)
    orders: list[Envelope] = []

    async def collect(env: Envelope) -> None:
        orders.append(env)

    await bus.consume(ORDER_QUEUE, collect)

    async def make(catalog_url: str, *, with_bus: bool = True, settings: Settings = settings, **kwargs: Any) -> Shop:
        if "order_url" not in kwargs:
            kwargs["order_url"] = order_load.url
        app = cart_service.create_app(
            settings,
            bus=bus if with_bus else None,
            database_url=db_url,
            verifier=test_identity.verifier(),
            catalog_url=catalog_url,
            **kwargs,
        )
        return Shop(await aiohttp_client(app), bus, test_identity, orders)

    return make


@pytest.fixture
async def shop(make_shop, catalog) -> Shop:
    return await make_shop(catalog.url)
