"""Scopes and roles per client: first-party tokens carry ``ecom`` and the user's roles; a third-party client
gets roles only when an admin allows it; weak passwords are flagged for change; schema v2 migrates old
databases."""

from __future__ import annotations

from typing import Any

from argon2 import profiles
from sqlalchemy import Column, MetaData, Table, select, text

from identity.oauth import build_client
from identity.passwords import Passwords
from identity.repository import MIGRATIONS, clients, users
from runtime import migrate
from runtime.store import create_engine, utcnow
from tests.identity.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    PASSWORD,
    IdentityServer,
    pkce_pair,
    query_of,
)

THIRD_PARTY_REDIRECT = "https://app.example/cb"


async def third_party_code(
    idsrv: IdentityServer, client_id: str, email: str, password: str, scope: str
) -> dict[str, Any]:
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": THIRD_PARTY_REDIRECT,
        "scope": scope,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    resp = await idsrv.client.get("/connect/authorize", params=params)
    assert resp.status == 200, await resp.text()
    import html
    import re

    fields = {
        k: html.unescape(v)
        for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', await resp.text())
    }
    resp = await idsrv.client.post(
        "/connect/authorize", data={**fields, "email": email, "password": password}, allow_redirects=False
    )
    assert resp.status == 303, await resp.text()
    code = query_of(resp.headers["Location"])["code"]
    status, body, _ = await idsrv.token(
        {
            "grant_type": "authorization_code",
            "client_id": client_id,
            "code": code,
            "redirect_uri": THIRD_PARTY_REDIRECT,
            "code_verifier": verifier,
        }
    )
    assert status == 200, body
    return body


async def test_third_party_client_gets_no_roles_unless_allowed(idsrv: IdentityServer) -> None:
    client, _ = build_client("gadget-app", public=True, audience="ecom", redirect_uris=(THIRD_PARTY_REDIRECT,))
    assert client.roles_allowed is False
    await idsrv.identity.repo.create_client(client, utcnow())
    # the admin signs in to a third-party app asking only for openid: no admin token for the app
    tokens = await third_party_code(idsrv, "gadget-app", ADMIN_EMAIL, ADMIN_PASSWORD, "openid")
    p = await idsrv.identity.verifier.verify(tokens["access_token"])
    assert p.roles == frozenset() and p.scopes == {"openid"}
    info = await (
        await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    ).json()
    assert "roles" not in info
    # an admin allows it (ecom clients add ... --roles-allowed): now the roles come along
    assert await idsrv.identity.repo.set_roles_allowed("gadget-app", True)
    tokens = await third_party_code(idsrv, "gadget-app", ADMIN_EMAIL, ADMIN_PASSWORD, "openid ecom")
    p = await idsrv.identity.verifier.verify(tokens["access_token"])
    assert p.roles == {"admin"} and p.scopes == {"openid", "ecom"}
    assert not await idsrv.identity.repo.set_roles_allowed("nobody", True)


async def test_first_party_tokens_carry_ecom_and_roles(idsrv: IdentityServer) -> None:
    storefront = await idsrv.identity.repo.client("storefront")
    assert storefront is not None and storefront.roles_allowed
    assert set(storefront.scopes) == {"openid", "profile", "email", "offline_access", "ecom"}
    await idsrv.register("ann@example.com")
    # the password grant without a scope gets every scope of the client, ecom included
    status, body, _ = await idsrv.token(
        {"grant_type": "password", "client_id": "storefront", "username": "ann@example.com", "password": PASSWORD}
    )
    assert status == 200 and "ecom" in body["scope"].split()
    p = await idsrv.identity.verifier.verify(body["access_token"])
    assert "ecom" in p.scopes and p.roles == {"customer"}
    code, verifier = await idsrv.sign_in("ann@example.com")
    status, body = await idsrv.exchange(code, verifier)
    assert status == 200 and "ecom" in body["scope"].split()
    # a client may not ask for a scope it is not registered with
    worker, _ = build_client("worker", public=False, audience="ecom")
    assert worker.scopes == ("ecom",) and not worker.roles_allowed


