"""The catalog down, slow or broken: 503/502 problem+json with Retry-After, never a 500, and no change."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import pytest

from actors.cart.catalog import BATCH_SIZE, DEFAULT_TIMEOUT, CatalogClient
from tests.cart.fake_catalog import FakeCatalog


async def test_catalog_down_is_503_and_nothing_changes(shop, catalog):
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me, earlier = shop.shopper(), shop.shopper()
    await me.put(lamp, 1)
    await earlier.put(lamp, 1)
    order_id = (await (await earlier.checkout("k1")).json())["order_id"]
    before = await me.get()
    await catalog.server.close()

    problem = await me.put(bulb, 1, status=503)
    assert problem["type"].endswith("/catalog-unavailable") and "nothing was changed" in problem["detail"]
    resp = await me.checkout()  # checkout re-checks prices fresh: it needs the catalog too
    assert resp.status == 503 and resp.content_type == "application/problem+json"
    assert int(resp.headers["Retry-After"]) >= 1
    assert await me.get() == before
    assert await shop.outbox_rows() == 1  # the earlier checkout's only

    # A retried checkout is answered from the cart's memory of its key: no catalog needed.
    resp = await earlier.checkout("k1")
    assert resp.status == 202 and (await resp.json())["order_id"] == order_id

    # What needs no catalog still works: reading, removing, emptying.
    assert (await me.put(lamp, 0))["lines"] == []


@pytest.fixture
async def fake(aiohttp_server):
    fake = FakeCatalog()
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize(
    ("mode", "status", "slug"), [("error", 503, "catalog-unavailable"), ("garbage", 502, "bad-gateway")]
)
async def test_catalog_errors_become_problems_not_500(make_shop, fake, mode, status, slug):
    fake_catalog, url = fake
    shop = await make_shop(url)
    product_id = str(uuid.uuid4())
    fake_catalog.add(product_id)
    fake_catalog.mode = mode
    me = shop.shopper()
    resp = await shop.client.put(f"/api/cart/items/{product_id}", json={"quantity": 1}, headers=me.headers)
    assert resp.status == status and resp.content_type == "application/problem+json"
    assert (await resp.json())["type"].endswith(f"/{slug}")
    assert (await me.get())["lines"] == []


async def test_a_slow_catalog_costs_at_most_the_timeout(make_shop, fake):
    fake_catalog, url = fake
    shop = await make_shop(url)
    product_id = str(uuid.uuid4())
    fake_catalog.add(product_id)
    fake_catalog.mode = "slow"
    me = shop.shopper()
    started = time.monotonic()
    problem = await me.put(product_id, 1, status=503)
    assert time.monotonic() - started < DEFAULT_TIMEOUT + 1.5
    assert problem["type"].endswith("/catalog-unavailable")
    assert (await me.get())["lines"] == []


async def test_lookups_are_cached_briefly_and_shared(make_shop, fake):
    fake_catalog, url = fake
    shop = await make_shop(url)
    product_id = str(uuid.uuid4())
    fake_catalog.add(product_id, price="4.00")
    me = shop.shopper()
    await me.put(product_id, 1)
    await me.put(product_id, 2)
    assert fake_catalog.calls == 1  # the second PUT was priced from the cache
    unknown = str(uuid.uuid4())
    await me.put(unknown, 1, status=404)
    await me.put(unknown, 1, status=404)
    assert fake_catalog.calls == 2  # "no such product" is cached too


async def test_a_burst_of_lookups_is_batched_and_a_leaving_requester_cancels_nothing(fake):
    """Lookups of different products made together go in batch requests (at most BATCH_SIZE ids each), a lookup
    of an id already on its way joins that request, and a requester that goes away leaves the others' answer."""
    fake_catalog, url = fake
    ids = [str(uuid.uuid4()) for _ in range(BATCH_SIZE + 50)]
    for n, product_id in enumerate(ids):
        fake_catalog.add(product_id, price=f"{n + 1}.00")
    client = CatalogClient(url)
    await client.start()
    try:
        answers = await asyncio.gather(*(client.quote(product_id) for product_id in ids))
        assert [a.unit_price if a else None for a in answers] == [Decimal(f"{n + 1}.00") for n in range(len(ids))]
        assert fake_catalog.calls == 2  # 150 lookups: two batches, the first full
        fake_catalog.calls = 0
        fake_catalog.mode, fake_catalog.delay = "slow", 0.3
        fresh_ids = [str(uuid.uuid4()) for _ in range(3)]
        for product_id in fresh_ids:
            fake_catalog.add(product_id, price="7.00")
        leaving = asyncio.ensure_future(client.quotes(fresh_ids[:2]))
        staying = asyncio.ensure_future(client.quotes(fresh_ids))
        await asyncio.sleep(0.05)
        joining = asyncio.ensure_future(client.quote(fresh_ids[0]))  # on its way already: joins that request
        leaving.cancel()
        got = await staying
        assert {pid: q.unit_price if q else None for pid, q in got.items()} == dict.fromkeys(fresh_ids, Decimal("7.00"))
        assert (await joining) is not None and fake_catalog.calls == 1
    finally:
        await client.close()
