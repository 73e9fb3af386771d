"""runtime.auth: token verification against a JWKS served over real HTTP, the cache, refetch rules, and the
aiohttp decorators. Real crypto everywhere (joserfc), no mocks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwt

from identity.keys import SigningKey, generate_key, to_public_jwks
from identity.tokens import TokenIssuer
from runtime.auth import (
    VERIFIER_KEY,
    InsufficientScope,
    InvalidToken,
    KeySetUnavailable,
    MissingToken,
    Principal,
    TokenVerifier,
    optional_principal,
    principal,
    require,
)
from runtime.errors import Problem

# runtime.auth stores request["principal"] (string key, the documented interface); pytest resets the module's
# own filter for aiohttp's NotAppKeyWarning, so repeat it here.
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

AUDIENCE = "ecom-api"


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class IdP:
    """A tiny identity provider: discovery + JWKS over HTTP, with a switchable key set and failure mode."""

    def __init__(self) -> None:
        self.issuer = ""
        self.keys: list[SigningKey] = []
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.fail = False

    async def discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/.well-known/jwks.json"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.fail:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(to_public_jwks(self.keys))


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    state = IdP()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", state.discovery)
    app.router.add_get("/.well-known/jwks.json", state.jwks)
    server = await aiohttp_server(app)
    state.issuer = str(server.make_url("")).rstrip("/")
    return state


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def verifier(idp: IdP, clock: Clock) -> Any:
    v = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, clock=clock)
    yield v
    await v.close()


@pytest.fixture(scope="module")
def es_key() -> SigningKey:
    return generate_key("ES256")


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return generate_key("Ed25519")


@pytest.fixture(scope="module")
def rs_key() -> SigningKey:
    return generate_key("RS256")


def claims_for(issuer: str, clock: Clock, **over: Any) -> dict[str, Any]:
    now = int(clock.now)
    c: dict[str, Any] = {
        "iss": issuer,
        "sub": "user-1",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": "jti-1",
        "scope": "ecom orders:read orders:write",
        "roles": ["customer"],
        "client_id": "storefront",
    }
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def sign(key: SigningKey, claims: Mapping[str, Any], **header: Any) -> str:
    h: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
    h.update(header)
    h = {k: v for k, v in h.items() if v is not None}
    return jwt.encode(h, dict(claims), key.to_joserfc(), algorithms=[key.alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    h = b64(json.dumps(header, separators=(",", ":")).encode())
    p = b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64(signature)}"


# ---------------------------------------------------------------------------------------------------
# Accepting


@pytest.mark.parametrize("alg", ["ES256", "Ed25519", "RS256"])
async def test_valid_token_gives_principal(
    alg: str, idp: IdP, verifier: TokenVerifier, clock: Clock, request: Any
) -> None:
    key = request.getfixturevalue({"ES256": "es_key", "Ed25519": "ed_key", "RS256": "rs_key"}[alg])
    idp.keys = [key]
    c = claims_for(idp.issuer, clock, roles=["admin", "customer"])
    p = await verifier.verify(sign(key, c))
    assert isinstance(p, Principal)
    assert p.sub == "user-1"
    assert p.client_id == "storefront"
    assert p.scopes == frozenset({"ecom", "orders:read", "orders:write"})
    assert p.roles == frozenset({"admin", "customer"})
    assert p.is_admin
    assert p.expires_at == c["exp"]
    assert p.token_id == "jti-1"
    assert p.claims["iss"] == idp.issuer
    assert idp.discovery_hits == 1 and idp.jwks_hits == 1
    assert verifier.jwks_fetches == 1


async def test_token_from_token_issuer_verifies(idp: IdP, verifier: TokenVerifier, clock: Clock) -> None:
    from identity.keys import KeyRing

    ring = KeyRing(clock=clock)
    ring.rotate("ES256")
    idp.keys = ring.published()
    issuer = TokenIssuer(ring, idp.issuer, AUDIENCE, clock=clock)
    token, expires_in = issuer.issue_access_token("u-9", "storefront", ["cart"], ["customer"])
    p = await verifier.verify(token)
    assert (p.sub, p.client_id, p.scopes, p.roles, expires_in) == ("u-9", "storefront", {"cart"}, {"customer"}, 900)
    assert not p.is_admin


async def test_audience_list_containing_ours(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    p = await verifier.verify(sign(es_key, claims_for(idp.issuer, clock, aud=["other", AUDIENCE])))
    assert p.sub == "user-1"


async def test_optional_claims_default(idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    c = claims_for(idp.issuer, clock, scope=None, roles=None, client_id=None, jti=None, nbf=None, iat=None)
    p = await verifier.verify(sign(es_key, c))
    assert (p.scopes, p.roles, p.client_id, p.token_id) == (frozenset(), frozenset(), "", "")


# ---------------------------------------------------------------------------------------------------
# Refusing


async def expect_unavailable(verifier: TokenVerifier, token: str) -> KeySetUnavailable:
    """A token with a key the verifier cannot look up now (identity unreachable): 503 + Retry-After, not 401."""
    with pytest.raises(KeySetUnavailable) as info:
        await verifier.verify(token)
    exc = info.value
    assert exc.status == 503 and int(exc.headers["Retry-After"]) >= 1
    assert "could not be fetched" in exc.detail and "503" not in exc.detail  # no internals to the client
    return exc


async def expect_invalid(verifier: TokenVerifier, token: str, fragment: str = "") -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token)
    exc = info.value
    assert exc.status == 401
    assert exc.headers["WWW-Authenticate"].startswith('Bearer realm="ecom", error="invalid_token"')
    assert exc.www_authenticate == exc.headers["WWW-Authenticate"]
    assert fragment.lower() in exc.detail.lower(), exc.detail
    return exc


async def test_alg_none_refused(idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    c = claims_for(idp.issuer, clock)
    await expect_invalid(verifier, raw_token({"alg": "none", "kid": es_key.kid}, c), "algorithm")
    await expect_invalid(verifier, raw_token({"alg": "none"}, c), "algorithm")
    await expect_invalid(verifier, raw_token({"alg": "None", "kid": es_key.kid}, c), "algorithm")


@pytest.mark.parametrize("hs", ["HS256", "HS384", "HS512"])
async def test_hmac_signed_with_public_key_refused(
    hs: str, idp: IdP, verifier: TokenVerifier, clock: Clock, rs_key: SigningKey
) -> None:
    """The classic key-confusion attack: HMAC keyed with the verifier's public key material."""
    idp.keys = [rs_key]
    c = claims_for(idp.issuer, clock)
    pem = rs_key.to_joserfc().as_pem(private=False)
    jwk_json = json.dumps(rs_key.public_jwk()).encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[hs]
    for secret in (pem, jwk_json):
        header = {"alg": hs, "kid": rs_key.kid, "typ": "at+jwt"}
        unsigned = raw_token(header, c).rsplit(".", 1)[0]
        sig = hmac.new(secret, unsigned.encode(), digest).digest()
        await expect_invalid(verifier, f"{unsigned}.{b64(sig)}", "algorithm")


