"""RabbitMQ bus (aiormq): session-ordered partitioned quorum queues with single-active-consumer.

Topology (every name below is prefixed with ``prefix``, empty in production, unique per test run):

- ``send(queue, m)`` publishes through the default exchange to ``<queue>.p<k>`` where
  ``k = crc32(m.session_id) % partitions`` (computed client-side, so it is the same in every process).
- ``publish(e)`` publishes to the durable direct exchange ``ecom-events`` with routing key
  ``<e.type>.p<k>``. A subscription ``svc`` owns the partitions ``svc.events.p<k>``, each bound to
  ``<type>.p<k>`` for every event type it subscribes to. So an event lands, for every subscribing
  service, in the partition of its session: fan-out by type, ordered per session.
- Every partition is a durable quorum queue with ``x-single-active-consumer``: however many processes
  consume it, the broker delivers to one at a time, in queue order; when that consumer's channel goes
  (stop(), crash, lost connection) its unacked messages are returned in order and the next registered
  consumer becomes active. That gives per-session FIFO and exclusivity across processes.
- ``broadcast(types, h)``: a server-named, exclusive, auto-delete classic queue (``x-expires`` as a
  backstop) of the process's connection, bound to ``<type>.p<k>`` for every type and partition, so every
  process gets every such event. It goes with stop(), the channel or the connection; after a recovery a
  new one is declared and bound (events published while it was down are not received: not durable).
- ``<queue>.dlq`` / ``<svc>.events.dlq``: durable quorum dead-letter queue of each queue/subscription.
  Partitions also carry ``x-delivery-limit`` with a dead-letter route to it: a message whose consumers
  keep dying before settling it (a crash loop the process cannot count) ends up there too, instead of
  being redelivered forever or dropped by the broker.

Inside one consumer (one channel; one per ``consume``/``subscribe`` call), several sessions share a
partition, so deliveries (prefetch > 1) are split into per-session in-process FIFOs. At most one
handler call per session runs at a time, up to ``max_concurrent_sessions`` sessions concurrently,
and each message is acked individually (never ``multiple=True``: acks are out of order across
sessions) once its handler returned. A failed message is retried in-process, holding its session
(later messages of that session wait), ``redelivery_delay`` seconds apart; after
``max_attempts`` failures it is published to the DLQ with its reason and attempt count (publisher
confirm awaited), and only then acked. Nothing is nacked/requeued by the consumer: that would put the
message behind later ones of its session that are already prefetched.

``Consumer.stop()`` behaves like the process dying: in-flight handlers are cancelled and not acked,
then the channel is closed, so the broker returns every unacked message (in order) to the queue for
the consumer that becomes active next. ``close()`` does that for all consumers, then closes the
connection.

Recovery (the broker force-closes connections, a channel dies of a channel error, the network goes):
every connection and channel is watched; a loss drops the in-memory deliveries of the affected consumers
(the broker already requeued them, in order) and wakes one supervisor task per bus, which reconnects,
reopens the publishing channel and re-subscribes every consumer to every partition. Failed attempts
back off exponentially from ``reconnect_interval`` up to ``reconnect_max_interval``, each delay
jittered to 50-100% so that processes cut off together do not come back in lockstep. Publishing waits
(within ``timeout``) for the recovery and retries a publish whose connection died before the confirm
(a possible duplicate, which consumers dedupe). ``ping()`` fails until everything is back. aio-pika's
robust connection is not used: its fixed reconnect interval, its restore callbacks that log errors
while the transport is down, and ``IncomingMessage.channel`` raising on a closed channel (which
crashed workers) are what this replaces.

``dead_letters(name)`` reads the DLQs non-destructively: ``basic.get`` of every message without ack
on a throw-away channel, then closing that channel returns them all to the DLQ (they stay listable,
and an operator can still shovel or purge them). Two concurrent readers may each see part of them.
``discard_dead_letter`` reads the same way and acks only the one message; ``redeliver`` publishes to the
partition of the message's session of exactly that queue or subscription (bus/deadletters.py). Each read
returns the messages to the DLQ, which on RabbitMQ 4.0-4.2 counts against the DLQ's default delivery limit
(see the limits below): there, raise it with a ``delivery-limit`` policy on the ``*.dlq`` queues.
``dead_letter_count`` (the admin summary, the ``bus_dead_letters`` metric at every scrape) reads nothing: a
passive declare of each DLQ gives its message count.

Limits worth knowing (documented, not hidden):

- The partition count is part of the routing: every producer and consumer of a queue must use the
  same ``partitions`` (changing it moves sessions to other partitions, so in-flight ordering across the
  change is not guaranteed).
- Queue arguments are fixed at declaration; a redeclaration with other arguments (e.g. another
  ``delivery_limit``) fails with a BusError naming the queue.
- Failures are counted per process: a message retried twice on a process that then dies starts again
  at attempt 1 on the next one (the ``delivery-count`` header still counts broker redeliveries).
- ``x-delivery-limit`` (default 20) counts, on RabbitMQ 3.x-4.2, every return of a message to the
  queue, also of prefetched messages that were never handed to a handler: a process crash-looping on
  one message eventually dead-letters it *and* the messages prefetched with it (reason
  ``DeliveryLimitExceeded``; nothing is dropped, they can be replayed from the DLQ). From 4.0 quorum
  queues default to a limit of 20 anyway and *drop* at the limit without a dead-letter route, which is
  why every partition has one. From 4.3 returns by a dying consumer no longer count (only nacks do).
- Subscriptions only ever add bindings (AMQP cannot list them); dropping an event type from a
  subscription needs the binding removed by hand (``rabbitmqadmin delete binding``).
- With single-active-consumer the first process to register on a partition gets all of it; other
  processes are hot standbys for it (no load sharing on one partition, by design; on 3.10 SAC ignores
  consumer priorities, so the first process started is active on every partition).
- Head-of-line blocking is bounded by the prefetch window: a partition delivers at most ``prefetch``
  (default ``max(2 * max_concurrent_sessions, 32)``) unacked messages to a consumer, so a session with
  a long backlog behind a stuck message can hold the whole window and stall the other sessions of
  that partition until it moves. A handler stuck longer than the broker's ``consumer_timeout``
  (30 min by default) gets the channel closed; the messages are then redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Collection, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
import aiormq.abc
from aiormq import spec
from pamqp.common import FieldTable
from yarl import URL

from bus.base import (
    BROADCAST_ATTEMPTS,
    BROADCAST_RETRY_DELAY,
    BusError,
    DeadLetter,
    Handler,
    MalformedMessage,
    check_name,
    retry_then_drop,
    subscription_types,
)
from bus.deadletters import QUEUE, SUBSCRIPTION, check_kind, matches
from bus.envelope import Envelope, utc_now
from bus.sessions import SessionScheduler, WorkerPool, note_failure, run_handler
from bus.tracing import traced

__all__ = [
    "DEFAULT_URL",
    "EVENTS_EXCHANGE",
    "RabbitBroadcast",
    "RabbitBus",
    "RabbitConsumer",
    "create_bus",
    "partition_of",
    "partition_queue_arguments",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
EVENTS_EXCHANGE = "ecom-events"
DEFAULT_DELIVERY_LIMIT = 20  # broker-side redeliveries (consumer died unsettled) before dead-lettering
MAX_DEAD_LETTER_BACKOFF = 5.0  # cap of the back-off while the DLQ cannot be published to
STOP_GRACE = 10.0  # how long stop() waits for cancelled handlers that refuse to end
DEAD_LETTER_READ_LIMIT = 10_000  # dead_letters() returns at most this many per DLQ
MAX_REASON = 4000  # characters of the error text kept with a dead letter
DEFAULT_RECONNECT_INTERVAL = 1.0  # first recovery delay (seconds), doubled per failed attempt...
DEFAULT_RECONNECT_MAX_INTERVAL = 30.0  # ...up to this; also how long a link must stay up to reset it
BROADCAST_PREFETCH = 64
BROADCAST_QUEUE_EXPIRES_MS = 60_000  # a broadcast queue left unused (no consumer) this long is deleted
BROADCAST_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "classic", "x-expires": BROADCAST_QUEUE_EXPIRES_MS}

# Header names of our own dead letters (plain names: ``x-`` ones belong to the broker).
H_REASON, H_ATTEMPTS, H_AT, H_SOURCE = "ecom-reason", "ecom-attempts", "ecom-dead-lettered-at", "ecom-source"


def partition_of(session_id: str, partitions: int) -> int:
    """Stable across processes and Python runs (unlike ``hash()``): crc32 of the UTF-8 id."""
    return zlib.crc32(session_id.encode("utf-8")) % partitions


def partition_queue_arguments(dead_letter_queue: str, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue,
    }


DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


def _safe_url(url: str) -> str:
    try:
        parsed = URL(url)
        return str(parsed.with_password("***")) if parsed.password else str(parsed)
    except (ValueError, TypeError):
        return "<unparseable url>"


def _format_time(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return utc_now()


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


PERSISTENT = 2  # AMQP delivery mode


def _properties(envelope: Envelope) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=envelope.message_id,
        correlation_id=envelope.correlation_id,
        message_type=envelope.type[:255],
    )


def _encode(message: Envelope) -> bytes:
    """The wire bytes; fails early (TypeError / MalformedMessage) on what a receiver could not read."""
    if not isinstance(message, Envelope):
        raise TypeError(f"expected an Envelope, got {type(message).__name__}")
    data = message.encode()  # TypeError on a non-JSON body
    Envelope.decode(data)  # MalformedMessage on e.g. an empty session_id
    return data


@dataclass(slots=True)
class _Pending:
    message: aiormq.abc.DeliveredMessage  # its .channel is the one it must be acked on
    envelope: Envelope | None  # None: the body is not a valid envelope (dead-lettered untried)
    error: str  # why envelope is None
    redeliveries: int  # deliveries by the broker before this one (x-delivery-count)
    failures: int = 0  # failed handler calls in this process


@dataclass(frozen=True, slots=True)
class _Target:
    """One logical queue or subscription and its physical queues."""

    name: str  # as the caller named it: DeadLetter.queue
    partitions: tuple[str, ...]
    dead_letter_queue: str
    kind: str = QUEUE  # DeadLetter.kind


class RabbitConsumer:
    """One consumer (its own channel) of all partitions of a queue or subscription."""

    def __init__(self, bus: RabbitBus, target: _Target, handler: Handler, limit: int, prefetch: int) -> None:
        self._bus = bus
        self._target = target
        self._handler = traced(handler, "rabbitmq", target.name)  # a CONSUMER span per delivery when tracing is on
        self._prefetch = prefetch
        # The channel deliveries are accepted from. A delivery is only handled and acked while its
        # channel is still this one: after a loss the broker owns (and redelivers) the old ones.
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._subscribed: aiormq.abc.AbstractChannel | None = None  # the channel once on every partition
        # Deliveries split into per-session FIFOs, handled by up to ``limit`` workers (bus/sessions.py).
        self._scheduler: SessionScheduler[_Pending] = SessionScheduler()
        self._pool = WorkerPool(self._scheduler, self._turn, limit, f"bus:rabbitmq:{target.name}", self._crashed)
        self._stopped = False
        # counters, for benchmarks and debugging
        self.delivered = 0  # handler calls
        self.completed = 0
        self.channels_lost = 0  # consumer channels that closed under us (and were reopened)

    @property
    def name(self) -> str:
        return self._target.name

    @property
    def _workers(self) -> set[asyncio.Task[None]]:
        return self._pool.workers

    @property
    def is_consuming(self) -> bool:
        """True while a channel is open and subscribed to every partition (False while recovering)."""
        channel = self._channel
        return not self._stopped and channel is not None and channel is self._subscribed and not channel.is_closed

    # -- lifecycle ---------------------------------------------------------------------------

    async def _start(self) -> None:
        """The first subscription: a failure is the caller's (BusError), not retried in the background."""
        bus = self._bus
        try:
            async with asyncio.timeout(bus.timeout):
                await self._open(await bus._live_connection())
        except BaseException as exc:
            self._stopped = True
            await self._close_channel()
            if isinstance(exc, BusError):
                raise
            if isinstance(exc, Exception):
                raise BusError(f"cannot consume {self._target.name!r}: {type(exc).__name__}: {exc}") from exc
            raise

    async def _open(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Open a channel on ``connection`` and consume every partition from it (callers bound the time)."""
        bus = self._bus
        channel = await connection.channel(publisher_confirms=False)
        try:
            if self._stopped:
                # Stopped while the channel was opening: do not consume. Not a CancelledError: that
                # would end the supervisor, which ignores failures of stopped consumers.
                raise BusError(f"consumer of {self.name!r} was stopped")
            # Per consumer (global_=False): each partition may have ``prefetch`` unacked here.
            await channel.basic_qos(prefetch_count=self._prefetch)
            # Current before the first basic.consume, so its deliveries are accepted; watched from now
            # on, so a close at any later point (connection or channel) is noticed and recovered.
            self._channel = channel
            channel.closing.add_done_callback(lambda closing: self._on_channel_closed(channel, closing))
            channel.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            await self._consume_from(channel)
            self._subscribed = channel
        except BaseException:
            # Half-subscribed: close it; whatever it was delivered goes back to the queue.
            with suppress(Exception):
                await asyncio.wait_for(channel.close(), bus.timeout)
            raise

    async def _consume_from(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Declare the queues this consumer reads and ``basic.consume`` them on ``channel``."""
        arguments = self._bus._partition_arguments(self._target)
        for name in self._target.partitions:
            # Declared again on every (re)open: it costs one round trip and brings back a partition
            # that was deleted while we were away, instead of failing the recovery forever.
            await channel.queue_declare(name, durable=True, arguments=arguments)
            await channel.basic_consume(name, self._on_message)

    async def _resume(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Called by the bus's supervisor: make sure we consume from ``connection`` (idempotent)."""
        if self._stopped:
            return
        channel = self._channel
        if channel is not None and not channel.is_closed and channel.connection is connection:
            return
        if channel is not None:
            # Gone (or on a connection that is gone) but its close callback has not run yet: its
            # deliveries are the broker's again, so drop them before new ones arrive on the new channel.
            self._lost(channel, "its connection was replaced")
        async with asyncio.timeout(self._bus.timeout):
            await self._open(connection)

    async def stop(self) -> None:
        """Like the process dying: cancel in-flight handlers (not acked), then close the channel so the
        broker returns every unacked message, in order, to whichever consumer becomes active next."""
        if self._stopped:
            return
        self._stopped = True
        self._pool.detach()
        self._bus._consumers.discard(self)
        current = asyncio.current_task()
        own = current is not None and current in self._workers
        tasks = self._reset(keep=current)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            if pending:
                log.warning("%d handler(s) of %s ignored cancellation; closing anyway", len(pending), self.name)
        if own:
            # A handler stopping its own consumer: let that handler finish and settle first (its
            # message is done, not abandoned), then close. We cannot await our own task here.
            assert current is not None
            self._bus._spawn(self._close_after(current), f"bus:rabbitmq:{self.name}:stop")
        else:
            await self._close_channel()

    async def _close_after(self, task: asyncio.Task[None]) -> None:
        with suppress(BaseException):
            await asyncio.wait({task}, timeout=STOP_GRACE)
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None  # no longer current: its close is not a "loss"
        if channel is None:
            return
        with suppress(Exception):
            await asyncio.wait_for(channel.close(), self._bus.timeout)

    def _reset(self, keep: asyncio.Task[Any] | None = None) -> list[asyncio.Task[None]]:
        """Forget every delivery held in memory and cancel the handlers working on them (all of them
        are unacked: the broker has them again once the channel is gone)."""
        self._scheduler.clear()
        return self._pool.cancel(keep)

    def _on_channel_closed(self, channel: aiormq.abc.AbstractChannel, closing: asyncio.Future[Any]) -> None:
        # A plain done-callback (not a task): nothing here can end up as an unretrieved exception.
        reason = _closing_reason(closing)
        if channel is self._channel and not self._stopped:
            self._lost(channel, reason)
            self._bus._wake()  # the supervisor reopens it, with back-off if that keeps failing

    def _lost(self, channel: aiormq.abc.AbstractChannel, reason: str) -> None:
        # Connection or channel gone (forced close, channel error, consumer timeout...): the broker
        # already requeued our unacked messages (and may have made another process active). Drop our
        # copies and cancel their handlers, like a process restart.
        if channel is not self._channel:
            return
        self._channel = None
        self.channels_lost += 1
        log.warning(
            "consumer channel of %s closed (%s); dropping in-memory deliveries, resubscribing", self.name, reason
        )
        self._reset()

    def _recycle(self, why: str) -> None:
        """Close our channel on purpose; the close is then recovered like any other channel loss."""
        channel = self._channel
        if channel is None or self._stopped or channel.is_closed:
            return
        log.warning("recycling the consumer channel of %s: %s", self.name, why)
        self._bus._spawn(_close_quietly(channel, self._bus.timeout), f"bus:rabbitmq:{self.name}:recycle")

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        # The broker dropped one of our partition consumers (queue deleted, quorum leader trouble):
        # that partition would silently stop. Start the channel over, which re-declares and re-consumes.
        self._recycle(f"the broker cancelled consumer {frame.consumer_tag}")

    # -- delivery ----------------------------------------------------------------------------

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        # No await before the message is queued: aiormq starts one task per delivery, in delivery
        # order, so the per-session FIFOs receive messages in partition order.
        if self._stopped or message.channel is not self._channel:
            return  # unacked, on a channel that is gone or going: the broker redelivers it
        headers = message.header.properties.headers or {}
        try:
            envelope: Envelope | None = Envelope.decode(message.body)
            error = ""
            session = self._session_of(envelope)  # type: ignore[arg-type]  # just decoded: not None here
        except MalformedMessage as exc:
            envelope, error = None, f"MalformedMessage: {exc}"
            session = f"\x00malformed:{id(message)}"  # a session of its own: nothing to order it with
        self._scheduler.put(session, _Pending(message, envelope, error, _int(headers.get("x-delivery-count"))))

    def _session_of(self, envelope: Envelope) -> str:
        """The in-process FIFO a delivery joins: its session (one handler call per session at a time)."""
        return envelope.session_id

    def _ours(self, item: _Pending) -> bool:
        """Whether the delivery may still be handled and settled here. aiormq's ``is_closed`` never
        raises (aio-pika's ``IncomingMessage.channel`` did, on a closed channel, crashing workers)."""
        channel = item.message.channel
        return not self._stopped and channel is self._channel and not channel.is_closed

    def _crashed(self, exc: Exception) -> None:
        # A bug in a worker would silently stall the session it held. Make it loud, and start over from
        # the broker's state: recycling the channel returns every unacked message, in order.
        log.error("bus worker for %s crashed; recycling its channel", self.name, exc_info=exc)
        self._recycle("a worker crashed")

    async def _turn(self, session: str) -> None:
        item = self._scheduler.take(session)
        if item is None:
            self._release(session, dispatch=False)
            return
        if not self._ours(item):
            # Delivered on a channel that is gone (reconnection): the broker redelivers it.
            self._release(session, dispatch=False)
            return
        if item.envelope is None:
            log.error("dead-lettering a malformed message from %s: %s", self.name, item.error)
            await self._dead_letter(item, item.error, 0)
            self._release(session, dispatch=False)
            return
        attempt = item.failures + 1
        envelope = item.envelope.with_headers(**{"delivery-count": str(item.redeliveries + attempt)})
        self.delivered += 1
        # A real cancellation (stop()/close()/lost channel mid-message) propagates: the message stays
        # unsettled and the broker redelivers it.
        failure = await run_handler(self._handler, envelope)
        if failure is not None:
            await self._failed(session, item, failure)
            return
        await self._ack(item)
        self.completed += 1
        self._release(session, dispatch=False)

    async def _failed(self, session: str, item: _Pending, exc: BaseException) -> None:
        bus = self._bus
        item.failures += 1
        envelope = item.envelope
        assert envelope is not None
        dead, reason = note_failure(
            log, envelope, session, self.name, item.failures, bus.max_attempts, exc, retry="retrying"
        )
        if dead:
            await self._dead_letter(item, reason, item.failures)
            self._release(session, dispatch=False)
            return
        if not self._ours(item):
            return  # the broker redelivers it (in order) to the next active consumer
        # Back to the head, the session stays held: its later messages wait (ordering).
        self._scheduler.retry(session, item, bus.redelivery_delay)

    async def _dead_letter(self, item: _Pending, reason: str, attempts: int) -> None:
        """Publish to the DLQ (confirmed), then ack. Retries while the delivery is still ours."""
        backoff = 0.1
        while True:
            if not self._ours(item):
                return  # not ours any more: redelivered to the next consumer, never lost
            try:
                await self._bus._publish_dead_letter(self._target, item.message, reason, attempts)
            except BusError as exc:
                log.warning("cannot dead-letter to %s yet (%s); retrying", self._target.dead_letter_queue, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_DEAD_LETTER_BACKOFF)
            else:
                break
        self._bus.dead_lettered[self._target.name, self._target.kind] += 1
        await self._ack(item)

    async def _ack(self, item: _Pending) -> None:
        message = item.message
        try:
            # This delivery tag only, on the channel it came from: acks are out of order across sessions.
            await message.channel.basic_ack(message.delivery_tag)  # type: ignore[arg-type]  # a delivered message always carries its tag
        except Exception as exc:  # noqa: BLE001 channel gone: the broker redelivers it (at-least-once)
            log.info("ack on %s lost (%s: %s); the message will be redelivered", self.name, type(exc).__name__, exc)

    def _release(self, session: str, *, dispatch: bool) -> None:
        self._scheduler.release(session, dispatch=dispatch)


class RabbitBroadcast(RabbitConsumer):
    """A broadcast subscription of this process (see ``RabbitBus.broadcast``).

    Its queue is server-named, exclusive to the bus's connection, auto-delete and ``x-expires``: it
    goes when stop() deletes it, when its consumer is cancelled (channel closed), when the connection
    closes (process gone), and in any case once unused for BROADCAST_QUEUE_EXPIRES_MS. After a lost
    channel or connection, the supervisor's ``_resume`` declares and binds a new one (events published
    in between are not received: not durable). One FIFO, one handler call at a time: stream order.
    """

    def __init__(self, bus: RabbitBus, event_types: list[str], handler: Handler) -> None:
        label = f"broadcast({','.join(event_types)})"
        wrapped = retry_then_drop(handler, label, bus.broadcast_attempts, bus.broadcast_retry_delay)
        super().__init__(bus, _Target(label, (), ""), wrapped, 1, BROADCAST_PREFETCH)
        self.event_types = tuple(event_types)
        self.queue: str | None = None  # the current server-named queue
        self.queues_declared = 0

    async def _consume_from(self, channel: aiormq.abc.AbstractChannel) -> None:
        bus = self._bus
        exchange = bus.exchange_name
        # Cheap and idempotent; brings the exchange back if it was deleted while we were away.
        await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
        declared = await channel.queue_declare(
            "", durable=False, exclusive=True, auto_delete=True, arguments=BROADCAST_QUEUE_ARGUMENTS
        )
        name = declared.queue
        assert name, "the broker did not name the broadcast queue"
        self.queue = name
        self.queues_declared += 1
        for event_type in self.event_types:
            for k in range(bus.partitions):
                await channel.queue_bind(name, exchange, routing_key=f"{event_type}.p{k}")
        await channel.basic_consume(name, self._on_message)

    def _session_of(self, envelope: Envelope) -> str:
        return ""  # the whole stream is one FIFO: publish order, not just per-session order

    async def _dead_letter(self, item: _Pending, reason: str, attempts: int) -> None:
        # No DLQ for a per-process stream: drop it (the announcement is lost for this process only).
        log.warning("%s: dropping a message it cannot handle (%s)", self.name, reason)
        await self._ack(item)

    async def _close_channel(self) -> None:
        # Delete the queue first (the channel close would auto-delete it too, but only once the broker
        # has cancelled the consumer): when stop() returns, nothing of this broadcast is left.
        channel, queue = self._channel, self.queue
        if channel is not None and queue and not channel.is_closed:
            with suppress(Exception):
                await asyncio.wait_for(channel.queue_delete(queue), self._bus.timeout)
        await super()._close_channel()


class RabbitBus:
    """One process's connection to RabbitMQ. See the module docstring for the topology."""

    name = "rabbitmq"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        max_attempts: int = 5,
        max_concurrent_sessions: int = 64,
        partitions: int = 8,
        redelivery_delay: float = 1.0,
        prefetch: int | None = None,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        prefix: str = "",
        timeout: float = 30.0,
        connection_name: str | None = None,
        reconnect_interval: float | None = None,
        reconnect_max_interval: float = DEFAULT_RECONNECT_MAX_INTERVAL,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_concurrent_sessions < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if redelivery_delay < 0:
            raise ValueError("redelivery_delay must not be negative")
        if prefetch is not None and prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")
        if reconnect_interval is not None and reconnect_interval <= 0:
            raise ValueError("reconnect_interval must be positive")
        self.url = url or DEFAULT_URL
        self.max_attempts = max_attempts
        self.max_concurrent_sessions = max_concurrent_sessions
        self.partitions = partitions
        self.redelivery_delay = redelivery_delay
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.prefix = prefix
        self.timeout = timeout
        self.connection_name = connection_name
        # Recovery back-off: base ``reconnect_interval`` doubling per failed attempt up to
        # ``reconnect_max_interval``, each delay jittered to 50-100% so that processes cut off
        # together (broker restart, close_all_connections) do not reconnect in lockstep.
        self.reconnect_interval = DEFAULT_RECONNECT_INTERVAL if reconnect_interval is None else reconnect_interval
        self.reconnect_max_interval = max(reconnect_max_interval, self.reconnect_interval)
        self.exchange_name = f"{prefix}{EVENTS_EXCHANGE}"
        self.broadcast_attempts = BROADCAST_ATTEMPTS
        self.broadcast_retry_delay = BROADCAST_RETRY_DELAY
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None  # publishing only (confirms)
        self._exchange_declared = False
        self._targets: dict[str, _Target] = {}  # declared ones, by base name
        self._locks: dict[str, asyncio.Lock] = {}
        self._bound: set[tuple[str, str]] = set()  # (subscription base, event type)
        self._consumers: set[RabbitConsumer] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()  # something was lost: the supervisor has work
        self._link_up = asyncio.Event()  # connection and publishing channel usable
        self._started = False
        self._closed = False
        # counters, for health output and tests
        self.recoveries = 0  # recovery passes that brought everything back
        self.reconnects = 0  # new connections after the first
        self.dead_lettered: Counter[tuple[str, str]] = Counter()  # (name, kind): messages dead-lettered (metrics)
        # Every queue/exchange this object declared (tests delete them at teardown).
        self.declared_queues: set[str] = set()
        self.declared_exchanges: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (idempotent). Allowed again after close(): queues are durable on the broker."""
        if self._started and not self._closed:
            return
        self._wakeup, self._link_up = asyncio.Event(), asyncio.Event()
        try:
            async with asyncio.timeout(self.timeout):
                await self._connect()
        except Exception as exc:
            raise BusError(f"cannot connect to RabbitMQ at {_safe_url(self.url)}: {type(exc).__name__}: {exc}") from exc
        self._exchange_declared = False
        self._targets.clear()
        self._bound.clear()
        self._started, self._closed = True, False
        self._link_up.set()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="bus:rabbitmq:supervisor")

    async def _connect(self) -> aiormq.abc.AbstractConnection:
        """A new connection and publishing channel, both watched for loss (callers bound the time)."""
        properties: FieldTable = {"connection_name": self.connection_name or "ecom-bus"}
        connection = await aiormq.connect(self.url, client_properties=properties)
        try:
            # on_return_raises: an unroutable mandatory publish (queue deleted under us) is an error.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            # Also on cancellation (close() during a reconnect): never leave a connection behind.
            await _close_quietly(connection, self.timeout)
            raise
        self._connection, self._channel = connection, channel
        self._watch(connection, "connection")
        self._watch(channel, "publishing channel")
        return connection

    def _watch(self, resource: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel, what: str) -> None:
        resource.closing.add_done_callback(lambda closing: self._on_lost(resource, what, closing))

    def _on_lost(self, resource: Any, what: str, closing: asyncio.Future[Any]) -> None:
        # A plain done-callback: retrieves the close reason (no "exception never retrieved") and only
        # flags the supervisor, which does the (awaiting, bounded, backed-off) recovery.
        reason = _closing_reason(closing)
        if self._closed or resource not in (self._connection, self._channel):
            return  # closed by close(), or an old connection/channel already replaced
        if what == "connection" or not resource.connection.is_closed:  # once per loss, not per channel
            log.warning("RabbitMQ %s to %s lost (%s); recovering", what, _safe_url(self.url), reason)
        self._link_up.clear()
        self._wake()

    def _wake(self) -> None:
        if not self._closed:
            self._wakeup.set()

    def _backoff(self, attempt: int) -> float:
        """Delay before recovery attempt ``attempt`` (0-based): exponential, capped, 50-100% jitter."""
        ceiling = min(self.reconnect_max_interval, self.reconnect_interval * 2 ** min(attempt, 32))
        return ceiling * random.uniform(0.5, 1.0)

    async def _supervise(self) -> None:
        """Bring back whatever was lost: the connection, the publishing channel, consumer channels.

        One task does all recovery, so there is exactly one reconnect loop however many channels
        noticed the loss. Every step is bounded by ``timeout``; close() cancels this task.
        """
        attempt = 0
        stable_since = time.monotonic()
        while not self._closed:
            await self._wakeup.wait()
            if time.monotonic() - stable_since >= self.reconnect_max_interval:
                attempt = 0  # the last trouble is long past: start the back-off over
            # Losses in quick succession (a flapping link) keep the back-off growing.
            while not self._closed:
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                self._wakeup.clear()  # before repairing: a loss during the repair wakes us again
                try:
                    await self._repair()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - anything: try again later, never die
                    log.warning(
                        "RabbitMQ recovery attempt %d failed (%s: %s); next in up to %.1fs",
                        attempt, type(exc).__name__, exc, min(self.reconnect_max_interval, self.reconnect_interval * 2**attempt),
                    )  # fmt: skip
                    continue
                self.recoveries += 1
                stable_since = time.monotonic()
                log.info("RabbitMQ bus recovered (attempt %d)", attempt)
                break

    async def _repair(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            self._connection, self._channel = None, None
            async with asyncio.timeout(self.timeout):
                connection = await self._connect()
            self.reconnects += 1
        elif self._channel is None or self._channel.is_closed:
            async with asyncio.timeout(self.timeout):
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._channel = channel
            self._watch(channel, "publishing channel")
        if not connection.is_closed and self._channel is not None and not self._channel.is_closed:
            self._link_up.set()  # publishers go on while consumers resubscribe
        errors: list[Exception] = []
        for consumer in list(self._consumers):
            try:
                await consumer._resume(connection)
            except Exception as exc:  # noqa: BLE001 - the others still get their turn
                if not consumer._stopped:
                    errors.append(exc)
        if errors:
            raise errors[0]
        if connection.is_closed:
            raise BusError("the connection closed again during recovery")

    async def close(self) -> None:
        """Stop every consumer (in-flight handlers are cancelled, their messages stay on the broker
        for the next consumer), then close the connection. Also while recovering: the recovery is
        cancelled, not waited for."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        self._link_up.set()  # publishers waiting for a reconnection wake up and see the bus closed
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait({supervisor}, timeout=STOP_GRACE)
        consumers = list(self._consumers)
        await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True)
        if self._background:
            await asyncio.wait(set(self._background), timeout=STOP_GRACE)
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await _close_quietly(connection, self.timeout)

    async def ping(self) -> None:
        self._check_open()
        connection, channel = self._connection, self._channel
        if connection is None or connection.is_closed:
            raise BusError(f"RabbitMQ connection to {_safe_url(self.url)} is down (reconnecting)")
        if channel is None or channel.is_closed:
            raise BusError("RabbitMQ publishing channel is closed (reopening)")
        for consumer in list(self._consumers):
            if not consumer._stopped and not consumer.is_consuming:
                raise BusError(f"RabbitMQ consumer of {consumer.name!r} is down (resubscribing)")

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("rabbitmq bus is closed")
        if not self._started:
            raise BusError("rabbitmq bus is not started")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task close() waits for; its outcome is always retrieved."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("%s failed", task.get_name(), exc_info=exc)

        task.add_done_callback(done)

    async def _live_connection(self) -> aiormq.abc.AbstractConnection:
        """The connection, once usable: waits (the caller bounds how long) while it is recovered."""
        await self._publishing_channel()
        assert self._connection is not None
        return self._connection

    async def _publishing_channel(self) -> aiormq.abc.AbstractChannel:
        """The publishing channel, once usable: waits (the caller bounds how long) while it is recovered."""
        while True:
            self._check_open()
            connection, channel = self._connection, self._channel
            if connection is not None and not connection.is_closed and channel is not None and not channel.is_closed:
                return channel
            # Down, maybe before its close callback ran: make sure the supervisor knows, then wait.
            self._link_up.clear()
            self._wake()
            await self._link_up.wait()

    @asynccontextmanager
    async def _admin_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A throw-away channel for declarations: a refused one (PRECONDITION_FAILED) closes only it,
        never the publishing channel other callers are using."""
        connection = await self._live_connection()
        channel = await connection.channel(publisher_confirms=False)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await _close_quietly(channel, self.timeout)

    # -- topology ----------------------------------------------------------------------------

    def _queue_target(self, queue: str) -> _Target:
        return self._target(queue, f"{self.prefix}{queue}", QUEUE)

    def _subscription_target(self, subscription: str) -> _Target:
        return self._target(subscription, f"{self.prefix}{subscription}.events", SUBSCRIPTION)

    def _target(self, name: str, base: str, kind: str) -> _Target:
        return _Target(name, tuple(f"{base}.p{k}" for k in range(self.partitions)), f"{base}.dlq", kind)

    def _partition_arguments(self, target: _Target) -> dict[str, Any]:
        return partition_queue_arguments(target.dead_letter_queue, self.delivery_limit)

    async def _ensure(self, target: _Target) -> None:
        """Declare the DLQ, then the partitions (which dead-letter into it). Once per process."""
        key = target.dead_letter_queue
        if key in self._targets:
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._targets:
                return
            arguments = self._partition_arguments(target)
            name = target.dead_letter_queue
            try:
                async with asyncio.timeout(self.timeout), self._admin_channel() as channel:
                    for name, args in [(target.dead_letter_queue, DEAD_LETTER_QUEUE_ARGUMENTS)] + [
                        (name, arguments) for name in target.partitions
                    ]:
                        try:
                            await channel.queue_declare(name, durable=True, arguments=args)
                        except aiormq.exceptions.ChannelPreconditionFailed as exc:
                            raise BusError(
                                f"queue {name!r} already exists with other arguments than {args} "
                                f"(partitions, delivery limit or queue type changed?): {exc}"
                            ) from exc
                        self.declared_queues.add(name)
            except BusError:
                raise
            except Exception as exc:
                raise BusError(f"cannot declare queue {name!r}: {type(exc).__name__}: {exc}") from exc
            self._targets[key] = target

    async def _ensure_exchange(self) -> str:
        if self._exchange_declared:
            return self.exchange_name
        async with self._locks.setdefault("\x00exchange", asyncio.Lock()):
            if not self._exchange_declared:
                try:
                    async with asyncio.timeout(self.timeout), self._admin_channel() as channel:
                        await channel.exchange_declare(self.exchange_name, exchange_type="direct", durable=True)
                except BusError:
                    raise
                except Exception as exc:
                    raise BusError(
                        f"cannot declare exchange {self.exchange_name!r}: {type(exc).__name__}: {exc}"
                    ) from exc
                self.declared_exchanges.add(self.exchange_name)
                self._exchange_declared = True
        return self.exchange_name

    # -- producing ---------------------------------------------------------------------------

    async def send(self, queue: str, message: Envelope) -> None:
        self._check_open()
        check_name("queue", queue)
        body = _encode(message)
        target = self._queue_target(queue)
        await self._ensure(target)
        key = target.partitions[partition_of(message.session_id, self.partitions)]
        try:
            await self._publish("", key, body, _properties(message), mandatory=True)
        except BusError:
            # E.g. the queue was deleted under us: declare again on the next send instead of failing forever.
            self._targets.pop(target.dead_letter_queue, None)
            raise

    async def publish(self, event: Envelope) -> None:
        self._check_open()
        body = _encode(event)
        exchange = await self._ensure_exchange()
        key = f"{event.type}.p{partition_of(event.session_id, self.partitions)}"
        # Not mandatory: an event nobody subscribes to reaches nobody (topic semantics).
        try:
            await self._publish(exchange, key, body, _properties(event), mandatory=False)
        except BusError:
            self._exchange_declared = False  # e.g. deleted under us: declared again next time
            raise

    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, properties: spec.Basic.Properties, *, mandatory: bool
    ) -> None:
        # Straight to aiormq, with publisher confirms: returns once the broker has the message
        # (quorum: replicated). A connection lost before the confirm is retried on the recovered one
        # within ``timeout``: the broker may then hold it twice, which consumers dedupe (inbox).
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    channel = await self._publishing_channel()
                    try:
                        await channel.basic_publish(
                            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
                        )
                        return
                    except aiormq.exceptions.DeliveryError:
                        raise  # returned or nacked: the broker's answer about this message
                    except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                        if isinstance(exc, aiormq.exceptions.ChannelClosed) and not channel.connection.is_closed:
                            raise  # the broker closed the channel over this publish (e.g. no such exchange)
                        log.info(
                            "publish to %r interrupted (%s: %s); retrying once recovered",
                            routing_key,
                            type(exc).__name__,
                            exc,
                        )
                        if not channel.is_closed:
                            await asyncio.sleep(0.05)  # an error that did not close anything: no hot loop
        except BusError:
            raise
        except aiormq.exceptions.PublishError as exc:
            raise BusError(f"message to {routing_key!r} was unroutable (queue deleted?): {exc}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BusError(f"broker refused the message to {routing_key!r}: {exc}") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
            raise BusError(f"cannot publish to {routing_key!r}: {type(exc).__name__}: {exc}") from exc

    async def _publish_dead_letter(
        self, target: _Target, original: aiormq.abc.DeliveredMessage, reason: str, attempts: int
    ) -> None:
        self._check_open()
        source = original.header.properties
        properties = spec.Basic.Properties(
            content_type=source.content_type or "application/json",
            delivery_mode=PERSISTENT,
            message_id=source.message_id,
            correlation_id=source.correlation_id,
            message_type=source.message_type,
            headers={
                H_REASON: reason[:MAX_REASON],
                H_ATTEMPTS: attempts,
                H_AT: utc_now(),
                H_SOURCE: target.name,
            },
        )
        # The bytes as sent: no per-delivery headers.
        await self._publish("", target.dead_letter_queue, original.body, properties, mandatory=True)

    # -- consuming ---------------------------------------------------------------------------

    async def consume(
        self, queue: str, handler: Handler, *, max_concurrent_sessions: int | None = None
    ) -> RabbitConsumer:
        self._check_open()
        check_name("queue", queue)
        target = self._queue_target(queue)
        await self._ensure(target)
        return await self._attach(target, handler, max_concurrent_sessions)

    async def subscribe(
        self,
        subscription: str,
        event_types: Collection[str],
        handler: Handler,
        *,
        max_concurrent_sessions: int | None = None,
    ) -> RabbitConsumer:
        self._check_open()
        check_name("subscription", subscription)
        types = sorted(subscription_types(event_types))
        for event_type in types:
            check_name("event type", event_type)
        target = await self._ensure_subscription(subscription, types)
        return await self._attach(target, handler, max_concurrent_sessions)

    async def _ensure_subscription(self, subscription: str, types: list[str]) -> _Target:
        """The subscription's partitions and DLQ, the exchange, and a binding per event type and partition."""
        target = self._subscription_target(subscription)
        await self._ensure(target)
        exchange = await self._ensure_exchange()
        base = target.dead_letter_queue
        for event_type in types:
            if (base, event_type) in self._bound:
                continue
            try:
                async with asyncio.timeout(self.timeout), self._admin_channel() as channel:
                    for k, name in enumerate(target.partitions):
                        await channel.queue_bind(name, exchange, routing_key=f"{event_type}.p{k}")
            except BusError:
                raise
            except Exception as exc:
                raise BusError(f"cannot bind {subscription!r} to {event_type!r}: {type(exc).__name__}: {exc}") from exc
            self._bound.add((base, event_type))
        return target

    async def provision(self, queues: Collection[str], subscriptions: Mapping[str, Collection[str]]) -> list[str]:
        """Declare what consuming ``queues`` and subscribing ``subscriptions`` would, without consuming
        (``ecom bus provision``): the partitions and dead-letter queue of each, the events exchange, and the
        bindings of each subscription's event types. Idempotent; bindings of types no longer listed are kept
        (RabbitMQ has no listing of them without the management plugin). One line per thing, for the CLI."""
        self._check_open()
        report: list[str] = []
        for queue in queues:
            check_name("queue", queue)
            target = self._queue_target(queue)
            await self._ensure(target)
            report.append(f"queue {queue}: {len(target.partitions)} partitions + {target.dead_letter_queue}")
        report.append(f"exchange {await self._ensure_exchange()}: declared")
        for name, event_types in subscriptions.items():
            check_name("subscription", name)
            types = sorted(subscription_types(event_types))
            for event_type in types:
                check_name("event type", event_type)
            target = await self._ensure_subscription(name, types)
            report.append(f"subscription {name}: {len(target.partitions)} partitions bound to {', '.join(types)}")
        return report

    async def broadcast(self, event_types: Collection[str], handler: Handler) -> RabbitBroadcast:
        """Every process calling this gets every published event of these types, in publish order, one
        handler call at a time. Not durable: a queue of this connection only (see RabbitBroadcast). A
        failing handler is retried ``broadcast_attempts`` times with back-off, then the event is dropped."""
        self._check_open()
        types = sorted(subscription_types(event_types))
        for event_type in types:
            check_name("event type", event_type)
        await self._ensure_exchange()
        consumer = RabbitBroadcast(self, types, handler)
        await consumer._start()
        self._consumers.add(consumer)
        return consumer

    async def _attach(self, target: _Target, handler: Handler, limit: int | None) -> RabbitConsumer:
        limit = self.max_concurrent_sessions if limit is None else limit
        if limit < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        prefetch = self.prefetch or max(2 * limit, 32)
        consumer = RabbitConsumer(self, target, handler, limit, prefetch)
        await consumer._start()
        self._consumers.add(consumer)
        return consumer

    # -- introspection -----------------------------------------------------------------------

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        """Dead letters of the queue and/or subscription named ``queue``, oldest first.

        Non-destructive: messages are fetched unacked and handed back when the reading channel closes.
        """
        self._check_open()
        check_name("queue", queue)
        letters: list[DeadLetter] = []
        for target in (self._queue_target(queue), self._subscription_target(queue)):
            letters += await self._read_dead_letters(target)
        return sorted(letters, key=lambda letter: letter.dead_lettered_at)

    async def _read_dead_letters(self, target: _Target) -> list[DeadLetter]:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise BusError(f"RabbitMQ connection to {_safe_url(self.url)} is down (reconnecting)")
        name = target.dead_letter_queue
        letters: list[DeadLetter] = []
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.timeout):
                # Its own channel: a failed passive declare closes it, and closing it returns every
                # fetched message to the DLQ.
                channel = await connection.channel(publisher_confirms=False)
                try:
                    await channel.queue_declare(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return []  # never declared: nothing was ever dead-lettered there
                for _ in range(DEAD_LETTER_READ_LIMIT):
                    got = await channel.basic_get(name, no_ack=False)
                    if not isinstance(got.delivery, spec.Basic.GetOk):
                        break
                    letters.append(_dead_letter_from(got, target.name, target.kind))
        except BusError:
            raise
        except Exception as exc:
            raise BusError(f"cannot read dead letters of {name!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            if channel is not None and not channel.is_closed:
                await _close_quietly(channel, self.timeout)
        return letters

    async def dead_letter_count(self, queue: str, *, kind: str | None = None) -> int:
        """The DLQs' message counts (a passive declare each): no message is read, so none is returned to its
        DLQ (which a delivery limit would count). Messages a concurrent listing holds unacked are not in it."""
        self._check_open()
        check_name("queue", queue)
        count = 0
        for target in self._dead_letter_targets(queue, kind):
            count += await self._dead_letter_queue_size(target.dead_letter_queue)
        return count

    async def _dead_letter_queue_size(self, name: str) -> int:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise BusError(f"RabbitMQ connection to {_safe_url(self.url)} is down (reconnecting)")
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.timeout):
                channel = await connection.channel(publisher_confirms=False)  # a failed passive declare closes it
                try:
                    declared = await channel.queue_declare(name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return 0  # never declared: nothing was ever dead-lettered there
                return declared.message_count or 0
        except Exception as exc:
            raise BusError(f"cannot count dead letters of {name!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            if channel is not None and not channel.is_closed:
                await _close_quietly(channel, self.timeout)

    def _dead_letter_targets(self, queue: str, kind: str | None) -> list[_Target]:
        check_kind(kind)
        targets = [self._queue_target(queue), self._subscription_target(queue)]
        return [target for target in targets if kind in (None, target.kind)]

    async def dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        return next((letter for letter in await self.dead_letters(queue) if matches(letter, message_id, kind)), None)

    async def discard_dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        """Remove the oldest dead letter with that message id: ``basic.get`` through the DLQ on a channel of
        its own, ``basic.ack`` of that one only; closing the channel returns the others to the DLQ."""
        self._check_open()
        check_name("queue", queue)
        wanted = await self.dead_letter(queue, message_id, kind=kind)
        if wanted is None:
            return None
        target = next(t for t in self._dead_letter_targets(queue, wanted.kind))
        return await self._take_dead_letter(target, wanted)

    async def _take_dead_letter(self, target: _Target, wanted: DeadLetter) -> DeadLetter | None:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise BusError(f"RabbitMQ connection to {_safe_url(self.url)} is down (reconnecting)")
        name = target.dead_letter_queue
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.timeout):
                channel = await connection.channel(publisher_confirms=False)
                for _ in range(DEAD_LETTER_READ_LIMIT):
                    got = await channel.basic_get(name, no_ack=False)
                    if not isinstance(got.delivery, spec.Basic.GetOk):
                        return None  # gone meanwhile (discarded or replayed by someone else)
                    letter = _dead_letter_from(got, target.name, target.kind)
                    if letter.envelope.message_id == wanted.envelope.message_id:
                        await channel.basic_ack(got.delivery_tag)  # type: ignore[arg-type]
                        # A round trip after the ack: once it is answered the broker has the ack, so the
                        # close below cannot hand this message back.
                        await channel.queue_declare(name, passive=True)
                        return letter
        except BusError:
            raise
        except Exception as exc:
            raise BusError(f"cannot discard a dead letter of {name!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            if channel is not None and not channel.is_closed:
                await _close_quietly(channel, self.timeout)
        return None

    async def redeliver(self, kind: str, name: str, envelope: Envelope) -> None:
        """To the partition of its session of that queue or subscription, through the default exchange:
        a subscription gets it alone (not the events exchange, which would fan it out to every subscriber)."""
        self._check_open()
        check_kind(kind)
        check_name(kind, name)
        body = _encode(envelope)
        target = self._queue_target(name) if kind == QUEUE else self._subscription_target(name)
        await self._ensure(target)
        key = target.partitions[partition_of(envelope.session_id, self.partitions)]
        await self._publish("", key, body, _properties(envelope), mandatory=True)


def _closing_reason(closing: asyncio.Future[Any]) -> str:
    """Why a connection/channel closed; reading it marks the future's exception as retrieved."""
    if closing.cancelled():
        return "cancelled"
    exc = closing.exception()
    if exc is None or isinstance(exc, asyncio.CancelledError):
        return "closed"
    return f"{type(exc).__name__}: {exc}"


async def _close_quietly(resource: aiormq.abc.AbstractConnection | aiormq.abc.AbstractChannel, timeout: float) -> None:
    # Closing something that may already be dead: the outcome does not matter, the time does.
    with suppress(Exception):
        await asyncio.wait_for(resource.close(), timeout)


def _dead_letter_from(message: aiormq.abc.DeliveredMessage, source: str, kind: str = QUEUE) -> DeadLetter:
    properties = message.header.properties
    headers = dict(properties.headers or {})
    try:
        envelope = Envelope.decode(message.body)
    except MalformedMessage as exc:
        envelope = Envelope(
            type="<malformed>",
            session_id="<unknown>",
            body={"raw": message.body.decode("utf-8", "replace"), "error": str(exc)},
            message_id=properties.message_id or "<unknown>",
        )
    if H_REASON in headers:  # dead-lettered by a consumer of ours
        return DeadLetter(
            queue=source,
            envelope=envelope,
            reason=_text(headers[H_REASON]),
            attempts=_int(headers.get(H_ATTEMPTS)),
            dead_lettered_at=_text(headers.get(H_AT) or utc_now()),
            kind=kind,
        )
    # Dead-lettered by the broker (x-delivery-limit: consumers kept dying before settling it).
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    broker_reason = _text(death.get("reason") or headers.get("x-first-death-reason") or "unknown")
    attempts = _int(headers.get("x-delivery-count"), _int(death.get("count")))
    if broker_reason == "delivery_limit":
        reason = (
            f"DeliveryLimitExceeded: delivered {attempts or 'too many'} times to consumers that stopped "
            f"or crashed before settling it (x-delivery-limit)"
        )
    else:
        reason = f"BrokerDeadLettered: {broker_reason}"
    return DeadLetter(
        queue=source,
        envelope=envelope,
        reason=reason,
        attempts=attempts,
        dead_lettered_at=_format_time(death.get("time")),
        kind=kind,
    )


def create_bus(settings: Any) -> RabbitBus:
    """The factory runtime.cli.make_bus calls (``settings``: config.settings.Settings)."""
    bus = settings.bus
    return RabbitBus(
        bus.url or DEFAULT_URL,
        max_attempts=bus.max_attempts,
        max_concurrent_sessions=bus.max_concurrent_sessions,
        partitions=bus.partitions,
        redelivery_delay=getattr(bus, "redelivery_delay", 1.0),
    )
