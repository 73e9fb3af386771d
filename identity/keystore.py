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

Private keys at rest: every row's record is sealed with AES-256-GCM under a key-encryption key (KEK) that is
not in the database but in a file, :class:`KeyEncryptionKeys` (``<data_dir>/identity.kek``, or the path in
``ECOM_IDENTITY_KEK_FILE``; created on first use with mode 0600). A sealed record reads
``enc:v1:<kek id>:<base64url(nonce | ciphertext)>``, its kid bound as associated data (a row copied under another
kid does not open). Rows written before encryption existed (plain JSON) are still read, and re-sealed by
:meth:`KeyManager.ensure_active` (every start); so are rows sealed under an older KEK the file still holds.
:meth:`KeyManager.rekey` rotates the KEK crash-safely: the new KEK is added to the file first, every row is
re-sealed, and only then are the old KEKs removed from it. A KEK that is missing or wrong for the rows stops
start-up with :class:`KekError` (a :class:`config.ConfigError`: one line from ``ecom``).

Revocation is announced: :meth:`KeyManager.revoke` writes :class:`runtime.revocation.SigningKeyRevoked` into
the outbox in the same transaction as the key change, so every verifier drops the key within the outbox relay's
latency (also when ``ecom keys revoke`` runs in another process: the service's relay polls its outbox).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError

from config import ConfigError, Settings
from identity.keys import KeyRing, NoActiveKey, SigningKey
from identity.repository import KeyConflict, Repository, StoredKey, signing_keys
from runtime import revocation
from runtime.store import outbox, utcnow

log = logging.getLogger(__name__)

PUBLISH_AHEAD = 600.0
CHECK_INTERVAL = 60.0
EXTRA_SKEW = 30.0  # on top of the verifiers' leeway: clocks of identity and verifiers may differ a little

KEK_FILE_ENV = "ECOM_IDENTITY_KEK_FILE"
KEK_FILE_NAME = "identity.kek"
SEALED_PREFIX = "enc:v1:"
_KEK_FORMAT = "ecom-identity-kek"


class KekError(ConfigError):
    """The key-encryption key is missing, unreadable or does not open the stored keys (one line, no traceback)."""


def kek_path(settings: Settings) -> Path:
    """``ECOM_IDENTITY_KEK_FILE``, else ``<data_dir>/identity.kek``."""
    configured = os.environ.get(KEK_FILE_ENV, "").strip()
    return Path(configured) if configured else Path(settings.general.data_dir) / KEK_FILE_NAME


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _kek_id(key: bytes) -> str:
    return hashlib.sha256(b"ecom-identity-kek-id:" + key).hexdigest()[:16]


class KeyEncryptionKeys:
    """The KEK file: a JSON document ``{"format", "version", "keys": [{"id", "key"}, ...]}``, the first key
    current (it seals), the others kept only while a :meth:`KeyManager.rekey` is under way (they still open).

    The file is re-read whenever it changes on disk (another process rekeyed), so a running service follows a
    rekey made by ``ecom keys rekey``. It is created on first use, mode 0600, in a folder made 0700.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keys: list[tuple[str, bytes]] = []
        self._stamp: tuple[int, int, int] | None = None

    # -- reading --------------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KekError(f"identity key-encryption key {self.path}: {exc.strerror or exc}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> list[tuple[str, bytes]]:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._keys = self._read() if stamp is not None else []
            self._stamp = stamp
        return self._keys

    def _read(self) -> list[tuple[str, bytes]]:
        where = f"identity key-encryption key {self.path}"
        try:
            st = self.path.stat()
            if st.st_mode & 0o077:
                log.warning("%s was readable by others (mode %o); made 0600", where, st.st_mode & 0o777)
                os.chmod(self.path, 0o600)
            raw = json.loads(self.path.read_text("utf-8"))
            if raw.get("format") != _KEK_FORMAT or raw.get("version") != 1:
                raise ValueError("unknown format")
            keys = [(str(k["id"]), _b64d(str(k["key"]))) for k in raw["keys"]]
        except OSError as exc:
            raise KekError(f"{where}: cannot read it ({exc.strerror or exc})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KekError(f"{where}: not a key-encryption key file (damaged or replaced?)") from None
        if not keys:
            raise KekError(f"{where}: the file holds no key")
        for kek_id, key in keys:
            if len(key) != 32 or _kek_id(key) != kek_id:
                raise KekError(f"{where}: key {kek_id} is damaged (not the 256-bit key its id names)")
        return keys

    def exists(self) -> bool:
        return self._file_stamp() is not None

    def ids(self) -> list[str]:
        return [i for i, _ in self.refresh()]

    def get(self, kek_id: str) -> bytes | None:
        for i, key in self.refresh():
            if i == kek_id:
                return key
        return None

    def current(self) -> tuple[str, bytes]:
        """The KEK that seals; the file is created (mode 0600) when there is none yet."""
        keys = self.refresh()
        if not keys:
            self._create()
            keys = self.refresh()
        return keys[0]

    # -- writing --------------------------------------------------------------------------------

    @staticmethod
    def generate() -> tuple[str, bytes]:
        key = secrets.token_bytes(32)
        return _kek_id(key), key

    def _document(self, keys: Sequence[tuple[str, bytes]]) -> bytes:
        doc = {"format": _KEK_FORMAT, "version": 1, "keys": [{"id": i, "key": _b64e(k)} for i, k in keys]}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def _write_temp(self, keys: Sequence[tuple[str, bytes]]) -> Path:
        folder = self.path.parent
        if not folder.exists():
            for path in reversed([folder, *(p for p in folder.parents if not p.exists())]):
                try:
                    path.mkdir(mode=0o700)
                    os.chmod(path, 0o700)  # whatever the umask
                except FileExistsError:
                    pass
        tmp = folder / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, self._document(keys))
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _sync_folder(self) -> None:
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _create(self) -> None:
        tmp = self._write_temp([self.generate()])
        try:
            try:
                os.link(tmp, self.path)  # atomic and never replaces: two processes starting together agree
            except FileExistsError:
                pass
            except OSError:  # no hard links here: O_EXCL create instead (a reader may see it half-written)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(tmp.read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_folder()
        log.warning(
            "created the identity key-encryption key file %s: back it up; without it the signing keys "
            "in the database cannot be read",
            self.path,
        )

    def replace(self, keys: Sequence[tuple[str, bytes]]) -> None:
        """Write the file anew (atomically: a crash leaves the old or the new file, never a mix)."""
        tmp = self._write_temp(keys)
        try:
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_folder()
        self.refresh()

    # -- sealing --------------------------------------------------------------------------------

    @staticmethod
    def _aad(kid: str, kek_id: str) -> bytes:
        return f"ecom-identity-signing-key:v1:{kek_id}:{kid}".encode()

    def seal(self, kid: str, plaintext: bytes, *, kek: tuple[str, bytes] | None = None) -> str:
        kek_id, key = kek or self.current()
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(key).encrypt(nonce, plaintext, self._aad(kid, kek_id))
        return f"{SEALED_PREFIX}{kek_id}:{_b64e(nonce + sealed)}"

    def unseal(self, kid: str, value: str, *, extra: Mapping[str, bytes] | None = None) -> bytes:
        kek_id, _, data = value[len(SEALED_PREFIX) :].partition(":")
        key = (extra or {}).get(kek_id) or self.get(kek_id)
        if key is None:
            if not self.exists():
                raise KekError(
                    f"identity: the signing keys in the database are encrypted, but the key-encryption key file "
                    f"{self.path} is missing; restore it (or point {KEK_FILE_ENV} at it)"
                )
            raise KekError(
                f"identity: signing key {kid} is encrypted with key-encryption key {kek_id}, which {self.path} does "
                f"not hold (it holds {', '.join(self.ids())}): wrong or replaced KEK file; restore the right one"
            )
        try:
            raw = _b64d(data)
            return AESGCM(key).decrypt(raw[:12], raw[12:], self._aad(kid, kek_id))
        except (InvalidTag, ValueError):
            raise KekError(
                f"identity: signing key {kid} does not decrypt with key-encryption key {kek_id} from {self.path} "
                "(the database row or the KEK file was altered)"
            ) from None

    def hmac_secrets(self, purpose: str) -> list[bytes]:
        """Secrets derived from each KEK (current first) for other uses, e.g. signing CSRF tokens."""
        self.current()
        info = f"ecom-identity:{purpose}".encode()
        return [hmac.new(key, info, hashlib.sha256).digest() for _, key in self.refresh()]


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
        kek: KeyEncryptionKeys,
    ) -> None:
        self.repo = repo
        self.kek = kek
        self.on_revoke: Callable[[str], None] | None = None  # identity's own verifier drops the key at once
        self.on_outbox: Callable[[], None] | None = None  # wakes the outbox relay (announcements to send)
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
            **{"kek": KeyEncryptionKeys(kek_path(settings)), **kwargs},
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
        stored = await self.stored_keys()
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
            for k in self.ring
        ]

    # -- changing -------------------------------------------------------------------------------

    async def ensure_active(self) -> SigningKey | None:
        """Load; generate a key when none can sign (first run). Returns the new key, if one was made.
        Rows in plain text or sealed under an older KEK are re-sealed under the current one first."""
        await self.reseal()
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
        now = utcnow()
        await self._save(scratch, new=[], announce=[revocation.SigningKeyRevoked(kid=kid, revoked_at=now)], now=now)
        log.warning("signing key %s revoked", kid)
        if self.on_revoke is not None:
            self.on_revoke(kid)
        if self.on_outbox is not None:
            self.on_outbox()
        await self.ensure_active()
        return revoked

    async def _save(
        self,
        scratch: KeyRing,
        *,
        new: list[SigningKey],
        announce: Sequence[Any] = (),
        now: datetime | None = None,
    ) -> None:
        before = {k.kid: k for k in self.ring}
        new_kids = {k.kid for k in new}
        changed = [
            StoredKey(k, self._revisions[k.kid])
            for k in scratch
            if k.kid not in new_kids and k.kid in self._revisions and k != before.get(k.kid)
        ]
        try:
            await self.save_keys(new, changed, now or utcnow(), announce=announce)
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
        stored = await self.stored_keys()
        gone = [s.key.kid for s in stored if not s.key.is_published(now)]
        await self.repo.delete_keys(gone)
        return gone

    # -- the table, sealed -----------------------------------------------------------------------

    def _seal(self, key: SigningKey, kek: tuple[str, bytes] | None = None) -> str:
        return self.kek.seal(key.kid, json.dumps(key.to_record()).encode(), kek=kek)

    def _open(self, kid: str, record: str, extra: Mapping[str, bytes] | None = None) -> SigningKey:
        # an unsealed record was written before keys were encrypted: re-sealed by ensure_active / rekey
        plain = self.kek.unseal(kid, record, extra=extra) if record.startswith(SEALED_PREFIX) else record.encode()
        key = SigningKey.from_record(json.loads(plain))
        if key.kid != kid:
            raise KekError(f"identity: the row of signing key {kid} holds key {key.kid} (the table was altered)")
        return key

    async def _rows(self) -> list[Any]:
        async with self.repo.engine.connect() as conn:
            query = select(signing_keys.c.kid, signing_keys.c.record, signing_keys.c.revision)
            return list(await conn.execute(query))

    async def stored_keys(self) -> list[StoredKey]:
        """Every row of ``signing_keys``, opened with the KEK."""
        return [StoredKey(self._open(r.kid, r.record), r.revision) for r in await self._rows()]

    async def save_keys(
        self, new: Sequence[SigningKey], changed: Sequence[StoredKey], now: datetime, *, announce: Sequence[Any] = ()
    ) -> None:
        """Insert ``new`` keys and update ``changed`` ones (each from the revision it was read at), sealed, all or
        nothing, with the ``announce`` events (runtime.revocation) as outbox rows of the same transaction.
        :class:`identity.repository.KeyConflict` if any changed row was modified meanwhile or a new kid exists."""
        sealed_changed = [(s, self._seal(s.key)) for s in changed]
        sealed_new = [(k, self._seal(k)) for k in new]
        try:
            async with self.repo.engine.begin() as conn:
                for stored, record in sealed_changed:
                    result = await conn.execute(
                        update(signing_keys)
                        .where(signing_keys.c.kid == stored.key.kid, signing_keys.c.revision == stored.revision)
                        .values(record=record, revision=stored.revision + 1)
                    )
                    if result.rowcount != 1:
                        raise KeyConflict(stored.key.kid)
                for key, record in sealed_new:
                    await conn.execute(
                        insert(signing_keys).values(kid=key.kid, alg=key.alg, record=record, revision=1, created_at=now)
                    )
                await insert_announcements(conn, announce, now)
        except IntegrityError:
            raise KeyConflict("a key with that kid exists") from None

    async def reseal(self, *, extra: Mapping[str, bytes] | None = None) -> int:
        """Re-seal under the current KEK every row that is plain text or sealed under another KEK (``extra``: KEKs
        no longer in the file but still needed to open rows). A row changed meanwhile is left to the next round.
        Returns how many rows were re-sealed."""
        rows = await self._rows()
        if not rows:
            return 0
        opened = [(r, self._open(r.kid, r.record, extra)) for r in rows]  # a wrong KEK fails here, before any write
        current = self.kek.current()
        done = 0
        for r, key in opened:
            if r.record.startswith(f"{SEALED_PREFIX}{current[0]}:"):
                continue
            async with self.repo.engine.begin() as conn:
                sqlite = conn.dialect.name == "sqlite"
                if sqlite:  # the old bytes are zeroed, not left in free pages of the file
                    await conn.execute(text("PRAGMA secure_delete=ON"))
                # the revision stays: the key did not change, only its wrapping (no one's compare-and-set breaks)
                result = await conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == r.kid, signing_keys.c.record == r.record)
                    .values(record=self._seal(key, current))
                )
                done += result.rowcount
        if done:
            await self._checkpoint()
            log.info("%d signing key(s) re-encrypted under key-encryption key %s", done, current[0])
        return done

    async def _checkpoint(self) -> None:
        async with self.repo.engine.connect() as conn:
            if conn.dialect.name == "sqlite":  # old pages leave the -wal file too
                await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))

    async def rekey(self) -> tuple[list[str], str, int]:
        """Rotate the KEK, crash-safely: (1) the new KEK is written to the file in front of the old ones, (2)
        every row is re-sealed under it, (3) the old KEKs are removed from the file, (4) rows another process
        sealed under an old KEK meanwhile are re-sealed with the old KEKs still in memory. A crash before (3)
        leaves a file holding every KEK some row needs (the next start or rekey finishes the job).
        Returns (old KEK ids, new KEK id, rows re-sealed)."""
        old = list(self.kek.refresh())
        await self.stored_keys()  # every row opens with the KEKs at hand, or KekError before anything changes
        new = self.kek.generate()
        self.kek.replace([new, *old])
        previous = dict(old)
        count = await self.reseal(extra=previous)
        while more := await self.reseal(extra=previous):  # rows another process wrote meanwhile under an old KEK
            count += more
        self.kek.replace([new])
        count += await self.reseal(extra=previous)
        await self.load()
        return [i for i, _ in old], new[0], count


async def insert_announcements(conn: Any, events: Iterable[Any], now: datetime) -> None:
    """Outbox rows for ``runtime.revocation`` events, in the caller's transaction (the relay publishes them)."""
    rows = []
    for event in events:
        env = revocation.announcement(event)
        rows.append(
            {
                "message_id": env.message_id,
                "kind": "publish",
                "destination": "",
                "envelope": env.encode().decode(),
                "created_at": now,
            }
        )
    if rows:
        await conn.execute(insert(outbox), rows)


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
