"""AmqpPeer: the listening socket of the test peer, on 127.0.0.1 only.

One port serves both protocols a Service Bus client speaks to a namespace, as the real endpoint does
on its host name: AMQP (plain TCP, because the connection string says ``UseDevelopmentEmulator=true``)
and the ATOM management API over HTTPS (``ServiceBusAdministrationClient`` always uses
``https://<namespace>``). The first byte tells them apart: ``A`` starts an AMQP protocol header, 0x16 a
TLS handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from pathlib import Path
from typing import Any, Self

from tests.amqp_peer.amqp import PeerConnection, rewrite_app_props
from tests.amqp_peer.broker import Broker

log = logging.getLogger(__name__)

TLS_HANDSHAKE = 0x16


class AmqpPeer:
    """A Service Bus namespace for tests: ``async with AmqpPeer() as peer: peer.connection_string``."""

    def __init__(self, *, tick: float = 0.02, tls_dir: Path | None = None) -> None:
        self.broker = Broker(rewrite_app_props=rewrite_app_props)
        self.connections: set[PeerConnection] = set()
        self.port = 0
        self._tick = tick
        self._tls_dir = tls_dir
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.atom = None  # tests.amqp_peer.atom.AtomEndpoint, once TLS is set up
        self.ssl_context: ssl.SSLContext | None = None
        self.ca_file: str | None = None
        # What clients did, for assertions: SASL mechanisms, CBS put-token requests, $management ops.
        self.sasl_mechanisms: list[str] = []
        self.cbs_requests: list[dict[str, Any]] = []
        self.management_requests: list[tuple[str, str | None, Any]] = []
        self.sent_messages: deque[tuple[str, Any]] = deque(maxlen=10_000)
        self.frame_log: deque[tuple[str, Any]] | None = None  # set to a deque to record frames
        # SAS credentials the namespace accepts (CBS put-token and the ATOM endpoint check them).
        self.key_name = "test"
        self.key = "dGVzdA=="
        self.check_tokens = True

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> Self:
        if self._tls_dir is not None:
            from tests.amqp_peer.atom import AtomEndpoint

            self.atom = AtomEndpoint(self, self._tls_dir)
            await self.atom.start()
            self.ssl_context = self.atom.ssl_context
            self.ca_file = str(self.atom.cert_file)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(), name="amqp-peer:accept")
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="amqp-peer:tick")
        return self

    async def stop(self) -> None:
        for task in (self._accepting, self._ticker):
            if task is not None:
                task.cancel()
        for connection in list(self.connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, self._accepting, self._ticker, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        if self.atom is not None:
            await self.atom.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def namespace(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=sb://127.0.0.1:{self.port};SharedAccessKeyName={self.key_name};SharedAccessKey={self.key};"
            "UseDevelopmentEmulator=true"
        )

    # -- test controls -------------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Cut every client TCP connection without an AMQP close, like a network failure."""
        dropped = list(self.connections)
        for connection in dropped:
            connection.abort()
        return len(dropped)

    def record(self, direction: str, frame: Any) -> None:
        if self.frame_log is not None:
            self.frame_log.append((direction, frame))

    # -- internals -----------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            client, _ = await loop.sock_accept(self._sock)
            client.setblocking(False)
            task = loop.create_task(self._serve(client), name="amqp-peer:conn")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await _peek_byte(loop, client)
        except OSError:
            client.close()
            return
        if first == TLS_HANDSHAKE and self.atom is not None:
            await self.atom.serve_socket(client)
            return
        reader, writer = await asyncio.open_connection(sock=client)
        connection = PeerConnection(self, reader, writer)
        self.connections.add(connection)
        with contextlib.suppress(Exception):
            await connection.run()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                self.broker.tick()
                for connection in list(self.connections):
                    if not connection.closed and connection.writer.transport.get_write_buffer_size():
                        await connection.writer.drain()
            except Exception:
                log.exception("test peer tick failed")


async def _peek_byte(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float = 10.0) -> int:
    """Wait until the client has sent something and look at its first byte without consuming it."""
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        async with asyncio.timeout(timeout):
            await future
    finally:
        loop.remove_reader(sock.fileno())
    data = sock.recv(1, socket.MSG_PEEK)
    if not data:
        raise OSError("client closed before sending anything")
    return data[0]
