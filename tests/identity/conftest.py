"""Fixtures for the identity service: a real identity server on a real port (so its issuer URL is true), a
protected "shop" service that verifies tokens with runtime/auth against identity's JWKS over HTTP, and the
steps of the sign-in flows. Cheap argon2id parameters through the documented ``password_hasher`` argument."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port
from argon2 import profiles

from config import Settings, load_settings
from identity.accounts import normalize_email
from identity.core import IDENTITY, Identity
from identity.passwords import Passwords
from identity.seed import seed, storefront_redirect_uris
from identity.service import create_app
from runtime.auth import TokenVerifier, principal, require
from runtime.host import ServiceRuntime, json_response
from runtime.host import create_app as create_host_app

CHEAP_PASSWORDS = Passwords(profiles.CHEAPEST)  # tests only: production keeps RFC 9106 parameters
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "Admin-Password-1"
PASSWORD = "Correct-Horse-9"


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class IdentityServer:
    client: TestClient
    settings: Settings
    db_url: str

    @property
    def issuer(self) -> str:
        """The public URL (the gateway's, not this server's): the issuer, the base of discovery's URLs."""
        return self.settings.issuer

    @property
    def url(self) -> str:
        """This identity server's own address (internal: browsers come through the public URL)."""
        return str(self.client.make_url("")).rstrip("/")

    @property
    def identity(self) -> Identity:
        return self.client.app[IDENTITY]

    @property
    def redirect_uri(self) -> str:
        return storefront_redirect_uris(self.settings)[0][0]

    async def register(self, email: str, password: str = PASSWORD, name: str = "Ann") -> dict[str, Any]:
        """Register through the API (202 either way) and return the account as the repository has it."""
        resp = await self.client.post("/api/identity/users", json={"email": email, "password": password, "name": name})
        assert resp.status == 202, await resp.text()
        user = await self.identity.repo.user_by_email(normalize_email(email))
        assert user is not None, f"no account for {email}"
        return user.public()

    async def token(self, data: dict[str, str], **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
        resp = await self.client.post("/connect/token", data=data, **kwargs)
        return resp.status, await resp.json(), resp

    async def password_grant(
        self, email: str, password: str = PASSWORD, scope: str = "openid profile email offline_access ecom"
    ) -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.token(
            {
                "grant_type": "password",
                "client_id": "storefront",
                "username": email,
                "password": password,
                "scope": scope,
            }
        )
        return status, body

    async def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.token(
            {"grant_type": "refresh_token", "client_id": "storefront", "refresh_token": refresh_token}
        )
        return status, body

    async def authorize_page(self, challenge: str, **extra: str) -> tuple[str, dict[str, str]]:
        """GET /connect/authorize -> the login page's HTML and its form fields (incl. the CSRF token)."""
        params = {
            "response_type": "code",
            "client_id": "storefront",
            "redirect_uri": self.redirect_uri,
            "scope": "openid profile email offline_access ecom",
            "state": "st-123",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "nonce": "n-456",
            **extra,
        }
        resp = await self.client.get("/connect/authorize", params=params, allow_redirects=False)
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/html"
        page = await resp.text()
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
        return page, {k: html.unescape(v) for k, v in fields.items()}

    async def sign_in(self, email: str, password: str = PASSWORD) -> tuple[str, str]:
        """The browser flow through the login page: returns (code, code_verifier)."""
        verifier, challenge = pkce_pair()
        _, fields = await self.authorize_page(challenge)
        resp = await self.client.post(
            "/connect/authorize", data={**fields, "email": email, "password": password}, allow_redirects=False
        )
        assert resp.status == 303, await resp.text()
        query = query_of(resp.headers["Location"])
        assert query["state"] == "st-123" and query["iss"] == self.issuer
        return query["code"], verifier

    async def exchange(self, code: str, verifier: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.token(
            {
                "grant_type": "authorization_code",
                "client_id": "storefront",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": verifier,
            }
        )
        return status, body


MakeIdentity = Callable[..., Awaitable[IdentityServer]]


@pytest.fixture
async def make_identity(db_url: str, tmp_path: Any, aiohttp_client: Any) -> MakeIdentity:
    async def make(**env: str) -> IdentityServer:
        port = unused_port()
        settings = load_settings(
            {
                "ECOM_DATA_DIR": str(tmp_path),
                "ECOM_IDENTITY_PORT": str(port),
                "ECOM_ADMIN_PASSWORD": ADMIN_PASSWORD,
                **env,
            }
        )
        await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)
        app = create_app(settings, database_url=db_url, password_hasher=CHEAP_PASSWORDS)
        client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
        return IdentityServer(client, settings, db_url)

    return make


@pytest.fixture
async def idsrv(make_identity: MakeIdentity) -> IdentityServer:
    return await make_identity()


@dataclass
class Shop:
    """A protected service of the shop: verifies bearer tokens with runtime/auth, keys from identity's JWKS."""

    client: TestClient
    verifier: TokenVerifier

    async def me(self, token: str) -> tuple[int, dict[str, Any]]:
        resp = await self.client.get("/api/shop/me", headers={"Authorization": f"Bearer {token}"})
        return resp.status, await resp.json()


@pytest.fixture
async def make_shop(aiohttp_client: Any) -> Callable[[IdentityServer], Awaitable[Shop]]:
    async def make(idsrv: IdentityServer) -> Shop:
        verifier = TokenVerifier(
            issuer=idsrv.issuer,  # the public URL (the gateway's), as in every token
            jwks_url=idsrv.settings.jwks_url,  # keys straight from identity, as services fetch them
            audience=idsrv.settings.general.audience,
            refetch_interval=0.001,
        )
        runtime = ServiceRuntime(name="shop", settings=idsrv.settings, verifier=verifier)

        @require(roles=("customer",))
        async def me(request: web.Request) -> web.Response:
            p = principal(request)
            return json_response(
                {"sub": p.sub, "roles": sorted(p.roles), "scopes": sorted(p.scopes), "client_id": p.client_id}
            )

        app = create_host_app(runtime, routes=[web.get("/api/shop/me", me)])
        return Shop(await aiohttp_client(app), verifier)

    return make


@pytest.fixture
async def shop(make_shop: Callable[[IdentityServer], Awaitable[Shop]], idsrv: IdentityServer) -> Shop:
    return await make_shop(idsrv)
