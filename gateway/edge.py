"""What the gateway does around every request: CORS for browser storefronts and the access log.

Both are installed only when configured, so a gateway without them pays nothing per request.

CORS: a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered here, never
forwarded: 204 with the allowed methods and headers for an allowed origin, a 403 problem for any other. Actual
responses to an allowed origin get ``Access-Control-Allow-Origin`` (the origin itself, with ``Vary: Origin``)
and the headers a script may read. Tokens travel in ``Authorization``, not cookies, so credentials mode is not
enabled.

Access log: one JSON line per request on the ``ecom.access`` logger: method, path, status, duration, upstream
instance, request id and client address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection

import orjson
from aiohttp import hdrs, web

from gateway.proxy import UPSTREAM_KEY
from runtime.errors import Forbidden, Problem
from runtime.host import problem_response

access_log = logging.getLogger("ecom.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, Accept-Language, If-Match, If-None-Match, Idempotency-Key, X-Request-Id"
)
EXPOSE_HEADERS = "X-Request-Id, ETag, Location, Retry-After, WWW-Authenticate, Content-Length"
PREFLIGHT_MAX_AGE = "600"


class Cors:
    def __init__(self, origins: Collection[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins) - {"*"}

    def allowed(self, origin: str) -> bool:
        return self.any or origin in self.origins

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            origin = request.headers.get(hdrs.ORIGIN)
            if origin is not None and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
                if not self.allowed(origin):
                    return problem_response(Forbidden(f"the origin {origin} may not call this API"), request)
                return web.Response(
                    status=204,
                    headers={
                        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                        hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
                        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                        hdrs.ACCESS_CONTROL_MAX_AGE: PREFLIGHT_MAX_AGE,
                        hdrs.VARY: "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                    },
                )
        return await handler(request)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Runs for every response just before its head is written, streamed ones included."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allowed(origin) or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return
        headers = response.headers
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS
        vary = headers.get(hdrs.VARY)
        headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (web.HTTPException, Problem) as exc:
        status = exc.status
        raise
    finally:
        log_access(
            request.method,
            request.path,
            status,
            start,
            request.get(UPSTREAM_KEY, "-"),
            request.get("request_id", "-"),
            request.remote,
        )


def log_access(
    method: str, path: str, status: int, start: float, upstream: str, request_id: str, client: str | None
) -> None:
    """The access log line of one request (``start``: its ``time.perf_counter()`` when it arrived)."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            orjson.dumps(
                {
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "upstream": upstream,
                    "request_id": request_id,
                    "client": client,
                }
            ).decode()
        )
