"""The admin endpoints, open only to the admin role (or to anyone when ``ECOM_ADMIN_OPEN=true``, for a local
single-user setup):

- actors: ``<prefix>/actors`` and ``<prefix>/actors/{type}/{id}`` (the types the service's description
  declares, :mod:`runtime.description`);
- traces: ``<prefix>/traces?order_id=|trace_id=``, the recent spans of this process
  (:func:`runtime.tracing.recent_spans`);
- dead letters of the service's queues and subscriptions (:mod:`runtime.deadletters`; replay and discard are
  written to the audit log with the token's user):

    GET    <prefix>/dead-letters                          per queue/subscription: kind and count
    GET    <prefix>/dead-letters/{queue}?page=&page_size= the dead letters, oldest first (paged)
    GET    <prefix>/dead-letters/{queue}/{message_id}     one, with body, headers and reason
    POST   <prefix>/dead-letters/{queue}/{message_id}/replay   back through the outbox, same message id (202)
    DELETE <prefix>/dead-letters/{queue}/{message_id}     discard it (200, the discarded letter)

- the audit log (:mod:`runtime.audit`): ``GET <prefix>/audit?limit=&action=``, newest first.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from runtime.errors import Forbidden, NotFound, ValidationProblem
from runtime.web.resources import AppKeyRuntime, ServiceRuntime
from runtime.web.responses import json_response

_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")

__all__ = [
    "add_admin_routes",
    "add_dead_letter_routes",
    "admin_actor",
    "admin_actors",
    "admin_audit",
    "admin_traces",
    "require_admin",
]


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


def actor_types(runtime: ServiceRuntime) -> list[str]:
    """The actor types the service declares (its description), else those its actor system knows."""
    if runtime.description is not None:
        return list(runtime.description.actor_types)
    return list(runtime.system.actor_types()) if runtime.system is not None else []


async def admin_actors(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    system = runtime.system
    limit = _int_query(request, "limit", 100, 0, 10_000)
    live = system.introspect(limit=limit) if system else {}
    empty = {"live": 0, "mailbox_depth": 0, "handled": 0, "actors": []}
    types = {name: live.get(name, empty) for name in actor_types(runtime)}
    body: dict[str, Any] = {"service": runtime.name, "types": types}
    body["cluster"] = runtime.cluster.describe() if runtime.cluster is not None else None
    return json_response(body)


async def admin_actor(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    system = runtime.system
    type_name, actor_id = request.match_info["type"], request.match_info["id"]
    if system is None or type_name not in actor_types(runtime):
        raise NotFound(f"this service has no actor type {type_name!r}")
    info = await system.inspect(type_name, actor_id)
    if info is None:
        raise NotFound(f"no {type_name} actor {actor_id!r} exists")
    return json_response(info)


async def admin_traces(request: web.Request) -> web.Response:
    """``?trace_id=`` (32 hex digits) or ``?order_id=``: the buffered spans of that trace, or of every trace that
    touched the order; neither: the most recent spans. ``limit`` caps the spans (newest kept)."""
    await require_admin(request)
    from runtime import tracing

    trace_id, order_id = request.query.get("trace_id"), request.query.get("order_id")
    if trace_id is not None and not _TRACE_ID.fullmatch(trace_id):
        raise ValidationProblem.field("trace_id", "must be 32 hexadecimal digits")
    if order_id is not None and not 0 < len(order_id) <= 200:
        raise ValidationProblem.field("order_id", "must be 1 to 200 characters")
    limit = _int_query(request, "limit", 1000, 0, 100_000)
    return json_response(tracing.recent_spans(trace_id=trace_id, order_id=order_id, limit=limit))


def add_admin_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/actors", admin_actors)
    app.router.add_get(f"{prefix}/actors/{{type}}/{{id}}", admin_actor)
    app.router.add_get(f"{prefix}/traces", admin_traces)
    add_dead_letter_routes(app, prefix)


# -- dead letters ---------------------------------------------------------------------------------


def add_dead_letter_routes(app: web.Application, prefix: str) -> None:
    base = f"{prefix}/dead-letters"
    app.router.add_get(base, admin_dead_letter_queues)
    app.router.add_get(f"{base}/{{queue}}", admin_dead_letters)
    app.router.add_get(f"{base}/{{queue}}/{{message_id}}", admin_dead_letter)
    app.router.add_post(f"{base}/{{queue}}/{{message_id}}/replay", admin_replay_dead_letter)
    app.router.add_delete(f"{base}/{{queue}}/{{message_id}}", admin_discard_dead_letter)
    app.router.add_get(f"{prefix}/audit", admin_audit)


async def admin_audit(request: web.Request) -> web.Response:
    """The service's audit log, newest first: ``limit`` (1-1000, default 100), ``action`` (exact)."""
    from runtime import audit

    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    limit = _int_query(request, "limit", 100, 1, 1000)
    action = request.query.get("action") or None
    items = await audit.entries(runtime.engine, limit=limit, action=action) if runtime.engine is not None else []
    return json_response({"service": runtime.name, "items": items})


