"""The per-session scheduler the memory and RabbitMQ consumers share.

A :class:`SessionScheduler` holds the messages taken in but not yet handled:

- ``sessions``: session id -> FIFO of pending items; an entry exists only while the session has items
  or is held, so idle sessions cost nothing;
- ``ready``: FIFO of sessions that have items and that no worker is handling;
- ``held``: sessions that are in ``ready`` or being handled / waiting for redelivery. A session is held
  by at most one worker, which gives "one handler call per session" however many pools share it.

A :class:`WorkerPool` (one per consumer) runs up to ``limit`` worker tasks, spawned only while there is
ready work and exiting when ``ready`` runs dry: no polling, no idle tasks. A worker handles one item of
a session (the backend's ``turn``), then the session goes to the back of ``ready`` so long sessions
cannot starve others. Several pools may share one scheduler (memory: every consumer of a queue); a
failed item goes back to the head of its session, which stays held (its later items wait) until it is
released, at once or after a redelivery delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bus.base import Handler
from bus.envelope import Envelope

__all__ = ["SessionScheduler", "WorkerPool", "note_failure", "run_handler"]

T = TypeVar("T")


class SessionScheduler(Generic[T]):
    """Per-session FIFOs, the sessions ready to be handled, and the pools that handle them."""

    def __init__(self) -> None:
        self.sessions: dict[str, deque[T]] = {}
        self.ready: deque[str] = deque()
        self.held: set[str] = set()
        self.pools: list[WorkerPool] = []  # attached and not stopped
        self._timers: set[asyncio.TimerHandle] = set()

    def put(self, session: str, item: T) -> None:
        """A new item at the back of its session; the session becomes ready unless it is held."""
        pending = self.sessions.get(session)
        if pending is None:
            pending = self.sessions[session] = deque()
        pending.append(item)
        if session not in self.held:
            self.held.add(session)
            self.ready.append(session)
            self.dispatch()

    def take(self, session: str) -> T | None:
        """The next item of a session a worker took from ``ready`` (None: nothing left)."""
        pending = self.sessions.get(session)
        return pending.popleft() if pending else None

    def hand_back(self, session: str, item: T) -> None:
        """Back to the head of its session (the session stays held: the caller releases it)."""
        self.sessions.setdefault(session, deque()).appendleft(item)

    def retry(self, session: str, item: T, delay: float) -> None:
        """A failed item: back to the head; its session stays held (later items wait, for ordering)
        for ``delay`` seconds, then goes back to ``ready``."""
        self.hand_back(session, item)
        if delay > 0:
            self.release_later(session, delay)
        else:
            self.release(session, dispatch=False)

    def release(self, session: str, *, dispatch: bool) -> None:
        """Un-hold a session; it goes back to ``ready`` if it still has items.

        A worker that keeps looping passes ``dispatch=False``: it will take from ``ready`` itself,
        and waking another worker for the same session would only churn tasks.
        """
        if self.sessions.get(session):
            self.ready.append(session)
            if dispatch:
                self.dispatch()
        else:
            self.sessions.pop(session, None)
            self.held.discard(session)

    def release_later(self, session: str, delay: float) -> None:
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._timers.discard(handle)
            self.release(session, dispatch=True)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def dispatch(self) -> None:
        """Start workers for ready sessions that no running or starting worker will pick up, in the
        pool with the most free slots."""
        starting = sum(len(pool.starting) for pool in self.pools)
        while len(self.ready) > starting:
            pool = max(self.pools, key=WorkerPool.free, default=None)
            if pool is None or pool.free() <= 0:
                return  # every pool is at its limit; a finishing worker will loop to it
            pool.spawn()
            starting += 1

    def clear(self) -> None:
        """Forget every item and pending redelivery (their owner, e.g. a broker, has them again)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self.sessions.clear()
        self.ready.clear()
        self.held.clear()


