"""A lean HTTP/1.1 client for the gateway's upstream hop.

Why not ``aiohttp.ClientSession``: per request it builds a request object, a response object, a cookie jar
pass, tracing hooks, header multidicts and a timer context — several times the cost of the proxying itself
(measured: a naive aiohttp proxy keeps ~0.23 of the upstream's throughput). The upstreams are our own services
on plain HTTP/1.1, so this module speaks just that, on asyncio protocols:

* :class:`Pool`: keep-alive connections to one instance (LIFO reuse keeps warm sockets busy), a cap on open
  connections with a FIFO of waiters, idle connections expire before the upstream closes them;
* :class:`Connection`: writes a prebuilt request head (and body) with one ``transport.write`` and parses the
  response as it arrives with llhttp (``httptools``, the parser aiohttp itself uses): no hand-written framing.
  Bodies up to ``buffer_limit`` (Content-Length, chunked or close-delimited) are collected and handed over
  whole with the head (one future per request, one write back to the client, and a malformed body is a
  :class:`ProtocolError` -> 502 rather than a truncated answer); larger ones are streamed through
  :meth:`Connection.read` with back-pressure (reading pauses while the client is slower than the upstream).
  Anything llhttp refuses, a transfer-coding other than ``chunked``, a status outside 100-599 or a protocol
  upgrade is a :class:`ProtocolError` and the connection is closed. Hop-by-hop headers and every header named
  in the upstream's ``Connection`` header are dropped.

Errors are :class:`UpstreamError` subclasses with ``sent``: whether the upstream may have seen the request,
which decides if a retry is safe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable

import httptools

log = logging.getLogger(__name__)

_HEAD_LIMIT = 64 * 1024  # a response head larger than this is a protocol error
_READ_HIGH_WATER = 1024 * 1024  # streamed body bytes buffered before reading from the upstream pauses
_READ_LOW_WATER = 256 * 1024
_JOIN_LIMIT = 16 * 1024  # request bodies up to this size are written together with the head

# Response headers that describe the hop, not the message (RFC 9110 §7.6.1); aiohttp writes its own framing.
# Every header the upstream names in its Connection header is dropped too.
_HOP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length", b"te",
     b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"}
)  # fmt: skip

# connection states: no request outstanding, waiting for the head, in the body, closed
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


class UpstreamError(Exception):
    """The hop failed. ``sent``: the request may have reached the upstream (a retry may repeat it)."""

    kind = "reset"

    def __init__(self, detail: str, *, sent: bool = True) -> None:
        super().__init__(detail)
        self.sent = sent


class ConnectFailed(UpstreamError):
    kind = "connect"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, sent=False)


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class ProtocolError(UpstreamError):
    kind = "protocol"


class PoolExhausted(UpstreamError):
    kind = "busy"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, sent=False)


class Response:
    """An upstream response head; ``body`` holds the whole body, or is None when it streams via ``read()``.
    ``raw_headers``: the end-to-end headers as received (names and values as bytes, hop-by-hop ones dropped)."""

    __slots__ = ("_conn", "body", "length", "raw_headers", "status")

    def __init__(
        self,
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        length: int | None,
        conn: Connection,
    ) -> None:
        self.status = status
        self.raw_headers = raw_headers
        self.body = body
        self.length = length  # Content-Length of a streamed body, when the upstream sent one
        self._conn = conn

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers decoded (names as latin-1, values as UTF-8 with U+FFFD for what is not)."""
        return [(n.decode("latin-1"), v.decode("utf-8", "replace")) for n, v in self.raw_headers]

    async def read(self) -> bytes:
        """The next chunk of a streamed body; b"" at its end."""
        return await self._conn.read()

    def close(self) -> None:
        """Give up on a streamed body (the client left): the connection cannot be reused."""
        self._conn.abort()


class _Malformed(Exception):
    """Raised from a parser callback: the response breaks a rule llhttp leaves to us."""


class FlowControlled(asyncio.Protocol):
    """A protocol that waits for its transport's buffer to drain (``pause_writing``/``resume_writing``): a writer
    finding ``_write_paused`` set awaits a fresh ``_drain`` future, which ``resume_writing`` resolves. Shared by
    the upstream connection and the gateway's front (:mod:`gateway.front`)."""

    _drain: asyncio.Future[None] | None
    _write_paused: bool

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)


