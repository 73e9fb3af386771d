"""In-process bus for the embedded mode and tests.

Every queue (a service queue or a topic subscription) is a :class:`bus.sessions.SessionScheduler`
shared by all its consumers: per-session FIFOs, the sessions ready to be handled, and the sessions held
by a worker, which gives "one handler call per session" across all consumers. Each consumer is a
:class:`bus.sessions.WorkerPool` of up to ``max_concurrent_sessions`` workers, spawned only while there
is ready work (in the consumer with the most free slots) and exiting when there is none.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from bus.base import (
    BROADCAST_ATTEMPTS,
    BROADCAST_RETRY_DELAY,
    BusError,
    DeadLetter,
    Handler,
    check_name,
    retry_then_drop,
    subscription_types,
)
from bus.deadletters import QUEUE, SUBSCRIPTION, check_kind, matches
from bus.envelope import Envelope, utc_now
from bus.sessions import SessionScheduler, WorkerPool, note_failure, run_handler
from bus.tracing import traced

__all__ = ["MemoryBus", "MemoryConsumer"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    envelope: Envelope  # as sent; per-delivery headers are added on each delivery
    deliveries: int = 0
    failures: int = 0


class _Queue(SessionScheduler[_Pending]):
    """A service queue or a topic subscription: its sessions, dead letters and counters."""

    def __init__(self, bus: MemoryBus, name: str, label: str, kind: str = QUEUE) -> None:
        super().__init__()
        self.bus = bus
        self.name = name
        self.label = label  # key in stats(); subscriptions and queues may share a name
        self.kind = kind  # QUEUE or SUBSCRIPTION
        self.consumers: list[MemoryConsumer] = []
        self.dead: list[DeadLetter] = []
        self.pending = 0
        self.in_flight = 0
        self.delivered = 0
        self.completed = 0

    def put_message(self, envelope: Envelope) -> None:
        self.pending += 1
        self.put(envelope.session_id, _Pending(envelope))

    def stats(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "in_flight": self.in_flight,
            "dead_letters": len(self.dead),
            "delivered": self.delivered,
            "completed": self.completed,
        }


class _BroadcastConsumer:
    """A broadcast subscription: stopping it removes the subscription, so nothing piles up for nobody."""

    def __init__(self, bus: MemoryBus, name: str, consumer: MemoryConsumer) -> None:
        self._bus, self._name, self._consumer = bus, name, consumer

    async def stop(self) -> None:
        self._bus._filters.pop(self._name, None)
        self._bus._subscriptions.pop(self._name, None)
        await self._consumer.stop()


class MemoryConsumer:
    """One consumer of one queue (a pool of workers on the queue's scheduler); stop() behaves like
    its process dying."""

    def __init__(self, queue: _Queue, handler: Handler, max_concurrent_sessions: int) -> None:
        self._queue = queue
        self._handler = traced(handler, "memory", queue.name)  # a CONSUMER span per delivery when tracing is on
        self._pool = WorkerPool(queue, self._turn, max_concurrent_sessions, f"bus:{queue.label}", self._crashed)
        self._stopped = False

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        queue = self._queue
        if self in queue.consumers:
            queue.consumers.remove(self)
        self._pool.detach()
        # A handler may stop its own consumer: don't cancel/await ourselves, the loop sees it stopped.
        tasks = self._pool.cancel(keep=asyncio.current_task())
        await asyncio.gather(*tasks, return_exceptions=True)
        queue.dispatch()  # sessions handed back (or left in ready) go to the remaining consumers

    def _crashed(self, exc: Exception) -> None:
        log.error("bus worker for %s crashed", self._queue.label, exc_info=exc)

    async def _turn(self, session: str) -> None:
        queue = self._queue
        bus = queue.bus
        item = queue.take(session)
        if item is None:
            queue.release(session, dispatch=False)
            return
        queue.pending -= 1
        item.deliveries += 1
        envelope = item.envelope.with_headers(**{"delivery-count": str(item.deliveries)})
        queue.in_flight += 1
        queue.delivered += 1
        try:
            failure = await run_handler(self._handler, envelope)
        except BaseException:
            # Stop/close (or interpreter exit) mid-message: unsettled, so it goes back to the head
            # of its session for the next consumer. Not a failed attempt: the handler never finished.
            queue.in_flight -= 1
            queue.hand_back(session, item)
            queue.pending += 1
            queue.release(session, dispatch=True)
            raise
        queue.in_flight -= 1
        if failure is not None:
            self._failed(session, item, failure)
            return
        queue.completed += 1
        queue.release(session, dispatch=False)
        bus._settled()

    def _failed(self, session: str, item: _Pending, exc: BaseException) -> None:
        queue = self._queue
        bus = queue.bus
        item.failures += 1
        dead, reason = note_failure(log, item.envelope, session, queue.label, item.failures, bus.max_attempts, exc)
        if dead:
            queue.dead.append(DeadLetter(queue.name, item.envelope, reason, item.failures, utc_now(), queue.kind))
            bus.dead_lettered[queue.name, queue.kind] += 1
            queue.release(session, dispatch=False)
            bus._settled()
            return
        queue.pending += 1
        queue.retry(session, item, bus.redelivery_delay)


class MemoryBus:
    """Bus for one process. Queues and subscriptions are durable for the life of the object."""

    name = "memory"

    def __init__(
        self, *, max_attempts: int = 5, max_concurrent_sessions: int = 64, redelivery_delay: float = 0.0
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_concurrent_sessions < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        if redelivery_delay < 0:
            raise ValueError("redelivery_delay must not be negative")
        self.max_attempts = max_attempts
        self.max_concurrent_sessions = max_concurrent_sessions
        self.redelivery_delay = redelivery_delay
        self.dead_lettered: Counter[tuple[str, str]] = Counter()  # (name, kind): messages dead-lettered (metrics)
        self._queues: dict[str, _Queue] = {}
        self._subscriptions: dict[str, _Queue] = {}
        self._filters: dict[str, frozenset[str]] = {}
        self._broadcasts = 0  # per-caller broadcast subscriptions made so far (their names)
        self.broadcast_attempts = BROADCAST_ATTEMPTS
        self.broadcast_retry_delay = BROADCAST_RETRY_DELAY
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # Idempotent, and allowed after close(): queued messages survive like on a durable broker.
        self._started = True
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        consumers: list[MemoryConsumer] = []
        for queue in self._all_queues():
            # Detach all first so messages handed back by one stopping consumer are not
            # dispatched to another that is about to stop too.
            for consumer in queue.consumers:
                consumer._pool.detach()
            consumers += queue.consumers
            queue.consumers = []
        await asyncio.gather(*(c.stop() for c in consumers))

    async def ping(self) -> None:
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("memory bus is closed")
        if not self._started:
            raise BusError("memory bus is not started")

    # -- producing ---------------------------------------------------------------------------

    async def send(self, queue: str, message: Envelope) -> None:
        self._check_open()
        check_name("queue", queue)
        self._queue(queue).put_message(_as_on_the_wire(message))

    async def publish(self, event: Envelope) -> None:
        self._check_open()
        copy = _as_on_the_wire(event)
        # Topic semantics: no matching subscription yet means nobody receives it.
        for name, types in self._filters.items():
            if copy.type in types:
                self._subscriptions[name].put_message(copy)

    # -- consuming ---------------------------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, max_concurrent_sessions: int | None = None
    ) -> MemoryConsumer:
        self._check_open()
        check_name("queue", queue)
        return self._attach(self._queue(queue), handler, max_concurrent_sessions)

    async def subscribe(
        self,
        subscription: str,
        event_types: Collection[str],
        handler: Handler,
        *,
        max_concurrent_sessions: int | None = None,
    ) -> MemoryConsumer:
        self._check_open()
        check_name("subscription", subscription)
        types = subscription_types(event_types)
        sub = self._subscriptions.get(subscription)
        if sub is None:
            sub = self._subscriptions[subscription] = _Queue(
                self, subscription, f"subscription:{subscription}", SUBSCRIPTION
            )
        # Like replacing an Azure subscription's rule: the latest subscriber's types win.
        self._filters[subscription] = types
        return self._attach(sub, handler, max_concurrent_sessions)

    async def broadcast(self, event_types: Collection[str], handler: Handler) -> _BroadcastConsumer:
        """Every caller gets every event of these types (one subscription per caller, gone when stopped).
        A failing handler is retried ``broadcast_attempts`` times with back-off, then the event is
        dropped (like every backend: see :func:`bus.base.retry_then_drop`), never dead-lettered."""
        self._check_open()
        self._broadcasts += 1
        name = f"broadcast-{self._broadcasts}"
        wrapped = retry_then_drop(handler, f"broadcast {name}", self.broadcast_attempts, self.broadcast_retry_delay)
        consumer = await self.subscribe(name, event_types, wrapped, max_concurrent_sessions=1)
        return _BroadcastConsumer(self, name, consumer)

    def _attach(self, queue: _Queue, handler: Handler, limit: int | None) -> MemoryConsumer:
        limit = self.max_concurrent_sessions if limit is None else limit
        if limit < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        consumer = MemoryConsumer(queue, handler, limit)
        queue.consumers.append(consumer)
        queue.dispatch()  # messages sent before this consumer joined
        return consumer

    # -- introspection -----------------------------------------------------------------------

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        found = [letter for q in self._dead_letter_sources(queue) for letter in q.dead]
        return sorted(found, key=lambda letter: letter.dead_lettered_at)

    async def dead_letter_count(self, queue: str, *, kind: str | None = None) -> int:
        check_kind(kind)
        return sum(len(q.dead) for q in self._dead_letter_sources(queue) if kind in (None, q.kind))

    async def dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        check_kind(kind)
        return next((letter for letter in await self.dead_letters(queue) if matches(letter, message_id, kind)), None)

    async def discard_dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        letter = await self.dead_letter(queue, message_id, kind=kind)  # the oldest, as shown
        if letter is None:
            return None
        for q in self._dead_letter_sources(queue):
            if any(found is letter for found in q.dead):
                q.dead[:] = [found for found in q.dead if found is not letter]
        return letter

    async def redeliver(self, kind: str, name: str, envelope: Envelope) -> None:
        """To that queue, or to that subscription alone (not a new publish to every subscriber)."""
        check_kind(kind)
        if kind == QUEUE:
            await self.send(name, envelope)
            return
        self._check_open()
        subscription = self._subscriptions.get(name)
        if subscription is None:
            raise BusError(f"memory bus: no subscription {name!r} to redeliver to")
        subscription.put_message(_as_on_the_wire(envelope))

    def _dead_letter_sources(self, name: str) -> list[_Queue]:
        return [q for q in (self._queues.get(name), self._subscriptions.get(name)) if q is not None]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per queue (subscriptions as ``subscription:<name>``): pending, in_flight, dead_letters,
        delivered (handler calls), completed."""
        return {q.label: q.stats() for q in self._all_queues()}

    async def wait_idle(self, timeout: float = 10, *, queues: Iterable[str] | None = None) -> None:
        """Wait until nothing is pending or in flight (on all queues, or just the named ones).

        A queue with messages but no consumer never becomes idle, so this then times out.
        """
        names = None if queues is None else set(queues)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while self._busy(names):
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._idle_waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise TimeoutError(f"memory bus not idle after {timeout}s: {self._busy(names)}") from None

    def _busy(self, names: set[str] | None) -> dict[str, dict[str, int]]:
        return {
            q.label: q.stats()
            for q in self._all_queues()
            if (q.pending or q.in_flight) and (names is None or q.name in names or q.label in names)
        }

    def _settled(self) -> None:
        # Only a settled message can make the bus idle, so that is the one place to wake waiters.
        if self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(self, name, name)
        return queue

    def _all_queues(self) -> list[_Queue]:
        return [*self._queues.values(), *self._subscriptions.values()]


def _as_on_the_wire(message: Envelope) -> Envelope:
    """Round-trip through the codec so handlers see exactly what a real broker would deliver.

    Catches non-JSON bodies early and isolates the receiver from later mutation by the sender.
    """
    if not isinstance(message, Envelope):
        raise TypeError(f"expected an Envelope, got {type(message).__name__}")
    return Envelope.decode(message.encode())
