"""POST /api/identity/users: 422 naming the field, 409 for a taken email, normalised emails, argon2id hashes."""

from __future__ import annotations

import asyncio

from identity.accounts import email_problem, normalize_email
from tests.identity.conftest import PASSWORD, IdentityServer

INVALID = [
    ({"password": PASSWORD, "name": "Ann"}, "email"),
    ({"email": "not-an-email", "password": PASSWORD, "name": "Ann"}, "email"),
    ({"email": "ann@example.com", "password": "short", "name": "Ann"}, "password"),
    ({"email": "ann@example.com", "password": "alllowercaseletters", "name": "Ann"}, "password"),
    ({"email": "ann@example.com", "password": "ann@example.com1", "name": "Ann"}, "password"),
    ({"email": "ann@example.com", "password": PASSWORD, "name": "   "}, "name"),
    ({"email": "ann@example.com", "password": PASSWORD}, "name"),
    ({"email": 5, "password": PASSWORD, "name": "Ann"}, "email"),
]


async def test_validation_names_the_field(idsrv: IdentityServer) -> None:
    for body, field in INVALID:
        resp = await idsrv.client.post("/api/identity/users", json=body)
        assert resp.status == 422 and resp.content_type == "application/problem+json", body
        problem = await resp.json()
        assert [e["field"] for e in problem["errors"]] == [field], problem
        assert PASSWORD not in await resp.text()
    assert await idsrv.identity.repo.user_by_email("ann@example.com") is None


async def test_taken_email_is_409_and_emails_are_normalised(idsrv: IdentityServer) -> None:
    user = await idsrv.register("  Ann.Smith@Example.COM")
    assert user["email"] == "ann.smith@example.com" and user["roles"] == ["customer"]
    assert set(user) == {"id", "email", "name", "roles"}
    resp = await idsrv.client.post(
        "/api/identity/users", json={"email": "ann.smith@EXAMPLE.com ", "password": PASSWORD, "name": "Other"}
    )
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    assert (await resp.json())["type"].endswith("/email-taken")
    stored = await idsrv.identity.repo.user_by_email("ann.smith@example.com")
    assert stored is not None and stored.password_hash.startswith("$argon2id$")


async def test_concurrent_registrations_of_one_email(idsrv: IdentityServer) -> None:
    body = {"email": "race@example.com", "password": PASSWORD, "name": "R"}
    statuses = sorted(
        r.status for r in await asyncio.gather(*(idsrv.client.post("/api/identity/users", json=body) for _ in range(4)))
    )
    assert statuses == [201, 409, 409, 409]


async def test_malformed_json_is_a_problem(idsrv: IdentityServer) -> None:
    resp = await idsrv.client.post("/api/identity/users", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    assert "Traceback" not in await resp.text()


def test_email_normalisation() -> None:
    assert normalize_email("  Ａnn@Example.COM\t") == "ann@example.com"  # NFKC folds the full-width A
    assert email_problem("ann@example.com") is None
    for bad in ("", "ann", "ann@", "@example.com", "ann@example", "a b@example.com", "ann@@example.com", "ann@ex..com"):
        assert email_problem(normalize_email(bad)) is not None, bad
    assert email_problem("a" * 250 + "@example.com") is not None
