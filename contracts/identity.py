"""Identity's revocation announcements, published with ``session_id`` = :data:`IDENTITY_SESSION` (one stream, in
order) and heard by every process on a per-process broadcast subscription (``runtime.revocation``).

Wire format: the class name is the envelope type, the fields are the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

IDENTITY_SESSION = "identity"  # session id of the announcements: one stream, in order


@dataclass(frozen=True, slots=True)
class SigningKeyRevoked:
    kid: str
    revoked_at: datetime


@dataclass(frozen=True, slots=True)
class AccessRevoked:
    sub: str
    not_before: datetime  # tokens issued (iat) before this are refused
    until: datetime  # when the last such token expires anyway: the deny entry may go then
    reason: str  # "signed_out", "locked", "family_revoked", ...


ANNOUNCEMENTS: tuple[type, ...] = (SigningKeyRevoked, AccessRevoked)
