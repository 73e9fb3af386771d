"""Signing keys of the identity server and the rules for rotating them.

Lifecycle of one key (all times are UNIX seconds)::

    created_at          not_before                 retired_at             expires_at
        |--- published ---|--- published + signs ---|--- published only ---|--- gone from JWKS
        (publish ahead)                             (tokens it signed still live)

* A new key is **published before it signs** (``publish_ahead`` seconds) so that every verifier's cached
  JWKS already holds it when the first token signed with it arrives. The very first key of a ring signs at
  once (nothing to be ahead of). ``publish_ahead`` should exceed the verifiers' ``refetch_interval`` (an
  unknown kid is refetched at most that often) — the default 600 s also covers ``jwks_max_age`` (300 s).
* The **active** key (the one that signs) is the newest key whose ``not_before`` has passed and which is not
  retired. Rotating retires the previous keys at the new key's ``not_before``: exactly when it takes over.
* A retired key stays in the JWKS until every token it signed has expired:
  ``expires_at = retired_at + max_token_lifetime + clock_skew`` (the skew covers verifiers' leeway).
  :meth:`KeyRing.revoke` removes a compromised key from the JWKS immediately instead.

Pure data and logic; persistence stores :meth:`SigningKey.to_record` as JSON (phase 2).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwk
from joserfc.jwk import ECKey, OKPKey, RSAKey

__all__ = [
    "SIGNING_ALGORITHMS",
    "KeyRing",
    "NoActiveKey",
    "SigningKey",
    "generate_key",
    "import_private_key",
    "to_public_jwks",
]

# alg -> (kty, curve or RSA size)
SIGNING_ALGORITHMS: dict[str, tuple[str, str | int]] = {
    "ES256": ("EC", "P-256"),
    "Ed25519": ("OKP", "Ed25519"),
    "RS256": ("RSA", 2048),
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


class NoActiveKey(LookupError):
    """The ring has no key that may sign now."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One signing key: its private JWK plus the times that decide when it signs and when it is published."""

    kid: str
    alg: str
    private_jwk: Mapping[str, Any] = dataclasses.field(repr=False, hash=False)
    created_at: float
    not_before: float  # signs from this time on
    retired_at: float | None = None  # signs no more from this time on
    expires_at: float | None = None  # leaves the JWKS at this time (every token it signed has expired)

    def __post_init__(self) -> None:
        if self.alg not in SIGNING_ALGORITHMS:
            raise ValueError(f"unsupported signing algorithm {self.alg!r}; use one of {', '.join(SIGNING_ALGORITHMS)}")
        if not self.kid:
            raise ValueError("a signing key needs a kid")
        kty, _ = SIGNING_ALGORITHMS[self.alg]
        if self.private_jwk.get("kty") != kty or "d" not in self.private_jwk:
            raise ValueError(f"key {self.kid}: {self.alg} needs a private {kty} JWK")

    # -- state at a given time ------------------------------------------------------------------

    def is_published(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def can_sign(self, now: float) -> bool:
        return self.not_before <= now and (self.retired_at is None or now < self.retired_at)

    def is_pending(self, now: float) -> bool:
        return now < self.not_before and (self.retired_at is None or self.not_before < self.retired_at)

    # -- JWK forms ------------------------------------------------------------------------------

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK for the JWKS document, with ``kid``, ``alg`` and ``use``."""
        pub = {k: v for k, v in self.private_jwk.items() if k not in _PRIVATE_MEMBERS}
        pub.update(kid=self.kid, alg=self.alg, use="sig")
        return pub

    def to_joserfc(self) -> ECKey | OKPKey | RSAKey:
        """The private key as a joserfc key (for signing)."""
        return import_private_key(self.private_jwk, kid=self.kid, alg=self.alg)

    # -- persistence ----------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable dict (contains the private key: store it encrypted/protected)."""
        return {
            "kid": self.kid,
            "alg": self.alg,
            "private_jwk": dict(self.private_jwk),
            "created_at": self.created_at,
            "not_before": self.not_before,
            "retired_at": self.retired_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SigningKey:
        try:
            return cls(
                kid=str(record["kid"]),
                alg=str(record["alg"]),
                private_jwk=dict(record["private_jwk"]),
                created_at=float(record["created_at"]),
                not_before=float(record["not_before"]),
                retired_at=None if record.get("retired_at") is None else float(record["retired_at"]),
                expires_at=None if record.get("expires_at") is None else float(record["expires_at"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a signing key record: {exc!r}") from None


def import_private_key(private_jwk: Mapping[str, Any], *, kid: str, alg: str) -> ECKey | OKPKey | RSAKey:
    data = dict(private_jwk)
    data.update(kid=kid, alg=alg, use="sig")
    key = jwk.import_key(data)
    if not isinstance(key, (ECKey, OKPKey, RSAKey)) or not key.is_private:
        raise ValueError(f"key {kid} is not a private asymmetric key")
    return key


def generate_key(
    alg: str = "ES256",
    *,
    now: float | None = None,
    not_before: float | None = None,
    kid: str | None = None,
    rsa_bits: int = 2048,
) -> SigningKey:
    """A new key for ``alg`` (ES256, Ed25519 or RS256). ``kid`` defaults to the RFC 7638 thumbprint."""
    if alg not in SIGNING_ALGORITHMS:
        raise ValueError(f"unsupported signing algorithm {alg!r}; use one of {', '.join(SIGNING_ALGORITHMS)}")
    now = time.time() if now is None else now
    kty, _param = SIGNING_ALGORITHMS[alg]
    if kty == "RSA":
        if rsa_bits < 2048:
            raise ValueError("RSA signing keys need at least 2048 bits")
        key: Any = jwk.generate_key("RSA", rsa_bits)
    elif kty == "EC":
        key = jwk.generate_key("EC", "P-256")
    else:
        key = jwk.generate_key("OKP", "Ed25519")
    private = key.as_dict(private=True)
    kid = kid or key.thumbprint()
    private.update(kid=kid, alg=alg, use="sig")
    return SigningKey(
        kid=kid,
        alg=alg,
        private_jwk=private,
        created_at=now,
        not_before=now if not_before is None else not_before,
    )


def to_public_jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """``{"keys": [...]}`` with the public JWK of each key."""
    return {"keys": [k.public_jwk() for k in keys]}


class KeyRing:
    """Several signing keys and the rotation rules between them (see the module docstring)."""

    def __init__(
        self,
        keys: Iterable[SigningKey] = (),
        *,
        max_token_lifetime: float = 900.0,
        clock_skew: float = 60.0,
        publish_ahead: float = 600.0,
        default_alg: str = "ES256",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_token_lifetime <= 0:
            raise ValueError("max_token_lifetime must be positive")
        if clock_skew < 0 or publish_ahead < 0:
            raise ValueError("clock_skew and publish_ahead cannot be negative")
        if default_alg not in SIGNING_ALGORITHMS:
            raise ValueError(f"unsupported signing algorithm {default_alg!r}")
        self.max_token_lifetime = float(max_token_lifetime)
        self.clock_skew = float(clock_skew)
        self.publish_ahead = float(publish_ahead)
        self.default_alg = default_alg
        self.clock = clock
        self._keys: dict[str, SigningKey] = {}
        self._imported: dict[str, Any] = {}
        for k in keys:
            self.add(k)

    # -- membership -----------------------------------------------------------------------------

    def add(self, key: SigningKey) -> None:
        if key.kid in self._keys and self._keys[key.kid].private_jwk != key.private_jwk:
            raise ValueError(f"another key already has kid {key.kid}")
        self._keys[key.kid] = key
        self._imported.pop(key.kid, None)

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[SigningKey]:
        return iter(self.keys())

    def keys(self) -> list[SigningKey]:
        """All keys, newest (by ``not_before``, then ``created_at``) first."""
        return sorted(self._keys.values(), key=lambda k: (k.not_before, k.created_at, k.kid), reverse=True)

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    # -- the rules ------------------------------------------------------------------------------

    def active_key(self, now: float | None = None) -> SigningKey:
        """The key that signs now: the newest key whose publish-grace has passed and that is not retired."""
        now = self._now(now)
        for k in self.keys():
            if k.can_sign(now):
                return k
        raise NoActiveKey("no signing key is active; rotate (generate) one")

    def signing_key(self, now: float | None = None) -> tuple[SigningKey, Any]:
        """The active key and its imported joserfc key (imports are cached per kid)."""
        k = self.active_key(now)
        imported = self._imported.get(k.kid)
        if imported is None:
            imported = self._imported[k.kid] = k.to_joserfc()
        return k, imported

    def published(self, now: float | None = None) -> list[SigningKey]:
        """Keys in the JWKS now: pending, active, and retired ones whose tokens may still be alive."""
        now = self._now(now)
        return [k for k in self.keys() if k.is_published(now)]

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public JWKS document."""
        return to_public_jwks(self.published(now))

    def rotate(self, alg: str | None = None, *, now: float | None = None, rsa_bits: int = 2048) -> SigningKey:
        """Generate a new key and schedule the switch to it.

        The new key signs from ``now + publish_ahead`` (from ``now`` when no key can sign yet: the very first
        key, or after every key was revoked); every other key that would still sign then is retired at that
        moment and leaves the JWKS ``max_token_lifetime + clock_skew`` later.
        """
        now = self._now(now)
        has_signer = any(k.can_sign(now) for k in self._keys.values())
        start = now + self.publish_ahead if has_signer else now
        new = generate_key(alg or self.default_alg, now=now, not_before=start, rsa_bits=rsa_bits)
        for k in list(self._keys.values()):
            if k.retired_at is None or k.retired_at > start:
                self._retire(k, start)
        self.add(new)
        return new

    def _retire(self, k: SigningKey, at: float) -> SigningKey:
        expires = at + self.max_token_lifetime + self.clock_skew
        if k.expires_at is not None:
            expires = min(expires, k.expires_at)
        r = dataclasses.replace(k, retired_at=at, expires_at=expires)
        self._keys[k.kid] = r
        return r

    def retire(self, kid: str, *, now: float | None = None) -> SigningKey:
        """Stop signing with ``kid`` now; it stays published until its tokens have expired."""
        k = self._keys[kid]
        now = self._now(now)
        if k.retired_at is not None and k.retired_at <= now:
            return k
        return self._retire(k, now)

    def revoke(self, kid: str, *, now: float | None = None) -> SigningKey:
        """Compromised key: stop signing and drop it from the JWKS now (its tokens stop verifying)."""
        k = self._keys[kid]
        now = self._now(now)
        r = dataclasses.replace(
            k, retired_at=min(now, k.retired_at) if k.retired_at is not None else now, expires_at=now
        )
        self._keys[kid] = r
        self._imported.pop(kid, None)
        return r

    def prune(self, now: float | None = None) -> list[SigningKey]:
        """Forget keys that have left the JWKS; returns them (so the store can delete their rows)."""
        now = self._now(now)
        gone = [k for k in self._keys.values() if not k.is_published(now)]
        for k in gone:
            del self._keys[k.kid]
            self._imported.pop(k.kid, None)
        return gone

    def rotation_due(self, max_age: float, *, now: float | None = None) -> bool:
        """True when no key can sign or the active key has signed for ``max_age`` seconds and no successor
        is scheduled yet (callers then :meth:`rotate`)."""
        now = self._now(now)
        try:
            active = self.active_key(now)
        except NoActiveKey:
            return True
        if any(k.is_pending(now) for k in self._keys.values()):
            return False
        return now - active.not_before >= max_age
