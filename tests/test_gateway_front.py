"""gateway.front on the wire: what it serves itself, what it hands to aiohttp, and how it ends connections.

Real sockets throughout: an upstream (``tests/gateway/conftest.Upstream``) on a real port, the real gateway app
served by :class:`gateway.front.Front`, raw HTTP/1.x bytes from the test. "Served by the front" is told by
aiohttp's server never having seen the connection (``runner.server.connections``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from config import load_settings
from gateway.options import GatewayOptions
from gateway.service import create_app
from runtime.routes import services_of
from tests.gateway.conftest import DEAD, FAST, Upstream
from tests.support.front import FrontTestServer

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    up = Upstream("cart-1")
    up.server = await aiohttp_server(up.app())
    up.url = str(up.server.make_url("")).rstrip("/")
    return up


@pytest.fixture
async def serve(test_identity: Any, upstream: Upstream) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    servers: list[TestServer] = []

    async def make(front: str = "fast", front_options: dict[str, Any] | None = None, **options: Any) -> Any:
        from gateway.routes import ROUTES

        ups: dict[str, Any] = {name: [DEAD] for name in services_of(ROUTES)}
        ups["cart"] = ups["catalog"] = [upstream.url]
        app = create_app(
            load_settings({}),
            verifier=test_identity.verifier(),
            upstreams=ups,
            options=GatewayOptions(**{**FAST, **options}),
        )
        server: TestServer = FrontTestServer(app, **(front_options or {})) if front == "fast" else TestServer(app)
        await server.start_server()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
def customer(test_identity: Any) -> bytes:
    return f"Authorization: Bearer {test_identity.token('user-1')}\r\n".encode()


async def connect(server: TestServer) -> tuple[Reader, Writer]:
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_response(reader: Reader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response: (status, headers with lower-case names, body by Content-Length or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if head_only or status in (204, 304):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body[:-2]
            body = body[:-2]
    return status, headers, await asyncio.wait_for(reader.read(), 10)


def aiohttp_saw(server: TestServer) -> int:
    """Connections aiohttp's server is serving (handed over by the front, or its own)."""
    assert server.runner is not None and server.runner.server is not None
    return len(server.runner.server.connections)


