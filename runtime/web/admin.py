"""The admin actor endpoints ``<prefix>/actors`` and ``<prefix>/actors/{type}/{id}``, open only to the
admin role (or to anyone when ``ECOM_ADMIN_OPEN=true``, for a local single-user setup)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from runtime.errors import Forbidden, NotFound, ValidationProblem
from runtime.web.resources import AppKeyRuntime
from runtime.web.responses import json_response

__all__ = ["add_admin_routes", "admin_actor", "admin_actors", "require_admin"]


async def require_admin(request: web.Request) -> None:
    """Admin endpoints: the admin role from a verified token, or the explicit local-only open setting."""
    runtime = request.app[AppKeyRuntime]
    if runtime.settings.general.admin_open:
        return
    if runtime.verifier is None:
        raise Forbidden(
            "admin endpoints are closed: no token verifier is configured for this service "
            "(set ECOM_ADMIN_OPEN=true only for a local, single-user setup)"
        )
    from runtime.auth import authenticate, check_access

    check_access(await authenticate(request), roles=("admin",))


async def admin_actors(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    system = runtime.system
    limit = _int_query(request, "limit", 100, 0, 10_000)
    body: dict[str, Any] = {"service": runtime.name, "types": system.introspect(limit=limit) if system else {}}
    body["cluster"] = runtime.cluster.describe() if runtime.cluster is not None else None
    return json_response(body)


async def admin_actor(request: web.Request) -> web.Response:
    await require_admin(request)
    system = request.app[AppKeyRuntime].system
    type_name, actor_id = request.match_info["type"], request.match_info["id"]
    if system is None or type_name not in set(system.actor_types()):
        raise NotFound(f"this service has no actor type {type_name!r}")
    info = await system.inspect(type_name, actor_id)
    if info is None:
        raise NotFound(f"no {type_name} actor {actor_id!r} exists")
    return json_response(info)


def add_admin_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/actors", admin_actors)
    app.router.add_get(f"{prefix}/actors/{{type}}/{{id}}", admin_actor)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationProblem.field(name, f"must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValidationProblem.field(name, f"must be between {low} and {high}")
    return value
