"""The shop's public URL (the gateway's) is the issuer: discovery, tokens, the sign-in flow and the CSRF origin
follow ``ECOM_PUBLIC_URL`` (default: the gateway's address), never identity's own address nor the request's
``Host`` or ``X-Forwarded-*`` headers (issue 13, item 6)."""

from __future__ import annotations

from typing import Any

import pytest

from config import ConfigError, load_settings
from identity.pages import CSRF_COOKIE
from tests.identity.conftest import PASSWORD, IdentityServer, MakeIdentity, pkce_pair, query_of
from tests.support.cluster import token_claims

ENDPOINTS = (
    "authorization_endpoint",
    "token_endpoint",
    "jwks_uri",
    "userinfo_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
    "end_session_endpoint",
)


async def discovery(idsrv: IdentityServer, **headers: str) -> dict[str, Any]:
    resp = await idsrv.client.get("/.well-known/openid-configuration", headers=headers)
    assert resp.status == 200
    return await resp.json()


def test_the_public_url_defaults_to_the_gateway_and_is_the_issuer() -> None:
    s = load_settings({"ECOM_GATEWAY_PORT": "9000"})
    assert s.public_url == s.issuer == "http://127.0.0.1:9000"
    assert s.jwks_url == "http://127.0.0.1:8001/.well-known/jwks.json"  # identity itself, not the door
    s = load_settings({"ECOM_PUBLIC_URL": "https://shop.example.com/", "ECOM_IDENTITY_UPSTREAMS": "http://id:81, x"})
    assert s.issuer == "https://shop.example.com" and s.jwks_url == "http://id:81/.well-known/jwks.json"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ECOM_PUBLIC_URL": "shop.example.com"}, "ECOM_PUBLIC_URL: expected an http:// or https:// base URL"),
        ({"ECOM_PUBLIC_URL": "https://shop.example.com/shop"}, "ECOM_PUBLIC_URL: expected a URL without a path"),
        ({"ECOM_ISSUER": "http://127.0.0.1:8001"}, "ECOM_ISSUER: replaced by ECOM_PUBLIC_URL"),
    ],
)
def test_bad_or_old_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


async def test_discovery_names_the_public_url_only(idsrv: IdentityServer) -> None:
    public = idsrv.settings.base_url("gateway")
    assert idsrv.issuer == public != idsrv.url
    doc = await discovery(idsrv)
    assert doc["issuer"] == public
    assert {name: doc[name] for name in ENDPOINTS} == {
        "authorization_endpoint": f"{public}/connect/authorize",
        "token_endpoint": f"{public}/connect/token",
        "jwks_uri": f"{public}/.well-known/jwks.json",
        "userinfo_endpoint": f"{public}/connect/userinfo",
        "revocation_endpoint": f"{public}/connect/revocation",
        "introspection_endpoint": f"{public}/connect/introspect",
        "end_session_endpoint": f"{public}/connect/endsession",
    }
    # a client cannot make identity name another host: Host and forwarded headers are not read
    forged = await discovery(
        idsrv, **{"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "Forwarded": "host=evil.example"}
    )
    assert forged == doc


async def test_a_configured_public_url_is_followed_everywhere(make_identity: MakeIdentity) -> None:
    idsrv = await make_identity(ECOM_PUBLIC_URL="https://shop.example.com")
    doc = await discovery(idsrv)
    assert doc["issuer"] == "https://shop.example.com"
    assert all(doc[name].startswith("https://shop.example.com/") for name in ENDPOINTS)
    await idsrv.register("ann@example.com")
    verifier, challenge = pkce_pair()
    resp = await idsrv.client.get(
        "/connect/authorize",
        params={
            "response_type": "code",
            "client_id": "storefront",
            "redirect_uri": "https://shop.example.com/callback",  # the storefront's, seeded from the public URL
            "state": "s1",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert resp.status == 200
    assert "Secure" in resp.headers["Set-Cookie"]  # an https public URL: the CSRF cookie is https-only
    _, fields = await idsrv.authorize_page(challenge, redirect_uri="https://shop.example.com/callback")
    form = {**fields, "email": "ann@example.com", "password": PASSWORD}
    # the test client talks plain http, so it keeps the Secure cookie back: the browser sends it over https
    cookie = f"{CSRF_COOKIE}={fields['csrf_token'].split('.')[1]}"
    # the form's Origin must be the public URL's (default port left out, as browsers send it)
    for origin, status in (("http://shop.example.com", 403), (idsrv.url, 403), ("https://shop.example.com", 303)):
        resp = await idsrv.client.post(
            "/connect/authorize", data=form, headers={"Origin": origin, "Cookie": cookie}, allow_redirects=False
        )
        assert resp.status == status, (origin, await resp.text())
    query = query_of(resp.headers["Location"])
    assert query["iss"] == "https://shop.example.com"
    status, body, _ = await idsrv.token(
        {
            "grant_type": "authorization_code",
            "client_id": "storefront",
            "code": query["code"],
            "redirect_uri": "https://shop.example.com/callback",
            "code_verifier": verifier,
        }
    )
    assert status == 200, body
    assert token_claims(body["access_token"])["iss"] == "https://shop.example.com"
    assert token_claims(body["id_token"])["iss"] == "https://shop.example.com"
