"""The aiohttp application factory every service uses, so every service answers alike.

``service_app(description, settings, **overrides)`` builds a service from its declaration
(:mod:`runtime.description`): its runtime, its actor types with their dependencies, its resources and bus
consumers (each a cleanup context), its routes. ``create_app(runtime, routes=...)``, which it calls, returns
an application with:

- ``/health/live`` (the process runs) and ``/health/ready`` (database and bus answer),
- ``/metrics`` in Prometheus text format (requests, latency, live actors, mailbox depth, outbox backlog),
- ``X-Request-Id`` taken from the request (when sane) or made, echoed on the response and logged,
- problem+json for every error: :class:`runtime.errors.Problem`, aiohttp's HTTP errors, request-schema
  validation failures (field named), malformed JSON; anything else is logged and answered as a plain
  500 problem, never with a stack trace,
- OpenAPI docs from aiohttp-apispec at ``/api/docs`` (spec at ``/api/docs/swagger.json``, GETs without their
  HEAD twins),
- the admin actor endpoints ``/api/<service>/admin/actors[/{type}/{id}]``, open only to the admin role
  (or to anyone when ``ECOM_ADMIN_OPEN=true``, for a local single-user setup),
- each part of the :class:`ServiceRuntime` (engine, verifier, bus, cluster membership, actor system, outbox
  relay, revocation listener, the service's hooks) as its own cleanup context, in dependency order: a part
  that fails to start stops the ones started before it.

The pieces live in :mod:`runtime.web` (responses, resources, middlewares, metrics, health, admin) and
:mod:`runtime.jsonutil`; this module assembles them and re-exports the names services import from here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runtime.jsonutil import default as _json_default
from runtime.jsonutil import dumps, isoformat
from runtime.web.admin import _int_query, add_admin_routes, require_admin
from runtime.web.admin import admin_actor as _admin_actor
from runtime.web.admin import admin_actors as _admin_actors
from runtime.web.admin_pending import add_pending_routes
from runtime.web.apidocs import setup_api_docs
from runtime.web.health import live as _live
from runtime.web.health import ready as _ready
from runtime.web.metrics import METRICS_KEY as _METRICS
from runtime.web.metrics import Metrics as _Metrics
from runtime.web.metrics import RuntimeCollector as _RuntimeCollector
from runtime.web.metrics import metrics_handler as _metrics
from runtime.web.metrics import metrics_registry
from runtime.web.middlewares import (
    _LOCATIONS,
    _REQUEST_ID_OK,
    _flatten,
    _rng,
    authorize_first_middleware,
    error_middleware,
    host_middleware,
    request_id_middleware,
    request_id_var,
    schema_validation,
    schema_validation_middleware,
    validation_error_callback,
)
from runtime.web.resources import AppKeyRuntime, ServiceRuntime, make_verifier

if TYPE_CHECKING:
    from config import Settings
    from runtime.description import Queue, Resource, ServiceContext, ServiceDescription, Subscription
from runtime.web.responses import (
    MAX_JSON_DEPTH,
    PROBLEM_JSON,
    _depth_exceeds,
    json_response,
    parse_json_body,
    problem_response,
    read_json,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "PROBLEM_JSON",
    "_LOCATIONS",
    "_METRICS",
    "_REQUEST_ID_OK",
    "AppKeyRuntime",
    "ServiceRuntime",
    "_Metrics",
    "_RuntimeCollector",
    "_admin_actor",
    "_admin_actors",
    "_depth_exceeds",
    "_flatten",
    "_int_query",
    "_json_default",
    "_live",
    "_metrics",
    "_ready",
    "_rng",
    "access_log",
    "authorize_first_middleware",
    "create_app",
    "dumps",
    "error_middleware",
    "host_middleware",
    "isoformat",
    "json_response",
    "make_verifier",
    "metrics_registry",
    "parse_json_body",
    "problem_response",
    "read_json",
    "request_id_middleware",
    "request_id_var",
    "require_admin",
    "schema_validation_middleware",
    "service_app",
    "validation_error_callback",
]

log = logging.getLogger(__name__)
access_log = logging.getLogger("ecom.access")


def create_app(
    runtime: ServiceRuntime,
    *,
    routes: Sequence[web.AbstractRouteDef] | Callable[[web.Application], None] = (),
    title: str | None = None,
    admin_prefix: str | None = None,
    client_max_size: int = 1024 * 1024,
    extra_middlewares: Sequence[Any] = (),
) -> web.Application:
    """The aiohttp application of one service, with the shared endpoints and middlewares."""
    metrics = _Metrics(runtime.name, runtime)
    cluster_middlewares: list[Any] = []
    if runtime.cluster is not None:
        from runtime import cluster as cluster_module

        cluster_middlewares.append(cluster_module.forwarding_middleware(cluster_module.route_key_of(runtime.name)))
    # The host's chain (request id, metrics, errors, authorize-first, schema validation) is one middleware:
    # every request of every service passes it, and one coroutine does what five did. Schema validation stays
    # a middleware of its own when others must run before it.
    inner = [*cluster_middlewares, *extra_middlewares]
    app = web.Application(
        middlewares=[
            host_middleware(metrics.observe, validate=not inner),
            *inner,
            *([schema_validation()] if inner else []),
        ],
        client_max_size=client_max_size,
    )
    app[AppKeyRuntime] = runtime
    app[_METRICS] = metrics
    if runtime.cluster is not None:
        cluster_module.install(app, runtime.cluster)
    if runtime.verifier is not None:
        from runtime.auth import VERIFIER_KEY

        app[VERIFIER_KEY] = runtime.verifier
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    prefix = admin_prefix if admin_prefix is not None else f"/api/{runtime.name}/admin"
    add_admin_routes(app, prefix)
    add_pending_routes(app, prefix)  # due reminders, outbox backlog (the admin console's view)
    if callable(routes):
        routes(app)
    else:
        app.router.add_routes(routes)
    setup_api_docs(app, title=title or f"EcomGateway {runtime.name} API", error_callback=validation_error_callback)
    # One cleanup context per part, in dependency order: aiohttp starts them in turn and, when one fails,
    # the runner's cleanup stops the ones already started, in reverse.
    for _name, context in runtime.cleanup_contexts():
        app.cleanup_ctx.append(_as_cleanup_ctx(context))
    return app


def _as_cleanup_ctx(context: Callable[[], Any]) -> Callable[[web.Application], Any]:
    def cleanup_ctx(_app: web.Application) -> Any:
        return context()

    cleanup_ctx.__qualname__ = cleanup_ctx.__name__ = getattr(context, "__name__", "runtime_context")
    return cleanup_ctx


# ---------------------------------------------------------------------------------------------------
# A service from its description


def service_app(
    description: ServiceDescription,
    settings: Settings,
    *,
    bus: Any = None,
    database_url: str | None = None,
    verifier: Any = None,
    **options: Any,
) -> web.Application:
    """The application of the service ``description`` declares. ``bus``: the process's bus (consumers and the
    outbox relay run on it; this service does not start or close it); ``database_url`` and ``verifier``
    replace the settings' (tests); ``options``: the fields of ``description.options``."""
    from runtime.description import ServiceContext

    opts = description.options(**options)  # an unknown keyword is a TypeError, as for any function
    if description.database:
        runtime = ServiceRuntime.with_database(
            description.name, settings, bus=bus, database_url=database_url, verifier=verifier
        )
    else:
        if database_url is not None:
            raise TypeError(f"service {description.name!r} has no database")
        runtime = ServiceRuntime(
            name=description.name,
            settings=settings,
            bus=bus,
            verifier=verifier if verifier is not None else make_verifier(settings),
        )
    runtime.description = description
    runtime.bus_readiness = description.bus_readiness
    context = ServiceContext(description, settings, runtime, opts, verifier_given=verifier is not None)
    for resource in description.resources:
        context.resources[resource.key] = resource.build(context)
        runtime.contexts.append((resource.name, _resource_context(resource, context.resources[resource.key])))
    if runtime.system is not None:
        for actor_type in description.actors:
            runtime.system.register(actor_type.actor, factory=actor_type.factory(context))
    elif description.actors:
        raise TypeError(f"service {description.name!r} declares actors but no database")
    for source in description.consumes:
        runtime.contexts.append((f"consumer {source.name}", _consumer_context(source, context)))
    http = description.http
    app = create_app(
        runtime,
        routes=_with_resources(http.routes, context),
        title=http.title,
        client_max_size=http.client_max_size(context) if http.client_max_size else 1024 * 1024,
        extra_middlewares=http.middlewares(context) if http.middlewares else (),
    )
    if http.on_app is not None:
        http.on_app(context, app)
    return app