class WorkerPool:
    """Up to ``limit`` workers taking sessions from ``scheduler.ready`` and calling ``turn(session)``,
    which handles one item of it and releases (or retries) the session."""

    def __init__(
        self,
        scheduler: SessionScheduler,
        turn: Callable[[str], Awaitable[None]],
        limit: int,
        name: str,
        on_crash: Callable[[Exception], None],
    ) -> None:
        self.scheduler = scheduler
        self.limit = limit
        self.name = name  # of the worker tasks
        self._turn = turn
        self._on_crash = on_crash  # a worker died of a bug: log it (and, say, start over)
        self.workers: set[asyncio.Task[None]] = set()
        self.starting: set[asyncio.Task[None]] = set()  # spawned, not yet running
        self.stopped = False
        scheduler.pools.append(self)

    def free(self) -> int:
        return self.limit - len(self.workers)

    def spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._work(), name=self.name)
        self.workers.add(task)
        self.starting.add(task)
        task.add_done_callback(self._forget)

    def detach(self) -> None:
        """Take no more sessions (running workers end after their current turn or when cancelled)."""
        self.stopped = True
        if self in self.scheduler.pools:
            self.scheduler.pools.remove(self)

    def cancel(self, keep: asyncio.Task[object] | None = None) -> list[asyncio.Task[None]]:
        """Cancel every worker but ``keep`` (a handler stopping its own consumer); returns them."""
        self.starting.clear()
        tasks = [t for t in self.workers if t is not keep]
        for task in tasks:
            task.cancel()
        return tasks

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.workers.discard(task)
        self.starting.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved (_work reports its own failures): never "never retrieved"
        if self.scheduler.ready and not self.stopped:
            # A worker cancelled before it ran never reaches _work's finally; its slot is free only
            # now, and ready sessions must not wait for the next message to be picked up.
            self.scheduler.dispatch()

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.starting.discard(task)
        scheduler = self.scheduler
        try:
            while scheduler.ready and not self.stopped:
                await self._turn(scheduler.ready.popleft())
        except asyncio.CancelledError:
            pass  # stop() (or a lost channel): the turn already handed its item back
        except Exception as exc:  # noqa: BLE001 - a bug here would silently stall the session it held: make it loud
            self._on_crash(exc)
        finally:
            self.workers.discard(task)
            # Normally a worker only exits once ready is empty; when stopped mid-loop, hand leftovers on.
            if scheduler.ready:
                scheduler.dispatch()


async def run_handler(handler: Handler, envelope: Envelope) -> BaseException | None:
    """Call the handler: None when it returned, the exception when it failed.

    A CancelledError the handler raised of its own (nobody cancelled this task) is a failure too, or
    the message would be redelivered forever without ever reaching max_attempts. A real cancellation
    (stop/close mid-message) and other BaseExceptions propagate: the message is then unsettled.
    """
    try:
        await handler(envelope)
    except Exception as exc:  # noqa: BLE001 - the handler failed: the caller decides
        return exc
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and not task.cancelling():
            return exc
        raise
    return None


def note_failure(
    log: logging.Logger,
    envelope: Envelope,
    session: str,
    source: str,
    failures: int,
    max_attempts: int,
    exc: BaseException,
    *,
    retry: str = "redelivering",
) -> tuple[bool, str]:
    """Log a failed handler call; returns (whether to dead-letter it now, the reason to record)."""
    reason = f"{type(exc).__name__}: {exc}"
    if failures >= max_attempts:
        log.error(
            "dead-lettering %s %s (session %s) from %s after %d attempts: %s",
            envelope.type, envelope.message_id, session, source, failures, reason, exc_info=exc,
        )  # fmt: skip
        return True, reason
    log.warning(
        "%s %s %s (session %s) on %s, attempt %d failed: %s",
        retry, envelope.type, envelope.message_id, session, source, failures, reason,
    )  # fmt: skip
    return False, reason
