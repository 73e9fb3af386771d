"""Gateway tests over real HTTP: the upstreams are small real aiohttp apps on real ports (``aiohttp_server``),
the gateway is the real ``gateway.service`` app, tokens are real signed JWTs (``test_identity``). No mocks.

``Upstream`` stands in for one instance of a service: it answers any path with what it saw (instance name,
method, path, headers, body digest) and records every request, and a few paths misbehave on purpose:

* ``.../slow?s=<seconds>``: answers late;
* ``.../drop``: closes the connection without answering (the handler ran: it acted on the request);
* ``.../big?size=<bytes>[&chunked=1][&die=1]``: a large body, optionally chunked, optionally cut mid-way;
* ``.../status/<code>``: answers that status;
* ``.../early``: answers 403 without reading the request body.

``/health/ready`` follows ``Upstream.ready``; ``/api/docs/swagger.json`` serves ``Upstream.docs``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config import load_settings
from gateway.options import GatewayOptions
from gateway.routes import ROUTES
from gateway.service import UPSTREAMS_KEY, create_app
from gateway.upstreams import Upstreams
from runtime.routes import Route, services_of
from tests.support.front import FrontTestServer

DEAD = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused


class Upstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.ready = True
        self.docs: dict[str, Any] | None = None
        self.server: TestServer | None = None
        self.port = 0  # kept after the server stops, to bring it back on the same address
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/api/docs/swagger.json", self._docs)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _ready(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.ready else "unavailable"}, status=200 if self.ready else 503)

    async def _docs(self, _request: web.Request) -> web.Response:
        if self.docs is None:
            raise web.HTTPNotFound()
        return web.json_response(self.docs)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/early"):  # refuses before reading the body, as an auth check would
            self.seen.append({"method": request.method, "path": request.path_qs, "headers": request.headers.copy()})
            return web.json_response({"instance": self.name, "error": "no"}, status=403)
        body = await request.read()
        self.seen.append(
            {"method": request.method, "path": request.path_qs, "headers": request.headers.copy(), "body": body}
        )
        path = request.path  # the behaviours below are chosen by the path's ending, under any prefix
        if path.endswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "5")))
        elif path.endswith("/drop"):
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        elif path.endswith("/big"):
            return await self._big(request)
        elif (m := re.search(r"/status/(\d{3})$", path)) is not None:
            return web.json_response({"instance": self.name}, status=int(m.group(1)))
        return web.json_response(
            {
                "instance": self.name,
                "method": request.method,
                "path": request.path_qs,
                "body_len": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            },
            headers={"ETag": '"v1"', "X-Upstream": self.name},
        )

    async def _big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "chunked" in request.query:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        sent = 0
        block = bytes(range(256)) * 256  # 64 KiB
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await resp.write(part)
            sent += len(part)
            if "die" in request.query and sent >= size // 2:
                assert request.transport is not None
                request.transport.abort()
                return resp
        await resp.write_eof()
        return resp


def big_body(size: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def start_upstream(aiohttp_server: Any) -> Callable[..., Awaitable[Upstream]]:
    """Start an upstream instance (``port`` to bring one back where it was)."""

    async def start(name: str | None = None, *, port: int | None = None, upstream: Upstream | None = None) -> Upstream:
        up = upstream or Upstream(name or f"up-{uuid.uuid4().hex[:6]}")
        up.server = await aiohttp_server(up.app(), port=port) if port else await aiohttp_server(up.app())
        up.port = up.server.port
        up.url = str(up.server.make_url("")).rstrip("/")
        return up

    return start


FAST: dict[str, Any] = {  # quick health checks and breakers, no rate limits, no access log, unless a test says so
    "health_interval": 0.1,
    "health_timeout": 0.5,
    "breaker_failures": 3,
    "breaker_cooldown": 0.3,
    "connect_timeout": 1.0,
    "timeout": 3.0,
    "retry_backoff": 0.005,
    "rate_limit": 0,
    "access_log": False,
}


@pytest.fixture(params=["fast", "aiohttp"])
def gateway_front(request: pytest.FixtureRequest) -> str:
    """Which front serves the gateways a test makes: gateway.front (``fast``) or aiohttp's server alone."""
    return str(request.param)


@pytest.fixture
def make_gateway(aiohttp_client: Any, test_identity: Any, gateway_front: str) -> Callable[..., Awaitable[TestClient]]:
    """A gateway on a real port, routing the given services to the given instances (the rest to a dead port),
    served through each front in turn (``gateway_front``)."""

    async def make(
        upstreams: dict[str, str | Sequence[str]] | None = None,
        *,
        routes: Sequence[Route] = ROUTES,
        redis_url: str | None = None,
        **options: Any,
    ) -> TestClient:
        ups: dict[str, str | Sequence[str]] = {name: [DEAD] for name in services_of(routes)}
        ups.update(upstreams or {})
        app = create_app(
            load_settings({}),
            verifier=test_identity.verifier(),
            upstreams=ups,
            redis_url=redis_url,
            options=GatewayOptions(**{**FAST, **options}),
            routes=routes,
        )
        client = await aiohttp_client(FrontTestServer(app) if gateway_front == "fast" else app)
        client.admin_headers = test_identity.headers(test_identity.admin_token())  # type: ignore[attr-defined]
        return client

    return make


def upstreams_of(client: TestClient) -> Upstreams:
    return client.app[UPSTREAMS_KEY]


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def raw_request(port: int, request: str | bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given; -> (status, whole response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode() if isinstance(request, str) else request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), data


async def metric(client: TestClient, name: str, **labels: str) -> float | None:
    """One sample from the gateway's /metrics, or None."""
    text = await (await client.get("/metrics", headers=getattr(client, "admin_headers", None))).text()
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part) if rest else {}
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None
