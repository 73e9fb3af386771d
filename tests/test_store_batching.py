"""What a commit costs in statements, and that the cheaper forms keep every outcome (issue 14).

A group commit writes the inbox, outbox and reminder rows of all its turns in one statement per table, and on
SQLite probes and steps every version in one statement each; on PostgreSQL a pooled connection is pinged only
after it rested. Runs on a SQLite file and on the real PostgreSQL (``db_url``), like the fence tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from runtime import migrate
from runtime import store as store_module
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


def _state(n: int) -> str:
    return orjson.dumps({"n": n}).decode()


async def _scalar(store: StateStore, stmt: Any) -> Any:
    async with store.engine.connect() as conn:
        return (await conn.execute(stmt)).scalar_one()


class _Statements:
    """Counts the statements the engine sends, by table written or read."""

    def __init__(self, store: StateStore) -> None:
        self.counts: Counter[str] = Counter()
        self._engine = store.engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.counts[" ".join(statement.split()[:3])] += 1

    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


def _turn(i: int, version: int) -> TurnWrite:
    """A turn of actor ``a<i>`` that consumes a message, sends two and sets a reminder."""
    return TurnWrite(
        "t",
        f"a{i}",
        version,
        _state(version + 1),
        inbox_id=f"in-{i}-{version}",
        outbox=[OutboxMessage("send", "q", f"out-{i}-{version}-{k}", "{}") for k in range(2)],
        reminders=[ReminderChange("wake", utcnow() + timedelta(hours=1))],
    )


async def test_a_group_commit_writes_each_table_once_whatever_the_number_of_turns(store_factory):
    store = await store_factory(group_commit=True)
    for i in range(10):  # every actor stored once (version 1), so the batch below steps existing entities
        assert await store.commit(_turn(i, 0)) == CommitOutcome.OK
    statements = _Statements(store)
    commits = store.commits
    try:
        outcomes = await asyncio.gather(*(store.commit(_turn(i, 1)) for i in range(10)))
    finally:
        statements.close()
    assert outcomes == [CommitOutcome.OK] * 10
    assert store.commits == commits + 1, "the ten turns were meant to share one transaction"
    # inbox probe, inbox, outbox, reminders (one upsert: none is cancelled) and the version steps: on SQLite a probe
    # of the versions and one UPDATE (an executemany) for all, on PostgreSQL one UPDATE ... FROM (VALUES ...) RETURNING
    steps = 2 if store.engine.dialect.supports_sane_multi_rowcount else 1
    assert statements.total() <= 4 + steps, statements.counts
    assert statements.counts["DELETE FROM reminders"] == 0 and statements.counts["INSERT INTO reminders"] == 1
    assert await _scalar(store, select(func.count()).select_from(outbox)) == 40
    assert await _scalar(store, select(func.count()).select_from(inbox)) == 20
    assert await _scalar(store, select(func.count()).select_from(reminders)) == 10
    for i in range(10):
        record = await store.load("t", f"a{i}")
        assert record is not None and record.version == 2
    # The outbox keeps commit order: ids follow the turns, two messages each, in the order they were sent.
    async with store.engine.connect() as conn:
        ids = [r.message_id for r in await conn.execute(select(outbox.c.message_id).order_by(outbox.c.id))]
    assert ids[20:] == [f"out-{i}-1-{k}" for i in range(10) for k in range(2)]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "single"])
async def test_reminder_changes_of_a_turn_apply_in_order(store_factory, group_commit):
    """Folded to the last change per name, they leave what deleting and inserting them one by one left."""
    store = await store_factory(group_commit=group_commit)
    soon, later = utcnow() + timedelta(minutes=1), utcnow() + timedelta(hours=1)
    writes = [
        TurnWrite(
            "t", "set-then-cancel", 0, _state(1), reminders=[ReminderChange("r", soon), ReminderChange("r", None)]
        ),
        TurnWrite(
            "t", "cancel-then-set", 0, _state(1), reminders=[ReminderChange("r", None), ReminderChange("r", soon)]
        ),
        TurnWrite("t", "set-twice", 0, _state(1), reminders=[ReminderChange("r", soon), ReminderChange("r", later)]),
        TurnWrite("t", "two-names", 0, _state(1), reminders=[ReminderChange("r", soon), ReminderChange("s", later)]),
    ]
    assert await asyncio.gather(*(store.commit(w) for w in writes)) == [CommitOutcome.OK] * 4
    async with store.engine.connect() as conn:
        rows = {(r.actor_id, r.name): store_module.as_utc(r.due_at) for r in await conn.execute(select(reminders))}
    assert set(rows) == {("cancel-then-set", "r"), ("set-twice", "r"), ("two-names", "r"), ("two-names", "s")}
    assert abs((rows[("set-twice", "r")] - later).total_seconds()) < 1
    # Stored ones changed by a later turn: moved (the upsert over the stored row), cancelled, set anew.
    writes = [
        TurnWrite("t", "cancel-then-set", 1, _state(2), reminders=[ReminderChange("r", later, period=5.0)]),
        TurnWrite("t", "two-names", 1, _state(2), reminders=[ReminderChange("r", None), ReminderChange("s", soon)]),
        TurnWrite("t", "set-then-cancel", 1, _state(2), reminders=[ReminderChange("r", later)]),
    ]
    assert await asyncio.gather(*(store.commit(w) for w in writes)) == [CommitOutcome.OK] * 3
    async with store.engine.connect() as conn:
        rows = {
            (r.actor_id, r.name): (store_module.as_utc(r.due_at), r.period)
            for r in await conn.execute(select(reminders))
        }
    assert set(rows) == {("cancel-then-set", "r"), ("set-twice", "r"), ("two-names", "s"), ("set-then-cancel", "r")}
    assert (
        abs((rows[("cancel-then-set", "r")][0] - later).total_seconds()) < 1 and rows[("cancel-then-set", "r")][1] == 5
    )
    assert abs((rows[("two-names", "s")][0] - soon).total_seconds()) < 1


async def test_a_fired_reminder_set_again_by_its_turn_stays_set(store_factory):
    store = await store_factory(group_commit=True)
    due = (utcnow() - timedelta(seconds=1)).replace(microsecond=0)
    again = utcnow() + timedelta(hours=1)
    assert await store.commit(TurnWrite("t", "a", 0, _state(1), reminders=[ReminderChange("wake", due)])) == "ok"
    assert await store.commit(TurnWrite("t", "b", 0, _state(1))) == CommitOutcome.OK
    fired = TurnWrite(
        "t", "a", 1, _state(2), fired_reminder=("wake", due, None), reminders=[ReminderChange("wake", again)]
    )
    other = TurnWrite("t", "b", 1, _state(2), inbox_id="m")  # so the two share a batch
    assert await asyncio.gather(store.commit(fired), store.commit(other)) == [CommitOutcome.OK] * 2
    async with store.engine.connect() as conn:
        rows = list(await conn.execute(select(reminders.c.name, reminders.c.due_at)))
    assert len(rows) == 1 and abs((store_module.as_utc(rows[0].due_at) - again).total_seconds()) < 1


class _StaleProbe(StateStore):
    """A store whose version probe answers what each turn expects: stands for another process committing between
    the probe and the step of a group commit."""

    async def _versions(self, conn, writes):  # type: ignore[no-untyped-def]  # the test's fault injection
        return {(w.actor_type, w.actor_id): w.expected_version for w in writes}


async def test_a_version_moved_between_probe_and_step_commits_the_batch_turn_by_turn(db_url):
    engine = create_engine(db_url)
    try:
        from runtime import migrate

        await migrate.upgrade(engine, [migrate.RUNTIME])
        store = _StaleProbe(engine, group_commit=True)
        assert await store.commit(TurnWrite("t", "a", 0, _state(1))) == CommitOutcome.OK
        assert await store.commit(TurnWrite("t", "a", 1, _state(2))) == CommitOutcome.OK  # the database is at 2
        hook_rows: list[str] = []

        async def hook(conn) -> None:  # type: ignore[no-untyped-def]
            hook_rows.append("ran")
            await conn.execute(
                insert(inbox).values(consumer="hook/probe", message_id="from-hook", processed_at=utcnow())
            )

        stale = TurnWrite("t", "a", 1, _state(9), hooks=[hook], outbox=[OutboxMessage("send", "q", "stale", "{}")])
        fresh = TurnWrite("t", "b", 0, _state(1), inbox_id="fresh", outbox=[OutboxMessage("send", "q", "fresh", "{}")])
        assert await asyncio.gather(store.commit(stale), store.commit(fresh)) == [
            CommitOutcome.CONFLICT,
            CommitOutcome.OK,
        ]
        assert (
            await _scalar(store, select(func.count()).select_from(inbox).where(inbox.c.message_id == "from-hook")) == 0
        )
        assert hook_rows == [], "the step failed before any hook ran; alone, the stale turn is refused first"
        assert store.commits == 3, "the batch rolled back; the fresh turn committed alone"
        assert [r async for r in _outbox_ids(store)] == ["fresh"]
        a = await store.load("t", "a")
        assert a is not None and (a.version, orjson.loads(a.state)) == (2, {"n": 2})
    finally:
        await engine.dispose()


async def _outbox_ids(store: StateStore):  # type: ignore[no-untyped-def]
    async with store.engine.connect() as conn:
        for row in await conn.execute(select(outbox.c.message_id).order_by(outbox.c.id)):
            yield row.message_id


async def test_a_new_entity_stored_meanwhile_is_a_conflict_not_an_error(store_factory):
    """No existence probe before a new entity's insert: the primary key refuses the second one."""
    store = await store_factory(group_commit=False)
    assert await store.commit(TurnWrite("t", "n", 0, _state(1))) == CommitOutcome.OK
    assert await store.commit(TurnWrite("t", "n", 0, _state(5), inbox_id="x")) == CommitOutcome.CONFLICT
    grouped = await store_factory(group_commit=True)
    outcomes = await asyncio.gather(
        grouped.commit(TurnWrite("t", "n", 0, _state(6), outbox=[OutboxMessage("send", "q", "lost", "{}")])),
        grouped.commit(TurnWrite("t", "m", 0, _state(1))),
    )
    assert outcomes == [CommitOutcome.CONFLICT, CommitOutcome.OK]
    assert [r async for r in _outbox_ids(store)] == []
    n = await store.load("t", "n")
    assert n is not None and (n.version, orjson.loads(n.state)) == (1, {"n": 1})


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # pinging after rest is for PostgreSQL's pool
async def test_postgresql_replaces_a_pooled_connection_dropped_while_it_rested(db_url, monkeypatch):
    monkeypatch.setattr(store_module, "PING_AFTER_IDLE", 0.05)
    engine = create_engine(db_url)
    other = create_engine(db_url)
    dialect = engine.sync_engine.dialect
    pings: list[object] = []

    def counted_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return type(dialect).do_ping(dialect, dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counted_ping)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with other.connect() as conn:
            await conn.execute(text(f"SELECT pg_terminate_backend({int(pid)})"))
        await asyncio.sleep(0.2)
        async with engine.connect() as conn:  # the dead one fails its ping and is replaced: no error here
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
        assert len(pings) >= 1
        # In constant use (no rest), no ping: the checkout costs no round trip of its own.
        monkeypatch.setattr(store_module, "PING_AFTER_IDLE", 60.0)
        pings.clear()
        for _ in range(3):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert pings == []
    finally:
        await engine.dispose()
        await other.dispose()


