"""Pure pieces without a database: back-off policy, PKCE, scopes, redirect URIs, ID tokens and their hints."""

from __future__ import annotations

import pytest

from identity.actor import MAX_LOCKOUT_SECONDS, LoginPolicy
from identity.keys import KeyRing
from identity.oauth import (
    OAuthError,
    check_redirect_uri,
    decode_id_token_hint,
    parse_scope,
    pkce_matches,
    s256,
)
from identity.tokens import TokenIssuer
from tests.identity.conftest import pkce_pair

ISSUER = "http://127.0.0.1:8001"


def test_back_off_policy() -> None:
    policy = LoginPolicy(lockout_after=5, lockout_seconds=30)
    assert [policy.lock_for(n) for n in range(1, 9)] == [0, 0, 0, 0, 30, 60, 120, 240]
    assert policy.lock_for(40) == MAX_LOCKOUT_SECONDS and policy.lock_for(10**6) == MAX_LOCKOUT_SECONDS


def test_pkce_s256_only() -> None:
    verifier, challenge = pkce_pair()
    assert s256(verifier) == challenge and pkce_matches(verifier, challenge)
    assert not pkce_matches(verifier, verifier), "plain is not accepted"
    assert not pkce_matches("short", s256("short")), "RFC 7636: at least 43 characters"
    # RFC 7636 appendix B
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_scopes() -> None:
    allowed = ("ecom", "openid", "offline_access")
    assert parse_scope(None, allowed) == ("ecom", "offline_access", "openid")
    assert parse_scope("  ecom   openid ", allowed) == ("ecom", "openid")
    for raw, user in (("ecom profile", True), ("admin", True), ("openid", False)):
        with pytest.raises(OAuthError) as info:
            parse_scope(raw, allowed, user=user)
        assert info.value.error == "invalid_scope"


def test_redirect_uri_rules() -> None:
    for ok in (
        "https://shop.example/cb",
        "http://127.0.0.1:8000/callback",
        "http://localhost/cb",
        "com.example.app:/cb",
    ):
        assert check_redirect_uri(ok) is None, ok
    for bad in (
        "http://shop.example/cb",
        "https://shop.example/cb#frag",
        "javascript:alert(1)",
        "myapp:/cb",
        "/relative",
    ):
        assert check_redirect_uri(bad) is not None, bad


def test_id_tokens_and_hints() -> None:
    now = [1_800_000_000.0]
    ring = KeyRing(clock=lambda: now[0])
    ring.rotate()
    issuer = TokenIssuer(ring, ISSUER, "ecom", clock=lambda: now[0])
    with pytest.raises(ValueError, match="audience"):
        issuer.issue_id_token("u1", "ecom", auth_time=now[0])
    id_token = issuer.issue_id_token("u1", "storefront", auth_time=now[0], nonce="n1", extra={"email": "a@example.com"})
    now[0] += 7200  # long expired: still a valid hint for signing out
    claims = decode_id_token_hint(id_token, ring.jwks(), ISSUER)
    assert claims is not None and (claims["sub"], claims["aud"], claims["nonce"]) == ("u1", "storefront", "n1")
    assert decode_id_token_hint(id_token, ring.jwks(), "http://other") is None
    access, _ = issuer.issue_access_token("u1", "storefront", ["ecom"], ["customer"])
    assert decode_id_token_hint(access, ring.jwks(), ISSUER) is None, "an access token is no ID token hint"
    other = KeyRing()
    other.rotate()
    assert decode_id_token_hint(id_token, other.jwks(), ISSUER) is None
    assert decode_id_token_hint("garbage", ring.jwks(), ISSUER) is None
