"""Routing by prefix, what is forwarded (and what is not), actor affinity and balancing."""

from __future__ import annotations

import collections
import uuid

import pytest

from gateway.options import GatewayOptions
from gateway.routes import ROUTES
from gateway.upstreams import Service
from runtime.cluster import rendezvous
from tests.gateway.conftest import eventually, raw_request, upstreams_of


@pytest.mark.parametrize(
    ("path", "service", "auth"),
    [
        ("/.well-known/openid-configuration", "identity", None),
        ("/connect/token", "identity", None),
        ("/api/identity/users", "identity", None),
        ("/api/catalog/products?page=2&q=red%20shoe", "catalog", None),
        ("/api/catalog", "catalog", None),
        ("/api/cart", "cart", "customer"),
        ("/api/cart/items/p-1", "cart", "customer"),
        ("/api/orders", "order", "customer"),
        ("/api/orders/o-1", "order", "customer"),
        ("/api/order/admin/actors", "order", "admin"),
        ("/api/catalog/admin/actors", "catalog", "admin"),
    ],
)
async def test_prefix_routes_to_its_service(make_gateway, start_upstream, test_identity, path, service, auth):
    ups = {name: await start_upstream(name) for name in ("identity", "catalog", "cart", "order")}
    gw = await make_gateway({name: up.url for name, up in ups.items()})
    headers = {}
    if auth == "customer":
        headers = test_identity.headers(test_identity.token())
    elif auth == "admin":
        headers = test_identity.headers(test_identity.admin_token())
    resp = await gw.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["instance"] == service
    assert body["path"] == path  # path and query unchanged, percent-encoding included
    assert sum(len(up.seen) for up in ups.values()) == 1


@pytest.mark.parametrize("path", ["/api/catalogue", "/api/cartx", "/api/order/other", "/nothing/here", "/api"])
async def test_paths_outside_the_table_are_refused_at_the_gateway(make_gateway, start_upstream, test_identity, path):
    ups = {name: await start_upstream(name) for name in ("identity", "catalog", "cart", "order")}
    gw = await make_gateway({name: up.url for name, up in ups.items()})
    resp = await gw.get(path, headers=test_identity.headers(test_identity.admin_token()))
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert all(not up.seen for up in ups.values())


async def test_dot_segments_are_refused(make_gateway, start_upstream):
    """``/api/catalog/../cart`` would be policed as catalog (public) and might be served as cart upstream."""
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    for path in ("/api/catalog/../cart", "/api/catalog/%2e%2e/cart", "/api/catalog/./products"):
        # raw bytes on the socket: an HTTP client library would normalise the path before sending it
        status, body = await raw_request(gw.port, f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert status == 400, path
        assert b"the path must not contain" in body
    assert not catalog.seen


async def test_method_body_status_and_headers_pass_through(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url})
    token = test_identity.token()
    resp = await gw.put(
        "/api/cart/items/p-9",
        json={"quantity": 3},
        headers={**test_identity.headers(token), "Idempotency-Key": "k-1", "Accept-Language": "de"},
    )
    assert resp.status == 200
    assert resp.headers["ETag"] == '"v1"' and resp.headers["X-Upstream"] == "cart"
    body = await resp.json()
    assert body["method"] == "PUT" and body["body_len"] == len(b'{"quantity": 3}')
    seen = cart.seen[0]
    assert seen["headers"]["Authorization"] == f"Bearer {token}"  # the token travels on
    assert seen["headers"]["Idempotency-Key"] == "k-1" and seen["headers"]["Accept-Language"] == "de"
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert seen["body"] == b'{"quantity": 3}'


