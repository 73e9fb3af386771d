"""Retries, circuit breakers, health checks, timeouts, body limits and streaming, against real upstreams."""

from __future__ import annotations

import asyncio
import hashlib
import io

import aiohttp
import pytest

from gateway.upstreams import CLOSED, OPEN
from tests.gateway.conftest import DEAD, big_body, eventually, metric, upstreams_of

SLOW_CHECKS = {"health_interval": 60.0}  # only the breaker and retries decide: no health check in between


async def test_idempotent_requests_are_retried_on_another_instance(make_gateway, start_upstream, test_identity):
    live = await start_upstream("catalog-live")
    gw = await make_gateway({"catalog": [DEAD, live.url]}, **SLOW_CHECKS, breaker_failures=100)
    upstreams_of(gw).services["catalog"].instances[0].healthy = True  # as if the first check had passed
    for _ in range(6):
        resp = await gw.get("/api/catalog/products")
        assert resp.status == 200 and (await resp.json())["instance"] == "catalog-live"
    assert await metric(gw, "gateway_upstream_retries_total", service="catalog") >= 1
    assert await metric(gw, "gateway_upstream_errors_total", service="catalog", instance=DEAD, kind="connect") >= 1


async def test_a_request_that_never_left_is_retried_whatever_its_method(make_gateway, start_upstream, test_identity):
    live = await start_upstream("catalog-live")
    gw = await make_gateway({"catalog": [DEAD, live.url]}, **SLOW_CHECKS, breaker_failures=100)
    upstreams_of(gw).services["catalog"].instances[0].healthy = True
    admin = test_identity.headers(test_identity.admin_token())
    for _ in range(6):  # connection refused: nothing was sent, so even POST is safe to send elsewhere
        resp = await gw.post("/api/catalog/products", json={"name": "x"}, headers=admin)
        assert resp.status == 200
    assert len(live.seen) == 6


@pytest.mark.parametrize(
    ("method", "retried"), [("GET", True), ("PUT", True), ("DELETE", True), ("POST", False), ("PATCH", False)]
)
async def test_only_idempotent_methods_are_retried_after_the_upstream_got_them(
    make_gateway, start_upstream, test_identity, method, retried
):
    """``.../drop`` runs the handler and then cuts the connection: the upstream may have acted on it."""
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, **SLOW_CHECKS, breaker_failures=100, retries=2)
    admin = test_identity.headers(test_identity.admin_token())
    resp = await gw.request(method, "/api/catalog/products/p-1/drop", json={"n": 1}, headers=admin)
    assert resp.status == 502
    body = await resp.json()
    assert body["type"].endswith("/bad-gateway") and "127.0.0.1" not in body["detail"]  # no topology leaks
    assert len(catalog.seen) == (3 if retried else 1)


async def test_streamed_bodies_are_never_replayed(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, **SLOW_CHECKS, buffer_limit=1024, max_body=1 << 20)
    resp = await gw.put(
        "/api/cart/items/p-1/drop", data=big_body(64 * 1024), headers=test_identity.headers(test_identity.token())
    )
    assert resp.status == 502
    assert len(cart.seen) == 1  # PUT is idempotent, but its body streamed through and is gone


async def test_breaker_opens_on_a_dead_instance_and_closes_when_it_returns(make_gateway, start_upstream):
    a = await start_upstream("catalog-a")
    b = await start_upstream("catalog-b")
    gw = await make_gateway({"catalog": [a.url, b.url]}, **SLOW_CHECKS, breaker_failures=3, breaker_cooldown=1.0)
    inst_b = next(i for i in upstreams_of(gw).services["catalog"].instances if i.url == b.url)
    await b.server.close()

    for _ in range(12):  # every request still succeeds: failed attempts on b are retried on a
        assert (await gw.get("/api/catalog/products")).status == 200
    assert inst_b.breaker.state == OPEN
    assert await metric(gw, "gateway_breaker_state", service="catalog", instance=b.url) == 2
    attempts = inst_b.requests
    for _ in range(6):  # open: b gets nothing
        assert (await gw.get("/api/catalog/products")).status == 200
    assert inst_b.requests == attempts

    await start_upstream(port=b.port, upstream=b)  # b is back where it was
    await asyncio.sleep(1.05)  # the cool-down: then one probe goes through and closes the breaker

    async def b_serves() -> bool:
        resp = await gw.get("/api/catalog/products")
        return (await resp.json())["instance"] == "catalog-b"

    await eventually(b_serves, what="b serving again")
    assert inst_b.breaker.state == CLOSED
    assert await metric(gw, "gateway_breaker_state", service="catalog", instance=b.url) == 0
    assert await metric(gw, "gateway_breaker_opened_total", service="catalog", instance=b.url) >= 1


