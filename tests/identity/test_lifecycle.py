"""The whole life of a session over real HTTP, on SQLite and PostgreSQL: register, sign in (authorization code
+ PKCE through the login page, and the password grant), call a protected route of another service, refresh,
revoke, refresh fails; userinfo, ID token, end-session, discovery."""

from __future__ import annotations

from joserfc import jwt
from joserfc.jwk import KeySet

from tests.identity.conftest import PASSWORD, IdentityServer, Shop, pkce_pair, query_of


async def test_discovery_and_jwks(idsrv: IdentityServer) -> None:
    resp = await idsrv.client.get("/.well-known/openid-configuration")
    doc = await resp.json()
    assert resp.status == 200
    assert doc["issuer"] == idsrv.issuer
    assert doc["jwks_uri"] == f"{idsrv.issuer}/.well-known/jwks.json"
    assert doc["token_endpoint"] == f"{idsrv.issuer}/connect/token"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert set(doc["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "password",
        "client_credentials",
    }
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    jwks = await (await idsrv.client.get("/.well-known/jwks.json")).json()
    assert [k["alg"] for k in jwks["keys"]] == ["ES256"]
    assert all("d" not in k for k in jwks["keys"]), "never a private member in the JWKS"
    spec = await (await idsrv.client.get("/api/docs/swagger.json")).json()
    assert {"/api/identity/users", "/connect/token", "/connect/authorize"} <= set(spec["paths"])


async def test_lifecycle_authorization_code_with_pkce(idsrv: IdentityServer, shop: Shop) -> None:
    user = await idsrv.register(" Ann@Example.COM ", name="Ann Smith")
    assert user["email"] == "ann@example.com" and user["roles"] == ["customer"]

    # GET authorize -> login form with CSRF token -> POST credentials -> redirect with code
    verifier, challenge = pkce_pair()
    page, fields = await idsrv.authorize_page(challenge)
    assert "Sign in to EcomGateway storefront" in page and fields["csrf_token"]
    assert fields["code_challenge"] == challenge and fields["client_id"] == "storefront"
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, "email": "ANN@example.com", "password": PASSWORD}, allow_redirects=False
    )
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith(idsrv.redirect_uri + "?")
    query = query_of(location)
    assert query["state"] == "st-123" and query["iss"] == idsrv.issuer

    # token exchange
    status, tokens = await idsrv.exchange(query["code"], verifier)
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 900
    assert set(tokens["scope"].split()) == {"openid", "profile", "email", "offline_access", "ecom"}
    assert {"access_token", "refresh_token", "id_token"} <= tokens.keys()

    # the ID token: audience = the client, nonce echoed, signed with a published key
    jwks = await (await idsrv.client.get("/.well-known/jwks.json")).json()
    id_token = jwt.decode(tokens["id_token"], KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert id_token.claims["aud"] == "storefront" and id_token.claims["sub"] == user["id"]
    assert id_token.claims["nonce"] == "n-456" and id_token.claims["email"] == "ann@example.com"

    # the access token works at another service (which fetches identity's JWKS over HTTP)
    status, me = await shop.me(tokens["access_token"])
    assert status == 200, me
    assert me == {
        "sub": user["id"],
        "roles": ["customer"],
        "scopes": sorted(tokens["scope"].split()),
        "client_id": "storefront",
    }
    # an ID token is not an access token
    status, body = await shop.me(tokens["id_token"])
    assert status == 401 and "audience" in body["detail"]

    # userinfo
    resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    assert await resp.json() == {
        "sub": user["id"],
        "email": "ann@example.com",
        "email_verified": False,
        "name": "Ann Smith",
        "roles": ["customer"],
    }

    # refresh rotates
    status, refreshed = await idsrv.refresh(tokens["refresh_token"])
    assert status == 200, refreshed
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    assert (await shop.me(refreshed["access_token"]))[0] == 200

    # revoke, then refresh fails
    resp = await idsrv.client.post(
        "/connect/revocation", data={"token": refreshed["refresh_token"], "client_id": "storefront"}
    )
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    status, body = await idsrv.refresh(refreshed["refresh_token"])
    assert status == 400 and body["error"] == "invalid_grant"


async def test_lifecycle_password_grant(idsrv: IdentityServer, shop: Shop) -> None:
    user = await idsrv.register("bob@example.com")
    status, tokens = await idsrv.password_grant("Bob@Example.com")
    assert status == 200, tokens
    assert (await shop.me(tokens["access_token"]))[0] == 200
    status, refreshed = await idsrv.refresh(tokens["refresh_token"])
    assert status == 200
    status, me = await shop.me(refreshed["access_token"])
    assert status == 200 and me["sub"] == user["id"]
    await idsrv.client.post(
        "/connect/revocation", data={"token": refreshed["refresh_token"], "client_id": "storefront"}
    )
    status, body = await idsrv.refresh(refreshed["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_no_refresh_token_without_offline_access(idsrv: IdentityServer) -> None:
    await idsrv.register("cat@example.com")
    status, tokens = await idsrv.password_grant("cat@example.com", scope="ecom")
    assert status == 200 and "refresh_token" not in tokens and "id_token" not in tokens
    assert tokens["scope"] == "ecom"


async def test_roles_and_account_state_are_read_at_refresh(idsrv: IdentityServer, shop: Shop) -> None:
    from identity.accounts import set_disabled, set_roles

    user = await idsrv.register("dan@example.com")
    _, tokens = await idsrv.password_grant("dan@example.com")
    await set_roles(idsrv.identity.repo, "dan@example.com", ["customer", "admin"])
    status, refreshed = await idsrv.refresh(tokens["refresh_token"])
    assert status == 200
    assert (await shop.me(refreshed["access_token"]))[1]["roles"] == ["admin", "customer"]
    await set_disabled(idsrv.identity.repo, "dan@example.com", True)  # revokes the refresh tokens
    status, body = await idsrv.refresh(refreshed["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await idsrv.password_grant("dan@example.com")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert user["id"]


async def test_end_session_with_id_token_hint(idsrv: IdentityServer) -> None:
    await idsrv.register("eve@example.com")
    code, verifier = await idsrv.sign_in("eve@example.com")
    _, tokens = await idsrv.exchange(code, verifier)
    target = idsrv.settings.base_url("gateway") + "/"
    resp = await idsrv.client.get(
        "/connect/endsession",
        params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": target, "state": "bye"},
        allow_redirects=False,
    )
    assert resp.status == 302 and resp.headers["Location"] == target + "?state=bye"
    status, body = await idsrv.refresh(tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    # an unregistered post-logout target is refused, not followed
    resp = await idsrv.client.get(
        "/connect/endsession",
        params={"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": "https://evil.example/"},
        allow_redirects=False,
    )
    assert resp.status == 400 and resp.content_type == "application/problem+json"


async def test_end_session_with_bearer_token(idsrv: IdentityServer) -> None:
    await idsrv.register("fay@example.com")
    _, tokens = await idsrv.password_grant("fay@example.com")
    resp = await idsrv.client.get("/connect/endsession", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert resp.status == 200 and "signed out" in (await resp.text())
    status, _ = await idsrv.refresh(tokens["refresh_token"])
    assert status == 400


async def test_userinfo_needs_openid_and_a_valid_token(idsrv: IdentityServer) -> None:
    await idsrv.register("gus@example.com")
    _, tokens = await idsrv.password_grant("gus@example.com", scope="ecom")
    resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert resp.status == 403 and resp.content_type == "application/problem+json"
    resp = await idsrv.client.get("/connect/userinfo")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": "Bearer abc.def.ghi"})
    assert resp.status == 401 and (await resp.json())["type"].endswith("/invalid-token")


async def test_admin_lists_users_with_its_own_tokens(idsrv: IdentityServer) -> None:
    from tests.identity.conftest import ADMIN_EMAIL, ADMIN_PASSWORD

    await idsrv.register("hal@example.com")
    _, admin = await idsrv.password_grant(ADMIN_EMAIL, ADMIN_PASSWORD)
    _, customer = await idsrv.password_grant("hal@example.com")
    resp = await idsrv.client.get(
        "/api/identity/users", headers={"Authorization": f"Bearer {customer['access_token']}"}
    )
    assert resp.status == 403
    resp = await idsrv.client.get(
        "/api/identity/users", params={"page_size": "1"}, headers={"Authorization": f"Bearer {admin['access_token']}"}
    )
    page = await resp.json()
    assert resp.status == 200 and page["total"] == 2 and len(page["items"]) == 1 and page["page_size"] == 1
    assert page["items"][0]["email"] == ADMIN_EMAIL and "password_hash" not in page["items"][0]
    resp = await idsrv.client.get(
        "/api/identity/users", params={"page_size": "0"}, headers={"Authorization": f"Bearer {admin['access_token']}"}
    )
    assert resp.status == 422 and (await resp.json())["errors"][0]["field"] == "page_size"
    # the runtime's admin endpoints use identity's own verifier too
    resp = await idsrv.client.get(
        "/api/identity/admin/actors", headers={"Authorization": f"Bearer {admin['access_token']}"}
    )
    assert resp.status == 200 and "login" in (await resp.json())["types"]
