"""The order service's memory of the cart's answers about orders it has not recorded yet (actors.order.checkouts):
reused for ``ttl`` seconds, and only that long kept, against a real cart-like HTTP server."""

from __future__ import annotations

import asyncio

from aiohttp import web

from actors.order.checkouts import CHECKOUT_PATH, AcceptedCheckouts


async def test_answers_are_reused_within_the_ttl_and_dropped_after_it(aiohttp_server) -> None:
    asked: list[str] = []

    async def checkout(request: web.Request) -> web.Response:
        asked.append(request.match_info["order_id"])
        return web.json_response({"started": False, "order": {"order_id": request.match_info["order_id"]}})

    app = web.Application()
    app.router.add_get(CHECKOUT_PATH + "{order_id}", checkout)
    server = await aiohttp_server(app)
    checkouts = AcceptedCheckouts(str(server.make_url("")).rstrip("/"), ttl=0.2)
    await checkouts.start()
    try:
        for order_id in ("o1", "o2", "o3"):
            found = await checkouts.find(order_id, "Bearer t")
            assert found is not None and found.order == {"order_id": order_id}
        await checkouts.find("o1", "Bearer t")
        assert asked == ["o1", "o2", "o3"], "the answer is reused within the ttl"
        await asyncio.sleep(0.3)
        await checkouts.find("o4", "Bearer t")
        assert len(checkouts._kept) == 1, "expired answers leave as new ones come"
        await checkouts.find("o1", "Bearer t")
        assert asked[-1] == "o1", "an expired answer is asked again"
    finally:
        await checkouts.close()