async def _operator(request: web.Request) -> Any:
    """Who is acting, for the audit log (after require_admin): the token's email, else its subject."""
    from runtime.auth import optional_principal
    from runtime.deadletters import Operator
    from runtime.errors import Problem

    runtime = request.app[AppKeyRuntime]
    anonymous = Operator("anonymous (ECOM_ADMIN_OPEN)", "api")
    if runtime.settings.general.admin_open:
        # Open: nobody had to show a token; one that verifies still names its user in the audit log.
        if runtime.verifier is None:
            return anonymous
        try:
            principal = await optional_principal(request)
        except Problem:
            return anonymous
    else:
        principal = await optional_principal(request)  # verified by require_admin already
    if principal is None:
        return anonymous
    email = principal.claims.get("email")
    name = f"{email} ({principal.sub})" if isinstance(email, str) and email else principal.sub
    return Operator(name, "api")


def _dead_letter_admin(request: web.Request) -> Any:
    from runtime.deadletters import DeadLetterAdmin

    runtime = request.app[AppKeyRuntime]
    if runtime.bus is None or runtime.engine is None:
        raise NotFound(f"the {runtime.name} service has no bus queues, so no dead letters")
    return DeadLetterAdmin(runtime.name, runtime.engine, runtime.bus, relay=runtime.relay)


async def admin_dead_letter_queues(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    if runtime.bus is None or runtime.engine is None:
        return json_response({"service": runtime.name, "bus": None, "queues": [], "total": 0})
    queues = await _dead_letter_admin(request).summary()
    total = sum(q["count"] for q in queues)
    return json_response({"service": runtime.name, "bus": runtime.bus.name, "queues": queues, "total": total})


async def admin_dead_letters(request: web.Request) -> web.Response:
    from runtime.deadletters import letter_summary

    await require_admin(request)
    page = _int_query(request, "page", 1, 1, 1_000_000)
    page_size = _int_query(request, "page_size", 20, 1, 500)
    letters = await _dead_letter_admin(request).list(request.match_info["queue"])
    start = (page - 1) * page_size
    items = [letter_summary(letter) for letter in letters[start : start + page_size]]
    return json_response({"items": items, "page": page, "page_size": page_size, "total": len(letters)})


async def admin_dead_letter(request: web.Request) -> web.Response:
    from runtime.deadletters import letter_json

    await require_admin(request)
    letter = await _dead_letter_admin(request).show(request.match_info["queue"], request.match_info["message_id"])
    return json_response(letter_json(letter))


async def admin_replay_dead_letter(request: web.Request) -> web.Response:
    await require_admin(request)
    operator = await _operator(request)
    result = await _dead_letter_admin(request).replay(
        request.match_info["queue"], request.match_info["message_id"], operator
    )
    return json_response(result, status=202)


async def admin_discard_dead_letter(request: web.Request) -> web.Response:
    from runtime.deadletters import letter_json

    await require_admin(request)
    operator = await _operator(request)
    letter = await _dead_letter_admin(request).discard(
        request.match_info["queue"], request.match_info["message_id"], operator
    )
    return json_response({"status": "discarded", **letter_json(letter)})


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