async def test_two_turns_of_one_entity_in_a_batch_get_one_step(store_factory):
    """Never sent by one ActorSystem, but the store must not let both pass one statement's version step."""
    store = await store_factory(group_commit=True)
    assert await store.commit(TurnWrite("t", "twice", 0, _state(1))) == CommitOutcome.OK
    outcomes = await asyncio.gather(
        store.commit(TurnWrite("t", "twice", 1, _state(2), outbox=[OutboxMessage("send", "q", "first", "{}")])),
        store.commit(TurnWrite("t", "twice", 1, _state(3), outbox=[OutboxMessage("send", "q", "second", "{}")])),
    )
    assert sorted(outcomes) == [CommitOutcome.CONFLICT, CommitOutcome.OK]
    record = await store.load("t", "twice")
    assert record is not None and record.version == 2
    winner = "first" if outcomes[0] == CommitOutcome.OK else "second"
    assert orjson.loads(record.state) == {"n": 2 if winner == "first" else 3}
    assert [r async for r in _outbox_ids(store)] == [winner]


async def test_the_store_s_statements_run_directly_give_what_sqlalchemy_gives(store_factory):
    """On SQLite the commit path runs its statements straight on the driver (runtime.store.execute): same rows,
    same row counts, same errors as SQLAlchemy's execution of the same statements; elsewhere SQLAlchemy runs them."""
    store = await store_factory()
    now = utcnow()
    rows = [{"t": "t", "i": f"d{k}", "s": _state(k), "now": now} for k in range(3)]
    async with store.engine.begin() as conn:
        await store_module.execute(conn, store_module._INSERT_STATE, rows)
        stepped = await store_module.execute(
            conn, store_module._UPDATE_STATE, {"t": "t", "i": "d1", "v": 1, "nv": 2, "s": _state(9), "now": now}
        )
        assert stepped.rowcount == 1
        probe = store_module._version_pairs(2)
        params = {"t0": "t", "i0": "d1", "t1": "t", "i1": "d2"}
        direct = sorted((r.actor_id, r.version) for r in await store_module.execute(conn, probe, params))
        assert direct == sorted((r.actor_id, r.version) for r in await conn.execute(probe, params))
        assert direct == [("d1", 2), ("d2", 1)]
        stale = await store_module.execute(
            conn, store_module._UPDATE_STATE, {"t": "t", "i": "d1", "v": 1, "nv": 2, "s": _state(9), "now": now}
        )
        assert stale.rowcount == 0
    stored = await store.load("t", "d1")
    assert stored is not None and stored.state == _state(9) and abs(stored.updated_at - now) < timedelta(seconds=1)
    with pytest.raises(IntegrityError):  # the primary key, as SQLAlchemy reports it: the store turns it into CONFLICT
        async with store.engine.begin() as conn:
            await store_module.execute(conn, store_module._INSERT_STATE, rows[0])


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_postgresql_runs_the_store_s_statements_on_asyncpg_as_sqlalchemy_would(db_url):
    """On PostgreSQL too the store's statements go straight to the driver inside the transaction: the rows of a
    ``RETURNING`` named by the server, the cursor events listeners count, SQLAlchemy's errors, and a connection
    found closed invalidated (the pool replaces it) rather than handed to the next turn."""
    engine = create_engine(db_url)
    other = create_engine(db_url)
    try:
        await migrate.upgrade(engine, [migrate.RUNTIME])
        store = StateStore(engine)
        statements = _Statements(store)
        now = utcnow()
        rows = [{"t": "t", "i": f"p{k}", "s": _state(k), "now": now} for k in range(3)]
        async with engine.begin() as conn:
            await store_module.execute(conn, store_module._INSERT_STATE, rows)
            writes = [TurnWrite("t", "p0", 1, _state(5)), TurnWrite("t", "p1", 7, _state(5))]  # p1 is stale
            assert await store_module._step_returning(conn, writes, now) == {("t", "p0")}
        assert statements.counts["INSERT INTO actor_state"] == 1 and statements.counts["UPDATE actor_state AS"] == 1
        stored = await store.load("t", "p0")  # on engine.connect(): begun as SQLAlchemy's autobegin would
        assert stored is not None and (stored.version, stored.state) == (2, _state(5))
        assert statements.counts["SELECT actor_state.version, actor_state.state,"] == 1  # listeners see it too
        statements.close()
        with pytest.raises(IntegrityError) as raised:
            async with engine.begin() as conn:
                await store_module.execute(conn, store_module._INSERT_STATE, rows[1])
        assert getattr(raised.value.orig, "pgcode", None) == "23505"  # unique_violation, as SQLAlchemy reports it
        with pytest.raises(DBAPIError) as dropped:
            async with engine.begin() as conn:
                pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                async with other.connect() as killer:
                    await killer.execute(text(f"SELECT pg_terminate_backend({int(pid)})"))
                await asyncio.sleep(0.2)
                await store_module.execute(conn, store_module._version_pairs(1), {"t0": "t", "i0": "p0"})
        assert dropped.value.connection_invalidated
        async with engine.begin() as conn:  # the pool hands out a live connection next
            found = await store_module.execute(conn, store_module._version_pairs(1), {"t0": "t", "i0": "p0"})
            assert [(r.actor_id, r.version) for r in found] == [("p0", 2)]
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await engine.dispose()
        await other.dispose()


