"""A small real HTTP server that answers the catalog's batch endpoint, for the failure cases a real catalog will
not produce on demand: 5xx answers, answers slower than the cart's timeout, unreadable bodies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeCatalog:
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str = "ok"  # "ok" | "error" (503) | "slow" (longer than the cart's timeout) | "garbage"
    delay: float = 5.0
    calls: int = 0

    def add(self, product_id: str, *, name: str = "Fake Lamp", price: str = "10.00", stock: int = 50) -> None:
        self.products[product_id] = {
            "id": product_id,
            "name": name,
            "price": price,
            "currency": "USD",
            "picture_url": None,
            "available_stock": stock,
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/catalog/products/batch", self._batch)
        return app

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if self.mode == "error":
            return web.json_response({"title": "down for maintenance"}, status=503)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "garbage":
            return web.Response(text="<html>proxy error</html>", content_type="text/html")
        ids = request.query.get("ids", "").split(",")
        return web.json_response({"items": [self.products[i] for i in ids if i in self.products]})
