"""The gateway service: ``create_app(settings)`` wires the route table, upstreams, token verifier, rate limiter,
CORS, access log and merged docs onto the shared host (health, metrics, request ids, problem+json).

The gateway has no database and no actors (``SCHEMA = None``). Its readiness says whether any upstream instance
can serve; per-instance health and breaker state are in ``/metrics`` (admin token required on this port).
With a bus (``ecom run`` / ``ecom serve`` pass the process's), it hears identity's revocation announcements.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from config import Settings
from gateway.callback import PATH as CALLBACK_PATH
from gateway.callback import callback_page
from gateway.console import add_console_routes
from gateway.docs import SPEC_PATH, DocsMerger
from gateway.edge import Cors, access_log_middleware
from gateway.metrics import GatewayCollector
from gateway.options import GatewayOptions, gateway_options
from gateway.proxy import RouteProxy
from gateway.ratelimit import AuthLimits, make_limiter
from gateway.routes import ROUTES, Route, services_of
from gateway.upstreams import Upstreams
from runtime import host, revocation
from runtime.auth import TokenVerifier, bearer_token, check_access
from runtime.errors import NotFound
from runtime.host import ServiceRuntime, json_response, make_verifier

SCHEMA = None

UPSTREAMS_KEY: web.AppKey[Upstreams] = web.AppKey("gateway_upstreams", Upstreams)


def create_app(
    settings: Settings,
    *,
    bus: Any = None,  # the process's bus (``ecom run``/``ecom serve`` pass it): revocation announcements
    verifier: Any = None,
    upstreams: Mapping[str, str | Sequence[str]] | None = None,
    redis_url: str | None = None,
    options: GatewayOptions | None = None,
    routes: Sequence[Route] = ROUTES,
) -> web.Application:
    """The gateway application.

    ``upstreams`` overrides the instances per service (``{"catalog": ["http://127.0.0.1:8002", ...]}``);
    ``redis_url`` overrides ``options.redis_url`` (shared rate limits); ``options`` default to the ``[gateway]`` settings.
    """
    opts = options if options is not None else gateway_options(settings)
    if redis_url is not None:
        opts = dataclasses.replace(opts, redis_url=redis_url)
    runtime = ServiceRuntime(
        name="gateway", settings=settings, verifier=verifier if verifier is not None else make_verifier(settings)
    )
    pool = Upstreams.from_settings(settings, services_of(routes), opts, upstreams)
    limiter = make_limiter(opts.rate_limit, opts.rate_burst, opts.redis_url)
    auth_limits = AuthLimits(opts.rate_limit, opts.rate_burst) if opts.rate_limit > 0 else None
    docs = DocsMerger(routes, pool, ttl=opts.docs_ttl)

    async def merged_docs(_request: web.Request) -> web.Response:
        return json_response(await docs.document())

    def add_routes(app: web.Application) -> None:
        # Registered before the host's own docs route for the same path, so this one answers.
        app.router.add_get(SPEC_PATH, merged_docs)
        app.router.add_get(CALLBACK_PATH, callback_page)  # the web storefront's redirect URI (gateway/callback.py)
        add_console_routes(app, settings, pool, routes)  # /admin: the admin console (gateway/console/)
        for route in routes:
            handler = RouteProxy(route, pool.services[route.service], runtime.verifier, limiter, opts, auth_limits)
            app.router.add_route("*", route.prefix + "{tail:(/.*)?}", handler.handle)

    middlewares: list[Any] = [admin_metrics_middleware(runtime.verifier)]
    if opts.access_log:
        middlewares.append(access_log_middleware)
    cors = Cors(opts.origins) if opts.origins else None
    if cors is not None:
        middlewares.append(cors.preflight)

    revocations: list[Any] = []  # the consumer of identity's revocation announcements, while running

    async def start() -> None:
        await pool.start()
        if bus is not None:
            # A revoked signing key or a signed-out/locked user is refused here within a bus hop, cached
            # verifications included (runtime/revocation.py).
            revocations.append(await revocation.listen(bus, runtime.verifier))
        _freeze_startup_objects()

    async def stop() -> None:
        while revocations:
            await revocations.pop().stop()
        await pool.close()
        if limiter is not None:
            await limiter.close()

    runtime.on_start.append(start)
    runtime.on_stop.append(stop)
    runtime.ready_checks["upstreams"] = pool.ready

    app = host.create_app(
        runtime,
        routes=add_routes,
        title="EcomGateway API",
        client_max_size=opts.max_body,
        extra_middlewares=middlewares,
    )
    app[UPSTREAMS_KEY] = pool
    if cors is not None:
        app.on_response_prepare.append(cors.on_response_prepare)
    # the host's registry serves /metrics; the gateway's families are read from its objects when scraped
    host.metrics_registry(app).register(GatewayCollector(pool, limiter))
    return app


def admin_metrics_middleware(verifier: TokenVerifier) -> Any:
    """``/metrics`` on the public port is for admins only: 404 without a token (its existence is not
    advertised), 401 for an invalid one, 403 without the admin role. Prometheus scrapes with an admin token."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/metrics":
            token = bearer_token(request)
            if token is None:
                raise NotFound("no route for " + request.path)
            principal = verifier.verify_cached(token) or await verifier.verify(token)
            check_access(principal, roles=("admin",))
        return await handler(request)

    return guard


_frozen = False


def _freeze_startup_objects() -> None:
    """Everything built at start-up (modules, routes, schemas: ~100k objects) lives as long as the process: move
    it out of the cyclic collector's reach, whose full passes over it otherwise land in the tail latency. Once
    per process (a test run starts many gateways), after a collection so no garbage is frozen with it."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()
