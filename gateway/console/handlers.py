"""The console's routes on the gateway: the page (``/admin``, ``/admin/callback``), its static files and two
admin-only JSON views that need the gateway's list of instances: ``/admin/api/cluster`` (each instance's
readiness and cluster members) and ``/admin/api/actors`` (each instance's live actors). See
:mod:`gateway.console` for what the page does."""

from __future__ import annotations

import asyncio
import html
from collections.abc import Sequence
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from config import Settings
from gateway.upstreams import BREAKER_STATES, Instance, Upstreams
from runtime.auth import authenticate, check_access
from runtime.routes import ADMIN, Route
from runtime.web.admin import _int_query
from runtime.web.responses import json_response

__all__ = ["CLIENT_ID", "PATH", "SECURITY_HEADERS", "add_console_routes", "admin_services"]

PATH = "/admin"
CLIENT_ID = "admin-console"  # seeded by identity (identity/seed.py)
READY_TIMEOUT = 2.0  # seconds for one instance's /health/ready, asked live for the cluster view

# Only this origin's script, style and fetches; nothing inline, no frames, no plugins, no base or form tricks.
# same-origin, not no-referrer: under no-referrer a browser sends ``Origin: null`` with same-origin POSTs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {"console.js": "text/javascript", "console.css": "text/css", "console.svg": "image/svg+xml"}


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def admin_services(routes: Sequence[Route]) -> dict[str, str]:
    """Service -> its admin endpoints' prefix at the gateway, from the route table: the routes whose
    ``/admin/actors`` is admin-only (``/api/order/admin``, not ``/api/orders/admin``, which is an order id)."""
    out: dict[str, str] = {}
    for route in routes:
        found = route.resolve("GET", "/admin/actors")
        if found is not None and found[0].access.roles == ADMIN.roles:
            out.setdefault(route.service, route.prefix + "/admin")
    return out


def add_console_routes(app: web.Application, settings: Settings, pool: Upstreams, routes: Sequence[Route]) -> None:
    """``/admin``, ``/admin/callback``, ``/admin/static/{name}``, ``/admin/api/{cluster,actors}`` on the gateway."""
    services = admin_services(routes)
    meta = {
        "ecom-client-id": CLIENT_ID,
        "ecom-public-url": settings.public_url,
        "ecom-redirect-uri": f"{settings.public_url}{PATH}/callback",
    }
    tags = "".join(f'<meta name="{name}" content="{html.escape(value)}">' for name, value in meta.items())
    page = _read("console.html").replace("<!--ecom-meta-->", tags)
    files = {name: _read(name) for name in STATIC}

    async def console_page(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)

    async def static_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return web.Response(text=files[name], content_type=STATIC[name], charset="utf-8", headers=headers)

    async def cluster(request: web.Request) -> web.Response:
        await require_console_admin(request, settings)
        assert pool.session is not None  # started with the gateway
        session = pool.session
        # every instance at once: one that does not answer costs its timeout once, not once per service
        asked = await asyncio.gather(
            *(asyncio.gather(*(_instance(session, i) for i in s.instances)) for s in pool.services.values())
        )
        body: dict[str, Any] = {"gateway": {"public_url": settings.public_url}, "services": []}
        for name, instances in zip(pool.services, asked, strict=True):
            members = sorted({m for i in instances for m in (i["members"] or [])})
            body["services"].append(
                {"name": name, "admin": services.get(name), "instances": instances, "members": members}
            )
        return json_response(body)

    async def actors(request: web.Request) -> web.Response:
        """Every instance's live actors: each process holds its own, so the gateway asks them all (with the
        caller's token, which each service checks again) instead of the one a balanced request would reach."""
        await require_console_admin(request, settings)
        assert pool.session is not None
        session = pool.session
        limit = _int_query(request, "limit", 50, 0, 1000)
        token = request.headers.get("Authorization")
        chosen = [(name, prefix) for name, prefix in services.items() if name in pool.services]
        asked = await asyncio.gather(
            *(
                asyncio.gather(
                    *(
                        _admin_get(session, i, f"{prefix}/actors?limit={limit}", token)
                        for i in pool.services[name].instances
                    )
                )
                for name, prefix in chosen
            )
        )
        body = {
            "services": [
                {"name": name, "admin": prefix, "instances": answers}
                for (name, prefix), answers in zip(chosen, asked, strict=True)
            ]
        }
        return json_response(body)

    app.router.add_get(PATH, console_page)
    app.router.add_get(f"{PATH}/callback", console_page)  # the redirect URI: the page finishes the sign-in
    app.router.add_get(f"{PATH}/static/{{name}}", static_file)
    app.router.add_get(f"{PATH}/api/cluster", cluster)
    app.router.add_get(f"{PATH}/api/actors", actors)


async def require_console_admin(request: web.Request, settings: Settings) -> None:
    """The gateway's ADMIN policy (admin role and the ``ecom`` scope), or the local-only open setting."""
    if settings.general.admin_open:
        return
    check_access(await authenticate(request), roles=ADMIN.roles, scopes=ADMIN.scopes)


async def _instance(session: aiohttp.ClientSession, inst: Instance) -> dict[str, Any]:
    """One instance as the gateway sees it, with its own readiness answer (asked now, not cached)."""
    out: dict[str, Any] = {
        "url": inst.url,
        "healthy": inst.healthy,
        "breaker": BREAKER_STATES[inst.breaker.state],
        "in_flight": inst.in_flight,
        "ready": None,
        "checks": {},
        "self": None,
        "members": None,  # None: the instance runs without cluster membership (one process per service)
        "error": None,
    }
    try:
        async with session.get(f"{inst.url}/health/ready", timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT)) as resp:
            answer = await resp.json(content_type=None)
            out["ready"] = resp.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a body not JSON
        out.update(ready=False, error=type(exc).__name__)
        return out
    if isinstance(answer, dict):
        checks = answer.get("checks")
        out["checks"] = checks if isinstance(checks, dict) else {}
        cluster = answer.get("cluster")
        if isinstance(cluster, dict):
            out["self"] = cluster.get("self")
            members = cluster.get("members")
            out["members"] = [m for m in members if isinstance(m, str)] if isinstance(members, list) else None
    return out


async def _admin_get(session: aiohttp.ClientSession, inst: Instance, path: str, token: str | None) -> dict[str, Any]:
    """One instance's answer to an admin GET: ``{url, status, body, error}`` (a failure is reported, not raised:
    one instance down must not hide the others)."""
    out: dict[str, Any] = {"url": inst.url, "status": None, "body": None, "error": None}
    headers = {"Authorization": token} if token else {}
    try:
        async with session.get(
            f"{inst.url}{path}", headers=headers, timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT * 2)
        ) as resp:
            out["status"] = resp.status
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a body not JSON
        out["error"] = type(exc).__name__
        return out
    if resp.status == 200:
        out["body"] = answer
    else:
        detail = answer.get("detail") if isinstance(answer, dict) else None
        out["error"] = f"answered {resp.status}" + (f": {detail}" if isinstance(detail, str) else "")
    return out
