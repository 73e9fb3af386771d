"""The service's OpenAPI document (aiohttp-apispec), without HEAD twins.

aiohttp adds a HEAD route for every GET route (``allow_head``) and aiohttp-apispec documents both with the
same handler, so every GET would appear twice. HEAD keeps working at runtime; the document lists the GET once.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apispec import setup_aiohttp_apispec

SPEC_URL = "/api/docs/swagger.json"


def drop_head_twins(doc: dict[str, Any]) -> dict[str, Any]:
    """Remove, in place, every ``head`` operation of a path that also documents ``get``; returns ``doc``."""
    for item in (doc.get("paths") or {}).values():
        if isinstance(item, dict) and "get" in item:
            item.pop("head", None)
    return doc


def setup_api_docs(app: web.Application, *, title: str, error_callback: Any) -> None:
    """``/api/docs`` (Swagger UI) and ``/api/docs/swagger.json`` of the application's documented routes."""
    setup_aiohttp_apispec(
        app,
        title=title,
        version="v1",
        url=SPEC_URL,
        swagger_path="/api/docs",
        static_path="/api/docs/static",
        error_callback=error_callback,
    )

    async def without_head_twins(app: web.Application) -> None:
        # after aiohttp-apispec's own start-up hook (appended just before) has built the document
        doc = app.get("swagger_dict")
        if isinstance(doc, dict):
            drop_head_twins(doc)

    app.on_startup.append(without_head_twins)
