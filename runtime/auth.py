"""Bearer-token verification for the gateway and every service (joserfc, JWKS cache).

A :class:`TokenVerifier` checks identity's signed JWT access tokens against the identity service's JWKS:

* the header must name an allowed asymmetric ``alg`` (never ``none``, never ``HS*``) and a ``kid``; the key is
  looked up by ``kid`` in the cached JWKS and must be of the type and curve the ``alg`` needs (joserfc's
  ``check_key``), so a token "HS256-signed with the public key" or ES256 with an RSA key never verifies;
* an unknown ``kid`` triggers one JWKS refetch, at most once per ``refetch_interval`` (single flight), so a
  flood of tokens with made-up key ids cannot turn into a flood of requests to identity; a failed fetch keeps
  the last good key set;
* claims: ``iss`` exact, ``aud`` contains our audience, ``exp`` and ``sub`` required, ``nbf``/``iat`` with
  ``leeway``; ``scope`` (space-separated string), ``roles`` (list of strings) and ``client_id`` (string) must
  have the right types when present;
* verified tokens are cached (bounded LRU keyed by the raw token) until their ``exp`` — the cache never
  serves an expired token, and entries signed by a key that disappears from the JWKS are dropped.

For aiohttp handlers: :func:`require` (401/403 with ``WWW-Authenticate`` per RFC 6750), :func:`principal`,
:func:`optional_principal`, :func:`bearer_token`; the verifier lives in ``app[VERIFIER_KEY]``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from joserfc import jws
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jwt import JWTClaimsRegistry

from runtime.errors import Forbidden, ServiceUnavailable, Unauthorized

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "PRINCIPAL",
    "VERIFIER_KEY",
    "InsufficientScope",
    "InvalidToken",
    "JWKSUnavailable",
    "KeySetUnavailable",
    "MissingToken",
    "Principal",
    "TokenVerifier",
    "authenticate",
    "bearer_token",
    "check_access",
    "optional_principal",
    "principal",
    "require",
]

log = logging.getLogger(__name__)

REALM = "ecom"
API_SCOPE = "ecom"  # the scope every shop API call needs (identity's first-party clients grant it)

# Only asymmetric signature algorithms can be allowed: the verifier holds public keys only, and a shared
# secret would let every service mint tokens. "EdDSA" is the pre-RFC 9864 name of Ed25519/Ed448.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "ES256", "ES384", "ES512",
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "Ed25519", "Ed448", "EdDSA",
    }
)  # fmt: skip
_MIN_RSA_BITS = 2048
_MAX_TOKEN_LENGTH = 8192
_MAX_JWKS_BYTES = 1 << 20
# Access-token ``typ`` values accepted in the header (RFC 9068 says ``at+jwt``; absent and ``JWT`` are common).
_ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/at+jwt", "application/jwt"})
# RFC 6750 b64token
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# ---------------------------------------------------------------------------------------------------
# Principal and errors


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified access token speaks for."""

    sub: str
    client_id: str
    scopes: frozenset[str]
    roles: frozenset[str]
    expires_at: float
    token_id: str
    claims: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def has_scopes(self, scopes: Collection[str]) -> bool:
        return self.scopes.issuperset(scopes)


def _quote(text: str) -> str:
    """Make ``text`` safe inside an RFC 6750 quoted auth-param (no quotes, backslashes or control chars)."""
    return "".join(ch if 0x20 <= ord(ch) <= 0x7E and ch not in '"\\' else "'" if ch == '"' else " " for ch in text)


def _challenge(error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{_quote(description)}"')
    if scope:
        parts.append(f'scope="{_quote(scope)}"')
    return "Bearer " + ", ".join(parts)


class MissingToken(Unauthorized):
    """No bearer token on a request that needs one (401; challenge without an error code, RFC 6750 §3.1)."""

    slug = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str = "This request needs a bearer access token in the Authorization header.") -> None:
        self.www_authenticate = _challenge()
        super().__init__(detail, headers={"WWW-Authenticate": self.www_authenticate})


