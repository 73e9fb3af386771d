"""Many requests on one cart at once: the actor applies them one at a time, nothing is lost or torn."""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal

from actors.cart import repository


async def test_200_concurrent_puts_of_different_products_all_land(shop, catalog):
    products = await catalog.add_many(200, price="2.50")
    me = shop.shopper()

    await asyncio.gather(*(me.put(product_id, 1 + n % 3) for n, product_id in enumerate(products)))

    cart = await me.get()
    assert {line["product_id"] for line in cart["lines"]} == set(products)
    expected_items = sum(1 + n % 3 for n in range(200))
    assert cart["item_count"] == expected_items
    assert Decimal(cart["total"]) == Decimal("2.50") * expected_items
    assert await repository.products_in(shop.engine, me.sub) == set(products)


async def test_concurrent_puts_of_one_product_last_write_wins_and_the_cart_stays_consistent(shop, catalog):
    lamp = await catalog.add("Lamp", "3.00")
    me = shop.shopper()
    quantities = list(range(1, 51))

    replies = await asyncio.gather(*(me.put(lamp, q) for q in quantities))

    # Each reply is the cart right after that request's own turn: exactly what it asked for.
    for quantity, reply in zip(quantities, replies, strict=True):
        assert [(line["product_id"], line["quantity"]) for line in reply["lines"]] == [(lamp, quantity)]
        assert reply["total"] == f"{3 * quantity}.00"
    final = await me.get()
    [line] = final["lines"]
    # The last turn applied is the one whose reply was made last, so its quantity is the cart's.
    last = max(replies, key=lambda r: datetime.fromisoformat(r["updated_at"]))
    assert line["quantity"] == last["lines"][0]["quantity"]
    assert final["item_count"] == line["quantity"] and final["total"] == f"{3 * line['quantity']}.00"
    assert await repository.products_in(shop.engine, me.sub) == {lamp}

    await me.put(lamp, 7)  # and a later write simply wins
    assert (await me.get())["item_count"] == 7