async def test_sqlite_checkpoints_its_log_off_the_event_loop(tmp_path, monkeypatch):
    """A file database's connections never checkpoint in a commit (on the loop); a worker thread does it every
    ``_WalCheckpointer.EVERY`` commits, and makes the log start over once it grew past ``RESTART_FRAMES``."""
    monkeypatch.setattr(store_module._WalCheckpointer, "EVERY", 10)
    monkeypatch.setattr(store_module._WalCheckpointer, "RESTART_FRAMES", 200)
    path = tmp_path / "wal.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(store_module.metadata.create_all)
            assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one() == 0
            checkpointer = (await conn.get_raw_connection()).dbapi_connection.checkpointer
        store = StateStore(engine, group_commit=False)

        async def commits(first: int, count: int) -> None:
            for i in range(first, first + count):
                assert await store.commit(_turn(i, 0)) == CommitOutcome.OK
            async with asyncio.timeout(10):  # the one it started, if any, done
                while checkpointer._running:
                    await asyncio.sleep(0.01)

        await commits(0, 300)  # checkpoints ran meanwhile, as fast as the worker went
        assert checkpointer.checkpoints >= 1
        # Without checkpoints, 300 commits of a few pages each are about 3,400 frames since the log began. One more
        # checkpoint with no writer in its way copies all of it: the first writer after it starts the log over.
        await asyncio.to_thread(checkpointer._checkpoint)
        await commits(300, 1)
        assert await asyncio.to_thread(_log_frames, str(path)) < 50
        assert await _scalar(store, select(func.count()).select_from(outbox)) == 2 * 301
    finally:
        await engine.dispose()


def _log_frames(path: str) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:
        _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames)


async def test_a_busy_flusher_keeps_one_connection_for_all_its_transactions(store_factory):
    """Ten group commits drained by the flushers take one connection from the pool per flusher, not one each (a
    checkout and its return cost as much as a small transaction); the outcomes are the same."""
    store = await store_factory(max_batch=5)
    checkouts: list[Any] = []

    def seen(*_: Any) -> None:
        checkouts.append(1)

    event.listen(store.engine.sync_engine.pool, "checkout", seen)
    try:
        outcomes = await asyncio.gather(*(store.commit(_turn(i, 0)) for i in range(50)))
    finally:
        event.remove(store.engine.sync_engine.pool, "checkout", seen)
    assert outcomes == [CommitOutcome.OK] * 50
    assert store.commits == 10
    assert len(checkouts) <= store._flushers_max  # one per flusher: 1 on SQLite, 3 at most on PostgreSQL
    assert await _scalar(store, select(func.count()).select_from(inbox)) == 50
