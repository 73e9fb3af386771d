"""Lock-out with back-off after repeated failures, and no user enumeration: an email without an account gets
the same answers, the same argon2 work and the same lock-out as one with an account."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests.identity.conftest import PASSWORD, IdentityServer, MakeIdentity, pkce_pair

LOCK = 0.25


@pytest.fixture
async def locking(make_identity: MakeIdentity) -> IdentityServer:
    return await make_identity(ECOM_AUTH_LOCKOUT_AFTER="3", ECOM_AUTH_LOCKOUT_SECONDS=str(LOCK))


async def attempt(idsrv: IdentityServer, email: str, password: str) -> tuple[int, dict[str, Any]]:
    return await idsrv.password_grant(email, password, scope="ecom")


async def test_lockout_and_no_enumeration(locking: IdentityServer) -> None:
    idsrv = locking
    await idsrv.register("ann@example.com")
    known, unknown = "ann@example.com", "nobody@example.com"

    for n in (1, 2):
        k = await attempt(idsrv, known, "Wrong-Password-1")
        u = await attempt(idsrv, unknown, "Wrong-Password-1")
        assert k == u == (400, {"error": "invalid_grant", "error_description": "The email or password is wrong."}), n
    # the third failure locks both alike
    k = await attempt(idsrv, known, "Wrong-Password-1")
    u = await attempt(idsrv, unknown, "Wrong-Password-1")
    assert k == u and "Too many failed sign-in attempts" in k[1]["error_description"]
    # while locked even the right password is refused, with the same answer as for the unknown email
    assert await attempt(idsrv, known, PASSWORD) == await attempt(idsrv, unknown, PASSWORD)

    await asyncio.sleep(LOCK + 0.05)
    status, _ = await attempt(idsrv, known, PASSWORD)
    assert status == 200, "the lock expires; a success resets the count"
    for _ in range(2):
        assert (await attempt(idsrv, known, "Wrong-Password-1"))[0] == 400
    assert (await attempt(idsrv, known, PASSWORD))[0] == 200, "two failures after a reset do not lock"


async def test_back_off_doubles(locking: IdentityServer) -> None:
    idsrv = locking
    await idsrv.register("bob@example.com")
    locks = []
    for _ in range(3):
        outcome = await idsrv.identity.login("bob@example.com", "Wrong-Password-1")
        locks.append(outcome.locked_for)
    assert locks[:2] == [0, 0] and locks[2] == pytest.approx(LOCK)
    await asyncio.sleep(LOCK + 0.05)
    outcome = await idsrv.identity.login("bob@example.com", "Wrong-Password-1")
    assert outcome.locked_for == pytest.approx(2 * LOCK), "one more failure after the lock: twice as long"
    await asyncio.sleep(2 * LOCK + 0.05)
    outcome = await idsrv.identity.login("bob@example.com", "Wrong-Password-1")
    assert outcome.locked_for == pytest.approx(4 * LOCK)


async def test_parallel_guesses_are_checked_one_at_a_time(locking: IdentityServer, monkeypatch: Any) -> None:
    idsrv = locking
    await idsrv.register("cat@example.com")
    passwords = idsrv.identity.passwords
    verified: list[str | None] = []
    real_verify = passwords.verify

    async def counting_verify(password: str, stored_hash: str | None) -> bool:
        verified.append(stored_hash)
        return await real_verify(password, stored_hash)

    monkeypatch.setattr(passwords, "verify", counting_verify)
    results = await asyncio.gather(*(attempt(idsrv, "cat@example.com", f"Wrong-Password-{i}") for i in range(12)))
    assert all(status == 400 for status, _ in results)
    assert len(verified) == 3, "after lockout_after failures the rest are refused unchecked"
    # an unknown email costs the same: one full verification (against the dummy hash)
    verified.clear()
    await attempt(idsrv, "someone-else@example.com", "Wrong-Password-1")
    await attempt(idsrv, "cat2@example.com", "Wrong-Password-1")
    assert verified == [None, None]


async def test_login_page_does_not_enumerate(locking: IdentityServer) -> None:
    idsrv = locking
    await idsrv.register("dan@example.com")
    pages = []
    for email in ("dan@example.com", "nobody@example.com"):
        _, challenge = pkce_pair()
        _, fields = await idsrv.authorize_page(challenge)
        resp = await idsrv.client.post(
            "/connect/authorize", data={**fields, "email": email, "password": "Wrong-Password-1"}
        )
        assert resp.status == 200
        text = await resp.text()
        text = re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value="TOKEN"', text)
        pages.append(text.replace(email, "EMAIL").replace(challenge, "CHALLENGE"))
        assert "The email or password is wrong." in text
    assert pages[0] == pages[1]  # the CSRF token is bound to each authorization request: masked above


async def test_disabled_account_answers_like_a_wrong_password(idsrv: IdentityServer) -> None:
    from identity.accounts import set_disabled

    await idsrv.register("eve@example.com")
    await set_disabled(idsrv.identity.repo, "eve@example.com", True)
    assert await attempt(idsrv, "eve@example.com", PASSWORD) == await attempt(idsrv, "nobody@example.com", PASSWORD)
