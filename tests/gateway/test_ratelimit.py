"""Per-client rate limits: in memory, shared through a real Redis by two gateways, and failing open."""

from __future__ import annotations

import asyncio
import uuid

from gateway.ratelimit import LocalLimiter
from tests.conftest import require_server
from tests.gateway.conftest import metric

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


async def test_token_bucket_answers_429_and_recovers(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, rate_limit=1, rate_burst=3)
    alice = test_identity.headers(test_identity.token("alice-" + uuid.uuid4().hex))
    bob = test_identity.headers(test_identity.token("bob-" + uuid.uuid4().hex))
    statuses = [(await gw.get("/api/cart", headers=alice)).status for _ in range(3)]
    assert statuses == [200, 200, 200]  # the burst
    refused = await gw.get("/api/cart", headers=alice)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    body = await refused.json()
    assert body["type"].endswith("/rate-limited") and refused.content_type == "application/problem+json"
    assert (await gw.get("/api/cart", headers=bob)).status == 200  # every client has its own bucket
    await asyncio.sleep(1.05)  # 1 token/s: one is back
    assert (await gw.get("/api/cart", headers=alice)).status == 200
    assert len(cart.seen) == 5
    assert await metric(gw, "gateway_rate_limited_total") == 1


async def test_anonymous_clients_are_limited_by_address(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, rate_limit=1, rate_burst=2)
    statuses = [(await gw.get("/api/catalog/products")).status for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_local_buckets_stay_bounded():
    now = [0.0]
    limiter = LocalLimiter(rate=10, burst=5, max_keys=100, clock=lambda: now[0])
    for i in range(1000):
        now[0] += 0.001
        assert limiter.take(f"client-{i}") == 0.0
    assert len(limiter._buckets) <= 100
    assert limiter.take("client-999") == 0.0  # recent clients keep their bucket


async def test_redis_shares_one_limit_between_two_gateways(make_gateway, start_upstream, test_identity):
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    cart = await start_upstream("cart")
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    one = await make_gateway({"cart": cart.url}, redis_url=url, rate_limit=1, rate_burst=4)
    two = await make_gateway({"cart": cart.url}, redis_url=url, rate_limit=1, rate_burst=4)
    headers = test_identity.headers(test_identity.token("shared-" + uuid.uuid4().hex))
    statuses = []
    for gw in (one, two, one, two, one, two):
        statuses.append((await gw.get("/api/cart", headers=headers)).status)
    assert statuses[:4] == [200, 200, 200, 200]  # one bucket of 4 for both gateways
    assert statuses[4:] == [429, 429]
    await asyncio.sleep(1.05)  # 1 token/s: one is back, usable through either gateway
    assert (await two.get("/api/cart", headers=headers)).status == 200
    assert (await one.get("/api/cart", headers=headers)).status == 429
    assert await metric(one, "gateway_ratelimit_backend_errors_total") == 0


async def test_unreachable_redis_fails_open_to_the_per_process_limit(
    make_gateway, start_upstream, test_identity, caplog
):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, redis_url="redis://127.0.0.1:1/0", rate_limit=1, rate_burst=5)
    headers = test_identity.headers(test_identity.token())
    with caplog.at_level("WARNING", logger="gateway.ratelimit"):
        statuses = [(await gw.get("/api/cart", headers=headers)).status for _ in range(7)]
    assert statuses[:5] == [200] * 5  # served: Redis being down is not an outage
    assert 429 in statuses[5:]  # and one client still cannot flood this process
    # 7 judged for the subject, plus 1 for the address: the token's first use is checked in full
    assert await metric(gw, "gateway_ratelimit_backend_errors_total") == 8
    assert any("Redis" in r.getMessage() and "unreachable" in r.getMessage() for r in caplog.records)


async def test_limits_can_be_switched_off(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, rate_limit=0, rate_burst=1)
    assert [(await gw.get("/api/catalog/products")).status for _ in range(20)] == [200] * 20
    assert await metric(gw, "gateway_rate_limited_total") is None