def _with_resources(
    routes: Sequence[web.AbstractRouteDef] | Callable[[web.Application], None], context: ServiceContext
) -> Callable[[web.Application], None]:
    """The routes, added once the resources are in the app (a ``setup(app)`` may read them)."""

    def setup(app: web.Application) -> None:
        for key, value in context.resources.items():
            app[key] = value
        if callable(routes):
            routes(app)
        else:
            app.router.add_routes(routes)

    return setup


def _resource_context(resource: Resource[Any], value: Any) -> Callable[[], Any]:
    @asynccontextmanager
    async def context() -> AsyncIterator[None]:
        try:
            if resource.start is not None:
                await resource.start(value)
            yield
        finally:
            if resource.stop is not None:
                await resource.stop(value)

    context.__name__ = f"resource_{resource.name}"
    return context


def _consumer_context(source: Queue | Subscription, service: ServiceContext) -> Callable[[], Any]:
    """Consumes the queue or subscription from start to stop; nothing without a bus."""
    from runtime.description import Queue, ToActor
    from runtime.messages import BusBinding

    @asynccontextmanager
    async def context() -> AsyncIterator[None]:
        runtime = service.runtime
        bus = runtime.bus
        if bus is None:
            yield
            return
        assert runtime.system is not None, "a consumer delivers to this service's actors"
        binding = BusBinding(runtime.system)
        for delivery in source.deliveries:
            if isinstance(delivery, ToActor):
                binding.to_actor(delivery.message, delivery.actor, actor_id=delivery.actor_id)
            else:
                binding.to_handler(delivery.message.__name__, delivery.make(service, binding))
        if isinstance(source, Queue):
            consumer = await bus.consume(source.name, binding)
        else:
            consumer = await bus.subscribe(source.name, list(source.types), binding)
        try:
            yield
        finally:
            await consumer.stop()

    context.__name__ = f"consumer_{source.name}"
    return context
