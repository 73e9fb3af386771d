"""Session receiving: a consumer is a session processor (receivers on NEXT_AVAILABLE_SESSION, one
session each, its lock renewed in the background) settling each message by its handler's outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from azure.servicebus import (
    ServiceBusReceivedMessage,
)
from azure.servicebus.aio import ServiceBusReceiver
from azure.servicebus.exceptions import (
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusError,
    SessionLockLostError,
)

from bus.base import (
    Handler,
    MalformedMessage,
)
from bus.deadletters import QUEUE, SUBSCRIPTION
from bus.envelope import Envelope, utc_now
from bus.servicebus.messages import MAX_REASON, _body, _truncate
from bus.tracing import traced

if TYPE_CHECKING:
    from bus.servicebus.azurebus import AzureBus

log = logging.getLogger(__name__)

ACCEPT_GRACE = 2.0  # seconds the client waits beyond the broker-side session accept timeout
STOP_GRACE = 0.5  # seconds stop() lets cancelled receivers wind down before closing them outright


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
        # (name, kind) as DeadLetter has them: a subscription's label is "<topic>/<subscription>"
        topic, slash, subscription = label.partition("/")
        self._source = (subscription, SUBSCRIPTION) if slash and topic == bus.topic else (label, QUEUE)
        self._on_missing = on_missing  # called when the entity is gone (e.g. to re-create it)
        self._make_receiver = make_receiver
        self._handler = traced(handler, "servicebus", label)  # a CONSUMER span per delivery when tracing is on
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
        while (
            not self._stopped and len(self._workers) - self._active < self._standby and len(self._workers) < self._limit
        ):
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
        renewer = asyncio.get_running_loop().create_task(
            self._keep_lock(receiver, lost), name=f"bus:azure:lock:{self.label}"
        )
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
            remaining = (
                (until - datetime.now(UTC)).total_seconds() if until else self._bus.lock_duration.total_seconds()
            )
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
                log.info(
                    "bus consumer %s: renewing session %s failed, retrying: %s", self.label, session.session_id, exc
                )

    def _lock_lost(self, session_id: str, lost: asyncio.Event, exc: BaseException) -> None:
        self.locks_lost += 1
        log.warning("bus consumer %s: session %s lock lost, dropping the session: %s", self.label, session_id, exc)
        lost.set()

    async def _process(
        self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, lost: asyncio.Event
    ) -> bool:
        """Handle one message and settle it; False when the session has to be given up."""
        attempt = (message.delivery_count or 0) + 1
        try:
            envelope = Envelope.decode(_body(message))
        except MalformedMessage as exc:
            log.error("bus consumer %s: dead-lettering malformed message %s: %s", self.label, message.message_id, exc)
            return await self._dead_letter(receiver, message, f"MalformedMessage: {exc}", attempt)
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
            return await self._dead_letter(receiver, message, reason, attempt)
        log.warning(
            "redelivering %s %s (session %s) on %s, attempt %d failed: %s",
            envelope.type, envelope.message_id, envelope.session_id, self.label, attempt, reason,
        )  # fmt: skip
        return await self._settle(receiver.abandon_message(message), message)

    async def _dead_letter(
        self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, reason: str, attempt: int
    ) -> bool:
        description = json.dumps({"attempts": attempt, "dead_lettered_at": utc_now()})
        settlement = receiver.dead_letter_message(
            message, reason=_truncate(reason, MAX_REASON), error_description=description
        )
        settled = await self._settle(settlement, message)
        if settled:  # else Service Bus redelivers it: counted when it is dead-lettered for good
            self._bus.dead_lettered[self._source] += 1
        return settled

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
