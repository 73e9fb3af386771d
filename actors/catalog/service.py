"""The catalog service, declared (:data:`SERVICE`), and its first-run seed (the demo catalog)."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import func, select

from actors.catalog import api, public
from actors.catalog import repository as repo
from actors.catalog.actor import ProductActor
from actors.catalog.messages import CreateProduct
from config import Settings
from contracts.catalog import ProductDeleted, ProductLowStock, ProductPriceChanged
from contracts.queues import CATALOG_QUEUE, ORDER_QUEUE
from contracts.stock import CommitReservation, ReleaseStock, ReserveStock, StockRejected, StockReserved
from runtime import host
from runtime.actors import ActorSystem
from runtime.description import ActorType, Http, Queue, ServiceDescription, ToActor
from runtime.errors import Conflict
from runtime.migrate import RUNTIME, Component, Migration, create_tables, upgrade
from runtime.store import StateStore, create_engine, utcnow

log = logging.getLogger(__name__)

NAME = "catalog"
DEMO_DATA = Path(__file__).with_name("data") / "catalog.json"
SEED_MARKER = "demo_catalog_seeded_at"

SCHEMA = Component(
    NAME,
    [
        Migration(
            1, "brands, product types, products (sort indexes), search terms, counts", create_tables(*repo.TABLES)
        ),
        Migration(2, "change log of the in-memory read model", repo.create_change_log),
    ],
)


def create_app(settings: Settings, **overrides: Any) -> web.Application:
    """The catalog application (``overrides``: ``bus``, ``database_url``, ``verifier``)."""
    return host.service_app(SERVICE, settings, **overrides)


# ---------------------------------------------------------------------------------------------------
# Demo data


def load_demo_catalog(path: Path = DEMO_DATA) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def demo_commands(data: dict[str, Any], brand_ids: dict[str, str], type_ids: dict[str, str]) -> list[CreateProduct]:
    """The demo products as create commands; ids come from the names so a re-run finds the same products."""
    return [
        CreateProduct(
            product_id=repo.stable_id("product", p["name"]),
            name=p["name"],
            description=p["description"],
            price=Decimal(p["price"]),
            currency=p.get("currency", "USD"),
            brand_id=brand_ids[p["brand"]],
            type_id=type_ids[p["type"]],
            picture_url=p.get("picture_url"),
            available_stock=p["available_stock"],
            restock_threshold=p["restock_threshold"],
            max_stock=p["max_stock"],
        )
        for p in data["products"]
    ]


async def _create_all(system: ActorSystem, commands: list[CreateProduct]) -> int:
    async def create(command: CreateProduct) -> int:
        try:
            await system.ref(ProductActor, command.product_id).ask(command)
        except Conflict:
            return 0  # made by an earlier, interrupted seed (or another process seeding at the same time)
        return 1

    return sum(await asyncio.gather(*(create(c) for c in commands)))


async def seed(settings: Settings, database_url: str | None = None) -> int:
    """Fill an empty catalog with the demo products, once: a marker row remembers that it was done, and a
    catalog that already has products is never seeded. Returns how many products were created."""
    engine = create_engine(database_url or settings.database_url(NAME))
    try:
        await upgrade(engine, [RUNTIME, SCHEMA])  # harmless when `ecom db upgrade` ran already
        async with engine.begin() as conn:
            if await repo.get_meta(conn, SEED_MARKER) is not None:
                return 0
            if (await conn.execute(select(func.count()).select_from(repo.products))).scalar_one():
                await repo.set_meta(conn, SEED_MARKER, "skipped: the catalog had products")
                return 0
        data = load_demo_catalog()
        async with engine.begin() as conn:
            brand_ids = await repo.ensure_named(conn, repo.brands, data["brands"])
            type_ids = await repo.ensure_named(conn, repo.product_types, data["types"])
        system = ActorSystem.from_settings(StateStore(engine), settings, name=f"{NAME}-seed")
        system.register(ProductActor)
        try:
            created = await _create_all(system, demo_commands(data, brand_ids, type_ids))
        finally:
            await system.stop()
        async with engine.begin() as conn:
            await repo.set_meta(conn, SEED_MARKER, utcnow().isoformat())
        log.info("catalog: seeded %d demo products", created)
        return created
    finally:
        await engine.dispose()


SERVICE = ServiceDescription(
    NAME,
    http=Http(api.setup),
    actors=(ActorType(ProductActor),),
    # Stock commands from the order service, each to the ProductActor named by the session id.
    consumes=(
        Queue(
            CATALOG_QUEUE,
            (
                ToActor(ReserveStock, ProductActor),
                ToActor(ReleaseStock, ProductActor),
                ToActor(CommitReservation, ProductActor),
            ),
        ),
    ),
    sends={ORDER_QUEUE: (StockReserved, StockRejected)},
    publishes=(ProductPriceChanged, ProductLowStock, ProductDeleted),
    gateway_routes=public.ROUTES,
    schema=SCHEMA,
    seed=seed,
)
