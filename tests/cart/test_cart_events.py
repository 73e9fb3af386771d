"""Events and time: catalog price changes reach every cart holding the product; untouched carts expire."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from actors.cart import repository
from actors.cart.actor import EXPIRY_REMINDER, CartActor
from contracts.catalog import ProductPriceChanged
from contracts.checkout import OrderStarted
from runtime.host import AppKeyRuntime
from tests.cart.conftest import eventually


async def test_a_catalog_price_change_reaches_every_cart_holding_the_product(shop, catalog):
    lamp, bulb = await catalog.add("Lamp", "10.00"), await catalog.add("Bulb", "1.00")
    alice, bob, carol = shop.shopper(), shop.shopper(), shop.shopper()
    await alice.put(lamp, 2)
    await bob.put(lamp, 1)
    await bob.put(bulb, 4)
    await carol.put(bulb, 1)
    carol_before = await carol.get()

    await catalog.change(lamp, price="8.00")  # the catalog publishes ProductPriceChanged through its outbox
    await catalog.settle()
    await shop.settle()

    for who, total in ((alice, "16.00"), (bob, "12.00")):
        cart = await who.get()
        line = next(line for line in cart["lines"] if line["product_id"] == lamp)
        assert line["unit_price"] == "8.00" and cart["total"] == total
        [note] = cart["notes"]
        assert (note["product_id"], note["old_price"], note["new_price"]) == (lamp, "10.00", "8.00")
        assert note["message"] == "The price of Lamp dropped from 10.00 to 8.00 USD."
    assert await carol.get() == carol_before


async def test_price_events_apply_once_and_a_note_keeps_the_first_price(shop, catalog):
    lamp = await catalog.add("Lamp", "10.00")
    me = shop.shopper()
    await me.put(lamp, 1)
    event = await shop.publish(ProductPriceChanged(lamp, Decimal("10.00"), Decimal("11.00"), "USD"), session_id=lamp)
    await shop.bus.publish(event)  # the same message again, as after a relay crash
    await shop.settle()
    cart = await me.get()
    assert cart["lines"][0]["unit_price"] == "11.00"
    assert [(n["old_price"], n["new_price"]) for n in cart["notes"]] == [("10.00", "11.00")]

    await shop.publish(ProductPriceChanged(lamp, Decimal("11.00"), Decimal("12.00"), "USD"), session_id=lamp)
    await shop.settle()
    assert [(n["old_price"], n["new_price"]) for n in (await me.get())["notes"]] == [("10.00", "12.00")]

    await shop.publish(ProductPriceChanged(lamp, Decimal("12.00"), Decimal("10.00"), "USD"), session_id=lamp)
    await shop.settle()
    cart = await me.get()
    assert cart["lines"][0]["unit_price"] == "10.00" and cart["notes"] == []  # back where it was: nothing to tell
    assert await shop.bus.dead_letters("cart") == []


async def test_a_cart_unchanged_for_the_expiry_time_is_emptied_by_its_reminder(make_shop, catalog):
    # 2 s expiry, the busy cart changed at 0.6 s: 1.4 s of margin for that PUT on a loaded CI machine (with 1 s,
    # a PUT slower than 0.4 s found the cart already expired)
    shop = await make_shop(catalog.url, cart_expiry=2.0)
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    idle, busy = shop.shopper(), shop.shopper()
    await idle.put(lamp, 1)
    await busy.put(lamp, 1)
    await asyncio.sleep(0.6)
    await busy.put(bulb, 1)  # a change moves the deadline

    await eventually(lambda: _is_empty(idle), timeout=8)
    assert await repository.products_in(shop.engine, idle.sub) == set()
    store = shop.client.app[AppKeyRuntime].store
    assert await store.reminders_of(CartActor.type_name, idle.sub) == []
    # The first deadline of the busy cart has passed too: its reminder fired and waited for the new one.
    assert len((await busy.get())["lines"]) == 2
    [reminder] = await store.reminders_of(CartActor.type_name, busy.sub)
    assert reminder.name == EXPIRY_REMINDER
    await eventually(lambda: _is_empty(busy), timeout=8)

    await idle.put(bulb, 2)  # an expired cart is an ordinary empty cart again
    assert (await idle.get())["item_count"] == 2


async def test_a_line_set_after_an_expiry_stays_when_an_earlier_checkout_starts(make_shop, catalog):
    shop = await make_shop(catalog.url, cart_expiry=1.0)
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    me = shop.shopper()
    await me.put(lamp, 2)
    await me.put(bulb, 1)
    resp = await me.checkout()
    assert resp.status == 202, await resp.text()
    order_id = (await resp.json())["order_id"]
    await eventually(lambda: _is_empty(me), timeout=5)  # expired; the checkout awaiting its order is kept

    await me.put(lamp, 1)
    await shop.publish(OrderStarted(order_id, me.sub, me.sub), session_id=order_id)
    await shop.settle()
    assert [(line["product_id"], line["quantity"]) for line in (await me.get())["lines"]] == [(lamp, 1)]


async def _is_empty(shopper) -> bool:
    return (await shopper.get())["lines"] == []