async def test_a_failed_probe_opens_the_breaker_again(make_gateway, start_upstream):
    a = await start_upstream("catalog-a")
    gw = await make_gateway({"catalog": [a.url, DEAD]}, **SLOW_CHECKS, breaker_failures=2, breaker_cooldown=1.0)
    dead = upstreams_of(gw).services["catalog"].instances[1]
    dead.healthy = True
    for _ in range(8):
        assert (await gw.get("/api/catalog/products")).status == 200
    assert dead.breaker.state == OPEN and dead.breaker.opened == 1
    await asyncio.sleep(1.05)
    for _ in range(6):  # one of these is the probe: it fails (and is retried on a), the breaker opens again
        assert (await gw.get("/api/catalog/products")).status == 200
    assert dead.breaker.state == OPEN and dead.breaker.opened == 2


async def test_health_checks_take_an_instance_out_and_put_it_back(make_gateway, start_upstream):
    a = await start_upstream("catalog-a")
    b = await start_upstream("catalog-b")
    gw = await make_gateway({"catalog": [a.url, b.url]}, health_interval=0.05)
    inst_b = next(i for i in upstreams_of(gw).services["catalog"].instances if i.url == b.url)
    b.ready = False
    await eventually(lambda: not inst_b.healthy, what="b out")
    assert await metric(gw, "gateway_upstream_up", service="catalog", instance=b.url) == 0
    served = {(await (await gw.get("/api/catalog/products")).json())["instance"] for _ in range(10)}
    assert served == {"catalog-a"}
    b.ready = True
    await eventually(lambda: inst_b.healthy, what="b back")
    served = {(await (await gw.get("/api/catalog/products")).json())["instance"] for _ in range(10)}
    assert served == {"catalog-a", "catalog-b"}


async def test_checks_never_take_out_the_last_instance(make_gateway, start_upstream):
    """Every instance failing its checks (an overloaded service answers them late): requests still go to them —
    slow answers beat certain 503s. Only breakers, which see real failures, keep traffic away."""
    a = await start_upstream("catalog-a")
    gw = await make_gateway({"catalog": a.url}, health_interval=0.05)
    a.ready = False
    await eventually(lambda: not upstreams_of(gw).services["catalog"].instances[0].healthy, what="a out")
    resp = await gw.get("/api/catalog/products")
    assert resp.status == 200 and (await resp.json())["instance"] == "catalog-a"
    assert await metric(gw, "gateway_upstream_panic_total", service="catalog") >= 1
    ready = await gw.get("/health/ready")  # but the gateway does not claim to be ready: nothing is healthy
    assert ready.status == 503


async def test_every_breaker_open_is_503(make_gateway):
    gw = await make_gateway({}, **SLOW_CHECKS, breaker_failures=1, breaker_cooldown=30)
    upstreams_of(gw).services["catalog"].instances[0].healthy = True
    first = await gw.get("/api/catalog/products")
    assert first.status in (502, 503)  # the breaker opens on the first failed attempt
    resp = await gw.get("/api/catalog/products")
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["type"].endswith("/unavailable")


async def test_dead_upstream_is_502(make_gateway):
    gw = await make_gateway({}, **SLOW_CHECKS)
    upstreams_of(gw).services["catalog"].instances[0].healthy = True
    resp = await gw.get("/api/catalog/products")
    assert resp.status == 502
    assert resp.content_type == "application/problem+json"


