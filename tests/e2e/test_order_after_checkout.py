"""``GET /api/orders/{id}`` right after the checkout's 202 answers the order, never 404 (issue 14, item 4).

Real catalog, cart and order services over HTTP on one memory bus (``tests/e2e/conftest.py``). The order may not be
recorded by the order service yet when the buyer asks; the cart's checkout record then answers for it
(:mod:`actors.order.checkouts`).
"""

from __future__ import annotations

import asyncio
import uuid

from actors.order import api
from actors.order import service as order_service
from bench.shop import free_port
from tests.order.conftest import stop_bounded

AFTER_202 = ("submitted", "awaiting_validation", "stock_confirmed", "paid", "cancelled")
BUYERS = 40  # checkouts in the loop
AT_ONCE = 8  # buyers checking out at the same time, so the order service is behind some of them


async def test_get_right_after_the_202_never_answers_404(make_shop):
    shop = await make_shop()
    product = await shop.add_product("Lamp", "9.99", stock=BUYERS * 2)
    gate = asyncio.Semaphore(AT_ONCE)
    answers: list[tuple[int, str]] = []

    async def one() -> None:
        buyer = shop.buyer()
        await buyer.put(product, 1)
        async with gate:
            order_id = await buyer.checkout()
            status, body = await buyer.order(order_id)  # at once: no wait between the 202 and the GET
        answers.append((status, body.get("status", body.get("type", ""))))
        assert status == 200, body
        assert body["id"] == order_id and body["buyer_id"] == buyer.sub
        assert body["lines"][0]["product_id"] == product and body["total"] == "9.99"

    async with asyncio.timeout(60):
        await asyncio.gather(*(one() for _ in range(BUYERS)))
    assert len(answers) == BUYERS
    assert all(status == 200 and order_status in AFTER_202 for status, order_status in answers), answers
    await shop.orders_settled()


async def test_an_order_not_recorded_yet_is_answered_from_the_cart(make_shop, settings):
    """The order service does not consume its queue (stopped), so the order cannot exist there: a reader still gets
    the order as ``submitted``, from the checkout record the 202 was based on; nobody else does."""
    shop = await make_shop()
    lamp, mug = await shop.add_product("Lamp", "9.99", stock=5), await shop.add_product("Mug", "4.50", stock=5)
    await stop_bounded("order", shop.clients.pop("order"))
    buyer = shop.buyer()
    await buyer.put(lamp, 2)
    await buyer.put(mug, 1)
    order_id = await buyer.checkout(token="tok_visa")

    # An order service reading the same database without consuming the queue: it has not recorded the order.
    reader = order_service.create_app(
        settings,
        database_url=shop.databases["order"],
        verifier=shop.identity.verifier(),
        cart_url=shop.cart_url,
    )
    await shop._serve("order", reader)
    status, order = await buyer.order(order_id)
    assert status == 200, order
    assert order["status"] == "submitted" and order["buyer_id"] == buyer.sub and order["total"] == "24.48"
    assert [h["status"] for h in order["history"]] == ["submitted"]
    assert {(line["name"], line["unit_price"], line["quantity"]) for line in order["lines"]} == {
        ("Lamp", "9.99", 2),
        ("Mug", "4.50", 1),
    }
    assert "tok_visa" not in str(order)  # the payment token is never kept by the cart nor shown
    # A buyer polling the pending order asks the cart once per ttl, not on every poll.
    lookups = reader[api.ORDERS].checkouts
    assert lookups is not None and lookups.lookups == 1
    assert (await buyer.order(order_id))[0] == 200 and lookups.lookups == 1

    # Another buyer, and an order id no cart knows: 404, as for any order that is not theirs.
    assert (await shop.buyer().order(order_id))[0] == 404
    assert (await buyer.order(str(uuid.uuid4())))[0] == 404


async def test_an_order_the_cart_cannot_be_asked_about_is_503_not_404(make_shop, settings):
    """Not recorded here and no cart instance answers: the service cannot tell, so it says so (503 with
    Retry-After, the caller retries) instead of claiming the order does not exist."""
    shop = await make_shop()
    lamp = await shop.add_product("Lamp", "9.99", stock=5)
    await stop_bounded("order", shop.clients.pop("order"))
    buyer = shop.buyer()
    await buyer.put(lamp, 1)
    order_id = await buyer.checkout()

    # The reader's cart is an address nobody listens on (a port taken and released: connections are refused).
    reader = order_service.create_app(
        settings,
        database_url=shop.databases["order"],
        verifier=shop.identity.verifier(),
        cart_url=f"http://127.0.0.1:{free_port()}",
    )
    await shop._serve("order", reader)
    for unknown_here in (order_id, str(uuid.uuid4())):
        status, body = await buyer.order(unknown_here)
        assert status == 503, body
        assert body["type"].endswith("/order-pending") and unknown_here in body["detail"]
    resp = await shop.clients["order"].get(f"/api/orders/{order_id}", headers=buyer.headers)
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
