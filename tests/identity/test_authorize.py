"""The authorization endpoint: request validation (exact redirect URIs, PKCE S256 only), where errors go, the
login page's CSRF protection and security headers."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientSession

from tests.identity.conftest import PASSWORD, IdentityServer, pkce_pair, query_of


async def test_authorization_request_errors(idsrv: IdentityServer) -> None:
    _, challenge = pkce_pair()
    good = {
        "response_type": "code",
        "client_id": "storefront",
        "redirect_uri": idsrv.redirect_uri,
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }

    async def get(**over: Any) -> Any:
        params = {k: v for k, v in {**good, **over}.items() if v is not None}
        return await idsrv.client.get("/connect/authorize", params=params, allow_redirects=False)

    # never redirected: the client or the redirect URI cannot be trusted
    for over in (
        {"client_id": "nope"},
        {"client_id": None},
        {"redirect_uri": None},
        {"redirect_uri": idsrv.redirect_uri + "/"},
        {"redirect_uri": idsrv.redirect_uri.upper()},
        {"redirect_uri": idsrv.redirect_uri + "?x=1"},
        {"redirect_uri": "https://evil.example/callback"},
    ):
        resp = await get(**over)
        assert resp.status == 400 and resp.content_type == "application/problem+json", over
        assert "Location" not in resp.headers

    # redirected back with an OAuth error
    for over, error in (
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "openid admin"}, "invalid_scope"),
        ({"prompt": "none"}, "login_required"),
    ):
        resp = await get(**over)
        assert resp.status == 302, over
        query = query_of(resp.headers["Location"])
        assert resp.headers["Location"].startswith(idsrv.redirect_uri + "?")
        assert (query["error"], query["state"], query["iss"]) == (error, "s1", idsrv.issuer), over


async def test_login_page_headers_and_escaping(idsrv: IdentityServer) -> None:
    _, challenge = pkce_pair()
    resp = await idsrv.client.get(
        "/connect/authorize",
        params={
            "response_type": "code",
            "client_id": "storefront",
            "redirect_uri": idsrv.redirect_uri,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": '"><script>alert(1)</script>',
        },
    )
    assert resp.status == 200
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Cache-Control"] == "no-store"
    # no-referrer would make browsers post the form with "Origin: null", which the Origin check refuses
    assert resp.headers["Referrer-Policy"] == "same-origin"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/connect/authorize" in cookie
    page = await resp.text()
    assert "<script>" not in page and "&lt;script&gt;" in page


async def test_csrf_protection(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    _, challenge = pkce_pair()
    _, fields = await idsrv.authorize_page(challenge)
    credentials = {"email": "ann@example.com", "password": PASSWORD}

    # a cross-site post: no cookie (another browser session, or SameSite kept it back)
    async with ClientSession() as stranger:
        resp = await stranger.post(
            f"{idsrv.url}/connect/authorize", data={**fields, **credentials}, allow_redirects=False
        )
        assert resp.status == 403 and (await resp.json())["type"].endswith("/csrf")
    # right cookie, forged token
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, **credentials, "csrf_token": "A" * 43}, allow_redirects=False
    )
    assert resp.status == 403
    # right token, but posted from another origin
    resp = await idsrv.client.post(
        "/connect/authorize",
        data={**fields, **credentials},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403
    # nor from identity's own (internal) address: the sign-in page belongs to the shop's public URL
    assert idsrv.url != idsrv.issuer
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, **credentials}, headers={"Origin": idsrv.url}, allow_redirects=False
    )
    assert resp.status == 403
    # the genuine post from the public URL's origin (the gateway's) works
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, **credentials}, headers={"Origin": idsrv.issuer}, allow_redirects=False
    )
    assert resp.status == 303 and "code" in query_of(resp.headers["Location"])


async def test_posted_request_is_validated_again(idsrv: IdentityServer) -> None:
    await idsrv.register("bob@example.com")
    _, challenge = pkce_pair()
    _, fields = await idsrv.authorize_page(challenge)
    resp = await idsrv.client.post(
        "/connect/authorize",
        data={**fields, "redirect_uri": "https://evil.example/cb", "email": "bob@example.com", "password": PASSWORD},
        allow_redirects=False,
    )
    # the CSRF token is bound to the redirect URI (and client, state, challenge): refused before anything else
    assert resp.status == 403 and "Location" not in resp.headers
    # a parameter outside the binding is validated again: an unknown scope goes back to the client as an error
    resp = await idsrv.client.post(
        "/connect/authorize",
        data={**fields, "scope": "openid no-such-scope", "email": "bob@example.com", "password": PASSWORD},
        allow_redirects=False,
    )
    assert resp.status in (302, 303) and "error=" in resp.headers["Location"]
    # empty credentials re-show the form instead of counting a failure
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, "email": "", "password": ""}, allow_redirects=False
    )
    assert resp.status == 200 and "Enter your email and password." in await resp.text()
