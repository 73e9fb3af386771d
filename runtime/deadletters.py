"""Dead-letter administration for one service: list, show, replay, discard (admin API and ``ecom``).

A service's dead letters are those of the bus queues and subscriptions it consumes, named as in
:mod:`contracts.queues` after the service (``order``: the ``order`` queue; ``cart``: the ``cart``
subscription). The bus side is :mod:`bus.deadletters`; this module adds what needs the service's database:

- **replay**: the dead letter's envelope is written to the service's outbox as a ``replay`` row (original
  ``message_id``, addressed to the queue or subscription it came from) together with an audit entry, in one
  transaction; only after that commit is it removed from the dead-letter queue, and the relay sends it
  (``redeliver``). A crash in between leaves the message both replayed and listed, never lost; a second
  copy is dropped by the consumer's inbox, which is also what protects a message that had in fact been
  applied before it was dead-lettered.
- **discard**: the audit entry is inserted in a transaction that commits only once the broker confirmed the
  removal (a failed removal leaves no entry).

Every change is recorded by :mod:`runtime.audit` with who made it (:class:`Operator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bus.base import BusError, DeadLetter
from bus.deadletters import QUEUE, SUBSCRIPTION
from runtime import audit
from runtime.errors import Conflict, NotFound, ServiceUnavailable
from runtime.outbox import ReplayPending, enqueue_replay

__all__ = ["DeadLetterAdmin", "Operator", "letter_json", "letter_summary", "service_sources"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Operator:
    """Who acts: ``name`` as it goes into the audit log, ``via`` ``"api"`` or ``"cli"``."""

    name: str
    via: str


def service_sources(service: str) -> list[tuple[str, str]]:
    """(name, kind) of the queues and subscriptions ``service`` consumes, as its description declares."""
    from runtime import services  # lazily: the registry imports the services, which import this module's users

    loaded = services.load(service) if service in services.SERVICE_MODULES else None
    if loaded is None:
        return []
    described = loaded.description
    return [(q.name, QUEUE) for q in described.queues] + [(s.name, SUBSCRIPTION) for s in described.subscriptions]


def letter_summary(letter: DeadLetter) -> dict[str, Any]:
    envelope = letter.envelope
    return {
        "message_id": envelope.message_id,
        "queue": letter.queue,
        "kind": letter.kind,
        "type": envelope.type,
        "session_id": envelope.session_id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "dead_lettered_at": letter.dead_lettered_at,
    }


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    envelope = letter.envelope
    return {
        **letter_summary(letter),
        "correlation_id": envelope.correlation_id,
        "created_at": envelope.created_at,
        "headers": dict(envelope.headers),
        "body": dict(envelope.body),
    }


class DeadLetterAdmin:
    """The operations on one service's dead letters, over its bus and database."""

    def __init__(self, service: str, engine: AsyncEngine, bus: Any, *, relay: Any = None) -> None:
        self.service = service
        self.engine = engine
        self.bus = bus
        self.relay = relay  # notified after a replay so the row goes out at once (else: its next poll)
        self.sources = service_sources(service)

    def _check_queue(self, queue: str) -> None:
        if queue not in {name for name, _ in self.sources}:
            names = ", ".join(sorted({name for name, _ in self.sources})) or "none"
            raise NotFound(f"the {self.service} service consumes no queue or subscription {queue!r} (its own: {names})")

    async def _bus_call(self, what: str, call: Any) -> Any:
        try:
            return await call
        except BusError as exc:
            raise ServiceUnavailable(f"cannot {what}: the bus is not reachable: {exc}", retry_after=5) from exc

    async def summary(self) -> list[dict[str, Any]]:
        """Per queue/subscription of the service: how many dead letters it holds."""
        out: list[dict[str, Any]] = []
        for name, kind in self.sources:
            count = await self._bus_call("count dead letters", self.bus.dead_letter_count(name, kind=kind))
            out.append({"queue": name, "kind": kind, "count": count})
        return out

    async def list(self, queue: str) -> list[DeadLetter]:
        self._check_queue(queue)
        letters: list[DeadLetter] = await self._bus_call("read dead letters", self.bus.dead_letters(queue))
        return letters

    async def show(self, queue: str, message_id: str) -> DeadLetter:
        self._check_queue(queue)
        letter: DeadLetter | None = await self._bus_call("read dead letters", self.bus.dead_letter(queue, message_id))
        if letter is None:
            raise NotFound(f"no dead letter with message id {message_id!r} in {queue!r}")
        return letter

    async def replay(self, queue: str, message_id: str, operator: Operator) -> dict[str, Any]:
        """Through the outbox, keeping the message id; recorded. See the module docstring for the order."""
        letter = await self.show(queue, message_id)
        target = f"{letter.kind}:{letter.queue}/{message_id}"
        try:
            async with self.engine.begin() as conn:
                outbox_id = await enqueue_replay(conn, letter)
                await audit.record(
                    conn,
                    actor=operator.name,
                    via=operator.via,
                    action="dead-letter.replay",
                    target=target,
                    details={**letter_summary(letter), "outbox_id": outbox_id},
                )
        except ReplayPending as exc:
            raise Conflict(f"{exc}; it was not replayed again") from None
        removed = True
        try:
            gone = await self.bus.discard_dead_letter(queue, message_id, kind=letter.kind)
            removed = gone is not None
        except BusError as exc:
            # Replayed all the same (the outbox row is committed): it stays listed until discarded.
            log.warning("dead letter %s replayed but not removed from %s: %s", message_id, target, exc)
            removed = False
        if self.relay is not None:
            self.relay.notify()
        log.info("dead letter %s replayed by %s (%s)", target, operator.name, operator.via)
        return {
            "status": "replayed",
            **letter_summary(letter),
            "outbox_id": outbox_id,
            "dead_letter_removed": removed,
        }

    async def discard(self, queue: str, message_id: str, operator: Operator) -> DeadLetter:
        letter = await self.show(queue, message_id)
        target = f"{letter.kind}:{letter.queue}/{message_id}"
        async with self.engine.begin() as conn:
            # The entry is written first and committed only once the broker confirmed the removal: a failed
            # removal leaves no entry, and no removal goes unrecorded because the database refused the entry.
            await audit.record(
                conn,
                actor=operator.name,
                via=operator.via,
                action="dead-letter.discard",
                target=target,
                details=letter_summary(letter),
            )
            gone: DeadLetter | None = await self._bus_call(
                "discard the dead letter", self.bus.discard_dead_letter(queue, message_id, kind=letter.kind)
            )
            if gone is None:
                raise NotFound(f"no dead letter with message id {message_id!r} in {queue!r} (removed meanwhile?)")
        log.info("dead letter %s discarded by %s (%s)", target, operator.name, operator.via)
        return gone
