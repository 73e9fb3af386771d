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
import re
import threading
import unicodedata
from dataclasses import dataclass

from argon2 import Parameters as Argon2Parameters
from argon2 import PasswordHasher, Type, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn

from runtime.errors import ValidationProblem

__all__ = [
    "DEFAULT_PARAMETERS",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "Argon2Parameters",
    "PasswordCheck",
    "Passwords",
    "assess_password",
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

MIN_PASSWORD_LENGTH = 8  # NIST SP 800-63B: at least 8; strength is judged by zxcvbn, not by length alone
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
# Policy (NIST SP 800-63B §5.1.1.2 / §3.1.1.2 of rev. 4)
#
# No composition rules (NIST: they do not help); instead every new password is checked against what
# attackers try first, with zxcvbn (Dropbox's estimator: common and breached-password lists, dictionaries,
# keyboard walks, sequences, repeats, dates, l33t substitutions): a score below MIN_SCORE (3, "safely
# unguessable: moderate protection from offline slow-hash scenario") is refused. The user's own context —
# email, its local part and domain words, name — and the shop's name are passed to zxcvbn as user inputs, so a
# password built from them scores as the guessable thing it is. Passwords published in this project's own
# documentation are refused outright: they are the first thing anyone tries against a deployment.

MIN_SCORE = 3
SHOP_WORDS = ("ecomgateway", "ecom", "gateway", "ecom gateway", "storefront")
# Example passwords published in README.md and the docs: never acceptable, however strong they look.
DOCUMENTED_PASSWORDS = frozenset({"a-long-passphrase-42"})
_ZXCVBN_MAX = 72  # zxcvbn refuses longer input; the first 72 characters are scored (a lower bound)
ACCEPTED = (
    f"Use {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters that are hard to guess, for example three or "
    "four unrelated words or a password manager's random password; no common passwords, keyboard patterns, "
    "repeats, or your email, name or the shop's name."
)


def user_inputs(email: str | None = None, name: str | None = None) -> list[str]:
    """What zxcvbn should treat as known to an attacker: the shop's name, the email, its parts, the name."""
    words: list[str] = list(SHOP_WORDS)
    for value in (email, name):
        if not value:
            continue
        v = _normalize(value).strip().casefold()
        words.append(v)
        words.extend(w for w in re.split(r"[^\w]+", v) if len(w) >= 2)
    if email:
        local = _normalize(email).strip().casefold().partition("@")[0]
        if local:
            words.append(local)
    return list(dict.fromkeys(words))


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """The verdict on one password: ``problem`` is None when it is acceptable."""

    problem: str | None
    score: int | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def assess_password(password: object, email: str | None = None, name: str | None = None) -> PasswordCheck:
    """Check ``password`` against the policy, with the user's ``email`` and ``name`` as context."""
    if not isinstance(password, str) or not password:
        return PasswordCheck("Choose a password. " + ACCEPTED)
    pw = _normalize(password)
    if len(pw) < MIN_PASSWORD_LENGTH:
        return PasswordCheck(
            f"The password must be at least {MIN_PASSWORD_LENGTH} characters long (it has {len(pw)}). " + ACCEPTED
        )
    if len(pw) > MAX_PASSWORD_LENGTH:
        return PasswordCheck(f"The password must be at most {MAX_PASSWORD_LENGTH} characters long.")
    folded = pw.strip().casefold()
    if folded in DOCUMENTED_PASSWORDS:
        return PasswordCheck("This password is published as an example in the documentation. " + ACCEPTED, 0)
    if email:
        e = _normalize(email).strip().casefold()
        local = e.partition("@")[0]
        if folded == e or (local and folded == local) or (e and e in folded):
            return PasswordCheck("The password must not be your email address. " + ACCEPTED, 0)
    context = user_inputs(email, name)
    result = zxcvbn(pw[:_ZXCVBN_MAX], user_inputs=context)
    score = int(result["score"])
    built_from_context = any(m.get("dictionary_name") == "user_inputs" for m in result.get("sequence", ()))
    if score >= MIN_SCORE:
        # zxcvbn scores "Ann-Smith-2024" as strong even knowing the name: what is left once the user's
        # words and the shop's are taken out must be strong on its own.
        rest = folded
        for word in sorted(context, key=len, reverse=True):
            if len(word) >= 3:
                rest = rest.replace(word, "")
        if rest == folded or (rest.strip() and zxcvbn(rest[:_ZXCVBN_MAX])["score"] >= MIN_SCORE):
            return PasswordCheck(None, score)
        result = zxcvbn(rest[:_ZXCVBN_MAX]) if rest.strip() else {"feedback": {}}
        score, built_from_context = min(score, MIN_SCORE - 1), True
    reasons: list[str] = []
    if built_from_context:
        reasons.append("It is built from your email, your name or the shop's name.")
    feedback = result.get("feedback") or {}
    if feedback.get("warning"):
        reasons.append(str(feedback["warning"]).rstrip(".") + ".")
    if not reasons:
        reasons.append("It would be guessed quickly.")
    hints = " ".join(str(s) for s in feedback.get("suggestions") or ())
    message = f"This password is too easy to guess: {' '.join(reasons)}"
    if hints:
        message += f" {hints}"
    return PasswordCheck(f"{message} {ACCEPTED}", score)


def check_password_policy(password: str, email: str | None = None, name: str | None = None) -> str | None:
    """None if ``password`` is acceptable, else a message saying why not and what would be accepted."""
    return assess_password(password, email, name).problem


def enforce_password_policy(
    password: str, email: str | None = None, field: str = "password", name: str | None = None
) -> None:
    """Raise a 422 :class:`ValidationProblem` naming ``field`` when the policy refuses ``password``."""
    message = check_password_policy(password, email, name)
    if message is not None:
        raise ValidationProblem.field(field, message)
