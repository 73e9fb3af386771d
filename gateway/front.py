"""The gateway's public port: a lean HTTP/1.1 front for the proxied routes, aiohttp for everything else.

Why: behind aiohttp's server, every proxied request builds a Request and a Response object and walks the host's
middleware chain (request id, metrics, errors, authorize-first, the admin-metrics guard, schema validation):
measured, about half of the gateway's CPU per request. This front parses requests with llhttp (``httptools``,
the parser aiohttp itself uses) on an asyncio protocol and runs the same policy object (:class:`RouteProxy`:
route, token, rate limit, access, affinity, forwarding with retries) on plain values, writing the response with
one ``transport.write``.

Which requests it serves itself (the fast path): HTTP/1.0 or 1.1 requests under a proxied route prefix, with a
plain ``/...`` target (no ``%``-escapes, no fragment), no body or a ``Content-Length`` body of at most
``buffer_limit`` bytes, no ``Expect``, ``Upgrade`` or ``Transfer-Encoding``, no ``Origin`` when CORS is
configured, and tracing off. Everything else, and anything llhttp refuses, is handed to aiohttp: on a message
boundary with no response outstanding, aiohttp's protocol for the connection is made from the runner's server,
takes over the transport and is fed every byte received from the start of that message, so it serves the rest
of the connection's life exactly as it serves a connection of its own (``/health``, ``/metrics``, ``/admin``,
docs, 400 for a malformed request, 413 for a large declared body, streamed uploads, CORS, traced requests).

What a fast-path request keeps of the aiohttp path (the gateway's test-suite runs through both): the request id
(a valid ``X-Request-Id`` passed on, else a new one; echoed), problem+json refusals with the same statuses,
bodies and headers, the ``http_requests``/``http_request_duration_seconds`` samples under the route's canonical
path, the access log, HEAD, keep-alive and ``Connection: close``, HTTP/1.0, pipelining (answered in order,
one at a time), ``Date``/``Server``/``Content-Type`` defaults as aiohttp writes them, streamed large responses
(chunked, or close-delimited for HTTP/1.0) with back-pressure.

Limits: a request head must arrive within ``header_timeout`` (a slowloris is cut) and an idle keep-alive
connection is closed after ``keepalive_timeout``; a head larger than aiohttp's line and field limits allow is
handed to aiohttp, which refuses it. :meth:`Front.stop` closes the listening socket and idle connections, lets
in-flight requests finish (then closes their connections), and aborts what is left after the grace period.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import http
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

from gateway.client import FlowControlled, Response, UpstreamError
from gateway.edge import log_access
from gateway.proxy import RouteProxy, gateway_headers
from gateway.service import EDGE
from gateway.upstreams import Instance
from runtime import tracing
from runtime.errors import Problem
from runtime.web.metrics import METRICS_KEY
from runtime.web.middlewares import request_id_for, request_id_var, unexpected_problem
from runtime.web.resources import AppKeyRuntime
from runtime.web.responses import PROBLEM_JSON, dumps

log = logging.getLogger(__name__)

HEAD_LIMIT = 8190  # a larger head goes to aiohttp, which enforces its line and field limits (8190 bytes each)
MAX_HEADERS = 128  # aiohttp's limit on the number of header fields
PIPELINE_LIMIT = 256 * 1024  # bytes of pipelined requests buffered while one is answered; then reading pauses
HEADER_TIMEOUT = 10.0  # seconds a request head may take to arrive (from its first byte, or from connecting)
# seconds an idle keep-alive connection is kept: aiohttp's own default, so both fronts keep a connection alike
# (load balancers expect the backend to outlast their own idle timeout)
KEEPALIVE_TIMEOUT: float = inspect.signature(RequestHandler.__init__).parameters["keepalive_timeout"].default
_SWEEP = 1.0  # seconds between the timeout sweeps (one timer per front, not one per connection)

_STATUS_LINES = {s.value: b"%d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
_SERVER_LINE = b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
_EMPTY = frozenset({204, 304})
# headers aiohttp's request parser refuses to see twice (RFC 9110 singletons)
_SINGLETONS = frozenset({b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                         b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"})  # fmt: skip


class Front:
    """Serves ``runner``'s gateway application on a listening socket (``runner.setup()`` done first)."""

    def __init__(
        self,
        runner: web.AppRunner,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        keepalive_timeout: float | None = None,
    ) -> None:
        app = runner.app
        server = runner.server
        assert server is not None, "runner.setup() first"
        self.handoff_factory: Callable[[], asyncio.Protocol] = server  # aiohttp's protocol for one connection
        edge = app[EDGE]
        self.metrics = app[METRICS_KEY]
        self.max_body = edge.options.max_body
        self.buffer_limit = edge.options.buffer_limit
        self.access_log = edge.options.access_log
        self.cors = edge.cors is not None
        # A process in a cluster forwards requests between its nodes in a middleware: aiohttp serves everything.
        self.enabled = app[AppKeyRuntime].cluster is None
        self.header_timeout = header_timeout
        # the runner's setting when it has one (AppRunner(keepalive_timeout=...)), else aiohttp's default
        self.keepalive_timeout = (
            keepalive_timeout
            if keepalive_timeout is not None
            else float(getattr(server, "_kwargs", {}).get("keepalive_timeout", KEEPALIVE_TIMEOUT))
        )
        # (prefix, its proxy, the resource's canonical path for the metrics), in aiohttp's matching order
        self.routes: list[tuple[str, RouteProxy, str]] = []
        # Routes registered before a proxied prefix that may match paths under it (aiohttp tries them first):
        # such paths go to aiohttp. (static beginning of the route, whether it is the whole path)
        self.shadows: list[tuple[str, bool]] = []
        earlier: list[tuple[str, bool]] = []
        for resource in app.router.resources():
            proxy = next(
                (owner for r in resource if isinstance(owner := getattr(r.handler, "__self__", None), RouteProxy)),
                None,
            )
            if proxy is None:
                static = resource.canonical.split("{", 1)[0]
                earlier.append((static, isinstance(resource, web.PlainResource)))
                continue
            prefix = proxy.route.prefix
            self.routes.append((prefix, proxy, resource.canonical))
            for static, exact in earlier:
                if static == prefix or static.startswith(prefix + "/") or (not exact and prefix.startswith(static)):
                    self.shadows.append((static, exact))
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.closing = False
        self.date_line = b""
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None  # set when the last in-flight request ends during stop()

    async def start(self, host: str, port: int, *, backlog: int = 1024, reuse_address: bool = True) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self._date()
        self.server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=reuse_address
        )
        self._sweeper = loop.call_later(_SWEEP, self._sweep)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening, close idle connections, let in-flight requests finish (``grace`` seconds at most).
        Connections handed to aiohttp are closed by the runner's cleanup, which follows."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if any(c.busy for c in self.connections):
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                busy = [c for c in self.connections if c.busy]
                log.warning("%d requests still in flight after %g s: cut", len(busy), grace)
                for conn in busy:
                    conn.abort()
        # the others were closed gracefully (their last answer is flushed, then the socket closes)

    def _done(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if self._idle is not None and not any(c.busy for c in self.connections):
            self._idle.set()

    def _date(self) -> None:
        self.date_line = b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    def _sweep(self) -> None:
        """Once a second: the Date header, and the connections past their head or keep-alive deadline."""
        self._date()
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline and c.deadline < now and not c.busy]:
            conn.close()
        if not self.closing:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def match(self, path: str) -> tuple[RouteProxy, str, str] | None:
        """The proxy of a fast-path ``path``: (proxy, the path after its prefix, the canonical route) or None."""
        for prefix, proxy, canonical in self.routes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                for static, exact in self.shadows:
                    if path == static if exact else path.startswith(static):
                        return None
                return proxy, path[len(prefix) :], canonical
        return None


