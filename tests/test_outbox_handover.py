"""The outbox relay sends what a turn just committed without reading it back (issue 14), and keeps what the table
promises: every committed message is sent, in commit order per producer, also after a failure or a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bus.base import BusError
from bus.envelope import Envelope
from bus.memory import MemoryBus
from runtime import migrate
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.messages import BusBinding, envelope
from runtime.outbox import OutboxRelay
from runtime.store import StateStore, create_engine, outbox


@dataclass(frozen=True)
class Produce:
    n: int


@dataclass(frozen=True)
class Ping:
    n: int


class ProducerActor(Actor):
    @handles(Produce)
    def produce(self, msg: Produce, turn: Turn) -> None:
        self.state["sent"] = self.state.get("sent", 0) + 1
        turn.send("target", envelope(Ping(msg.n), session_id="t1"))


class TargetActor(Actor):
    persistent = False

    def initial_state(self) -> dict[str, Any]:
        return {"seen": []}

    @handles(Ping)
    def ping(self, msg: Ping, _turn: Turn) -> None:
        self.state["seen"].append(msg.n)


class FlakyBus(MemoryBus):
    """A memory bus whose ``send`` fails for the messages numbered in ``fail_at`` (1-based, counting every call)."""

    def __init__(self, fail_at: set[int]) -> None:
        super().__init__(max_attempts=3)
        self.fail_at = fail_at
        self.calls = 0

    async def send(self, queue: str, message: Envelope) -> None:
        self.calls += 1
        if self.calls in self.fail_at:
            raise BusError("the broker is away")
        await super().send(queue, message)


@dataclass
class Pipeline:
    bus: MemoryBus
    engine: AsyncEngine
    target: ActorSystem

    async def seen(self) -> list[int]:
        info = await self.target.inspect("target", "t1")
        return info["state"]["seen"] if info else []

    async def wait_seen(self, count: int) -> list[int]:
        async with asyncio.timeout(10):
            while len(await self.seen()) < count:
                await asyncio.sleep(0.02)
        return await self.seen()


@contextlib.asynccontextmanager
async def _pipeline(db_url: str, bus: MemoryBus) -> AsyncIterator[Pipeline]:
    """A migrated database and ``bus``, whose ``target`` queue feeds :class:`TargetActor` (kept in memory)."""
    await bus.start()
    engine = create_engine(db_url)
    await migrate.upgrade(engine, [migrate.RUNTIME])
    target = ActorSystem(None)
    target.register(TargetActor)
    binding = BusBinding(target)
    binding.to_actor(Ping, TargetActor)
    consumer = await bus.consume("target", binding)
    try:
        yield Pipeline(bus, engine, target)
    finally:
        await consumer.stop()
        await bus.close()
        await engine.dispose()


@pytest.fixture(params=[set(), {3}], ids=["bus-up", "bus-fails-once"])
async def pipeline(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[Pipeline]:
    async with _pipeline(db_url, FlakyBus(request.param) if request.param else MemoryBus(max_attempts=3)) as made:
        yield made


def _producer(engine: AsyncEngine, relay: OutboxRelay | None, *, exclusive: bool = True) -> ActorSystem:
    return ActorSystem(StateStore(engine), on_outbox=relay.notify if relay else None, exclusive=exclusive)


def _count_outbox_reads(engine: AsyncEngine) -> list[str]:
    reads: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM outbox" in statement and "ORDER BY" in statement:
            reads.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    return reads


async def test_handed_over_messages_are_sent_in_order_without_reading_them_back(pipeline: Pipeline):
    relay = OutboxRelay(pipeline.engine, pipeline.bus, poll_interval=30.0)
    producer = _producer(pipeline.engine, relay)
    reads = _count_outbox_reads(pipeline.engine)
    relay.start()
    try:
        await asyncio.sleep(0.1)  # the start-up poll (rows of a previous process): none here
        for n in range(20):
            await producer.ref(ProducerActor, "p1").ask(Produce(n))
        assert await pipeline.wait_seen(20) == list(range(20))
        async with asyncio.timeout(10):
            while await relay.pending():
                await asyncio.sleep(0.02)
    finally:
        await relay.stop()
    if isinstance(pipeline.bus, FlakyBus):
        # The failed send dropped the hand-overs: the poll after the back-off sent the rest from the table.
        assert relay.handed_over < 20
        assert len(reads) >= 2
    else:
        assert relay.handed_over == 20
        assert len(reads) == 1, "only the start-up poll read the outbox"
    assert relay.relayed == 20


async def test_rows_a_previous_process_left_go_out_before_the_new_ones(pipeline: Pipeline):
    gone = OutboxRelay(pipeline.engine, pipeline.bus)  # never started: the process died before relaying
    before = _producer(pipeline.engine, gone)
    for n in range(3):
        await before.ref(ProducerActor, "p1").ask(Produce(n))
    relay = OutboxRelay(pipeline.engine, pipeline.bus, poll_interval=0.05)
    after = _producer(pipeline.engine, relay)
    for n in range(3, 6):  # committed and handed over before the new relay even started
        await after.ref(ProducerActor, "p1").ask(Produce(n))
    relay.start()
    try:
        assert await pipeline.wait_seen(6) == list(range(6))
        async with asyncio.timeout(10):
            while await relay.pending():
                await asyncio.sleep(0.02)
        for n in range(6, 9):
            await after.ref(ProducerActor, "p1").ask(Produce(n))
        assert await pipeline.wait_seen(9) == list(range(9))
        await asyncio.sleep(0.2)  # nothing is sent twice: the poll's rows are not sent again as hand-overs
        assert await pipeline.seen() == list(range(9))
    finally:
        await relay.stop()
    assert await pipeline.bus.dead_letters("target") == []


async def test_a_process_that_is_not_the_only_writer_polls_in_id_order(pipeline: Pipeline):
    relay = OutboxRelay(pipeline.engine, pipeline.bus, poll_interval=0.05)
    producer = _producer(pipeline.engine, relay, exclusive=False)  # a cluster member: peers write the table too
    relay.start()
    try:
        for n in range(5):
            await producer.ref(ProducerActor, "p1").ask(Produce(n))
        assert await pipeline.wait_seen(5) == list(range(5))
    finally:
        await relay.stop()
    assert relay.handed_over == 0


async def test_the_marks_of_handed_over_messages_are_written_together_and_never_lost(db_url: str):
    """Sending does not wait for the mark: the rows of a burst of hand-overs are marked sent in one statement, by
    ``mark_delay`` after the first was sent, before anything counts or polls the table, and at the latest on stop."""
    async with _pipeline(db_url, MemoryBus(max_attempts=3)) as pipeline:
        engine, bus = pipeline.engine, pipeline.bus
        marks: list[int] = []

        def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
            if statement.lstrip().upper().startswith("UPDATE OUTBOX"):
                marks.append(len(parameters) if many else 1)

        event.listen(engine.sync_engine, "before_cursor_execute", seen)

        async def unsent() -> int:
            async with engine.connect() as conn:
                return (await conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))).scalar_one()

        relay = OutboxRelay(engine, bus, poll_interval=30.0, mark_delay=2.0)
        producer = _producer(engine, relay)
        relay.start()
        try:
            await asyncio.sleep(0.1)
            for n in range(10):  # ten turns, each handed over and sent on its own
                await producer.ref(ProducerActor, "p1").ask(Produce(n))
            assert await pipeline.wait_seen(10) == list(range(10))
            assert marks == [] and await unsent() == 10  # sent, marks still to come
            # Counting marks first, and a poll that comes while that marking is open waits for it: nothing re-sent.
            assert await asyncio.gather(relay.pending(), relay.relay_once()) == [0, 0]
            assert marks == [10]  # one statement for the ten
            for n in range(10, 15):
                await producer.ref(ProducerActor, "p1").ask(Produce(n))
            assert await pipeline.wait_seen(15) == list(range(15))
            async with asyncio.timeout(10):  # by the deadline, with nothing else happening
                while await unsent():
                    await asyncio.sleep(0.05)
            assert marks == [10, 5]
            for n in range(15, 18):
                await producer.ref(ProducerActor, "p1").ask(Produce(n))
            assert await pipeline.wait_seen(18) == list(range(18))
        finally:
            await relay.stop()
            event.remove(engine.sync_engine, "before_cursor_execute", seen)
        assert await unsent() == 0  # the stop marked the last three
        assert marks == [10, 5, 3] and relay.relayed == relay.handed_over == 18


async def test_marks_that_fail_are_retried_with_back_off_and_the_messages_are_not_sent_twice(pipeline: Pipeline):
    if isinstance(pipeline.bus, FlakyBus):
        pipeline.bus.fail_at = set()  # the database fails here, not the bus
    engine = pipeline.engine
    attempts: list[float] = []
    failing = True

    def refuse(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE OUTBOX"):
            attempts.append(asyncio.get_running_loop().time())
            if failing:
                raise RuntimeError("the database refuses writes")

    event.listen(engine.sync_engine, "before_cursor_execute", refuse)
    relay = OutboxRelay(engine, pipeline.bus, poll_interval=0.1, mark_delay=0.05)
    producer = _producer(engine, relay)
    relay.start()
    try:
        for n in range(5):
            await producer.ref(ProducerActor, "p1").ask(Produce(n))
        assert await pipeline.wait_seen(5) == list(range(5))
        await asyncio.sleep(1.6)
        # Back-off doubling from 0.1 s: about 5 attempts in 1.6 s, not a tight loop.
        assert 2 <= len(attempts) <= 8, attempts
        failing = False
        async with asyncio.timeout(10):
            while await relay.pending():
                await asyncio.sleep(0.05)
    finally:
        await relay.stop()
        event.remove(engine.sync_engine, "before_cursor_execute", refuse)
    assert await pipeline.seen() == list(range(5))  # the five were sent once each: marked late, never re-sent
