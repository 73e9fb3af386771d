"""Azure Service Bus backend (``ECOM_BUS=azure``), on ``azure-servicebus`` (``azure.servicebus.aio``).

Mapping of the Bus contract (bus/base.py) onto Service Bus:

- ``send(queue, env)``: a session-enabled queue per service; the message's ``session_id`` is the
  envelope's (the target entity id), so Service Bus delivers one entity's messages in order to one
  receiver at a time. ``publish(env)``: the topic ``ecom-events``; every subscribing service has a
  session-enabled subscription with one rule per event type, a correlation filter on ``subject``
  (= the envelope type). Every message carries ``message_id`` (duplicate detection),
  ``correlation_id``, the headers as application properties, and the envelope JSON as its body.
- Consumers are session processors: receivers on ``NEXT_AVAILABLE_SESSION``, each holding one
  session while it has messages (up to ``max_concurrent_sessions`` at once, plus a couple of idle
  receivers waiting for the next session). A held session's lock is renewed in the background; if the
  lock is lost anyway the handler is cancelled and the session dropped, so Service Bus hands it (and
  its unsettled message) to whoever accepts it next.
- Handler returns: complete. Handler raises: abandon (the delivery count goes up and the same receiver
  gets the message again before any later one of the session); on the ``max_attempts``-th delivery:
  dead-letter with the error as ``DeadLetterReason`` and the attempt count and time as a JSON
  ``DeadLetterErrorDescription``. Queues and subscriptions are created with ``MaxDeliveryCount =
  max_attempts`` so a message whose receiver keeps dying is dead-lettered by the broker too.
- ``broadcast(types, h)``: a subscription per call (unique name, ``AutoDeleteOnIdle`` as a backstop
  for a process that dies without stopping it, a correlation rule on ``subject`` per type) read by one
  session receiver at a time; stop()/close() delete it through the management API.
- ``dead_letters(name)`` peeks the ``$DeadLetterQueue`` of the queue and of the subscription with that
  name (peeking locks nothing).
- Entities are created on first use through ``ServiceBusAdministrationClient`` (needs a connection
  string with Manage rights); without them the bus logs it once and relies on ``ecom bus provision``
  having created everything beforehand (see :func:`provision`).

Configured by ``ECOM_BUS_URL`` (a connection string) or ``ECOM_BUS_NAMESPACE`` (with
``azure.identity.aio.DefaultAzureCredential``, imported only then).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

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
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
    SessionLockLostError,
)
from azure.servicebus.management import CorrelationRuleFilter

from bus.base import BusError, DeadLetter, Handler, MalformedMessage, check_name, subscription_types
from bus.envelope import Envelope, utc_now

if TYPE_CHECKING:
    import argparse

    from config import Settings

__all__ = ["TOPIC", "AzureBroadcast", "AzureBus", "AzureConsumer", "create_bus", "provision", "register"]

log = logging.getLogger(__name__)

TOPIC = "ecom-events"
DEFAULT_DUPLICATE_WINDOW = timedelta(minutes=10)
ACCEPT_GRACE = 2.0  # seconds the client waits beyond the broker-side session accept timeout
STOP_GRACE = 0.5  # seconds stop() lets cancelled receivers wind down before closing them outright
MAX_REASON = 1024  # characters of the error kept as DeadLetterReason
BROADCAST_AUTO_DELETE = timedelta(minutes=5)  # a broadcast subscription nobody uses this long is deleted
BROADCAST_ATTEMPTS = 4  # handler calls per broadcast event before it is dropped with a warning
BROADCAST_RETRY_DELAY = 0.2  # seconds before the first retry, doubled per retry...
BROADCAST_MAX_RETRY_DELAY = 5.0  # ...up to this
_RULE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,50}$")
_ENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,259}$")


def _config_error(message: str) -> Exception:
    from config import ConfigError

    return ConfigError(message)


def rule_name(event_type: str) -> str:
    """The subscription rule for one event type: its own name when Service Bus allows it."""
    if _RULE_NAME.match(event_type) and not event_type.startswith("$"):
        return event_type
    return "t-" + hashlib.sha256(event_type.encode()).hexdigest()[:40]


def _label_only(rule_filter: Any) -> str | None:
    """The subject a rule matches when it is exactly one of ours (correlation filter on subject only)."""
    if not isinstance(rule_filter, CorrelationRuleFilter) or not rule_filter.label:
        return None
    others = ("correlation_id", "message_id", "to", "reply_to", "session_id", "reply_to_session_id", "content_type")
    if any(getattr(rule_filter, name, None) for name in others) or rule_filter.properties:
        return None
    return rule_filter.label


def _check_name(kind: str, name: str) -> None:
    check_name(kind, name)
    if not _ENTITY_NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not a valid Service Bus entity name "
            "(letters, digits, '.', '-', '_'; starting with a letter or digit; at most 260 characters)"
        )


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_message(envelope: Envelope) -> ServiceBusMessage:
    """The Service Bus message for an envelope (raises TypeError for a body that is not JSON)."""
    if not isinstance(envelope, Envelope):
        raise TypeError(f"expected an Envelope, got {type(envelope).__name__}")
    return ServiceBusMessage(
        envelope.encode(),
        message_id=envelope.message_id,
        session_id=envelope.session_id,
        correlation_id=envelope.correlation_id,
        subject=envelope.type,
        content_type="application/json",
        application_properties=dict(envelope.headers) or None,
    )


def _body(message: ServiceBusReceivedMessage) -> bytes:
    body = message.body
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return b"".join(bytes(part) for part in body)


class _Provisioner:
    """Creates queues, the topic, subscriptions and rules with the ATOM management API, idempotently."""

    def __init__(
        self,
        admin: ServiceBusAdministrationClient,
        *,
        topic: str,
        max_delivery_count: int,
        lock_duration: timedelta,
        duplicate_window: timedelta | None,
    ) -> None:
        self.admin = admin
        self.topic = topic
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.duplicate_window = duplicate_window

    async def _create(self, what: str, create: Awaitable[Any]) -> bool:
        """True when created, False when it was already there."""
        try:
            await create
        except HttpResponseError as exc:
            if exc.status_code == 409:
                return False
            raise
        log.info("created %s", what)
        return True

    async def queue(self, name: str) -> bool:
        dedup = self.duplicate_window is not None
        return await self._create(
            f"queue {name}",
            self.admin.create_queue(
                name,
                requires_session=True,
                max_delivery_count=self.max_delivery_count,
                lock_duration=self.lock_duration,
                requires_duplicate_detection=dedup,
                duplicate_detection_history_time_window=self.duplicate_window if dedup else None,
                dead_lettering_on_message_expiration=True,
            ),
        )

    async def ensure_topic(self) -> bool:
        dedup = self.duplicate_window is not None
        return await self._create(
            f"topic {self.topic}",
            self.admin.create_topic(
                self.topic,
                requires_duplicate_detection=dedup,
                duplicate_detection_history_time_window=self.duplicate_window if dedup else None,
            ),
        )

    async def subscription(self, name: str, event_types: Collection[str]) -> list[str]:
        """Create the subscription if needed and make its rules exactly one per event type."""
        done: list[str] = []
        if await self._create(
            f"subscription {self.topic}/{name}",
            self.admin.create_subscription(
                self.topic,
                name,
                requires_session=True,
                max_delivery_count=self.max_delivery_count,
                lock_duration=self.lock_duration,
                dead_lettering_on_message_expiration=True,
                dead_lettering_on_filter_evaluation_exceptions=True,
            ),
        ):
            done.append(f"created subscription {self.topic}/{name}")
        wanted = {rule_name(t): t for t in sorted(event_types)}
        existing = [rule async for rule in self.admin.list_rules(self.topic, name)]
        satisfied: set[str] = set()
        stale: list[str] = []
        for rule in existing:
            label = _label_only(rule.filter)
            if label is not None and label in event_types and label not in satisfied:
                satisfied.add(label)
            else:
                stale.append(rule.name)
        # A stale rule squatting on a name we need goes first; the other stale ones (the $Default rule
        # that matches everything, types no longer subscribed) only after ours exist, so there is no
        # moment without a rule in which events for this service would be dropped.
        for name_ in [n for n in stale if n in wanted]:
            await self._delete_rule(name, name_)
            done.append(f"deleted rule {name_}")
        for rule_name_, event_type in wanted.items():
            if event_type in satisfied:
                continue
            if await self._create(
                f"rule {self.topic}/{name}/{rule_name_}",
                self.admin.create_rule(self.topic, name, rule_name_, filter=CorrelationRuleFilter(label=event_type)),
            ):
                done.append(f"created rule {rule_name_} (subject = {event_type!r})")
        for name_ in [n for n in stale if n not in wanted]:
            await self._delete_rule(name, name_)
            done.append(f"deleted rule {name_}")
        return done

    async def broadcast_subscription(self, name: str, event_types: Collection[str], auto_delete_on_idle: timedelta) -> None:
        """A new per-process subscription that gets exactly these event types and deletes itself once
        unused for ``auto_delete_on_idle`` (the process died without stop())."""
        await self.admin.create_subscription(
            self.topic,
            name,
            requires_session=True,
            max_delivery_count=self.max_delivery_count,
            lock_duration=self.lock_duration,
            auto_delete_on_idle=auto_delete_on_idle,
        )
        # Nobody receives from it yet, so the order is free: the $Default rule (everything) goes first,
        # and the handler never sees an event of another type.
        await self._delete_rule(name, "$Default")
        for event_type in sorted(event_types):
            await self.admin.create_rule(
                self.topic, name, rule_name(event_type), filter=CorrelationRuleFilter(label=event_type)
            )
        log.info("created broadcast subscription %s/%s for %s", self.topic, name, ", ".join(sorted(event_types)))

    async def delete_subscription(self, name: str) -> None:
        try:
            await self.admin.delete_subscription(self.topic, name)
        except ResourceNotFoundError:
            pass  # gone already (AutoDeleteOnIdle, or a half-made one)
        except HttpResponseError as exc:
            if exc.status_code != 404:
                raise

    async def _delete_rule(self, subscription: str, name: str) -> None:
        try:
            await self.admin.delete_rule(self.topic, subscription, name)
        except ResourceNotFoundError:
            pass  # someone else removed it first
        except HttpResponseError as exc:
            if exc.status_code != 404:
                raise


class AzureConsumer:
    """A session processor for one queue or subscription; stop() behaves like the process dying."""

    def __init__(
        self,
        bus: AzureBus,
        label: str,
        make_receiver: Callable[[], ServiceBusReceiver],
        handler: Handler,
        limit: int,
        on_missing: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._bus = bus
        self.label = label
        self._on_missing = on_missing  # called when the entity is gone (e.g. to re-create it)
        self._make_receiver = make_receiver
        self._handler = handler
        self._limit = limit
        self._standby = min(limit, bus.standby_receivers)
        self._workers: set[asyncio.Task[None]] = set()
        self._handler_of: dict[asyncio.Task[None], asyncio.Future[Any]] = {}
        self._accepting: dict[asyncio.Task[None], ServiceBusReceiver] = {}  # workers waiting for a session
        self._active = 0  # workers holding a session
        self._stopped = False
        self.sessions_accepted = 0
        self.locks_lost = 0

    def start(self) -> None:
        self._top_up()

    def _top_up(self) -> None:
        """Keep ``standby`` receivers waiting for a session, without exceeding the session limit."""
        loop = asyncio.get_running_loop()
        while not self._stopped and len(self._workers) - self._active < self._standby and len(self._workers) < self._limit:
            task = loop.create_task(self._worker(), name=f"bus:azure:{self.label}")
            self._workers.add(task)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._bus._consumers.discard(self)
        current = asyncio.current_task()
        # A handler may stop its own consumer: its worker finishes that message and then exits.
        tasks = [t for t in self._workers if t is not current and self._handler_of.get(t) is not current]
        holding: list[asyncio.Task[None]] = []
        for task in tasks:
            task.cancel()
            receiver = self._accepting.get(task)
            if receiver is None:
                holding.append(task)
            else:
                # Only waiting for a session: nothing to hand back, so no need to wait for it. The
                # SDK's open does not always honour a cancel promptly; if it is still pending after
                # a moment, closing the receiver withdraws the accept at the broker.
                self._bus._track(self._bus._loop().create_task(self._reap(task, receiver)))
        if holding:  # workers holding a session: they release it (and any unsettled message) now
            await asyncio.wait(holding, timeout=self._bus.close_timeout)

    async def _reap(self, worker: asyncio.Task[None], receiver: ServiceBusReceiver) -> None:
        _, pending = await asyncio.wait({worker}, timeout=STOP_GRACE)
        if pending:
            self._bus._close_later(receiver)
            await asyncio.wait(pending, timeout=self._bus.close_timeout)

    # -- one worker: accept a session, process it until idle, release it ----------------------

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        backoff = 0.5
        try:
            while not self._stopped:
                if len(self._workers) - self._active > self._standby:
                    return  # enough others are waiting for sessions
                receiver = self._make_receiver()
                try:
                    self._accepting[task] = receiver
                    try:
                        # Opening the receiver is what accepts the next available session; Service Bus
                        # holds the attach until a session has messages or the wait times out. The
                        # receiver's own max_wait_time (what Service Bus is asked to wait) is
                        # accept_timeout; this call waits a little longer so that the broker's "no
                        # session" answer, not a client-side deadline, ends the wait.
                        messages = await receiver.receive_messages(
                            max_message_count=1, max_wait_time=self._bus.accept_timeout + ACCEPT_GRACE
                        )
                    except OperationTimeoutError:
                        continue  # no session became available: ask again
                    except Exception as exc:  # noqa: BLE001 - broker unreachable, entity gone, SDK trouble
                        if self._stopped:
                            return
                        if isinstance(exc, MessagingEntityNotFoundError) and self._on_missing is not None:
                            try:
                                await self._on_missing()
                            except Exception as again:  # noqa: BLE001 - retried with the back-off below
                                log.warning("bus consumer %s: cannot re-create it: %s", self.label, again)
                            else:
                                continue
                        log.warning(
                            "bus consumer %s: cannot accept a session (retrying in %.1fs): %s: %s",
                            self.label, backoff, type(exc).__name__, exc,
                        )  # fmt: skip
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    finally:
                        self._accepting.pop(task, None)
                    if self._stopped:
                        return  # accepted just as we were stopped: closing hands the session back
                    backoff = 0.5
                    self._active += 1
                    self.sessions_accepted += 1
                    try:
                        self._top_up()
                        await self._run_session(receiver, messages)
                    finally:
                        self._active -= 1
                finally:
                    # Releases the session lock (and hands unsettled messages back) at once.
                    self._bus._close_later(receiver)
        except asyncio.CancelledError:
            pass  # stop()/close(): unsettled messages go to other consumers
        except Exception:
            # Loud, but not re-raised: nobody awaits a worker, so that would only end up as "Task
            # exception was never retrieved". Its receiver is closed (the session and any unsettled
            # message go back to Service Bus) and the finally below starts a replacement worker.
            log.exception("bus consumer %s: worker crashed; starting another", self.label)
        finally:
            self._workers.discard(task)
            self._handler_of.pop(task, None)
            self._accepting.pop(task, None)
            if not self._stopped:
                self._top_up()

    async def _run_session(self, receiver: ServiceBusReceiver, messages: list[ServiceBusReceivedMessage]) -> None:
        session = receiver.session
        lost = asyncio.Event()
        renewer = asyncio.get_running_loop().create_task(self._keep_lock(receiver, lost), name=f"bus:azure:lock:{self.label}")
        try:
            while not self._stopped and not lost.is_set():
                if not messages:
                    messages = await receiver.receive_messages(
                        max_message_count=1, max_wait_time=self._bus.session_idle_timeout
                    )
                    if not messages:
                        return  # the session is idle: release it so any consumer can take it later
                for message in messages:
                    if lost.is_set() or not await self._process(receiver, message, lost):
                        return
                messages = []
        except SessionLockLostError as exc:
            self.locks_lost += 1
            log.warning("bus consumer %s: lost the lock on session %s: %s", self.label, session.session_id, exc)
        except ServiceBusError as exc:
            log.warning("bus consumer %s: session %s failed, releasing it: %s", self.label, session.session_id, exc)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException:
            log.exception("bus consumer %s: session %s failed, releasing it", self.label, session.session_id)
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer

    async def _keep_lock(self, receiver: ServiceBusReceiver, lost: asyncio.Event) -> None:
        """Renew the session lock at half its remaining time; flag ``lost`` once it cannot be kept."""
        session = receiver.session
        while True:
            until = session.locked_until_utc
            remaining = (until - datetime.now(UTC)).total_seconds() if until else self._bus.lock_duration.total_seconds()
            await asyncio.sleep(max(0.05, remaining / 2))
            try:
                await session.renew_lock(timeout=max(1.0, remaining / 2))
            except SessionLockLostError as exc:
                self._lock_lost(session.session_id, lost, exc)
                return
            except (ServiceBusError, OSError, ValueError) as exc:
                until = session.locked_until_utc
                if until is None or until <= datetime.now(UTC):
                    self._lock_lost(session.session_id, lost, exc)
                    return
                log.info("bus consumer %s: renewing session %s failed, retrying: %s", self.label, session.session_id, exc)

    def _lock_lost(self, session_id: str, lost: asyncio.Event, exc: BaseException) -> None:
        self.locks_lost += 1
        log.warning("bus consumer %s: session %s lock lost, dropping the session: %s", self.label, session_id, exc)
        lost.set()

    async def _process(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, lost: asyncio.Event) -> bool:
        """Handle one message and settle it; False when the session has to be given up."""
        attempt = (message.delivery_count or 0) + 1
        try:
            envelope = Envelope.decode(_body(message))
        except MalformedMessage as exc:
            log.error("bus consumer %s: dead-lettering malformed message %s: %s", self.label, message.message_id, exc)
            return await self._settle(
                receiver.dead_letter_message(
                    message,
                    reason=_truncate(f"MalformedMessage: {exc}", MAX_REASON),
                    error_description=json.dumps({"attempts": attempt, "dead_lettered_at": utc_now()}),
                ),
                message,
            )
        envelope = envelope.with_headers(**{"delivery-count": str(attempt)})
        outcome, interrupted = await self._call_handler(envelope, lost)
        keep_going = await self._settle_outcome(receiver, message, envelope, attempt, outcome)
        if interrupted:
            raise asyncio.CancelledError
        return keep_going

    async def _settle_outcome(
        self,
        receiver: ServiceBusReceiver,
        message: ServiceBusReceivedMessage,
        envelope: Envelope,
        attempt: int,
        outcome: Any,
    ) -> bool:
        if outcome is _LOST:
            log.warning(
                "bus consumer %s: cancelled %s %s: the session lock was lost, it will be redelivered",
                self.label, envelope.type, envelope.message_id,
            )  # fmt: skip
            return False
        if outcome is None:
            return await self._settle(receiver.complete_message(message), message)
        reason = f"{type(outcome).__name__}: {outcome}"
        if attempt >= self._bus.max_attempts:
            log.error(
                "dead-lettering %s %s (session %s) from %s after %d attempts: %s",
                envelope.type, envelope.message_id, envelope.session_id, self.label, attempt, reason, exc_info=outcome,
            )  # fmt: skip
            description = json.dumps({"attempts": attempt, "dead_lettered_at": utc_now()})
            return await self._settle(
                receiver.dead_letter_message(message, reason=_truncate(reason, MAX_REASON), error_description=description),
                message,
            )
        log.warning(
            "redelivering %s %s (session %s) on %s, attempt %d failed: %s",
            envelope.type, envelope.message_id, envelope.session_id, self.label, attempt, reason,
        )  # fmt: skip
        return await self._settle(receiver.abandon_message(message), message)

    async def _settle(self, settlement: Awaitable[None], message: ServiceBusReceivedMessage) -> bool:
        """Settle; False if that failed (Service Bus then redelivers the message).

        Not interrupted by stop(): once the handler has finished, its message is settled (bounded by
        ``close_timeout``) before the worker exits, so a handled message is not handled again.
        """
        task = asyncio.ensure_future(settlement)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait({task}, timeout=self._bus.close_timeout)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the worker is going away either way
            raise
        except Exception as exc:  # noqa: BLE001 - lock lost, link gone...: Service Bus redelivers it
            log.warning(
                "bus consumer %s: could not settle message %s (it will be redelivered): %s: %s",
                self.label, message.message_id, type(exc).__name__, exc,
            )  # fmt: skip
            return False
        return True

    async def _call_handler(self, envelope: Envelope, lost: asyncio.Event) -> tuple[Any, bool]:
        """Run the handler as its own task, so a lost lock can cancel it.

        Returns (outcome, interrupted): the outcome is None (success), the exception the handler
        raised (failure) or _LOST (cancelled because the lock was lost); ``interrupted`` says the
        worker was cancelled (stop) after the handler had already finished: settle, then stop.
        """
        worker = asyncio.current_task()
        assert worker is not None
        try:
            call = asyncio.ensure_future(self._handler(envelope))
        except Exception as exc:  # noqa: BLE001 - the handler failed before returning an awaitable
            return exc, False
        self._handler_of[worker] = call
        lost_wait = asyncio.ensure_future(lost.wait())
        interrupted = False
        try:
            await asyncio.wait({call, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not call.done():  # stopped mid-handler: like the process dying, nothing is settled
                call.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait({call}, timeout=self._bus.close_timeout)
                _forget_outcome(call)
                raise
            interrupted = True
        finally:
            lost_wait.cancel()
            self._handler_of.pop(worker, None)
        if not call.done():  # the lock was lost while the handler ran
            call.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait({call}, timeout=self._bus.close_timeout)
            _forget_outcome(call)
            return _LOST, interrupted
        if call.cancelled():
            # The handler leaked a CancelledError of its own (nobody cancelled it): a failure, or it
            # would be redelivered forever without ever reaching max_attempts.
            return asyncio.CancelledError("the handler raised CancelledError"), interrupted
        return call.exception(), interrupted


_LOST = object()


def _announcements(handler: Handler, label: str, attempts: int, first_delay: float) -> Handler:
    """``handler`` for a broadcast stream: a failure is retried in place (holding the stream, so order
    holds) after ``first_delay`` seconds, doubling up to BROADCAST_MAX_RETRY_DELAY; after ``attempts``
    failed calls the event is dropped with a warning (completed: announcements are idempotent, and a
    dead letter of a per-process subscription would be deleted with it)."""

    async def handle(envelope: Envelope) -> None:
        delay = first_delay
        for attempt in range(1, attempts + 1):
            try:
                await handler(envelope)
                return
            except Exception as exc:  # noqa: BLE001 - logged; the stream must go on
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


def _broadcast_name() -> str:
    """A unique subscription name an operator can trace to its process (at most 50 characters)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:16].strip("-") or "host"
    return f"bc-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class AzureBroadcast:
    """A broadcast subscription of this process: stop() stops receiving and deletes the subscription."""

    def __init__(self, bus: AzureBus, subscription: str, event_types: frozenset[str], handler: Handler) -> None:
        self._bus = bus
        self.subscription = subscription
        self.event_types = event_types
        self.recreated = 0
        label = f"{bus.topic}/{subscription}"
        self._consumer = AzureConsumer(
            bus,
            label,
            self._make_receiver,
            _announcements(handler, f"broadcast {label}", bus.broadcast_attempts, bus.broadcast_retry_delay),
            1,  # one session, one handler call at a time: the stream's order
            on_missing=self._recreate,
        )
        self._stopped = False

    def _make_receiver(self) -> ServiceBusReceiver:
        bus = self._bus
        assert bus._receive_client is not None
        return bus._receive_client.get_subscription_receiver(
            bus.topic, self.subscription, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=bus.accept_timeout
        )

    async def _recreate(self) -> None:
        # Deleted under us (AutoDeleteOnIdle after the process was suspended that long, an operator):
        # make it again, or this process would silently stop hearing announcements.
        if self._stopped:
            return
        log.warning("broadcast subscription %s/%s is gone; re-creating it", self._bus.topic, self.subscription)
        await self._bus._create_broadcast(self.subscription, self.event_types)
        self.recreated += 1

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._bus._broadcasts.discard(self)
        await self._consumer.stop()
        await self._bus._delete_broadcast(self.subscription)


