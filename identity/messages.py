"""Messages of identity's actors (in-process only: they never travel on the bus).

:class:`Attempt` goes to the :class:`identity.actor.LoginActor` of one normalised email address; the reply is
a :class:`LoginOutcome`.

:class:`RegistrationAttempted` is the one event identity publishes about accounts (through its outbox): someone
tried to register an email that already has an account. The registration answer does not say so (it reads the
same either way); a mailer subscribed to this event tells the owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # identity.repository imports this module (RegistrationAttempted)
    from identity.repository import User


@dataclass(frozen=True, slots=True)
class Attempt:
    """Check ``password`` for the account with this normalised ``email`` (which may not exist)."""

    email: str
    password: str = field(repr=False)  # never in a log line or an admin view


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """``user`` when the credentials are right and the account may sign in, else None.

    ``locked_for`` is how many seconds further attempts for this email are refused without being checked
    (0 when not locked). It is the same for an email with no account, so it reveals nothing about accounts.
    """

    user: User | None
    locked_for: float = 0.0

    @property
    def ok(self) -> bool:
        return self.user is not None


@dataclass(frozen=True, slots=True)
class RegistrationAttempted:
    """A registration was attempted with the email of the existing account ``user_id`` (nothing was created)."""

    user_id: str
    email: str
    attempted_at: datetime
