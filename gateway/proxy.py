"""The streaming proxy: one :class:`RouteProxy` per route prefix, the policy both fronts run.

:meth:`RouteProxy.admit`, :meth:`~RouteProxy.guarded`, :meth:`~RouteProxy.header_block` and
:meth:`~RouteProxy.forward` take plain values, so aiohttp's handler (:meth:`RouteProxy.handle`, which also streams
large bodies both ways) and the lean front (:mod:`gateway.front`) share one implementation of each rule.

Per request, in order: match the route's rule (policy and affinity), check the bearer token (the verified-token
cache first, full verification on a miss), take a rate-limit token, choose the upstream instance, forward the
request and hand back the response. This is the gateway's hot path, so it

* forwards the client's raw header bytes through one precomputed filter (no multidict copies, no decoding):
  hop-by-hop headers go, and so does every client-supplied identity header (``X-User-Id``, ``X-Principal``,
  ``X-Forwarded-User``, ...) — upstreams learn who calls only from the forwarded token;
* buffers small bodies (one write each way, and a buffered request can be replayed on a retry) and streams
  large ones, refusing bodies over ``max_body`` with 413 whether the size is declared or only counted;
* retries with jittered back-off only when it is safe: the request never left (connection refused), or the
  method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE) and its body was buffered. Timeouts are not retried:
  the upstream may still be working on the request, and the client has waited long enough;
* answers failures as problem+json: 502 (upstream failed), 503 (no instance available), 504 (timeout).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from aiohttp import hdrs, web

from gateway.client import Connection, Response, UpstreamError, connection_tokens
from gateway.options import GatewayOptions
from gateway.ratelimit import AuthLimits, Limiter, LocalLimiter
from gateway.upstreams import Instance, Service
from runtime import tracing
from runtime.auth import (
    MissingToken,
    Principal,
    TokenVerifier,
    bearer_token,
    check_access,
)
from runtime.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    Problem,
    ServiceUnavailable,
    TooManyRequests,
)
from runtime.host import problem_response
from runtime.routes import Affinity, Kind, Route, Rule

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # PUT /api/cart/items is idempotent by design

# Identity claims a client could try to smuggle past the token check: never forwarded.
IDENTITY_HEADERS = frozenset(
    {b"x-user-id", b"x-user", b"x-user-roles", b"x-user-email", b"x-user-name", b"x-forwarded-user",
     b"x-principal", b"x-remote-user", b"remote-user", b"x-auth-user", b"x-authenticated-user", b"x-client-id",
     b"x-roles", b"x-scopes", b"x-subject", b"x-consumer-id", b"x-tenant-id"}
)  # fmt: skip
IDENTITY_PREFIXES = (b"x-user-", b"x-auth-", b"x-authenticated-", b"x-principal", b"x-forwarded-user",
                     b"x-remote-", b"x-identity-", b"x-jwt-", b"x-token-")  # fmt: skip
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the gateway writes itself.
_HOP_REQUEST = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
     b"upgrade", b"content-length", b"expect", b"proxy-authorization", b"x-request-id", b"forwarded",
     b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip", b"traceparent", b"tracestate"}
)  # fmt: skip
DROP_REQUEST = _HOP_REQUEST | IDENTITY_HEADERS

# Requests with their own, tighter per-address buckets (gateway.ratelimit.AuthLimits): (method, path, bucket).
GUARDED = (("POST", "/connect/token", "signin"), ("POST", "/api/identity/users", "register"))

_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")
UPSTREAM_KEY: web.RequestKey[str] = web.RequestKey("gateway_upstream", str)


class _HasStatus(Protocol):
    @property
    def status(self) -> int: ...


_R = TypeVar("_R", bound=_HasStatus)


class RouteProxy:
    """The handler of one route prefix (bound method :meth:`handle`)."""

    def __init__(
        self,
        route: Route,
        service: Service,
        verifier: TokenVerifier,
        limiter: Limiter | None,
        options: GatewayOptions,
        auth_limits: AuthLimits | None = None,
    ) -> None:
        self.route = route
        self.service = service
        self.verifier = verifier
        self.limiter = limiter
        self.local_limiter = isinstance(limiter, LocalLimiter)  # take() answers at once: no await needed
        self.auth_limits = auth_limits
        # method -> (path, kind) of the requests under this prefix that AuthLimits guards
        self.guards: dict[str, tuple[str, str]] = {}
        if auth_limits is not None:
            for m, path, kind in GUARDED:
                if path.startswith(route.prefix + "/"):
                    self.guards[m] = (path, kind)
        self.timeout = options.timeout
        self.retries = options.retries
        self.backoff = options.retry_backoff
        self.max_body = options.max_body
        self.buffer_limit = options.buffer_limit
        self.note_upstream = options.access_log  # the instance is recorded on the request for the access log
        self._loop: asyncio.AbstractEventLoop | None = None  # asyncio.get_running_loop() costs a getpid()

    # -- the policy, shared by both fronts (aiohttp's handler below, gateway.front's protocol) ----------

    async def admit(
        self, method: str, raw_path: str, path: str, tail: str, authorization: list[str], remote: str | None
    ) -> tuple[str | None, str | None]:
        """Route, token, rate limit and access checks of one request, in that order (each refusal a
        :class:`Problem`). ``path``/``tail``: the decoded path and its part after the route prefix;
        ``authorization``: the values of the ``Authorization`` headers. -> (affinity key, the AuthLimits bucket
        that guards this request or None)."""
        rule, match = self._rule(method, raw_path, path, tail)
        principal: Principal | None = None
        counted = False  # taken from the address's bucket already (a full token check or a missing token)
        if rule.access.kind is not Kind.PUBLIC:
            principal = self._cached_principal(authorization)
            if principal is None:
                principal, counted = await self._principal(authorization, remote, rule.access.kind is Kind.TOKEN)
        limiter = self.limiter
        if limiter is not None and (principal is not None or not counted):
            client = "sub:" + principal.sub if principal is not None else "addr:" + (remote or "-")
            if self.local_limiter:  # no coroutine for the in-process bucket
                _refuse(limiter.take(client))  # type: ignore[union-attr]  # a LocalLimiter
            else:
                await self._take(client)
        return self._grant(rule, match, principal, method, path)

    def admit_now(
        self, method: str, raw_path: str, path: str, tail: str, authorization: list[str], remote: str | None
    ) -> tuple[str | None, str | None] | None:
        """:meth:`admit` when it decides without waiting (the hot path: a public route or a token in the
        verified-token cache, and the in-process rate limiter): the same answer, the same refusals. None when it
        would have to wait (a token to verify in full, a missing token, a shared rate-limit store): then nothing
        was charged yet and :meth:`admit` decides."""
        rule, match = self._rule(method, raw_path, path, tail)
        principal: Principal | None = None
        if rule.access.kind is not Kind.PUBLIC:
            principal = self._cached_principal(authorization)
            if principal is None:
                return None
        limiter = self.limiter
        if limiter is not None:
            if not self.local_limiter:
                return None
            client = "sub:" + principal.sub if principal is not None else "addr:" + (remote or "-")
            _refuse(limiter.take(client))  # type: ignore[union-attr]  # a LocalLimiter
        return self._grant(rule, match, principal, method, path)

    def _rule(self, method: str, raw_path: str, path: str, tail: str) -> tuple[Rule, re.Match[str]]:
        """The route's rule for the request (400 for dot segments, 404 for no rule)."""
        if "/." in raw_path or "%2e" in raw_path or "%2E" in raw_path:  # cheap test, then the real one
            _refuse_dot_segments(path)
        found = self.route.resolve(method, tail)
        if found is None:
            raise NotFound(f"no route for {method} {path}")
        return found

    def _cached_principal(self, authorization: list[str]) -> Principal | None:
        """The principal of a single bearer token in the verified-token cache (no crypto, no I/O), else None."""
        if len(authorization) == 1 and authorization[0].startswith("Bearer "):
            return self.verifier.verify_cached(authorization[0][7:])
        return None

    def _grant(
        self, rule: Rule, match: re.Match[str], principal: Principal | None, method: str, path: str
    ) -> tuple[str | None, str | None]:
        """The end of :meth:`admit`, the token checked and the rate limit taken: the rule's roles and scopes,
        then (affinity key, AuthLimits bucket)."""
        access = rule.access
        if principal is not None and access.checks_claims:
            check_access(principal, roles=access.roles, scopes=access.scopes)
        guard = self.guards.get(method) if self.guards else None
        if guard is not None and path.rstrip("/") == guard[0]:
            return None, guard[1]
        affinity = rule.affinity
        if affinity is Affinity.NONE:
            return None, None
        if affinity is Affinity.SUB:
            return principal.sub, None  # type: ignore[union-attr]  # SUB rules require a token
        return match["key"], None

    async def _principal(self, values: list[str], remote: str | None, required: bool) -> tuple[Principal | None, bool]:
        """The principal of a request whose token is not in the verified-token cache (:meth:`admit` looked):
        -> (the verified principal or None, whether the address's bucket was charged already).

        A token verified before comes from the cache and is charged to its subject. Everything else (a missing
        token where one is needed, a token checked in full, which is what every bad or forged one is) is charged
        to the client's address first, so a flood of forged tokens is refused with 429 before its crypto runs.
        """
        if not values:
            if required:
                if self.limiter is not None:
                    await self._take("addr:" + (remote or "-"))
                raise MissingToken()
            return None, False
        if self.limiter is not None:
            await self._take("addr:" + (remote or "-"))
        # full check: one header, the Bearer scheme, a well-formed token; then signature and claims
        token = bearer_token(_AuthorizationOnly(values))  # type: ignore[arg-type]  # it reads only .headers
        assert token is not None
        return await self.verifier.verify(token), True

    async def _take(self, client: str) -> None:
        """A token from ``client``'s bucket, else 429 with Retry-After."""
        limiter = self.limiter
        assert limiter is not None
        _refuse(limiter.take(client) if self.local_limiter else await limiter.acquire(client))  # type: ignore[union-attr]

    async def guarded(self, kind: str, remote: str | None, exchange: Callable[[], Awaitable[_R]]) -> _R:
        """Sign-ins and registrations (``kind`` from :meth:`admit`), under the tighter per-address buckets of
        :class:`AuthLimits`: a registration takes a token before it is forwarded, a sign-in is refused while its
        bucket is empty and takes a token only when it fails (400 or 401)."""
        limits = self.auth_limits
        assert limits is not None
        addr = "addr:" + (remote or "-")
        if kind == "register":
            wait = limits.register.take(addr)
            if wait:
                raise TooManyRequests(f"too many registrations from this address; retry in {wait:.0f} s", wait)
            return await exchange()
        wait = limits.signin.peek(addr)
        if wait:
            limits.signin.limited += 1
            raise TooManyRequests(f"too many failed sign-ins from this address; retry in {wait:.0f} s", wait)
        response = await exchange()
        if response.status in (400, 401):
            limits.signin.take(addr)
        return response

    def header_block(
        self,
        raw_headers: Iterable[tuple[bytes, bytes]],
        tail: bytes,
        extra: frozenset[bytes] = frozenset(),
    ) -> bytes:
        """Every request header after the Host line: the client's, filtered, then ``tail`` (the gateway's own
        headers and the body framing, ending with the blank line)."""
        parts: list[bytes] = []
        extend = parts.extend
        drop = DROP_REQUEST
        prefixes = IDENTITY_PREFIXES
        for name, value in raw_headers:
            lname = name.lower()
            if lname in drop or lname.startswith(prefixes) or lname in extra:
                if lname == b"connection" and not extra:
                    tokens = connection_tokens(value)
                    if tokens:  # headers the client marked hop-by-hop (rare): filter again without them
                        return self.header_block(raw_headers, tail, tokens)
                continue
            extend((name, b": ", value, b"\r\n"))
        parts.append(tail)
        return b"".join(parts)

    async def forward(
        self,
        method: str,
        path: str,
        request_line: bytes,
        block: bytes,
        body: bytes | None,
        key: str | None,
        send_streamed: Callable[[Instance, bytes], Awaitable[Response]] | None = None,
        note: Callable[[str], None] | None = None,
        retry: tuple[int, Instance] | None = None,
    ) -> Response:
        """Send the request to an instance of the service (``key``: the affinity key), retrying when it is safe;
        a failed hop is a :class:`Problem`. ``send_streamed``: sends a body that is not buffered (never repeated
        once it started); ``note``: told the instance's URL of every attempt (for the access log); ``retry``:
        (attempts made, the instance of the last) when the caller made the first attempts itself
        (:meth:`pick`, :meth:`request`, :meth:`failed`) and slept the back-off :meth:`failed` gave."""
        attempt, avoid = retry if retry is not None else (0, None)
        while True:
            inst = self.pick(key, avoid, note)
            try:
                if send_streamed is not None:
                    resp = await send_streamed(inst, b"".join((request_line, inst.host_line, block)))
                else:
                    resp = await self.request(inst, request_line, block, body, method == "HEAD")
            except UpstreamError as exc:
                delay = self.failed(inst, exc, method, path, attempt, send_streamed is None)
                attempt += 1
                avoid = inst
                await asyncio.sleep(delay)
                continue
            except BaseException:
                self.abandoned(inst)
                raise
            self.succeeded(inst)
            return resp

    # One attempt of forward(), in steps a caller without a coroutine can take too (gateway.front's hot path):
    # pick() -> request() -> succeeded(), failed() or abandoned().

    def pick(self, key: str | None, avoid: Instance | None, note: Callable[[str], None] | None) -> Instance:
        """The instance for an attempt (503 when none is available), counted in flight from here on."""
        service = self.service
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        inst = service.pick(key, loop.time(), avoid)
        if inst is None:
            raise ServiceUnavailable(f"no instance of the {service.name} service is available right now", 1.0)
        if note is not None:
            note(inst.url)
        inst.breaker.begin()
        inst.in_flight += 1
        inst.requests += 1
        return inst

    def request(
        self, inst: Instance, request_line: bytes, block: bytes, body: bytes | None, no_body: bool
    ) -> Awaitable[Response]:
        """A buffered request to ``inst`` (:meth:`pick` first): with an idle pooled connection at hand this is
        the response future itself, else a coroutine that connects or waits for a connection first."""
        head = b"".join((request_line, inst.host_line, block))
        return inst.pool.request(head, body, no_body=no_body, timeout=self.timeout)

    def succeeded(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.breaker.success()

    def abandoned(self, inst: Instance) -> None:
        """The attempt ended without a verdict on the instance (the caller gave up on it)."""
        inst.in_flight -= 1
        inst.breaker.abandon()

    def failed(
        self, inst: Instance, exc: UpstreamError, method: str, path: str, attempt: int, replayable: bool
    ) -> float:
        """Attempt number ``attempt`` (from 0) failed: counted against the instance. -> the back-off (s) before
        the next attempt when a retry is safe (the request never left, or it is idempotent and ``replayable``:
        its body is buffered), else raises the client's :class:`Problem`."""
        inst.in_flight -= 1
        inst.errors[exc.kind] = inst.errors.get(exc.kind, 0) + 1
        if exc.kind == "busy":
            inst.breaker.abandon()  # our pool was full: no verdict on the instance
        else:
            inst.breaker.failure(self._loop.time())  # type: ignore[union-attr]  # set by pick()
        service = self.service
        if attempt < self.retries and exc.kind != "timeout" and (not exc.sent or (method in IDEMPOTENT and replayable)):
            service.retries += 1
            log.info("retrying %s %s (attempt %d): %s", method, path, attempt + 2, exc)
            return random.uniform(0, self.backoff * 2 ** (attempt + 1))  # full jitter
        raise _problem(exc, service.name) from None

    # -- the aiohttp front --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            method = request.method
            raw_path = request.raw_path
            key, guard = await self.admit(
                method,
                raw_path,
                request.path,
                request.match_info["tail"],
                request.headers.getall(hdrs.AUTHORIZATION, []),
                request.remote,
            )
            if guard is not None:
                return await self.guarded(
                    guard, request.remote, lambda: self._exchange(request, method, raw_path, None)
                )
            with tracing.proxy_span(self.service.name, request):  # writes traceparent upstream
                return await self._exchange(request, method, raw_path, key)
        except Problem as problem:
            return problem_response(problem, request)

    async def _exchange(self, request: web.Request, method: str, raw_path: str, key: str | None) -> web.StreamResponse:
        body: bytes | None = None
        streamed = False
        chunked = False
        length = request.content_length
        if request.body_exists:
            if length is not None:
                if length > self.max_body:
                    raise PayloadTooLarge(f"the request body of {length} bytes is over the limit of {self.max_body}")
                if length <= self.buffer_limit:
                    body = await request.read()
                else:
                    streamed = True
                    body = b""
            else:
                body, streamed = await self._read_prefix(request)
                chunked = streamed
        elif method in ("POST", "PUT", "PATCH"):
            body = b""

        target = raw_path if raw_path.startswith("/") else request.rel_url.raw_path_qs
        request_line = f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
        if chunked:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        elif streamed:
            framing = b"Content-Length: %d\r\n\r\n" % length  # type: ignore[str-format]  # streamed, not chunked: Content-Length was sent
        else:
            framing = b"Content-Length: %d\r\n\r\n" % len(body) if body is not None else b"\r\n"
        host = request.headers.get(hdrs.HOST)
        block = self.header_block(
            request.raw_headers,
            gateway_headers(
                request.get("request_id"),  # set by the host's request-id middleware: created or passed on
                request.remote,
                request.secure,
                host.encode("latin-1", "replace") if host else None,
                tracing.traceparent_line(request.headers),
                framing,
            ),
        )
        send_streamed = None
        if streamed:
            prefix = body or b""

            def send_streamed(inst: Instance, head: bytes) -> Awaitable[Response]:
                return self._send_streamed(request, inst, head, prefix, chunked)

        def note(url: str) -> None:
            request[UPSTREAM_KEY] = url

        resp = await self.forward(
            method,
            request.path,
            request_line,
            block,
            body,
            key,
            send_streamed,
            note if self.note_upstream else None,
        )
        if resp.body is not None:
            return web.Response(body=resp.body, status=resp.status, headers=resp.headers)
        return await self._stream_back(request, resp)

    async def _read_prefix(self, request: web.Request) -> tuple[bytes, bool]:
        """A body of unknown size (chunked): read up to ``buffer_limit``. -> (bytes read, more follows)."""
        parts: list[bytes] = []
        size = 0
        content = request.content
        while True:
            chunk = await content.readany()
            if not chunk:
                return b"".join(parts), False
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"the request body is over the limit of {self.max_body} bytes")
            parts.append(chunk)
            if size > self.buffer_limit:
                return b"".join(parts), True

    async def _send_streamed(
        self, request: web.Request, inst: Instance, head: bytes, prefix: bytes, chunked: bool
    ) -> Response:
        """Send a large body as it arrives from the client. Once it starts, the attempt cannot be repeated."""
        conn: Connection = await inst.pool.acquire(self.timeout)  # a connect failure here is still retryable
        waiter = conn.start(head, timeout=self.timeout)
        complete = False
        try:
            size = len(prefix)
            if prefix:
                conn.write(b"%x\r\n%b\r\n" % (len(prefix), prefix) if chunked else prefix)
            content = request.content
            while not waiter.done():  # an upstream may answer (413, 401) before the body is all there
                chunk = await content.readany()
                if not chunk:
                    if chunked:
                        conn.write(b"0\r\n\r\n")
                    complete = True
                    break
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(f"the request body is over the limit of {self.max_body} bytes")
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain()
        except UpstreamError as exc:
            exc.sent = True  # part of the body went: never repeat it
            _drop(waiter)
            conn.abort()
            raise
        except BaseException:
            _drop(waiter)
            conn.abort()
            raise
        finally:
            conn.sent(complete)
        return await waiter

    async def _stream_back(self, request: web.Request, resp: Response) -> web.StreamResponse:
        """A large, chunked or close-delimited response, passed on as it arrives."""
        out = web.StreamResponse(status=resp.status, headers=resp.headers)
        if resp.length is not None:
            out.content_length = resp.length
        rid = request.get("request_id")
        if rid:
            out.headers["X-Request-Id"] = rid  # the host sets it after the handler: too late for a stream
        try:
            await out.prepare(request)
            while True:
                chunk = await resp.read()
                if not chunk:
                    break
                await out.write(chunk)
        except UpstreamError as exc:
            # The head is gone already: cut the client's connection so it sees a truncated body, not a whole one.
            log.warning("%s %s: upstream failed mid-response: %s", request.method, request.path, exc)
            resp.close()
            if request.transport is not None:
                request.transport.abort()
            return out
        except BaseException:
            resp.close()
            raise
        await out.write_eof()
        return out


