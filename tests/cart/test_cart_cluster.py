"""Two cart instances as a cluster on one database: the cart emptied by ``OrderStarted`` is what ``GET /api/cart``
answers on either instance, whichever of them the bus handed the event to."""

from __future__ import annotations

import dataclasses

from aiohttp.test_utils import TestClient, TestServer

from actors.cart import service as cart_service
from contracts.checkout import OrderStarted
from runtime.host import AppKeyRuntime
from tests.cart.conftest import ADDRESS, PAYMENT, Shop, eventually, migrate
from tests.support.cluster import free_base_port


async def test_order_started_empties_the_cart_that_get_shows_on_every_instance(
    bus, settings, db_url, catalog, order_load, test_identity
):
    await migrate(db_url, cart_service.SCHEMA)
    base = free_base_port(2)  # fixed ports below the ephemeral range: each instance advertises its own address
    shops: list[Shop] = []
    try:
        for port in (base, base + 1):
            cluster = dataclasses.replace(
                settings.cluster,
                enabled="true",
                advertise_url=f"http://127.0.0.1:{port}",
                heartbeat_interval=0.1,
                member_timeout=0.5,
            )
            app = cart_service.create_app(
                settings.replace(cluster=cluster),
                bus=bus,
                database_url=db_url,
                verifier=test_identity.verifier(),
                catalog_url=catalog.url,
                order_url=order_load.url,
            )
            client = TestClient(TestServer(app, host="127.0.0.1", port=port))
            await client.start_server()
            shops.append(Shop(client, bus, test_identity))
        clusters = [s.client.app[AppKeyRuntime].cluster for s in shops]
        await eventually(lambda: _agree(clusters), what="both members see each other")

        lamp = await catalog.add("Lamp")
        # A customer whose cart lives on the second instance, served through the first (forwarded) and the second.
        sub = next(s for s in (f"customer-{n}" for n in range(1000)) if clusters[1].owns(s))
        first, second = shops[0].shopper(sub), shops[1].shopper(sub)
        await first.put(lamp, 2)
        assert (await second.get())["item_count"] == 2
        resp = await first.client.post(
            "/api/cart/checkout", json={"shipping_address": ADDRESS, "payment": PAYMENT}, headers=first.headers
        )
        assert resp.status == 202, await resp.text()
        order_id = (await resp.json())["order_id"]

        await shops[0].publish(OrderStarted(order_id, sub, sub), session_id=order_id)
        await bus.wait_idle(queues=["cart"])
        for shopper in (first, second):
            cart = await shopper.get()
            assert cart["lines"] == [] and cart["item_count"] == 0 and cart["total"] == "0.00", cart
        assert await bus.dead_letters("cart") == []
    finally:
        for shop in shops:
            await shop.client.close()


async def _agree(clusters) -> bool:
    return all(len(c.addresses) == 2 for c in clusters)
