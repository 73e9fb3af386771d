"""The outbox relay: publishes messages that committed turns wrote to the ``outbox`` table.

Turns never talk to the bus directly: a message is a row written in the same transaction as the state
change that caused it, so a crash can never keep one without the other. The relay reads unsent rows in
commit order, hands them to the bus and marks them sent. A crash between the two re-sends the row on the
next start: delivery is at-least-once and consumers deduplicate by ``message_id`` (the inbox).

The relay wakes at once when a turn commits messages (``notify``) and otherwise polls, so rows left by a
previous process are picked up too. Sent rows are kept for ``retention`` seconds for inspection.

A turn that commits messages hands them to the relay in memory (``notify(messages)``), so the relay sends them
without reading them back: the rows stay the source of truth (they are marked sent by message id afterwards, and a
crash before that re-sends them from the table), the hand-over only saves the read. Order is kept: handed-over
messages are sent only after every poll that was due (start, a failure, a wake without messages, the poll timer,
which runs every ``poll_interval`` also under a steady flow of hand-overs) has sent what the table held, in id
order; a message the poll sent already is not sent again. A failure drops what was handed over and goes back to
polling, which finds those rows in the table. The marks of handed-over messages are written together, at most
``mark_delay`` seconds after the first of them was sent (and always before a poll reads the table, when the relay
stops and when ``pending()`` counts): one transaction for every message a pass of the relay sends in that time
instead of one per pass, which on SQLite contended with the group commits for the write lock and on PostgreSQL
cost three round trips each (issue 14). A crash re-sends what was sent in that window, as it re-sends a message
sent just before its mark; consumers drop the copies (the inbox). Only a process that is the one writer of its
table hands messages over (:class:`runtime.actors.ActorSystem` with ``exclusive``): in a cluster a peer's rows
may be older than ours, and there every wake polls, in id order, as before.

It lives in ``runtime`` (it reads the runtime's ``outbox`` table) and only uses the bus through the
:class:`bus.base.Bus` protocol: ``runtime`` depends on ``bus``, never the other way round.

Besides ``send`` and ``publish`` rows there are ``replay`` rows (:func:`enqueue_replay`): a dead letter an
operator replays, addressed to exactly the queue or subscription it came from (``"<kind>:<name>"``) and
handed to the bus's ``redeliver`` (:mod:`bus.deadletters`) with its original ``message_id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bus.base import Bus, BusError, DeadLetter
from bus.deadletters import parse_replay_destination, replay_destination
from bus.envelope import Envelope
from runtime import tracing
from runtime.store import OutboxMessage, execute, outbox, utcnow

__all__ = ["REPLAY", "OutboxRelay", "ReplayPending", "enqueue_replay"]

REPLAY = "replay"  # outbox kind of a replayed dead letter


class ReplayPending(Exception):
    """A message with this id is still waiting in the outbox: replaying it again would change nothing."""


async def enqueue_replay(conn: AsyncConnection, letter: DeadLetter) -> int:
    """Write ``letter``'s envelope as a ``replay`` row, in the caller's transaction; returns the row id.

    The row keeps the original ``message_id`` (so the consumer's inbox still recognises a message it has
    applied). The outbox holds one row per message id: a *sent* row with that id (the original send, or
    an earlier replay, kept for inspection) is replaced; an *unsent* one raises :class:`ReplayPending`.
    """
    message_id = letter.envelope.message_id
    found = (await conn.execute(select(outbox.c.id, outbox.c.sent_at).where(outbox.c.message_id == message_id))).first()
    if found is not None:
        if found.sent_at is None:
            raise ReplayPending(f"message {message_id} is already waiting in the outbox to be sent")
        await conn.execute(delete(outbox).where(outbox.c.id == found.id))
    result = await conn.execute(
        insert(outbox).values(
            message_id=message_id,
            kind=REPLAY,
            destination=replay_destination(letter),
            envelope=letter.envelope.encode().decode(),
            created_at=utcnow(),
        )
    )
    key = result.inserted_primary_key
    return int(key[0]) if key else 0


async def _redeliver(bus: Any, destination: str, envelope: Envelope) -> None:
    redeliver = getattr(bus, "redeliver", None)
    if redeliver is None:
        raise BusError(f"the {bus.name} bus cannot redeliver dead letters")
    kind, name = parse_replay_destination(destination)
    await redeliver(kind, name, envelope)


log = logging.getLogger(__name__)


# Built once (the relay runs them on every wake-up): SQLAlchemy reuses their compiled form.
_UNSENT = (
    select(outbox.c.id, outbox.c.message_id, outbox.c.kind, outbox.c.destination, outbox.c.envelope)
    .where(outbox.c.sent_at.is_(None))
    .order_by(outbox.c.id)
    .limit(bindparam("limit"))
)
_MARK_SENT = update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True))).values(sent_at=bindparam("now"))
# By key, run as one executemany: the hand-over marks a batch per relay pass, and an expanding IN is a statement
# store.execute cannot run directly on SQLite (a new text per batch size), which put SQLAlchemy back on this path.
_MARK_SENT_BY_MESSAGE = update(outbox).where(outbox.c.message_id == bindparam("m")).values(sent_at=bindparam("now"))


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        bus: Bus,
        *,
        poll_interval: float = 1.0,
        batch_size: int = 500,
        retention: float = 3600.0,
        mark_delay: float = 0.1,
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.retention = retention
        self.mark_delay = mark_delay
        self.relayed = 0
        self.handed_over = 0  # messages sent as handed over, without reading their rows back
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        self._handed: deque[OutboxMessage] = deque()
        self._poll_due = True  # rows may wait in the table that were not handed over: poll before the hand-overs
        # Message ids the last two polls sent: a hand-over of one of them (its turn handed it over after the poll
        # had read it from the table) is dropped, not sent twice.
        self._polled: set[str] = set()
        self._polled_before: set[str] = set()
        self._last_poll = float("-inf")
        self._unmarked: list[str] = []  # handed-over messages sent, their rows not marked yet
        self._mark_by = float("inf")  # loop time by which they are marked
        self._marking = asyncio.Lock()

    def notify(self, messages: Sequence[OutboxMessage] = ()) -> None:
        """Called after a transaction committed outbox rows: relay them now instead of at the next poll.

        ``messages``: the rows just committed, in the order they were written (a turn's own), handed over so they
        need not be read back; without them (any other writer of the table) the relay polls the table."""
        if messages and len(self._handed) < self.batch_size * 4:
            self._handed.extend(messages)
        else:
            self._poll_due = True  # nothing handed over, or the relay is far behind: the table has them
            self._handed.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self._mark_handed()
        except Exception as exc:  # noqa: BLE001 the rows stay unsent: the next start sends them again (copies dropped)
            log.warning("outbox relay could not mark %r as sent at stop: %r", self._unmarked, exc)

    async def _run(self) -> None:
        backoff = self.poll_interval
        while True:
            # Clear before relaying: a turn that commits while this batch is in flight sets it again, so
            # its rows go out right after instead of waiting a whole poll interval.
            self._wake.clear()
            loop_time = asyncio.get_running_loop().time()
            if loop_time - self._last_poll >= self.poll_interval:
                self._poll_due = True  # the poll timer, also under constant hand-overs: rows of other writers
            try:
                if self._poll_due:
                    self._poll_due = False
                    self._last_poll = loop_time
                    self._polled_before, self._polled = self._polled, set()
                    while await self.relay_once() == self.batch_size:
                        pass  # a full batch: more may be waiting
                while self._handed:
                    await self._relay_handed()
                if self._unmarked and (
                    len(self._unmarked) >= self.batch_size or asyncio.get_running_loop().time() >= self._mark_by
                ):
                    await self._mark_handed()
                backoff = self.poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 the relay must outlive any bus or database failure; logged, retried
                # Bus or database down: keep the rows, try again later with growing patience (polling: the table
                # holds everything that was handed over and not marked sent).
                self._poll_due = True
                self._handed.clear()
                log.warning("outbox relay failed (%r); retrying in %.1fs", exc, backoff)
                backoff = min(backoff * 2, 30.0)
            wait = backoff
            if self._unmarked and backoff == self.poll_interval:  # after a failure the back-off rules, marks too
                wait = max(0.0, min(wait, self._mark_by - asyncio.get_running_loop().time()))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that arrives
            # together with the wake-up, and stop() would then wait forever.
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def relay_once(self) -> int:
        """Send one batch of unsent rows in commit order; returns how many were sent."""
        await self._mark_handed()  # a poll must not read the rows of messages the hand-over sent already
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(_UNSENT, {"limit": self.batch_size}))
        sent: list[int] = []
        try:
            for row in rows:
                await self._send(row.kind, row.destination, row.envelope)
                sent.append(row.id)
                self._polled.add(row.message_id)
        finally:
            # Mark what did go out even if a later row failed, so it is not sent again needlessly.
            if sent:
                async with self.engine.begin() as conn:
                    await conn.execute(_MARK_SENT, {"ids": sent, "now": utcnow()})
                self.relayed += len(sent)
        await self._purge()
        return len(rows)

    async def _relay_handed(self) -> None:
        """Send what turns handed over (up to a batch), in hand-over order; their rows are marked sent by
        :meth:`_mark_handed`, at most ``mark_delay`` seconds later."""
        batch: list[str] = []
        try:
            while self._handed and len(batch) < self.batch_size:
                message = self._handed[0]
                if message.message_id not in self._polled and message.message_id not in self._polled_before:
                    await self._send(message.kind, message.destination, message.decoded or message.envelope)
                    batch.append(message.message_id)
                self._handed.popleft()
        finally:
            if batch:
                if not self._unmarked:
                    self._mark_by = asyncio.get_running_loop().time() + self.mark_delay
                self._unmarked += batch
                self.relayed += len(batch)
                self.handed_over += len(batch)
        await self._purge()

    async def _mark_handed(self) -> None:
        """Mark the rows of the handed-over messages sent so far, in one transaction. One marking at a time: a
        caller that comes while another one's transaction is open (a poll while ``pending()`` marks) returns only
        once those rows are marked, so it never reads them as unsent."""
        if not self._unmarked and not self._marking.locked():
            return
        async with self._marking:
            if not self._unmarked:
                return
            marking, self._unmarked = self._unmarked, []
            try:
                async with self.engine.begin() as conn:
                    now = utcnow()
                    await execute(conn, _MARK_SENT_BY_MESSAGE, [{"m": m, "now": now} for m in marking])
            except BaseException:
                self._unmarked = marking + self._unmarked  # tried again later (a poll waits for it: never re-sent)
                raise
            if not self._unmarked:  # none sent meanwhile (those keep the deadline their first one set)
                self._mark_by = float("inf")

    async def _send(self, kind: str, destination: str, stored: str | Envelope) -> None:
        envelope = Envelope.decode(stored) if isinstance(stored, str) else stored
        # The row's envelope carries the traceparent of the turn that wrote it; the hand-over is its child.
        with tracing.producing(self.bus.name, kind, destination, envelope) as envelope:
            if kind == "send":
                await self.bus.send(destination, envelope)
            elif kind == REPLAY:
                await _redeliver(self.bus, destination, envelope)
            else:
                await self.bus.publish(envelope)

    async def pending(self) -> int:
        """Rows not sent yet (the marks of messages already sent are written first)."""
        await self._mark_handed()
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))).scalar_one()

    async def _purge(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_purge < 60:
            return
        self._last_purge = loop_time
        cutoff = utcnow() - timedelta(seconds=self.retention)
        async with self.engine.begin() as conn:
            await conn.execute(delete(outbox).where(outbox.c.sent_at.is_not(None), outbox.c.sent_at < cutoff))