async def test_upstream_status_codes_are_passed_on(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    for code in (201, 204, 304, 404, 409, 500, 503):
        resp = await gw.get(f"/api/catalog/status/{code}")
        assert resp.status == code
    head = await gw.head("/api/catalog/products")
    assert head.status == 200 and int(head.headers["Content-Length"]) > 0 and await head.read() == b""


async def test_request_id_is_passed_on_or_created(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    resp = await gw.get("/api/catalog/products", headers={"X-Request-Id": "trace-abc.1"})
    assert resp.headers["X-Request-Id"] == "trace-abc.1"
    assert catalog.seen[-1]["headers"]["X-Request-Id"] == "trace-abc.1"
    resp = await gw.get("/api/catalog/products")
    made = resp.headers["X-Request-Id"]
    assert len(made) == 32 and catalog.seen[-1]["headers"]["X-Request-Id"] == made
    assert catalog.seen[-1]["headers"].getall("X-Request-Id") == [made]


# ---------------------------------------------------------------------------------------------------
# Affinity and balancing


async def test_same_cart_always_reaches_the_same_instance(make_gateway, start_upstream, test_identity):
    carts = [await start_upstream(f"cart-{i}") for i in range(3)]
    gw = await make_gateway({"cart": [up.url for up in carts]})
    owner_of: dict[str, set[str]] = collections.defaultdict(set)
    users = [str(uuid.uuid4()) for _ in range(12)]
    tokens = {u: test_identity.token(u) for u in users}
    for _ in range(5):
        for user in users:
            for method, path in (("GET", "/api/cart"), ("PUT", "/api/cart/items/p-1"), ("DELETE", "/api/cart")):
                resp = await gw.request(method, path, headers=test_identity.headers(tokens[user]), json={"quantity": 1})
                assert resp.status == 200
                owner_of[user].add((await resp.json())["instance"])
    assert all(len(instances) == 1 for instances in owner_of.values()), owner_of
    assert len({next(iter(i)) for i in owner_of.values()}) > 1  # different carts spread over instances


async def test_order_and_product_writes_follow_their_id(make_gateway, start_upstream, test_identity):
    orders = [await start_upstream(f"order-{i}") for i in range(3)]
    catalogs = [await start_upstream(f"catalog-{i}") for i in range(3)]
    gw = await make_gateway({"order": [u.url for u in orders], "catalog": [u.url for u in catalogs]})
    customer = test_identity.headers(test_identity.token())
    admin = test_identity.headers(test_identity.admin_token())
    for entity in (str(uuid.uuid4()) for _ in range(8)):
        seen = set()
        for method, path, headers in (
            ("GET", f"/api/orders/{entity}", customer),
            ("POST", f"/api/orders/{entity}/cancel", customer),
            ("POST", f"/api/orders/{entity}/ship", admin),
            ("GET", f"/api/order/admin/actors/order/{entity}", admin),
        ):
            resp = await gw.request(method, path, headers=headers)
            assert resp.status == 200, (path, await resp.text())
            seen.add((await resp.json())["instance"])
        assert len(seen) == 1, seen
        seen = set()
        for method in ("PATCH", "DELETE", "POST"):
            path = f"/api/catalog/products/{entity}" + ("/restock" if method == "POST" else "")
            resp = await gw.request(method, path, headers=admin, json={})
            assert resp.status == 200
            seen.add((await resp.json())["instance"])
        assert len(seen) == 1, seen


async def test_requests_without_an_entity_are_balanced(make_gateway, start_upstream, test_identity):
    catalogs = [await start_upstream(f"catalog-{i}") for i in range(3)]
    gw = await make_gateway({"catalog": [u.url for u in catalogs]})
    counts = collections.Counter()
    for _ in range(60):
        resp = await gw.get("/api/catalog/products?page=1")
        counts[(await resp.json())["instance"]] += 1
    assert set(counts) == {"catalog-0", "catalog-1", "catalog-2"}
    assert min(counts.values()) >= 10, counts  # sequential requests: the rotation spreads them evenly


async def test_affinity_key_moves_only_while_its_owner_is_out(make_gateway, start_upstream, test_identity):
    carts = [await start_upstream(f"cart-{i}") for i in range(3)]
    gw = await make_gateway({"cart": [u.url for u in carts]}, health_interval=0.05)
    token = test_identity.token(str(uuid.uuid4()))
    headers = test_identity.headers(token)
    owner = (await (await gw.get("/api/cart", headers=headers)).json())["instance"]
    down = next(u for u in carts if u.name == owner)
    down.ready = False  # health checks take it out
    inst = next(i for i in upstreams_of(gw).services["cart"].instances if i.url == down.url)
    await eventually(lambda: not inst.healthy, what="owner taken out")
    moved = {(await (await gw.get("/api/cart", headers=headers)).json())["instance"] for _ in range(5)}
    assert len(moved) == 1 and owner not in moved  # one stand-in, always the same
    down.ready = True
    await eventually(lambda: inst.healthy, what="owner back")
    back = {(await (await gw.get("/api/cart", headers=headers)).json())["instance"] for _ in range(5)}
    assert back == {owner}


# ---------------------------------------------------------------------------------------------------
# The ring itself


def test_ring_spreads_keys_and_moves_few_when_an_instance_is_added():
    opts = GatewayOptions()
    three = Service("cart", [f"http://10.0.0.{i}:8003" for i in range(3)], opts)
    four = Service("cart", [f"http://10.0.0.{i}:8003" for i in range(4)], opts)
    keys = [str(uuid.UUID(int=i)) for i in range(4000)]
    owners3 = {k: three.placement.owner(k).url for k in keys}
    owners4 = {k: four.placement.owner(k).url for k in keys}
    spread = collections.Counter(owners3.values())
    assert len(spread) == 3 and min(spread.values()) > 4000 / 3 * 0.7, spread
    moved = sum(owners3[k] != owners4[k] for k in keys)
    assert moved < 4000 * 0.35, moved  # ~1/4 expected; a modulo hash would move ~3/4
    assert all(owners4[k] == "http://10.0.0.3:8003" for k in keys if owners3[k] != owners4[k])


def test_placement_is_the_instances_own_and_stable_across_processes():
    # the same key lands on the same instance in every gateway process (no per-process hash seed), and it is
    # the owner the instances compute from their membership (runtime.cluster), so no request is forwarded
    urls = ["http://a:1", "http://b:1", "http://c:1"]
    service = Service("order", urls, GatewayOptions())
    keys = [str(uuid.UUID(int=i)) for i in range(500)]
    assert all(service.placement.owner(k).url == rendezvous(urls, k) for k in keys)
    assert service.placement.owner("3f0e8e0c-1b1a-4a63-9a55-0c6d1f0f2b11").url == "http://a:1"  # pinned: no seed
    # the view the instances report wins: with c out of the membership, c's keys go where the cluster sends them
    assert service.placement.set_members(["http://a:1/", "http://b:1"])
    assert all(service.placement.owner(k).url == rendezvous(urls[:2], k) for k in keys)


def test_route_table_has_a_policy_for_every_public_endpoint():
    prefixes = {r.prefix for r in ROUTES}
    assert {
        "/api/catalog",
        "/api/cart",
        "/api/orders",
        "/api/order",
        "/api/identity",
        "/connect",
        "/.well-known",
    } == prefixes
