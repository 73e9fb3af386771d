"""Revocation announcements: identity tells every verifier (gateway and every service instance) at once.

Access tokens are stateless and cached by every verifier until they expire, so ending access early needs a
message. Identity publishes these events in the same transaction as the change (through its outbox); every
process receives every one of them on a per-process broadcast subscription (:meth:`bus.base.Bus.broadcast`)
and applies it to its :class:`runtime.auth.TokenVerifier`. The events are bus contracts (:mod:`contracts.identity`):

- :class:`SigningKeyRevoked`: the key is dropped and every cached verification made with it; a JWKS fetched
  later cannot bring it back.
- :class:`AccessRevoked`: the subject's tokens issued before ``not_before`` are refused until ``until`` (the
  expiry of the last of them): sign-out, account lock, a revoked refresh-token family. A short-lived deny list.

Guarantee: from identity's commit, a verifier in a running process refuses the tokens within the outbox
relay's latency plus one bus hop (about a second; the relay is woken at once). A process that starts later
builds its keys from the current JWKS (so revoked keys are gone) but does not learn of subject revocations
made before it started; those end at the tokens' expiry (at most the access-token lifetime).
"""

from __future__ import annotations

import logging
from typing import Any

from bus.envelope import Envelope
from contracts.identity import IDENTITY_SESSION, AccessRevoked, SigningKeyRevoked
from runtime.messages import envelope, from_body

log = logging.getLogger(__name__)

__all__ = [
    "EVENTS",
    "EVENT_TYPES",
    "IDENTITY_SESSION",
    "AccessRevoked",
    "SigningKeyRevoked",
    "announcement",
    "apply",
    "listen",
]

EVENTS: tuple[type, ...] = (SigningKeyRevoked, AccessRevoked)
EVENT_TYPES: tuple[str, ...] = tuple(cls.__name__ for cls in EVENTS)


def announcement(event: SigningKeyRevoked | AccessRevoked) -> Envelope:
    """The envelope identity publishes (``turn.publish`` or an outbox row written in its own transaction)."""
    return envelope(event, session_id=IDENTITY_SESSION)


def apply(verifier: Any, env: Envelope) -> None:
    """Apply one announcement to a :class:`runtime.auth.TokenVerifier`."""
    if env.type == SigningKeyRevoked.__name__:
        key = from_body(SigningKeyRevoked, env.body)
        dropped = verifier.revoke_key(key.kid)
        log.warning("signing key %s revoked: %d cached verifications dropped", key.kid, dropped)
    elif env.type == AccessRevoked.__name__:
        access = from_body(AccessRevoked, env.body)
        dropped = verifier.deny_subject(access.sub, access.not_before.timestamp(), access.until.timestamp())
        log.info("access of %s revoked (%s): %d cached verifications dropped", access.sub, access.reason, dropped)


async def listen(bus: Any, verifier: Any) -> Any:
    """Subscribe this process to every announcement; returns the consumer (stop it on shutdown)."""

    async def handle(env: Envelope) -> None:
        apply(verifier, env)

    return await bus.broadcast(EVENT_TYPES, handle)
