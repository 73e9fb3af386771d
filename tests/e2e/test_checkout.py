"""Checkout end to end: real catalog, cart and order services over HTTP on one memory bus."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from actors.order.actor import SagaTimings
from actors.order.payment import RetryPolicy, SimulatedPaymentProvider
from actors.order.repository import count_by_status
from runtime.store import create_engine
from tests.e2e.conftest import ADDRESS
from tests.order.conftest import eventually

HAPPY_PATH = ["submitted", "awaiting_validation", "stock_confirmed", "paid"]


def statuses(order: dict) -> list[str]:
    return [h["status"] for h in order["history"]]


async def test_happy_path_from_cart_to_paid(make_shop):
    shop = await make_shop()
    lamp, mug = await shop.add_product("Lamp", "9.99", stock=10), await shop.add_product("Mug", "4.50", stock=5)
    buyer = shop.buyer()
    await buyer.put(lamp, 2)
    await buyer.put(mug, 1)
    order_id = await buyer.checkout()

    order = await buyer.wait(order_id, "paid")
    assert statuses(order) == HAPPY_PATH
    assert order["total"] == "24.48" and order["currency"] == "USD" and order["buyer_id"] == buyer.sub
    assert {(line["name"], line["unit_price"], line["quantity"]) for line in order["lines"]} == {
        ("Lamp", "9.99", 2),
        ("Mug", "4.50", 1),
    }
    assert (await shop.provider.charged(order_id)).amount == Decimal("24.48")

    assert (await shop.available(lamp), await shop.available(mug)) == (8, 4)
    await eventually(lambda: _reservations_gone(shop, lamp, mug), what="reservations committed")
    await eventually(lambda: _cart_empty(buyer), what="the cart to empty")
    listed = await (await shop.clients["order"].get("/api/orders", headers=buyer.headers)).json()
    assert [(o["id"], o["status"], o["total"]) for o in listed["items"]] == [(order_id, "paid", "24.48")]


async def test_two_buyers_race_for_the_last_units(make_shop):
    """Two carts hold 3 of the 4 lamps each: one order gets them, the other buyer gets none and pays nothing. Which
    refusal the second buyer meets is the race's: the checkout's stock check (409, when the first order's
    reservation landed before it) or the saga's (the order cancelled, out of stock), both asserted in full."""
    shop = await make_shop()
    lamp = await shop.add_product("Lamp", stock=4)
    first, second = shop.buyer(), shop.buyer()
    for buyer in (first, second):
        await buyer.put(lamp, 3)  # each cart sees 4 in stock; only one order can have 3
    first_id = await first.checkout()
    body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}}
    resp = await shop.clients["cart"].post("/api/cart/checkout", json=body, headers=second.headers)

    if resp.status == 409:  # the first order reserved its lamps before the second checkout was checked
        problem = await resp.json()
        assert problem["type"].endswith("/insufficient-stock") and problem["available"] == 1, problem
        assert (await first.wait(first_id, "paid", "cancelled"))["status"] == "paid"
        assert await shop.available(lamp) == 1
        return
    assert resp.status == 202, await resp.text()
    ids = [first_id, (await resp.json())["order_id"]]
    orders = [await b.wait(i, "paid", "cancelled") for b, i in zip((first, second), ids, strict=True)]
    assert sorted(o["status"] for o in orders) == ["cancelled", "paid"]
    cancelled = next(o for o in orders if o["status"] == "cancelled")
    assert statuses(cancelled) == ["submitted", "awaiting_validation", "cancelled"]
    assert "out of stock: Lamp (3 requested, 1 available)" in cancelled["history"][-1]["reason"]
    assert await shop.available(lamp) == 1
    await shop.orders_settled()
    assert await shop.provider.charged(cancelled["id"]) is None


async def test_declined_payment_gives_the_stock_back(make_shop):
    shop = await make_shop()
    lamp = await shop.add_product("Lamp", stock=3)
    buyer = shop.buyer()
    await buyer.put(lamp, 2)
    order = await buyer.wait(await buyer.checkout("tok_decline"), "cancelled")
    assert statuses(order) == ["submitted", "awaiting_validation", "stock_confirmed", "cancelled"]
    assert "card_declined" in order["history"][-1]["reason"]
    await eventually(lambda: _stock_is(shop, lamp, 3), what="stock released")
    assert await shop.reserved(lamp) == 0


