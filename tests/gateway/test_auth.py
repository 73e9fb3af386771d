"""Token checks at the gateway: every forged token is refused before any upstream sees the request, roles and
scopes are enforced per route, and client-supplied identity headers never reach an upstream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import pytest
from joserfc import jwt

from identity.keys import generate_key
from runtime.auth import VERIFIER_KEY
from runtime.routes import ADMIN, ANY_TAIL, PUBLIC, Route, rule, scopes


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(identity: Any, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": identity.issuer,
        "sub": str(uuid.uuid4()),
        "aud": identity.audience,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "scope": "openid",
        "roles": ["customer"],
        "client_id": "storefront",
    }
    c.update(over)
    return c


def sign(key: Any, payload: dict[str, Any], **header: Any) -> str:
    h = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt", **header}
    return jwt.encode(h, payload, key.to_joserfc(), algorithms=[h["alg"]])


def forged_tokens(identity: Any) -> dict[str, str]:
    """Every way of faking a token the brief names, built like tests/test_auth_verifier.py does."""
    key = identity.ring.keys()[0]
    now = int(time.time())
    good = sign(key, claims(identity))
    h, p, s = good.split(".")
    unsigned_none = f"{b64(json.dumps({'alg': 'none', 'kid': key.kid}).encode())}.{p}."
    # HS256 keyed with the verifier's public key material (the key-confusion attack)
    hs_header = b64(json.dumps({"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}).encode())
    public_pem = key.to_joserfc().as_pem(private=False)
    hs_sig = hmac.new(public_pem, f"{hs_header}.{p}".encode(), hashlib.sha256).digest()
    impostor = generate_key("ES256", kid=key.kid)  # same kid, another key
    tampered = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    tampered["roles"] = ["admin"]
    return {
        "alg none": unsigned_none,
        "HS256 with the public key": f"{hs_header}.{p}.{b64(hs_sig)}",
        "wrong key": sign(impostor, claims(identity)),
        "wrong iss": sign(key, claims(identity, iss="https://evil.example")),
        "wrong aud": sign(key, claims(identity, aud="another-api")),
        "expired": sign(key, claims(identity, iat=now - 2000, nbf=now - 2000, exp=now - 1000)),
        "not yet valid": sign(key, claims(identity, nbf=now + 600)),
        "tampered payload": f"{h}.{b64(json.dumps(tampered).encode())}.{s}",
        "tampered signature": f"{h}.{p}.{s[:-4]}AAAA",
        "garbage": "not-a-jwt",
    }


FORGERIES = [
    "alg none",
    "HS256 with the public key",
    "wrong key",
    "wrong iss",
    "wrong aud",
    "expired",
    "not yet valid",
    "tampered payload",
    "tampered signature",
    "garbage",
]


@pytest.mark.parametrize("case", FORGERIES)
async def test_forged_tokens_are_refused_at_the_gateway(make_gateway, start_upstream, test_identity, case):
    cart = await start_upstream("cart")
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"cart": cart.url, "catalog": catalog.url})
    token = forged_tokens(test_identity)[case]
    for method, path in (
        ("GET", "/api/cart"),
        ("PUT", "/api/cart/items/p-1"),
        ("GET", "/api/catalog/products"),
        ("POST", "/api/catalog/products"),
    ):
        resp = await gw.request(method, path, headers={"Authorization": f"Bearer {token}"}, json={})
        assert resp.status == 401, (case, path, await resp.text())
        assert resp.content_type == "application/problem+json"
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="ecom", error="invalid_token"')
    assert not cart.seen and not catalog.seen


async def test_missing_token_is_401_with_a_challenge(make_gateway, start_upstream):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url})
    resp = await gw.get("/api/cart")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="ecom"'
    body = await resp.json()
    assert body["type"].endswith("/unauthorized") and body["status"] == 401
    for header in ("Basic dXNlcjpwdw==", "Bearer", "Bearer a b", "Bearer ÿ"):
        resp = await gw.get("/api/cart", headers={"Authorization": header})
        assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"], header
    resp = await gw.get("/api/cart", headers=[("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")])
    assert resp.status == 401
    assert not cart.seen


async def test_valid_token_passes_and_is_verified_once(make_gateway, start_upstream, test_identity):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url})
    verifier = gw.app[VERIFIER_KEY]
    token = test_identity.token()
    for _ in range(5):
        assert (await gw.get("/api/cart", headers=test_identity.headers(token))).status == 200
    assert verifier.cache_misses == 1  # the rest came from the verified-token cache
    assert len(cart.seen) == 5


async def test_roles_are_enforced_per_route(make_gateway, start_upstream, test_identity):
    catalog, order, cart = [await start_upstream(n) for n in ("catalog", "order", "cart")]
    gw = await make_gateway({"catalog": catalog.url, "order": order.url, "cart": cart.url})
    customer = test_identity.headers(test_identity.token())
    admin = test_identity.headers(test_identity.admin_token())
    nobody = test_identity.headers(test_identity.token(roles=()))
    cases = [
        ("POST", "/api/catalog/products", customer, 403),
        ("POST", "/api/catalog/products", admin, 200),
        ("PATCH", "/api/catalog/products/p-1", customer, 403),
        ("GET", "/api/catalog/products/p-1", None, 200),
        ("POST", "/api/orders/o-1/ship", customer, 403),
        ("POST", "/api/orders/o-1/ship", admin, 200),
        ("POST", "/api/orders/o-1/cancel", customer, 200),
        ("GET", "/api/orders", nobody, 403),
        ("GET", "/api/cart", nobody, 403),
        ("GET", "/api/cart/admin/actors", customer, 403),
        ("GET", "/api/cart/admin/actors", admin, 200),
    ]
    for method, path, headers, status in cases:
        resp = await gw.request(method, path, headers=headers or {}, json={})
        assert resp.status == status, (method, path, await resp.text())
        if status == 403:
            assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
            assert (await resp.json())["type"].endswith("/insufficient-scope")


async def test_scope_policy(make_gateway, start_upstream, test_identity):
    reports = await start_upstream("catalog")
    routes = (
        Route("/api/reports", "catalog", (rule(r"/admin(/.*)?", ADMIN), rule(ANY_TAIL, scopes("reports:read")))),
        Route("/connect", "identity", (rule(ANY_TAIL, PUBLIC),)),
    )
    gw = await make_gateway({"catalog": reports.url}, routes=routes)
    without = test_identity.headers(test_identity.token(scopes=("openid",)))
    with_scope = test_identity.headers(test_identity.token(scopes=("openid", "reports:read")))
    resp = await gw.get("/api/reports/daily", headers=without)
    assert resp.status == 403 and 'scope="reports:read"' in resp.headers["WWW-Authenticate"]
    assert (await resp.json())["required_scopes"] == ["reports:read"]
    assert (await gw.get("/api/reports/daily", headers=with_scope)).status == 200
    assert len(reports.seen) == 1


async def test_public_routes_pass_client_credentials_through(make_gateway, start_upstream):
    """Identity's token endpoint takes client credentials (Basic) in Authorization: not the gateway's business."""
    identity = await start_upstream("identity")
    gw = await make_gateway({"identity": identity.url})
    resp = await gw.post(
        "/connect/token",
        data={"grant_type": "password", "username": "a@example.com", "password": "pw", "client_id": "storefront"},
        headers={"Authorization": "Basic c3RvcmVmcm9udDpzZWNyZXQ="},
    )
    assert resp.status == 200
    seen = identity.seen[0]
    assert seen["headers"]["Authorization"] == "Basic c3RvcmVmcm9udDpzZWNyZXQ="
    assert b"grant_type=password" in seen["body"]


SPOOFED = {
    "X-User-Id": "admin-1",
    "X-User-Roles": "admin",
    "X-Forwarded-User": "admin@example.com",
    "X-Principal": "admin",
    "X-User": "admin",
    "X-Remote-User": "admin",
    "Remote-User": "admin",
    "X-Auth-User": "admin",
    "X-Authenticated-User": "admin",
    "X-User-Email": "admin@example.com",
    "X-Roles": "admin",
    "X-Scopes": "everything",
    "X-Client-Id": "backoffice",
    "X-Forwarded-For": "10.9.9.9",
}


@pytest.mark.parametrize("path", ["/api/cart", "/api/catalog/products", "/connect/userinfo"])
async def test_spoofed_identity_headers_never_reach_an_upstream(make_gateway, start_upstream, test_identity, path):
    ups = {n: await start_upstream(n) for n in ("cart", "catalog", "identity")}
    gw = await make_gateway({n: u.url for n, u in ups.items()})
    token = test_identity.token("user-7")
    resp = await gw.get(path, headers={**SPOOFED, "x-uSer-iD": "admin-2", **test_identity.headers(token)})
    assert resp.status == 200
    seen = next(u for u in ups.values() if u.seen).seen[0]["headers"]
    leaked = {name for name in SPOOFED if name in seen and seen[name] == SPOOFED[name]}
    assert not leaked, leaked
    assert "X-User-Id" not in seen
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # ours, not the client's
    assert seen["Authorization"] == f"Bearer {token}"  # upstreams learn who calls from the token only


async def test_headers_named_in_connection_are_not_forwarded(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    resp = await gw.get(
        "/api/catalog/products", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Keep": "2"}
    )
    assert resp.status == 200
    seen = catalog.seen[0]["headers"]
    assert "X-Hop" not in seen and seen["X-Keep"] == "2" and "Connection" not in seen
