"""The middlewares every service runs: request id, errors as problem+json, authorize-first, and schema
validation with its body guards (media type, depth)."""

from __future__ import annotations

import contextvars
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute
from aiohttp_apispec import validation_middleware
from marshmallow import ValidationError

from runtime.errors import BadRequest, Problem, ValidationProblem
from runtime.web.responses import parse_json_body, problem_response

__all__ = [
    "authorize_first_middleware",
    "error_answer",
    "error_middleware",
    "flatten_errors",
    "host_middleware",
    "request_id_for",
    "request_id_middleware",
    "request_id_var",
    "schema_validation",
    "schema_validation_middleware",
    "unexpected_problem",
    "validation_error_callback",
]

log = logging.getLogger("runtime.host")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_rng = random.Random()  # request ids need uniqueness, not secrecy


def request_id_for(incoming: str) -> str:
    """The request id of a request that came with ``X-Request-Id: incoming`` ("" without one): a well-formed one
    is passed on, otherwise a new one is made (128 random bits as hex: as unique as a uuid4 without its system
    call and object per request)."""
    return incoming if incoming and _REQUEST_ID_OK.match(incoming) else f"{_rng.getrandbits(128):032x}"


def unexpected_problem(request_id: str) -> Problem:
    """The 500 answered for an error nobody handled (logged by the caller; no details reach the client)."""
    return Problem(
        f"an unexpected error occurred; quote request id {request_id} when reporting it",
        status=500,
        slug="internal",
        title="Internal error",
    )


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id_for(request.headers.get("X-Request-Id", ""))
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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - error_answer re-raises what is not the client's answer to give
        return error_answer(request, exc)


def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The problem+json answer to ``exc``, raised while ``request`` was handled. Re-raises an HTTP exception
    below 400 (a redirect: aiohttp answers it). Anything unexpected is logged and answered as a plain 500."""
    if isinstance(exc, Problem):
        return problem_response(exc, request)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
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
    if isinstance(exc, (UnicodeDecodeError, RecursionError)):
        # Bytes no parser accepts (0xFF in a form, a body nested past any limit): the client's fault, never a 500.
        what = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "nested too deeply"
        return problem_response(BadRequest(f"the request body is {what}"), request)
    log.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.path,
        request.get("request_id"),
        exc_info=exc,
    )
    return problem_response(unexpected_problem(request.get("request_id", "-")), request)


@web.middleware
async def authorize_first_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run a route's ``@require`` check before its input is validated, so an anonymous caller gets 401
    rather than a 422 that describes what a valid request looks like."""
    needs = getattr(request.match_info.handler, "__auth_requirements__", None)
    if needs:
        from runtime.auth import authenticate, check_access

        check_access(await authenticate(request), **needs)
    return await handler(request)


# How schema_validation_middleware treats a route's handler (see _validation_of).
_OWN = 0  # declared with runtime.web.endpoints: it validates its own input
_NONE = 1  # declares no schemas: nothing to validate
_APISPEC = 2  # aiohttp-apispec's decorators (or a class-based view): its validation runs


def _validation_of(route_handler: Any) -> int:
    if getattr(route_handler, "__endpoint__", False):
        return _OWN
    if getattr(route_handler, "__schemas__", None) is not None or isinstance(route_handler, type):
        return _APISPEC
    return _NONE


@web.middleware
async def schema_validation_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp-apispec's validation, for routes that declare schemas with its decorators directly (routes
    declared with :func:`runtime.web.endpoints.endpoint` validate their own input): its own middleware takes an
    exception path on every other request, which costs the gateway's proxy route dearly."""
    if _validation_of(request.match_info.handler) == _APISPEC:
        return await _apispec_validation(request, handler)
    return await handler(request)


