"""A person signs in with a real browser through the gateway's port alone (issue 13, item 6).

The real embedded system (``python -m runtime.cli run``: every service in one process, SQLite files in the
test's own data directory, ports below 32768) and headless Chromium (tests/support/browser.py). The storefront
public client's authorization-code + PKCE flow, as a browser storefront runs it:

discovery at the gateway -> the authorize URL at the gateway -> the sign-in page -> fill in and post the form ->
303 to the storefront's ``/callback`` at the gateway -> exchange the code at the gateway's token endpoint ->
call the shop's API with the access token. Every request the browser makes goes to the gateway's port; the
screenshot of the callback page is kept in var/test-artifacts/.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from tests.support.browser import artifact_path, chromium, require_chromium
from tests.support.cluster import (
    PASSWORD,
    bearer,
    embedded_shop,
    new_email,
    request_json,
    token_claims,
    with_retries,
)

READY_WITHIN = 90.0  # seconds for `ecom run` to migrate and start every service on a loaded machine


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[str]:
    """The embedded system running; yields the gateway's URL (the public URL: the default, not set)."""
    require_chromium()  # before starting anything
    async with embedded_shop(tmp_path, ready_within=READY_WITHIN) as shop:
        yield shop.url


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async def attempt() -> tuple[int, Any]:
        status, body, _ = await request_json(http, method, url, **kwargs)
        return status, body

    return await with_retries(attempt, budget=30)


async def test_a_browser_signs_in_through_the_gateway_alone(gateway: str) -> None:
    from playwright.async_api import TimeoutError as PlaywrightTimeout  # installed: the fixture checked

    email = new_email("browser")
    async with aiohttp.ClientSession() as http:
        status, body = await call(
            http, "POST", f"{gateway}/api/identity/users", json={"email": email, "password": PASSWORD, "name": "Bea"}
        )
        assert status == 202, body
        status, doc = await call(http, "GET", f"{gateway}/.well-known/openid-configuration")
        assert status == 200, doc
    # discovery names the gateway: the issuer and every endpoint the browser or the app uses
    assert doc["issuer"] == gateway
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint", "end_session_endpoint"):
        assert doc[name].startswith(gateway + "/"), (name, doc[name])

    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    redirect_uri = f"{gateway}/callback"
    authorize = (
        doc["authorization_endpoint"]
        + "?"
        + urlencode(
            {
                "response_type": "code",
                "client_id": "storefront",
                "redirect_uri": redirect_uri,
                "scope": "openid email ecom",
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
    )

    seen: list[str] = []
    answers: list[tuple[str, str, int]] = []  # (method, url, status) of every response the browser got
    async with chromium() as browser:
        page = await browser.new_page()
        page.on("request", lambda request: seen.append(request.url))
        page.on("response", lambda r: answers.append((r.request.method, r.url.split("?")[0], r.status)))
        response = await page.goto(authorize)
        assert response is not None and response.status == 200, await page.content()
        assert await page.title() == "Sign in"
        await page.fill("#email", email)
        await page.fill("#password", PASSWORD)
        await page.screenshot(path=str(artifact_path("browser-signin-page.png")), full_page=True)
        await page.click("button[type=submit]")
        try:
            await page.wait_for_url(f"{redirect_uri}?**")
        except PlaywrightTimeout:
            await page.screenshot(path=str(artifact_path("browser-signin-failed.png")), full_page=True)
            pytest.fail(f"no redirect to the callback; answers {answers}; the page:\n{await page.content()}")
        await page.screenshot(path=str(artifact_path("browser-signin-callback.png")), full_page=True)
        assert "You are signed in" in await page.inner_text("main")
        callback_url = page.url
    # the form post answered 303 to the callback, which answered 200: all at the gateway
    assert answers == [
        ("GET", doc["authorization_endpoint"], 200),
        ("POST", doc["authorization_endpoint"], 303),
        ("GET", redirect_uri, 200),
    ], answers

    # the browser never left the gateway's port: the page, the form post, the redirect
    netloc = urlsplit(gateway).netloc
    assert seen and {urlsplit(u).netloc for u in seen} == {netloc}, seen
    assert any(u.startswith(redirect_uri + "?") for u in seen)

    query = {k: v[0] for k, v in parse_qs(urlsplit(callback_url).query).items()}
    assert query["state"] == state and query["iss"] == gateway
    async with aiohttp.ClientSession() as http:
        status, tokens = await call(
            http,
            "POST",
            doc["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "client_id": "storefront",
                "code": query["code"],
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
        )
        assert status == 200, tokens
        claims = token_claims(tokens["access_token"])
        assert claims["iss"] == gateway and claims["client_id"] == "storefront"
        id_claims = token_claims(tokens["id_token"])
        assert (id_claims["iss"], id_claims["nonce"], id_claims["email"]) == (gateway, nonce, email)
        # the shop's API with the token: the gateway and the cart service both verify it (issuer = gateway)
        status, products = await call(http, "GET", f"{gateway}/api/catalog/products?page_size=1&sort=price")
        assert status == 200 and products["items"], products
        product = products["items"][0]["id"]
        status, cart = await call(
            http,
            "PUT",
            f"{gateway}/api/cart/items/{product}",
            json={"quantity": 1},
            headers=bearer(tokens["access_token"]),
        )
        assert status == 200, cart
        assert [(line["product_id"], line["quantity"]) for line in cart["lines"]] == [(product, 1)]
        status, me = await call(http, "GET", doc["userinfo_endpoint"], headers=bearer(tokens["access_token"]))
        assert status == 200 and me["email"] == email, me