class Connection(FlowControlled):
    """One keep-alive connection to an upstream instance; one request at a time (no pipelining).

    Responses are parsed by llhttp (``httptools``), which does the framing (status line, header syntax,
    Content-Length, chunk sizes and extensions, trailers) and refuses malformed input; the callbacks add the
    gateway's own rules (only ``chunked`` as a transfer-coding, a 1xx-5xx status, no protocol upgrades) and
    drop hop-by-hop headers, including every header the upstream names in its ``Connection`` header.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.disposed = False  # its pool slot is given back
        self._state = _CLOSED
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._head_buf = b""  # an incomplete head of the answer to HEAD
        self._waiter: asyncio.Future[Response] | None = None
        self._timeout = 0.0
        self._deadline = 0.0  # watched by the pool's sweep while the connection is busy
        self._no_body = False
        self._keep_alive = True
        # the response being parsed
        self._in_head = False  # header callbacks are the head's (after it: trailers, ignored)
        self._interim = False  # a 1xx response: the final one follows
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._chunked = False
        self._connection: bytes | None = None  # the Connection header's value
        self._until_eof = False  # a close-delimited body
        self._done = False  # the message is complete
        self._buffered = False  # body collected whole and given with the head
        self._parts: list[bytes] = []
        self._size = 0
        # streamed body
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reader: asyncio.Future[None] | None = None
        self._body_done = False
        self._error: UpstreamError | None = None
        self._reading_paused = False
        # request body streaming (flow control on our writes)
        self._sending = False  # a streamed request body is still going out
        self._done_while_sending = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a connection made by create_connection is an asyncio.Transport
        self._state = _IDLE

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._state = _CLOSED
        self._keep_alive = False
        if state == _BODY and self._until_eof and not self._done:
            # a close-delimited body ends with the connection
            if self._buffered:
                self._complete(b"".join(self._parts))
            else:
                self._end_body()
        elif state in (_HEAD, _BODY):
            self._fail(UpstreamError(f"upstream closed the connection: {exc or 'EOF'}", sent=True))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamError("upstream closed the connection", sent=True))
        self._dispose()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _HEAD:
            if self._no_body:
                self._head_only(data)
                return
            self._head_bytes += len(data)
        elif state != _BODY:
            if state == _IDLE and data:
                # bytes nobody asked for: the stream is out of step; never reuse it
                log.warning("upstream %s sent %d unexpected bytes; closing the connection", self.pool.name, len(data))
                self.abort()
            return
        try:
            self._parser.feed_data(data)
        except (
            httptools.HttpParserError,
            httptools.HttpParserUpgrade,
        ) as exc:  # a callback's own error is its __context__
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if self._done:  # a whole response, then bytes that do not belong to it
                log.warning(
                    "upstream %s sent bytes past the response (%s); closing the connection", self.pool.name, cause
                )
                self._keep_alive = False
            else:
                self._protocol_error(f"malformed response: {cause}")
                return
        if self._done and self._state == _BODY:
            if self._buffered:
                parts = self._parts
                self._complete(parts[0] if len(parts) == 1 else b"".join(parts))
            elif not self._body_done:
                self._end_body()
        elif self._state == _HEAD and self._head_bytes > _HEAD_LIMIT:
            self._protocol_error("response head too large")

    def _head_only(self, data: bytes) -> None:
        """The answer to HEAD: llhttp does not know the request method and would wait for the body the head
        announces, so it is given the heads alone (interim ones, then the final one) and a fresh parser follows."""
        buf = self._head_buf + data if self._head_buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _HEAD_LIMIT:
                    self._protocol_error("response head too large")
                else:
                    self._head_buf = buf
                return
            try:
                self._parser.feed_data(buf[: end + 4])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
                self._protocol_error(f"malformed response: {cause}")
                return
            buf = buf[end + 4 :]
            if self._done:
                break
        self._head_buf = b""
        self._parser = httptools.HttpResponseParser(self)
        if buf:
            log.warning("upstream %s sent a body with its answer to HEAD; closing the connection", self.pool.name)
            self._keep_alive = False
        self._complete(b"")

    # -- parser callbacks (httptools) ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            raise _Malformed("a response nobody asked for")
        self._in_head = True
        self._headers = []
        self._length = None
        self._chunked = False
        self._connection = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: not passed on
        # (find(), not ``in``: see gateway.front._plan)
        if value.find(b"\r") >= 0 or value.find(b"\n") >= 0:  # llhttp refuses these already; never let one through
            raise _Malformed("a header value with CR or LF")
        lname = name.lower()
        if lname in _HOP_RESPONSE:
            if lname == b"content-length":
                self._length = int(value)  # digits only and no duplicates: checked by llhttp
            elif lname == b"transfer-encoding":
                # Only "chunked" is understood; anything else (gzip, xchunked, "gzip, chunked") would be
                # framed or decoded wrongly, so it is refused rather than guessed at.
                if self._chunked or value.strip().lower() != b"chunked":
                    raise _Malformed(f"unsupported transfer-coding {value[:40]!r}")
                self._chunked = True
            elif lname == b"connection":
                self._connection = value if self._connection is None else self._connection + b"," + value
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101 or status < 100:
                raise _Malformed("protocol upgrades are not proxied")
            self._interim = True  # 103 Early Hints and the like: the final response follows
            return
        if status > 599:
            raise _Malformed(f"status {status} is out of range")
        if self._chunked and self._length is not None:  # llhttp refuses it too
            raise _Malformed("both Content-Length and Transfer-Encoding")
        self._status = status
        if self._connection is not None:
            named = connection_tokens(self._connection)
            if named:  # headers the upstream marked hop-by-hop
                self._headers = [(n, v) for n, v in self._headers if n.lower() not in named]
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _BODY
        self._parts = []
        self._size = 0
        length = self._length
        if self._no_body:
            if length is not None:
                self._headers.append((b"Content-Length", b"%d" % length))  # HEAD: the size the GET would have
            # keep-alive by the version and Connection alone (llhttp would judge by the body it expects)
            tokens = self._connection.lower() if self._connection is not None else b""
            if self._parser.get_http_version() == "1.0":
                self._keep_alive = b"keep-alive" in tokens
            else:
                self._keep_alive = b"close" not in tokens
            self._done = True
            return
        self._until_eof = not self._chunked and length is None and status != 204 and status != 304
        if self._until_eof:
            self._keep_alive = False
        if length is not None and length > self.pool.buffer_limit:
            self._stream(length)
        else:
            # Collected whole up to buffer_limit (chunked and close-delimited bodies too), so a small answer goes
            # back in one write and a malformed one is a 502, not a truncated 200.
            self._buffered = True

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        if self._buffered:
            self._parts.append(body)
            self._size += len(body)
            if self._size > self.pool.buffer_limit:
                self._stream(None)
        else:
            self._emit(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._state == _BODY:
            self._done = True

    # -- requests -----------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes | None, *, no_body: bool, timeout: float) -> asyncio.Future[Response]:
        """Write the request; the future gives the response head (with the whole body when it is small)."""
        if self.disposed or self._state == _CLOSED:  # closed while handed over: never sent
            waiter = self.loop.create_future()
            waiter.set_exception(UpstreamError(f"upstream {self.pool.name} closed the connection", sent=False))
            return waiter
        self._begin(no_body, timeout)
        transport = self.transport
        assert transport is not None
        if body and len(body) <= _JOIN_LIMIT:
            transport.write(head + body)  # one segment: copying a small body is cheaper than a second syscall
        else:
            transport.write(head)
            if body:
                transport.write(body)
        return self._waiter  # type: ignore[return-value]  # set by _begin just above

    def start(self, head: bytes, *, timeout: float) -> asyncio.Future[Response]:
        """Write only the head; the body follows with :meth:`write` and :meth:`drain`, then :meth:`sent`."""
        self._begin(False, timeout)
        self._sending = True
        self._done_while_sending = False
        self.transport.write(head)  # type: ignore[union-attr]  # connected: the pool only hands out live connections
        return self._waiter  # type: ignore[return-value]  # set by _begin just above

    def sent(self, complete: bool) -> None:
        """The streamed body is over (``complete``) or given up. A body cut short, or a response that came back
        before the body ended, leaves the connection out of step with the upstream: it is never reused."""
        self._sending = False
        if not complete:
            self._keep_alive = False
        if self._done_while_sending:
            self.abort()

    def write(self, data: bytes) -> None:
        if self._state == _CLOSED:
            raise UpstreamError("upstream closed the connection while the request body was sent", sent=True)
        self.transport.write(data)  # type: ignore[union-attr]  # connected: checked _CLOSED just above

    async def drain(self) -> None:
        if self._write_paused and self._state != _CLOSED:
            self._drain = self.loop.create_future()
            await self._drain

    def _begin(self, no_body: bool, timeout: float) -> None:
        self._state = _HEAD
        self._head_bytes = 0
        self._head_buf = b""
        self._no_body = no_body
        self._keep_alive = True
        self._done = False
        self._buffered = False
        self._until_eof = False
        self._interim = False
        self._error = None
        self._body_done = False
        self._waiter = self.loop.create_future()
        self._timeout = timeout
        self._deadline = self.loop.time() + timeout
        self.pool.watch(self)

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= len(chunk)
                if self._reading_paused and self._queued <= _READ_LOW_WATER:
                    self._reading_paused = False
                    if self._state != _CLOSED:
                        self.transport.resume_reading()  # type: ignore[union-attr]  # not _CLOSED: the transport is set
                return chunk
            if self._error is not None:
                raise self._error
            if self._body_done:
                self._finish()
                return b""
            self._reader = self.loop.create_future()
            # a stalled stream is cut after the attempt timeout without a byte
            self._deadline = self.loop.time() + self._timeout
            self.pool.watch(self)
            await self._reader

    def abort(self) -> None:
        """Close now; the connection is never reused (its pool slot is freed at once)."""
        self._keep_alive = False
        self._unwatch()
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.abort()
        self._dispose()

    # -- outcomes -----------------------------------------------------------------------------------

    def _complete(self, body: bytes) -> None:
        """A whole response (head and body) arrived."""
        waiter = self._waiter
        response = Response(self._status, self._headers, body, None, self)
        self._parts = []
        self._finish()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _stream(self, length: int | None) -> None:
        """Hand the head over now; the body (what was collected so far, then the rest) streams via read()."""
        parts = self._parts
        self._parts = []
        self._buffered = False
        self._chunks = collections.deque(parts)
        self._queued = self._size
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._headers, None, length, self))
        self._check_high_water()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._queued += len(data)
        self._check_high_water()
        self._wake_reader()

    def _check_high_water(self) -> None:
        if self._queued > _READ_HIGH_WATER and not self._reading_paused and self._state != _CLOSED:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]  # not _CLOSED: the transport is set

    def _end_body(self) -> None:
        self._body_done = True
        if self._state != _CLOSED:
            self._state = _IDLE  # anything more before the next request is a protocol error
        self._unwatch()
        self._wake_reader()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _finish(self) -> None:
        """The response is fully consumed: back to the pool, or closed."""
        self._unwatch()
        self._waiter = None
        if self._sending:  # answered before the request body was all sent: see sent()
            self._keep_alive = False
            self._done_while_sending = True
            return
        if self._reading_paused and self.transport is not None and self._state != _CLOSED:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._keep_alive and self._state != _CLOSED:
            self._state = _IDLE
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, error: UpstreamError) -> None:
        self._unwatch()
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_exception(error)

    def _protocol_error(self, detail: str) -> None:
        self._fail(ProtocolError(f"upstream {self.pool.name}: {detail}", sent=True))
        self.abort()

    def on_timeout(self) -> None:
        self._fail(UpstreamTimeout(f"upstream {self.pool.name} did not answer within {self._timeout:g} s", sent=True))
        self.abort()

    def _unwatch(self) -> None:
        self.pool.busy.discard(self)

    def _dispose(self) -> None:
        if not self.disposed:
            self.disposed = True
            self.pool.discard(self)


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The header names listed in a Connection header (lower case), without ``close`` and ``keep-alive``."""
    tokens = {t.strip().lower() for t in value.split(b",")}
    return frozenset(t for t in tokens if t and t not in (b"close", b"keep-alive"))


