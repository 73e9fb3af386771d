"""Actor runtime benchmark: in-memory tells/asks, persisted turns vs a bare upsert, memory per activation.

    python -m bench.actors [--quick] [--no-pg] [--pg-url URL]

Pinned to one core (the process; the database server runs where the OS puts it). Prints numbers and
ratios; it never fails on speed. Targets from issue 2: >= 100,000 tells/s, >= 30,000 asks/s, < 2 KB of
runtime overhead per idle activation, persisted turns >= 0.8 of the bare upsert baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, insert, select, update

from runtime import migrate
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.store import StateStore, actor_state, create_engine

PAYLOAD = "x" * 1000  # ~1 KB JSON state, as in the baseline


@dataclass(frozen=True, slots=True)
class Inc:
    pass


@dataclass(frozen=True, slots=True)
class Touch:
    pass


class CounterActor(Actor):
    persistent = False

    def initial_state(self) -> dict:
        return {"n": 0}

    @handles(Inc)
    def inc(self, msg: Inc, turn: Turn) -> int:
        self.state["n"] += 1
        return self.state["n"]


class IdleActor(Actor):
    persistent = False

    def initial_state(self) -> None:
        return None

    @handles(Touch)
    def touch(self, msg: Touch, turn: Turn) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Read:
    pass


class _Half:
    """Placement of two instances without a membership table: entity ids split by their hash's parity."""

    def __init__(self, me: int) -> None:
        self.me = me

    def owns(self, actor_id: str) -> bool:
        return hash(actor_id) % 2 == self.me

    def owner_of(self, actor_id: str) -> str | None:
        return f"instance-{hash(actor_id) % 2}"


class DocActor(Actor):
    """Persisted actor with a ~1 KB JSON state; every turn changes it."""

    type_name = "doc"

    def initial_state(self) -> dict:
        return {"n": 0, "payload": PAYLOAD}

    @handles(Inc)
    def inc(self, msg: Inc, turn: Turn) -> int:
        self.state["n"] += 1
        return self.state["n"]

    @handles(Read)
    def read(self, msg: Read, turn: Turn) -> int:
        return self.state["n"]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


async def bench_tells(actors: int, total: int) -> float:
    system = ActorSystem(None, mailbox_size=total + 1, max_activations=actors + 10)
    refs = [system.ref(CounterActor, str(i)) for i in range(actors)]
    for r in refs:  # activate first: measure messaging, not activation
        await r.ask(Inc())
    per = total // actors
    start = time.perf_counter()
    for _ in range(per):
        for r in refs:
            await r.tell(Inc())
    await asyncio.gather(*(r.ask(Inc()) for r in refs))  # all earlier tells are done when these answer
    elapsed = time.perf_counter() - start
    await system.stop()
    return rate(per * actors, elapsed)


async def bench_asks(actors: int, total: int, window: int = 1000) -> float:
    system = ActorSystem(None, mailbox_size=window + 10, max_activations=actors + 10)
    refs = [system.ref(CounterActor, str(i)) for i in range(actors)]
    for r in refs:
        await r.ask(Inc())
    done = 0
    start = time.perf_counter()
    i = 0
    while done < total:
        batch = [refs[(i + k) % actors].ask(Inc()) for k in range(window)]
        i += window
        await asyncio.gather(*batch)
        done += window
    elapsed = time.perf_counter() - start
    await system.stop()
    return rate(done, elapsed)


