"""Confidential clients (client_credentials with a hashed secret), introspection, and the token endpoint's
OAuth2 error responses."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy import select

from identity.oauth import build_client
from identity.repository import clients
from identity.tokens import hash_token
from runtime.store import utcnow
from tests.identity.conftest import IdentityServer, MakeIdentity


async def add_service_client(idsrv: IdentityServer, client_id: str = "orders-worker") -> str:
    client, secret = build_client(client_id, public=False, audience="ecom", roles=("service",))
    await idsrv.identity.repo.create_client(client, utcnow())
    assert secret is not None
    return secret


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def test_client_credentials_with_a_hashed_secret(idsrv: IdentityServer) -> None:
    secret = await add_service_client(idsrv)
    async with idsrv.identity.repo.engine.connect() as conn:
        stored = (
            await conn.execute(select(clients.c.secret_hash).where(clients.c.client_id == "orders-worker"))
        ).scalar_one()
    assert stored == hash_token(secret) and secret not in stored

    for kwargs in (
        {"data": {"grant_type": "client_credentials"}, "headers": basic("orders-worker", secret)},
        {"data": {"grant_type": "client_credentials", "client_id": "orders-worker", "client_secret": secret}},
    ):
        status, body, resp = await idsrv.token(**kwargs)
        assert status == 200, body
        assert resp.headers["Cache-Control"] == "no-store"
        assert body["scope"] == "ecom" and "refresh_token" not in body
        p = await idsrv.identity.verifier.verify(body["access_token"])
        assert (p.sub, p.client_id, p.roles, p.scopes) == ("orders-worker", "orders-worker", {"service"}, {"ecom"})

    status, body, resp = await idsrv.token(
        data={"grant_type": "client_credentials"}, headers=basic("orders-worker", secret + "x")
    )
    assert (status, body["error"]) == (401, "invalid_client")
    assert resp.headers["WWW-Authenticate"].startswith("Basic") and resp.headers["Cache-Control"] == "no-store"
    status, body, _ = await idsrv.token(data={"grant_type": "client_credentials", "client_id": "orders-worker"})
    assert (status, body["error"]) == (401, "invalid_client")
    status, body, _ = await idsrv.token(
        data={"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "x"}
    )
    assert (status, body["error"]) == (401, "invalid_client")
    status, body, _ = await idsrv.token(
        data={"grant_type": "client_credentials", "scope": "openid"}, headers=basic("orders-worker", secret)
    )
    assert (status, body["error"]) == (400, "invalid_scope")
    # a public client has no secret, hence no client_credentials
    status, body, _ = await idsrv.token(data={"grant_type": "client_credentials", "client_id": "storefront"})
    assert (status, body["error"]) == (400, "unauthorized_client")
    # and a service client may not use the password grant
    status, body, _ = await idsrv.token(
        data={"grant_type": "password", "username": "a@example.com", "password": "x"},
        headers=basic("orders-worker", secret),
    )
    assert (status, body["error"]) == (400, "unauthorized_client")


async def test_introspection(idsrv: IdentityServer) -> None:
    secret = await add_service_client(idsrv)
    await idsrv.register("ann@example.com")
    _, tokens = await idsrv.password_grant("ann@example.com")

    async def introspect(token: str, **extra: str) -> tuple[int, dict[str, Any]]:
        resp = await idsrv.client.post(
            "/connect/introspect", data={"token": token, **extra}, headers=basic("orders-worker", secret)
        )
        return resp.status, await resp.json()

    status, body = await introspect(tokens["access_token"])
    assert status == 200 and body["active"] is True and body["token_type"] == "access_token"
    assert body["client_id"] == "storefront" and body["roles"] == ["customer"] and body["iss"] == idsrv.issuer
    assert set(body["scope"].split()) == {"openid", "profile", "email", "offline_access", "ecom"}
    assert (await introspect("garbage"))[1] == {"active": False}
    # refresh tokens: a client learns only about its own
    assert (await introspect(tokens["refresh_token"], token_type_hint="refresh_token"))[1] == {"active": False}
    # public clients may not introspect
    resp = await idsrv.client.post(
        "/connect/introspect", data={"token": tokens["access_token"], "client_id": "storefront"}
    )
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"


async def test_token_endpoint_errors_follow_oauth2(idsrv: IdentityServer) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"data": {"client_id": "storefront"}}, 400, "invalid_request"),
        ({"data": {"grant_type": "implicit", "client_id": "storefront"}}, 400, "unsupported_grant_type"),
        ({"json": {"grant_type": "password"}}, 400, "invalid_request"),
        (
            {
                "data": "grant_type=password&grant_type=password&client_id=storefront",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            400,
            "invalid_request",
        ),
        (
            {"data": {"grant_type": "password", "client_id": "storefront", "username": "a@example.com"}},
            400,
            "invalid_request",
        ),
        (
            {
                "data": {
                    "grant_type": "password",
                    "client_id": "storefront",
                    "username": "a@example.com",
                    "password": "x",
                    "scope": "ecom admin",
                }
            },
            400,
            "invalid_scope",
        ),
        (
            {"data": {"grant_type": "password", "client_id": "nope", "username": "a", "password": "x"}},
            401,
            "invalid_client",
        ),
        (
            {"data": {"grant_type": "refresh_token", "client_id": "storefront", "refresh_token": "nope"}},
            400,
            "invalid_grant",
        ),
        (
            {"data": {"grant_type": "password", "client_id": "storefront"}, "headers": {"Authorization": "Basic !!"}},
            401,
            "invalid_client",
        ),
    ]
    for kwargs, status, error in cases:
        resp = await idsrv.client.post("/connect/token", **kwargs)
        body = await resp.json()
        assert (resp.status, body.get("error")) == (status, error), (kwargs, body)
        assert body["error_description"] and resp.headers["Cache-Control"] == "no-store", kwargs
        assert resp.headers["Pragma"] == "no-cache" and resp.content_type == "application/json"


async def test_password_grant_can_be_switched_off(make_identity: MakeIdentity) -> None:
    idsrv = await make_identity(ECOM_AUTH_PASSWORD_GRANT="false")
    await idsrv.register("ann@example.com")
    status, body = await idsrv.password_grant("ann@example.com")
    assert (status, body["error"]) == (400, "unsupported_grant_type") and "switched off" in body["error_description"]
    doc = await (await idsrv.client.get("/.well-known/openid-configuration")).json()
    assert "password" not in doc["grant_types_supported"]
    code, verifier = await idsrv.sign_in("ann@example.com")  # PKCE still works
    assert (await idsrv.exchange(code, verifier))[0] == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_id": "bad id!"}, "client_id"),
        ({"client_id": "ecom"}, "audience"),
        ({"client_id": "app", "grant_types": ("password",)}, "password"),
        ({"client_id": "app", "public": True, "grant_types": ("client_credentials",)}, "public"),
        ({"client_id": "app", "public": True}, "redirect URI"),
        ({"client_id": "app", "public": True, "redirect_uris": ("http://shop.example/cb",)}, "https"),
        ({"client_id": "app", "public": True, "redirect_uris": ("https://shop.example/cb#x",)}, "fragment"),
        ({"client_id": "app", "scopes": ("root",)}, "scope"),
    ],
)
def test_client_records_are_checked(kwargs: dict[str, Any], message: str) -> None:
    kwargs = {"public": False, "audience": "ecom", **kwargs}
    with pytest.raises(ValueError, match=message):
        build_client(kwargs.pop("client_id"), **kwargs)