# aiohttp-apispec's validation middleware (installed by the host for every route) takes an exception path,


def gateway_headers(
    rid: str | None, remote: str | None, secure: bool, host: bytes | None, trace: bytes, framing: bytes
) -> bytes:
    """The header lines the gateway adds to a forwarded request, then ``framing`` (the body's Content-Length or
    Transfer-Encoding and the blank line): the request id, X-Forwarded-*, the trace context (``trace``, from
    :func:`runtime.tracing.traceparent_line`)."""
    parts: list[bytes] = []
    if rid:
        parts.append(b"X-Request-Id: " + rid.encode("ascii") + b"\r\n")
    if remote:
        parts.append(b"X-Forwarded-For: " + remote.encode("ascii", "replace") + b"\r\n")
    parts.append(b"X-Forwarded-Proto: https\r\n" if secure else b"X-Forwarded-Proto: http\r\n")
    parts.append(trace)
    if host:
        parts.append(b"X-Forwarded-Host: " + host + b"\r\n")
    parts.append(framing)
    return b"".join(parts)


class _AuthorizationOnly:
    """What :func:`runtime.auth.bearer_token` reads of a request (``headers.getall``), from the values alone."""

    __slots__ = ("headers", "values")

    def __init__(self, values: list[str]) -> None:
        self.values = values
        self.headers = self

    def getall(self, _name: str, _default: Any = None) -> list[str]:
        return self.values