async def test_weak_password_is_flagged_at_sign_in(idsrv: IdentityServer) -> None:
    """A password set before the policy keeps working, and the account is asked to change it."""
    cheap = Passwords(profiles.CHEAPEST)
    await idsrv.register("old@example.com")
    user = await idsrv.identity.repo.user_by_email("old@example.com")
    assert user is not None and not user.password_change_required
    await idsrv.identity.repo.update_user(user.id, utcnow(), password_hash=cheap.hash_sync("password12"))
    status, tokens = await idsrv.password_grant("old@example.com", "password12")
    assert status == 200 and tokens["password_change_required"] is True
    info = await (
        await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    ).json()
    assert info["password_change_required"] is True
    stored = await idsrv.identity.repo.user_by_email("old@example.com")
    assert stored is not None and stored.password_change_required

    change = "/api/identity/users/me/password"
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    resp = await idsrv.client.put(
        change, json={"current_password": "password12", "new_password": "Passw0rd!!"}, headers=auth
    )
    assert resp.status == 422 and [e["field"] for e in (await resp.json())["errors"]] == ["new_password"]
    resp = await idsrv.client.put(
        change, json={"current_password": "wrong-one", "new_password": PASSWORD}, headers=auth
    )
    assert resp.status == 422 and [e["field"] for e in (await resp.json())["errors"]] == ["current_password"]
    resp = await idsrv.client.put(change, json={"current_password": "password12", "new_password": PASSWORD})
    assert resp.status == 401
    resp = await idsrv.client.put(
        change, json={"current_password": "password12", "new_password": PASSWORD}, headers=auth
    )
    assert resp.status == 204, await resp.text()
    status, tokens = await idsrv.password_grant("old@example.com", PASSWORD)
    assert status == 200 and "password_change_required" not in tokens
    assert (await idsrv.password_grant("old@example.com", "password12"))[0] == 400


async def test_schema_v2_migrates_an_old_database(tmp_path: Any) -> None:
    """A database at identity schema v1 (before roles_allowed and password_change_required) is upgraded; the
    first-party storefront keeps carrying roles, other clients do not; a fresh database gets both columns too."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        old = MetaData()
        old_users = Table(
            "users",
            old,
            *(
                Column(c.name, c.type, nullable=c.nullable, primary_key=c.primary_key)
                for c in users.columns
                if c.name != "password_change_required"
            ),
        )
        old_clients = Table(
            "clients",
            old,
            *(
                Column(c.name, c.type, nullable=c.nullable, primary_key=c.primary_key)
                for c in clients.columns
                if c.name != "roles_allowed"
            ),
        )
        v1 = migrate.Component("identity", [migrate.Migration(1, "old", migrate.create_tables(old_users, old_clients))])
        await migrate.upgrade(engine, [v1])
        now = utcnow()
        async with engine.begin() as conn:
            for cid in ("storefront", "gadget-app"):
                await conn.execute(
                    old_clients.insert().values(
                        client_id=cid,
                        name=cid,
                        secret_hash=None,
                        redirect_uris="[]",
                        post_logout_redirect_uris="[]",
                        grant_types="[]",
                        scopes="[]",
                        roles="[]",
                        created_at=now,
                    )
                )
            await conn.execute(
                old_users.insert().values(
                    id="u1",
                    email="a@example.com",
                    name="A",
                    password_hash="x",
                    roles='["customer"]',
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
            )
        component = migrate.Component("identity", MIGRATIONS)
        assert (await migrate.upgrade(engine, [component]))["identity"] == (1, 2)
        async with engine.connect() as conn:
            allowed = dict((await conn.execute(select(clients.c.client_id, clients.c.roles_allowed))).all())
            flag = (await conn.execute(select(users.c.password_change_required))).scalar_one()
        assert allowed == {"storefront": True, "gadget-app": False} and flag is False
    finally:
        await engine.dispose()
    fresh = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert (await migrate.upgrade(fresh, [migrate.Component("identity", MIGRATIONS)]))["identity"] == (0, 2)
        async with fresh.connect() as conn:
            cols = {r[1] for r in (await conn.execute(text("PRAGMA table_info(clients)"))).all()}
        assert "roles_allowed" in cols
    finally:
        await fresh.dispose()
