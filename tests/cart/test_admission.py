"""Checkout admission: while orders or unsent messages pile up beyond the limits, checkout is 503 + Retry-After
and changes nothing; below them it is 202 again. The order service's load comes from real HTTP servers answering
its ``/api/order/internal/load`` contract; the cart's own outbox backlog from its real database."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiohttp import web

from actors.cart import api
from actors.cart.admission import DEFAULT_TTL
from runtime.host import AppKeyRuntime


def _limits(settings, *, open_orders: int = 1000, outbox: int = 1000):
    return settings.replace(
        shop=dataclasses.replace(settings.shop, max_open_orders=open_orders, max_outbox_backlog=outbox)
    )


async def _next_measurement() -> None:
    await asyncio.sleep(DEFAULT_TTL + 0.1)  # the cached measurement is old: the next checkout measures again


async def _refused(resp, limit: str) -> dict:
    assert resp.status == 503, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert 1 <= int(resp.headers["Retry-After"]) <= 5
    problem = await resp.json()
    assert problem["type"].endswith("/checkout-overloaded") and problem["limit"] == limit, problem
    assert "nothing was changed" in problem["detail"] and "order_id" not in problem
    return problem


async def test_checkout_is_refused_while_the_order_service_is_over_a_limit_and_changes_nothing(
    make_shop, catalog, settings, order_load, make_order_load
):
    second = await make_order_load()  # two order instances: the larger of their numbers counts
    shop = await make_shop(
        catalog.url, settings=_limits(settings, open_orders=3, outbox=5), order_url=f"{order_load.url},{second.url}"
    )
    lamp = await catalog.add("Lamp", "10.00")
    me = shop.shopper()
    await me.put(lamp, 2)
    before = await me.get()

    order_load.open_orders, second.open_orders = 1, 4  # one instance over the limit of 3
    problem = await _refused(await me.checkout(), "max_open_orders")
    assert (problem["current"], problem["maximum"], problem["setting"]) == (4, 3, "ECOM_SHOP_MAX_OPEN_ORDERS")
    await _refused(await me.checkout("new-key"), "max_open_orders")
    await shop.settle()
    assert await shop.outbox_rows() == 0 and shop.orders == [] and await me.get() == before

    second.open_orders, second.outbox_backlog = 3, 6  # at the open-order limit (fine), over the backlog limit
    await _next_measurement()
    await _refused(await me.checkout(), "max_outbox_backlog")

    second.outbox_backlog = 5  # both at their limits, none over: admitted
    await _next_measurement()
    accepted = await me.checkout("k")
    assert accepted.status == 202, await accepted.text()
    order_id = (await accepted.json())["order_id"]

    second.open_orders = 50  # overloaded again: a retry of the accepted checkout still learns its order...
    await _next_measurement()
    again = await me.checkout("k")
    assert again.status == 202 and (await again.json())["order_id"] == order_id
    assert again.headers["Idempotent-Replayed"] == "true"
    await _refused(await me.checkout("another-key"), "max_open_orders")  # ...but nothing new starts
    await shop.settle()
    assert await shop.outbox_rows() == 1 and len(shop.checkout_requests()) == 1
    assert order_load.calls >= 4 and second.calls >= 4  # both instances were asked


async def test_the_load_is_measured_once_per_interval_not_per_checkout(make_shop, catalog, order_load):
    shop = await make_shop(catalog.url, with_bus=False)
    lamp = await catalog.add("Lamp")
    shoppers = [shop.shopper() for _ in range(10)]
    for shopper in shoppers:
        await shopper.put(lamp, 1)
    order_load.calls = 0
    responses = await asyncio.gather(*(s.checkout() for s in shoppers))
    assert [r.status for r in responses] == [202] * 10
    assert order_load.calls == 1  # ten checkouts at once shared one measurement


async def test_an_unreachable_order_service_does_not_block_checkout_but_the_local_outbox_backlog_does(
    make_shop, catalog, settings, order_load
):
    gone = order_load.url
    await order_load.server.close()  # the order service is gone: its load is unknown
    shop = await make_shop(catalog.url, settings=_limits(settings, open_orders=1, outbox=2), order_url=gone)
    relay = shop.client.app[AppKeyRuntime].relay
    await relay.stop()  # messages stop leaving the cart (a bus outage): its outbox grows
    lamp = await catalog.add("Lamp")
    shoppers = [shop.shopper() for _ in range(4)]
    for shopper in shoppers:
        await shopper.put(lamp, 1)

    for shopper in shoppers[:3]:  # unknown order load: admitted; each leaves one unsent CheckoutRequested
        resp = await shopper.checkout()
        assert resp.status == 202, await resp.text()
        await _next_measurement()
    assert await shop.outbox_rows() == 3
    late = shoppers[3]
    before = await late.get()
    problem = await _refused(await late.checkout(), "max_outbox_backlog")
    assert (problem["current"], problem["maximum"]) == (3, 2)
    assert await shop.outbox_rows() == 3 and await late.get() == before

    relay.start()  # the bus is back: the backlog drains and checkouts are taken again
    await shop.settle()
    await _next_measurement()
    resp = await late.checkout()
    assert resp.status == 202, await resp.text()
    assert shop.client.app[api.CART].admission.refused == 1


@pytest.mark.parametrize(
    "answer", [{"open_orders": "many"}, ["not", "an", "object"], {"open_orders": -1, "outbox_backlog": 0}]
)
async def test_a_load_answer_that_is_not_the_contract_is_ignored(make_shop, catalog, aiohttp_server, answer):
    async def load(_request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/api/order/internal/load", load)
    server = await aiohttp_server(app)
    shop = await make_shop(catalog.url, order_url=str(server.make_url("")).rstrip("/"))
    me = shop.shopper()
    await me.put(await catalog.add("Lamp"), 1)
    resp = await me.checkout()
    assert resp.status == 202, await resp.text()


async def test_checkouts_in_flight_count_against_the_open_order_limit_until_their_order_starts(settings):
    """A checkout accepted here is not in the order service's count until its order actor handled the request (it
    waits in the outbox and the bus meanwhile): it counts as in flight until OrderStarted, or IN_FLIGHT_TTL at most."""
    from actors.cart.admission import IN_FLIGHT_TTL, Admission, CheckoutOverloaded, Load

    now = [1000.0]
    admission = Admission(None, None, _limits(settings, open_orders=3).shop, clock=lambda: now[0])  # type: ignore[arg-type]
    admission._load = Load(cart_outbox=0, open_orders=2, order_outbox=0, measured_at=now[0])
    await admission.check()
    admission.accepted("o1")
    await admission.check()  # 2 open + 1 in flight: at the limit, not over
    admission.accepted("o2")
    with pytest.raises(CheckoutOverloaded):
        await admission.check()
    admission.started("o1")
    await admission.check()
    admission.accepted("o3")
    admission._load = Load(cart_outbox=0, open_orders=None, order_outbox=0, measured_at=now[0])
    await admission.check()  # the order load unknown: never a refusal on its own
    now[0] += IN_FLIGHT_TTL + 1  # OrderStarted never seen here (another cluster instance took it): forgotten
    admission._load = Load(cart_outbox=0, open_orders=3, order_outbox=0, measured_at=now[0])
    assert admission.in_flight == 0
    await admission.check()
