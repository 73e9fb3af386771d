"""Signing keys kept in identity's database: loading, rotation, revocation, pruning.

:class:`KeyManager` holds the service's :class:`identity.keys.KeyRing` (which signs and builds the JWKS) in step
with the ``signing_keys`` table, which is the truth shared by every identity process and by ``ecom keys``:

- :meth:`KeyManager.load` reads the table into the ring (picks up rotations made elsewhere);
- :meth:`KeyManager.rotate` / :meth:`KeyManager.revoke` compute the change on a scratch copy of the ring and
  write it with a compare-and-set on each changed row; only then is the ring reloaded, so a lost race (another
  process rotated first) changes nothing here and is reported as :class:`identity.repository.KeyConflict`;
- :meth:`KeyManager.check` is the periodic job: reload, rotate when the active key is older than
  ``settings.auth.key_max_age`` (or none can sign), and delete keys whose tokens have all expired.

Publish before sign: a rotated key signs :data:`PUBLISH_AHEAD` seconds after it is created. Every identity
process reloads keys every :data:`CHECK_INTERVAL` seconds and verifiers refresh their JWKS at least every
``jwks_max_age`` (300 s) — both well inside the 600 s — so no verifier meets a token from a key it has not seen.
A retired key stays published for ``access_token_ttl + leeway + 30`` seconds after it stopped signing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from config import Settings
from identity.keys import KeyRing, NoActiveKey, SigningKey
from identity.repository import KeyConflict, Repository, StoredKey
from runtime.store import utcnow

log = logging.getLogger(__name__)

PUBLISH_AHEAD = 600.0
CHECK_INTERVAL = 60.0
EXTRA_SKEW = 30.0  # on top of the verifiers' leeway: clocks of identity and verifiers may differ a little


class KeyManager:
    """The database-backed key ring of one identity process."""

    def __init__(
        self,
        repo: Repository,
        *,
        alg: str = "ES256",
        max_token_lifetime: float = 900.0,
        clock_skew: float = 60.0,
        key_max_age: float = 90 * 24 * 3600.0,
        publish_ahead: float = PUBLISH_AHEAD,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.repo = repo
        self.key_max_age = key_max_age
        self.clock = clock
        self.on_change = on_change  # gets the JWKS after every load (identity's own verifier follows it)
        self.ring = self._new_ring((), alg, max_token_lifetime, clock_skew, publish_ahead)
        self._revisions: dict[str, int] = {}

    @classmethod
    def from_settings(cls, repo: Repository, settings: Settings, **kwargs: Any) -> KeyManager:
        auth = settings.auth
        return cls(
            repo,
            alg=auth.signing_alg,
            max_token_lifetime=auth.access_token_ttl,  # ID tokens live as long as access tokens
            clock_skew=auth.leeway + EXTRA_SKEW,
            key_max_age=auth.key_max_age,
            **kwargs,
        )

    def _new_ring(
        self, keys: Any, alg: str, max_token_lifetime: float, clock_skew: float, publish_ahead: float
    ) -> KeyRing:
        return KeyRing(
            keys,
            max_token_lifetime=max_token_lifetime,
            clock_skew=clock_skew,
            publish_ahead=publish_ahead,
            default_alg=alg,
            clock=self.clock,
        )

    def _scratch(self, *, publish_ahead: float | None = None) -> KeyRing:
        r = self.ring
        ahead = r.publish_ahead if publish_ahead is None else publish_ahead
        return self._new_ring(r.keys(), r.default_alg, r.max_token_lifetime, r.clock_skew, ahead)

    # -- reading --------------------------------------------------------------------------------

    async def load(self) -> None:
        """Bring the ring in step with the table (keys added, changed or revoked by any process)."""
        stored = await self.repo.signing_keys()
        for s in stored:
            self.ring.add(s.key)  # same kid: the stored record (e.g. now retired) replaces the old one
        self._revisions = {s.key.kid: s.revision for s in stored}
        self.ring.prune()
        if self.on_change is not None:
            self.on_change(self.ring.jwks())

    def jwks(self) -> dict[str, Any]:
        return self.ring.jwks()

    def describe(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every key with its state (pending, active, signing, retired, expired); never key material."""
        now = self.clock() if now is None else now
        try:
            active = self.ring.active_key(now).kid
        except NoActiveKey:
            active = None
        return [
            {
                "kid": k.kid,
                "alg": k.alg,
                "state": _state(k, now, active),
                "created_at": k.created_at,
                "not_before": k.not_before,
                "retired_at": k.retired_at,
                "expires_at": k.expires_at,
            }
            for k in self.ring.keys()
        ]

    # -- changing -------------------------------------------------------------------------------

    async def ensure_active(self) -> SigningKey | None:
        """Load; generate a key when none can sign (first run). Returns the new key, if one was made."""
        await self.load()
        try:
            self.ring.active_key()
            return None
        except NoActiveKey:
            pass
        try:
            return await self.rotate()
        except KeyConflict:
            await self.load()  # another process made one at the same moment
            return None

    async def rotate(self, alg: str | None = None, *, immediately: bool = False) -> SigningKey:
        """Add a new key. It is published now and signs after :data:`PUBLISH_AHEAD` seconds (at once when no
        key can sign, or with ``immediately`` — for a compromised key, when verifiers must refetch anyway)."""
        await self.load()
        scratch = self._scratch(publish_ahead=0.0 if immediately else None)
        new = scratch.rotate(alg)
        await self._save(scratch, new=[new])
        log.info("signing key %s (%s) added; it signs from %s", new.kid, new.alg, _iso(new.not_before))
        return new

    async def revoke(self, kid: str) -> SigningKey:
        """Drop a (compromised) key from the JWKS now: its tokens stop verifying once verifiers refetch.
        A replacement is generated at once when the revoked key was the only signer."""
        await self.load()
        if self.ring.get(kid) is None:
            raise LookupError(f"no published signing key has kid {kid!r}")
        scratch = self._scratch()
        revoked = scratch.revoke(kid)
        await self._save(scratch, new=[])
        log.warning("signing key %s revoked", kid)
        await self.ensure_active()
        return revoked

    async def _save(self, scratch: KeyRing, *, new: list[SigningKey]) -> None:
        before = {k.kid: k for k in self.ring.keys()}
        new_kids = {k.kid for k in new}
        changed = [
            StoredKey(k, self._revisions[k.kid])
            for k in scratch.keys()
            if k.kid not in new_kids and k.kid in self._revisions and k != before.get(k.kid)
        ]
        try:
            await self.repo.save_keys(new, changed, utcnow())
        finally:
            await self.load()

    async def check(self) -> SigningKey | None:
        """The periodic job: reload, rotate when due, delete keys that have left the JWKS."""
        await self.load()
        made = None
        if self.ring.rotation_due(self.key_max_age):
            try:
                made = await self.rotate()
            except KeyConflict:
                log.info("another identity process rotated the signing keys first")
        await self.prune()
        return made

    async def prune(self) -> list[str]:
        """Delete the rows of keys that have left the JWKS (their private keys are kept no longer than needed)."""
        now = self.clock()
        stored = await self.repo.signing_keys()
        gone = [s.key.kid for s in stored if not s.key.is_published(now)]
        await self.repo.delete_keys(gone)
        return gone


def _state(k: SigningKey, now: float, active: str | None) -> str:
    if not k.is_published(now):
        return "expired"
    if k.kid == active:
        return "active"
    if k.is_pending(now):
        return "pending"
    if k.can_sign(now):
        return "signing"
    return "retired"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