async def bench_activation_memory(count: int) -> tuple[float, float, int]:
    system = ActorSystem(None, max_activations=count + 10)
    refs = [system.ref(IdleActor, f"idle-{i:08d}") for i in range(count)]
    keys = [r.id for r in refs]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for r in refs:
        await r.ask(Touch())
    await asyncio.sleep(0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    tasks = len(asyncio.all_tasks())
    per = total / count
    # The state here is None, encoded "null"; the encoded copy is the rollback point (state, not runtime).
    state_share = sys.getsizeof("null")
    await system.stop()
    del keys
    return per, per - state_share, tasks


_BARE_INSERT = insert(actor_state).values(
    actor_type="bare", actor_id=bindparam("i"), version=1, state=bindparam("s"), updated_at=bindparam("now")
)
_BARE_UPDATE = (
    update(actor_state)
    .where(
        actor_state.c.actor_type == "bare",
        actor_state.c.actor_id == bindparam("i"),
        actor_state.c.version == bindparam("v"),
    )
    .values(version=bindparam("nv"), state=bindparam("s"), updated_at=bindparam("now"))
)


async def bare_upserts(engine, n: int, concurrency: int) -> float:
    """The baseline: a versioned upsert of a 1 KB JSON row, one transaction each, no actor runtime.

    Statements are built once, as the runtime does, so the ratio measures the runtime, not statement
    construction."""
    ids = [f"bare-{uuid.uuid4().hex}" for _ in range(concurrency)]
    versions = dict.fromkeys(ids, 0)

    async def one(entity: str) -> None:
        v = versions[entity]
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            if v == 0:
                await conn.execute(_BARE_INSERT, {"i": entity, "s": PAYLOAD, "now": now})
            else:
                params = {"i": entity, "v": v, "nv": v + 1, "s": PAYLOAD, "now": now}
                result = await conn.execute(_BARE_UPDATE, params)
                assert result.rowcount == 1
        versions[entity] = v + 1

    async def worker(entity: str, count: int) -> None:
        for _ in range(count):
            await one(entity)

    per = n // concurrency
    start = time.perf_counter()
    await asyncio.gather(*(worker(e, per) for e in ids))
    return rate(per * concurrency, time.perf_counter() - start)


async def persisted_turns(
    engine, n: int, concurrency: int, group_commit: bool, *, instances: int = 1, misrouted: bool = False
) -> tuple[float, float]:
    """Turns/s. ``instances=2``: two systems on the database, each asked for the entities it owns (the
    steady state of a cluster: fenced commits, no forwarding); ``misrouted``: each asked for the entities
    the OTHER owns, so every turn loads the entity afresh (the fallback when an owner cannot be reached)."""
    store = StateStore(engine, group_commit=group_commit)
    if instances == 1:
        systems = [ActorSystem(store, mailbox_size=n + 10, exclusive=True)]
    else:
        systems = [
            ActorSystem(StateStore(engine, group_commit=group_commit), mailbox_size=n + 10, placement=_Half(i))
            for i in (0, 1)
        ]
        store = systems[0].store
    ids = [f"doc-{uuid.uuid4().hex}" for _ in range(concurrency)]
    refs = []
    for entity in ids:
        owner = hash(entity) % 2 if instances > 1 else 0
        refs.append(systems[(1 - owner) if misrouted else owner].ref(DocActor, entity))

    async def worker(ref, count: int) -> None:
        for _ in range(count):
            await ref.ask(Inc())

    per = n // concurrency
    start = time.perf_counter()
    await asyncio.gather(*(worker(r, per) for r in refs))
    elapsed = time.perf_counter() - start
    # Check what was measured really happened.
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(actor_state.c.version).where(actor_state.c.actor_id.in_([r.id for r in refs])))
        ).all()
    assert sorted(r.version for r in rows) == [per] * concurrency, "every turn was persisted"
    commits = sum(s.store.commits for s in systems if s.store is not None)
    turns = sum(s.store.turns_committed for s in systems if s.store is not None)
    for system in systems:
        await system.stop()
    return rate(per * concurrency, elapsed), turns / max(commits, 1)


async def reads(engine, n: int, concurrency: int, exclusive: bool) -> float:
    """Reads/s of entities already in memory: an exclusive system answers from its copy; a cluster member
    first checks the stored version (so no read is older than a write made by another instance)."""
    system = ActorSystem(StateStore(engine), mailbox_size=n + 10, exclusive=exclusive)
    refs = [system.ref(DocActor, f"doc-{uuid.uuid4().hex}") for _ in range(concurrency)]
    for ref in refs:
        await ref.ask(Inc())

    async def worker(ref, count: int) -> None:
        for _ in range(count):
            await ref.ask(Read())

    per = n // concurrency
    start = time.perf_counter()
    await asyncio.gather(*(worker(r, per) for r in refs))
    elapsed = time.perf_counter() - start
    await system.stop()
    return rate(per * concurrency, elapsed)


