"""POST /api/identity/users: 422 naming the field (NIST password policy with zxcvbn, validated and look-alike-free
emails), the same 202 whether or not the email is taken, normalised emails, argon2id hashes, rate limits."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from sqlalchemy import select

from identity.accounts import email_problem, mixed_scripts, normalize_email
from identity.api import TokenBuckets, registration_limits
from identity.messages import RegistrationAttempted
from identity.passwords import check_password_policy
from runtime.store import outbox
from tests.identity.conftest import PASSWORD, IdentityServer

INVALID = [
    ({"password": PASSWORD, "name": "Ann"}, "email"),
    ({"email": "not-an-email", "password": PASSWORD, "name": "Ann"}, "email"),
    ({"email": "ann@example.com", "password": "short", "name": "Ann"}, "password"),
    ({"email": "ann@example.com", "password": "ann@example.com1", "name": "Ann"}, "password"),
    ({"email": "ann@example.com", "password": PASSWORD, "name": "   "}, "name"),
    ({"email": "ann@example.com", "password": PASSWORD}, "name"),
    ({"email": 5, "password": PASSWORD, "name": "Ann"}, "email"),
]

# NIST SP 800-63B: common, breached-like, repetitive, sequential or context-specific passwords are refused
WEAK = ["password12", "Passw0rd!!", "1234567890a", "qwertyuiop1", " " * 10 + "a", "ecomgateway1"]
README_PASSWORD = "a-long-passphrase-42"  # published in README.md's first examples: never acceptable

LOOK_ALIKES = [
    "\u0430dmin@example.com",  # Cyrillic а in the local part
    "admin@\u0435xample.com",  # Cyrillic е in the domain
    "p\u0430ypal@example.com",
    "adm\u03b9n@example.com",  # Greek iota
    "ad\u200bmin@example.com",  # zero-width space
    "admin\u202e@example.com",  # right-to-left override
    "ad\u2060min@example.com",  # word joiner
    "\ufeffadmin@example.com",  # byte-order mark
]


async def post(idsrv: IdentityServer, body: dict[str, Any], **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    resp = await idsrv.client.post("/api/identity/users", json=body, **kwargs)
    return resp.status, await resp.json(), resp


async def test_validation_names_the_field(idsrv: IdentityServer) -> None:
    for body, field in INVALID:
        resp = await idsrv.client.post("/api/identity/users", json=body)
        assert resp.status == 422 and resp.content_type == "application/problem+json", body
        problem = await resp.json()
        assert [e["field"] for e in problem["errors"]] == [field], problem
        assert PASSWORD not in await resp.text()
    assert await idsrv.identity.repo.user_by_email("ann@example.com") is None


@pytest.mark.parametrize("password", [*WEAK, README_PASSWORD])
async def test_weak_passwords_are_refused_saying_why_and_what_would_do(idsrv: IdentityServer, password: str) -> None:
    status, problem, resp = await post(idsrv, {"email": "ann@example.com", "password": password, "name": "Ann"})
    assert status == 422 and resp.content_type == "application/problem+json", problem
    assert [e["field"] for e in problem["errors"]] == ["password"]
    message = problem["errors"][0]["message"]
    assert "hard to guess" in message  # what would be accepted
    assert "too easy to guess" in message or "documentation" in message or "at least" in message  # why
    assert await idsrv.identity.repo.user_by_email("ann@example.com") is None


def test_password_policy_uses_the_users_context() -> None:
    assert check_password_policy(PASSWORD, "ann@example.com", "Ann") is None
    assert check_password_policy("Bannister-Kettle-Oxide", "ann@example.com", "Ann") is None
    for password in ("Ann-Smith-2024", "annsmith1984!", "ann.smith@example.com", "EcomGateway-2024"):
        message = check_password_policy(password, "ann.smith@example.com", "Ann Smith")
        assert message is not None, password
    message = check_password_policy("Ann-Smith-2024", "ann.smith@example.com", "Ann Smith")
    assert message is not None and "your email, your name or the shop's name" in message
    assert "at least 8" in (check_password_policy("Ab1!xyz", None) or "")
    assert check_password_policy("x" * 64 + "Q9!", None) is not None  # repeats: refused, whatever the length
    long_passphrase = "grey tundra lantern quietly folds " * 3
    assert len(long_passphrase) > 72 and check_password_policy(long_passphrase, None) is None  # 64+ allowed


@pytest.mark.parametrize("email", LOOK_ALIKES)
async def test_look_alike_and_invisible_emails_are_refused(idsrv: IdentityServer, email: str) -> None:
    status, problem, _ = await post(idsrv, {"email": email, "password": PASSWORD, "name": "Mallory"})
    assert status == 422 and [e["field"] for e in problem["errors"]] == ["email"], problem


def test_email_validation() -> None:
    assert normalize_email("  Ａnn@Example.COM\t") == "ann@example.com"  # NFKC folds the full-width A
    assert email_problem("ann@example.com") is None
    for bad in ("", "ann", "ann@", "@example.com", "ann@example", "a b@example.com", "ann@@example.com", "ann@ex..com"):
        assert email_problem(bad) is not None, bad
    assert email_problem("a" * 250 + "@example.com") is not None
    # one non-Latin script, or the mixes UTS #39 allows, pass
    for good in ("пример@пример.рф", "δοκιμή@παράδειγμα.δοκιμή", "山田たろう@example.jp", "ann+shop@sub.example.co.uk"):
        assert email_problem(good) is None, good
    assert mixed_scripts("\u0430dmin") == {"LATIN", "CYRILLIC"} and not mixed_scripts("admin-2")
    assert "invisible" in (email_problem("ad\u200dmin@example.com") or "")
    assert "Cyrillic and Latin" in (email_problem("admin@\u0435xample.com") or "")


async def test_taken_email_answers_like_a_new_one(idsrv: IdentityServer, caplog: pytest.LogCaptureFixture) -> None:
    status, new, resp = await post(idsrv, {"email": "  Ann.Smith@Example.COM", "password": PASSWORD, "name": "Ann"})
    assert status == 202 and resp.headers["Cache-Control"] == "no-store"
    user = await idsrv.identity.repo.user_by_email("ann.smith@example.com")
    assert user is not None and user.roles == ("customer",) and user.password_hash.startswith("$argon2id$")
    with caplog.at_level(logging.WARNING, logger="identity.accounts"):
        status2, taken, _ = await post(
            idsrv, {"email": "ann.smith@EXAMPLE.com ", "password": "Other-Kestrel-Fjord-8", "name": "Mallory"}
        )
    assert (status2, taken) == (status, new)  # the same status and body: nothing tells the email is taken
    assert "registration attempt for existing account" in caplog.text and user.id in caplog.text
    stored = await idsrv.identity.repo.user_by_email("ann.smith@example.com")
    assert stored == user  # nothing changed
    async with idsrv.identity.repo.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.envelope))).scalars().all()
    events = [json.loads(r) for r in rows if json.loads(r)["type"] == RegistrationAttempted.__name__]
    assert [e["body"]["user_id"] for e in events] == [user.id]  # recorded for a mailer to tell the owner


async def test_concurrent_registrations_of_one_email(idsrv: IdentityServer) -> None:
    body = {"email": "race@example.com", "password": PASSWORD, "name": "R"}
    answers = await asyncio.gather(*(idsrv.client.post("/api/identity/users", json=body) for _ in range(4)))
    assert sorted(r.status for r in answers) == [202] * 4
    assert len({await r.text() for r in answers}) == 1
    users, _ = await idsrv.identity.repo.list_users()
    assert [u.email for u in users].count("race@example.com") == 1


async def test_registration_rate_limits(idsrv: IdentityServer) -> None:
    body = {"email": "busy@example.com", "password": PASSWORD, "name": "B"}
    statuses = [(await post(idsrv, body))[0] for _ in range(6)]
    assert statuses == [202] * 5 + [429]
    status, problem, resp = await post(idsrv, body)
    assert status == 429 and resp.content_type == "application/problem+json"
    assert problem["type"].endswith("/rate-limited") and 1 <= int(resp.headers["Retry-After"]) <= 12
    assert "this email" in problem["detail"]
    # per address: 20 a minute, whatever the emails (the gateway's X-Forwarded-For names the address)
    statuses = [
        (await post(idsrv, {**body, "email": f"u{i}@example.com"}, headers={"X-Forwarded-For": "203.0.113.7"}))[0]
        for i in range(21)
    ]
    assert statuses == [202] * 20 + [429]
    status, problem, _ = await post(
        idsrv, {**body, "email": "x@example.com"}, headers={"X-Forwarded-For": "203.0.113.8"}
    )
    assert status == 202  # another address has its own bucket


def test_token_buckets_refill_and_forget() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=6, capacity=2, max_keys=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(10.0)
    now[0] += 10
    assert buckets.take("a") == 0.0
    for key in "bcde":
        buckets.take(key)
    assert len(buckets._buckets) <= 3


async def test_registration_limits_are_per_app(idsrv: IdentityServer) -> None:
    assert registration_limits(idsrv.client.app) is registration_limits(idsrv.client.app)


async def test_malformed_json_is_a_problem(idsrv: IdentityServer) -> None:
    resp = await idsrv.client.post("/api/identity/users", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    assert "Traceback" not in await resp.text()
