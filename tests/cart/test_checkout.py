"""Checkout: price re-check, CheckoutRequested through the outbox, idempotency keys, OrderStarted empties the cart."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from actors.cart.actor import MAX_CHECKOUTS
from contracts.catalog import ProductPriceChanged
from contracts.checkout import Address, CheckoutLine, OrderStarted, PaymentDetails
from tests.cart.conftest import ADDRESS, PAYMENT


async def test_checkout_sends_one_order_request_and_a_retry_with_the_key_gets_the_same_order(shop, catalog):
    lamp, bulb = await catalog.add("Lamp", "19.99"), await catalog.add("Bulb", "0.50")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 3)
    key = str(uuid.uuid4())

    first = await me.checkout(key, address={**ADDRESS, "state": "Greater London"})
    assert first.status == 202, await first.text()
    order_id = (await first.json())["order_id"]
    assert uuid.UUID(order_id).version == 4
    assert first.headers["Location"] == f"/api/orders/{order_id}"

    again = await me.checkout(key, address={**ADDRESS, "state": "Greater London"})
    assert again.status == 202 and (await again.json())["order_id"] == order_id
    assert again.headers["Idempotent-Replayed"] == "true"

    await shop.settle()
    assert await shop.outbox_rows() == 1
    [request] = shop.checkout_requests()
    [env] = shop.orders
    assert env.session_id == order_id
    assert request.order_id == order_id and request.buyer_id == me.sub and request.cart_id == me.sub
    assert request.lines == (
        CheckoutLine(lamp, "Lamp", Decimal("19.99"), 2, ""),
        CheckoutLine(bulb, "Bulb", Decimal("0.50"), 3, ""),
    )
    assert request.total == Decimal("41.48") and request.currency == "USD"
    assert request.shipping_address == Address(**ADDRESS, state="Greater London")
    assert request.payment == PaymentDetails("card", "tok_visa")
    assert request.requested_at.tzinfo is not None


async def test_a_key_reused_for_another_request_is_refused(shop, catalog):
    me = shop.shopper()
    await me.put(await catalog.add(), 1)
    assert (await me.checkout("key-1")).status == 202
    resp = await me.checkout("key-1", payment={"method": "card", "token": "tok_decline"})
    assert resp.status == 422 and (await resp.json())["type"].endswith("/idempotency-key-reused")
    await shop.settle()
    assert await shop.outbox_rows() == 1


async def test_keys_are_per_cart_and_bounded(shop, catalog):
    lamp = await catalog.add()
    me, other = shop.shopper(), shop.shopper()
    await me.put(lamp, 1)
    await other.put(lamp, 1)
    mine = await (await me.checkout("same-key")).json()
    theirs = await (await other.checkout("same-key")).json()
    assert mine["order_id"] != theirs["order_id"]
    for n in range(MAX_CHECKOUTS):
        assert (await me.checkout(f"k{n}")).status == 202
    info = await (
        await shop.client.get(
            f"/api/cart/admin/actors/cart/{me.sub}", headers=shop.identity.headers(shop.identity.admin_token())
        )
    ).json()
    assert len(info["state"]["checkouts"]) == MAX_CHECKOUTS
    assert "tok_visa" not in str(info["state"])  # the payment token is not kept in the cart


async def test_a_price_changed_since_the_buyer_saw_it_is_applied_noted_and_answered_409(make_shop, catalog):
    # Without the bus the catalog's event cannot arrive first: checkout's own re-check has to find the change.
    shop = await make_shop(catalog.url, with_bus=False)
    lamp, bulb = await catalog.add("Lamp", "10.00"), await catalog.add("Bulb", "1.00")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    await catalog.change(lamp, price="12.50")

    resp = await me.checkout("k")
    assert resp.status == 409
    problem = await resp.json()
    assert problem["type"].endswith("/price-changed") and "10.00 -> 12.50" in problem["detail"]
    assert problem["price_changes"] == [
        {"product_id": lamp, "name": "Lamp", "old_price": "10.00", "new_price": "12.50"}
    ]
    cart = await me.get()
    assert cart["lines"][0]["unit_price"] == "12.50" and cart["total"] == "26.00"
    assert [(n["old_price"], n["new_price"]) for n in cart["notes"]] == [("10.00", "12.50")]
    assert await shop.outbox_rows() == 0

    confirmed = await me.checkout("k")  # the buyer confirms the new price
    assert confirmed.status == 202
    assert await shop.outbox_rows() == 1


async def test_checkout_refuses_an_empty_cart_a_deleted_product_and_missing_stock(shop, catalog):
    me = shop.shopper()
    resp = await me.checkout()
    assert resp.status == 409 and (await resp.json())["type"].endswith("/cart-empty")

    lamp, gone = await catalog.add("Lamp", stock=5), await catalog.add("Old Lamp")
    await me.put(lamp, 5)
    await me.put(gone, 1)
    await catalog.delete(gone)
    resp = await me.checkout()
    problem = await resp.json()
    assert resp.status == 409 and problem["type"].endswith("/product-unavailable") and problem["product_id"] == gone

    await me.put(gone, 0)
    await catalog.change(lamp, available_stock=4)
    resp = await me.checkout()
    assert resp.status == 409 and (await resp.json())["type"].endswith("/insufficient-stock")
    await shop.settle()
    assert await shop.outbox_rows() == 0 and len((await me.get())["lines"]) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payment": PAYMENT}, "shipping_address"),
        ({"shipping_address": {**ADDRESS, "city": ""}, "payment": PAYMENT}, "shipping_address.city"),
        ({"shipping_address": ADDRESS, "payment": {"method": "card", "token": "4111 1111 1111 1111"}}, "payment.token"),
        ({"shipping_address": ADDRESS, "payment": {"method": "card"}}, "payment.token"),
    ],
)
async def test_bad_checkout_input_is_422_naming_the_field(shop, body, field):
    me = shop.shopper()
    resp = await shop.client.post("/api/cart/checkout", json=body, headers=me.headers)
    problem = await resp.json()
    assert resp.status == 422 and field in [e["field"] for e in problem["errors"]], problem


async def test_a_malformed_idempotency_key_is_422(shop):
    me = shop.shopper()
    headers = {**me.headers, "Idempotency-Key": "has spaces in it"}
    resp = await shop.client.post(
        "/api/cart/checkout", json={"shipping_address": ADDRESS, "payment": PAYMENT}, headers=headers
    )
    assert resp.status == 422 and (await resp.json())["errors"][0]["field"] == "Idempotency-Key"


def lines(cart: dict) -> list[tuple[str, int]]:
    return [(line["product_id"], line["quantity"]) for line in cart["lines"]]


async def order_started(shop, me, order_id: str):
    env = await shop.publish(OrderStarted(order_id, me.sub, me.sub), session_id=order_id)
    await shop.settle()
    return env


async def test_order_started_removes_what_was_ordered_once(shop, catalog):
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    order_id = (await (await me.checkout()).json())["order_id"]
    assert lines(await me.get()) == [(lamp, 2), (bulb, 1)]  # until the order exists

    env = await order_started(shop, me, order_id)
    cart = await me.get()
    assert cart["lines"] == [] and cart["currency"] is None

    await me.put(lamp, 2)  # the same product and quantity again, for a next order: not the ordered line
    await shop.bus.publish(env)  # redelivered
    await shop.publish(OrderStarted(order_id, me.sub, me.sub), session_id=order_id)  # sent twice by the order service
    await shop.publish(OrderStarted(str(uuid.uuid4()), me.sub, me.sub), session_id="x")  # not from this cart
    await shop.settle()
    assert lines(await me.get()) == [(lamp, 2)]
    assert (await me.checkout()).status == 202
    assert await shop.bus.dead_letters("cart") == []


@pytest.mark.parametrize("new_quantity", [1, 2, 5], ids=["fewer", "same", "more"])
async def test_a_quantity_set_after_checkout_is_what_the_cart_holds_once_the_order_starts(shop, catalog, new_quantity):
    """The bench's unexplained 409 cart-empty: checkout, PUT an ordered product (200), OrderStarted, checkout."""
    lamp, bulb, cable = await catalog.add("Lamp"), await catalog.add("Bulb"), await catalog.add("Cable")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    order_id = (await (await me.checkout()).json())["order_id"]
    answered = await me.put(lamp, new_quantity)  # after the 202, before OrderStarted
    assert (lamp, new_quantity) in lines(answered)
    await me.put(cable, 3)  # a product the order does not hold

    env = await order_started(shop, me, order_id)
    assert lines(await me.get()) == [(lamp, new_quantity), (cable, 3)]
    await shop.bus.publish(env)  # redelivered: nothing is removed twice
    await shop.settle()
    assert lines(await me.get()) == [(lamp, new_quantity), (cable, 3)]

    resp = await me.checkout()
    assert resp.status == 202, await resp.text()
    await shop.settle()
    assert [(line.product_id, line.quantity) for line in shop.checkout_requests()[-1].lines] == [
        (lamp, new_quantity),
        (cable, 3),
    ]


