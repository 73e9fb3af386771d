"""The catalog, cart and order services together, each on its own database, over real HTTP on real ports.

* one :class:`MemoryBus` joins them, as in the embedded mode (``ecom run``);
* each service listens on 127.0.0.1 on its own port (aiohttp ``TestServer``); the cart calls the catalog's port;
* databases follow ``db_url``: three SQLite files, or three new PostgreSQL databases on the real server;
* :meth:`Shop.stop` / :meth:`Shop.start` stop every service and start new ones on the same databases, bus and
  payment provider (the bus keeps unsettled messages, like a durable broker; the provider is outside us).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from actors.cart import service as cart_service
from actors.catalog import service as catalog_service
from actors.order import service as order_service
from actors.order.actor import SagaTimings
from actors.order.payment import RetryPolicy, SimulatedPaymentProvider
from bus import MemoryBus
from config import Settings, load_settings
from tests.conftest import PG_HOST, PG_PORT, PG_USER, _pg_admin
from tests.order.conftest import eventually, migrate, stop_bounded
from tests.support.auth import TestIdentity

SERVICES = {"catalog": catalog_service, "cart": cart_service, "order": order_service}
BRAND, TYPE = "E2E Brand", "E2E Type"
ADDRESS = {
    "name": "Ada Lovelace",
    "street": "1 Analytical Way",
    "city": "London",
    "postal_code": "NW1 2AB",
    "country": "GB",
}
FINAL = ("paid", "cancelled")
TIMINGS = SagaTimings(validation_timeout=20.0, payment_timeout=10.0, retry_interval=0.5)
POLICY = RetryPolicy(call_timeout=1.0, first_delay=0.01, max_delay=0.1)


@pytest.fixture
async def databases(db_url, tmp_path) -> AsyncIterator[dict[str, str]]:
    """A database URL per service: the order service gets ``db_url``, the others siblings of the same kind."""
    if db_url.startswith("sqlite"):
        yield {
            "order": db_url,
            **{name: f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}" for name in ("catalog", "cart")},
        }
        return
    names = {name: f"ecom_t_{name}_{uuid.uuid4().hex[:10]}" for name in ("catalog", "cart")}
    for name in names.values():
        await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield {
            "order": db_url,
            **{svc: f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}" for svc, name in names.items()},
        }
    finally:
        for name in names.values():
            await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Shop:
    settings: Settings
    databases: dict[str, str]
    bus: MemoryBus
    identity: TestIdentity
    provider: SimulatedPaymentProvider
    timings: SagaTimings = TIMINGS
    policy: RetryPolicy = POLICY
    clients: dict[str, TestClient] = field(default_factory=dict)
    cart_url: str = ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start catalog, then cart (which calls the catalog's port), then order, each on a fresh port."""
        verifier = self.identity.verifier
        catalog = catalog_service.create_app(
            self.settings, bus=self.bus, database_url=self.databases["catalog"], verifier=verifier()
        )
        await self._serve("catalog", catalog)
        catalog_url = str(self.clients["catalog"].make_url("")).rstrip("/")
        cart = cart_service.create_app(
            self.settings,
            bus=self.bus,
            database_url=self.databases["cart"],
            verifier=verifier(),
            catalog_url=catalog_url,
        )
        await self._serve("cart", cart)
        self.cart_url = str(self.clients["cart"].make_url("")).rstrip("/")
        order = order_service.create_app(
            self.settings,
            bus=self.bus,
            database_url=self.databases["order"],
            verifier=verifier(),
            payment_provider=self.provider,
            timings=self.timings,
            payment_policy=self.policy,
            cart_url=self.cart_url,
        )
        await self._serve("order", order)

    async def _serve(self, name: str, app: Any) -> None:
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        self.clients[name] = client

    async def stop(self) -> None:
        """Stop every service, as a crash of the whole system would (the bus and databases stay)."""
        for name in ("order", "cart", "catalog"):
            client = self.clients.pop(name, None)
            if client is not None:
                await stop_bounded(name, client)

    # -- the catalog ---------------------------------------------------------------------------

    def admin(self) -> dict[str, str]:
        return self.identity.headers(self.identity.admin_token())

    async def add_product(self, name: str, price: str = "10.00", stock: int = 10) -> str:
        body = {"name": name, "price": price, "brand": BRAND, "type": TYPE, "available_stock": stock, "max_stock": 1000}
        resp = await self.clients["catalog"].post("/api/catalog/products", json=body, headers=self.admin())
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]

    async def available(self, product_id: str) -> int:
        resp = await self.clients["catalog"].get(f"/api/catalog/products/{product_id}")
        assert resp.status == 200, await resp.text()
        return (await resp.json())["available_stock"]

    async def reserved(self, product_id: str) -> int:
        """Units the product still holds for open orders (from the ProductActor's state)."""
        resp = await self.clients["catalog"].get(
            f"/api/catalog/admin/actors/product/{product_id}", headers=self.admin()
        )
        assert resp.status == 200, await resp.text()
        return sum(r["quantity"] for r in (await resp.json())["state"]["reservations"].values())

    # -- orders --------------------------------------------------------------------------------

    def buyer(self, sub: str | None = None) -> Buyer:
        sub = sub or str(uuid.uuid4())
        return Buyer(self, sub, self.identity.headers(self.identity.token(sub)))

    async def orders_settled(self) -> None:
        """Until no order is waiting for anything (every one paid, shipped or cancelled)."""

        async def settled() -> bool:
            resp = await self.clients["order"].get("/api/orders?page_size=100", headers=self.admin())
            return all(o["status"] in (*FINAL, "shipped") for o in (await resp.json())["items"])

        await eventually(settled, 20, "every order to settle")