async def test_upstream_timeout_is_504(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, timeout=0.3)
    started = asyncio.get_running_loop().time()
    resp = await gw.get("/api/catalog/products/slow?s=3")
    elapsed = asyncio.get_running_loop().time() - started
    assert resp.status == 504
    assert (await resp.json())["type"].endswith("/timeout")
    assert elapsed < 1.5  # not retried: one timeout, not three
    assert len(catalog.seen) == 1
    # the timed-out connection is not reused; the next request works
    assert (await gw.get("/api/catalog/products")).status == 200


async def test_declared_oversized_body_is_413_before_anything_is_sent(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, max_body=1000, buffer_limit=500)
    resp = await gw.put("/api/cart/items/p-1", data=b"x" * 1001, headers=test_identity.headers(test_identity.token()))
    assert resp.status == 413
    assert (await resp.json())["type"].endswith("/payload-too-large")
    assert not cart.seen


async def test_streamed_oversized_body_is_413(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, max_body=100_000, buffer_limit=10_000)

    async def chunks():
        for _ in range(50):
            yield b"y" * 4096  # 200 KiB without a Content-Length: counted as it streams

    resp = await gw.put("/api/cart/items/p-1", data=chunks(), headers=test_identity.headers(test_identity.token()))
    assert resp.status == 413


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_request_bodies_stream_through_intact(make_gateway, start_upstream, test_identity, chunked):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, max_body=4 << 20, buffer_limit=64 * 1024)
    body = big_body(3 << 20)

    async def chunks():
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    resp = await gw.put(
        "/api/cart/items/p-1",
        data=chunks() if chunked else io.BytesIO(body),
        headers=test_identity.headers(test_identity.token()),
    )
    assert resp.status == 200
    echoed = await resp.json()
    assert echoed["body_len"] == len(body) and echoed["sha256"] == hashlib.sha256(body).hexdigest()
    seen = cart.seen[0]["headers"]
    assert ("Transfer-Encoding" in seen) == chunked


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_early_answer_to_a_streamed_body_is_passed_on(make_gateway, start_upstream, test_identity, chunked):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, max_body=8 << 20, buffer_limit=16 * 1024)
    body = big_body(4 << 20)

    async def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    headers = test_identity.headers(test_identity.token())
    resp = await gw.put("/api/cart/items/p-1/early", data=chunks() if chunked else io.BytesIO(body), headers=headers)
    assert resp.status == 403 and (await resp.json())["instance"] == "cart"
    # the connection that carried the cut-short body is not reused: the next request is clean
    resp = await gw.put("/api/cart/items/p-1", json={"quantity": 1}, headers=headers)
    assert resp.status == 200 and (await resp.json())["body_len"] == len(b'{"quantity": 1}')


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_responses_stream_back_intact(make_gateway, start_upstream, chunked):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, buffer_limit=64 * 1024)
    size = 5 << 20
    resp = await gw.get(f"/api/catalog/big?size={size}" + ("&chunked=1" if chunked else ""))
    assert resp.status == 200
    assert resp.headers.get("X-Request-Id")  # set before the head went out
    data = await resp.read()
    assert data == big_body(size)
    # the connection went back to the pool and serves the next request
    assert (await gw.get("/api/catalog/products")).status == 200


async def test_upstream_dying_mid_response_cuts_the_client_connection(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, buffer_limit=64 * 1024)
    resp = await gw.get("/api/catalog/big?size=4000000&die=1")
    assert resp.status == 200  # the head was already on its way
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # but the body is visibly truncated, never passed off as whole
    assert (await gw.get("/api/catalog/products")).status == 200


async def test_connections_are_kept_alive_and_bounded(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, pool_size=4)
    results = await asyncio.gather(*(gw.get("/api/catalog/products") for _ in range(40)))
    assert all(r.status == 200 for r in results)
    pool = upstreams_of(gw).services["catalog"].instances[0].pool
    assert pool.open_connections <= 4
    for _ in range(10):
        await gw.get("/api/catalog/products")
    assert pool.open_connections <= 4  # reused, not reopened