async def test_a_line_removed_and_added_again_after_checkout_stays(shop, catalog):
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    order_id = (await (await me.checkout()).json())["order_id"]
    resp = await shop.client.delete(f"/api/cart/items/{lamp}", headers=me.headers)
    assert resp.status == 200, await resp.text()
    await me.put(lamp, 2)

    await order_started(shop, me, order_id)
    assert lines(await me.get()) == [(lamp, 2)]


async def test_two_checkouts_before_their_orders_start_each_remove_only_their_own_lines(shop, catalog):
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me = shop.shopper()
    await me.put(lamp, 2)
    first = (await (await me.checkout()).json())["order_id"]
    await me.put(lamp, 3)
    await me.put(bulb, 1)
    second = (await (await me.checkout()).json())["order_id"]  # orders lamp x3 and bulb x1
    await me.put(bulb, 4)

    await order_started(shop, me, second)  # the order service may start them in either order
    assert lines(await me.get()) == [(bulb, 4)]
    await order_started(shop, me, first)
    assert lines(await me.get()) == [(bulb, 4)]


async def test_the_cart_and_its_checkout_keys_survive_a_restart(make_shop, catalog):
    first = await make_shop(catalog.url, with_bus=False)
    lamp, bulb = await catalog.add("Lamp", "10.00"), await catalog.add("Bulb", "1.25")
    me = first.shopper()
    await me.put(lamp, 1)
    await me.put(bulb, 2)
    await catalog.change(lamp, price="9.50")
    assert (await me.checkout("k")).status == 409  # takes the new price and notes it
    order_id = (await (await me.checkout("k")).json())["order_id"]
    cart = await me.get()

    second = await make_shop(catalog.url, with_bus=False)  # another process on the same database
    again = second.shopper(me.sub)
    assert await again.get() == cart
    assert cart["notes"][0]["old_price"] == "10.00" and cart["total"] == "12.00"
    resp = await again.checkout("k")
    assert resp.status == 202 and (await resp.json())["order_id"] == order_id
    assert await second.outbox_rows() == 1


