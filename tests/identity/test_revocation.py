"""Revocation announcements: a lock, a sign-out or a revoked refresh-token family writes
``runtime.revocation.AccessRevoked`` to identity's outbox in the transaction of the change; the outbox relay
publishes it on the (in-memory) bus and a second verifier that listens (``runtime.revocation.listen``) refuses
the user's cached token within seconds. Identity's own verifier applies it at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer, unused_port
from sqlalchemy import select

from bus.memory import MemoryBus
from config import load_settings
from identity.accounts import set_disabled
from identity.repository import Repository
from identity.seed import seed
from identity.service import create_app
from runtime import revocation
from runtime.store import create_engine, outbox
from tests.identity.conftest import (
    ADMIN_PASSWORD,
    CHEAP_PASSWORDS,
    PASSWORD,
    IdentityServer,
    Shop,
)

WITHIN = 5.0  # seconds: relay latency plus one bus hop, with a wide margin


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    b = MemoryBus()
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def on_bus(db_url: str, tmp_path: Any, aiohttp_client: Any, bus: MemoryBus) -> IdentityServer:
    """Identity on the shared runtime with a bus: its outbox relay publishes what its transactions wrote."""
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
    return IdentityServer(client, settings, db_url)


@pytest.fixture
async def listening_shop(
    make_shop: Callable[[IdentityServer], Awaitable[Shop]], on_bus: IdentityServer, bus: MemoryBus
) -> AsyncIterator[Shop]:
    """A second process's verifier: keys from identity's JWKS over HTTP, revocations from the bus."""
    shop = await make_shop(on_bus)
    consumer = await revocation.listen(bus, shop.verifier)
    yield shop
    await consumer.stop()


async def refused_within(shop: Shop, token: str, seconds: float = WITHIN) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < seconds:
        status, _ = await shop.me(token)
        if status == 401:
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"the shop still accepts the token after {seconds}s")


async def signed_in(idsrv: IdentityServer, shop: Shop, email: str) -> dict[str, Any]:
    await idsrv.register(email)
    status, tokens = await idsrv.password_grant(email)
    assert status == 200, tokens
    assert (await shop.me(tokens["access_token"]))[0] == 200  # verified once: now in the shop's cache
    return tokens


async def announced(idsrv: IdentityServer) -> list[dict[str, Any]]:
    async with idsrv.identity.repo.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.envelope, outbox.c.kind))).all()
    envs = [json.loads(r.envelope) for r in rows if r.kind == "publish"]
    return [e["body"] for e in envs if e["type"] == revocation.AccessRevoked.__name__]


async def userinfo_status(idsrv: IdentityServer, token: str) -> int:
    resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {token}"})
    return resp.status


async def test_lock_is_announced_and_heard(on_bus: IdentityServer, listening_shop: Shop) -> None:
    tokens = await signed_in(on_bus, listening_shop, "ann@example.com")
    await set_disabled(on_bus.identity.repo, "ann@example.com", True)
    assert await userinfo_status(on_bus, tokens["access_token"]) == 401  # identity's own verifier: at once
    await refused_within(listening_shop, tokens["access_token"])
    [event] = await announced(on_bus)
    user = await on_bus.identity.repo.user_by_email("ann@example.com")
    assert user is not None and event["sub"] == user.id and event["reason"] == "locked"
    ttl = on_bus.settings.auth.access_token_ttl
    assert event["until"] > event["not_before"]
    from datetime import datetime

    span = datetime.fromisoformat(event["until"]) - datetime.fromisoformat(event["not_before"])
    assert ttl <= span.total_seconds() <= ttl + on_bus.settings.auth.leeway


async def test_sign_out_is_announced_and_heard(on_bus: IdentityServer, listening_shop: Shop) -> None:
    tokens = await signed_in(on_bus, listening_shop, "bob@example.com")
    resp = await on_bus.client.get("/connect/endsession", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert resp.status == 200
    await refused_within(listening_shop, tokens["access_token"])
    assert [e["reason"] for e in await announced(on_bus)] == ["signed_out"]
    # signing in again at once (even within the same second) gives a token every verifier accepts
    status, again = await on_bus.password_grant("bob@example.com")
    assert status == 200
    assert (await listening_shop.me(again["access_token"]))[0] == 200
    assert await userinfo_status(on_bus, again["access_token"]) == 200


async def test_revoked_family_is_announced_and_heard(on_bus: IdentityServer, listening_shop: Shop) -> None:
    tokens = await signed_in(on_bus, listening_shop, "cat@example.com")
    resp = await on_bus.client.post(
        "/connect/revocation", data={"token": tokens["refresh_token"], "client_id": "storefront"}
    )
    assert resp.status == 200
    await refused_within(listening_shop, tokens["access_token"])
    assert [e["reason"] for e in await announced(on_bus)] == ["signed_out"]


async def test_replayed_refresh_token_revokes_access_too(on_bus: IdentityServer, listening_shop: Shop) -> None:
    tokens = await signed_in(on_bus, listening_shop, "dan@example.com")
    status, rotated = await on_bus.refresh(tokens["refresh_token"])
    assert status == 200 and (await listening_shop.me(rotated["access_token"]))[0] == 200
    status, _ = await on_bus.refresh(tokens["refresh_token"])  # the thief's (or the victim's) replay
    assert status == 400
    await refused_within(listening_shop, rotated["access_token"])
    assert [e["reason"] for e in await announced(on_bus)] == ["refresh_token_replayed"]


async def test_lock_from_another_process_goes_out_through_the_outbox(
    on_bus: IdentityServer, listening_shop: Shop
) -> None:
    """``ecom users lock`` runs in its own process with its own repository: the row it commits is relayed by the
    running identity (which polls its outbox), and its own verifier hears it on the bus like everyone else."""
    tokens = await signed_in(on_bus, listening_shop, "eve@example.com")
    engine = create_engine(on_bus.db_url)
    try:
        await set_disabled(Repository(engine), "eve@example.com", True)
    finally:
        await engine.dispose()
    await refused_within(listening_shop, tokens["access_token"])
    loop = asyncio.get_running_loop()
    start = loop.time()
    while await userinfo_status(on_bus, tokens["access_token"]) != 401:
        assert loop.time() - start < WITHIN
        await asyncio.sleep(0.05)


async def test_without_a_bus_identity_still_applies_its_own(idsrv: IdentityServer) -> None:
    await idsrv.register("fay@example.com")
    _, tokens = await idsrv.password_grant("fay@example.com", PASSWORD)
    assert await userinfo_status(idsrv, tokens["access_token"]) == 200
    await set_disabled(idsrv.identity.repo, "fay@example.com", True)
    assert await userinfo_status(idsrv, tokens["access_token"]) == 401
    assert [e["reason"] for e in await announced(idsrv)] == ["locked"]  # in the outbox for any relay to send