class InvalidToken(Unauthorized):
    """The bearer token is malformed, expired, not ours or badly signed (401, ``error="invalid_token"``)."""

    slug = "invalid-token"
    title = "Invalid access token"

    def __init__(self, detail: str) -> None:
        self.www_authenticate = _challenge("invalid_token", detail)
        super().__init__(detail, headers={"WWW-Authenticate": self.www_authenticate})


class KeySetUnavailable(ServiceUnavailable):
    """A token names a key this verifier does not know and identity's key set cannot be fetched right now: the
    token is neither accepted nor called invalid; the client retries (503 + Retry-After)."""

    slug = "key-set-unavailable"
    title = "Token keys unavailable"

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "The token is signed with a key this service does not know yet, and the key set could not be "
            "fetched from the identity service; retry shortly.",
            retry_after=retry_after,
        )


class InsufficientScope(Forbidden):
    """The token is valid but lacks a required scope or role (403, ``error="insufficient_scope"``)."""

    slug = "insufficient-scope"
    title = "Insufficient permissions"

    def __init__(self, detail: str, *, scopes: Collection[str] = (), roles: Collection[str] = ()) -> None:
        scope = " ".join(sorted(scopes)) or None
        self.www_authenticate = _challenge("insufficient_scope", detail, scope)
        extra: dict[str, Any] = {}
        if scopes:
            extra["required_scopes"] = sorted(scopes)
        if roles:
            extra["required_roles"] = sorted(roles)
        super().__init__(detail, headers={"WWW-Authenticate": self.www_authenticate}, **extra)


class JWKSUnavailable(Exception):
    """The JWKS (or discovery document) could not be fetched or parsed."""


# ---------------------------------------------------------------------------------------------------
# The verifier


_JWK_TYPES: dict[str, type[ECKey] | type[OKPKey] | type[RSAKey]] = {"EC": ECKey, "OKP": OKPKey, "RSA": RSAKey}


def _import_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    """Public signature keys of a JWKS by kid. Unusable entries are skipped (and logged), not fatal."""
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise JWKSUnavailable("JWKS document has no 'keys' list")
    keys: dict[str, Any] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        kty = entry.get("kty")
        if not isinstance(kid, str) or not kid:
            log.warning("JWKS key without kid ignored")
            continue
        if entry.get("use", "sig") != "sig":
            continue
        # never "oct": no shared secrets; a kty that is not a string (even unhashable) is unsupported too
        cls = _JWK_TYPES.get(kty) if isinstance(kty, str) else None
        if cls is None:
            log.warning("JWKS key %s of unsupported type %r ignored", kid, kty)
            continue
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # joserfc's SecurityWarning for small RSA keys: refused below
                key = cls.import_key(public)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS key %s ignored: %s", kid, exc)
            continue
        if isinstance(key, RSAKey) and key.public_key.key_size < _MIN_RSA_BITS:
            log.warning("JWKS RSA key %s ignored: %d bits < %d", kid, key.public_key.key_size, _MIN_RSA_BITS)
            continue
        if kid in keys:
            log.warning("JWKS has duplicate kid %s; keeping the first", kid)
            continue
        keys[kid] = key
    return keys