class _Plan(NamedTuple):
    """A request the fast path serves, as parsed."""

    method: str
    target: bytes
    path: str
    keep_alive: bool
    length: int
    headers: list[tuple[bytes, bytes]]
    http10: bool
    proxy: RouteProxy
    tail: str
    canonical: str
    authorization: list[str]  # the Authorization headers' values
    request_id: str  # the first X-Request-Id's value, "" without one
    host: bytes | None
    trace: dict[str, str] | None  # traceparent and tracestate


class _Exchange(NamedTuple):
    """A request whose first attempt is in flight without a task (:meth:`_Connection._start`): what its response
    callback needs, and a retry repeats."""

    plan: _Plan
    start: float  # time.perf_counter() when the request was taken
    rid: str
    inst: Instance  # the instance of the attempt
    request_line: bytes
    block: bytes
    body: bytes | None
    key: str | None  # the affinity key


async def _given(resp: Response, _note: Callable[[str], None] | None) -> Response:
    """A response at hand, as :meth:`_Connection._serve` takes one (a streamed answer's head)."""
    return resp


class _Connection(FlowControlled):
    """One client connection, until it closes or is handed to aiohttp. Requests are answered one at a time, in
    order; ``buf`` holds what has arrived from the start of the next request on."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.buf = b""
        self.busy = False  # a request is being answered
        self.deadline = 0.0  # time.monotonic() by which the next head must be in (0: none)
        self.head_deadline = False  # the deadline is a head's (bytes of it arrived), not the idle one
        self.reading_paused = False
        self.handed_off = False
        self.closed = False
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        # the message being parsed (parser callbacks)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.fed = 0  # bytes of the current request's head given to the parser
        self.plan: _Plan | None = None  # the current request's, once its head is in
        self.keep_alive = True
        self.version = ""
        self.method = b""
        self.task: asyncio.Future[None] | None = None  # the request's task, when it has one (_serve)
        self.exchange: _Exchange | None = None  # the request's first attempt, in flight without a task
        self.streaming = False  # a streamed answer's head is written, its body is not finished

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP server's transport
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (tuple, list)) else None
        front = self.front
        if front.closing:
            transport.close()
            return
        front.connections.add(self)
        self.deadline = time.monotonic() + front.header_timeout
        if not front.enabled:
            self._hand_off()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self.busy:
            self.front._done(self)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._next()
        elif len(self.buf) > PIPELINE_LIMIT and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- parser callbacks ---------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp strips the whitespace before a value, aiohttp also the whitespace after it
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        # read here: llhttp resets its flags once the message is complete
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        self.version = parser.get_http_version()
        self.method = parser.get_method()
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True

    # -- requests -----------------------------------------------------------------------------------

    def _next(self) -> None:
        try:
            while self._advance():  # a request answered at once (a refusal): take the next one
                pass
        except Exception:  # a bug of ours: never a traceback to the client, never a stuck connection
            log.exception("gateway front: cannot take the next request from %s", self.remote)
            self.abort()

    def _advance(self) -> bool:
        """Take the next whole request from ``buf``: serve it, hand the connection off, or wait for more bytes.
        -> True when the request was answered at once and the next one may be taken (a loop in :meth:`_next`,
        not a recursion: a pipeline of refused requests is answered at one stack depth).

        The head is given to llhttp as it arrives (``fed`` bytes so far), so a malformed or foreign stream (a
        TLS hello, bare LF line ends) is handed to aiohttp, which refuses it, without waiting for a blank line
        that may never come. The body (``Content-Length``, at most ``buffer_limit``) is given once whole."""
        buf = self.buf
        if self.handed_off or self.closed:
            return False
        if not buf:
            self.head_deadline = False
            return False
        fed = self.fed
        if fed == 0 and buf[0] in b"\r\n":  # empty lines before a request: llhttp's and aiohttp's business
            return self._hand_off()
        plan = self.plan
        if plan is None:
            end = buf.find(b"\r\n\r\n", fed - 3 if fed > 3 else 0)
            upto = end + 4 if end >= 0 else len(buf)
            if upto > HEAD_LIMIT:
                return self._hand_off()  # aiohttp enforces its limits on the head
            if upto > fed:
                refused = False
                try:
                    # (the whole buffer as it is in the common case: one head in one read)
                    self.parser.feed_data(buf if fed == 0 and upto == len(buf) else memoryview(buf)[fed:upto])
                except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp answers these
                    refused = True  # (handed off outside the except: aiohttp's own log needs no context)
                if refused:
                    return self._hand_off()
                self.fed = upto
            if end < 0:
                if not self.head_deadline:
                    self.head_deadline = True
                    self.deadline = time.monotonic() + self.front.header_timeout
                return False
            if not self.headers_done or len(self.headers) > MAX_HEADERS:
                return self._hand_off()
            plan = self._plan()
            if plan is None:
                return self._hand_off()
            self.plan = plan
        head_len = self.fed
        length = plan.length
        if len(buf) < head_len + length:
            if not self.head_deadline:  # the body has the rest of the head's time to arrive
                self.head_deadline = True
                self.deadline = time.monotonic() + self.front.header_timeout
            return False
        body = buf[head_len : head_len + length] if length else None
        if body is not None:
            try:
                self.parser.feed_data(body)
            except httptools.HttpParserError:  # pragma: no cover - llhttp counted the same Content-Length
                return self._hand_off()
        if not self.complete:  # pragma: no cover - as above
            return self._hand_off()
        self.buf = buf[head_len + length :]
        self.fed = 0
        self.plan = None
        self.url = b""
        self.headers = []
        self.headers_done = self.complete = False
        self.busy = True
        self.deadline = 0.0
        self.head_deadline = False
        return self._start(plan, body)

    def _plan(self) -> _Plan | None:
        """The fast path's view of the parsed head, or None when aiohttp should serve the request."""
        front = self.front
        target = self.url
        # find(), not ``b"%" in target``: CPython 3.11's bytes.__contains__ first tries its argument as an integer
        # and formats the TypeError it then discards, ten times the cost of the search (measured with callgrind)
        if not target.startswith(b"/") or target.find(b"%") >= 0 or target.find(b"#") >= 0 or not target.isascii():
            return None
        version = self.version
        if version != "1.1" and version != "1.0":
            return None
        if tracing.enabled():
            return None  # aiohttp's path opens the server span the proxy span nests in
        length = 0
        authorization: list[str] = []
        rid = ""
        host: bytes | None = None
        trace: dict[str, str] | None = None
        seen: set[bytes] | None = None
        for name, value in self.headers:
            lname = name.lower()
            if value.find(b"\0") >= 0:
                return None  # aiohttp refuses it (400)
            if lname in _SINGLETONS:  # aiohttp refuses a second one (400)
                seen = seen or set()
                if lname in seen:
                    return None
                seen.add(lname)
            if lname == b"authorization":
                authorization.append(value.decode("utf-8", "surrogateescape"))
            elif lname == b"host":
                host = value
            elif lname == b"x-request-id":
                if not rid:
                    rid = value.decode("utf-8", "surrogateescape")
            elif lname == b"content-length":
                length = int(value)  # digits only, one value: checked by llhttp
            elif lname == b"traceparent" or lname == b"tracestate":
                trace = trace or {}
                trace.setdefault(lname.decode(), value.decode("latin-1"))
            elif lname in (b"transfer-encoding", b"expect", b"upgrade") or (lname == b"origin" and front.cors):
                return None
        if length > front.buffer_limit:
            return None  # streamed (or refused with 413) by the aiohttp path
        if host is None and version == "1.1":
            return None  # aiohttp refuses it (400)
        path = target.split(b"?", 1)[0].decode("utf-8", "surrogateescape")
        found = front.match(path)
        if found is None:
            return None
        method = self.method.decode("ascii")
        return _Plan(
            method, target, path, self.keep_alive, length, self.headers, version == "1.0", *found,
            authorization, rid, host, trace,
        )  # fmt: skip

    def _start(self, plan: _Plan, body: bytes | None) -> bool:
        """Serve a request. The common case takes no task: the policy decides at once
        (:meth:`RouteProxy.admit_now`), the first attempt goes out on an idle pooled connection and its response
        future calls :meth:`_answered`, which writes the answer. A task (:meth:`_serve`) takes over whatever has
        to wait: a token to verify in full, a shared rate-limit store, a guarded sign-in, a retry's back-off, a
        streamed answer. -> True when the answer is written already (a refusal) and the next request may go."""
        front = self.front
        proxy = plan.proxy
        method = plan.method
        start = time.perf_counter()
        rid = request_id_for(plan.request_id)
        token = request_id_var.set(rid)  # for this step's log lines; the response callback's context keeps it too
        try:
            try:
                raw_path = plan.target.decode("ascii", "surrogateescape")
                admitted = proxy.admit_now(method, raw_path, plan.path, plan.tail, plan.authorization, self.remote)
                if admitted is None or admitted[1] is not None:
                    obtain = functools.partial(self._obtain, plan, body, rid, admitted)
                    self.task = front.loop.create_task(self._serve(plan, start, rid, obtain))
                    return False
                key = admitted[0]
                request_line, block, body = self._upstream_request(plan, rid, body)
                inst = proxy.pick(key, None, None)
                try:
                    # a future with a pooled connection at hand; else a task opens one (or waits for one)
                    pending = proxy.request(inst, request_line, block, body, method == "HEAD")
                    future = pending if isinstance(pending, asyncio.Future) else asyncio.ensure_future(pending)
                    self.exchange = _Exchange(plan, start, rid, inst, request_line, block, body, key)
                    future.add_done_callback(self._answered)
                except BaseException:
                    proxy.abandoned(inst)
                    raise
                return False
            except Problem as problem:
                status = problem.status
                keep_alive = plan.keep_alive and not front.closing  # a stopping front closes after the answer
                keep_alive = self._write_problem(problem, plan.path, rid, method, keep_alive, plan.http10)
        except Exception:  # the front's own bugs: the proxy's failures are problems already
            log.exception("unhandled error on %s %s (request %s)", method, plan.path, rid)
            status = 500
            keep_alive = False
            self._write_problem(unexpected_problem(rid), plan.path, rid, method, False, plan.http10)
        finally:
            request_id_var.reset(token)
        self._record(plan, start, rid, status, "-")
        return self._finished(keep_alive)

    def _answered(self, future: asyncio.Future[Response]) -> None:
        """The first attempt of :meth:`_start` ended: the answer is written, or a task follows (a retry, a
        streamed answer)."""
        x = self.exchange
        assert x is not None
        self.exchange = None
        plan = x.plan
        method = plan.method
        front = self.front
        status = 500
        keep_alive = False
        try:
            try:
                outcome = self._outcome(x, future)
            except Problem as problem:
                status = problem.status
                keep_alive = plan.keep_alive and not front.closing
                keep_alive = self._write_problem(problem, plan.path, x.rid, method, keep_alive, plan.http10)
            else:
                if not isinstance(outcome, Response) or outcome.body is None:
                    obtain = (
                        functools.partial(self._retry, x, outcome)
                        if not isinstance(outcome, Response)
                        else functools.partial(_given, outcome)
                    )
                    self.task = front.loop.create_task(self._serve(plan, x.start, x.rid, obtain, x.inst.url))
                    return
                status = outcome.status
                keep_alive = plan.keep_alive and not front.closing
                keep_alive = self._write_response(outcome, outcome.body, x.rid, method, keep_alive, plan.http10)
        except (Exception, asyncio.CancelledError):  # as in _serve; a callback has nobody to cancel
            log.exception("unhandled error on %s %s (request %s)", method, plan.path, x.rid)
            status = 500
            keep_alive = False
            self._write_problem(unexpected_problem(x.rid), plan.path, x.rid, method, False, plan.http10)
        self._record(plan, x.start, x.rid, status, x.inst.url)
        if self._finished(keep_alive):
            self._next()

    @staticmethod
    def _outcome(x: _Exchange, future: asyncio.Future[Response]) -> Response | float:
        """The first attempt's response, or the back-off before a retry; a failure nobody retries is raised as
        the client's :class:`Problem`."""
        proxy = x.plan.proxy
        try:
            resp = future.result()
        except UpstreamError as exc:
            return proxy.failed(x.inst, exc, x.plan.method, x.plan.path, 0, True)
        except BaseException:
            proxy.abandoned(x.inst)
            raise
        proxy.succeeded(x.inst)
        return resp

    async def _obtain(
        self,
        plan: _Plan,
        body: bytes | None,
        rid: str,
        admitted: tuple[str | None, str | None] | None,
        note: Callable[[str], None] | None,
    ) -> Response:
        """The response to a request :meth:`_start` could not send at once: the policy (``admitted``: its
        answer, when :meth:`RouteProxy.admit_now` had one), then the forwarding with its retries."""
        proxy = plan.proxy
        method = plan.method
        if admitted is None:
            raw_path = plan.target.decode("ascii", "surrogateescape")
            admitted = await proxy.admit(method, raw_path, plan.path, plan.tail, plan.authorization, self.remote)
        key, guard = admitted
        request_line, block, body = self._upstream_request(plan, rid, body)
        if guard is None:
            return await proxy.forward(method, plan.path, request_line, block, body, key, None, note)
        exchange = functools.partial(proxy.forward, method, plan.path, request_line, block, body, None, None, note)
        return await proxy.guarded(guard, self.remote, exchange)

    async def _retry(self, x: _Exchange, delay: float, note: Callable[[str], None] | None) -> Response:
        """The attempts after :meth:`_start`'s first one failed, after the back-off ``delay``."""
        await asyncio.sleep(delay)
        plan = x.plan
        return await plan.proxy.forward(
            plan.method, plan.path, x.request_line, x.block, x.body, x.key, None, note, (1, x.inst)
        )

    def _upstream_request(self, plan: _Plan, rid: str, body: bytes | None) -> tuple[bytes, bytes, bytes | None]:
        """(request line, the headers after Host with the body framing, body) of the forwarded request."""
        method = plan.method
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        framing = b"Content-Length: %d\r\n\r\n" % len(body) if body is not None else b"\r\n"
        # (a traced front sends its requests to aiohttp: only the client's own trace context is passed on)
        trace = tracing.traceparent_line(plan.trace) if plan.trace else b""
        block = plan.proxy.header_block(
            plan.headers, gateway_headers(rid, self.remote, False, plan.host, trace, framing)
        )
        return b"%s %s HTTP/1.1\r\n" % (method.encode(), plan.target), block, body

    async def _serve(
        self,
        plan: _Plan,
        start: float,
        rid: str,
        obtain: Callable[[Callable[[str], None] | None], Awaitable[Response]],
        upstream: str = "",
    ) -> None:
        """A request in a task: ``obtain(note)`` gives the upstream's response (``note`` is told the instance
        of each attempt; ``upstream``: the one tried before), which is written back, streamed when large."""
        method, path, http10 = plan.method, plan.path, plan.http10
        front = self.front
        token = request_id_var.set(rid)
        status = 500
        keep_alive = plan.keep_alive
        noted: list[str] = [upstream] if upstream else []  # the instances tried, for the access log
        try:
            try:
                resp = await obtain(noted.append if front.access_log else None)
            except Problem as problem:
                status = problem.status
                keep_alive = keep_alive and not front.closing  # a stopping front closes after the answer
                keep_alive = self._write_problem(problem, path, rid, method, keep_alive, http10)
            else:
                status = resp.status
                keep_alive = keep_alive and not front.closing
                if resp.body is not None:
                    keep_alive = self._write_response(resp, resp.body, rid, method, keep_alive, http10)
                else:
                    keep_alive = await self._stream_back(resp, rid, method, keep_alive, http10)
        except Exception:
            # (the front's own bugs: the proxy's failures are problems already)
            log.exception("unhandled error on %s %s (request %s)", method, path, rid)
            status = 500
            keep_alive = False
            if self.streaming:  # a head is out already: cut the connection, the client sees a truncated body
                self.abort()
            else:
                self._write_problem(unexpected_problem(rid), path, rid, method, False, http10)
        finally:
            request_id_var.reset(token)
            self._record(plan, start, rid, status, noted[-1] if noted else "-")
        if self._finished(keep_alive):
            self._next()

    def _record(self, plan: _Plan, start: float, rid: str, status: int, upstream: str) -> None:
        """The request's metrics samples and access log line (``upstream``: the last instance tried, or "-")."""
        front = self.front
        front.metrics.observe(plan.method, plan.canonical, status, time.perf_counter() - start)
        if front.access_log:
            log_access(plan.method, plan.path, status, start, upstream, rid, self.remote)

    def _finished(self, keep_alive: bool) -> bool:
        """The answer is out: -> True when the connection takes the next request (the caller takes it)."""
        self.busy = False
        front = self.front
        if self.closed:
            front._done(self)
            return False
        if not keep_alive or front.closing:
            self.close()
            return False
        self.deadline = time.monotonic() + front.keepalive_timeout
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return True

    # -- responses ----------------------------------------------------------------------------------

    def _head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        rid: str,
        method: str,
        length: int | None,
        keep_alive: bool,
        http10: bool,
    ) -> list[bytes]:
        """A response head as aiohttp writes it for a web.Response (``length``: the body's size, None when it
        streams with no size known): Content-Length, Content-Type, Date and Server defaults, Connection. As parts
        to join once with the body (bytes: uvloop writes a bytearray through a memoryview)."""
        out = [b"HTTP/1.0 " if http10 else b"HTTP/1.1 ", _STATUS_LINES.get(status) or b"%d \r\n" % status]
        add = out.append
        empty = method == "HEAD" or status < 200 or status in _EMPTY
        has_length = has_type = has_date = has_server = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"x-request-id":
                continue  # the gateway's own replaces the upstream's
            if lname == b"content-length":
                if status < 200 or status == 204:
                    continue
                has_length = True
            elif lname == b"content-type":
                has_type = True
            elif lname == b"date":
                has_date = True
            elif lname == b"server":
                has_server = True
            if not value.isascii():  # as aiohttp's path writes it: decoded as UTF-8 (U+FFFD for what is not)
                value = value.decode("utf-8", "replace").encode()
            out += (name, b": ", value, b"\r\n")
        if (
            not has_length
            and not (status < 200 or status == 204)
            and length is not None
            and (length or not (status == 304 or method == "HEAD"))
        ):
            add(b"Content-Length: %d\r\n" % length)
            has_length = True
        if not empty and length != 0 and not has_type:
            add(b"Content-Type: application/octet-stream\r\n")
        if not has_date:
            add(self.front.date_line)
        if not has_server:
            add(_SERVER_LINE)
        if length is None and not empty and not has_length:
            if http10:
                keep_alive = False  # close-delimited
            else:
                add(b"Transfer-Encoding: chunked\r\n")
        if keep_alive:
            if http10:
                add(b"Connection: keep-alive\r\n")
        elif not http10:
            add(b"Connection: close\r\n")
        out += (b"X-Request-Id: ", rid.encode(), b"\r\n\r\n")
        return out

    def _write_response(
        self, resp: Response, body: bytes, rid: str, method: str, keep_alive: bool, http10: bool
    ) -> bool:
        out = self._head(resp.status, resp.raw_headers, rid, method, len(body), keep_alive, http10)
        if body and method != "HEAD" and resp.status >= 200 and resp.status not in _EMPTY:
            out.append(body)
        if self.transport is not None:
            self.transport.write(b"".join(out))
        return keep_alive

    def _write_problem(
        self, problem: Problem, path: str, rid: str, method: str, keep_alive: bool, http10: bool
    ) -> bool:
        body = dumps(problem.to_dict(instance=path))
        headers = [(k.encode(), v.encode()) for k, v in problem.headers.items()]
        headers.append((b"Content-Type", PROBLEM_JSON.encode()))
        out = self._head(problem.status, headers, rid, method, len(body), keep_alive, http10)
        if method != "HEAD":
            out.append(body)
        if self.transport is not None:
            self.transport.write(b"".join(out))
        return keep_alive

    async def _stream_back(self, resp: Response, rid: str, method: str, keep_alive: bool, http10: bool) -> bool:
        """A large, chunked or close-delimited upstream body, passed on as it arrives, with back-pressure."""
        headers = resp.raw_headers
        if resp.length is not None:
            headers = [*headers, (b"Content-Length", b"%d" % resp.length)]
        chunked = resp.length is None and not http10
        if resp.length is None and http10:
            keep_alive = False
        transport = self.transport
        if transport is None:
            resp.close()
            return False
        transport.write(b"".join(self._head(resp.status, headers, rid, method, resp.length, keep_alive, http10)))
        self.streaming = True
        try:
            while True:
                chunk = await resp.read()
                if self.transport is None:  # the client left
                    resp.close()
                    return False
                if not chunk:
                    break
                self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self._write_paused:
                    self._drain = asyncio.get_running_loop().create_future()
                    await self._drain
                    self._drain = None
        except UpstreamError as exc:
            # The head is gone already: cut the client's connection so it sees a truncated body, not a whole one.
            log.warning("%s: upstream failed mid-response: %s", rid, exc)
            resp.close()
            self.abort()
            return False
        except BaseException:
            resp.close()
            raise
        if chunked and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        self.streaming = False
        return keep_alive

    # -- the connection -----------------------------------------------------------------------------

    def _hand_off(self) -> bool:
        """aiohttp's protocol takes the connection over, starting with the bytes of the current request.
        -> False: the front takes no more requests from this connection (for :meth:`_advance`)."""
        transport = self.transport
        if transport is None or self.handed_off:
            return False
        self.handed_off = True
        self.deadline = 0.0
        self.front.connections.discard(self)
        protocol = self.front.handoff_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        buf, self.buf = self.buf, b""
        if buf:
            protocol.data_received(buf)
        self.front._done(self)
        return False

    def close(self) -> None:
        if self.transport is not None and not self.handed_off:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.handed_off:
            self.transport.abort()


async def serve(runner: web.AppRunner, host: str, port: int, **kwargs: Any) -> Front:
    """Start a :class:`Front` for ``runner`` (set up) on ``host:port``."""
    front = Front(runner, **kwargs)
    await front.start(host, port)
    return front