async def bench_database(label: str, url: str, n_seq: int, n_conc: int) -> None:
    engine = create_engine(url, pool_size=20)
    await migrate.upgrade(engine, [migrate.RUNTIME])
    try:
        for conc, n in ((1, n_seq), (64, n_conc)):
            base = await bare_upserts(engine, n, conc)
            plain, _ = await persisted_turns(engine, n, conc, group_commit=False)
            grouped, per_txn = await persisted_turns(engine, n, conc, group_commit=True)
            mode = "sequential" if conc == 1 else f"{conc} concurrent entities"
            print(
                f"  {label:10} {mode:24} bare upsert {base:8.0f}/s | turns {plain:8.0f}/s ({plain / base:4.2f}x) "
                f"| group commit {grouped:8.0f}/s ({grouped / base:4.2f}x, {per_txn:.1f} turns/txn)"
            )
        # The cluster's costs, side by side with one process in the same run (64 entities, group commit).
        one, _ = await persisted_turns(engine, n_conc, 64, group_commit=True)
        two, _ = await persisted_turns(engine, n_conc, 64, group_commit=True, instances=2)
        wrong, _ = await persisted_turns(engine, n_conc // 4, 64, group_commit=True, instances=2, misrouted=True)
        print(
            f"  {label:10} cluster, 64 entities      one process {one:8.0f}/s | two instances, owners asked "
            f"{two:8.0f}/s ({two / one:4.2f}x) | non-owners asked {wrong:8.0f}/s ({wrong / one:4.2f}x)"
        )
        trusted = await reads(engine, n_conc * 4, 64, exclusive=True)
        checked = await reads(engine, n_conc * 4, 64, exclusive=False)
        print(
            f"  {label:10} reads, 64 entities        exclusive {trusted:8.0f}/s | cluster (version checked) "
            f"{checked:8.0f}/s ({checked / trusted:4.2f}x)"
        )
    finally:
        await engine.dispose()


async def _pg_url(admin_url: str) -> tuple[str, Callable[[], Awaitable[None]]] | None:
    try:
        import asyncpg
        from sqlalchemy.engine import make_url

        u = make_url(admin_url)
        conn = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username, database=u.database)
    except Exception as exc:
        print(f"  postgresql skipped: {exc!r}")
        return None
    name = f"ecom_bench_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()

    async def drop() -> None:
        c = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username, database=u.database)
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await c.close()

    return str(u.set(database=name).render_as_string(hide_password=False)), drop


async def run(args: argparse.Namespace) -> None:
    scale = 0.2 if args.quick else 1.0
    print("in-memory messaging (one core)")
    for actors in (1, 10_000):
        tells = await bench_tells(actors, int(400_000 * scale))
        asks = await bench_asks(actors, int(200_000 * scale))
        print(
            f"  {actors:>6} actor(s): tell {tells:10.0f}/s ({tells / 100_000:4.2f}x target) | "
            f"ask {asks:10.0f}/s ({asks / 30_000:4.2f}x target)"
        )
    per, overhead, tasks = await bench_activation_memory(int(20_000 * scale))
    print(
        f"  memory per idle activation: {per:.0f} B total, {overhead:.0f} B runtime overhead "
        f"({overhead / 2048:4.2f}x of the 2 KB budget); tasks alive with all actors idle: {tasks}"
    )
    print("persisted turns (1 KB JSON state; ratio = vs bare upsert measured in this run)")
    with tempfile.TemporaryDirectory() as tmp:
        await bench_database("sqlite", f"sqlite+aiosqlite:///{tmp}/bench.db", int(2000 * scale), int(4000 * scale))
    if not args.no_pg:
        made = await _pg_url(args.pg_url)
        if made is not None:
            url, drop = made
            try:
                await bench_database("postgresql", url, int(2000 * scale), int(4000 * scale))
            finally:
                await drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.actors", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a fifth of the work, for a smoke run")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args(argv)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    try:
        import uvloop

        uvloop.install() if sys.version_info < (3, 12) else None
    except ImportError:
        pass
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