def schema_validation() -> Any:
    """:func:`schema_validation_middleware` for one application, each route's treatment decided at its first
    request rather than looked up at every one."""
    decided: dict[Any, int] = {}  # by route object: registered routes only (a 404's route is made anew)

    @web.middleware
    async def schema_validation_(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        how = decided.get(route)
        if how is None:
            how = _validation_of(route.handler)
            if not isinstance(route, SystemRoute):
                decided[route] = how
        if how == _APISPEC:
            return await _apispec_validation(request, handler)
        return await handler(request)

    return schema_validation_


async def _apispec_validation(request: web.Request, handler: Handler) -> web.StreamResponse:
    schemas = getattr(request.match_info.handler, "__schemas__", None)
    if (
        schemas
        and request.can_read_body
        and request.method not in ("GET", "HEAD")
        and any(s["locations"] in (None, ["json"]) for s in schemas)
    ):
        if request.content_type not in ("application/json", "application/octet-stream"):
            # aiohttp's multipart reader raises on a form without a boundary: refuse what is not JSON first
            raise Problem(
                f"the body must be application/json, not {request.content_type}",
                status=415,
                slug="unsupported-media-type",
                title="Unsupported Media Type",
            )
        body = await request.read()  # aiohttp keeps it: the validator reads it again
        if body:
            parse_json_body(body)  # before webargs' stdlib parser can recurse into a 10,000-deep body
    return await validation_middleware(request, handler)


# ---------------------------------------------------------------------------------------------------
# The chain above folded into one middleware


class _RoutePlan:
    """What the host middleware does for one route, decided at its first request rather than at every one:
    the metrics label, the ``@require`` check to run first, and how its input is validated."""

    __slots__ = ("label", "needs", "validation")

    def __init__(self, route: Any) -> None:
        resource = route.resource
        self.label: str = resource.canonical if resource is not None else "unmatched"
        handler = route.handler
        self.needs: dict[str, Any] | None = getattr(handler, "__auth_requirements__", None) or None
        self.validation = _validation_of(handler)


Observe = Callable[[str, str, int, float], None]


def host_middleware(observe: Observe, *, validate: bool = True) -> Any:
    """``request_id``, ``metrics`` (``observe(method, route, status, seconds)``), ``error``, ``authorize_first``
    and (with ``validate``) ``schema_validation`` middlewares as one, in that order, with the same effects: one
    coroutine per request instead of five, and each route's decisions (its metrics label, whether it needs a
    token, whether a schema applies) made once. Without ``validate`` the caller installs
    :func:`schema_validation_middleware` itself, after the middlewares that must run before it."""
    from runtime.auth import authenticate, check_access

    plans: dict[Any, _RoutePlan] = {}  # by route object: registered routes only (a 404's route is made anew)
    perf_counter = time.perf_counter

    @web.middleware
    async def host(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = perf_counter()
        rid = request_id_for(request.headers.get("X-Request-Id", ""))
        request["request_id"] = rid
        token = request_id_var.set(rid)
        route = request.match_info.route
        plan = plans.get(route)
        if plan is None:
            plan = _RoutePlan(route)
            if not isinstance(route, SystemRoute):
                plans[route] = plan
        status = 500
        try:
            try:
                if plan.needs is not None:
                    check_access(await authenticate(request), **plan.needs)
                if validate and plan.validation == _APISPEC:
                    response = await _apispec_validation(request, handler)
                else:
                    response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - error_answer re-raises what is not the client's answer to give
                response = error_answer(request, exc)
            status = response.status
        except web.HTTPException as exc:  # below 400 (a redirect): aiohttp answers it
            status = exc.status
            exc.headers["X-Request-Id"] = rid
            raise
        finally:
            request_id_var.reset(token)
            observe(request.method, plan.label, status, perf_counter() - start)
        response.headers["X-Request-Id"] = rid
        return response

    return host


def flatten_errors(messages: Any, prefix: str = "") -> dict[str, str]:
    """marshmallow's nested error dict -> {"lines.0.quantity": "Must be greater than 0."}."""
    out: dict[str, str] = {}
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            out.update(flatten_errors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(messages, (list, tuple)) and messages and all(isinstance(m, str) for m in messages):
        out[prefix or "body"] = " ".join(messages)
    elif isinstance(messages, (list, tuple)):
        for i, value in enumerate(messages):
            out.update(flatten_errors(value, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix or "body"] = str(messages)
    return out


_flatten = flatten_errors  # the name runtime.host re-exports


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
    raise ValidationProblem(flatten_errors(messages) or {"body": "invalid"})
