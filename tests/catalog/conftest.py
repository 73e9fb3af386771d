"""A running catalog service over real HTTP, on SQLite and on PostgreSQL (the ``db_url`` fixture).

``catalog()`` builds the app exactly as production does (``create_app`` with a memory bus and a real token
verifier), migrates the database, optionally seeds the demo catalog, and listens on the bus like the other
services would: replies sent to the order queue and published events are collected for assertions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from actors.catalog import service
from actors.catalog.actor import ProductActor
from bus import Envelope, MemoryBus
from config import load_settings
from contracts.catalog import (
    ProductDeleted,
    ProductLowStock,
    ProductPriceChanged,
)
from contracts.queues import ORDER_QUEUE
from runtime.actors import ActorSystem
from runtime.host import AppKeyRuntime
from runtime.migrate import RUNTIME, upgrade
from runtime.store import create_engine
from tests.support.auth import TestIdentity

EVENT_TYPES = (ProductPriceChanged.__name__, ProductLowStock.__name__, ProductDeleted.__name__)


@dataclass
class Catalog:
    client: TestClient
    bus: MemoryBus
    identity: TestIdentity
    replies: list[Envelope] = field(default_factory=list)  # what the catalog sent to the order queue
    events: list[Envelope] = field(default_factory=list)  # what it published

    @property
    def system(self) -> ActorSystem:
        return self.client.app[AppKeyRuntime].system

    @property
    def engine(self) -> Any:
        return self.client.app[AppKeyRuntime].engine

    def admin(self) -> dict[str, str]:
        return self.identity.headers(self.identity.admin_token())

    def customer(self) -> dict[str, str]:
        return self.identity.headers(self.identity.token("customer-1"))

    async def ask(self, product_id: str, message: Any) -> Any:
        return await self.system.ref(ProductActor, product_id).ask(message)

    async def state(self, product_id: str) -> dict[str, Any]:
        info = await self.system.inspect(ProductActor.type_name, product_id)
        assert info is not None, f"no product actor {product_id}"
        return info["state"]

    async def settle(self) -> None:
        """Wait until the bus is idle and the outbox empty: every message sent so far was handled, and every
        answer or event that handling produced was relayed and consumed too."""
        relay = self.client.app[AppKeyRuntime].relay
        async with asyncio.timeout(10):
            while True:
                # A bus handler returns only after its turn committed, so once the bus is idle every
                # message it produced is in the outbox.
                await self.bus.wait_idle()
                if not await relay.pending():
                    return
                relay.notify()
                await asyncio.sleep(0.01)

    def events_of(self, type_name: str) -> list[dict[str, Any]]:
        return [dict(e.body) for e in self.events if e.type == type_name]

    async def create(self, **fields: Any) -> dict[str, Any]:
        """Create a product as the admin through the API; the defaults name an existing brand and type."""
        body = {"name": "Test Lantern", "price": "10.00", "brand": "Northwind Outfitters", "type": "Lighting", **fields}
        resp = await self.client.post("/api/catalog/products", json=body, headers=self.admin())
        assert resp.status == 201, await resp.text()
        return await resp.json()


MakeCatalog = Callable[..., Awaitable[Catalog]]


@pytest.fixture
async def catalog(aiohttp_client, db_url: str, tmp_path, test_identity: TestIdentity) -> AsyncIterator[MakeCatalog]:
    made: list[Catalog] = []

    async def make(*, seed: bool = True, **env: str) -> Catalog:
        settings = load_settings(
            {
                "ECOM_DATA_DIR": str(tmp_path),
                "ECOM_ACTORS_MAILBOX_SIZE": "2000",
                "ECOM_ACTORS_ASK_TIMEOUT": "120",  # a thousand turns queued on one product, on a busy machine
                "ECOM_BUS_OUTBOX_POLL_INTERVAL": "0.05",
                **env,
            }
        )
        engine = create_engine(db_url)
        try:
            await upgrade(engine, [RUNTIME, service.SCHEMA])
        finally:
            await engine.dispose()
        if seed:
            await service.seed(settings, database_url=db_url)
        else:  # the brands and types of the demo data, without its products
            await _seed_names_only(db_url)
        bus = MemoryBus(max_attempts=3)
        await bus.start()
        app = service.create_app(settings, bus=bus, database_url=db_url, verifier=test_identity.verifier())
        client = await aiohttp_client(app)
        cat = Catalog(client, bus, test_identity)
        made.append(cat)

        async def on_reply(env: Envelope) -> None:
            cat.replies.append(env)

        async def on_event(env: Envelope) -> None:
            cat.events.append(env)

        await bus.consume(ORDER_QUEUE, on_reply)
        await bus.subscribe("test-listener", EVENT_TYPES, on_event)
        return cat

    yield make
    for cat in made:
        await cat.client.close()  # the service stops (relay, consumer, actors) before the bus it uses
        await cat.bus.close()


async def _seed_names_only(db_url: str) -> None:
    from actors.catalog import repository as repo

    data = service.load_demo_catalog()
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await repo.ensure_named(conn, repo.brands, data["brands"])
            await repo.ensure_named(conn, repo.product_types, data["types"])
    finally:
        await engine.dispose()
