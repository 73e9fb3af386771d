"""The aiohttp application factory every service uses, so every service answers alike.

``create_app(runtime, routes=...)`` returns an application with:

- ``/health/live`` (the process runs) and ``/health/ready`` (database and bus answer),
- ``/metrics`` in Prometheus text format (requests, latency, live actors, mailbox depth),
- ``X-Request-Id`` taken from the request (when sane) or made, echoed on the response and logged,
- problem+json for every error: :class:`runtime.errors.Problem`, aiohttp's HTTP errors, request-schema
  validation failures (field named), malformed JSON; anything else is logged and answered as a plain
  500 problem, never with a stack trace,
- OpenAPI docs from aiohttp-apispec at ``/api/docs`` (spec at ``/api/docs/swagger.json``),
- the admin actor endpoints ``/api/<service>/admin/actors[/{type}/{id}]``, open only to the admin role
  (or to anyone when ``ECOM_ADMIN_OPEN=true``, for a local single-user setup).

:class:`ServiceRuntime` owns what a service runs on (engine, state store, actor system, bus, outbox relay)
and starts and stops it with the application.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web
from aiohttp_apispec import setup_aiohttp_apispec, validation_middleware
from marshmallow import ValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from config import Settings
from runtime import store as store_module
from runtime.actors import ActorSystem
from runtime.errors import BadRequest, Forbidden, NotFound, Problem, ValidationProblem

log = logging.getLogger(__name__)
access_log = logging.getLogger("ecom.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

PROBLEM_JSON = "application/problem+json"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_rng = random.Random()  # request ids need uniqueness, not secrecy


# ---------------------------------------------------------------------------------------------------
# JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # money travels as a decimal string, never a float
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    # orjson writes datetimes as RFC 3339; naive ones are taken as UTC.
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(data), status=status, headers=headers, content_type="application/json")


MAX_JSON_DEPTH = 32  # no request of this API nests deeper; a deeper body is refused before any parser recurses


def parse_json_body(body: bytes) -> Any:
    """``body`` as JSON, or a 400 problem saying why not: invalid UTF-8, invalid JSON, or nested deeper than
    :data:`MAX_JSON_DEPTH` (orjson refuses past 1024 levels itself, without recursing in Python)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = "nested too deeply" if "recursion" in str(exc).lower() else f"not valid JSON: {exc}"
        raise BadRequest(f"the body is {reason}") from None
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise BadRequest(f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a 400 problem saying why it is not."""
    body = await request.read()
    if not body:
        raise BadRequest("the request needs a JSON body")
    return parse_json_body(body)


def problem_response(problem: Problem, request: web.Request | None = None) -> web.Response:
    headers = dict(problem.headers)
    return web.Response(
        body=dumps(problem.to_dict(instance=request.path if request is not None else None)),
        status=problem.status,
        headers=headers,
        content_type=PROBLEM_JSON,
    )


def isoformat(value: datetime | date) -> str:
    return value.isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------
# What a service runs on


AppKeyRuntime: web.AppKey[ServiceRuntime] = web.AppKey("ecom_runtime")


@dataclass
class ServiceRuntime:
    """The parts one service runs on. Built by each service's ``service.py`` and started with the app."""

    name: str
    settings: Settings
    engine: AsyncEngine | None = None
    store: store_module.StateStore | None = None
    system: ActorSystem | None = None
    bus: Any = None  # bus.base.Bus
    relay: Any = None  # bus.outbox.OutboxRelay
    verifier: Any = None  # runtime.auth.TokenVerifier
    cluster: Any = None  # runtime.cluster.Cluster, when several instances may share the database
    ready_checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    owns_bus: bool = False  # embedded mode shares one bus between services: only its owner closes it
    _revocations: Any = None  # the consumer of identity's revocation announcements

    @classmethod
    def with_database(
        cls,
        name: str,
        settings: Settings,
        *,
        bus: Any = None,
        database_url: str | None = None,
        owns_bus: bool = False,
        verifier: Any = None,
    ) -> ServiceRuntime:
        """A runtime with the service's database, an actor system on it, a token verifier for the identity
        service of ``settings`` (unless one is given) and, if given, the bus with an outbox relay."""
        engine = store_module.create_engine(database_url or settings.database_url(name))
        st = store_module.StateStore(engine, group_commit=settings.actors.group_commit, max_batch=settings.actors.max_batch)
        relay = None
        if bus is not None:
            from bus.outbox import OutboxRelay

            relay = OutboxRelay(engine, bus, poll_interval=settings.bus.outbox_poll_interval)
        system = ActorSystem.from_settings(
            st,
            settings,
            name=name,
            on_outbox=relay.notify if relay else None,
            # Only a cluster has other writers; one process on the in-memory bus is the only one.
            exclusive=not settings.cluster.active(settings.bus.backend),
        )
        cluster = None
        if settings.cluster.active(settings.bus.backend):
            from runtime.cluster import Cluster

            c = settings.cluster
            cluster = Cluster(
                engine,
                c.advertise_url or settings.base_url(name),
                heartbeat_interval=c.heartbeat_interval,
                member_timeout=c.member_timeout,
                on_change=system.rebalance,
                on_evicted=system.drop_all,
            )
            system.placement = cluster
        return cls(
            name=name,
            settings=settings,
            engine=engine,
            store=st,
            system=system,
            bus=bus,
            relay=relay,
            owns_bus=owns_bus,
            verifier=verifier if verifier is not None else make_verifier(settings),
            cluster=cluster,
        )

    async def start(self) -> None:
        if self.engine is not None:
            self.ready_checks.setdefault("database", lambda: store_module.ping(self.engine))  # type: ignore[arg-type]
        if self.bus is not None:
            self.ready_checks.setdefault("bus", self.bus.ping)
            if self.owns_bus:
                await self.bus.start()
        if self.cluster is not None:
            await self.cluster.start()  # joined before the first turn, so placement is known from the start
        if self.system is not None:
            await self.system.start()
        if self.relay is not None:
            self.relay.start()
        if self.bus is not None and self.verifier is not None:
            from runtime import revocation

            # Every process hears identity's revocations, so a revoked key or signed-out user stops here too.
            self._revocations = await revocation.listen(self.bus, self.verifier)
        for hook in self.on_start:
            await hook()

    async def stop(self) -> None:
        if self._revocations is not None:
            await self._revocations.stop()
            self._revocations = None
        for hook in reversed(self.on_stop):
            try:
                await hook()
            except Exception:
                log.exception("%s: stop hook failed", self.name)
        if self.cluster is not None:
            await self.cluster.stop()  # leave first: peers take this member's entities over at once
        if self.relay is not None:
            await self.relay.stop()
        if self.system is not None:
            await self.system.stop()
        if self.bus is not None and self.owns_bus:
            await self.bus.close()
        if self.verifier is not None:
            await self.verifier.close()
        if self.engine is not None:
            await self.engine.dispose()


def make_verifier(settings: Settings) -> Any:
    """The token verifier for tokens of the configured identity service (JWKS fetched on first use)."""
    from runtime.auth import TokenVerifier

    return TokenVerifier(
        issuer=settings.issuer,
        audience=settings.general.audience,
        leeway=settings.auth.leeway,
        refetch_interval=settings.auth.jwks_refetch_interval,
    )


# ---------------------------------------------------------------------------------------------------
# Middlewares


@web.middleware
async def request_id_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    # 128 random bits as hex: as unique as a uuid4 without its system call and object per request.
    rid = incoming if incoming and _REQUEST_ID_OK.match(incoming) else "%032x" % _rng.getrandbits(128)
    request["request_id"] = rid
    token = request_id_var.set(rid)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = rid
        raise
    finally:
        request_id_var.reset(token)
    response.headers["X-Request-Id"] = rid
    return response


def _flatten(messages: Any, prefix: str = "") -> dict[str, str]:
    """marshmallow's nested error dict -> {"lines.0.quantity": "Must be greater than 0."}."""
    out: dict[str, str] = {}
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(messages, (list, tuple)) and messages and all(isinstance(m, str) for m in messages):
        out[prefix or "body"] = " ".join(messages)
    elif isinstance(messages, (list, tuple)):
        for i, value in enumerate(messages):
            out.update(_flatten(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix or "body"] = str(messages)
    return out


_LOCATIONS = ("json", "query", "match_info", "path", "headers", "form", "querystring")


def validation_error_callback(error: ValidationError, *_args: Any, **_kwargs: Any) -> None:
    """webargs' hook for schema failures: raise a 422 problem that names each field."""
    messages = error.messages
    # webargs nests messages under the location ("json", "query"): the field name is what matters.
    if isinstance(messages, Mapping) and set(messages) <= set(_LOCATIONS):
        merged: dict[str, Any] = {}
        for value in messages.values():
            if isinstance(value, Mapping):
                merged.update(value)
        messages = merged or messages
    raise ValidationProblem(_flatten(messages) or {"body": "invalid"})


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        slug = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(exc.status, "http-error")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            detail = f"no resource at {request.path}"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        if exc.status == 400 and exc.text and '"json"' in exc.text and "Invalid JSON" in exc.text:
            # webargs' answer to an unparsable body: say it plainly, like read_json does.
            slug, detail = "bad-request", "the body is not valid JSON"
        problem = Problem(detail, status=exc.status, slug=slug, title=exc.reason)
        response = problem_response(problem, request)
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except asyncio.CancelledError:
        raise
    except (UnicodeDecodeError, RecursionError) as exc:
        # Bytes no parser accepts (0xFF in a form, a body nested past any limit): the client's fault, never a 500.
        what = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
        return problem_response(BadRequest(f"the request body is {what}"), request)
    except Exception:
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request.get("request_id"))
        problem = Problem(
            f"an unexpected error occurred; quote request id {request.get('request_id', '-')} when reporting it",
            status=500,
            slug="internal",
            title="Internal error",
        )
        return problem_response(problem, request)


@web.middleware
async def authorize_first_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Run a route's ``@require`` check before its input is validated, so an anonymous caller gets 401
    rather than a 422 that describes what a valid request looks like."""
    needs = getattr(request.match_info.handler, "__auth_requirements__", None)
    if needs:
        from runtime.auth import authenticate, check_access

        check_access(await authenticate(request), **needs)
    return await handler(request)


@web.middleware
async def schema_validation_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp-apispec's validation, only for routes that declare schemas: its own middleware takes an
    exception path on every other request, which costs the gateway's proxy route dearly."""
    route_handler = request.match_info.handler
    schemas = getattr(route_handler, "__schemas__", None)
    if schemas is not None or isinstance(route_handler, type):
        if schemas and request.can_read_body and request.method not in ("GET", "HEAD"):
            if any(s["locations"] in (None, ["json"]) for s in schemas):
                if request.content_type not in ("application/json", "application/octet-stream"):
                    # aiohttp's multipart reader raises on a form without a boundary: refuse what is not JSON first
                    raise Problem(
                        f"the body must be application/json, not {request.content_type}", status=415, slug="unsupported-media-type",
                        title="Unsupported Media Type",
                    )
                body = await request.read()  # aiohttp keeps it: the validator reads it again
                if body:
                    parse_json_body(body)  # before webargs' stdlib parser can recurse into a 10,000-deep body
        return await validation_middleware(request, handler)
    return await handler(request)


def metrics_registry(app: web.Application) -> CollectorRegistry:
    """The app's Prometheus registry, for services that add collectors of their own."""
    return app[_METRICS].registry


class _Metrics:
    def __init__(self, service: str, runtime: ServiceRuntime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests", "HTTP requests handled", ["service", "method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["service", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.service = service
        self.registry.register(_RuntimeCollector(service, runtime))
        # labels() costs a lock and a tuple per call: resolve each label set once.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[(method, route, status)] = self.requests.labels(self.service, method, route, str(status))
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = self.latency.labels(self.service, route)
        counter.inc()
        timer.observe(seconds)

    def middleware(self) -> Any:
        @web.middleware
        async def metrics_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.observe(request.method, route, status, time.perf_counter() - start)

        return metrics_middleware


class _RuntimeCollector:
    """Actor and outbox gauges, read when /metrics is scraped."""

    def __init__(self, service: str, runtime: ServiceRuntime) -> None:
        self.service = service
        self.runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        system = self.runtime.system
        if system is None:
            return
        live = GaugeMetricFamily("actor_activations", "Live actor activations", labels=["service", "type"])
        depth = GaugeMetricFamily("actor_mailbox_depth", "Messages waiting in mailboxes", labels=["service", "type"])
        for type_name, info in system.introspect(limit=0).items():
            live.add_metric([self.service, type_name], info["live"])
            depth.add_metric([self.service, type_name], info["mailbox_depth"])
        yield live
        yield depth
        counters = GaugeMetricFamily("actor_events", "Actor runtime counters since start", labels=["service", "event"])
        for event, value in system.stats.items():
            counters.add_metric([self.service, event], value)
        yield counters


# ---------------------------------------------------------------------------------------------------
# Built-in routes


async def _live(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    runtime = request.app[AppKeyRuntime]
    results: dict[str, str] = {}

    async def check(name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout(2.0):
                await fn()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"failing: {type(exc).__name__}"

    await asyncio.gather(*(check(n, f) for n, f in runtime.ready_checks.items()))
    ok = all(v == "ok" for v in results.values())
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": results}
    if runtime.cluster is not None:
        # The gateway reads the live membership from here, to compute the same owners as the instances.
        body["cluster"] = {"self": runtime.cluster.address, "members": list(runtime.cluster.addresses)}
    return json_response(body, status=200 if ok else 503)


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


async def _admin_actors(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    system = runtime.system
    limit = _int_query(request, "limit", 100, 0, 10_000)
    body: dict[str, Any] = {"service": runtime.name, "types": system.introspect(limit=limit) if system else {}}
    body["cluster"] = runtime.cluster.describe() if runtime.cluster is not None else None
    return json_response(body)


async def _admin_actor(request: web.Request) -> web.Response:
    await require_admin(request)
    system = request.app[AppKeyRuntime].system
    type_name, actor_id = request.match_info["type"], request.match_info["id"]
    if system is None or type_name not in set(system.actor_types()):
        raise NotFound(f"this service has no actor type {type_name!r}")
    info = await system.inspect(type_name, actor_id)
    if info is None:
        raise NotFound(f"no {type_name} actor {actor_id!r} exists")
    return json_response(info)


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


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[_METRICS].registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


_METRICS: web.AppKey[_Metrics] = web.AppKey("ecom_metrics")


# ---------------------------------------------------------------------------------------------------
# The factory


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
    app = web.Application(
        middlewares=[
            request_id_middleware,
            metrics.middleware(),
            error_middleware,
            authorize_first_middleware,
            *cluster_middlewares,
            *extra_middlewares,
            schema_validation_middleware,
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
    app.router.add_get(f"{prefix}/actors", _admin_actors)
    app.router.add_get(f"{prefix}/actors/{{type}}/{{id}}", _admin_actor)
    if callable(routes):
        routes(app)
    else:
        app.router.add_routes(routes)
    setup_aiohttp_apispec(
        app,
        title=title or f"EcomGateway {runtime.name} API",
        version="v1",
        url="/api/docs/swagger.json",
        swagger_path="/api/docs",
        static_path="/api/docs/static",
        error_callback=validation_error_callback,
    )

    async def lifecycle(_app: web.Application) -> Any:
        await runtime.start()
        yield
        await runtime.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
