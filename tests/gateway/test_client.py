"""The gateway's upstream HTTP/1.1 client against raw servers on real sockets that answer byte by byte:
framing (Content-Length, chunked, close-delimited), interim responses, keep-alive reuse and broken answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from gateway.client import Pool, ProtocolError, UpstreamError, UpstreamTimeout

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        raw.server = await asyncio.start_server(raw._serve, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        raw.server.close()  # type: ignore[union-attr]
        await raw.server.wait_closed()  # type: ignore[union-attr]


async def trickle(writer: asyncio.StreamWriter, data: bytes, step: int = 1) -> None:
    """Write ``data`` a few bytes at a time, so every parser state sees a split."""
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(0)


def answering(*responses: bytes, step: int = 1, keep_open: bool = True) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await reader.readuntil(b"\r\n\r\n")
            await trickle(writer, response, step)
        if keep_open:
            await reader.read()  # until the client closes

    return script


async def fetch(pool: Pool, *, head: bytes = GET, no_body: bool = False) -> tuple[int, dict[str, str], bytes]:
    resp = await pool.request(head, None, no_body=no_body, timeout=5)
    body = resp.body
    if body is None:
        parts = []
        while chunk := await resp.read():
            parts.append(chunk)
        body = b"".join(parts)
    return resp.status, dict(resp.headers), body


def pool_for(server: RawServer, **kwargs) -> Pool:
    return Pool("127.0.0.1", server.port, **kwargs)


@pytest.mark.parametrize("buffer_limit", [1 << 20, 4])  # buffered whole, or streamed
async def test_content_length_body_split_anywhere(raw_server, buffer_limit):
    body = b'{"hello": "world"}'
    server = await raw_server(
        answering(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-A: 1\r\n\r\n%s"
            % (len(body), body),
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        )
    )
    pool = pool_for(server, buffer_limit=buffer_limit)
    status, headers, got = await fetch(pool)
    assert (status, got, headers["X-A"], headers["Content-Type"]) == (200, body, "1", "application/json")
    assert "Content-Length" not in headers  # framing is the writer's business
    assert await fetch(pool) == (201, {}, b"ok")
    assert server.connections == 1  # kept alive and reused
    await pool.close()


async def test_chunked_body_with_extensions_and_trailers(raw_server):
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    server = await raw_server(answering(response, response))
    pool = pool_for(server)
    assert await fetch(pool) == (200, {}, b"hello world")
    assert await fetch(pool) == (200, {}, b"hello world")
    assert server.connections == 1
    await pool.close()


async def test_interim_responses_are_skipped(raw_server):
    server = await raw_server(
        answering(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
    )
    pool = pool_for(server)
    assert await fetch(pool) == (200, {}, b"yes")
    await pool.close()


async def test_close_delimited_body_and_http_1_0(raw_server):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await trickle(writer, b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", step=3)

    server = await raw_server(script)
    pool = pool_for(server)
    assert (await fetch(pool))[2] == b"until the end"
    assert (await fetch(pool))[2] == b"until the end"
    assert server.connections == 2  # never reused
    await pool.close()


async def test_no_body_responses(raw_server):
    server = await raw_server(
        answering(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",  # answer to HEAD: the size, no body
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )
    )
    pool = pool_for(server)
    assert await fetch(pool) == (204, {}, b"")
    assert await fetch(pool) == (304, {"ETag": '"x"'}, b"")
    assert await fetch(pool, head=b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n", no_body=True) == (
        200,
        {"Content-Length": "99"},
        b"",
    )
    assert await fetch(pool) == (200, {}, b"")
    assert server.connections == 1
    await pool.close()


async def test_connection_close_is_honoured(raw_server):
    server = await raw_server(
        answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na", keep_open=False)
    )
    pool = pool_for(server)
    assert (await fetch(pool))[2] == b"a"
    assert pool.open_connections == 0


@pytest.mark.parametrize(
    "response",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ],
)
async def test_malformed_answers_are_protocol_errors(raw_server, response):
    server = await raw_server(answering(response))
    pool = pool_for(server)
    with pytest.raises(ProtocolError):
        await fetch(pool)
    assert pool.open_connections == 0  # never reused
    await pool.close()


async def test_a_silent_upstream_times_out_and_the_connection_is_dropped(raw_server):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await raw_server(script)
    pool = pool_for(server, timeout_tick=0.02)
    with pytest.raises(UpstreamTimeout):
        await pool.request(GET, None, no_body=False, timeout=0.2)
    assert pool.open_connections == 0
    await pool.close()


async def test_an_idle_connection_closed_by_the_upstream_is_not_used(raw_server):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # then close the idle keep-alive connection, as a server's keep-alive timeout does

    server = await raw_server(script)
    pool = pool_for(server)
    assert (await fetch(pool))[2] == b"ok"
    await asyncio.sleep(0.1)
    assert pool.idle_connections == 0  # noticed the close while idle
    assert (await fetch(pool))[2] == b"ok"
    assert server.connections == 2
    await pool.close()


async def test_pool_limit_queues_requests(raw_server):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await raw_server(script)
    pool = pool_for(server, limit=2)
    results: Sequence[tuple[int, dict[str, str], bytes]] = await asyncio.gather(*(fetch(pool) for _ in range(20)))
    assert all(r[2] == b"ok" for r in results)
    assert server.connections == 2
    await pool.close()


async def test_refused_connection_is_a_connect_error_that_was_never_sent():
    pool = Pool("127.0.0.1", 1)
    with pytest.raises(UpstreamError) as info:
        await pool.request(GET, None, no_body=False, timeout=1)
    assert info.value.kind == "connect" and info.value.sent is False
    assert pool.open_connections == 0