def _forget_outcome(call: asyncio.Future[Any]) -> None:
    """A handler cancelled because its lock was lost (or on stop) may still end with an error of its
    own (e.g. it turns the cancellation into a RuntimeError, or fails in its cleanup). Its message is
    redelivered either way, so the outcome does not matter, but it must be retrieved, now or when it
    ends: else asyncio reports "Task exception was never retrieved"."""

    def retrieve(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.info("a cancelled handler ended with %s: %s (its message is redelivered)", type(exc).__name__, exc)

    if call.done():
        retrieve(call)
    else:
        call.add_done_callback(retrieve)


class _Outbox:
    """Sends to one entity, one transfer at a time, coalescing what piles up meanwhile into batches.

    The SDK's sender is not made for concurrent ``send_messages`` on one link (they poll the same
    connection and slow each other down), so sends are serialised; messages that arrive while one is
    in flight go together in the next transfer as a ``ServiceBusMessageBatch`` (atomic, and in
    order). Every caller still waits for the broker to accept its own message, so a producer that
    awaits each send keeps its order.
    """

    def __init__(self, bus: AzureBus, entity: str, is_topic: bool) -> None:
        self._bus = bus
        self._entity = entity
        self._is_topic = is_topic
        self._pending: deque[tuple[ServiceBusMessage, asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.transfers = 0

    async def send(self, message: ServiceBusMessage) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"bus:azure:send:{self._entity}")
            self._bus._track(self._task)
        await future

    async def _drain(self) -> None:
        while self._pending:
            items: list[tuple[ServiceBusMessage, asyncio.Future[None]]] = []
            try:
                sender = await self._bus._sender(self._entity, self._is_topic)
                batch = None
                while self._pending:
                    message, future = self._pending[0]
                    if future.cancelled():  # its caller gave up before it went out
                        self._pending.popleft()
                        continue
                    if not items:
                        items.append(self._pending.popleft())
                        continue
                    if batch is None:
                        batch = await sender.create_message_batch()
                        batch.add_message(items[0][0])
                    try:
                        batch.add_message(message)
                    except MessageSizeExceededError:
                        break  # goes in the next transfer
                    items.append(self._pending.popleft())
                if not items:
                    return
                await sender.send_messages(batch if len(items) > 1 else items[0][0])
                self.transfers += 1
            except (ServiceBusError, ValueError) as exc:
                error = BusError(f"azure bus: could not send to {self._entity}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException as exc:  # cancelled (close) or a bug: nobody may wait forever
                for _, future in [*items, *self._pending]:
                    if not future.done():
                        future.set_exception(BusError(f"azure bus: sending to {self._entity} was interrupted: {exc!r}"))
                self._pending.clear()
                raise
            for _, future in items:
                if not future.done():
                    future.set_result(None)


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

            self._tls = ssl.create_default_context(cafile=self._client_options.get("connection_verify") or certifi.where())
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
        closers = [*self._senders.values(), *self._dead_letter_receivers.values()]
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
                letters += [letter for message in batch if (letter := self._dead_letter(name, message)) is not None]
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
    def _dead_letter(name: str, message: ServiceBusReceivedMessage) -> DeadLetter | None:
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
        return DeadLetter(queue=name, envelope=envelope, reason=reason, attempts=attempts, dead_lettered_at=at)


# -- configuration, provisioning, CLI -----------------------------------------------------------


def _credential_from_namespace() -> Any:
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise _config_error(
            "ECOM_BUS_NAMESPACE needs the azure-identity package (pip install azure-identity); "
            "or set ECOM_BUS_URL to a Service Bus connection string instead"
        ) from None
    return DefaultAzureCredential()


def _namespace_host(namespace: str) -> str:
    host = namespace.strip()
    for prefix in ("sb://", "amqps://", "https://"):
        host = host.removeprefix(prefix)
    return host.strip("/")


def _connection_args(settings: Settings) -> dict[str, Any]:
    bus = settings.bus
    if bus.url:
        if "endpoint=" not in bus.url.lower():
            raise _config_error(
                "ECOM_BUS_URL: for the azure backend this is a Service Bus connection string "
                "(Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...)"
            )
        return {"connection_string": bus.url}
    if bus.namespace:
        return {"namespace": _namespace_host(bus.namespace), "credential": _credential_from_namespace()}
    raise _config_error(
        "ECOM_BUS_URL or ECOM_BUS_NAMESPACE must be set for the azure backend "
        "(a connection string, or the fully qualified namespace used with an Azure identity)"
    )


def create_bus(settings: Settings, **options: Any) -> AzureBus:
    """The AzureBus for these settings (``runtime.cli.make_bus`` calls this for ``ECOM_BUS=azure``)."""
    args = _connection_args(settings)
    return AzureBus(
        **args,
        close_credential="credential" in args,
        max_attempts=settings.bus.max_attempts,
        max_concurrent_sessions=settings.bus.max_concurrent_sessions,
        **options,
    )


def default_queues() -> list[str]:
    """One queue per service that receives commands (every service but the gateway)."""
    from config import SERVICES

    return [name for name in SERVICES if name != "gateway"]


def declared_subscriptions() -> dict[str, list[str]]:
    """Event types services declare in ``BUS_SUBSCRIPTIONS`` of their service module, if any."""
    from runtime import services

    found: dict[str, list[str]] = {}
    for service in services.available():
        types = getattr(service.module, "BUS_SUBSCRIPTIONS", None)
        if types:
            found[service.name] = sorted(types)
    return found


async def provision(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    subscriptions: Mapping[str, Collection[str]] | None = None,
    lock_duration: timedelta = timedelta(seconds=60),
    duplicate_detection_window: timedelta | None = DEFAULT_DUPLICATE_WINDOW,
    admin_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the service queues, the ``ecom-events`` topic, and the subscriptions with their rules.

    Idempotent: existing entities are kept (their settings are not changed), rules are made to match
    exactly the given event types. Returns one line per thing done or found, for the CLI to print.
    """
    args = _connection_args(settings)
    options = dict(admin_options or {})
    if "connection_string" in args:
        admin = ServiceBusAdministrationClient.from_connection_string(args["connection_string"], **options)
    else:
        admin = ServiceBusAdministrationClient(args["namespace"], args["credential"], **options)
    provisioner = _Provisioner(
        admin,
        topic=TOPIC,
        max_delivery_count=settings.bus.max_attempts,
        lock_duration=lock_duration,
        duplicate_window=duplicate_detection_window,
    )
    report: list[str] = []
    try:
        for queue in default_queues() if queues is None else queues:
            _check_name("queue", queue)
            created = await provisioner.queue(queue)
            report.append(f"queue {queue}: {'created' if created else 'exists'}")
        created = await provisioner.ensure_topic()
        report.append(f"topic {TOPIC}: {'created' if created else 'exists'}")
        for name, types in (declared_subscriptions() if subscriptions is None else subscriptions).items():
            _check_name("subscription", name)
            if isinstance(types, str) or not types:
                raise ValueError(f"subscription {name}: give a non-empty collection of event types")
            changes = await provisioner.subscription(name, frozenset(types))
            report.append(f"subscription {TOPIC}/{name}: {', '.join(changes) if changes else 'up to date'}")
    finally:
        await admin.close()
        credential = args.get("credential")
        if credential is not None:
            await credential.close()
    return report


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``ecom bus provision``: create the Azure Service Bus entities (runtime/cli.py EXTRA_COMMANDS)."""
    parser = subparsers.add_parser("bus", help="message bus administration (Azure Service Bus)")
    sub = parser.add_subparsers(dest="bus_command", required=True)
    prov = sub.add_parser(
        "provision",
        help="create the queues, the ecom-events topic, subscriptions and rules in Azure Service Bus",
        description="Uses ECOM_BUS_URL (connection string with Manage rights) or ECOM_BUS_NAMESPACE "
        "(Azure identity). Existing entities are kept; rules are set to exactly the given event types.",
    )
    prov.add_argument(
        "--queue", action="append", metavar="NAME", help="a queue to create (repeatable; default: one per service)"
    )
    prov.add_argument(
        "--ca-file",
        metavar="PATH",
        help="CA bundle to verify the namespace's TLS certificate with (default: the system's)",
    )
    prov.add_argument(
        "--subscription",
        action="append",
        metavar="SERVICE=Type1,Type2",
        help="a subscription and its event types (repeatable; default: the services' BUS_SUBSCRIPTIONS)",
    )
    prov.set_defaults(handler=_cli_bus)


def _parse_subscriptions(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    if not values:
        return None
    parsed: dict[str, list[str]] = {}
    for value in values:
        name, sep, types = value.partition("=")
        event_types = [t.strip() for t in types.split(",") if t.strip()]
        if not sep or not name.strip() or not event_types:
            raise _config_error(f"--subscription {value!r}: expected SERVICE=Type1,Type2")
        parsed.setdefault(name.strip(), []).extend(event_types)
    return parsed


def _cli_bus(settings: Settings, args: argparse.Namespace) -> int:
    if args.bus_command != "provision":  # pragma: no cover - argparse enforces the choices
        return 2
    subscriptions = _parse_subscriptions(args.subscription)
    try:
        options = {"connection_verify": args.ca_file} if args.ca_file else None
        report = asyncio.run(
            provision(settings, queues=args.queue, subscriptions=subscriptions, admin_options=options)
        )
    except ValueError as exc:
        raise _config_error(str(exc)) from exc
    except (HttpResponseError, ClientAuthenticationError) as exc:
        print(f"ecom bus provision: Service Bus refused: {exc}")
        return 1
    for line in report:
        print(line)
    return 0