async def closed(reader: Reader, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection within ``timeout`` (what it still sends is skipped)."""
    try:
        await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return False
    return reader.at_eof()


async def test_keep_alive_requests_are_served_by_the_front(serve: Any, customer: bytes, upstream: Upstream) -> None:
    server = await serve()
    reader, writer = await connect(server)
    for i in range(3):
        writer.write(b"GET /api/cart?n=%d HTTP/1.1\r\nHost: shop\r\nX-Request-Id: req-%d\r\n%s\r\n" % (i, i, customer))
        status, headers, body = await read_response(reader)
        assert status == 200, body
        assert headers["x-request-id"] == f"req-{i}"
        assert b'"instance":"cart-1"' in body.replace(b" ", b"")
    assert aiohttp_saw(server) == 0
    assert [s["path"] for s in upstream.seen] == ["/api/cart?n=0", "/api/cart?n=1", "/api/cart?n=2"]
    assert upstream.seen[0]["headers"]["X-Request-Id"] == "req-0"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(
        b"".join(b"GET /api/cart/%d HTTP/1.1\r\nHost: shop\r\n%s\r\n" % (i, customer) for i in range(5))
        + b"POST /api/cart/items HTTP/1.1\r\nHost: shop\r\nContent-Length: 3\r\n%s\r\nabc" % customer
    )
    for i in range(5):
        status, _, body = await read_response(reader)
        assert status == 200 and f'"/api/cart/{i}"'.encode() in body
    status, _, body = await read_response(reader)
    assert (status == 200 and b'"body_len": 3' in body) or b'"body_len":3' in body
    writer.close()


async def test_a_long_pipeline_of_refusals_is_answered_whole(serve: Any, customer: bytes) -> None:
    # Refusals are answered as the request is taken, without a task: the front takes the next request in a loop,
    # so a pipeline longer than Python's recursion limit is answered in full, in order, and the connection lives.
    server = await serve()
    reader, writer = await connect(server)
    count = 3000
    writer.write(
        b"".join(b"GET /api/cart/../x%d HTTP/1.1\r\nHost: shop\r\n%s\r\n" % (i, customer) for i in range(count))
    )
    for i in range(count):
        status, headers, body = await read_response(reader)
        assert status == 400 and headers["content-type"] == "application/problem+json", (i, body)
        assert f'"/api/cart/../x{i}"'.encode() in body
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    status, _, _ = await read_response(reader)
    assert status == 200
    assert aiohttp_saw(server) == 0
    writer.close()


async def test_health_and_admin_are_handed_to_aiohttp_on_the_same_connection(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    assert (await read_response(reader))[0] == 200
    assert aiohttp_saw(server) == 0
    # a pipelined pair: the front answers its request first, then hands the connection over
    writer.write(
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\nGET /health/live HTTP/1.1\r\nHost: shop\r\n\r\n" % customer
    )
    assert (await read_response(reader))[0] == 200
    status, _, body = await read_response(reader)
    assert status == 200 and b"ok" in body
    assert aiohttp_saw(server) == 1
    writer.write(b"GET /admin HTTP/1.1\r\nHost: shop\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["content-type"].startswith("text/html")
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)  # aiohttp's now: still proxied
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nBad Header: x\r\n\r\n",
        b"GET /api/cart HTTP/1.1\nHost: shop\n\n",
        b"GET /api/cart HTTP/9.9\r\nHost: shop\r\n\r\n",
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)),  # a TLS hello on the plain port
        b"GET /api/cart HTTP/1.1\r\nX-A: b\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /api/cart HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # a singleton header twice
        b"GET /api/cart HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",  # NUL in a value
    ],
)
async def test_a_malformed_request_gets_400_and_the_connection_closes(
    serve: Any, front: str, request_bytes: bytes
) -> None:
    server = await serve(front)
    reader, writer = await connect(server)
    writer.write(request_bytes)
    status, _, _ = await read_response(reader, head_only=True)
    assert status == 400
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
async def test_oversized_heads_are_refused_like_aiohttp_does(serve: Any, front: str, customer: bytes) -> None:
    server = await serve(front)
    for head in (
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nX-Big: " + b"a" * 9000 + b"\r\n%s\r\n" % customer,
        b"GET /api/cart?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer,
        b"GET /api/cart HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + customer + b"\r\n",
    ):
        reader, writer = await connect(server)
        writer.write(head)
        status, _, _ = await read_response(reader, head_only=True)
        assert status in (400, 431)
        writer.close()


async def test_a_large_declared_body_gets_413(serve: Any, customer: bytes) -> None:
    server = await serve(max_body=1000, buffer_limit=500)
    reader, writer = await connect(server)
    writer.write(b"POST /api/cart/items HTTP/1.1\r\nHost: shop\r\nContent-Length: 5000\r\n%s\r\n" % customer)
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert b"over the limit" in body
    writer.close()
    reader, writer = await connect(server)  # within the limit, above the buffer: streamed by aiohttp's path
    writer.write(b"POST /api/cart/items HTTP/1.1\r\nHost: shop\r\nContent-Length: 800\r\n%s\r\n" % customer)
    writer.write(b"x" * 800)
    status, _, body = await read_response(reader)
    assert status == 200 and b"800" in body
    writer.close()


async def test_head_gets_the_get_headers_without_a_body(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(
        b"HEAD /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\nHEAD /api/cart HTTP/1.1\r\nHost: shop\r\n\r\n" % customer
    )
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == 200 and int(headers["content-length"]) > 0 and headers["etag"] == '"v1"'
    status, headers, _ = await read_response(reader, head_only=True)  # 401: its problem's length, no body
    assert status == 401 and int(headers["content-length"]) > 0 and "www-authenticate" in headers
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)  # nothing stray in between
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_connection_close_and_http_10(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n%s\r\n" % customer)
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await closed(reader)
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.0\r\n%s\r\n" % customer)
    head = await reader.readuntil(b"\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert await closed(reader)
    writer.close()

    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.0\r\nConnection: keep-alive\r\n%s\r\n" % customer)
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    writer.write(b"GET /api/cart/big?size=300000 HTTP/1.0\r\nConnection: keep-alive\r\n%s\r\n" % customer)
    status, headers, body = await read_response(reader)  # streamed, no chunked in 1.0: the length is known
    assert status == 200 and len(body) == 300000
    writer.close()
    assert aiohttp_saw(server) == 0


async def test_large_responses_stream_back(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(b"GET /api/cart/big?size=700000&chunked=1 HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and len(body) == 700000
    writer.write(b"GET /api/cart/big?size=700000&die=1 HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == 200
    got = await asyncio.wait_for(reader.read(), 10)  # cut mid-way: the client sees a truncated body
    assert len(got) < int(headers["content-length"])
    writer.close()


async def test_a_slow_head_is_cut(serve: Any, customer: bytes) -> None:
    server = await serve(front_options={"header_timeout": 0.3})
    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: sh")
    started = time.monotonic()
    assert await closed(reader, 5)
    assert time.monotonic() - started < 3
    writer.close()
    reader, writer = await connect(server)  # connected and silent
    assert await closed(reader, 5)
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(serve: Any, customer: bytes) -> None:
    server = await serve(front_options={"keepalive_timeout": 0.3})
    reader, writer = await connect(server)
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    assert (await read_response(reader))[0] == 200
    assert await closed(reader, 5)
    writer.close()


async def test_shutdown_finishes_the_request_in_flight(serve: Any, customer: bytes) -> None:
    server = await serve()
    busy_reader, busy_writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    busy_writer.write(b"GET /api/cart/slow?s=0.5 HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(server.front.stop(grace=5))
    await asyncio.sleep(0.05)
    assert await closed(idle_reader, 2)  # idle connections go at once
    with pytest.raises(OSError):
        await connect(server)  # nothing listens any more
    status, headers, _ = await read_response(busy_reader)  # the one in flight is answered, then closed
    assert status == 200 and headers["connection"] == "close"
    assert await closed(busy_reader)
    await stopping
    busy_writer.close()
    idle_writer.close()


async def test_responses_match_the_aiohttp_front(serve: Any, customer: bytes, test_identity: Any) -> None:
    """The same requests through both fronts: the same statuses, header names and bodies."""
    fast, slow = await serve("fast"), await serve("aiohttp")
    requests = [
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n\r\n",  # 401
        b"GET /api/cart/status/204 HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
        b"GET /api/cart/status/503 HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
        b"HEAD /api/cart HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
        b"GET /api/cart/../catalog HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
        b"GET /api/orders HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,  # dead: 502/503
        b"DELETE /api/catalog/products/p-1 HTTP/1.1\r\nHost: shop\r\nX-Request-Id: same\r\n%s\r\n" % customer,
    ]
    for raw in requests:
        answers = []
        for server in (fast, slow):
            reader, writer = await connect(server)
            writer.write(raw)
            status, headers, body = await read_response(reader, head_only=raw.startswith(b"HEAD"))
            writer.close()
            headers.pop("date", None)
            answers.append((status, sorted(headers.items()), body))
        assert answers[0] == answers[1], raw
    assert aiohttp_saw(fast) == 0


async def test_metrics_count_the_front_requests(serve: Any, customer: bytes, test_identity: Any) -> None:
    server = await serve()
    reader, writer = await connect(server)
    for _ in range(3):
        writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
        assert (await read_response(reader))[0] == 200
    admin = test_identity.admin_token()
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer %s\r\n\r\n" % admin.encode())
    status, _, body = await read_response(reader)
    assert status == 200
    text = body.decode()
    assert 'http_requests_total{method="GET",route="/api/cart{tail}",service="gateway",status="200"} 3.0' in text
    assert 'http_request_duration_seconds_count{route="/api/cart{tail}",service="gateway"} 3.0' in text
    writer.close()


async def test_the_access_log_has_the_front_requests(
    serve: Any, customer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(access_log=True)
    reader, writer = await connect(server)
    with caplog.at_level("INFO", logger="ecom.access"):
        writer.write(b"GET /api/cart?x=1 HTTP/1.1\r\nHost: shop\r\nX-Request-Id: logged-1\r\n%s\r\n" % customer)
        assert (await read_response(reader))[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "ecom.access"]
    assert len(lines) == 1 and '"request_id":"logged-1"' in lines[0] and '"path":"/api/cart"' in lines[0]
    assert '"status":200' in lines[0] and '"upstream":"http://127.0.0.1' in lines[0]
    writer.close()


async def test_trace_context_passes_through_when_tracing_is_off(
    serve: Any, customer: bytes, upstream: Upstream
) -> None:
    server = await serve()
    reader, writer = await connect(server)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nTraceparent: %s\r\n%s\r\n" % (parent.encode(), customer))
    assert (await read_response(reader))[0] == 200
    assert upstream.seen[-1]["headers"]["traceparent"] == parent
    assert aiohttp_saw(server) == 0
    writer.close()


async def test_identity_headers_never_reach_the_upstream(serve: Any, customer: bytes, upstream: Upstream) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(
        b"GET /api/cart HTTP/1.1\r\nHost: shop\r\nX-User-Id: admin\r\nX-Principal: root\r\nConnection: x-secret\r\n"
        b"X-Secret: 1\r\nX-Kept: yes\r\n%s\r\n" % customer
    )
    assert (await read_response(reader))[0] == 200
    seen = upstream.seen[-1]["headers"]
    assert "X-User-Id" not in seen and "X-Principal" not in seen and "X-Secret" not in seen
    assert seen["X-Kept"] == "yes" and seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Forwarded-Host"] == "shop"
    writer.close()


async def test_with_tracing_on_requests_go_through_aiohttp_and_carry_the_proxy_span(
    serve: Any, customer: bytes, upstream: Upstream
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from runtime import tracing

    memory = InMemorySpanExporter()
    assert tracing.configure("ecom-test", environ={}, processors=[SimpleSpanProcessor(memory)])
    try:
        server = await serve()
        reader, writer = await connect(server)
        writer.write(b"GET /api/cart HTTP/1.1\r\nHost: shop\r\n%s\r\n" % customer)
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        tracing.shutdown()
    assert aiohttp_saw(server) == 1
    proxy = [s for s in memory.get_finished_spans() if s.name == "proxy GET cart"]
    assert len(proxy) == 1
    sent = upstream.seen[-1]["headers"]["traceparent"]
    assert sent.split("-")[1] == format(proxy[0].context.trace_id, "032x")


async def test_a_request_arriving_in_pieces_is_served_whole(serve: Any, customer: bytes) -> None:
    server = await serve(front_options={"header_timeout": 5.0})
    reader, writer = await connect(server)
    head = b"PUT /api/cart/items/p-1 HTTP/1.1\r\nHost: shop\r\nContent-Length: 10\r\n%s\r\n" % customer
    for piece in (head[:7], head[7:30], head[30:], b"0123", b"456789"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    status, _, body = await read_response(reader)
    assert status == 200 and b'"body_len": 10' in body
    assert aiohttp_saw(server) == 0
    writer.close()


async def test_expect_continue_is_handed_to_aiohttp(serve: Any, customer: bytes) -> None:
    server = await serve()
    reader, writer = await connect(server)
    writer.write(
        b"PUT /api/cart/items/p-1 HTTP/1.1\r\nHost: shop\r\nContent-Length: 4\r\nExpect: 100-continue\r\n%s\r\n"
        % customer
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
    writer.write(b"abcd")
    status, _, body = await read_response(reader)
    assert status == 200 and b'"body_len": 4' in body
    assert aiohttp_saw(server) == 1
    writer.close()