def _refuse(wait: float) -> None:
    """429 with Retry-After when the client's bucket said to wait ``wait`` seconds (0: go ahead)."""
    if wait:
        raise TooManyRequests(f"too many requests from this client; retry in {wait:.1f} s", retry_after=wait)


def _refuse_dot_segments(path: str) -> None:
    """``/api/catalog/../cart`` would be routed (and policed) as catalog but may be served as cart upstream."""
    if _DOT_SEGMENT.search(path):
        raise BadRequest("the path must not contain '.' or '..' segments")


def _drop(waiter: asyncio.Future[Response]) -> None:
    if waiter.done():
        if not waiter.cancelled():
            waiter.exception()  # retrieved: no "never retrieved" warning
    else:
        waiter.cancel()


def _problem(exc: UpstreamError, service: str) -> Problem:
    """The client's view of a failed hop; the details (which instance, why) go to the log."""
    log.warning("upstream failure (%s) for %s: %s", exc.kind, service, exc)
    if exc.kind == "timeout":
        return GatewayTimeout(f"the {service} service did not answer in time")
    if exc.kind == "busy":
        return ServiceUnavailable(f"the {service} service is at its connection limit; retry shortly", 1.0)
    return BadGateway(f"the {service} service could not be reached or gave an invalid answer")
