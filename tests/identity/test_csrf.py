"""The sign-in form's CSRF token is issued by the server (HMAC under a secret derived from identity's KEK),
bound to the browser's cookie and to the authorization request, and lives 10 minutes (issue 12)."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientSession, CookieJar

from identity.pages import CSRF_COOKIE, CSRF_TOKENS, CSRF_TTL, CsrfTokens
from tests.identity.conftest import PASSWORD, IdentityServer, pkce_pair, query_of

CREDENTIALS = {"email": "ann@example.com", "password": PASSWORD}


async def post(idsrv: IdentityServer, data: dict[str, str], **kwargs: Any) -> Any:
    return await idsrv.client.post("/connect/authorize", data={**data, **CREDENTIALS}, allow_redirects=False, **kwargs)


def cookie_of(idsrv: IdentityServer) -> str:
    return next(c.value for c in idsrv.client.session.cookie_jar if c.key == CSRF_COOKIE)


async def test_an_invented_cookie_and_token_pair_is_refused(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    _, challenge = pkce_pair()
    _, fields = await idsrv.authorize_page(challenge)
    invented = "A" * 43
    # the attack the old double-submit cookie let through: the same invented value in cookie and field
    async with ClientSession(cookies={CSRF_COOKIE: invented}) as attacker:
        resp = await attacker.post(
            f"{idsrv.url}/connect/authorize",
            data={**fields, **CREDENTIALS, "csrf_token": invented},
            allow_redirects=False,
        )
        assert resp.status == 403 and (await resp.json())["type"].endswith("/csrf")
        # a well-formed token with an invented MAC, for the invented cookie
        forged = f"{fields['csrf_token'].split('.')[0]}.{invented}.{'B' * 43}"
        resp = await attacker.post(
            f"{idsrv.url}/connect/authorize",
            data={**fields, **CREDENTIALS, "csrf_token": forged},
            allow_redirects=False,
        )
        assert resp.status == 403
    # the genuine form still works
    resp = await post(idsrv, fields)
    assert resp.status == 303 and "code" in query_of(resp.headers["Location"])


async def test_a_token_is_bound_to_its_authorization_request(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    _, first = await idsrv.authorize_page(pkce_pair()[1], state="first")
    _, second = await idsrv.authorize_page(pkce_pair()[1], state="second")
    # replayed for another request: another state, another code challenge, another redirect URI
    assert (await post(idsrv, {**second, "csrf_token": first["csrf_token"]})).status == 403
    assert (await post(idsrv, {**first, "code_challenge": second["code_challenge"]})).status == 403
    assert (await post(idsrv, {**first, "state": "other"})).status == 403
    # each token works for its own request
    resp = await post(idsrv, second)
    assert resp.status == 303 and query_of(resp.headers["Location"])["state"] == "second"


async def test_a_token_is_bound_to_the_browser(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    _, fields = await idsrv.authorize_page(pkce_pair()[1])
    # the attacker's own genuine token, planted in the victim's browser (which has its own cookie)
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as victim:  # unsafe: cookies of an IP host
        page = await victim.get(
            f"{idsrv.url}/connect/authorize", params={k: v for k, v in fields.items() if k != "csrf_token"}
        )
        assert page.status == 200
        assert any(c.key == CSRF_COOKIE and c.value != cookie_of(idsrv) for c in victim.cookie_jar)
        resp = await victim.post(
            f"{idsrv.url}/connect/authorize", data={**fields, **CREDENTIALS}, allow_redirects=False
        )
        assert resp.status == 403


async def test_a_token_expires_after_ten_minutes(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    tokens = idsrv.client.app[CSRF_TOKENS]
    now = [1_800_000_000.0]
    tokens.clock = lambda: now[0]
    _, fields = await idsrv.authorize_page(pkce_pair()[1])
    assert int(fields["csrf_token"].split(".")[0]) == int(now[0]) + CSRF_TTL
    now[0] += CSRF_TTL + 1
    assert (await post(idsrv, fields)).status == 403
    now[0] -= 2
    assert (await post(idsrv, fields)).status == 303


def test_tokens_unit() -> None:
    now = [1000.0]
    secrets = [b"k" * 32]
    t = CsrfTokens(lambda: secrets, clock=lambda: now[0])
    nonce = "n" * 43
    params = {"client_id": "c", "redirect_uri": "https://a/cb", "state": "s", "code_challenge": "x" * 43}
    token = t.issue(nonce, params)
    assert t.valid(token, nonce, params)
    assert not t.valid(token, "m" * 43, params)
    assert not t.valid(token, nonce, {**params, "client_id": "d"})
    assert not t.valid(token + "x", nonce, params) and not t.valid("", nonce, params)
    # a secret rotation (KEK rekey): forms already on screen still post; new ones use the new secret
    secrets.insert(0, b"j" * 32)
    assert t.valid(token, nonce, params)
    secrets.pop()
    assert not t.valid(token, nonce, params)
    # an expiry too far ahead was not issued here
    far = f"{int(now[0]) + CSRF_TTL * 10}.{token.split('.', 1)[1]}"
    assert not t.valid(far, nonce, params)


async def test_the_cookie_is_the_browser_nonce_and_kept_across_tabs(idsrv: IdentityServer) -> None:
    _, a = await idsrv.authorize_page(pkce_pair()[1])
    nonce = cookie_of(idsrv)
    _, b = await idsrv.authorize_page(pkce_pair()[1])
    assert cookie_of(idsrv) == nonce and a["csrf_token"].split(".")[1] == b["csrf_token"].split(".")[1] == nonce
    assert a["csrf_token"] != b["csrf_token"]
