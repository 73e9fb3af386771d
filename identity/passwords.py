"""Password hashing (argon2id) and the password policy.

Parameters: RFC 9106 §4 "second recommended option" (the low-memory profile, also argon2-cffi's default):
argon2id, t=3 passes, m=64 MiB, p=4 lanes, 16-byte salt, 32-byte tag. RFC 9106's first option needs 2 GiB per
hash, which a web service answering concurrent logins cannot afford; 64 MiB is still far above OWASP's floor
(19 MiB, t=2) and makes GPU/ASIC guessing memory-bound. Measured ~0.12-0.15 s per hash or verify on a 2-core
box (``python -m bench.identity_crypto``): acceptable for a login, which happens once per session — tokens are
then refreshed without a password. Memory and CPU stay bounded because hashing runs in a small dedicated
thread pool (``max_workers`` hashes at once, 64 MiB each), not in the event loop and not in the default
executor. Hashes record their parameters, so raising them later only needs :func:`needs_rehash` at login.

Passwords are NFKC-normalised before hashing (NIST SP 800-63B §5.1.1.2), so the same password typed on
different keyboards/OSes verifies.

``verify_password`` behaves the same whether or not the user exists: with no stored hash (unknown email) it
still runs one full argon2 verification against a dummy hash and returns False, so response time does not
reveal which emails are registered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import unicodedata

from argon2 import PasswordHasher, Type, profiles
from argon2 import Parameters as Argon2Parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from runtime.errors import ValidationProblem

__all__ = [
    "DEFAULT_PARAMETERS",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "Argon2Parameters",
    "Passwords",
    "check_password_policy",
    "enforce_password_policy",
    "hash_password",
    "hash_password_sync",
    "needs_rehash",
    "verify_password",
    "verify_password_sync",
]

DEFAULT_PARAMETERS: Argon2Parameters = profiles.RFC_9106_LOW_MEMORY
assert DEFAULT_PARAMETERS.type is Type.ID

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # argon2 is fine with long input; this only stops absurd request bodies


def _normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


class Passwords:
    """An argon2id hasher with a bounded worker pool. Use the module functions for the default instance."""

    def __init__(self, parameters: Argon2Parameters = DEFAULT_PARAMETERS, *, max_workers: int | None = None) -> None:
        if parameters.type is not Type.ID:
            raise ValueError("only argon2id is allowed")
        self.parameters = parameters
        self.hasher = PasswordHasher.from_parameters(parameters)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the pool (taken on the event loop: never held for long)
        self._dummy_lock = threading.Lock()  # guards the dummy hash (held for one hash, in a worker thread)
        self._dummy: str | None = None

    # -- sync (run in a worker thread, or from the CLI) -----------------------------------------

    def hash_sync(self, password: str) -> str:
        return self.hasher.hash(_normalize(password))

    def _dummy_hash(self) -> str:
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self.hasher.hash("dummy password for timing equalisation")
            return self._dummy

    def verify_sync(self, password: str, stored_hash: str | None) -> bool:
        """True if ``password`` matches ``stored_hash``. A missing or corrupt hash costs one full verification
        too (against a dummy hash) and answers False."""
        pw = _normalize(password)
        if stored_hash:
            try:
                return self.hasher.verify(stored_hash, pw)
            except VerifyMismatchError:
                return False
            except (InvalidHashError, VerificationError):
                pass  # corrupt hash: fall through to the dummy, same timing as an unknown user
        try:
            self.hasher.verify(self._dummy_hash(), pw)
        except VerificationError:
            pass
        return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` was made with other parameters (rehash it after a successful login)."""
        try:
            return self.hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return True

    # -- async (never blocks the event loop) ---------------------------------------------------

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="argon2")
            return self._pool

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._executor(), self.hash_sync, password)

    async def verify(self, password: str, stored_hash: str | None) -> bool:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor(), self.verify_sync, password, stored_hash
        )

    async def warm_up(self) -> None:
        """Compute the dummy hash ahead of the first unknown-user login (call at start-up)."""
        await asyncio.get_running_loop().run_in_executor(self._executor(), self._dummy_hash)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_default = Passwords()


def default_passwords() -> Passwords:
    return _default


async def hash_password(password: str) -> str:
    """argon2id hash of ``password`` (PHC string with its parameters), computed off the event loop."""
    return await _default.hash(password)


async def verify_password(password: str, stored_hash: str | None) -> bool:
    """Check ``password`` against ``stored_hash`` off the event loop. Pass ``None`` for an unknown user: the
    same work is done and False is returned."""
    return await _default.verify(password, stored_hash)


def hash_password_sync(password: str) -> str:
    return _default.hash_sync(password)


def verify_password_sync(password: str, stored_hash: str | None) -> bool:
    return _default.verify_sync(password, stored_hash)


def needs_rehash(stored_hash: str) -> bool:
    return _default.needs_rehash(stored_hash)


# ---------------------------------------------------------------------------------------------------
# Policy


def _char_class(ch: str) -> str:
    if ch.isdigit():
        return "digit"
    if ch.islower():
        return "lower"
    if ch.isupper():
        return "upper"
    return "other"  # symbols, spaces, letters without case


def check_password_policy(password: str, email: str | None = None) -> str | None:
    """None if ``password`` is acceptable, else a message saying what to change."""
    if not isinstance(password, str) or not password:
        return "Choose a password."
    pw = _normalize(password)
    if len(pw) < MIN_PASSWORD_LENGTH:
        return f"The password must be at least {MIN_PASSWORD_LENGTH} characters long (it has {len(pw)})."
    if len(pw) > MAX_PASSWORD_LENGTH:
        return f"The password must be at most {MAX_PASSWORD_LENGTH} characters long."
    if len({_char_class(c) for c in pw}) < 2:
        return (
            "The password must mix at least two kinds of characters "
            "(lower-case letters, upper-case letters, digits, symbols or spaces)."
        )
    if email:
        e = email.strip().casefold()
        p = pw.strip().casefold()
        local = e.partition("@")[0]
        if p == e or (local and p == local) or (e and e in p):
            return "The password must not be your email address."
    return None


def enforce_password_policy(password: str, email: str | None = None, field: str = "password") -> None:
    """Raise a 422 :class:`ValidationProblem` naming ``field`` when the policy refuses ``password``."""
    message = check_password_policy(password, email)
    if message is not None:
        raise ValidationProblem.field(field, message)
