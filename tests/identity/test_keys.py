"""Signing keys in the database: generated on first run, rotated (published before they sign), retired keys kept
in the JWKS while their tokens live, revoked or expired keys gone. Through the running service and over HTTP."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from joserfc import jws
from sqlalchemy import func, select

from config import load_settings
from identity.keystore import PUBLISH_AHEAD, KeyManager
from identity.repository import KeyConflict, Repository, StoredKey, signing_keys
from identity.seed import open_repository
from identity.service import create_app, housekeep
from runtime.store import create_engine, utcnow
from tests.identity.conftest import CHEAP_PASSWORDS, IdentityServer, Shop


def kid_of(token: str) -> str:
    return jws.extract_compact(token.encode()).headers()["kid"]


async def jwks_kids(idsrv: IdentityServer) -> list[str]:
    return [k["kid"] for k in (await (await idsrv.client.get("/.well-known/jwks.json")).json())["keys"]]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_rotation_through_the_service(idsrv: IdentityServer, shop: Shop) -> None:
    await idsrv.register("ann@example.com")
    _, before = await idsrv.password_grant("ann@example.com")
    old = kid_of(before["access_token"])
    assert await jwks_kids(idsrv) == [old]

    # A scheduled rotation: the new key is published at once but does not sign yet.
    new = await idsrv.identity.keys.rotate()
    assert set(await jwks_kids(idsrv)) == {old, new.kid}
    _, still_old = await idsrv.password_grant("ann@example.com")
    assert kid_of(still_old["access_token"]) == old
    assert new.not_before >= new.created_at + PUBLISH_AHEAD - 1

    # `ecom keys rotate --immediately` in another process (its own engine), picked up by the service's periodic job
    engine = create_engine(idsrv.db_url)
    try:
        other = KeyManager.from_settings(Repository(engine), idsrv.settings)
        newest = await other.rotate(immediately=True)
    finally:
        await engine.dispose()
    await housekeep(idsrv.identity)
    _, after = await idsrv.password_grant("ann@example.com")
    assert kid_of(after["access_token"]) == newest.kid
    assert set(await jwks_kids(idsrv)) == {old, new.kid, newest.kid}, "retired keys stay while their tokens live"

    # the shop meets the new kid, refetches the JWKS, and accepts both generations of tokens
    assert (await shop.me(after["access_token"]))[0] == 200
    assert (await shop.me(before["access_token"]))[0] == 200

    # a removed (revoked) key: the shop's next JWKS refresh drops it, and its tokens stop verifying
    await idsrv.identity.keys.revoke(old)
    assert old not in await jwks_kids(idsrv)
    await shop.verifier.refresh_jwks()
    status, body = await shop.me(before["access_token"])
    assert status == 401 and "unknown key" in body["detail"]
    assert (await shop.me(after["access_token"]))[0] == 200
    # identity's own verifier follows too
    resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {before['access_token']}"})
    assert resp.status == 401


async def test_key_lifecycle_in_time(idsrv: IdentityServer) -> None:
    """publish ahead -> active -> retired but published -> gone from the JWKS (and the table) once every token it
    signed has expired; the periodic check rotates a key older than key_max_age exactly once."""
    clock = Clock()
    repo = idsrv.identity.repo
    async with repo.engine.begin() as conn:
        await conn.execute(signing_keys.delete())
    keys = KeyManager(
        repo, max_token_lifetime=900, clock_skew=60, key_max_age=7200, clock=clock, kek=idsrv.identity.keys.kek
    )
    first = await keys.ensure_active()
    assert first is not None and keys.ring.active_key().kid == first.kid
    assert await keys.ensure_active() is None, "nothing twice"

    clock.now += 3600
    assert await keys.check() is None, "not due yet"
    clock.now += 3601
    second = await keys.check()
    assert second is not None and keys.ring.active_key().kid == first.kid, "due: a successor, published ahead"
    assert await keys.check() is None, "a successor is pending: no second rotation"
    assert [d["state"] for d in keys.describe()] == ["pending", "active"]

    clock.now = second.not_before
    assert keys.ring.active_key().kid == second.kid
    assert {k["kid"] for k in keys.jwks()["keys"]} == {first.kid, second.kid}
    clock.now = second.not_before + 900 + 59
    assert first.kid in {k["kid"] for k in keys.jwks()["keys"]}, "its last tokens may still be alive"
    clock.now = second.not_before + 900 + 61
    await keys.check()
    assert [k["kid"] for k in keys.jwks()["keys"]] == [second.kid]
    assert [s.key.kid for s in await keys.stored_keys()] == [second.kid], "the expired private key is deleted"


async def test_concurrent_rotations_one_wins(idsrv: IdentityServer) -> None:
    repo = idsrv.identity.repo
    a = KeyManager.from_settings(repo, idsrv.settings)
    b = KeyManager.from_settings(repo, idsrv.settings)
    await a.load()
    await b.load()
    await a.rotate()
    # b decided on stale data: its write is a compare-and-set on the active key's row and must fail
    scratch = b._scratch()
    newest = scratch.rotate()
    changed = [StoredKey(k, b._revisions[k.kid]) for k in scratch if k.kid != newest.kid]
    with pytest.raises(KeyConflict):
        await b.save_keys([newest], changed, utcnow())
    assert len(await a.stored_keys()) == 2


async def test_private_keys_never_logged_nor_published(idsrv: IdentityServer, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    key = await idsrv.identity.keys.rotate(immediately=True)
    await idsrv.identity.keys.revoke(key.kid)
    secret = key.private_jwk["d"]
    assert secret not in caplog.text and secret not in repr(key)
    jwks = await (await idsrv.client.get("/.well-known/jwks.json")).json()
    assert all(set(k) & {"d", "p", "q", "dp", "dq", "qi"} == set() for k in jwks["keys"])


async def test_first_run_generates_a_key_without_seed(db_url: str, tmp_path: Any, aiohttp_client: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    async with open_repository(settings, db_url) as repo, repo.engine.connect() as conn:  # schema only: no seed
        assert (await conn.execute(select(func.count()).select_from(signing_keys))).scalar_one() == 0
    client = await aiohttp_client(create_app(settings, database_url=db_url, password_hasher=CHEAP_PASSWORDS))
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    assert len(jwks["keys"]) == 1 and jwks["keys"][0]["alg"] == "ES256"


# ---------------------------------------------------------------------------------------------------
# `ecom keys revoke` takes effect everywhere within seconds (issue 12)


@pytest.fixture
async def identity_on_bus(db_url: str, tmp_path: Any, aiohttp_client: Any) -> Any:
    """An embedded identity on the shared runtime with a memory bus (its outbox relay polls every 0.2 s)."""
    from aiohttp.test_utils import TestServer, unused_port

    from bus.memory import MemoryBus
    from identity.seed import seed
    from tests.identity.conftest import ADMIN_PASSWORD

    bus = MemoryBus()
    await bus.start()
    port = unused_port()
    settings = load_settings(
        {
            "ECOM_DATA_DIR": str(tmp_path),
            "ECOM_IDENTITY_PORT": str(port),
            "ECOM_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "ECOM_BUS_OUTBOX_POLL_INTERVAL": "0.2",
        }
    )
    await seed(settings, db_url, password_hasher=CHEAP_PASSWORDS)
    app = create_app(settings, bus=bus, database_url=db_url, password_hasher=CHEAP_PASSWORDS)
    client = await aiohttp_client(TestServer(app, host="127.0.0.1", port=port))
    yield IdentityServer(client, settings, db_url), bus
    await bus.close()


async def test_revoke_in_another_process_is_refused_everywhere_within_seconds(
    identity_on_bus: Any, make_shop: Any
) -> None:
    import asyncio

    from sqlalchemy import select

    from bus.envelope import Envelope
    from runtime import revocation
    from runtime.store import outbox

    idsrv, bus = identity_on_bus
    shop = await make_shop(idsrv)  # a second service: JWKS over HTTP, revocations from the bus
    consumer = await revocation.listen(bus, shop.verifier)
    try:
        await idsrv.register("ann@example.com")
        _, tokens = await idsrv.password_grant("ann@example.com")
        token = tokens["access_token"]
        kid = kid_of(token)
        assert (await shop.me(token))[0] == 200  # verified once: cached by the shop
        assert shop.verifier.verify_cached(token) is not None

        # `ecom keys revoke KID`: another process, its own engine, no bus; only the outbox row leaves it
        engine = create_engine(idsrv.db_url)
        try:
            cli = KeyManager.from_settings(Repository(engine), idsrv.settings)
            await cli.revoke(kid)
            async with engine.connect() as conn:
                envs = [Envelope.decode(r.envelope) for r in await conn.execute(select(outbox.c.envelope))]
        finally:
            await engine.dispose()
        assert [e.body["kid"] for e in envs if e.type == "SigningKeyRevoked"] == [kid]

        loop = asyncio.get_running_loop()
        start = loop.time()
        while (await shop.me(token))[0] != 401:
            assert loop.time() - start < 5.0, "the shop still accepts a token of the revoked key"
            await asyncio.sleep(0.05)
        # identity's own verifier refuses it too, and identity no longer signs with the key
        resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
        while kid in await jwks_kids(idsrv):
            assert loop.time() - start < 5.0, "identity still publishes the revoked key"
            await asyncio.sleep(0.05)
        _, fresh = await idsrv.password_grant("ann@example.com")
        assert kid_of(fresh["access_token"]) != kid
        assert (await shop.me(fresh["access_token"]))[0] == 200
    finally:
        await consumer.stop()


async def test_revoke_in_the_service_announces_in_its_transaction(identity_on_bus: Any, make_shop: Any) -> None:
    import asyncio

    from runtime import revocation

    idsrv, bus = identity_on_bus
    shop = await make_shop(idsrv)
    consumer = await revocation.listen(bus, shop.verifier)
    try:
        await idsrv.register("bob@example.com")
        _, tokens = await idsrv.password_grant("bob@example.com")
        token = tokens["access_token"]
        assert (await shop.me(token))[0] == 200
        await idsrv.identity.keys.revoke(kid_of(token))
        # identity's own verifier at once (no bus hop), the shop after the relay's wake-up
        resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
        for _ in range(100):
            if (await shop.me(token))[0] == 401:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the shop still accepts the token")
    finally:
        await consumer.stop()