async def test_what_was_set_after_checkout_survives_a_restart_before_the_order_starts(make_shop, catalog):
    first = await make_shop(catalog.url, with_bus=False)
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me = first.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    order_id = (await (await me.checkout()).json())["order_id"]
    await me.put(lamp, 1)

    second = await make_shop(catalog.url)  # another process on the same database takes the event
    again = second.shopper(me.sub)
    await order_started(second, again, order_id)
    assert lines(await again.get()) == [(lamp, 1)]


async def test_a_price_the_event_applied_silently_is_still_409_once_at_checkout_on_any_instance(make_shop, catalog):
    """The catalog's event updates the line (with a note) while the customer is not looking: the checkout must
    not charge that price unseen. Another cart instance on the same database answers the same."""
    shop = await make_shop(catalog.url)
    other = await make_shop(catalog.url, with_bus=False)  # a second cart process
    lamp, bulb = await catalog.add("Lamp", "10.00"), await catalog.add("Bulb", "1.00")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)  # the customer last saw Lamp at 10.00
    await catalog.change(lamp, price="12.50")
    await catalog.settle()
    await shop.settle()
    info = await (
        await shop.client.get(
            f"/api/cart/admin/actors/cart/{me.sub}", headers=shop.identity.headers(shop.identity.admin_token())
        )
    ).json()
    assert info["state"]["lines"][lamp]["unit_price"] == "12.50"  # the event arrived and moved the line

    resp = await other.shopper(me.sub).checkout("k")
    assert resp.status == 409, await resp.text()
    problem = await resp.json()
    assert problem["price_changes"] == [
        {"product_id": lamp, "name": "Lamp", "old_price": "10.00", "new_price": "12.50"}
    ]
    assert await shop.outbox_rows() == 0

    confirmed = await me.checkout("k")  # the 409 showed the new price: this confirms it
    assert confirmed.status == 202, await confirmed.text()
    await shop.settle()
    [request] = shop.checkout_requests()
    assert [(line.product_id, line.unit_price) for line in request.lines] == [
        (lamp, Decimal("12.50")),
        (bulb, Decimal("1.00")),
    ]
    assert request.total == Decimal("26.00")


