"""The version fence: no write of a turn that ran on state older than the database, whatever it writes.

Runs on a SQLite file and on the real PostgreSQL. Two :class:`ActorSystem` on one database stand for two
processes of one service; each loads its own copy of an entity, so one copy goes stale when the other writes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import event, func, insert, select

from runtime import migrate
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.store import (
    CommitOutcome,
    OutboxMessage,
    ReminderChange,
    StateStore,
    TurnWrite,
    create_engine,
    inbox,
    outbox,
    reminders,
    utcnow,
)

# ---------------------------------------------------------------------------------------------------
# Store level: a group commit and single commits give the same outcome for the same writes


def _state(n: int) -> str:
    return orjson.dumps({"n": n}).decode()


async def _count(store: StateStore, stmt) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def _prepare(store: StateStore) -> object:
    """Actor ``a`` at version 2 with a due reminder set at version 1; returns the reminder's due time."""
    due = (utcnow() - timedelta(seconds=1)).replace(microsecond=0)
    assert (
        await store.commit(TurnWrite("t", "a", 0, _state(1), reminders=[ReminderChange("wake", due)]))
        == CommitOutcome.OK
    )
    assert await store.commit(TurnWrite("t", "a", 1, _state(2))) == CommitOutcome.OK
    return due


def _stale_writes(due: object, hook_calls: list[str]) -> list[TurnWrite]:
    async def hook(conn) -> None:
        hook_calls.append("ran")
        await conn.execute(insert(inbox).values(consumer="hook/probe", message_id="from-hook", processed_at=utcnow()))

    # Each was computed on version 1, and the database is at 2: every one must be refused and write nothing.
    return [
        TurnWrite("t", "a", 1, _state(1), fired_reminder=("wake", due, None)),  # a reminder firing, no change
        TurnWrite("t", "a", 1, _state(1), inbox_id="consumed-by-stale-copy"),  # consumes a message, no change
        TurnWrite("t", "a", 1, _state(1), hooks=[hook]),  # only a query-table hook
        TurnWrite("t", "a", 1, _state(9), outbox=[OutboxMessage("publish", "", "stale-out", "{}")]),
    ]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
async def test_stale_turns_write_nothing_in_group_and_single_commit(store_factory, group_commit):
    store = await store_factory(group_commit=group_commit)
    due = await _prepare(store)
    hook_calls: list[str] = []
    fresh = TurnWrite("t", "b", 0, _state(1), inbox_id="fresh-message")  # shares the batch, must commit
    writes = [*_stale_writes(due, hook_calls), fresh]
    commits_before = store.commits

    outcomes = await asyncio.gather(*(store.commit(w) for w in writes))

    assert outcomes == [CommitOutcome.CONFLICT] * 4 + [CommitOutcome.OK]
    if group_commit:
        assert store.commits == commits_before + 1, "the five turns were meant to share one transaction"
    assert await _count(store, select(func.count()).select_from(reminders).where(reminders.c.name == "wake")) == 1
    assert (
        await _count(
            store, select(func.count()).select_from(inbox).where(inbox.c.message_id == "consumed-by-stale-copy")
        )
        == 0
    )
    assert await _count(store, select(func.count()).select_from(inbox).where(inbox.c.message_id == "from-hook")) == 0
    assert hook_calls == []
    assert await _count(store, select(func.count()).select_from(outbox)) == 0
    assert (
        await _count(store, select(func.count()).select_from(inbox).where(inbox.c.message_id == "fresh-message")) == 1
    )
    a = await store.load("t", "a")
    assert a is not None and (a.version, orjson.loads(a.state)) == (2, {"n": 2})


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
async def test_fired_reminder_on_current_version_consumes_it_once(store_factory, group_commit):
    store = await store_factory(group_commit=group_commit)
    due = await _prepare(store)
    first = TurnWrite("t", "a", 2, _state(2), fired_reminder=("wake", due, None))
    assert await store.commit(first) == CommitOutcome.OK
    assert await _count(store, select(func.count()).select_from(reminders)) == 0
    again = TurnWrite("t", "a", 3, _state(3), fired_reminder=("wake", due, None))
    assert await store.commit(again) == CommitOutcome.DUPLICATE
    a = await store.load("t", "a")
    assert a is not None and a.version == 3, "the no-change turn that consumed the reminder stepped the version"


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
async def test_inbox_dedup_matches_consumer_and_message_id_together(store_factory, group_commit):
    store = await store_factory(group_commit=group_commit)
    for actor_id in ("a", "c"):
        assert await store.commit(TurnWrite("t", actor_id, 0, _state(1), inbox_id="m1")) == CommitOutcome.OK
    writes = [
        TurnWrite("t", "a", 1, _state(2), inbox_id="m1"),  # redelivered to the consumer that applied it
        TurnWrite("t", "b", 0, _state(1), inbox_id="m1"),  # the same message id, another consumer: new to it
        TurnWrite("t", "c", 1, _state(2), inbox_id="m2"),  # its own m1 is in the inbox, m2 is new
    ]
    outcomes = await asyncio.gather(*(store.commit(w) for w in writes))
    assert outcomes == [CommitOutcome.DUPLICATE, CommitOutcome.OK, CommitOutcome.OK]
    assert await _count(store, select(func.count()).select_from(inbox)) == 4