@dataclass
class Buyer:
    shop: Shop
    sub: str
    headers: dict[str, str]

    async def put(self, product_id: str, quantity: int) -> None:
        resp = await self.shop.clients["cart"].put(
            f"/api/cart/items/{product_id}", json={"quantity": quantity}, headers=self.headers
        )
        assert resp.status == 200, await resp.text()

    async def cart(self) -> dict[str, Any]:
        resp = await self.shop.clients["cart"].get("/api/cart", headers=self.headers)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def checkout(self, token: str = "tok_visa") -> str:
        body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": token}}
        resp = await self.shop.clients["cart"].post("/api/cart/checkout", json=body, headers=self.headers)
        assert resp.status == 202, await resp.text()
        return (await resp.json())["order_id"]

    async def order(self, order_id: str) -> tuple[int, dict[str, Any]]:
        resp = await self.shop.clients["order"].get(f"/api/orders/{order_id}", headers=self.headers)
        return resp.status, await resp.json()

    async def wait(self, order_id: str, *statuses: str, timeout: float = 15.0) -> dict[str, Any]:
        """Poll GET /api/orders/{id} until the order is in one of ``statuses`` (404 while it is on its way)."""

        async def reached() -> dict[str, Any] | None:
            status, body = await self.order(order_id)
            return body if status == 200 and body["status"] in statuses else None

        return await eventually(reached, timeout, f"order {order_id} to be {' or '.join(statuses)}")

    async def post(self, order_id: str, action: str, headers: dict[str, str] | None = None) -> Any:
        return await self.shop.clients["order"].post(
            f"/api/orders/{order_id}/{action}", headers=headers or self.headers
        )


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
async def make_shop(settings, databases, test_identity) -> AsyncIterator[Any]:
    """``make_shop(provider=..., timings=..., policy=...)``: the three services started, brand and type made."""
    for name, module in SERVICES.items():
        await migrate(databases[name], module.SCHEMA)
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    shops: list[Shop] = []

    async def make(
        *,
        provider: SimulatedPaymentProvider | None = None,
        timings: SagaTimings = TIMINGS,
        policy: RetryPolicy = POLICY,
    ) -> Shop:
        shop = Shop(settings, databases, bus, test_identity, provider or SimulatedPaymentProvider(), timings, policy)
        shops.append(shop)
        await shop.start()
        for kind, name in (("brands", BRAND), ("types", TYPE)):
            resp = await shop.clients["catalog"].post(f"/api/catalog/{kind}", json={"name": name}, headers=shop.admin())
            assert resp.status == 201, await resp.text()
        return shop

    yield make
    for shop in shops:
        await shop.stop()
    await bus.close()
    await asyncio.sleep(0)  # let closed connections finish before the databases are dropped
