"""Access tokens (signed JWT, RFC 9068 profile) and opaque refresh tokens.

Access token: header ``{"typ": "at+jwt", "alg": <key alg>, "kid": <key id>}``; claims ``iss``, ``sub``,
``aud``, ``exp``, ``iat``, ``nbf``, ``jti``, ``scope`` (space-separated), ``roles`` (list), ``client_id``.
Verified by :class:`runtime.auth.TokenVerifier`.

ID token (OpenID Connect): header ``typ`` ``JWT``; ``aud`` and ``azp`` are the client, so it never passes as an
access token; ``auth_time``, ``nonce`` and profile claims as the scopes allow.

Refresh token: 256 random bits, URL-safe; only its SHA-256 is stored, so a leaked table cannot be replayed.
(A plain hash is enough here, unlike passwords: the token has full entropy, nothing to brute-force.)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from joserfc import jwt

from identity.keys import KeyRing

__all__ = [
    "RESERVED_CLAIMS",
    "TokenIssuer",
    "hash_token",
    "new_opaque_token",
    "new_refresh_token",
    "token_matches",
]

RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "roles", "client_id"})
ID_TOKEN_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "azp"})
ACCESS_TOKEN_TYPE = "at+jwt"


class TokenIssuer:
    """Signs access tokens with the key ring's active key."""

    def __init__(
        self,
        keyring: KeyRing,
        issuer: str,
        audience: str,
        access_token_ttl: int = 900,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if access_token_ttl <= 0:
            raise ValueError("access_token_ttl must be positive")
        if access_token_ttl > keyring.max_token_lifetime:
            # a retired key leaves the JWKS max_token_lifetime after it stopped signing: longer-lived tokens
            # would stop verifying before they expire
            raise ValueError(
                f"access_token_ttl {access_token_ttl}s exceeds the key ring's max_token_lifetime "
                f"{keyring.max_token_lifetime:g}s"
            )
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.access_token_ttl = int(access_token_ttl)
        self.clock = clock

    def issue_access_token(
        self,
        sub: str,
        client_id: str,
        scopes: Collection[str],
        roles: Collection[str],
        extra: Mapping[str, Any] | None = None,
        *,
        not_before: float | None = None,
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds (``expires_in``).

        ``not_before``: the subject's access was revoked at this instant (a deny entry refuses ``iat`` before
        it); ``iat`` is whole seconds, so a token issued in the same second after the revocation gets ``iat`` =
        the next second (less than a second ahead: within every verifier's leeway)."""
        if not sub:
            raise ValueError("sub is required")
        if isinstance(scopes, str) or isinstance(roles, str):
            raise TypeError("scopes and roles are collections of strings, not one string")
        bad = [s for s in scopes if not s or any(c.isspace() for c in s)]
        if bad:
            raise ValueError(f"invalid scope names: {bad!r}")
        now = self.clock()
        key, imported = self.keyring.signing_key(now)
        iat = int(now)
        nbf = iat
        if not_before is not None and iat < not_before <= now + 1:
            iat = math.ceil(not_before)
        claims: dict[str, Any] = {}
        if extra:
            clash = RESERVED_CLAIMS.intersection(extra)
            if clash:
                raise ValueError(f"extra claims cannot override {sorted(clash)}")
            claims.update(extra)
        claims.update(
            iss=self.issuer,
            sub=sub,
            aud=self.audience,
            exp=nbf + self.access_token_ttl,
            iat=iat,
            nbf=nbf,
            jti=secrets.token_urlsafe(16),
            scope=" ".join(sorted(set(scopes))),
            roles=sorted(set(roles)),
            client_id=client_id,
        )
        header = {"typ": ACCESS_TOKEN_TYPE, "alg": key.alg, "kid": key.kid}
        token = jwt.encode(header, claims, imported, algorithms=[key.alg])
        return token, self.access_token_ttl

    def issue_id_token(
        self,
        sub: str,
        client_id: str,
        *,
        auth_time: float,
        nonce: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """An OpenID Connect ID token for ``client_id`` (its audience), signed like the access tokens.

        Its ``aud`` is the client, never the API audience, and its ``typ`` is ``JWT``: a resource server's
        :class:`runtime.auth.TokenVerifier` refuses it as a bearer token (wrong audience)."""
        if not sub or not client_id:
            raise ValueError("sub and client_id are required")
        if client_id == self.audience:
            raise ValueError("a client named like the API audience would get ID tokens that pass as access tokens")
        now = self.clock()
        key, imported = self.keyring.signing_key(now)
        iat = int(now)
        claims: dict[str, Any] = {}
        if extra:
            clash = ID_TOKEN_RESERVED_CLAIMS.intersection(extra)
            if clash:
                raise ValueError(f"extra claims cannot override {sorted(clash)}")
            claims.update(extra)
        claims.update(
            iss=self.issuer,
            sub=sub,
            aud=client_id,
            azp=client_id,
            iat=iat,
            exp=iat + self.access_token_ttl,
            auth_time=int(auth_time),
        )
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode({"typ": "JWT", "alg": key.alg, "kid": key.kid}, claims, imported, algorithms=[key.alg])


def new_opaque_token() -> tuple[str, str]:
    """256 random bits, URL-safe, and the SHA-256 hex digest to store instead of them (refresh tokens,
    authorization codes, client secrets: all have full entropy, so a plain hash cannot be brute-forced)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def new_refresh_token() -> tuple[str, str]:
    """A new opaque refresh token and the SHA-256 hex digest to store instead of it."""
    return new_opaque_token()


def hash_token(token: str) -> str:
    """SHA-256 hex digest of an opaque token (what the database keeps and looks up by)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)
