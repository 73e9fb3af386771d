"""The Bus protocol every backend (memory, rabbitmq, azure) implements, and its error types.

Handler contract, shared by all backends (tests/bus_contract.py checks it):

- the handler returns normally -> the message is completed and never delivered again;
- the handler raises -> the message is abandoned and redelivered (same ``message_id``; the
  ``delivery-count`` header, when a backend sets it, says which delivery this is);
- after ``max_attempts`` failed deliveries it is dead-lettered with the last error as the reason,
  never dropped silently;
- per ``session_id``: strict FIFO and one handler call at a time across all consumers of a queue;
  a failed message blocks the session's later messages until it is redelivered or dead-lettered;
- different sessions run concurrently, up to ``max_concurrent_sessions`` per consumer.

Delivery is at-least-once: consumers dedupe on ``message_id`` (the inbox table), not the bus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    # Only for annotations: bus.envelope imports MalformedMessage from here, so a runtime import
    # would be circular. ``bus`` re-exports both, so callers never notice.
    from bus.envelope import Envelope

__all__ = ["Bus", "BusError", "Consumer", "DeadLetter", "Handler", "MalformedMessage", "retry_then_drop"]

log = logging.getLogger(__name__)

Handler = Callable[["Envelope"], Awaitable[None]]


class BusError(Exception):
    """The bus cannot do what was asked (not started, closed, broker unreachable...)."""


class MalformedMessage(BusError, ValueError):
    """Bytes that are not a valid encoded Envelope; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    queue: str  # queue or subscription name the message was dead-lettered from
    envelope: Envelope  # the message as it was sent (without per-delivery headers)
    reason: str  # "<ErrorType>: <error text>" of the last failed delivery
    attempts: int  # failed deliveries before it was given up
    dead_lettered_at: str  # RFC 3339 UTC
    kind: str = "queue"  # "queue" or "subscription": which of the two named ``queue`` it came from


@runtime_checkable
class Consumer(Protocol):
    async def stop(self) -> None:
        """Stop taking messages, like the process dying: unsettled ones go to other consumers."""
        ...


@runtime_checkable
class Bus(Protocol):
    name: str  # "memory", "rabbitmq", "azure"

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Stop all consumers; in-flight handlers finish or are cancelled; unsettled messages stay."""
        ...

    async def send(self, queue: str, message: Envelope) -> None:
        """Point-to-point to a service queue ("order", "catalog", ...)."""
        ...

    async def publish(self, event: Envelope) -> None:
        """Fan out to every subscription whose event types include ``event.type``."""
        ...

    async def consume(
        self, queue: str, handler: Handler, *, max_concurrent_sessions: int | None = None
    ) -> Consumer: ...

    async def subscribe(
        self,
        subscription: str,
        event_types: Collection[str],
        handler: Handler,
        *,
        max_concurrent_sessions: int | None = None,
    ) -> Consumer:
        """``subscription`` is the subscribing service's name; it is durable once made."""
        ...

    async def broadcast(self, event_types: Collection[str], handler: Handler) -> Consumer:
        """Every process that calls this gets every published event of these types (``subscribe`` gives
        each event to ONE instance of a service). Not durable: the subscription lives as long as the
        consumer; for announcements every process must hear, such as revocations."""
        ...

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        """Dead letters of the queue and/or subscription with that name, oldest first."""
        ...

    async def ping(self) -> None:
        """Raise BusError when the bus is not usable (used by /health/ready)."""
        ...


def check_name(kind: str, name: str) -> None:
    """Queue, subscription and event-type names: non-empty strings (backends may require more)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string")


def subscription_types(event_types: Collection[str]) -> frozenset[str]:
    """The event types of a subscription, checked the same way by every backend."""
    if isinstance(event_types, str):  # a bare str would subscribe to its characters
        raise TypeError("event_types must be a collection of type names, not a str")
    types = frozenset(event_types)
    if not types:
        raise ValueError("event_types must not be empty")
    return types


BROADCAST_ATTEMPTS = 4  # handler calls per broadcast event before it is dropped with a warning
BROADCAST_RETRY_DELAY = 0.2  # seconds before the first retry, doubled per retry...
BROADCAST_MAX_RETRY_DELAY = 5.0  # ...up to this


def retry_then_drop(handler: Handler, label: str, attempts: int, first_delay: float) -> Handler:
    """``handler`` for a broadcast stream (every backend's ``broadcast``): a failure is retried in place
    (holding the stream, so order holds) after ``first_delay`` seconds, doubling up to
    BROADCAST_MAX_RETRY_DELAY; after ``attempts`` failed calls the event is dropped with a warning.
    Announcements are idempotent and nobody could act on a dead letter of a per-process queue or
    subscription (it goes with the process), so the stream goes on instead of stalling."""

    async def handle(envelope: Envelope) -> None:
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                await handler(envelope)
                return
            except Exception as exc:  # logged; the stream must go on
                reason = f"{type(exc).__name__}: {exc}"
                if attempt >= attempts:
                    log.warning(
                        "%s: dropping %s %s after %d failed attempts: %s",
                        label, envelope.type, envelope.message_id, attempt, reason, exc_info=exc,
                    )  # fmt: skip
                    return
                log.warning(
                    "%s: %s %s failed (attempt %d of %d), retrying in %.2fs: %s",
                    label, envelope.type, envelope.message_id, attempt, attempts, delay, reason,
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, BROADCAST_MAX_RETRY_DELAY)

    return handle
