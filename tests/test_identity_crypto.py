"""identity.keys / identity.tokens / identity.passwords: real keys, real signatures, real argon2id."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import unicodedata
from typing import Any

import orjson
import pytest
from argon2 import Type, profiles

from config import load_settings
from identity.keys import KeyRing, NoActiveKey, SigningKey, generate_key, to_public_jwks
from identity.passwords import (
    DEFAULT_PARAMETERS,
    Passwords,
    check_password_policy,
    enforce_password_policy,
    hash_password,
    needs_rehash,
    verify_password,
)
from identity.tokens import TokenIssuer, hash_token, new_refresh_token, token_matches
from runtime.auth import InvalidToken, TokenVerifier
from runtime.errors import ValidationProblem

ISSUER = "https://id.test"
AUDIENCE = "ecom-api"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def decode_segment(segment: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def verifier_for(ring: KeyRing, clock: Clock) -> TokenVerifier:
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, clock=clock, jwks_max_age=None)
    v.set_jwks(ring.jwks(clock()))
    return v


# ---------------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize(("alg", "kty"), [("ES256", "EC"), ("Ed25519", "OKP"), ("RS256", "RSA")])
def test_generate_key(alg: str, kty: str) -> None:
    k = generate_key(alg, now=100.0)
    assert (k.alg, k.created_at, k.not_before, k.retired_at, k.expires_at) == (alg, 100.0, 100.0, None, None)
    assert k.private_jwk["kty"] == kty and "d" in k.private_jwk
    pub = k.public_jwk()
    assert pub["kid"] == k.kid and pub["alg"] == alg and pub["use"] == "sig"
    assert not PRIVATE_MEMBERS & pub.keys()
    assert k.kid == k.to_joserfc().thumbprint()  # RFC 7638 thumbprint
    if kty == "RSA":
        assert len(base64.urlsafe_b64decode(pub["n"] + "==")) * 8 == 2048
    assert "private_jwk" not in repr(k) and "'d'" not in repr(k)


def test_generate_key_refuses_unknown_alg_and_weak_rsa() -> None:
    for alg in ("HS256", "none", "EdDSA", "ES512"):
        with pytest.raises(ValueError):
            generate_key(alg)
    with pytest.raises(ValueError):
        generate_key("RS256", rsa_bits=1024)


def test_record_round_trip_through_json() -> None:
    ring = KeyRing(clock=Clock())
    ring.rotate("Ed25519")
    k = ring.retire(ring.active_key().kid)
    record = orjson.loads(orjson.dumps(k.to_record()))
    again = SigningKey.from_record(record)
    assert again == k and again.private_jwk == k.private_jwk
    assert again.to_joserfc().as_dict(private=True)["d"] == k.private_jwk["d"]
    with pytest.raises(ValueError):
        SigningKey.from_record({"kid": "x"})
    with pytest.raises(ValueError):
        SigningKey.from_record(record | {"alg": "HS256"})
    with pytest.raises(ValueError):  # public key only: cannot sign
        SigningKey.from_record(record | {"private_jwk": k.public_jwk()})


def test_first_key_signs_at_once_and_later_keys_are_published_ahead() -> None:
    clock = Clock()
    ring = KeyRing(clock=clock, publish_ahead=600, max_token_lifetime=900, clock_skew=60)
    with pytest.raises(NoActiveKey):
        ring.active_key()
    assert ring.jwks() == {"keys": []}

    first = ring.rotate("ES256")
    assert first.not_before == clock.now  # the very first key: no publish-ahead
    assert ring.active_key() == first

    clock.advance(3600)
    t_rotate = clock.now
    second = ring.rotate("ES256")
    assert second.not_before == t_rotate + 600
    # published at once, but the old key keeps signing until the publish-grace has passed
    assert [k["kid"] for k in ring.jwks()["keys"]] == [second.kid, first.kid]
    assert ring.active_key().kid == first.kid
    clock.advance(599)
    assert ring.active_key().kid == first.kid
    clock.advance(1)
    assert ring.active_key().kid == second.kid

    old = ring.get(first.kid)
    assert old is not None
    assert old.retired_at == t_rotate + 600
    assert old.expires_at == t_rotate + 600 + 900 + 60
    # retired key stays in the JWKS while tokens it signed may be alive
    clock.now = old.expires_at - 1
    assert {k["kid"] for k in ring.jwks()["keys"]} == {first.kid, second.kid}
    clock.now = old.expires_at
    assert [k["kid"] for k in ring.jwks()["keys"]] == [second.kid]
    assert ring.prune() == [old]
    assert len(ring) == 1


def test_rotation_while_a_key_is_pending() -> None:
    clock = Clock()
    ring = KeyRing(clock=clock, publish_ahead=600)
    a = ring.rotate()
    clock.advance(10)
    b = ring.rotate()
    clock.advance(10)
    c = ring.rotate()  # b is retired when c takes over, ten seconds after b started
    assert ring.active_key().kid == a.kid
    clock.advance(589)
    assert ring.active_key().kid == a.kid
    clock.advance(1)  # b's not_before: b signs until c's not_before
    assert ring.active_key().kid == b.kid
    clock.advance(10)
    assert ring.active_key().kid == c.kid
    assert {k.kid for k in ring.published()} == {a.kid, b.kid, c.kid}


def test_token_signed_before_rotation_verifies_until_its_key_leaves_jwks() -> None:
    clock = Clock()
    ring = KeyRing(clock=clock, publish_ahead=600, max_token_lifetime=900, clock_skew=60)
    issuer = TokenIssuer(ring, ISSUER, AUDIENCE, access_token_ttl=900, clock=clock)
    ring.rotate("ES256")
    clock.advance(100)
    ring.rotate("Ed25519")
    clock.advance(599)  # last second of the old key
    old_token, _ = issuer.issue_access_token("u1", "storefront", ["a"], [])
    assert decode_segment(old_token.split(".")[0])["alg"] == "ES256"
    clock.advance(1)
    new_token, _ = issuer.issue_access_token("u1", "storefront", ["a"], [])
    assert decode_segment(new_token.split(".")[0])["alg"] == "Ed25519"

    async def check() -> None:
        clock.advance(899)  # the old token is about to expire; its key is still published
        v = verifier_for(ring, clock)
        assert (await v.verify(old_token)).sub == "u1"
        assert (await v.verify(new_token)).sub == "u1"
        clock.advance(61 + 1)  # past retired_at + lifetime + skew: the old key left the JWKS
        v2 = verifier_for(ring, clock)
        with pytest.raises(InvalidToken):
            await v2.verify(old_token)
        await v.close()
        await v2.close()

    asyncio.run(check())


def test_retire_revoke_and_rotation_due() -> None:
    clock = Clock()
    ring = KeyRing(clock=clock, publish_ahead=600, max_token_lifetime=900, clock_skew=60)
    assert ring.rotation_due(86400)
    a = ring.rotate()
    assert not ring.rotation_due(86400)
    clock.advance(86400)
    assert ring.rotation_due(86400)
    b = ring.rotate()
    assert not ring.rotation_due(86400)  # successor scheduled
    clock.advance(600)
    assert ring.active_key().kid == b.kid

    # revoke: gone from the JWKS now; with no signer left the next key signs at once
    ring.revoke(b.kid)
    assert b.kid not in {k["kid"] for k in ring.jwks()["keys"]}
    with pytest.raises(NoActiveKey):
        ring.active_key()
    c = ring.rotate()
    assert c.not_before == clock.now and ring.active_key() == c

    # retire: stops signing now, stays published for lifetime + skew
    r = ring.retire(c.kid)
    assert r.retired_at == clock.now and r.expires_at == clock.now + 960
    assert c.kid in {k["kid"] for k in ring.jwks()["keys"]}
    with pytest.raises(NoActiveKey):
        ring.active_key()
    assert ring.get(a.kid) is not None


def test_keyring_from_records() -> None:
    clock = Clock()
    ring = KeyRing(clock=clock)
    ring.rotate("RS256")
    clock.advance(10)
    ring.rotate("ES256")
    records = [k.to_record() for k in ring]
    again = KeyRing((SigningKey.from_record(r) for r in records), clock=clock)
    assert again.jwks() == ring.jwks()
    assert again.active_key() == ring.active_key()
    assert to_public_jwks(ring.published()) == ring.jwks()


# ---------------------------------------------------------------------------------------------------
# Tokens


def test_issue_access_token_claims_and_header() -> None:
    clock = Clock(1_800_000_000.7)
    ring = KeyRing(clock=clock)
    key = ring.rotate("ES256")
    issuer = TokenIssuer(ring, ISSUER, AUDIENCE, access_token_ttl=600, clock=clock)
    token, expires_in = issuer.issue_access_token(
        "user-7", "storefront", ["orders:read", "cart", "cart"], ["customer"], extra={"name": "Ada"}
    )
    assert expires_in == 600
    h, p, _ = token.split(".")
    assert decode_segment(h) == {"typ": "at+jwt", "alg": "ES256", "kid": key.kid}
    claims = decode_segment(p)
    assert claims["iss"] == ISSUER and claims["sub"] == "user-7" and claims["aud"] == AUDIENCE
    assert claims["iat"] == claims["nbf"] == 1_800_000_000 and claims["exp"] == 1_800_000_600
    assert claims["scope"] == "cart orders:read" and claims["roles"] == ["customer"]
    assert claims["client_id"] == "storefront" and claims["name"] == "Ada"
    assert len(claims["jti"]) >= 16
    other, _ = issuer.issue_access_token("user-7", "storefront", [], [])
    assert decode_segment(other.split(".")[1])["jti"] != claims["jti"]

    async def check() -> None:
        v = verifier_for(ring, clock)
        pr = await v.verify(token)
        assert pr.scopes == {"cart", "orders:read"} and pr.token_id == claims["jti"]
        await v.close()

    asyncio.run(check())


def test_issuer_guards() -> None:
    ring = KeyRing(max_token_lifetime=900)
    with pytest.raises(ValueError):
        TokenIssuer(ring, ISSUER, AUDIENCE, access_token_ttl=3600)  # would outlive its key in the JWKS
    issuer = TokenIssuer(ring, ISSUER, AUDIENCE)
    with pytest.raises(NoActiveKey):
        issuer.issue_access_token("u", "c", [], [])
    ring.rotate()
    with pytest.raises(ValueError):
        issuer.issue_access_token("u", "c", [], [], extra={"sub": "admin"})
    with pytest.raises(ValueError):
        issuer.issue_access_token("u", "c", ["two words"], [])
    with pytest.raises(TypeError):
        issuer.issue_access_token("u", "c", "scope", [])
    with pytest.raises(ValueError):
        issuer.issue_access_token("", "c", [], [])


def test_refresh_tokens() -> None:
    seen = set()
    for _ in range(100):
        token, digest = new_refresh_token()
        assert len(token) >= 43 and token not in seen
        seen.add(token)
        assert len(digest) == 64 and int(digest, 16) >= 0
        assert hash_token(token) == digest and token_matches(token, digest)
        assert not token_matches(token + "x", digest)
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------------------------------------
# Passwords


async def test_hash_and_verify_password() -> None:
    h = await hash_password("Correct horse 9")
    assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")  # OWASP's first option, the settings' default
    assert Passwords.from_settings(load_settings({}).auth).parameters == DEFAULT_PARAMETERS
    assert await verify_password("Correct horse 9", h)
    assert not await verify_password("correct horse 9", h)
    assert not await verify_password("", h)
    assert not needs_rehash(h)
    assert h != await hash_password("Correct horse 9")  # salted


async def test_unknown_user_and_corrupt_hash_cost_a_verification() -> None:
    h = await hash_password("Correct horse 9")
    await verify_password("warm up the dummy hash", None)

    async def timed(stored: str | None) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            assert not await verify_password("wrong password 1", stored)
            best = min(best, time.perf_counter() - t)
        return best

    real = await timed(h)
    missing = await timed(None)
    corrupt = await timed("$argon2id$garbage")
    assert real > 0.01
    # same work whether or not the user exists (generous bounds: shared CI machines are noisy)
    assert 0.5 * real < missing < 2.0 * real
    assert 0.5 * real < corrupt < 2.0 * real


async def test_hashing_does_not_block_the_event_loop() -> None:
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    t = time.perf_counter()
    await hash_password("Correct horse 9")
    elapsed = time.perf_counter() - t
    done = True
    await task
    assert ticks >= max(2, int(elapsed / 0.005 / 4))


async def test_needs_rehash_and_unicode_normalisation() -> None:
    cheap = Passwords(profiles.CHEAPEST, max_workers=1)
    try:
        old = await cheap.hash("Correct horse 9")
        assert await cheap.verify("Correct horse 9", old)
        assert needs_rehash(old)  # made with weaker parameters than the default
        assert not cheap.needs_rehash(old)
        assert needs_rehash("not a hash")
        composed = unicodedata.normalize("NFC", "Ångström 2024!")
        decomposed = unicodedata.normalize("NFD", composed)
        assert composed != decomposed
        assert await cheap.verify(decomposed, await cheap.hash(composed))
    finally:
        cheap.shutdown()
    with pytest.raises(ValueError):
        Passwords(dataclasses.replace(profiles.RFC_9106_LOW_MEMORY, type=Type.I))  # argon2i: refused


@pytest.mark.parametrize(
    ("password", "email", "fragment"),
    [
        ("", None, "choose"),
        ("Short1!", None, "at least 8"),  # NIST SP 800-63B: length and guessability, no composition rules
        ("abcdefghijkl", None, "sequences"),
        ("ABCDEFGHIJKL", None, "sequences"),
        ("123456789012", None, "commonly used"),
        ("!!!!!!!!!!!!", None, "repeats"),
        ("ada.lovelace@example.com", "Ada.Lovelace@Example.com", "email"),
        ("ada.lovelace42", "ada.lovelace42@example.com", "email"),
        ("x" * 1025 + "1", None, "at most"),
    ],
)
def test_password_policy_refuses(password: str, email: str | None, fragment: str) -> None:
    message = check_password_policy(password, email)
    assert message is not None and fragment in message.lower()
    with pytest.raises(ValidationProblem) as info:
        enforce_password_policy(password, email)
    assert info.value.errors == {"password": message}


@pytest.mark.parametrize(
    "password", ["Correct horse", "correcthorse9", "correct horse battery", "ÅNGSTRÖM-2024", "пароль пароль"]
)
def test_password_policy_accepts(password: str) -> None:
    assert check_password_policy(password, "someone@example.com") is None
    enforce_password_policy(password, "someone@example.com")
