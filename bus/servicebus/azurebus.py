"""``AzureBus``: the Bus on Azure Service Bus (bus/azure.py says how the contract maps onto it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, timedelta
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.exceptions import (
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
)

from bus.base import (
    BROADCAST_ATTEMPTS,
    BROADCAST_RETRY_DELAY,
    BusError,
    DeadLetter,
    Handler,
    MalformedMessage,
    check_name,
    subscription_types,
)
from bus.deadletters import QUEUE, check_kind, matches
from bus.envelope import Envelope, utc_now
from bus.servicebus.broadcast import (
    BROADCAST_AUTO_DELETE,
    AzureBroadcast,
    _broadcast_name,
)
from bus.servicebus.management import REPLAY_SUBJECT, REPLAY_TO, _Provisioner
from bus.servicebus.messages import (
    DEFAULT_DUPLICATE_WINDOW,
    TOPIC,
    _body,
    _check_name,
    to_message,
)
from bus.servicebus.receiving import AzureConsumer
from bus.servicebus.sending import _Outbox

log = logging.getLogger(__name__)

DEAD_LETTER_READ_LIMIT = 10_000  # messages a discard looks through before giving up
DISCARD_RECEIVE_WAIT = 2.0  # seconds a discard waits for the next batch of the dead-letter queue


class AzureBus:
    """The Bus on Azure Service Bus; one instance stands for one process's connections."""

    name = "azure"

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        namespace: str | None = None,
        credential: Any = None,
        max_attempts: int = 5,
        max_concurrent_sessions: int = 64,
        topic: str = TOPIC,
        lock_duration: timedelta = timedelta(seconds=60),
        duplicate_detection_window: timedelta | None = DEFAULT_DUPLICATE_WINDOW,
        accept_timeout: float = 30.0,
        session_idle_timeout: float = 1.0,
        standby_receivers: int = 2,
        auto_provision: bool = True,
        close_timeout: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
        admin_options: Mapping[str, Any] | None = None,
        close_credential: bool = False,
    ) -> None:
        if not connection_string and not (namespace and credential is not None):
            raise ValueError("AzureBus needs a connection string, or a namespace and a credential")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_concurrent_sessions < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        if standby_receivers < 1:
            raise ValueError("standby_receivers must be at least 1")
        self._connection_string = connection_string
        self._namespace = namespace
        self._credential = credential
        self.max_attempts = max_attempts
        self.max_concurrent_sessions = max_concurrent_sessions
        self.topic = topic
        self.lock_duration = lock_duration
        self.duplicate_detection_window = duplicate_detection_window
        self.accept_timeout = accept_timeout
        self.session_idle_timeout = session_idle_timeout
        self.standby_receivers = standby_receivers
        self.auto_provision = auto_provision
        self.close_timeout = close_timeout
        self._client_options = dict(client_options or {})
        self._admin_options = dict(admin_options or {})
        self._close_credential = close_credential
        self._tls: ssl.SSLContext | None = None
        self._client: ServiceBusClient | None = None  # senders; SDK retries on
        self._receive_client: ServiceBusClient | None = None  # session receivers; retry_total=0 (see start)
        self._admin: ServiceBusAdministrationClient | None = None
        self._provisioner: _Provisioner | None = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self._ensured: set[tuple[str, str]] = set()
        self._ensure_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._dead_letter_receivers: dict[tuple[str, str], ServiceBusReceiver] = {}
        self._consumers: set[AzureConsumer] = set()
        self.dead_lettered: Counter[tuple[str, str]] = Counter()  # (name, kind): messages dead-lettered (metrics)
        self._broadcasts: set[AzureBroadcast] = set()
        self.broadcast_auto_delete = BROADCAST_AUTO_DELETE
        self.broadcast_attempts = BROADCAST_ATTEMPTS
        self.broadcast_retry_delay = BROADCAST_RETRY_DELAY
        self._closing: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        """One TLS context for all connections: the SDK would otherwise build one (loading the whole
        CA bundle, ~0.1 s of CPU on the event loop) for every connection, i.e. for every session."""
        if self._tls is None:
            import certifi

            self._tls = ssl.create_default_context(
                cafile=self._client_options.get("connection_verify") or certifi.where()
            )
        return self._tls

    def _new_client(self, **options: Any) -> ServiceBusClient:
        merged = {**self._client_options, **options}
        if "ssl_context" not in merged:
            merged["ssl_context"] = self._ssl_context()
        if self._connection_string:
            return ServiceBusClient.from_connection_string(self._connection_string, **merged)
        assert self._namespace is not None
        return ServiceBusClient(self._namespace, self._credential, **merged)

    async def start(self) -> None:
        # Idempotent, and allowed after close(): the entities and their messages live in Service Bus.
        if self._started and not self._closed:
            return
        self._client = self._new_client()
        # Receivers poll for the next available session; a timeout there is normal, not something the
        # SDK should retry with back-off, and a failed settlement is redelivered by the broker anyway.
        self._receive_client = self._new_client(retry_total=0)
        if self.auto_provision:
            if self._connection_string:
                self._admin = ServiceBusAdministrationClient.from_connection_string(
                    self._connection_string, **self._admin_options
                )
            else:
                assert self._namespace is not None
                self._admin = ServiceBusAdministrationClient(self._namespace, self._credential, **self._admin_options)
            self._provisioner = _Provisioner(
                self._admin,
                topic=self.topic,
                max_delivery_count=self.max_attempts,
                lock_duration=self.lock_duration,
                duplicate_window=self.duplicate_detection_window,
            )
        self._started = True
        self._closed = False

    async def close(self) -> None:
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        await asyncio.gather(*(b.stop() for b in list(self._broadcasts)), return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in list(self._consumers)), return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + self.close_timeout
        drains = [o._task for o in self._outboxes.values() if o._task is not None and not o._task.done()]
        if drains:  # sends already accepted by send()/publish() go out before the links close
            await asyncio.wait(drains, timeout=self.close_timeout)
        self._outboxes.clear()
        closers: list[ServiceBusReceiver | ServiceBusSender] = [
            *self._senders.values(),
            *self._dead_letter_receivers.values(),
        ]
        self._senders.clear()
        self._dead_letter_receivers.clear()
        for handler in closers:
            self._close_later(handler)
        while self._closing:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._closing), timeout=remaining)
        for resource in (self._client, self._receive_client, self._admin):
            if resource is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.close_timeout):
                        await resource.close()
        self._client = self._receive_client = self._admin = None
        self._provisioner = None
        self._ensured.clear()
        if self._close_credential and self._credential is not None:
            with contextlib.suppress(Exception):
                await self._credential.close()

    def _close_later(self, handler: ServiceBusReceiver | ServiceBusSender) -> None:
        """Close a receiver/sender in the background: the detach goes out at once, the rest of the
        AMQP goodbye (end, close) does not hold up the caller."""

        async def close() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.close_timeout):
                    await handler.close()

        self._track(self._loop().create_task(close(), name="bus:azure:close"))

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Background work close() waits for (bounded): closing receivers/senders, reaping workers."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def ping(self) -> None:
        self._check_open()
        try:
            async with asyncio.timeout(10):
                await self._ensure_topic()
                assert self._receive_client is not None
                sender = self._receive_client.get_topic_sender(self.topic)
                try:
                    await sender.create_message_batch()  # opens the link: connection + authentication
                finally:
                    self._close_later(sender)
        except (ServiceBusError, HttpResponseError, ClientAuthenticationError, OSError, TimeoutError) as exc:
            raise BusError(f"Azure Service Bus is not usable: {type(exc).__name__}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("azure bus is closed")
        if not self._started:
            raise BusError("azure bus is not started")

    # -- entities ----------------------------------------------------------------------------

    async def _ensure(self, key: tuple[str, str], create: Callable[[_Provisioner], Awaitable[Any]]) -> None:
        if key in self._ensured or self._provisioner is None:
            return
        lock = self._ensure_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._ensured or self._provisioner is None:
                return
            try:
                await create(self._provisioner)
            except AzureError as exc:
                if isinstance(exc, ClientAuthenticationError) or getattr(exc, "status_code", None) in (401, 403):
                    log.warning(
                        "azure bus: no rights to manage entities (%s); assuming `ecom bus provision` created them",
                        exc,
                    )
                    self._provisioner = None
                    return
                raise BusError(f"azure bus: could not create {key[0]} {key[1]}: {exc}") from exc
            self._ensured.add(key)

    async def _ensure_queue(self, name: str) -> None:
        await self._ensure(("queue", name), lambda p: p.queue(name))

    async def _ensure_topic(self) -> None:
        await self._ensure(("topic", self.topic), lambda p: p.ensure_topic())

    # -- producing ---------------------------------------------------------------------------

    async def _sender(self, entity: str, is_topic: bool) -> ServiceBusSender:
        sender = self._senders.get(entity)
        if sender is None:
            assert self._client is not None
            sender = self._client.get_topic_sender(entity) if is_topic else self._client.get_queue_sender(entity)
            self._senders[entity] = sender
        return sender

    async def _send(self, entity: str, is_topic: bool, message: ServiceBusMessage) -> None:
        outbox = self._outboxes.get(entity)
        if outbox is None:
            outbox = self._outboxes[entity] = _Outbox(self, entity, is_topic)
        await outbox.send(message)

    async def send(self, queue: str, message: Envelope) -> None:
        self._check_open()
        _check_name("queue", queue)
        outgoing = to_message(message)
        await self._ensure_queue(queue)
        await self._send(queue, False, outgoing)

    async def publish(self, event: Envelope) -> None:
        self._check_open()
        outgoing = to_message(event)
        await self._ensure_topic()
        await self._send(self.topic, True, outgoing)

    # -- consuming ---------------------------------------------------------------------------

    def _limit(self, limit: int | None) -> int:
        limit = self.max_concurrent_sessions if limit is None else limit
        if limit < 1:
            raise ValueError("max_concurrent_sessions must be at least 1")
        return limit

    async def consume(
        self, queue: str, handler: Handler, *, max_concurrent_sessions: int | None = None
    ) -> AzureConsumer:
        self._check_open()
        _check_name("queue", queue)
        limit = self._limit(max_concurrent_sessions)
        await self._ensure_queue(queue)

        def make_receiver() -> ServiceBusReceiver:
            assert self._receive_client is not None
            return self._receive_client.get_queue_receiver(
                queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=self.accept_timeout
            )

        return self._start(AzureConsumer(self, queue, make_receiver, handler, limit))

    async def subscribe(
        self,
        subscription: str,
        event_types: Collection[str],
        handler: Handler,
        *,
        max_concurrent_sessions: int | None = None,
    ) -> AzureConsumer:
        self._check_open()
        _check_name("subscription", subscription)
        types = subscription_types(event_types)
        limit = self._limit(max_concurrent_sessions)
        await self._ensure_topic()
        if self._provisioner is not None:
            # Not cached: like replacing the subscription's rules, the latest subscriber's types win.
            try:
                await self._provisioner.subscription(subscription, types)
            except AzureError as exc:
                if isinstance(exc, ClientAuthenticationError) or getattr(exc, "status_code", None) in (401, 403):
                    log.warning("azure bus: cannot set the rules of subscription %s (%s)", subscription, exc)
                else:
                    raise BusError(f"azure bus: could not set up subscription {subscription}: {exc}") from exc

        def make_receiver() -> ServiceBusReceiver:
            assert self._receive_client is not None
            return self._receive_client.get_subscription_receiver(
                self.topic, subscription, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=self.accept_timeout
            )

        return self._start(AzureConsumer(self, f"{self.topic}/{subscription}", make_receiver, handler, limit))

    async def broadcast(self, event_types: Collection[str], handler: Handler) -> AzureBroadcast:
        """Every process calling this gets every published event of these types: a subscription of its
        own (unique name, AutoDeleteOnIdle ``broadcast_auto_delete``, one correlation rule on ``subject``
        per type), deleted by stop()/close(). Per session in publish order, one handler call at a time.
        A failing handler is retried ``broadcast_attempts`` times with back-off, then the event is
        dropped. Needs Manage rights (the subscription is made at run time)."""
        self._check_open()
        types = subscription_types(event_types)
        for event_type in types:
            check_name("event type", event_type)
        await self._ensure_topic()
        name = _broadcast_name()
        await self._create_broadcast(name, types)
        broadcast = AzureBroadcast(self, name, types, handler)
        self._broadcasts.add(broadcast)
        self._start(broadcast._consumer)
        return broadcast

    async def _create_broadcast(self, name: str, types: frozenset[str]) -> None:
        provisioner = self._provisioner
        if provisioner is None:
            raise BusError(
                "azure bus: broadcast needs a subscription per process, made at run time: it needs a "
                "connection with Manage rights and auto_provision (a shared pre-provisioned subscription "
                "would give each event to one process only)"
            )
        try:
            async with asyncio.timeout(self.close_timeout):
                await provisioner.broadcast_subscription(name, types, self.broadcast_auto_delete)
        except (AzureError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.close_timeout):
                    await provisioner.delete_subscription(name)  # no half-made subscription left behind
            raise BusError(f"azure bus: could not create broadcast subscription {name}: {exc}") from exc

    async def _delete_broadcast(self, name: str) -> None:
        provisioner = self._provisioner
        if provisioner is None:
            return
        try:
            async with asyncio.timeout(self.close_timeout):
                await provisioner.delete_subscription(name)
        except (AzureError, TimeoutError) as exc:
            log.warning(
                "azure bus: could not delete broadcast subscription %s (AutoDeleteOnIdle removes it after %s): %s",
                name, self.broadcast_auto_delete, exc,
            )  # fmt: skip

    def _start(self, consumer: AzureConsumer) -> AzureConsumer:
        self._consumers.add(consumer)
        consumer.start()
        return consumer

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        self._check_open()
        _check_name("queue", queue)
        letters: list[DeadLetter] = []
        for kind in ("queue", "subscription"):
            letters += await self._peek_dead_letters(kind, queue)
        return sorted(letters, key=lambda letter: letter.dead_lettered_at)

    async def _exists(self, kind: str, name: str) -> bool:
        """Whether the queue/subscription exists, asking the management API (a cheap HTTP GET) rather
        than opening an AMQP link just to be told it does not. Unknown (no rights): assume yes."""
        if (kind, name) in self._ensured or self._admin is None or self._provisioner is None:
            return True
        try:
            if kind == "queue":
                await self._admin.get_queue(name)
            else:
                await self._admin.get_subscription(self.topic, name)
        except ResourceNotFoundError:
            return False
        except HttpResponseError as exc:  # the SDK re-raises a 404 as a plain HttpResponseError
            return exc.status_code != 404
        except ClientAuthenticationError:
            return True
        return True

    async def _peek_dead_letters(self, kind: str, name: str) -> list[DeadLetter]:
        key = (kind, name)
        receiver = self._dead_letter_receivers.get(key)
        if receiver is None and not await self._exists(kind, name):
            return []
        if receiver is None:
            assert self._receive_client is not None
            if kind == "queue":
                receiver = self._receive_client.get_queue_receiver(name, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
            else:
                receiver = self._receive_client.get_subscription_receiver(
                    self.topic, name, sub_queue=ServiceBusSubQueue.DEAD_LETTER
                )
        letters: list[DeadLetter] = []
        sequence = 1
        try:
            while True:
                batch = await receiver.peek_messages(max_message_count=250, sequence_number=sequence)
                if not batch:
                    break
                letters += [
                    letter for message in batch if (letter := self._dead_letter(name, message, kind)) is not None
                ]
                sequence = (batch[-1].sequence_number or sequence) + 1
        except (MessagingEntityNotFoundError, ServiceBusAuthorizationError, ServiceBusAuthenticationError) as exc:
            # No such queue/subscription (the name may be only one of the two).
            self._dead_letter_receivers.pop(key, None)
            self._close_later(receiver)
            if isinstance(exc, MessagingEntityNotFoundError):
                return []
            raise BusError(f"azure bus: cannot read the dead letters of {kind} {name}: {exc}") from exc
        except ServiceBusError as exc:
            self._dead_letter_receivers.pop(key, None)
            self._close_later(receiver)
            raise BusError(f"azure bus: cannot read the dead letters of {kind} {name}: {exc}") from exc
        self._dead_letter_receivers[key] = receiver
        return letters

    @staticmethod
    def _dead_letter(name: str, message: ServiceBusReceivedMessage, kind: str = QUEUE) -> DeadLetter | None:
        try:
            envelope = Envelope.decode(_body(message))
        except MalformedMessage as exc:
            log.warning("dead letter %s on %s is not an envelope: %s", message.message_id, name, exc)
            return None
        reason = message.dead_letter_reason or "unknown"
        description = message.dead_letter_error_description
        attempts = message.delivery_count or 0
        enqueued = message.enqueued_time_utc
        at = enqueued.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if enqueued else utc_now()
        try:
            details = json.loads(description or "")
            attempts = int(details["attempts"])
            at = str(details["dead_lettered_at"])
        except (ValueError, TypeError, KeyError):
            if description:  # dead-lettered by the broker (MaxDeliveryCountExceeded...) or someone else
                reason = f"{reason}: {description}"
        return DeadLetter(
            queue=name, envelope=envelope, reason=reason, attempts=attempts, dead_lettered_at=at, kind=kind
        )

    async def dead_letter_count(self, queue: str, *, kind: str | None = None) -> int:
        # Peeking locks nothing and leaves delivery counts alone, so counting the peeked ones is safe (the
        # runtime properties would be cheaper, but need Manage rights a service may not have).
        check_kind(kind)
        return sum(1 for letter in await self.dead_letters(queue) if kind in (None, letter.kind))

    async def dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        check_kind(kind)
        return next((letter for letter in await self.dead_letters(queue) if matches(letter, message_id, kind)), None)

    async def discard_dead_letter(self, queue: str, message_id: str, *, kind: str | None = None) -> DeadLetter | None:
        """Remove the oldest dead letter with that envelope ``message_id``. Service Bus cannot receive a
        message by id, so a receiver on the ``$DeadLetterQueue`` takes messages in peek-lock mode until it
        meets it, completes that one and abandons the others (they stay, their delivery count goes up)."""
        self._check_open()
        _check_name("queue", queue)
        wanted = await self.dead_letter(queue, message_id, kind=kind)  # a peek: no lock taken for a miss
        if wanted is None:
            return None
        assert self._receive_client is not None
        if wanted.kind == QUEUE:
            receiver = self._receive_client.get_queue_receiver(
                queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=DISCARD_RECEIVE_WAIT
            )
        else:
            receiver = self._receive_client.get_subscription_receiver(
                self.topic, queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=DISCARD_RECEIVE_WAIT
            )
        held: list[ServiceBusReceivedMessage] = []
        try:
            while len(held) < DEAD_LETTER_READ_LIMIT:
                batch = await receiver.receive_messages(max_message_count=100, max_wait_time=DISCARD_RECEIVE_WAIT)
                if not batch:
                    return None  # gone meanwhile (discarded or replayed by someone else)
                for message in batch:
                    letter = self._dead_letter(queue, message, wanted.kind)
                    if letter is not None and letter.envelope.message_id == message_id:
                        await receiver.complete_message(message)
                        return letter
                    held.append(message)
            return None
        except ServiceBusError as exc:
            raise BusError(f"azure bus: cannot discard a dead letter of {wanted.kind} {queue}: {exc}") from exc
        finally:
            for message in held:
                with contextlib.suppress(Exception):
                    await receiver.abandon_message(message)
            self._close_later(receiver)

    async def redeliver(self, kind: str, name: str, envelope: Envelope) -> None:
        """To that queue, or to that subscription alone: published on the topic with subject
        ``REPLAY_SUBJECT`` (no event-type rule matches it) and ``REPLAY_TO = name``, which only that
        subscription's replay rule matches. The broker-level message id gets a suffix, because duplicate
        detection would drop the original id within its window; the envelope (the body) keeps its own
        ``message_id``, which is what consumers dedupe on."""
        self._check_open()
        check_kind(kind)
        _check_name(kind, name)
        message = to_message(envelope)
        message.message_id = f"{envelope.message_id[:90]}/replay-{uuid.uuid4().hex[:12]}"
        if kind == QUEUE:
            await self._ensure_queue(name)
            await self._send(name, False, message)
            return
        message.subject = REPLAY_SUBJECT
        properties: dict[str | bytes, Any] = dict(envelope.headers.items())
        properties[REPLAY_TO] = name
        message.application_properties = properties
        await self._ensure_topic()
        await self._send(self.topic, True, message)