async def test_payment_timeout_cancels_and_gives_the_stock_back(make_shop):
    shop = await make_shop(timings=SagaTimings(validation_timeout=20, payment_timeout=1.0, retry_interval=0.5))
    lamp = await shop.add_product("Lamp", stock=3)
    buyer = shop.buyer()
    await buyer.put(lamp, 1)
    order = await buyer.wait(await buyer.checkout("tok_timeout"), "cancelled")
    assert "payment did not complete within 1s" in order["history"][-1]["reason"]
    await eventually(lambda: _stock_is(shop, lamp, 3), what="stock released")
    assert [r for r in await shop.provider.records() if r.approved] == []


async def test_cancel_before_payment_and_not_after(make_shop):
    shop = await make_shop(provider=SimulatedPaymentProvider(latency=1.5), policy=RetryPolicy(call_timeout=5))
    lamp = await shop.add_product("Lamp", stock=5)
    buyer = shop.buyer()
    await buyer.put(lamp, 2)
    early = await buyer.checkout()
    await buyer.wait(early, "stock_confirmed")  # the charge is under way (the provider takes 1.5s)
    resp = await buyer.post(early, "cancel")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    await eventually(lambda: shop.provider.voided(early), what="the payment to be voided")
    await asyncio.sleep(shop.provider.latency)  # a charge that had not been stopped would be recorded by now
    assert await shop.provider.charged(early) is None, "the charge in flight was voided"
    await eventually(lambda: _stock_is(shop, lamp, 5), what="stock released")

    await buyer.put(lamp, 1)
    late = await buyer.checkout()
    await buyer.wait(late, "paid")
    resp = await buyer.post(late, "cancel")
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    resp = await buyer.post(late, "ship", headers=shop.admin())
    assert resp.status == 200 and statuses(await resp.json()) == [*HAPPY_PATH, "shipped"]
    assert await shop.available(lamp) == 4


async def test_stopping_everything_mid_saga_loses_nothing(make_shop):
    """Stop all three services while orders are reserving and charging; new ones finish every saga exactly once."""
    provider = SimulatedPaymentProvider(latency=0.3)
    shop = await make_shop(provider=provider)
    stock = {"Lamp": 30, "Mug": 30}
    products = {name: await shop.add_product(name, stock=units) for name, units in stock.items()}
    tokens = ["tok_visa"] * 6 + ["tok_decline", "tok_flaky"]
    checkouts: dict[str, tuple[str, object]] = {}
    for i, token in enumerate(tokens):
        buyer = shop.buyer()
        await buyer.put(products["Lamp"], 1 + i % 3)
        await buyer.put(products["Mug"], 1)
        checkouts[await buyer.checkout(token)] = (token, buyer)

    # Stop as soon as charges are under way: some orders are reserving, some paying, some have not started.
    await eventually(lambda: provider.calls >= 2, what="charges under way")
    await shop.stop()
    stopped_at = await _statuses_in_the_database(shop)
    assert sum(stopped_at.values()) < len(tokens) or set(stopped_at) - {"paid", "cancelled"}, f"mid-saga: {stopped_at}"
    await shop.start()
    await shop.orders_settled()

    paid_units = dict.fromkeys(stock, 0)
    for order_id, (token, buyer) in checkouts.items():
        status, order = await buyer.order(order_id)
        assert status == 200, "no accepted order is lost"
        expected = "cancelled" if token == "tok_decline" else "paid"
        assert order["status"] == expected, order["history"]
        assert statuses(order) == (HAPPY_PATH if expected == "paid" else [*HAPPY_PATH[:3], "cancelled"])
        if expected == "paid":
            assert await provider.charged(order_id) is not None
            for line in order["lines"]:
                paid_units[line["name"]] += line["quantity"]
        await eventually(lambda buyer=buyer: _cart_empty(buyer), what="the cart to empty")
    assert len([c for c in await provider.records() if c.approved]) == len(tokens) - 1, "each paid order charged once"
    assert await provider.stray_charges() == [], "no charge stands without its paid order"
    for name, product_id in products.items():
        await eventually(lambda p=product_id: _reservations_gone(shop, p), what=f"{name} reservations settled")
        assert await shop.available(product_id) + await shop.reserved(product_id) == stock[name] - paid_units[name]


async def _statuses_in_the_database(shop) -> dict[str, int]:
    """Orders per status as the order database has them, read with a plain engine (no service running)."""
    engine = create_engine(shop.databases["order"])
    try:
        return await count_by_status(engine)
    finally:
        await engine.dispose()


async def _stock_is(shop, product_id: str, units: int) -> bool:
    return await shop.available(product_id) == units


async def _reservations_gone(shop, *product_ids: str) -> bool:
    return all([await shop.reserved(p) == 0 for p in product_ids])


async def _cart_empty(buyer) -> bool:
    return (await buyer.cart())["lines"] == []
