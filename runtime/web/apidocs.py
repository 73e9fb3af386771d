"""The service's OpenAPI document (aiohttp-apispec), without HEAD twins, with its bearer security scheme.

aiohttp adds a HEAD route for every GET route (``allow_head``) and aiohttp-apispec documents both with the
same handler, so every GET would appear twice. HEAD keeps working at runtime; the document lists the GET once.
Routes declared with :func:`runtime.web.endpoints.endpoint` that need a token name the ``bearer`` scheme.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apispec import setup_aiohttp_apispec

from runtime.web.endpoints import MIN_PROPERTIES

SPEC_URL = "/api/docs/swagger.json"
BEARER = {"type": "apiKey", "in": "header", "name": "Authorization", "description": "Bearer <access token>"}


def drop_head_twins(doc: dict[str, Any]) -> dict[str, Any]:
    """Remove, in place, every ``head`` operation of a path that also documents ``get``; returns ``doc``."""
    for item in (doc.get("paths") or {}).values():
        if isinstance(item, dict) and "get" in item:
            item.pop("head", None)
    return doc


def apply_body_min_properties(doc: dict[str, Any]) -> dict[str, Any]:
    """Move each operation's ``x-body-min-properties`` (set by :func:`runtime.web.endpoints.endpoint`) onto its
    body parameter's schema, where Swagger 2 can say it (aiohttp-apispec builds the parameter from the schema
    class, which has no such option); returns ``doc``."""
    for item in (doc.get("paths") or {}).values():
        for operation in item.values() if isinstance(item, dict) else ():
            if not isinstance(operation, dict) or MIN_PROPERTIES not in operation:
                continue
            least = operation.pop(MIN_PROPERTIES)
            for param in operation.get("parameters", []):
                if param.get("in") == "body":
                    param["schema"] = {"allOf": [param["schema"]], "minProperties": least}
    return doc


def _copy_declaration(declared: dict[str, Any]) -> dict[str, Any]:
    """A copy of a handler's aiohttp-apispec declaration that registering it cannot alter (it pops ``schemas``
    and extends ``parameters``); the schema objects themselves are shared."""
    out = dict(declared)
    for key in ("schemas", "parameters"):
        if key in out:
            out[key] = [dict(item) for item in out[key]]
    if "responses" in out:
        out["responses"] = {code: dict(value) for code, value in out["responses"].items()}
    return out


def setup_api_docs(app: web.Application, *, title: str, error_callback: Any) -> None:
    """``/api/docs`` (Swagger UI) and ``/api/docs/swagger.json`` of the application's documented routes."""

    async def fresh_declarations(app: web.Application) -> None:
        # before aiohttp-apispec's own start-up hook (appended just after), which consumes each handler's
        # declaration in place: a second app built from the same handlers (tests, two routes of one handler)
        # would otherwise get a document whose body schemas are missing.
        for route in app.router.routes():
            handler: Any = route.handler  # a function or web.View class carrying aiohttp-apispec's attributes
            declared = getattr(handler, "__apispec__", None)
            if not isinstance(declared, dict):
                continue
            pristine = getattr(handler, "__apispec_declared__", None)
            try:
                if pristine is None:
                    pristine = handler.__apispec_declared__ = _copy_declaration(declared)
                handler.__apispec__ = _copy_declaration(pristine)
            except AttributeError:  # a bound method: its function's declaration is only read
                continue

    app.on_startup.append(fresh_declarations)
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
            apply_body_min_properties(doc)
            doc.setdefault("securityDefinitions", {"bearer": BEARER})

    app.on_startup.append(without_head_twins)