class TokenVerifier:
    """Verifies bearer access tokens against a cached JWKS. One per process; share it between handlers."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = ("ES256", "Ed25519", "RS256"),
        leeway: float = 30.0,
        jwks_url: str | None = None,
        refetch_interval: float = 30.0,
        cache_size: int = 100_000,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        jwks_max_age: float | None = 300.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        if not issuer:
            raise ValueError("issuer is required")
        if not audience:
            raise ValueError("audience is required")
        bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not algorithms:
            raise ValueError(f"only asymmetric signature algorithms can be allowed, got {list(algorithms)!r}")
        self.issuer = issuer  # compared exactly with the iss claim
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.leeway = float(leeway)
        self.jwks_url = jwks_url
        self.refetch_interval = float(refetch_interval)
        self.jwks_max_age = jwks_max_age
        self.cache_size = int(cache_size)
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        # one JWS registry per allowed alg: joserfc then refuses any other alg for that verification
        self._registries = {alg: jws.JWSRegistry(algorithms=[alg]) for alg in self.algorithms}
        self._claims = JWTClaimsRegistry(
            now=self._clock,  # type: ignore[arg-type]  # a float "now" works; keeps sub-second precision
            leeway=self.leeway,  # type: ignore[arg-type]  # a float leeway works as an int one does
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        self._keys: dict[str, Any] = {}
        self._keys_loaded = False
        self._keys_from_remote = False
        self._keys_loaded_at = 0.0
        self._last_fetch_attempt: float | None = None
        self._failed_in_a_row = 0
        self._revoked_kids: set[str] = set()
        self._denied: dict[str, tuple[float, float]] = {}  # sub -> (tokens issued before this, until)
        self._fetch_task: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._cache: OrderedDict[str, tuple[Principal, str]] = OrderedDict()
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.fetch_failures = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._closed = False

    # -- key source ------------------------------------------------------------------------------

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def set_jwks(self, jwks: Mapping[str, Any]) -> None:
        """Replace the key set (in-process key source: identity itself, tests). Raises ValueError if unusable."""
        try:
            keys = _import_jwks(jwks)
        except JWKSUnavailable as exc:
            raise ValueError(str(exc)) from None
        self._install(keys, remote=False)

    def _install(self, keys: dict[str, Any], *, remote: bool) -> None:
        if self._revoked_kids:
            # a JWKS fetched before identity dropped the key (a cache, a replica) must not bring it back
            keys = {kid: k for kid, k in keys.items() if kid not in self._revoked_kids}
        removed = set(self._keys) - set(keys)
        self._keys = keys
        self._keys_loaded = True
        self._keys_from_remote = remote
        self._keys_loaded_at = self._clock()
        if removed:
            # a key that left the JWKS must not keep vouching for tokens through the cache
            stale = [tok for tok, (_, kid) in self._cache.items() if kid in removed]
            for tok in stale:
                del self._cache[tok]
            log.info("JWKS keys removed: %s (%d cached tokens dropped)", sorted(removed), len(stale))

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._own_session and self._session is not None:
                raise JWKSUnavailable("the HTTP session given to the verifier is closed")
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _get_json(self, url: str) -> Any:
        session = self._get_session()
        try:
            async with session.get(url, timeout=self._timeout, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise JWKSUnavailable(f"GET {url} answered {resp.status}")
                body = await resp.content.read(_MAX_JWKS_BYTES + 1)
                if len(body) > _MAX_JWKS_BYTES:
                    raise JWKSUnavailable(f"GET {url}: document too large")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise JWKSUnavailable(f"GET {url} failed: {exc!r}") from exc
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise JWKSUnavailable(f"GET {url}: not JSON") from exc

    async def _resolve_jwks_url(self) -> str:
        if self.jwks_url:
            return self.jwks_url
        url = f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        self.discovery_fetches += 1
        doc = await self._get_json(url)
        jwks_uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise JWKSUnavailable(f"{url} has no usable jwks_uri")
        if doc.get("issuer") not in (None, self.issuer):
            raise JWKSUnavailable(f"{url} names issuer {doc.get('issuer')!r}, expected {self.issuer!r}")
        self.jwks_url = jwks_uri
        return jwks_uri

    async def _fetch(self) -> None:
        self._last_fetch_attempt = self._clock()
        try:
            url = await self._resolve_jwks_url()
            self.jwks_fetches += 1
            keys = _import_jwks(await self._get_json(url))
        except JWKSUnavailable as exc:
            self.fetch_failures += 1
            self._failed_in_a_row += 1
            log.warning("JWKS refresh failed, keeping %d known keys: %s", len(self._keys), exc)
            raise
        self._failed_in_a_row = 0
        self._install(keys, remote=True)

    async def _single_flight_fetch(self) -> None:
        """Run one fetch; concurrent callers share it. Raises JWKSUnavailable on failure."""
        if self._fetch_task is None or self._fetch_task.done():
            self._fetch_task = asyncio.get_running_loop().create_task(self._fetch())
            # a failed fetch nobody awaits must not log "exception was never retrieved"
            self._fetch_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._fetch_task)

    async def refresh_jwks(self) -> None:
        """Fetch the JWKS now (not rate limited). Raises :class:`JWKSUnavailable`; the old keys stay."""
        await self._single_flight_fetch()

    def _retry_in(self) -> float:
        waited = self._clock() - (self._last_fetch_attempt or self._clock())
        return max(1.0, 2.0 ** max(self._failed_in_a_row - 1, 0) - waited)

    def _may_refetch(self) -> bool:
        if self._fetch_task is not None and not self._fetch_task.done():
            return True  # join the fetch in flight
        if self._last_fetch_attempt is None:
            return True
        # Until a first key set is known, retry sooner (identity may start after us); never more than 1/s.
        interval = self.refetch_interval if self._keys_loaded else min(self.refetch_interval, 1.0)
        if self._failed_in_a_row:
            # The last fetch failed (identity restarting or busy): a token signed with a new key should not be
            # refused for a whole interval. Back off from 1 s, doubling per failure, up to the interval.
            interval = min(interval, 2.0 ** (self._failed_in_a_row - 1))
        return self._clock() - self._last_fetch_attempt >= interval

    async def _key_for(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            self._maybe_refresh_in_background()
            return key
        if kid in self._revoked_kids:
            raise InvalidToken("The token is signed with a revoked key.")
        # Keys handed over in-process (set_jwks: identity itself, tests) have no remote source to wait for.
        remote = self._keys_from_remote or not self._keys_loaded
        if self._closed or not self._may_refetch():
            if self._failed_in_a_row and not self._closed and remote:
                # The key set cannot be fetched (identity restarting): the token may well be good, so "try again
                # shortly" rather than "your token is bad" — a client would otherwise drop a valid token.
                raise KeySetUnavailable(self._retry_in())
            raise InvalidToken("The token is signed with an unknown key.")
        try:
            await self._single_flight_fetch()
        except JWKSUnavailable:
            if not remote:
                raise InvalidToken(
                    "The token is signed with an unknown key and the key set could not be fetched."
                ) from None
            raise KeySetUnavailable(self._retry_in()) from None
        key = self._keys.get(kid)
        if key is None:
            raise InvalidToken("The token is signed with an unknown key.")
        return key

    def _maybe_refresh_in_background(self) -> None:
        """Refresh a remote key set older than ``jwks_max_age`` so removed keys stop verifying."""
        if (
            self.jwks_max_age is None
            or not self._keys_from_remote
            or self._closed
            or self._clock() - self._keys_loaded_at < self.jwks_max_age
            or (self._background is not None and not self._background.done())
            or not self._may_refetch()
        ):
            return

        async def run() -> None:
            try:
                await self._single_flight_fetch()
            except JWKSUnavailable:
                pass

        self._background = asyncio.get_running_loop().create_task(run())

    # -- verification ----------------------------------------------------------------------------

    def verify_cached(self, token: str) -> Principal | None:
        """The principal of a token verified before and not expired yet, else None (no crypto, no I/O)."""
        entry = self._cache.get(token)
        if entry is None:
            return None
        p = entry[0]
        if self._clock() >= p.expires_at:
            del self._cache[token]
            return None
        self._cache.move_to_end(token)
        return p

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` and return its principal; raise :class:`InvalidToken`."""
        p = self.verify_cached(token)
        if p is not None:
            self.cache_hits += 1
            return p
        self.cache_misses += 1
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidToken("The token is malformed.")
        try:
            obj = jws.extract_compact(token.encode("ascii"))
            header = obj.headers()
        except (JoseError, ValueError, TypeError, UnicodeError, KeyError):
            raise InvalidToken("The token is malformed.") from None
        if not isinstance(header, dict):
            raise InvalidToken("The token is malformed.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._registries:
            raise InvalidToken(f"The token's signature algorithm {str(alg)[:16]!r} is not accepted.")
        if "crit" in header or "b64" in header:
            raise InvalidToken("The token uses JWS extensions that are not accepted.")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
            raise InvalidToken("The token is not an access token.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The token has no key id (kid).")

        key = await self._key_for(kid)
        try:
            ok = jws.validate_compact(obj, key, registry=self._registries[alg])
        except JoseError:
            # wrong key type or curve for the alg, key restricted to another alg, ...
            raise InvalidToken("The token's signature is invalid.") from None
        if not ok:
            raise InvalidToken("The token's signature is invalid.")

        try:
            claims = orjson.loads(obj.payload or b"")
        except orjson.JSONDecodeError:
            raise InvalidToken("The token's claims are not valid JSON.") from None
        if not isinstance(claims, dict):
            raise InvalidToken("The token's claims are not a JSON object.")
        p = self._principal(claims)
        if self._denied and self._is_denied(p):
            raise InvalidToken("The token was revoked (signed out, locked or revoked since it was issued).")
        if self._clock() < p.expires_at and self.cache_size > 0:
            self._cache[token] = (p, kid)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return p

    def _principal(self, claims: dict[str, Any]) -> Principal:
        try:
            self._claims.validate(claims)
        except ExpiredTokenError:
            raise InvalidToken("The token has expired.") from None
        except MissingClaimError as exc:
            raise InvalidToken(f"The token lacks the required claim(s): {exc.claim}.") from None
        except InvalidClaimError as exc:
            if exc.claim == "nbf" and "not yet valid" in exc.description:
                raise InvalidToken("The token is not valid yet (nbf).") from None
            if exc.claim == "iat" and "future" in exc.description:
                raise InvalidToken("The token was issued in the future (iat).") from None
            if exc.claim == "iss":
                raise InvalidToken("The token was not issued by the expected issuer.") from None
            if exc.claim == "aud":
                raise InvalidToken("The token is not meant for this audience.") from None
            raise InvalidToken(f"The token's {exc.claim} claim is invalid.") from None
        except JoseError:
            raise InvalidToken("The token's claims are invalid.") from None

        scope = claims.get("scope", "")
        roles = claims.get("roles", [])
        client_id = claims.get("client_id", "")
        jti = claims.get("jti", "")
        if not isinstance(scope, str):
            raise InvalidToken("The token's scope claim must be a space-separated string.")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidToken("The token's roles claim must be a list of strings.")
        if not isinstance(client_id, str):
            raise InvalidToken("The token's client_id claim must be a string.")
        if not isinstance(jti, str):
            raise InvalidToken("The token's jti claim must be a string.")
        return Principal(
            sub=claims["sub"],
            client_id=client_id,
            scopes=frozenset(scope.split()),
            roles=frozenset(roles),
            expires_at=float(claims["exp"]),
            token_id=jti,
            claims=MappingProxyType(claims),
        )

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- revocation (announced by identity on the bus: runtime/revocation.py) ----------------------

    def revoke_key(self, kid: str) -> int:
        """Stop trusting signing key ``kid`` at once, whatever a JWKS says later; drop every cached
        verification made with it. Returns how many cached verifications were dropped."""
        self._revoked_kids.add(kid)
        self._keys.pop(kid, None)
        stale = [tok for tok, (_, k) in self._cache.items() if k == kid]
        for tok in stale:
            del self._cache[tok]
        return len(stale)

    def deny_subject(self, sub: str, not_before: float, until: float) -> int:
        """Refuse the access tokens of ``sub`` issued before ``not_before`` (sign-out, lock, revoked family)
        until ``until`` (when the last of them expires anyway). Returns how many cached ones were dropped."""
        now = self._clock()
        self._denied = {s: d for s, d in self._denied.items() if d[1] > now}  # forget what has run out
        old = self._denied.get(sub)
        self._denied[sub] = (max(not_before, old[0]) if old else not_before, max(until, old[1]) if old else until)
        stale = [tok for tok, (p, _) in self._cache.items() if p.sub == sub and self._is_denied(p)]
        for tok in stale:
            del self._cache[tok]
        return len(stale)

    def _is_denied(self, p: Principal) -> bool:
        entry = self._denied.get(p.sub)
        if entry is None:
            return False
        not_before, until = entry
        if self._clock() >= until:
            return False
        issued = p.claims.get("iat")
        return not isinstance(issued, (int, float)) or issued < not_before

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        self._closed = True
        for task in (self._background, self._fetch_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, JWKSUnavailable):
                    pass
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


# ---------------------------------------------------------------------------------------------------
# aiohttp integration

VERIFIER_KEY: web.AppKey[TokenVerifier] = web.AppKey("token_verifier", TokenVerifier)
# The verified principal is stored as request["principal"] (the documented interface). aiohttp >= 3.13 warns
# about plain-string request keys; silence that warning for this module only. Read it with principal(request).
PRINCIPAL = "principal"
warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module=__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def bearer_token(request: web.Request) -> str | None:
    """The bearer token of ``Authorization: Bearer <token>``; None without the header; InvalidToken if malformed."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidToken("The request has more than one Authorization header.")
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise InvalidToken("The Authorization header must use the Bearer scheme.")
    token = rest.strip()
    if not token or not _B64TOKEN.fullmatch(token):
        raise InvalidToken("The Authorization header does not hold a well-formed bearer token.")
    return token


def _verifier(request: web.Request) -> TokenVerifier:
    try:
        return request.config_dict[VERIFIER_KEY]
    except KeyError:
        raise RuntimeError("no TokenVerifier installed in app[VERIFIER_KEY]") from None


async def authenticate(request: web.Request) -> Principal:
    """Verify the request's bearer token and store the principal in ``request["principal"]`` (401 otherwise)."""
    existing = request.get(PRINCIPAL)
    if isinstance(existing, Principal):
        return existing
    token = bearer_token(request)
    if token is None:
        raise MissingToken()
    p = await _verifier(request).verify(token)  # answers from the cache first
    request[PRINCIPAL] = p
    return p


async def optional_principal(request: web.Request) -> Principal | None:
    """For routes where a token is optional: None without one, the principal with a valid one, and
    :class:`InvalidToken` for a bad one (a broken token is an error, never silently anonymous)."""
    if bearer_token(request) is None:
        return None
    return await authenticate(request)


def check_access(
    p: Principal, *, roles: Collection[str] = (), scopes: Collection[str] = (), any_role: bool = True
) -> None:
    """Raise :class:`InsufficientScope` unless ``p`` has every scope and one (``any_role``) or all roles."""
    missing_scopes = set(scopes) - p.scopes
    if missing_scopes:
        raise InsufficientScope(f"The token lacks the scope(s): {', '.join(sorted(missing_scopes))}.", scopes=scopes)
    if roles:
        wanted = set(roles)
        ok = bool(wanted & p.roles) if any_role else wanted <= p.roles
        if not ok:
            need = " or ".join(sorted(wanted)) if any_role else " and ".join(sorted(wanted))
            raise InsufficientScope(f"This needs the role {need}.", roles=roles)


def require(
    *, roles: Collection[str] = (), scopes: Collection[str] = (), any_role: bool = True, api: bool = True
) -> Callable[[Handler], Handler]:
    """Decorate an aiohttp handler (function or ``web.View`` method): 401 without a valid token, 403 when a
    role/scope is missing, else the handler runs with the principal in ``request["principal"]``.

    ``api``: the shop's API needs the :data:`API_SCOPE` scope on top of ``scopes``, so a token a user granted
    a third-party client for sign-in only (``openid``) cannot reach carts and orders."""
    roles = tuple(roles) if not isinstance(roles, str) else (roles,)
    scopes = tuple(scopes) if not isinstance(scopes, str) else (scopes,)
    if api and API_SCOPE not in scopes:
        scopes = (*scopes, API_SCOPE)

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> web.StreamResponse:
            request = _find_request(args)
            p = await authenticate(request)
            check_access(p, roles=roles, scopes=scopes, any_role=any_role)
            return await handler(*args, **kwargs)

        wrapper.__auth_requirements__ = {"roles": roles, "scopes": scopes, "any_role": any_role}  # type: ignore[attr-defined]  # read by authorize_first_middleware
        return wrapper  # type: ignore[return-value]  # functools.wraps: the handler's own signature

    return decorate


def _find_request(args: Sequence[Any]) -> web.Request:
    for arg in args:
        if isinstance(arg, web.BaseRequest):
            return arg  # type: ignore[return-value]  # aiohttp passes handlers a web.Request
        if isinstance(arg, web.View):
            return arg.request
    raise TypeError("require() must decorate an aiohttp handler taking the request (or a web.View method)")


def principal(request: web.Request) -> Principal:
    """The verified principal of a request that passed :func:`require` (401 if there is none)."""
    p = request.get(PRINCIPAL)
    if not isinstance(p, Principal):
        raise MissingToken()
    return p