class Pool:
    """Keep-alive connections to one upstream instance (``host:port``), at most ``limit`` open."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int = 256,
        connect_timeout: float = 2.0,
        keepalive_timeout: float = 30.0,
        buffer_limit: int = 256 * 1024,
        name: str | None = None,
        timeout_tick: float = 0.05,
    ) -> None:
        self.host = host
        self.port = port
        self.name = name or f"{host}:{port}"
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.buffer_limit = buffer_limit
        self.timeout_tick = timeout_tick
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        # Busy connections and their deadlines, swept every ``timeout_tick`` s: one timer per pool instead of a
        # timer armed and cancelled for every request.
        self.busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle: list[Connection] = []
        self._open = 0  # connections open or being opened (each holds a slot)
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def _idle_connection(self) -> Connection | None:
        """The most recently used idle connection (warm), dropping ones idle too long."""
        idle = self._idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if conn.disposed:
                    continue
                if now - conn.idle_since > self.keepalive_timeout:
                    conn.abort()  # the upstream may close it any moment: do not race it
                    continue
                return conn
        return None

    async def acquire(self, timeout: float) -> Connection:
        """A connection: an idle one, a new one, or the next one released."""
        if self.loop is None:
            self._bind()
        conn = self._idle_connection()
        if conn is not None:
            return conn
        if self._closed:
            raise ConnectFailed(f"the pool for {self.name} is closed")
        if self._open < self.limit:
            self._open += 1
            return await self._connect()
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            conn = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise PoolExhausted(f"all {self.limit} connections to {self.name} stayed busy for {timeout:g} s") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is None:
                    self._slot_freed()
                else:
                    self.release(handed)
            raise
        if conn is None:  # a slot, not a connection: open one
            return await self._connect()
        return conn

    def _bind(self) -> None:
        self.loop = asyncio.get_running_loop()

    def watch(self, conn: Connection) -> None:
        """Time ``conn``'s deadline (the sweep runs only while some connection is busy)."""
        self.busy.add(conn)
        if self._sweeper is None and not self._closed:
            self._sweeper = self.loop.call_later(self.timeout_tick, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if self._closed or not self.busy:
            return
        now = self.loop.time()
        for conn in [c for c in self.busy if c._deadline <= now]:
            conn.on_timeout()
        if self.busy:
            self._sweeper = self.loop.call_later(self.timeout_tick, self._sweep)

    async def _connect(self) -> Connection:
        """Open a connection for a slot already counted in ``_open``."""
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self), self.host, self.port), self.connect_timeout
            )
        except TimeoutError:
            self._slot_freed()
            raise ConnectFailed(f"connecting to {self.name} timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            self._slot_freed()
            raise ConnectFailed(f"cannot connect to {self.name}: {exc.strerror or exc}") from None
        except BaseException:
            self._slot_freed()
            raise
        return conn

    def request(self, head: bytes, body: bytes | None, *, no_body: bool, timeout: float) -> Awaitable[Response]:
        """One request with a buffered body (or none). With an idle connection at hand this is just the
        response future: no coroutine in between."""
        conn = self._idle_connection()
        if conn is not None:
            return conn.send(head, body, no_body=no_body, timeout=timeout)
        return self._request(head, body, no_body, timeout)

    async def _request(self, head: bytes, body: bytes | None, no_body: bool, timeout: float) -> Response:
        conn = await self.acquire(timeout)
        return await conn.send(head, body, no_body=no_body, timeout=timeout)

    def release(self, conn: Connection) -> None:
        """A connection whose response is consumed and that may be reused."""
        if self._closed or conn.disposed:
            conn.abort()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def discard(self, conn: Connection) -> None:
        """A connection closed: forget it and give its slot to a waiter."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._idle):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed(f"the pool for {self.name} is closed"))
        self._waiters.clear()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Pool {self.name} open={self._open} idle={len(self._idle)}>"
