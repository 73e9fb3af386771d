"""The in-memory read model: the same answers as the SQL queries, and fresh on every instance.

Freshness is tested with two real catalog processes on one database (SQLite and PostgreSQL): instance A is
the service in this process (the ``catalog`` fixture), instance B a child ``ecom serve catalog`` process.
Every change acknowledged by A (a price, the stock, a new product, a deletion, a new brand) must be what B's
very next read returns, with a new ETag. tests/test_processes.py-style clusters check the same through the
gateway on PostgreSQL + RabbitMQ (``test_every_catalog_instance_is_fresh_through_the_gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from actors.catalog import readmodel
from actors.catalog import repository as repo
from actors.catalog.messages import UpdateProduct
from bench.shop import port_listening
from contracts.stock import ReleaseStock, ReserveStock, StockReserved
from tests.support.cluster import (
    REPO_ROOT,
    _clean_env,
    admin_token,
    bearer,
    free_base_port,
    process_cluster,
)

PRODUCTS = "/api/catalog/products"


# ---------------------------------------------------------------------------------------------------
# Same answers as the SQL queries (repository.browse, the former read path, is the oracle)


async def _sql_page(cat, query: repo.ProductQuery) -> tuple[list[str], int]:
    async with cat.engine.connect() as conn:
        rows, total = await repo.browse(conn, query)
    return [r.id for r in rows], total


async def test_pages_and_searches_match_the_sql_queries(catalog):
    cat = await catalog()
    # Variants of one product: a word most products share (the walk through the sorted catalog), equal
    # prices (ties broken by id), an accented name.
    for n in range(40):
        await cat.create(name=f"Common Lamp {n % 7}", price=f"{10 + n % 3}.00", description="everyday gear")
    await cat.create(name="Café Lantern", description="Crème brûlée stove")
    model = cat.client.app[readmodel_key()]
    await model.fresh()
    brands = {b["name"]: b["id"] for b in (await (await cat.client.get("/api/catalog/brands")).json())["items"]}
    types = {t["name"]: t["id"] for t in (await (await cat.client.get("/api/catalog/types")).json())["items"]}
    groups = [(None, None), (brands["Northwind Outfitters"], None), (None, types["Tents"]),
              (brands["Northwind Outfitters"], types["Lighting"])]  # fmt: skip
    searches = [(), ("common",), ("lamp", "common"), ("gear",), ("4",), ("cafe",), ("creme", "stove"), ("zzz",),
                ("the",), ("a",), ("ten",)]  # fmt: skip
    checked = 0
    for brand_id, type_id in groups:
        for search in searches:
            for sort in repo.SORT_OPTIONS:
                for page, size in ((1, 7), (2, 7), (3, 20), (40, 5)):
                    query = repo.ProductQuery(page, size, brand_id, type_id, search, sort)
                    items, total = model.browse(query)
                    assert ([p.id for p in items], total) == await _sql_page(cat, query), query
                    checked += 1
    assert checked == len(groups) * len(searches) * 4 * 4


def readmodel_key() -> Any:
    from actors.catalog.api import READ_MODEL

    return READ_MODEL


async def test_a_pruned_change_log_makes_a_reader_reload_everything(catalog, monkeypatch):
    cat = await catalog(seed=False)
    first = await cat.create(name="Pruned Lamp", price="5.00")
    reader = readmodel.CatalogReadModel(cat.engine)  # another instance's model, behind from now on
    await reader.start()
    try:
        monkeypatch.setattr(repo, "CHANGES_KEPT", 3)
        monkeypatch.setattr(repo, "_PRUNE_ONE_IN", 1)
        for n in range(8):
            await cat.ask(first["id"], UpdateProduct(first["id"], price=Decimal(f"{6 + n}.00")))
        reloads = reader.reloads
        await reader.fresh()
        assert reader.reloads == reloads + 1, "the log no longer reaches back to the reader's version"
        found = reader.product(first["id"])
        assert found is not None and b'"price":"13.00"' in found.body
        await cat.ask(first["id"], UpdateProduct(first["id"], price=Decimal("20.00")))
        await reader.fresh()
        found = reader.product(first["id"])
        assert reader.reloads == reloads + 1, "a reader in reach of the log applies only what changed"
        assert found is not None and b'"price":"20.00"' in found.body
    finally:
        await reader.stop()


# ---------------------------------------------------------------------------------------------------
# Two catalog processes on one database


def _tail(path: str) -> str:
    return Path(path).read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def catalog_process(db_url: str, data_dir: str) -> AsyncIterator[str]:
    """``ecom serve catalog`` in a child process on ``db_url``; yields its base URL."""
    port = free_base_port(1)
    env = {**_clean_env(), "ECOM_DATA_DIR": data_dir, "ECOM_CATALOG_DATABASE_URL": db_url,
           "ECOM_CATALOG_PORT": str(port), "ECOM_BUS": "memory"}  # fmt: skip
    log = open(os.path.join(data_dir, "catalog-b.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "catalog"], env=env, cwd=REPO_ROOT, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 90
        while not port_listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, _tail(log.name)
            await asyncio.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # only the child this test started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_a_change_acknowledged_by_one_process_is_read_by_the_next_request_to_another(catalog, tmp_path):
    cat = await catalog()  # instance A: this process
    db_url = str(cat.engine.url.render_as_string(hide_password=False))
    async with catalog_process(db_url, str(tmp_path)) as other, aiohttp.ClientSession(other) as b:
        product = await cat.create(name="Fresh Lantern", price="10.00", available_stock=500, max_stock=1000)
        pid = product["id"]
        path = f"{PRODUCTS}/{pid}"
        async with b.get(path) as resp:  # created on A: B's next read has it
            assert resp.status == 200 and (await resp.json())["price"] == "10.00"
            etag = resp.headers["ETag"]
        for n in range(1, 21):
            price = f"{10 + n}.{n:02d}"
            patched = await cat.client.patch(path, json={"price": price}, headers=cat.admin())
            assert patched.status == 200, await patched.text()
            async with b.get(path, headers={"If-None-Match": etag}) as resp:
                assert resp.status == 200 and resp.headers["ETag"] != etag, f"change {n}: B served a stale read"
                assert (await resp.json())["price"] == price
                etag = resp.headers["ETag"]
            async with b.get(PRODUCTS, params={"q": "fresh lantern"}) as resp:
                assert [(p["id"], p["price"]) for p in (await resp.json())["items"]] == [(pid, price)]
            # stock, changed by a reservation (the order service's path), on A
            reply = await cat.ask(pid, ReserveStock(f"order-{n}", pid, 1))
            assert isinstance(reply, StockReserved)
            async with b.get(path, headers={"If-None-Match": etag}) as resp:
                assert resp.status == 200 and (await resp.json())["available_stock"] == 500 - n
                etag = resp.headers["ETag"]

        # a new brand on A: B lists it and filters by it at once
        made = await cat.client.post("/api/catalog/brands", json={"name": "Brand New Co"}, headers=cat.admin())
        assert made.status == 201
        async with b.get("/api/catalog/brands") as resp:
            assert "Brand New Co" in {i["name"] for i in (await resp.json())["items"]}
        async with b.get(PRODUCTS, params={"brand": "brand new co"}) as resp:
            assert resp.status == 200 and (await resp.json())["total"] == 0

        # deleted on A: gone from B's next read, its listing one shorter
        async with b.get(PRODUCTS, params={"page_size": 1}) as resp:
            total = (await resp.json())["total"]
        deleted = await cat.client.delete(path, headers=cat.admin())
        assert deleted.status == 409  # open reservations hold it: nothing changes
        async with b.get(path) as resp:
            assert resp.status == 200
        for n in range(1, 21):
            await cat.ask(pid, ReleaseStock(f"order-{n}", pid))
        deleted = await cat.client.delete(path, headers=cat.admin())
        assert deleted.status == 204
        async with b.get(path) as resp:
            assert resp.status == 404
        async with b.get(PRODUCTS, params={"page_size": 1}) as resp:
            assert (await resp.json())["total"] == total - 1


# ---------------------------------------------------------------------------------------------------
# A cluster: two instances of every service on PostgreSQL + RabbitMQ, writes through the gateway


async def test_every_catalog_instance_is_fresh_through_the_gateway(tmp_path):
    async with process_cluster(tmp_path, instances=2) as cluster, aiohttp.ClientSession() as http:
        gateway = cluster.gateway
        instances = [f"http://127.0.0.1:{p}" for p in cluster.instance_ports("catalog")]
        assert len(instances) == 2
        headers = bearer(await admin_token(http, gateway))
        async with http.get(f"{gateway}{PRODUCTS}", params={"page_size": 3, "sort": "price"}) as resp:
            products = [p["id"] for p in (await resp.json())["items"]]
        etags: dict[tuple[str, str], str] = {}
        for n in range(12):
            pid = products[n % len(products)]
            price = f"{20 + n}.{n:02d}"
            async with http.patch(f"{gateway}{PRODUCTS}/{pid}", json={"price": price}, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
            for base in (*instances, gateway):  # each instance's next read, and the gateway's
                previous = etags.get((base, pid), '"none"')
                async with http.get(f"{base}{PRODUCTS}/{pid}", headers={"If-None-Match": previous}) as resp:
                    assert resp.status == 200, f"change {n}: {base} answered {resp.status} for the old ETag"
                    assert (await resp.json())["price"] == price, f"change {n}: {base} served a stale price"
                    assert resp.headers["ETag"] != previous
                    etags[(base, pid)] = resp.headers["ETag"]
            detail_etags = {etags[(base, pid)] for base in instances}
            assert len(detail_etags) == 1, "every instance gives the same ETag for the same product state"
        for base in instances:
            async with http.get(f"{base}{PRODUCTS}", params={"page_size": 100, "sort": "price"}) as resp:
                listed = {p["id"]: p["price"] for p in (await resp.json())["items"]}
            for n in range(9, 12):
                assert listed[products[n % len(products)]] == f"{20 + n}.{n:02d}"