async def test_inbox_dedup_probes_the_primary_key_instead_of_scanning_the_inbox(tmp_path):
    # Every commit of a turn that consumed a message asks the inbox whether it saw the id; that ran on the event
    # loop, and a scan of the whole inbox made each commit slower with every message ever consumed (issue 14).
    # The plan is SQLite's, the embedded default's: PostgreSQL answers the same statement from the same key.
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'inbox.db'}")
    try:
        await migrate.upgrade(engine, [migrate.RUNTIME])
        store = StateStore(engine)
        asked: list[tuple[str, object]] = []

        def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "FROM inbox" in statement:
                asked.append((statement, parameters))

        event.listen(engine.sync_engine, "before_cursor_execute", capture)
        assert await store.commit(TurnWrite("t", "a", 0, _state(1), inbox_id="m1")) == CommitOutcome.OK
        batch = [TurnWrite("t", f"b{i}", 0, _state(1), inbox_id=f"m{i}") for i in range(3)]  # one group commit
        assert await asyncio.gather(*(store.commit(w) for w in batch)) == [CommitOutcome.OK] * 3
        event.remove(engine.sync_engine, "before_cursor_execute", capture)

        assert len(asked) == 2, asked
        for statement, parameters in asked:
            async with engine.connect() as conn:
                plan = " | ".join(
                    str(row[-1]) for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                )
            assert "SCAN inbox" not in plan and "SEARCH inbox USING" in plan, plan
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------------
# Actor level: two processes, one stale copy


@dataclass(frozen=True)
class Add:
    item: str


@dataclass(frozen=True)
class RemoveIfThere:
    """What OrderStarted does to a cart: remove the ordered line if the cart holds it."""

    item: str


@dataclass(frozen=True)
class Show:
    pass


class BasketActor(Actor):
    type_name = "basket"

    def initial_state(self) -> dict:
        return {"items": []}

    @handles(Add)
    def add(self, msg: Add, turn: Turn) -> None:
        self.state["items"].append(msg.item)

    @handles(RemoveIfThere)
    def remove(self, msg: RemoveIfThere, turn: Turn) -> bool:
        if msg.item in self.state["items"]:
            self.state["items"].remove(msg.item)
            return True
        return False

    @handles(Show)
    def show(self, msg: Show, turn: Turn) -> list[str]:
        return list(self.state["items"])


@pytest.fixture
async def two_processes(store_factory):
    systems = []
    for name in ("p1", "p2"):
        system = ActorSystem(await store_factory(), name=name)
        system.register(BasketActor)
        await system.start()
        systems.append(system)
    yield systems
    for system in systems:
        await system.stop()


async def test_message_consumed_by_a_stale_copy_is_applied_to_the_newest_state(two_processes):
    p1, p2 = two_processes
    assert await p1.ref(BasketActor, "x").ask(Show()) == []  # p1 holds a copy at version 0
    await p2.ref(BasketActor, "x").ask(Add("sku-1"))  # p2 writes: p1's copy is now stale

    removed = await p1.ref(BasketActor, "x").ask(RemoveIfThere("sku-1"), message_id="order-started-1")

    assert removed is True, "the turn ran again on the newest state instead of recording the message as done"
    assert await p2.ref(BasketActor, "x").ask(Show()) == []
    record = await p1.store.load("basket", "x")
    assert record is not None and orjson.loads(record.state) == {"items": []} and record.version == 2
    assert await p1.store.seen("basket/x", "order-started-1")


async def test_read_from_memory_is_never_older_than_the_last_write_elsewhere(two_processes):
    p1, p2 = two_processes
    await p1.ref(BasketActor, "y").ask(Add("a"))
    for n in range(10):
        await p2.ref(BasketActor, "y").ask(Add(f"b{n}"))
        assert await p1.ref(BasketActor, "y").ask(Show()) == ["a", *(f"b{k}" for k in range(n + 1))]
    assert p1.stats["stale_reads"] == 10


async def test_an_exclusive_system_trusts_its_copy(store_factory):
    """The embedded shape: one process is the only writer, so reads cost no database round trip."""
    system = ActorSystem(await store_factory(), exclusive=True)
    system.register(BasketActor)
    await system.start()
    try:
        await system.ref(BasketActor, "z").ask(Add("a"))
        assert await system.ref(BasketActor, "z").ask(Show()) == ["a"]
        assert system.stats["stale_reads"] == 0
    finally:
        await system.stop()


class _OwnsNothing:
    def owns(self, actor_id: str) -> bool:
        return False

    def owner_of(self, actor_id: str) -> str | None:
        return "http://elsewhere"


async def test_a_process_keeps_no_copy_of_an_entity_it_does_not_own(two_processes):
    p1, p2 = two_processes
    p1.placement = _OwnsNothing()
    await p1.ref(BasketActor, "w").ask(Add("a"))
    assert p1.live_count == 0, "the activation of a non-owned entity outlived its turn"
    await p2.ref(BasketActor, "w").ask(Add("b"))
    assert await p1.ref(BasketActor, "w").ask(Show()) == ["a", "b"]
    info = await p1.inspect("basket", "w")
    assert info is not None and info["owner"] == "http://elsewhere"


async def test_inspect_never_answers_an_older_copy_than_the_database(two_processes):
    """The order API and the admin endpoints read through ``inspect`` (no turn): it must be fenced too."""
    p1, p2 = two_processes
    await p1.ref(BasketActor, "v").ask(Add("a"))
    await p2.ref(BasketActor, "v").ask(Add("b"))  # p1's live copy is now one version behind
    info = await p1.inspect("basket", "v")
    assert info is not None and info["state"] == {"items": ["a", "b"]} and info["version"] == 2
    assert p1.stats["stale_reads"] == 1
