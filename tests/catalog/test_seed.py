"""The demo catalog: a sane data file, seeded once into an empty database, through the ProductActor."""

from __future__ import annotations

import re

from sqlalchemy import delete, func, select

from actors.catalog import repository as repo
from actors.catalog import service
from actors.catalog.actor import ProductActor
from config import load_settings
from runtime.store import StateStore, create_engine


def test_demo_data_file_is_a_real_catalog():
    data = service.load_demo_catalog()
    products = data["products"]
    assert len(products) >= 100 and len(data["brands"]) >= 5 and len(data["types"]) >= 5
    assert len({p["name"] for p in products}) == len(products), "names are unique (ids come from them)"
    for p in products:
        assert p["brand"] in data["brands"] and p["type"] in data["types"], p["name"]
        assert re.fullmatch(r"\d+\.\d\d", p["price"]), p["name"]
        assert 0 <= p["restock_threshold"] <= p["max_stock"] and 0 <= p["available_stock"] <= p["max_stock"], p["name"]
        assert len(p["description"]) > 40, p["name"]
    for key in ("brand", "type"):
        used = {p[key] for p in products}
        assert used == set(data[f"{key}s"]), f"every {key} has products"


async def count(engine, table) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(table))).scalar_one()


async def test_seed_fills_an_empty_catalog_once(db_url, tmp_path):
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    expected = len(service.load_demo_catalog()["products"])
    assert await service.seed(settings, database_url=db_url) == expected
    assert await service.seed(settings, database_url=db_url) == 0, "never twice"

    engine = create_engine(db_url)
    try:
        assert await count(engine, repo.products) == expected
        assert await count(engine, repo.brands) >= 5 and await count(engine, repo.product_types) >= 5
        # the actors own the products: each has its state, and the query row agrees with it
        store = StateStore(engine)
        async with engine.connect() as conn:
            rows = list(
                await conn.execute(select(repo.products.c.id, repo.products.c.available_stock, repo.products.c.price))
            )
        for row in rows[:10]:
            record = await store.load(ProductActor.type_name, row.id)
            assert record is not None and f'"available_stock":{row.available_stock},' in record.state

        # even without its marker, a catalog that has products is not seeded again
        async with engine.begin() as conn:
            await conn.execute(delete(repo.catalog_meta))
        assert await service.seed(settings, database_url=db_url) == 0
        assert await count(engine, repo.products) == expected
    finally:
        await engine.dispose()
