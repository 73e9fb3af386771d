"""The gateway service, declared (:data:`SERVICE`): the route table, upstreams, token verifier, rate limiter, CORS,
access log and merged docs on the shared host (health, metrics, request ids, problem+json).

The gateway has no database and no actors. Its readiness says whether any upstream instance
can serve; per-instance health and breaker state are in ``/metrics`` (admin token required on this port).
With a bus (``ecom run`` / ``ecom serve`` pass the process's), it hears identity's revocation announcements.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from gateway.routes import ROUTES
from gateway.upstreams import Upstreams
from runtime import host
from runtime.auth import TokenVerifier, bearer_token, check_access
from runtime.description import Http, Resource, ServiceContext, ServiceDescription
from runtime.errors import NotFound
from runtime.host import AppKeyRuntime, json_response
from runtime.routes import Route, services_of

UPSTREAMS_KEY: web.AppKey[Upstreams] = web.AppKey("gateway_upstreams", Upstreams)


@dataclass(frozen=True, slots=True)
class GatewayOverrides:
    """``create_app``'s overrides. ``upstreams``: the instances per service (``{"catalog": ["http://127.0.0.1:8002",
    ...]}``); ``redis_url`` overrides ``options.redis_url`` (shared rate limits); ``options`` default to the
    ``[gateway]`` settings; ``routes`` to the table the services declare (:data:`gateway.routes.ROUTES`)."""

    upstreams: Mapping[str, str | Sequence[str]] | None = None
    redis_url: str | None = None
    options: GatewayOptions | None = None
    routes: Sequence[Route] | None = None


@dataclass(slots=True)
class Edge:
    """What the gateway's route handlers share: options, route table, upstream pool, rate limits, merged docs."""

    options: GatewayOptions
    routes: Sequence[Route]
    pool: Upstreams
    limiter: Any
    auth_limits: AuthLimits | None
    docs: DocsMerger
    cors: Cors | None

    @classmethod
    def build(cls, ctx: ServiceContext) -> Edge:
        given: GatewayOverrides = ctx.options
        opts = given.options if given.options is not None else gateway_options(ctx.settings)
        if given.redis_url is not None:
            opts = dataclasses.replace(opts, redis_url=given.redis_url)
        routes = given.routes if given.routes is not None else ROUTES
        pool = Upstreams.from_settings(ctx.settings, services_of(routes), opts, given.upstreams)
        return cls(
            options=opts,
            routes=routes,
            pool=pool,
            limiter=make_limiter(opts.rate_limit, opts.rate_burst, opts.redis_url),
            auth_limits=AuthLimits(opts.rate_limit, opts.rate_burst) if opts.rate_limit > 0 else None,
            docs=DocsMerger(routes, pool, ttl=opts.docs_ttl),
            cors=Cors(opts.origins) if opts.origins else None,
        )

    async def start(self) -> None:
        await self.pool.start()
        _freeze_startup_objects()

    async def close(self) -> None:
        await self.pool.close()
        if self.limiter is not None:
            await self.limiter.close()


EDGE: web.AppKey[Edge] = web.AppKey("gateway_edge", Edge)


def add_routes(app: web.Application) -> None:
    edge, verifier = app[EDGE], app[AppKeyRuntime].verifier

    async def merged_docs(_request: web.Request) -> web.Response:
        return json_response(await edge.docs.document())

    # Registered before the host's own docs route for the same path, so this one answers.
    app.router.add_get(SPEC_PATH, merged_docs)
    app.router.add_get(CALLBACK_PATH, callback_page)  # the web storefront's redirect URI (gateway/callback.py)
    settings = app[AppKeyRuntime].settings
    add_console_routes(app, settings, edge.pool, edge.routes)  # /admin: the admin console (gateway/console/)
    for route in edge.routes:
        handler = RouteProxy(
            route, edge.pool.services[route.service], verifier, edge.limiter, edge.options, edge.auth_limits
        )
        app.router.add_route("*", route.prefix + "{tail:(/.*)?}", handler.handle)


def _middlewares(ctx: ServiceContext) -> list[Any]:
    edge = ctx[EDGE]
    middlewares: list[Any] = [admin_metrics_middleware(ctx.runtime.verifier)]
    if edge.options.access_log:
        middlewares.append(access_log_middleware)
    if edge.cors is not None:
        middlewares.append(edge.cors.preflight)
    return middlewares


def _on_app(ctx: ServiceContext, app: web.Application) -> None:
    edge = ctx[EDGE]
    ctx.runtime.ready_checks["upstreams"] = edge.pool.ready
    if edge.cors is not None:
        app.on_response_prepare.append(edge.cors.on_response_prepare)
    # the host's registry serves /metrics; the gateway's families are read from its objects when scraped
    host.metrics_registry(app).register(GatewayCollector(edge.pool, edge.limiter))


SERVICE = ServiceDescription(
    "gateway",
    options=GatewayOverrides,
    database=False,
    # With a bus (``ecom run``/``ecom serve`` pass the process's), the runtime hears identity's revocation
    # announcements: a revoked signing key or a signed-out/locked user is refused here within a bus hop, cached
    # verifications included (runtime/revocation.py). A bus that does not answer does not take the gateway out.
    bus_readiness=False,
    resources=(
        Resource(EDGE, Edge.build, start=Edge.start, stop=Edge.close),
        Resource(UPSTREAMS_KEY, lambda ctx: ctx[EDGE].pool),
    ),
    http=Http(
        add_routes,
        title="EcomGateway API",
        client_max_size=lambda ctx: ctx[EDGE].options.max_body,
        middlewares=_middlewares,
        on_app=_on_app,
    ),
)


def create_app(settings: Settings, **overrides: Any) -> web.Application:
    """The gateway application (``overrides``: ``bus``, ``verifier`` and :class:`GatewayOverrides`)."""
    return host.service_app(SERVICE, settings, **overrides)


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
