"""Refresh-token rotation and reuse detection; single-use authorization codes. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from identity.repository import refresh_tokens
from identity.tokens import hash_token
from tests.identity.conftest import IdentityServer, pkce_pair


async def test_reuse_of_a_rotated_token_revokes_the_family(idsrv: IdentityServer) -> None:
    await idsrv.register("ann@example.com")
    _, first = await idsrv.password_grant("ann@example.com")
    _, second = await idsrv.password_grant("ann@example.com")  # another sign-in: another family
    status, rotated = await idsrv.refresh(first["refresh_token"])
    assert status == 200
    status, again = await idsrv.refresh(rotated["refresh_token"])
    assert status == 200

    # the thief replays the first token: refused, and every token of that family dies with it
    status, body = await idsrv.refresh(first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await idsrv.refresh(again["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    # the other sign-in is untouched
    status, _ = await idsrv.refresh(second["refresh_token"])
    assert status == 200


async def test_concurrent_uses_of_one_refresh_token_never_both_succeed(idsrv: IdentityServer) -> None:
    await idsrv.register("bob@example.com")
    for _ in range(3):
        _, tokens = await idsrv.password_grant("bob@example.com")
        results = await asyncio.gather(*(idsrv.refresh(tokens["refresh_token"]) for _ in range(6)))
        winners = [body for status, body in results if status == 200]
        assert len(winners) == 1, results
        assert all(body["error"] == "invalid_grant" for status, body in results if status != 200)
        # the losers were a reuse: the winner's new token is revoked along with its family
        status, _ = await idsrv.refresh(winners[0]["refresh_token"])
        assert status == 400
    async with idsrv.identity.repo.engine.connect() as conn:
        rows = (await conn.execute(select(refresh_tokens.c.family, refresh_tokens.c.revoked_at))).all()
    assert rows and all(r.revoked_at is not None for r in rows)


async def test_refresh_tokens_are_stored_hashed_and_bound_to_their_client(idsrv: IdentityServer) -> None:
    await idsrv.register("cat@example.com")
    _, tokens = await idsrv.password_grant("cat@example.com")
    async with idsrv.identity.repo.engine.connect() as conn:
        stored = (await conn.execute(select(refresh_tokens.c.token_hash))).scalars().all()
    assert stored == [hash_token(tokens["refresh_token"])] and tokens["refresh_token"] not in stored
    # another (public) client cannot use it
    from identity.oauth import build_client
    from runtime.store import utcnow

    other, _ = build_client("other-app", public=True, audience="ecom", redirect_uris=("https://app.example/cb",))
    await idsrv.identity.repo.create_client(other, utcnow())
    status, body, _ = await idsrv.token(
        {"grant_type": "refresh_token", "client_id": "other-app", "refresh_token": tokens["refresh_token"]}
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    status, _ = await idsrv.refresh(tokens["refresh_token"])
    assert status == 200, "a refused attempt by another client does not burn the token"


async def test_refresh_may_narrow_the_scope_but_not_widen_it(idsrv: IdentityServer) -> None:
    await idsrv.register("dan@example.com")
    _, tokens = await idsrv.password_grant("dan@example.com", scope="openid offline_access ecom")
    status, body, _ = await idsrv.token(
        {
            "grant_type": "refresh_token",
            "client_id": "storefront",
            "refresh_token": tokens["refresh_token"],
            "scope": "ecom email",
        }
    )
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body, _ = await idsrv.token(
        {
            "grant_type": "refresh_token",
            "client_id": "storefront",
            "refresh_token": tokens["refresh_token"],
            "scope": "ecom",
        }
    )
    assert status == 200 and body["scope"] == "ecom" and "id_token" not in body
    status, wide = await idsrv.refresh(body["refresh_token"])  # the grant's scope is kept for the next refresh
    assert status == 200 and wide["scope"] == "ecom offline_access openid"


async def test_authorization_code_is_single_use_and_a_replay_revokes_its_tokens(idsrv: IdentityServer) -> None:
    await idsrv.register("eve@example.com")
    code, verifier = await idsrv.sign_in("eve@example.com")
    status, tokens = await idsrv.exchange(code, verifier)
    assert status == 200
    status, body = await idsrv.exchange(code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await idsrv.refresh(tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant"), "tokens issued from a replayed code are revoked"


async def test_concurrent_exchanges_of_one_code_never_both_succeed(idsrv: IdentityServer) -> None:
    await idsrv.register("fay@example.com")
    code, verifier = await idsrv.sign_in("fay@example.com")
    results = await asyncio.gather(*(idsrv.exchange(code, verifier) for _ in range(5)))
    assert [s for s, _ in results].count(200) == 1, results


async def test_code_exchange_checks_pkce_redirect_uri_and_client(idsrv: IdentityServer) -> None:
    await idsrv.register("gus@example.com")
    code, verifier = await idsrv.sign_in("gus@example.com")
    base = {
        "grant_type": "authorization_code",
        "client_id": "storefront",
        "code": code,
        "redirect_uri": idsrv.redirect_uri,
    }

    wrong_verifier, _ = pkce_pair()
    status, body, _ = await idsrv.token({**base, "code_verifier": wrong_verifier})
    assert (status, body["error"]) == (400, "invalid_grant") and "code_verifier" in body["error_description"]
    status, body, _ = await idsrv.token({**base, "code_verifier": verifier, "redirect_uri": idsrv.redirect_uri + "x"})
    assert (status, body["error"]) == (400, "invalid_grant") and "redirect_uri" in body["error_description"]
    status, body, _ = await idsrv.token({k: v for k, v in base.items() if k != "code"} | {"code_verifier": verifier})
    assert (status, body["error"]) == (400, "invalid_request") and "code" in body["error_description"]
    status, body, _ = await idsrv.token({**base, "code": "not-a-code", "code_verifier": verifier})
    assert (status, body["error"]) == (400, "invalid_grant")
    # all of those left the code usable by its rightful holder
    status, _ = await idsrv.exchange(code, verifier)
    assert status == 200


async def test_expired_code_is_refused(idsrv: IdentityServer) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from identity.repository import authorization_codes
    from runtime.store import utcnow

    await idsrv.register("hal@example.com")
    code, verifier = await idsrv.sign_in("hal@example.com")
    async with idsrv.identity.repo.engine.begin() as conn:
        await conn.execute(update(authorization_codes).values(expires_at=utcnow() - timedelta(seconds=1)))
    status, body = await idsrv.exchange(code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
