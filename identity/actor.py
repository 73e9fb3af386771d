"""The login throttle: one :class:`LoginActor` per normalised email address.

Why an actor per *email* rather than per user id: the actor exists whether or not an account has the email,
so an address without an account goes through exactly the same steps as one with an account — one user
lookup, one argon2id verification (against a dummy hash when there is no account), the same counter writes
and the same lock-out. Neither the error, nor its timing, nor the lock-out behaviour tells an attacker which
emails are registered.

Why an actor at all: its turns run one at a time, so a burst of parallel guesses against one account is
checked one by one and each guess sees the counter the previous one left. Without it, a hundred concurrent
requests would all be verified before the first failure was counted.

Lock-out with back-off (``settings.auth``): after ``lockout_after`` consecutive failures the email is locked
for ``lockout_seconds``; every further failure after a lock expires locks it for twice as long as the one
before, up to :data:`MAX_LOCKOUT_SECONDS`. Attempts while locked are refused unchecked (no argon2 work, not
counted: a locked account costs the server nothing and an attacker cannot extend the lock). A successful
sign-in resets the count; failures are forgotten :data:`FORGET_FAILURES_AFTER` seconds after the last one.

A password that is right but fails today's policy (:mod:`identity.passwords`: set before it, e.g. by an
older version) still signs in; the account is flagged ``password_change_required`` until it is changed. A hash
made with other argon2id parameters than today's settings is re-made at the sign-in, in the same turn and the
same statement as the flag.

State (persisted after every turn that changes it): ``failures``, ``last_failure``, ``locked_until``
(UNIX seconds). A successful sign-in of an email without failures writes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from identity.messages import Attempt, LoginOutcome
from identity.passwords import Passwords, check_password_policy
from identity.repository import Repository, User
from runtime.actors import Actor, ActorRef, ActorSystem, Turn, handles
from runtime.store import utcnow

# The back-off stops doubling here: an attacker can lock a victim out for an hour at most.
MAX_LOCKOUT_SECONDS = 3600.0
FORGET_FAILURES_AFTER = 24 * 3600.0  # a day without failures starts the count afresh


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    lockout_after: int = 5
    lockout_seconds: float = 30.0
    max_lockout_seconds: float = MAX_LOCKOUT_SECONDS
    forget_after: float = FORGET_FAILURES_AFTER

    def lock_for(self, failures: int) -> float:
        """Seconds of lock-out after ``failures`` consecutive failures (0: not locked)."""
        if failures < self.lockout_after:
            return 0.0
        doublings = min(failures - self.lockout_after, 32)  # 2**32 x anything exceeds the cap: no float overflow
        return min(self.max_lockout_seconds, self.lockout_seconds * 2.0**doublings)

    @property
    def state_lifetime(self) -> float:
        """After this long untouched, a login state is equivalent to the initial one (safe to delete)."""
        return self.forget_after + self.max_lockout_seconds


@dataclass(slots=True)
class LoginContext:
    """What login actors need: the :class:`LoginActor`'s injected dependency (the service description registers
    it as ``ActorType(LoginActor, deps=...)``, :mod:`runtime.description`)."""

    repo: Repository
    passwords: Passwords
    policy: LoginPolicy
    clock: Callable[[], float] = time.time


def login_ref(system: ActorSystem, email: str) -> ActorRef:
    """The login actor of a normalised email (its id is a digest: ids show in admin views and keys)."""
    return system.ref(LoginActor, hashlib.sha256(email.encode("utf-8")).hexdigest())


async def login(system: ActorSystem, email: str, password: str, passwords: Passwords | None = None) -> LoginOutcome:
    """Check credentials through the login throttle of ``email`` (already normalised). While the hashing queue of
    ``passwords`` (the login actors' hasher) is full the attempt is refused here (503 + Retry-After), before it
    costs a user lookup and a login actor."""
    if passwords is not None:
        passwords.admit()
    return await login_ref(system, email).ask(Attempt(email, password))


_INITIAL: dict[str, Any] = {"failures": 0, "last_failure": 0.0, "locked_until": 0.0}


class LoginActor(Actor):
    type_name = "login"

    def __init__(self, actor_id: str, system: ActorSystem, *, context: LoginContext) -> None:
        self.context = context
        super().__init__(actor_id, system)

    def initial_state(self) -> dict[str, Any]:
        return dict(_INITIAL)

    @handles(Attempt)
    async def attempt(self, msg: Attempt, turn: Turn) -> LoginOutcome:
        ctx = self.context
        now = ctx.clock()
        locked_until = float(self.state["locked_until"])
        if now < locked_until:
            return LoginOutcome(None, locked_for=locked_until - now)
        user = await ctx.repo.user_by_email(msg.email)
        # One full verification in every case: a missing account is checked against a dummy hash.
        ok = await ctx.passwords.verify(msg.password, user.password_hash if user is not None else None)
        if ok and user is not None and not user.disabled:
            if self.state != _INITIAL:
                self.state = dict(_INITIAL)
            return LoginOutcome(await self._after_sign_in(ctx, user, msg.password))
        # A disabled account counts like a wrong password: the same answer and the same counting.
        return LoginOutcome(None, locked_for=self._count_failure(ctx.policy, now))

    def _count_failure(self, policy: LoginPolicy, now: float) -> float:
        failures = int(self.state["failures"])
        if now - float(self.state["last_failure"]) > policy.forget_after:
            failures = 0
        failures += 1
        lock = policy.lock_for(failures)
        self.state = {"failures": failures, "last_failure": now, "locked_until": now + lock if lock else 0.0}
        return lock

    @staticmethod
    async def _after_sign_in(ctx: LoginContext, user: User, password: str) -> User:
        """What a successful check changes on the account, written in one statement in this turn:

        - the hash, re-made with today's argon2id parameters when it records other ones (the hash is replaced
          only if it is still the one just verified, so a password changed meanwhile is never overwritten with
          the old one). Hashing happens before anything is written: a busy pool (503) leaves all unchanged.
        - ``password_change_required``: a password set before today's policy (or by an older one) keeps working,
          but when it fails the policy the account is flagged (shown in the token response and userinfo) until
          it is changed. zxcvbn takes milliseconds: it runs off the event loop.
        """
        weak = await asyncio.to_thread(check_password_policy, password, user.email, user.name) is not None
        if ctx.passwords.needs_rehash(user.password_hash):
            new_hash = await ctx.passwords.hash(password)
            if await ctx.repo.rehash_password(
                user.id, utcnow(), user.password_hash, new_hash, password_change_required=weak
            ):
                return dataclasses.replace(user, password_hash=new_hash, password_change_required=weak)
            return user  # changed meanwhile: the new password's hash and flag stand
        if weak != user.password_change_required:
            await ctx.repo.update_user(user.id, utcnow(), password_change_required=weak)
            user = dataclasses.replace(user, password_change_required=weak)
        return user
