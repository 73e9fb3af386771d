"""The actor runtime against a real database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select

from runtime.actors import (
    Actor,
    ActorSystem,
    DuplicateMessage,
    MailboxFull,
    ReminderFired,
    Turn,
    handles,
)
from runtime.store import actor_state, outbox


@dataclass(frozen=True)
class Append:
    value: int


@dataclass(frozen=True)
class Get:
    pass


@dataclass(frozen=True)
class AppendThenFail:
    value: int


@dataclass(frozen=True)
class Increment:
    pass


@dataclass(frozen=True)
class Wait:
    gate: asyncio.Event


@dataclass(frozen=True)
class Remind:
    due_in: float


@dataclass(frozen=True)
class Emit:
    fail: bool = False


class BoomError(Exception):
    pass


class LogActor(Actor):
    type_name = "log"

    def initial_state(self) -> dict:
        return {"values": [], "count": 0, "fired": []}

    @handles(Append)
    def append(self, msg: Append, turn: Turn) -> int:
        self.state["values"].append(msg.value)
        return len(self.state["values"])

    @handles(Get)
    def get(self, msg: Get, turn: Turn) -> dict:
        return self.state

    @handles(AppendThenFail)
    def append_then_fail(self, msg: AppendThenFail, turn: Turn) -> None:
        self.state["values"].append(msg.value)
        turn.publish(_envelope("WontHappen", self.id))
        raise BoomError("handler failed after changing state")

    @handles(Increment)
    async def increment(self, msg: Increment, turn: Turn) -> int:
        await asyncio.sleep(0)  # give the other system a chance to interleave
        self.state["count"] += 1
        return self.state["count"]

    @handles(Wait)
    async def wait(self, msg: Wait, turn: Turn) -> None:
        await msg.gate.wait()

    @handles(Remind)
    def remind(self, msg: Remind, turn: Turn) -> None:
        turn.set_reminder("ping", due_in=msg.due_in, payload={"n": 1})

    @handles(ReminderFired)
    def fired(self, msg: ReminderFired, turn: Turn) -> None:
        self.state["fired"].append(msg.name)

    @handles(Emit)
    def emit(self, msg: Emit, turn: Turn) -> None:
        self.state["count"] += 1
        turn.publish(_envelope("Emitted", self.id))
        if msg.fail:
            raise BoomError("no")


def _envelope(type_: str, session: str):
    from bus.envelope import Envelope

    return Envelope(type=type_, session_id=session, body={"id": session})


async def _persisted(store, actor_id: str) -> tuple[int, dict] | None:
    import orjson

    record = await store.load("log", actor_id)
    return (record.version, orjson.loads(record.state)) if record else None


@pytest.fixture
async def system_factory(store_factory):
    systems: list[ActorSystem] = []

    async def make(**kwargs) -> ActorSystem:
        store_kwargs = {k: kwargs.pop(k) for k in ("group_commit", "max_batch") if k in kwargs}
        store = await store_factory(**store_kwargs)
        system = ActorSystem(store, **kwargs)
        system.register(LogActor)
        await system.start()
        systems.append(system)
        return system

    yield make
    for system in systems:
        await system.stop()


@pytest.mark.parametrize("group_commit", [True, False])
async def test_thousand_concurrent_asks_are_all_applied_in_order(system_factory, group_commit):
    system = await system_factory(group_commit=group_commit, mailbox_size=2000)
    ref = system.ref(LogActor, "a1")
    replies = await asyncio.gather(*(ref.ask(Append(i)) for i in range(1000)))
    assert sorted(replies) == list(range(1, 1001))
    assert replies == list(range(1, 1001)), "replies come back in arrival order"
    state = await ref.ask(Get())
    assert state["values"] == list(range(1000))
    version, stored = await _persisted(system.store, "a1")
    assert version == 1000, "one version per state-changing message; the read did not bump it"
    assert stored["values"] == list(range(1000))


async def test_failed_turn_leaves_state_and_store_untouched(system_factory):
    system = await system_factory()
    ref = system.ref(LogActor, "f1")
    await ref.ask(Append(1))
    before = await _persisted(system.store, "f1")
    with pytest.raises(BoomError, match="after changing state"):
        await ref.ask(AppendThenFail(99))
    assert (await ref.ask(Get()))["values"] == [1], "in-memory state rolled back"
    assert await _persisted(system.store, "f1") == before, "nothing persisted"
    async with system.store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(outbox))).scalar_one() == 0
    assert await ref.ask(Append(2)) == 2
    assert (await _persisted(system.store, "f1"))[0] == before[0] + 1


async def test_outbox_rows_commit_with_the_turn_only(system_factory):
    system = await system_factory()
    ref = system.ref(LogActor, "o1")
    await ref.ask(Emit())
    with pytest.raises(BoomError):
        await ref.ask(Emit(fail=True))
    await ref.ask(Emit())
    async with system.store.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.kind, outbox.c.envelope))).all()
    assert len(rows) == 2 and all(r.kind == "publish" and "Emitted" in r.envelope for r in rows)
    assert (await ref.ask(Get()))["count"] == 2


async def test_same_message_id_has_no_second_effect(system_factory):
    system = await system_factory()
    ref = system.ref(LogActor, "d1")
    await ref.ask(Append(1), message_id="m-1")
    with pytest.raises(DuplicateMessage):
        await ref.ask(Append(1), message_id="m-1")
    await ref.ask(Append(2), message_id="m-2")
    assert (await ref.ask(Get()))["values"] == [1, 2]
    assert (await _persisted(system.store, "d1"))[0] == 2


async def test_two_systems_on_one_database_lose_no_update(system_factory):
    a = await system_factory(conflict_retries=50)
    b = await system_factory(conflict_retries=50)
    ra, rb = a.ref(LogActor, "shared"), b.ref(LogActor, "shared")
    await ra.ask(Increment())  # create the row first so both start from a stored version

    async def hammer(ref, n):
        for _ in range(n):
            await ref.ask(Increment())

    await asyncio.gather(hammer(ra, 60), hammer(rb, 60))
    version, stored = await _persisted(a.store, "shared")
    assert stored["count"] == 121
    assert version == 121
    assert a.stats["conflicts"] + b.stats["conflicts"] > 0, "the interleaving produced conflicts that were retried"


async def test_idle_actor_deactivates_and_comes_back_with_its_state(system_factory):
    system = await system_factory(idle_timeout=0.1)
    ref = system.ref(LogActor, "idle")
    await ref.ask(Append(7))
    assert system.live_count == 1
    async with asyncio.timeout(5):
        while system.live_count:
            await asyncio.sleep(0.05)
    assert (await ref.ask(Get()))["values"] == [7]
    assert system.stats["activations"] == 2


class BriefLogActor(LogActor):
    type_name = "brieflog"
    idle_timeout = 0.1  # shorter than the system's: its own limit applies


async def test_a_type_s_own_idle_limit_deactivates_its_actors_and_only_them(system_factory):
    system = await system_factory(idle_timeout=2.0)
    brief, kept = system.ref(BriefLogActor, "b"), system.ref(LogActor, "k")
    await brief.ask(Append(1))
    await kept.ask(Append(2))
    async with asyncio.timeout(5):
        while system.live_count > 1:
            await asyncio.sleep(0.05)
    assert {a["id"] for a in system.introspect()["log"]["actors"]} == {"k"}, "the system's limit still holds for others"
    assert (await brief.ask(Get()))["values"] == [1]


async def test_activation_cap_evicts_least_recently_used_and_restores(system_factory):
    system = await system_factory(max_activations=10)
    for i in range(50):
        await system.ref(LogActor, f"cap{i}").ask(Append(i))
        assert system.live_count <= 10
    assert {a["id"] for a in system.introspect()["log"]["actors"]} == {f"cap{i}" for i in range(40, 50)}
    for i in range(50):
        assert (await system.ref(LogActor, f"cap{i}").ask(Get()))["values"] == [i]
    assert system.stats["deactivations"] >= 40


async def test_full_mailbox_answers_with_backpressure(system_factory):
    system = await system_factory(mailbox_size=5)
    ref = system.ref(LogActor, "busy")
    gate = asyncio.Event()
    first = asyncio.ensure_future(ref.ask(Wait(gate)))

    def first_taken() -> bool:  # the first message is being handled (state loaded), the mailbox is empty again
        actors = system.introspect()["log"]["actors"]
        return bool(actors) and actors[0]["mailbox_depth"] == 0 and actors[0]["handled"] == 0

    async with asyncio.timeout(10):  # a state load on a loaded database server can take a while
        await asyncio.sleep(0.01)
        while not first_taken():
            await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(ref.ask(Append(i))) for i in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(MailboxFull) as info:
        await ref.ask(Append(99))
    assert info.value.status == 503 and info.value.headers["Retry-After"]
    assert system.introspect()["log"]["actors"][0]["mailbox_depth"] == 5
    gate.set()
    await first
    assert await asyncio.gather(*queued) == [1, 2, 3, 4, 5]
    assert 99 not in (await ref.ask(Get()))["values"]


async def test_reminder_fires_after_restart_on_the_same_database(system_factory):
    first = await system_factory(reminder_poll_interval=60)  # will not poll before it stops
    await first.ref(LogActor, "r1").ask(Remind(due_in=0.2))
    await first.stop()
    second = await system_factory(reminder_poll_interval=0.05)
    ref = second.ref(LogActor, "r1")
    async with asyncio.timeout(5):
        while not (await ref.ask(Get()))["fired"]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # more polls: a one-shot reminder must not fire again
    assert (await ref.ask(Get()))["fired"] == ["ping"]
    assert await second.store.reminders_of("log", "r1") == []


async def test_introspection_and_inspect(system_factory):
    system = await system_factory()
    await system.ref(LogActor, "i1").ask(Append(3))
    info = system.introspect()["log"]
    assert info["live"] == 1 and info["handled"] == 1 and info["actors"][0]["id"] == "i1"
    one = await system.inspect("log", "i1")
    assert one["version"] == 1 and one["state"]["values"] == [3] and one["active"] is True
    await system.stop()
    fresh = ActorSystem(system.store)
    fresh.register(LogActor)
    stored = await fresh.inspect("log", "i1")
    assert stored["active"] is False and stored["version"] == 1 and stored["state"]["values"] == [3]
    assert await fresh.inspect("log", "missing") is None


async def test_group_commit_batches_turns_and_keeps_each_turn_atomic(system_factory):
    system = await system_factory(group_commit=True)
    refs = [system.ref(LogActor, f"g{i}") for i in range(64)]
    await asyncio.gather(*(r.ask(Append(1)) for r in refs))
    store = system.store
    assert store.turns_committed == 64
    assert store.commits < 64, "turns finishing together shared transactions"

    # One turn in a batch fails inside the transaction (its SQL hook raises): the batch falls back to
    # one transaction per turn, the failing turn alone is refused and the others are kept.
    class HookActor(LogActor):
        type_name = "log"

        @handles(Emit)
        def emit(self, msg: Emit, turn: Turn) -> None:
            self.state["count"] += 1

            async def hook(conn):
                if msg.fail:
                    raise BoomError("hook failed")

            turn.on_commit(hook)

    await system.stop()
    system2 = ActorSystem(store)
    await system2.start()
    try:
        results = await asyncio.gather(
            *(system2.ref(HookActor, f"g{i}").ask(Emit(fail=(i == 7))) for i in range(64)), return_exceptions=True
        )
        failures = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        assert failures == [7]
        for i in (6, 7, 8):
            version, state = await _persisted(store, f"g{i}")
            assert (version, state["count"]) == ((1, 0) if i == 7 else (2, 1))
    finally:
        await system2.stop()
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(actor_state))).scalar_one() == 64


async def test_old_inbox_ids_are_purged_recent_ones_kept(system_factory):
    from datetime import timedelta

    from runtime.store import utcnow

    system = await system_factory()
    ref = system.ref(LogActor, "p1")
    await ref.ask(Append(1), message_id="old")
    assert await system.store.purge_inbox(utcnow() - timedelta(hours=1)) == 0
    with pytest.raises(DuplicateMessage):
        await ref.ask(Append(1), message_id="old")
    assert await system.store.purge_inbox(utcnow() + timedelta(seconds=1)) == 1
    assert not await system.store.seen("log/p1", "old")
