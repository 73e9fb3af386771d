"""Issue 12 at the gateway: rate limits that count refused requests and guard sign-in and registration, the
``ecom`` API scope, an admin-only ``/metrics``, malformed upstream answers (real raw-socket upstreams) and
identity's revocation announcements heard over a real in-memory bus."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from bus.memory import MemoryBus
from config import load_settings
from gateway.options import GatewayOptions
from gateway.routes import ROUTES
from gateway.service import create_app
from runtime.revocation import AccessRevoked, SigningKeyRevoked, announcement
from runtime.routes import services_of
from tests.gateway.conftest import DEAD, FAST, eventually

PROBLEM = "application/problem+json"


def forged(token: str) -> str:
    """The token with its signature changed: well-formed, known key id, never valid."""
    head, payload, sig = token.split(".")
    return f"{head}.{payload}.{sig[:-6]}{'AAAAAA' if sig[-6:] != 'AAAAAA' else 'BBBBBB'}"


def kid_of(token: str) -> str:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]


async def assert_problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == PROBLEM
    body = await resp.json()
    assert body["status"] == status
    return body


# -- rate limits ------------------------------------------------------------------------------------


async def test_forged_tokens_are_counted_per_address_and_end_in_429(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    # One token back every 100 s: the run's length (seconds on a slow machine) cannot refill the bucket, so
    # what follows the burst is refused however fast or slow the requests go.
    gw = await make_gateway({"cart": cart.url}, rate_limit=0.01, rate_burst=100)
    bad = test_identity.headers(forged(test_identity.token()))
    statuses = []
    last_429 = None
    for _ in range(300):
        resp = await gw.get("/api/cart", headers=bad)
        statuses.append(resp.status)
        if resp.status == 429:
            last_429 = resp
        await resp.read()
    assert set(statuses) == {401, 429}
    assert statuses[:100] == [401] * 100  # the burst: 100 signature checks, then no more
    assert statuses.count(429) >= 199
    assert int(last_429.headers["Retry-After"]) >= 1
    assert last_429.content_type == PROBLEM and (await last_429.json())["type"].endswith("/rate-limited")
    assert cart.seen == []
    # the same address without a token on a token-only route is refused by the limiter too
    assert (await gw.get("/api/cart")).status == 429


def identity_app(seen: list[str]) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append("token")
        if form.get("password") == "right":
            return web.json_response({"access_token": "x", "token_type": "Bearer"})
        return web.json_response({"error": "invalid_grant"}, status=400)

    async def register(request: web.Request) -> web.Response:
        seen.append("register")
        return web.json_response({"id": uuid.uuid4().hex}, status=201)

    app = web.Application()
    app.router.add_post("/connect/token", token)
    app.router.add_post("/api/identity/users", register)
    return app


async def test_failed_sign_ins_have_a_tighter_bucket_per_address(make_gateway, aiohttp_server):
    seen: list[str] = []
    identity = await aiohttp_server(identity_app(seen))
    gw = await make_gateway({"identity": str(identity.make_url("")).rstrip("/")}, rate_limit=50, rate_burst=100)
    ok = {"grant_type": "password", "username": "ann@example.com", "password": "right"}
    wrong = {**ok, "password": "guess"}
    for _ in range(20):  # successful sign-ins are not failures
        assert (await gw.post("/connect/token", data=ok)).status == 200
    statuses = [(await gw.post("/connect/token", data=wrong)).status for _ in range(10)]
    assert statuses == [400] * 10  # the failure bucket: burst 10 at the default limits
    reached = len(seen)
    resp = await gw.post("/connect/token", data=ok)  # even the right password waits now
    body = await assert_problem(resp, 429)
    assert int(resp.headers["Retry-After"]) >= 1 and body["type"].endswith("/rate-limited")
    assert len(seen) == reached  # refused at the gateway
    await asyncio.sleep(1.1)  # 1 failure/s comes back
    assert (await gw.post("/connect/token", data=ok)).status == 200


async def test_registrations_have_a_tighter_bucket_per_address(make_gateway, aiohttp_server):
    seen: list[str] = []
    identity = await aiohttp_server(identity_app(seen))
    gw = await make_gateway({"identity": str(identity.make_url("")).rstrip("/")}, rate_limit=50, rate_burst=100)
    user = {"email": "a@example.com", "password": "a-long-passphrase-42", "name": "A"}
    statuses = [(await gw.post("/api/identity/users", json=user)).status for _ in range(25)]
    assert statuses[:20] == [201] * 20 and statuses[20:] == [429] * 5
    assert seen.count("register") == 20
    resp = await gw.post("/api/identity/users", json=user)
    await assert_problem(resp, 429)
    assert int(resp.headers["Retry-After"]) >= 1


# -- scopes and /metrics ----------------------------------------------------------------------------


async def test_the_api_needs_the_ecom_scope(make_gateway, start_upstream, test_identity):
    cart, catalog = await start_upstream("cart"), await start_upstream("catalog")
    gw = await make_gateway({"cart": cart.url, "catalog": catalog.url})
    no_scope = test_identity.headers(test_identity.token(scopes=("openid",)))
    admin_no_scope = test_identity.headers(test_identity.token(roles=("admin",), scopes=("openid",)))
    for path, headers in (
        ("/api/cart", no_scope),
        ("/api/orders", no_scope),
        ("/api/catalog/admin/actors", admin_no_scope),
    ):
        resp = await gw.get(path, headers=headers)
        body = await assert_problem(resp, 403)
        challenge = resp.headers["WWW-Authenticate"]
        assert (
            challenge.startswith("Bearer ")
            and 'error="insufficient_scope"' in challenge
            and 'scope="ecom"' in challenge
        )
        assert body["type"].endswith("/insufficient-scope")
    assert cart.seen == [] and catalog.seen == []
    assert (await gw.get("/api/cart", headers=test_identity.headers(test_identity.token()))).status == 200
    assert (await gw.get("/api/catalog/products", headers=no_scope)).status == 200  # browsing is open


async def test_metrics_are_for_admins_only(make_gateway, test_identity):
    gw = await make_gateway()
    await assert_problem(await gw.get("/metrics"), 404)
    await assert_problem(await gw.get("/metrics", headers=test_identity.headers(forged(test_identity.token()))), 401)
    resp = await gw.get("/metrics", headers=test_identity.headers(test_identity.token()))
    await assert_problem(resp, 403)
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    resp = await gw.get("/metrics", headers=test_identity.headers(test_identity.admin_token()))
    assert resp.status == 200 and "gateway_upstream_up" in await resp.text()


# -- malformed upstream answers -----------------------------------------------------------------------


class RawUpstream:
    """An upstream on a raw socket that answers every request with ``response`` and keeps the connection open
    (a gateway that waited for more would hang: the test's timeout says so)."""

    def __init__(self, response: bytes, close: bool = False) -> None:
        self.response = response
        self.close = close
        self.requests = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /health/ready "):  # the gateway's health checks see a healthy instance
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                    continue
                self.requests += 1
                writer.write(self.response)
                await writer.drain()
                if self.close:
                    return  # closed by the finally clause
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        # a fixed range below the ephemeral ports (never port 0): the first free one
        for port in range(23100 + uuid.uuid4().int % 400, 23600):
            try:
                self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
            except OSError:
                continue
            self.port = port
            return
        raise RuntimeError("no free port in 23100-23599")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(response: bytes, close: bool = False) -> RawUpstream:
        up = RawUpstream(response, close)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        assert up.server is not None
        up.server.close()
        await up.server.wait_closed()


MALFORMED = {
    "short status": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "status without reason": b"HTTP/1.1 20\r\n\r\n",
    "status out of range": b"HTTP/1.1 999 Nine\r\nContent-Length: 2\r\n\r\nok",
    "xchunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "gzip, chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "chunked twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "CR in a value": b"HTTP/1.1 200 OK\r\nX-Evil: a\rInjected: 1\r\nContent-Length: 2\r\n\r\nok",
    "LF in a value": b"HTTP/1.1 200 OK\r\nX-Evil: a\nInjected: 1\r\nContent-Length: 2\r\n\r\nok",
    "folded value": b"HTTP/1.1 200 OK\r\nX-Evil: a\r\n Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "negative chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
    "chunk size overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nok\r\n0\r\n\r\n",
    "chunk without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX0\r\n\r\n",
    "CL then TE": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "TE then CL": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
    "signed length": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    "not HTTP": b"SMTP ready\r\n\r\n",
    "upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_upstream_answer_is_a_502(make_gateway, raw_upstream, case):
    up = await raw_upstream(MALFORMED[case])
    gw = await make_gateway({"catalog": up.url})
    resp = await asyncio.wait_for(gw.get("/api/catalog/products"), 5)  # never a hang
    body = await assert_problem(resp, 502)  # never an empty reply
    assert "Injected" not in resp.headers and "X-Evil" not in resp.headers
    assert body["type"].endswith("/bad-gateway") or body["title"]
    assert up.requests >= 1


@pytest.mark.parametrize(
    "case",
    [
        b"HTTP/1.1 200 OK\r\nContent-Len",  # the head cut short
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # the body cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",  # a chunk cut short
    ],
)
async def test_an_answer_cut_short_is_a_502(make_gateway, raw_upstream, case):
    up = await raw_upstream(case, close=True)
    gw = await make_gateway({"catalog": up.url})
    resp = await asyncio.wait_for(gw.get("/api/catalog/products"), 5)
    await assert_problem(resp, 502)


async def test_headers_named_in_connection_are_not_passed_on(make_gateway, raw_upstream):
    up = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: X-Other\r\nX-Other: o\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Kept: k\r\n"
        b"Transfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n2\r\nok\r\n0\r\nX-T: t\r\n\r\n"
    )
    gw = await make_gateway({"catalog": up.url})
    for _ in range(2):  # and the connection is reused
        resp = await gw.get("/api/catalog/products")
        assert resp.status == 200 and await resp.read() == b"ok"
        assert resp.headers["X-Kept"] == "k"
        for name in ("X-Secret", "X-Other", "Keep-Alive", "Proxy-Connection", "Upgrade", "Trailer", "X-T"):
            assert name not in resp.headers, name
    assert up.requests == 2


# -- revocation announcements -----------------------------------------------------------------------


@pytest.fixture
async def gateway_on_bus(aiohttp_client, start_upstream, test_identity):
    bus = MemoryBus()
    await bus.start()
    cart = await start_upstream("cart")
    ups: dict[str, Any] = {name: [DEAD] for name in services_of(ROUTES)}
    ups["cart"] = [cart.url]
    app = create_app(
        load_settings({}), bus=bus, verifier=test_identity.verifier(), upstreams=ups, options=GatewayOptions(**FAST)
    )
    gw = await aiohttp_client(app)
    yield gw, bus
    await gw.close()
    await bus.close()


async def test_a_signed_out_subject_is_refused_within_a_second(gateway_on_bus, test_identity):
    gw, bus = gateway_on_bus
    sub = "ann-" + uuid.uuid4().hex
    headers = test_identity.headers(test_identity.token(sub))
    other = test_identity.headers(test_identity.token())
    assert (await gw.get("/api/cart", headers=headers)).status == 200  # verified, now cached
    assert (await gw.get("/api/cart", headers=headers)).status == 200
    now = datetime.now(UTC)
    await bus.publish(
        announcement(AccessRevoked(sub, now + timedelta(seconds=1), now + timedelta(hours=1), "signed_out"))
    )

    async def refused() -> bool:
        return (await gw.get("/api/cart", headers=headers)).status == 401

    await eventually(refused, timeout=1.0, what="the revoked subject's token refused")
    assert (await gw.get("/api/cart", headers=other)).status == 200  # nobody else


async def test_a_revoked_signing_key_is_refused_within_a_second(gateway_on_bus, test_identity):
    gw, bus = gateway_on_bus
    token = test_identity.token()
    headers = test_identity.headers(token)
    assert (await gw.get("/api/cart", headers=headers)).status == 200  # cached
    await bus.publish(announcement(SigningKeyRevoked(kid_of(token), datetime.now(UTC))))

    async def refused() -> bool:
        return (await gw.get("/api/cart", headers=headers)).status == 401

    await eventually(refused, timeout=1.0, what="tokens of the revoked key refused")


async def test_the_gateway_stops_listening_at_shutdown(aiohttp_client, test_identity):
    bus = MemoryBus()
    await bus.start()
    app = create_app(load_settings({}), bus=bus, verifier=test_identity.verifier(), options=GatewayOptions(**FAST))
    gw = await aiohttp_client(app)
    assert bus.stats()  # a broadcast subscription while running
    before = {k for k in bus.stats() if "broadcast" in k}
    assert before
    await gw.close()
    assert not {k for k in bus.stats() if "broadcast" in k}
    await bus.close()