def test_symmetric_or_none_algorithms_cannot_be_allowed() -> None:
    for algs in (["HS256"], ["none"], ["ES256", "HS512"], []):
        with pytest.raises(ValueError):
            TokenVerifier(issuer="http://idp", audience=AUDIENCE, algorithms=algs)


async def test_wrong_key_same_kid_refused(idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    impostor = generate_key("ES256", kid=es_key.kid)
    await expect_invalid(verifier, sign(impostor, claims_for(idp.issuer, clock)), "signature")


async def test_alg_must_match_key_type(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey, ed_key: SigningKey, rs_key: SigningKey
) -> None:
    idp.keys = [es_key, ed_key]
    c = claims_for(idp.issuer, clock)
    # an RS256 signature made with a real RSA key, but pointing at the EC key's kid
    await expect_invalid(verifier, sign(rs_key, c, kid=es_key.kid), "signature")
    # an Ed25519 signature presented as ES256 for the Ed25519 key
    t = sign(ed_key, c)
    _h, p, s = t.split(".")
    forged_header = b64(json.dumps({"alg": "ES256", "kid": ed_key.kid}).encode())
    await expect_invalid(verifier, f"{forged_header}.{p}.{s}", "signature")


async def test_algorithm_outside_allowed_list_refused(idp: IdP, clock: Clock, ed_key: SigningKey) -> None:
    idp.keys = [ed_key]
    v = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, algorithms=["ES256"], clock=clock)
    try:
        await expect_invalid(v, sign(ed_key, claims_for(idp.issuer, clock)), "algorithm")
    finally:
        await v.close()