async def test_a_price_the_customer_has_looked_at_since_the_event_needs_no_confirmation(shop, catalog):
    lamp = await catalog.add("Lamp", "10.00")
    me = shop.shopper()
    await me.put(lamp, 1)
    await catalog.change(lamp, price="9.00")
    await catalog.settle()
    await shop.settle()
    cart = await me.get()  # the customer sees 9.00 and the note
    assert cart["lines"][0]["unit_price"] == "9.00" and cart["notes"][0]["old_price"] == "10.00"
    resp = await me.checkout()
    assert resp.status == 202, await resp.text()

    # A price that moved and moved back while the customer was away is the price they saw: no 409.
    await me.put(lamp, 2)
    await shop.publish(ProductPriceChanged(lamp, Decimal("9.00"), Decimal("15.00"), "USD"), session_id=lamp)
    await shop.settle()
    await catalog.change(lamp, price="15.00")
    await catalog.change(lamp, price="9.00")
    await catalog.settle()
    await shop.settle()
    resp = await me.checkout()
    assert resp.status == 202, await resp.text()
    await shop.settle()
    assert [line.unit_price for line in shop.checkout_requests()[-1].lines] == [Decimal("9.00")]


async def test_get_after_order_started_shows_the_emptied_cart_without_its_notes(shop, catalog):
    # (Two instances as a cluster: tests/cart/test_cart_cluster.py.)
    lamp = await catalog.add("Lamp", "10.00")
    me = shop.shopper()
    await me.put(lamp, 2)
    await catalog.change(lamp, price="11.00")
    await catalog.settle()
    await shop.settle()
    assert (await me.checkout()).status == 409  # the silently applied price, named once
    resp = await me.checkout()
    assert resp.status == 202
    order_id = (await resp.json())["order_id"]
    assert (await me.get())["notes"] != []

    await shop.publish(OrderStarted(order_id, me.sub, me.sub), session_id=order_id)
    await shop.settle()
    cart = await me.get()
    assert (cart["lines"], cart["notes"], cart["item_count"], cart["total"], cart["currency"]) == (
        [],
        [],
        0,
        "0.00",
        None,
    )
