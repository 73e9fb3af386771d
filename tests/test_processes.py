"""`ecom run --processes`: every service its own process on PostgreSQL + RabbitMQ, one order process killed
mid-saga. Every accepted order still ends `paid` or `cancelled`, none is lost, stock stays consistent.

The cluster (own databases, own RabbitMQ vhost, ports below 32768) comes from tests/support/cluster.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.cluster import (
    ADDRESS,
    ProcessCluster,
    bearer,
    new_email,
    process_cluster,
    register,
)


@pytest.fixture
async def cluster(tmp_path) -> AsyncIterator[ProcessCluster]:
    async with process_cluster(tmp_path, instances=2) as running:
        yield running


async def test_orders_survive_an_order_process_killed_mid_saga(cluster: ProcessCluster):
    gateway = cluster.gateway
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/api/catalog/products", params={"page_size": "1", "sort": "price"}) as resp:
            product = (await resp.json())["items"][0]
        stock_before = product["available_stock"]
        buyers = [await register(http, gateway, new_email(f"buyer{i}")) for i in range(8)]

        async def buy(token: str) -> str:
            headers = bearer(token)
            async with http.put(
                f"{gateway}/api/cart/items/{product['id']}", json={"quantity": 1}, headers=headers
            ) as r:
                assert r.status == 200, await r.text()
            body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}}
            async with http.post(f"{gateway}/api/cart/checkout", json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
                return (await r.json())["order_id"]

        first = await asyncio.gather(*(buy(t) for t in buyers[:4]))
        cluster.kill_instance("order", 0)  # mid-saga: the first orders are still moving
        second = await asyncio.gather(*(buy(t) for t in buyers[4:]))

        statuses: dict[str, str] = {}
        deadline = time.monotonic() + 90
        for token, order_id in zip(buyers, [*first, *second], strict=True):
            while True:
                async with http.get(f"{gateway}/api/orders/{order_id}", headers=bearer(token)) as r:
                    status = (await r.json()).get("status") if r.status == 200 else None
                if status in ("paid", "cancelled"):
                    statuses[order_id] = status
                    break
                assert time.monotonic() < deadline, f"order {order_id} stuck at {status}\n{cluster.log_tail(4000)}"
                await asyncio.sleep(0.3)
        async with http.get(f"{gateway}/api/catalog/products/{product['id']}") as resp:
            stock_after = (await resp.json())["available_stock"]
    paid = sum(1 for s in statuses.values() if s == "paid")
    assert len(statuses) == 8, "every accepted order reached an end state"
    assert paid >= 1
    assert stock_after == stock_before - paid, "stock moved exactly by the paid orders: none charged twice, none lost"