async def test_missing_and_unknown_kid_refused(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    c = claims_for(idp.issuer, clock)
    await expect_invalid(verifier, sign(es_key, c, kid=None), "key id")
    stranger = generate_key("ES256")
    await expect_invalid(verifier, sign(stranger, c), "unknown key")
    assert verifier.jwks_fetches == 1


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"iss": "https://evil.example"}, "issuer"),
        ({"aud": "another-api"}, "audience"),
        ({"aud": ["a", "b"]}, "audience"),
        ({"sub": None}, "sub"),
        ({"exp": None}, "exp"),
        ({"iss": None}, "iss"),
        ({"aud": None}, "aud"),
        ({"sub": ""}, "sub"),
        ({"sub": 42}, "sub"),
        ({"exp": "tomorrow"}, "exp"),
        ({"roles": "admin"}, "roles"),
        ({"roles": ["admin", 1]}, "roles"),
        ({"scope": ["a", "b"]}, "scope"),
        ({"client_id": 7}, "client_id"),
    ],
)
async def test_bad_claims_refused(
    override: dict[str, Any], fragment: str, idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    await expect_invalid(verifier, sign(es_key, claims_for(idp.issuer, clock, **override)), fragment)


async def test_expired_and_not_yet_valid_with_leeway(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    now = int(clock.now)
    # expired 10 s ago: inside the 30 s leeway
    assert (
        await verifier.verify(sign(es_key, claims_for(idp.issuer, clock, iat=now - 910, nbf=now - 910, exp=now - 10)))
    ).sub
    # expired 40 s ago: refused
    await expect_invalid(
        verifier, sign(es_key, claims_for(idp.issuer, clock, iat=now - 940, nbf=now - 940, exp=now - 40)), "expired"
    )
    # nbf 10 s ahead (clock skew): accepted; 120 s ahead: refused
    assert (await verifier.verify(sign(es_key, claims_for(idp.issuer, clock, nbf=now + 10)))).sub
    await expect_invalid(verifier, sign(es_key, claims_for(idp.issuer, clock, nbf=now + 120)), "not valid yet")
    await expect_invalid(verifier, sign(es_key, claims_for(idp.issuer, clock, iat=now + 120)), "future")


async def test_leeway_is_configurable(idp: IdP, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    now = int(clock.now)
    token = sign(es_key, claims_for(idp.issuer, clock, exp=now - 10))
    strict = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, leeway=0, clock=clock)
    try:
        await expect_invalid(strict, token, "expired")
    finally:
        await strict.close()


async def test_tampered_payload_refused(idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    t = sign(es_key, claims_for(idp.issuer, clock))
    h, p, s = t.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["roles"] = ["admin"]
    await expect_invalid(verifier, f"{h}.{b64(json.dumps(claims).encode())}.{s}", "signature")
    # tampered signature
    await expect_invalid(verifier, f"{h}.{p}.{s[:-4]}AAAA", "signature")


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b", "a.b.c", "a.b.c.d", "....", "eyJhbGciOiJFUzI1NiJ9..", "é.é.é", "x" * 10_000, "Bearer x.y.z"],
)
async def test_garbage_refused(garbage: str, idp: IdP, verifier: TokenVerifier, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    await expect_invalid(verifier, garbage)


async def test_non_object_payload_and_extensions_refused(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    k = es_key.to_joserfc()
    from joserfc import jws

    not_object = jws.serialize_compact({"alg": "ES256", "kid": es_key.kid}, b"[1,2,3]", k, algorithms=["ES256"])
    await expect_invalid(verifier, not_object, "object")
    not_json = jws.serialize_compact({"alg": "ES256", "kid": es_key.kid}, b"hello", k, algorithms=["ES256"])
    await expect_invalid(verifier, not_json, "json")
    await expect_invalid(
        verifier, sign(es_key, claims_for(idp.issuer, clock), typ="JOSE+secevent"), "not an access token"
    )
    # RFC 7797 unencoded payload (b64=false, crit) is not accepted for access tokens
    payload = json.dumps(claims_for(idp.issuer, clock)).encode()
    unencoded = jws.serialize_compact(
        {"alg": "ES256", "kid": es_key.kid, "b64": False, "crit": ["b64"]}, payload, k, algorithms=["ES256"]
    )
    await expect_invalid(verifier, unencoded, "extensions")


# ---------------------------------------------------------------------------------------------------
# Cache


async def test_cache_hit_skips_verification_but_never_serves_expired(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey
) -> None:
    idp.keys = [es_key]
    c = claims_for(idp.issuer, clock, exp=int(clock.now) + 60)
    token = sign(es_key, c)
    assert verifier.verify_cached(token) is None
    first = await verifier.verify(token)
    assert verifier.cache_misses == 1
    assert verifier.verify_cached(token) is first
    second = await verifier.verify(token)
    assert second is first and verifier.cache_hits == 1 and verifier.cache_misses == 1

    clock.advance(59)
    assert verifier.verify_cached(token) is first
    clock.advance(1)  # now == exp: expired, the cache must not answer
    assert verifier.verify_cached(token) is None
    # a fresh verification still accepts it within the leeway, but does not cache an expired token
    assert (await verifier.verify(token)).sub == "user-1"
    assert verifier.cache_len == 0
    assert verifier.verify_cached(token) is None
    clock.advance(31)
    await expect_invalid(verifier, token, "expired")


async def test_cache_is_bounded_lru(idp: IdP, clock: Clock, es_key: SigningKey) -> None:
    idp.keys = [es_key]
    v = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, clock=clock, cache_size=3)
    try:
        tokens = [sign(es_key, claims_for(idp.issuer, clock, jti=f"t{i}")) for i in range(4)]
        for t in tokens[:3]:
            await v.verify(t)
        assert v.verify_cached(tokens[0]) is not None  # touch: now most recent
        await v.verify(tokens[3])  # evicts tokens[1], the least recently used
        assert v.cache_len == 3
        assert v.verify_cached(tokens[1]) is None
        assert all(v.verify_cached(t) is not None for t in (tokens[0], tokens[2], tokens[3]))
    finally:
        await v.close()


async def test_cache_dropped_for_keys_removed_from_jwks(
    idp: IdP, verifier: TokenVerifier, clock: Clock, es_key: SigningKey, ed_key: SigningKey
) -> None:
    idp.keys = [es_key]
    token = sign(es_key, claims_for(idp.issuer, clock))
    await verifier.verify(token)
    verifier.set_jwks(to_public_jwks([ed_key]))
    assert verifier.verify_cached(token) is None


# ---------------------------------------------------------------------------------------------------
# JWKS fetching, refetch rate limit, rotation


async def test_unknown_kid_refetch_is_rate_limited(idp: IdP, verifier: TokenVerifier, clock: Clock) -> None:
    k1, k2, k3 = generate_key("ES256"), generate_key("ES256"), generate_key("Ed25519")
    idp.keys = [k1]
    await verifier.verify(sign(k1, claims_for(idp.issuer, clock)))
    assert verifier.jwks_fetches == 1

    # a key published later is fetched on first sight... once the refetch interval allows it
    idp.keys = [k1, k2]
    clock.advance(31)
    assert (await verifier.verify(sign(k2, claims_for(idp.issuer, clock)))).sub
    assert verifier.jwks_fetches == 2

    # unknown kid right after a fetch: refused without another fetch
    idp.keys = [k1, k2, k3]
    t3 = sign(k3, claims_for(idp.issuer, clock))
    for _ in range(5):
        await expect_invalid(verifier, t3, "unknown key")
    assert verifier.jwks_fetches == 2 and idp.jwks_hits == 2
    clock.advance(29)
    await expect_invalid(verifier, t3, "unknown key")
    assert verifier.jwks_fetches == 2

    # interval over: one refetch, then accepted
    clock.advance(1)
    assert (await verifier.verify(t3)).sub
    assert verifier.jwks_fetches == 3
    assert idp.discovery_hits == 1  # the jwks_uri is remembered


async def test_concurrent_unknown_kids_share_one_fetch(idp: IdP, verifier: TokenVerifier, clock: Clock) -> None:
    k1 = generate_key("ES256")
    idp.keys = [k1]
    strangers = [generate_key("ES256") for _ in range(3)]
    tokens = [sign(s, claims_for(idp.issuer, clock, jti=str(i))) for i, s in enumerate(strangers * 10)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in results)
    assert verifier.jwks_fetches == 1 and idp.jwks_hits == 1


async def test_key_rotation(idp: IdP, verifier: TokenVerifier, clock: Clock) -> None:
    old, new, newer = generate_key("ES256"), generate_key("ES256"), generate_key("ES256")
    idp.keys = [old]
    before = sign(old, claims_for(idp.issuer, clock, jti="before"))
    assert (await verifier.verify(before)).token_id == "before"

    # rotation: new key published, old one still published while its tokens live
    idp.keys = [new, old]
    clock.advance(60)
    after = sign(new, claims_for(idp.issuer, clock, jti="after"))
    assert (await verifier.verify(after)).token_id == "after"
    assert verifier.jwks_fetches == 2
    verifier.clear_cache()
    assert (await verifier.verify(before)).token_id == "before"  # re-verified with the old key

    # the old key leaves the JWKS; once the verifier has refetched, its tokens stop verifying (cache included)
    idp.keys = [newer, new]
    clock.advance(60)
    assert (await verifier.verify(sign(newer, claims_for(idp.issuer, clock)))).sub
    assert verifier.jwks_fetches == 3
    assert verifier.verify_cached(before) is None
    await expect_invalid(verifier, before, "unknown key")
    assert (await verifier.verify(after)).token_id == "after"


async def test_stale_jwks_refreshed_in_background(idp: IdP, clock: Clock) -> None:
    k1, k2 = generate_key("ES256"), generate_key("ES256")
    idp.keys = [k1, k2]
    v = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, clock=clock, jwks_max_age=300)
    try:
        t1 = sign(k1, claims_for(idp.issuer, clock, exp=int(clock.now) + 3600))
        await v.verify(t1)
        idp.keys = [k2]  # k1 withdrawn; nobody presents an unknown kid
        clock.advance(301)
        v.clear_cache()
        assert (await v.verify(t1)).sub  # still known: answered, and a refresh starts in the background
        for _ in range(100):
            if v.jwks_fetches == 2:
                break
            await asyncio.sleep(0.01)
        assert v.jwks_fetches == 2
        await expect_invalid(v, t1)
    finally:
        await v.close()


async def test_fetch_failure_keeps_last_good_keys(idp: IdP, verifier: TokenVerifier, clock: Clock) -> None:
    k1, k2 = generate_key("ES256"), generate_key("ES256")
    idp.keys = [k1]
    t1 = sign(k1, claims_for(idp.issuer, clock))
    await verifier.verify(t1)
    idp.fail = True
    idp.keys = [k1, k2]
    clock.advance(31)
    await expect_unavailable(verifier, sign(k2, claims_for(idp.issuer, clock)))
    assert verifier.fetch_failures == 1
    verifier.clear_cache()
    assert (await verifier.verify(t1)).sub  # the last good key set still works
    from runtime.auth import JWKSUnavailable

    with pytest.raises(JWKSUnavailable):
        await verifier.refresh_jwks()
    idp.fail = False
    await verifier.refresh_jwks()
    assert verifier.kids == {k1.kid, k2.kid}


async def test_identity_down_at_start(clock: Clock, es_key: SigningKey, unused_tcp_port: int) -> None:
    issuer = f"http://127.0.0.1:{unused_tcp_port}"
    v = TokenVerifier(issuer=issuer, audience=AUDIENCE, clock=clock, fetch_timeout=2)
    try:
        await expect_unavailable(v, sign(es_key, claims_for(issuer, clock)))
        assert v.fetch_failures == 1
        # without any key set the retry comes sooner than refetch_interval (identity may start after us)
        clock.advance(1)
        await expect_unavailable(v, sign(es_key, claims_for(issuer, clock)))
        assert v.fetch_failures == 2
    finally:
        await v.close()


async def test_explicit_jwks_url_and_set_jwks(idp: IdP, clock: Clock, es_key: SigningKey, ed_key: SigningKey) -> None:
    idp.keys = [es_key]
    v = TokenVerifier(issuer=idp.issuer, audience=AUDIENCE, clock=clock, jwks_url=f"{idp.issuer}/.well-known/jwks.json")
    try:
        await v.verify(sign(es_key, claims_for(idp.issuer, clock)))
        assert idp.discovery_hits == 0 and v.jwks_fetches == 1
        v.set_jwks(to_public_jwks([ed_key]))  # in-process source
        assert (await v.verify(sign(ed_key, claims_for(idp.issuer, clock)))).sub
        assert v.jwks_fetches == 1
        with pytest.raises(ValueError):
            v.set_jwks({"nokeys": []})
    finally:
        await v.close()


def test_jwks_ignores_symmetric_private_weak_keys(es_key: SigningKey) -> None:
    from joserfc.jwk import RSAKey

    v = TokenVerifier(issuer="http://idp", audience=AUDIENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc warns about 1024-bit RSA: that is the point
        weak = RSAKey.generate_key(1024, parameters={"kid": "weak"}).as_dict()
    v.set_jwks(
        {
            "keys": [
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                {"kty": "EC", "kid": "broken"},
                weak,
                es_key.public_jwk() | {"use": "enc", "kid": "enc-key"},
                {k: v for k, v in es_key.public_jwk().items() if k != "kid"},
                es_key.public_jwk(),
                "nonsense",
            ]
        }
    )
    assert v.kids == {es_key.kid}


def test_jwks_skips_a_key_whose_kty_is_not_a_string(es_key: SigningKey) -> None:
    # an unhashable kty once made the whole document fail instead of that one entry
    v = TokenVerifier(issuer="http://idp", audience=AUDIENCE)
    v.set_jwks({"keys": [{"kty": ["EC"], "kid": "list-kty"}, {"kty": None, "kid": "no-kty"}, es_key.public_jwk()]})
    assert v.kids == {es_key.kid}


# ---------------------------------------------------------------------------------------------------
# aiohttp decorators


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return web.json_response(
            exc.to_dict(), status=exc.status, headers=exc.headers, content_type="application/problem+json"
        )


@pytest.fixture
async def client(aiohttp_client: Any, clock: Clock, es_key: SigningKey) -> Any:
    verifier = TokenVerifier(issuer="https://id.test", audience=AUDIENCE, clock=clock)
    verifier.set_jwks(to_public_jwks([es_key]))
    app = web.Application(middlewares=[problems])
    app[VERIFIER_KEY] = verifier

    @require()
    async def me(request: web.Request) -> web.Response:
        return web.json_response({"sub": principal(request).sub, "same": request["principal"] is principal(request)})

    @require(roles=["admin"])
    async def admin(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @require(roles=["admin", "support"], any_role=False)
    async def both(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @require(scopes=["orders:write"])
    async def write(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def maybe(request: web.Request) -> web.Response:
        p = await optional_principal(request)
        return web.json_response({"sub": p.sub if p else None})

    class Thing(web.View):
        @require(roles=["admin"])
        async def get(self) -> web.Response:
            return web.json_response({"sub": principal(self.request).sub})

    async def undecorated(request: web.Request) -> web.Response:
        return web.json_response({"sub": principal(request).sub})

    app.router.add_get("/me", me)
    app.router.add_get("/admin", admin)
    app.router.add_get("/both", both)
    app.router.add_post("/write", write)
    app.router.add_get("/maybe", maybe)
    app.router.add_view("/thing", Thing)
    app.router.add_get("/undecorated", undecorated)

    async def close(app: web.Application) -> None:
        await verifier.close()

    app.on_cleanup.append(close)
    return await aiohttp_client(app)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_require_missing_token_401(client: Any) -> None:
    r = await client.get("/me")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="ecom"'
    assert r.headers["Content-Type"].startswith("application/problem+json")
    body = await r.json()
    assert body["status"] == 401 and body["type"].endswith("/unauthorized")
    r = await client.get("/undecorated")
    assert r.status == 401


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer a b",
        'Bearer not"a token',
        "Token abc",
        "Bearer garbage.token.here",
    ],
)
async def test_require_bad_header_or_token_401(client: Any, header: str) -> None:
    r = await client.get("/me", headers={"Authorization": header})
    assert r.status == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert "error_description=" in r.headers["WWW-Authenticate"]
    body = await r.json()
    assert body["type"].endswith("/invalid-token") and body["detail"]


async def test_require_expired_token_401(client: Any, clock: Clock, es_key: SigningKey) -> None:
    token = sign(es_key, claims_for("https://id.test", clock, exp=int(clock.now) + 5))
    assert (await client.get("/me", headers=bearer(token))).status == 200
    clock.advance(40)
    r = await client.get("/me", headers=bearer(token))
    assert r.status == 401
    assert "expired" in r.headers["WWW-Authenticate"]


async def test_require_roles_and_scopes(client: Any, clock: Clock, es_key: SigningKey) -> None:
    customer = sign(es_key, claims_for("https://id.test", clock, scope="ecom orders:read"))
    admin = sign(es_key, claims_for("https://id.test", clock, roles=["admin"], scope="ecom orders:read orders:write"))
    support_admin = sign(es_key, claims_for("https://id.test", clock, roles=["admin", "support"]))

    r = await client.get("/me", headers=bearer(customer))
    assert r.status == 200 and await r.json() == {"sub": "user-1", "same": True}

    r = await client.get("/admin", headers=bearer(customer))
    assert r.status == 403
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="ecom", error="insufficient_scope"')
    body = await r.json()
    assert body["type"].endswith("/insufficient-scope") and body["required_roles"] == ["admin"]
    assert (await client.get("/admin", headers=bearer(admin))).status == 200

    r = await client.post("/write", headers=bearer(customer))
    assert r.status == 403
    assert 'scope="ecom orders:write"' in r.headers["WWW-Authenticate"]
    assert (await client.post("/write", headers=bearer(admin))).status == 200

    assert (await client.get("/both", headers=bearer(admin))).status == 403
    assert (await client.get("/both", headers=bearer(support_admin))).status == 200

    assert (await client.get("/thing", headers=bearer(customer))).status == 403
    r = await client.get("/thing", headers=bearer(admin))
    assert r.status == 200 and (await r.json())["sub"] == "user-1"


async def test_optional_principal(client: Any, clock: Clock, es_key: SigningKey) -> None:
    assert await (await client.get("/maybe")).json() == {"sub": None}
    token = sign(es_key, claims_for("https://id.test", clock))
    assert await (await client.get("/maybe", headers=bearer(token))).json() == {"sub": "user-1"}
    r = await client.get("/maybe", headers=bearer("bad.token.value"))
    assert r.status == 401  # a broken token is an error, not anonymous


def test_error_classes() -> None:
    assert issubclass(InvalidToken, Problem) and InvalidToken("x").status == 401
    assert InsufficientScope("x").status == 403
    assert MissingToken().status == 401
    # quotes and control characters cannot break the header
    h = InvalidToken('bad "quote"\nnewline\\').headers["WWW-Authenticate"]
    assert h.count('"') == 6 and "\n" not in h and "\\" not in h


async def test_after_a_failed_fetch_a_new_key_is_retried_within_seconds(
    idp: IdP, verifier: TokenVerifier, clock: Clock
) -> None:
    """Identity restarting (or busy) when a new kid first shows up must not lock that key out for a whole
    refetch interval: retries back off from 1 s, doubling, up to the interval."""
    k1, k2 = generate_key("ES256"), generate_key("ES256")
    idp.keys = [k1]
    await verifier.verify(sign(k1, claims_for(idp.issuer, clock)))
    idp.fail = True
    idp.keys = [k1, k2]
    clock.advance(31)
    t2 = sign(k2, claims_for(idp.issuer, clock))
    await expect_unavailable(verifier, t2)
    clock.advance(1)
    await expect_unavailable(verifier, t2)  # retried after 1 s
    assert verifier.fetch_failures == 2
    await expect_unavailable(verifier, t2)  # not fetched at once again (the next wait is 2 s), still "retry"
    assert verifier.fetch_failures == 2
    idp.fail = False
    clock.advance(2)
    assert (await verifier.verify(t2)).sub


async def test_require_needs_the_api_scope(client: Any, clock: Clock, es_key: SigningKey) -> None:
    """A token granted for sign-in only (openid) opens no shop API: 403 insufficient_scope (RFC 6750)."""
    token = sign(es_key, claims_for("https://id.test", clock, scope="openid"))
    resp = await client.get("/me", headers=bearer(token))
    assert resp.status == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
