"""Dead letters: look at, discard and redeliver what a queue or subscription gave up on.

Every backend dead-letters a message after ``max_attempts`` failed deliveries (bus/base.py), and the broker
does too when consumers keep dying before settling one. :class:`DeadLetters` is what each bus offers on top
of ``Bus.dead_letters(queue)`` (the list) so that an operator can act on them:

- ``dead_letter_count(queue)``: how many there are (what metrics and the admin summary show);
- ``dead_letter(queue, message_id)``: one dead letter, by the envelope's ``message_id`` (None: not there);
- ``discard_dead_letter(queue, message_id)``: remove it from the dead-letter queue and return it (None: not
  there, e.g. already discarded or replayed by someone else);
- ``redeliver(kind, name, envelope)``: put the envelope on exactly that queue or that subscription, keeping
  its ``message_id`` (a subscription gets it alone: it is not published to every subscriber again).

A ``queue`` name stands for the queue *and* the subscription of that name, as in ``Bus.dead_letters``;
``kind`` (``"queue"`` or ``"subscription"``) narrows it. Messages are matched by the envelope's
``message_id``; when several dead letters share one (a message dead-lettered, replayed and dead-lettered
again before the first was removed), the oldest is the one shown and discarded.

Replaying is not a bus operation: :mod:`runtime.deadletters` writes the envelope to the service's outbox
(``kind = "replay"``, destination :func:`replay_destination`) and the audit log in one transaction, and only
then discards the dead letter; the outbox relay calls ``redeliver``. So a crash never loses the message (at
worst it is replayed and still listed, and the consumer's inbox drops the second copy).

Per backend: memory keeps dead letters in a list per queue; RabbitMQ reads the ``<queue>.dlq`` quorum queue
(``basic.get`` without ack, acking only the one discarded); Azure Service Bus peeks the ``$DeadLetterQueue``
subqueue and discards by receiving in peek-lock mode, completing the one and abandoning the others.

Every bus also counts what its own consumers dead-lettered, in ``bus.dead_lettered[(name, kind)]`` (a
``collections.Counter``, bumped at the one place each backend dead-letters; exported as
``bus_dead_lettered_total`` by runtime/web/metrics.py). The broker's own dead-lettering is not in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from bus.base import DeadLetter
    from bus.envelope import Envelope

__all__ = ["KINDS", "QUEUE", "SUBSCRIPTION", "DeadLetters", "parse_replay_destination", "replay_destination"]

QUEUE, SUBSCRIPTION = "queue", "subscription"
KINDS = (QUEUE, SUBSCRIPTION)


@runtime_checkable
class DeadLetters(Protocol):
    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        """Dead letters of the queue and/or subscription with that name, oldest first."""
        ...

    async def dead_letter_count(self, queue: str, *, kind: str | None = None) -> int:
        """How many ``dead_letters(queue)`` holds (of that kind), without reading them where the broker can
        say (RabbitMQ: a read returns every message to its DLQ, which counts against a delivery limit)."""
        ...

    async def dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None: ...

    async def discard_dead_letter(
        self, queue: str, message_id: str, *, kind: str | None = None
    ) -> DeadLetter | None: ...

    async def redeliver(self, kind: str, name: str, envelope: Envelope) -> None: ...


def check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def matches(letter: DeadLetter, message_id: str, kind: str | None) -> bool:
    return letter.envelope.message_id == message_id and (kind is None or letter.kind == kind)


def replay_destination(letter: DeadLetter) -> str:
    """The outbox ``destination`` of a replayed dead letter: ``"<kind>:<name>"``."""
    return f"{letter.kind}:{letter.queue}"


def parse_replay_destination(destination: str) -> tuple[str, str]:
    kind, sep, name = destination.partition(":")
    if not sep or kind not in KINDS or not name:
        raise ValueError(f"not a replay destination: {destination!r} (expected queue:<name> or subscription:<name>)")
    return kind, name
