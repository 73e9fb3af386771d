"""Every catalog instance is used, and a dead or failing one is skipped: no 503 while another instance is up."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from actors.cart import api
from runtime.upstream import (
    Instance,
    InstanceFailed,
    NoInstance,
    Upstream,
    parse_urls,
)
from tests.cart.fake_catalog import FakeCatalog


def _url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_a_killed_catalog_instance_costs_no_request_while_another_is_up(make_shop, catalog, catalog_replica):
    products = await catalog.add_many(30)
    shop = await make_shop(f"{catalog.url},{_url(catalog_replica)}")
    upstream = shop.client.app[api.CART].catalog.upstream
    first, second = upstream.instances
    me = shop.shopper()
    for product_id in products[:6]:  # different products: every PUT asks the catalog
        await me.put(product_id, 1)
    assert first.calls >= 2 and second.calls >= 2  # both instances serve, not only the first

    await catalog.server.close()  # the first instance dies; its address refuses connections from now on
    responses = await asyncio.gather(
        *(shop.client.put(f"/api/cart/items/{p}", json={"quantity": 2}, headers=me.headers) for p in products[6:26])
    )
    assert [r.status for r in responses] == [200] * 20
    assert first.failures >= 1 and second.failures == 0
    resp = await me.checkout()  # checkout's fresh re-check of all 26 lines goes to the live instance too
    assert resp.status == 202, await resp.text()
    assert len((await me.get())["lines"]) == 26

    await catalog_replica.close()  # now none is left: 503 with Retry-After, nothing changed
    resp = await shop.client.put(f"/api/cart/items/{products[27]}", json={"quantity": 1}, headers=me.headers)
    assert resp.status == 503 and resp.content_type == "application/problem+json"
    assert (await resp.json())["type"].endswith("/catalog-unavailable") and int(resp.headers["Retry-After"]) >= 1
    assert len((await me.get())["lines"]) == 26


@pytest.fixture
async def two_fakes(aiohttp_server) -> tuple[FakeCatalog, FakeCatalog, str]:
    fakes = FakeCatalog(), FakeCatalog()
    servers = [await aiohttp_server(f.app()) for f in fakes]
    return fakes[0], fakes[1], ",".join(_url(s) for s in servers)


async def test_an_instance_answering_5xx_is_cooled_down_and_the_lookup_goes_to_another(make_shop, two_fakes):
    broken, healthy, urls = two_fakes
    shop = await make_shop(urls)
    ids = [str(uuid.uuid4()) for _ in range(11)]
    for product_id in ids:
        broken.add(product_id)
        healthy.add(product_id)
    broken.mode = "error"
    me = shop.shopper()
    for product_id in ids[:10]:
        await me.put(product_id, 1)  # never a 503
    # The broken instance was left alone for its (growing) cool-down, not asked on every lookup.
    assert 1 <= broken.calls <= 3 and healthy.calls == 10

    healthy.mode = "error"  # every instance failing: the problem the customer had before, with Retry-After
    resp = await shop.client.put(f"/api/cart/items/{ids[10]}", json={"quantity": 3}, headers=me.headers)
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    assert [line["quantity"] for line in (await me.get())["lines"]] == [1] * 10


# ---------------------------------------------------------------------------------------------------
# The balancer's rules, on a clock the test moves


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _upstream(clock: Clock, n: int = 2, **kwargs) -> Upstream:
    return Upstream(
        "catalog", [f"http://127.0.0.1:{2000 + i}" for i in range(n)], clock=clock, rng=random.Random(7), **kwargs
    )


def test_urls_are_parsed_from_settings_text():
    assert parse_urls(" http://a:1/, http://b:2 ,,http://a:1") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        Upstream("catalog", " , ")


def test_idle_instances_take_turns_and_a_busy_one_is_passed_over():
    up = _upstream(Clock(), 3)
    picks = [up.pick() for _ in range(6)]
    assert {id(i) for i in picks[:3]} == {id(i) for i in up.instances} and picks[:3] == picks[3:]
    a, b, c = up.instances
    a.outstanding, b.outstanding = 2, 1
    assert up.pick() is c
    assert up.pick(exclude=[c]) is b


def test_a_failed_instance_cools_down_exponentially_with_jitter_up_to_a_cap_and_a_success_clears_it():
    clock = Clock()
    up = _upstream(clock, cooldown=1.0, max_cooldown=8.0)
    a, b = up.instances
    pauses = []
    for _ in range(6):
        pause = up.failed(a, "refused")
        pauses.append(pause)
        assert up.available() == [b]
        clock.now += pause  # the cool-down is over: it may be tried again
        assert a in up.available()
    for n, pause in enumerate(pauses):
        ceiling = min(8.0, 2.0**n)
        assert ceiling / 2 <= pause <= ceiling
    up.succeeded(a)
    assert a.failures == 0 and 0.5 <= up.failed(a, "refused") <= 1.0  # a new outage starts small again


def test_calls_that_were_in_flight_together_count_as_one_failure():
    clock = Clock()
    up = _upstream(clock, cooldown=1.0)
    a, _ = up.instances
    started = clock.now
    clock.now += 0.1
    for _ in range(20):
        up.failed(a, "refused", started=started)
    assert a.failures == 1


async def test_a_call_fails_over_at_once_and_gives_up_after_max_attempts():
    clock = Clock()
    up = _upstream(clock, 4, max_attempts=3)
    seen: list[Instance] = []

    async def dead(instance: Instance) -> str:
        seen.append(instance)
        raise InstanceFailed("refused")

    with pytest.raises(NoInstance) as caught:
        await up.call(dead)
    assert len(seen) == 3 and len({id(i) for i in seen}) == 3  # three different instances, then it stops
    assert all(i.outstanding == 0 for i in up.instances)

    async def ok(instance: Instance) -> str:
        return instance.url

    assert await up.call(ok) == next(i for i in up.instances if i not in seen).url  # the one not cooling down
    for instance in up.instances:
        up.failed(instance, "refused")
    with pytest.raises(NoInstance) as caught:
        await up.call(ok)
    assert 0 < caught.value.retry_after <= up.cooldown  # when the first one may be tried again


async def test_an_answer_that_is_not_the_instances_fault_ends_the_call_without_a_verdict():
    up = _upstream(Clock())

    async def refused(instance: Instance) -> str:
        raise LookupError("404 from the catalog")

    with pytest.raises(LookupError):
        await up.call(refused)
    assert sum(i.calls for i in up.instances) == 1  # not retried elsewhere: another instance would say the same
    assert all(i.failures == 0 for i in up.instances) and up.available() == up.instances
