"""In-process bus for the embedded mode and tests.

Layout per queue (a service queue or a topic subscription):

- ``sessions``: session id -> deque of pending messages; an entry exists only while the session has
  messages or is held, so idle sessions cost nothing;
- ``ready``: FIFO of sessions that have messages and are not held by anyone;
- ``held``: sessions that are in ``ready`` or being handled / waiting for redelivery. A session is
  held by at most one worker, which gives "one handler call per session" across all consumers.

Workers are tasks of a consumer, spawned only while there is ready work (up to the consumer's
``max_concurrent_sessions``) and exiting when ``ready`` runs dry: no polling, no idle tasks. A worker
handles one message of a session, then puts the session at the back of ``ready`` so long sessions
cannot starve others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from bus.base import BusError, DeadLetter, Handler, check_name, subscription_types
from bus.envelope import Envelope, utc_now

__all__ = ["MemoryBus", "MemoryConsumer"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    envelope: Envelope  # as sent; per-delivery headers are added on each delivery
    deliveries: int = 0
    failures: int = 0


class _Queue:
    __slots__ = (
        "bus", "name", "label", "sessions", "ready", "held", "consumers", "dead",
        "pending", "in_flight", "delivered", "completed",
    )  # fmt: skip

    def __init__(self, bus: MemoryBus, name: str, label: str) -> None:
        self.bus = bus
        self.name = name
        self.label = label  # key in stats(); subscriptions and queues may share a name
        self.sessions: dict[str, deque[_Pending]] = {}
        self.ready: deque[str] = deque()
        self.held: set[str] = set()
        self.consumers: list[MemoryConsumer] = []
        self.dead: list[DeadLetter] = []
        self.pending = 0
        self.in_flight = 0
        self.delivered = 0
        self.completed = 0

    def put(self, envelope: Envelope) -> None:
        queue = self.sessions.get(envelope.session_id)
        if queue is None:
            queue = self.sessions[envelope.session_id] = deque()
        queue.append(_Pending(envelope))
        self.pending += 1
        if envelope.session_id not in self.held:
            self.held.add(envelope.session_id)
            self.ready.append(envelope.session_id)
            self.dispatch()

    def release(self, session: str, *, dispatch: bool) -> None:
        """Un-hold a session; it goes back to ``ready`` if it still has messages.

        A worker that keeps looping passes ``dispatch=False``: it will take from ``ready`` itself,
        and waking another worker for the same item would only churn tasks.
        """
        if self.sessions.get(session):
            self.ready.append(session)
            if dispatch:
                self.dispatch()
        else:
            self.sessions.pop(session, None)
            self.held.discard(session)

    def dispatch(self) -> None:
        """Start workers for ready sessions that no running or starting worker will pick up."""
        starting = sum(len(c.starting) for c in self.consumers)
        while len(self.ready) > starting:
            consumer = max(self.consumers, key=MemoryConsumer.free, default=None)
            if consumer is None or consumer.free() <= 0:
                return  # every consumer is at its limit; a finishing worker will loop to it
            consumer.spawn()
            starting += 1

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
    """One consumer of one queue; stop() behaves like its process dying."""

    def __init__(self, queue: _Queue, handler: Handler, max_concurrent_sessions: int) -> None:
        self._queue = queue
        self._handler = handler
        self._limit = max_concurrent_sessions
        self._workers: set[asyncio.Task[None]] = set()
        self.starting: set[asyncio.Task[None]] = set()  # spawned, not yet running
        self._stopped = False

    def free(self) -> int:
        return self._limit - len(self._workers)

    def spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._work(), name=f"bus:{self._queue.label}")
        self._workers.add(task)
        self.starting.add(task)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        queue = self._queue
        if self in queue.consumers:
            queue.consumers.remove(self)
        # A handler may stop its own consumer: don't cancel/await ourselves, the loop sees _stopped.
        current = asyncio.current_task()
        tasks = [t for t in self._workers if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.starting.clear()
        queue.dispatch()  # sessions handed back (or left in ready) go to the remaining consumers

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.starting.discard(task)
        queue = self._queue
        try:
            while queue.ready and not self._stopped:
                await self._turn(queue.ready.popleft())
        except asyncio.CancelledError:
            pass  # stop(): _turn already handed the message back
        except BaseException:  # a bug here would silently stall sessions: make it loud
            log.exception("bus worker for %s crashed", queue.label)
            raise
        finally:
            self._workers.discard(task)
            # Normally we only exit once ready is empty; when stopped mid-loop, hand leftovers on.
            if queue.ready:
                queue.dispatch()

    async def _turn(self, session: str) -> None:
        queue = self._queue
        bus = queue.bus
        pending = queue.sessions[session]
        item = pending.popleft()
        queue.pending -= 1
        item.deliveries += 1
        envelope = item.envelope.with_headers(**{"delivery-count": str(item.deliveries)})
        queue.in_flight += 1
        queue.delivered += 1
        try:
            await self._handler(envelope)
        except Exception as exc:
            queue.in_flight -= 1
            self._failed(session, item, exc)
        except BaseException as exc:
            queue.in_flight -= 1
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and not task.cancelling():
                # The handler leaked a CancelledError of its own (nobody cancelled us): count it as
                # a failure, or it would be redelivered forever without ever reaching max_attempts.
                self._failed(session, item, exc)
                return
            # Stop/close (or interpreter exit) mid-message: unsettled, so it goes back to the head
            # of its session for the next consumer. Not a failed attempt: the handler never finished.
            pending.appendleft(item)
            queue.pending += 1
            queue.release(session, dispatch=True)
            raise
        else:
            queue.in_flight -= 1
            queue.completed += 1
            queue.release(session, dispatch=False)
            bus._settled()

    def _failed(self, session: str, item: _Pending, exc: BaseException) -> None:
        queue = self._queue
        bus = queue.bus
        item.failures += 1
        reason = f"{type(exc).__name__}: {exc}"
        if item.failures >= bus.max_attempts:
            log.error(
                "dead-lettering %s %s (session %s) from %s after %d attempts: %s",
                item.envelope.type, item.envelope.message_id, session, queue.label,
                item.failures, reason, exc_info=exc,
            )  # fmt: skip
            queue.dead.append(DeadLetter(queue.name, item.envelope, reason, item.failures, utc_now()))
            queue.release(session, dispatch=False)
            bus._settled()
            return
        log.warning(
            "redelivering %s %s (session %s) on %s, attempt %d failed: %s",
            item.envelope.type, item.envelope.message_id, session, queue.label, item.failures, reason,
        )  # fmt: skip
        # Back to the head and the session stays held: later messages of it must wait (ordering).
        queue.sessions[session].appendleft(item)
        queue.pending += 1
        if bus.redelivery_delay > 0:
            asyncio.get_running_loop().call_later(
                bus.redelivery_delay, functools.partial(queue.release, session, dispatch=True)
            )
        else:
            queue.release(session, dispatch=False)


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
        self._queues: dict[str, _Queue] = {}
        self._subscriptions: dict[str, _Queue] = {}
        self._filters: dict[str, frozenset[str]] = {}
        self._broadcasts = 0  # per-caller broadcast subscriptions made so far (their names)
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
        self._queue(queue).put(_as_on_the_wire(message))

    async def publish(self, event: Envelope) -> None:
        self._check_open()
        copy = _as_on_the_wire(event)
        # Topic semantics: no matching subscription yet means nobody receives it.
        for name, types in self._filters.items():
            if copy.type in types:
                self._subscriptions[name].put(copy)

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
            sub = self._subscriptions[subscription] = _Queue(self, subscription, f"subscription:{subscription}")
        # Like replacing an Azure subscription's rule: the latest subscriber's types win.
        self._filters[subscription] = types
        return self._attach(sub, handler, max_concurrent_sessions)

    async def broadcast(self, event_types: Collection[str], handler: Handler) -> _BroadcastConsumer:
        """Every caller gets every event of these types (one subscription per caller, gone when stopped)."""
        self._check_open()
        self._broadcasts += 1
        name = f"broadcast-{self._broadcasts}"
        consumer = await self.subscribe(name, event_types, handler, max_concurrent_sessions=1)
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
        found = [
            letter
            for q in (self._queues.get(queue), self._subscriptions.get(queue))
            if q is not None
            for letter in q.dead
        ]
        return sorted(found, key=lambda letter: letter.dead_lettered_at)

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


