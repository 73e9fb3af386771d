"""Stock and reservations: the ProductActor under concurrency, idempotency, and the bus contract."""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal

from sqlalchemy import select

from actors.catalog import repository as repo
from actors.catalog.messages import UpdateProduct
from contracts.queues import CATALOG_QUEUE
from contracts.stock import (
    CommitReservation,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)
from runtime.messages import envelope, from_body

PRODUCTS = "/api/catalog/products"


async def stock_row(cat, product_id: str) -> int:
    async with cat.engine.connect() as conn:
        return (
            await conn.execute(select(repo.products.c.available_stock).where(repo.products.c.id == product_id))
        ).scalar_one()


async def test_a_thousand_concurrent_reservations_never_oversell(catalog):
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=100, restock_threshold=10, max_stock=100))["id"]
    replies = await asyncio.gather(*(cat.ask(pid, ReserveStock(f"order-{i}", pid, 1)) for i in range(1000)))

    reserved = [r for r in replies if isinstance(r, StockReserved)]
    rejected = [r for r in replies if isinstance(r, StockRejected)]
    assert len(reserved) == 100 and len(rejected) == 900
    assert all(r.reason == "insufficient_stock" and r.available == 0 for r in rejected)
    assert all(r.unit_price == Decimal("10.00") and r.quantity == 1 for r in reserved)
    state = await cat.state(pid)
    assert state["available_stock"] == 0 and len(state["reservations"]) == 100
    assert await stock_row(cat, pid) == 0

    await cat.settle()
    answers = [from_body(StockReserved if e.type == "StockReserved" else StockRejected, e.body) for e in cat.replies]
    assert len(answers) == 1000 and sorted(answers, key=repr) == sorted(replies, key=repr)
    assert all(e.session_id == e.body["order_id"] == e.correlation_id for e in cat.replies)
    low = cat.events_of("ProductLowStock")
    assert [e["available_stock"] for e in low] == list(range(10, -1, -1)), "every change at or below the threshold"


async def test_a_repeated_reservation_changes_nothing(catalog):
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=10, price="5.00"))["id"]
    first = await cat.ask(pid, ReserveStock("order-1", pid, 3))
    assert first == StockReserved("order-1", pid, 3, Decimal("5.00"))
    await cat.ask(pid, UpdateProduct(pid, price=Decimal("6.00")))
    for _ in range(3):
        assert await cat.ask(pid, ReserveStock("order-1", pid, 3)) == first, "same answer, same price, no effect"
    assert (await cat.state(pid))["available_stock"] == 7 and await stock_row(cat, pid) == 7

    refused = await cat.ask(pid, ReserveStock("order-2", pid, 8))
    assert refused == StockRejected("order-2", pid, 8, 7, "insufficient_stock")
    await cat.ask(pid, ReleaseStock("order-1", pid))
    assert await cat.ask(pid, ReserveStock("order-2", pid, 8)) == refused, "a refusal stays the answer to that order"

    await cat.settle()
    # every request is answered (the first answer may be what got lost); orders' sessions run concurrently
    assert Counter(e.type for e in cat.replies) == {"StockReserved": 4, "StockRejected": 2}


async def test_release_restores_stock_exactly_once(catalog):
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=10))["id"]
    await cat.ask(pid, ReserveStock("order-1", pid, 4))
    await cat.ask(pid, ReserveStock("order-2", pid, 1))
    assert await stock_row(cat, pid) == 5
    for _ in range(3):
        await cat.ask(pid, ReleaseStock("order-1", pid))
    assert (await cat.state(pid))["available_stock"] == 9 and await stock_row(cat, pid) == 9
    await cat.ask(pid, ReleaseStock("never-reserved", pid))
    assert await stock_row(cat, pid) == 9
    again = await cat.ask(pid, ReserveStock("order-1", pid, 4))
    assert isinstance(again, StockRejected) and again.reason == "already_released"
    assert await stock_row(cat, pid) == 9


async def test_commit_keeps_the_stock_and_frees_the_product(catalog):
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=10, price="2.50"))["id"]
    reserved = await cat.ask(pid, ReserveStock("order-1", pid, 2))
    await cat.ask(pid, CommitReservation("order-1", pid))
    state = await cat.state(pid)
    assert state["available_stock"] == 8 and state["reservations"] == {}
    await cat.ask(pid, ReleaseStock("order-1", pid))  # too late: the units are sold
    await cat.ask(pid, CommitReservation("order-1", pid))  # twice: no-op
    assert await cat.ask(pid, ReserveStock("order-1", pid, 2)) == reserved
    assert await stock_row(cat, pid) == 8
    assert (await cat.client.delete(f"{PRODUCTS}/{pid}", headers=cat.admin())).status == 204


async def test_rejections_say_why(catalog):
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=2))["id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    assert await cat.ask(unknown, ReserveStock("o1", unknown, 1)) == StockRejected(
        "o1", unknown, 1, 0, "unknown_product"
    )
    assert await cat.system.store.load("product", unknown) is None, "asking about a product never creates it"
    assert await cat.ask(pid, ReserveStock("o2", pid, 0)) == StockRejected("o2", pid, 0, 2, "invalid_quantity")
    assert await cat.ask(pid, ReserveStock("o3", pid, 3)) == StockRejected("o3", pid, 3, 2, "insufficient_stock")
    assert await cat.ask(pid, ReserveStock("o4", pid, 2)) == StockReserved("o4", pid, 2, Decimal("10.00"))


async def test_the_order_service_contract_over_the_bus(catalog):
    """What the order service does: send to the "catalog" queue with session = product id, get answers on
    the "order" queue with session = order id. Redelivered copies are dropped by the actor's inbox."""
    cat = await catalog(seed=False)
    pid = (await cat.create(available_stock=5, price="7.25"))["id"]
    reserve = envelope(ReserveStock("order-9", pid, 2), session_id=pid)
    await cat.bus.send(CATALOG_QUEUE, reserve)
    await cat.bus.send(CATALOG_QUEUE, reserve)  # the same message again, as after a producer crash
    await cat.bus.send(CATALOG_QUEUE, envelope(ReserveStock("order-10", pid, 9), session_id=pid))
    await cat.settle()
    answers = sorted((e.type, e.session_id, e.correlation_id) for e in cat.replies)
    assert answers == [("StockRejected", "order-10", "order-10"), ("StockReserved", "order-9", "order-9")]
    assert from_body(StockReserved, next(e for e in cat.replies if e.type == "StockReserved").body) == StockReserved(
        "order-9", pid, 2, Decimal("7.25")
    )
    assert await stock_row(cat, pid) == 3

    await cat.bus.send(CATALOG_QUEUE, envelope(ReleaseStock("order-9", pid), session_id=pid))
    await cat.settle()
    assert await stock_row(cat, pid) == 5
    await cat.bus.send(CATALOG_QUEUE, envelope(ReserveStock("order-11", pid, 1), session_id=pid))
    await cat.bus.send(CATALOG_QUEUE, envelope(CommitReservation("order-11", pid), session_id=pid))
    await cat.settle()
    state = await cat.state(pid)
    assert state["available_stock"] == 4 and state["reservations"] == {}
    assert await cat.bus.dead_letters(CATALOG_QUEUE) == []
