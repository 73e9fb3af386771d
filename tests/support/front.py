"""Serving a gateway application through :class:`gateway.front.Front` in tests.

:class:`FrontTestServer` is aiohttp's ``TestServer`` with the listening socket opened by the front instead of an
aiohttp site: ``aiohttp_client(FrontTestServer(app))`` gives the usual ``TestClient`` (``client.app``,
``client.server.port``), and every request goes through the front, which hands to aiohttp what it does not
serve itself, exactly as ``ecom run`` does.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.front import Front


class FrontTestServer(TestServer):
    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", **front: Any) -> None:
        super().__init__(app, host=host)
        self.front_options = front  # Front's keyword arguments (header_timeout, keepalive_timeout)
        self.front: Front | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self._loop = loop
        self.runner = await self._make_runner(**kwargs)
        await self.runner.setup()
        assert isinstance(self.runner, web.AppRunner)
        self.front = Front(self.runner, **self.front_options)
        await self.front.start(self.host, self.port or 0)
        self.port = self.front.port
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.front is not None and not self.closed:
            await self.front.stop(grace=5.0)
        await super().close()
