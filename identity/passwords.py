"""Password hashing (argon2id) and the password policy.

Parameters are settings (``ECOM_AUTH_ARGON2_MEMORY_KIB`` / ``_TIME_COST`` / ``_PARALLELISM``, see
:class:`config.settings.AuthSettings`, which refuses anything weaker than OWASP's table). The default is OWASP's
first option, argon2id m=19 MiB, t=2, p=1 (16-byte salt, 32-byte tag): ~22 ms of CPU per hash or verify, so one
core grants ≥ 15 password sign-ins a second (Keycloak's published sizing figure) with room for the rest of
the grant (``python -m bench.identity``). The previous default, RFC 9106's low-memory profile (64 MiB, t=3,
p=4), cost ~160 ms of CPU: ~6 sign-ins a second per core. Hashes record their parameters, so a change of
setting takes effect for each user at their next successful sign-in (:meth:`Passwords.needs_rehash`).

Hashing never runs on the event loop: a dedicated pool of ``workers`` threads does it (argon2-cffi releases
the GIL), at a lower CPU priority than the event loop (Linux: the threads are niced), so token refreshes and
verification keep their latency while sign-ins queue. At most ``queue`` jobs wait for a thread; one more is
refused with :class:`PasswordsBusy` (503 + Retry-After) before any work is done, so a sign-in flood costs
memory and latency of a bounded queue, not an unbounded one.

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
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, TypeVar

from argon2 import Parameters as Argon2Parameters
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn

from runtime.errors import ServiceUnavailable, ValidationProblem

if TYPE_CHECKING:
    from config.settings import AuthSettings

T = TypeVar("T")

__all__ = [
    "DEFAULT_PARAMETERS",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "Argon2Parameters",
    "PasswordCheck",
    "Passwords",
    "PasswordsBusy",
    "assess_password",
    "check_password_policy",
    "enforce_password_policy",
    "hash_password",
    "hash_password_sync",
    "needs_rehash",
    "verify_password",
    "verify_password_sync",
]

# OWASP's first argon2id option; the same as AuthSettings' defaults (the settings are what services use).
DEFAULT_PARAMETERS: Argon2Parameters = Argon2Parameters(
    type=Type.ID,
    version=19,
    salt_len=16,
    hash_len=32,
    time_cost=2,
    memory_cost=19 * 1024,
    parallelism=1,
)
DEFAULT_QUEUE = 64
# The worker threads' niceness above the event loop's: the loop (refreshes, verification) wins the CPU when both
# want it; argon2 still gets every cycle the loop leaves.
WORKER_NICENESS = 10

MIN_PASSWORD_LENGTH = 8  # NIST SP 800-63B: at least 8; strength is judged by zxcvbn, not by length alone
MAX_PASSWORD_LENGTH = 1024  # argon2 is fine with long input; this only stops absurd request bodies


def _normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


class PasswordsBusy(ServiceUnavailable):
    """Every argon2 thread is busy and the queue is full: the sign-in is refused before any work (503)."""


def _lower_priority() -> None:
    """Thread initializer of the argon2 pool: nice this thread (Linux threads carry their own niceness)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: same priority as the loop, still off it


class Passwords:
    """An argon2id hasher with a bounded worker pool and a bounded queue. Use the module functions for the default
    instance. Invariant: at most ``max_workers`` hashes run at once and at most ``max_workers + queue`` are
    admitted (running or waiting); :meth:`hash` and :meth:`verify` raise :class:`PasswordsBusy` beyond that."""

    def __init__(
        self,
        parameters: Argon2Parameters = DEFAULT_PARAMETERS,
        *,
        max_workers: int | None = None,
        queue: int = DEFAULT_QUEUE,
    ) -> None:
        if parameters.type is not Type.ID:
            raise ValueError("only argon2id is allowed")
        self.parameters = parameters
        self.hasher = PasswordHasher.from_parameters(parameters)
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.queue = queue
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the pool and the counters (never held for long)
        self._dummy_lock = threading.Lock()  # guards the dummy hash (held for one hash, in a worker thread)
        self._dummy: str | None = None
        self._admitted = 0  # jobs submitted and not finished (running or waiting), counted until the thread is done
        self._seconds = 0.05  # moving average of one job's duration, for Retry-After
        self.refused = 0

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> Passwords:
        """The hasher a service uses: the argon2id parameters and pool sizes of ``[auth]``."""
        parameters = Argon2Parameters(
            type=Type.ID,
            version=19,
            salt_len=16,
            hash_len=32,
            time_cost=auth.argon2_time_cost,
            memory_cost=auth.argon2_memory_kib,
            parallelism=auth.argon2_parallelism,
        )
        return cls(parameters, max_workers=auth.password_workers or None, queue=auth.password_queue)

    @property
    def admitted(self) -> int:
        """Hash jobs running or waiting for a thread now."""
        return self._admitted

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

    def _timed(self, job: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return job()
        finally:
            took = time.perf_counter() - start
            with self._lock:
                self._admitted -= 1
                self._seconds += (took - self._seconds) * 0.2

    def admit(self) -> None:
        """Raise :class:`PasswordsBusy` now if a hash job would be refused: the cheap check at the door, before a
        sign-in costs a database query and a login actor (the job's own admission in :meth:`_submit` stays the
        rule; this only refuses earlier what it would refuse)."""
        if self._admitted >= self.max_workers + self.queue:
            self._refuse()

    def _refuse(self) -> NoReturn:
        self.refused += 1
        wait = (self._admitted / self.max_workers) * self._seconds
        raise PasswordsBusy("Too many sign-ins are being checked right now; retry shortly.", retry_after=max(1.0, wait))

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Admit ``job`` or raise :class:`PasswordsBusy`. The count drops when the thread finishes, not when the
        caller stops waiting: a cancelled sign-in still occupies its thread until argon2 returns."""
        with self._lock:
            if self._admitted >= self.max_workers + self.queue:
                self._refuse()
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix="argon2", initializer=_lower_priority
                )
            self._admitted += 1
            try:
                future = self._pool.submit(self._timed, job)
            except RuntimeError:  # shut down
                self._admitted -= 1
                raise ServiceUnavailable("the service is shutting down", retry_after=1) from None
        return asyncio.wrap_future(future)

    async def hash(self, password: str) -> str:
        return await self._submit(lambda: self.hash_sync(password))

    async def verify(self, password: str, stored_hash: str | None) -> bool:
        return await self._submit(lambda: self.verify_sync(password, stored_hash))

    async def warm_up(self) -> None:
        """Compute the dummy hash ahead of the first unknown-user login (call at start-up)."""
        await self._submit(self._dummy_hash)

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
