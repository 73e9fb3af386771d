"""Membership and placement (runtime/cluster.py) on a real database (SQLite file and PostgreSQL), and
forwarding to the owner over real HTTP between two members.

Members here share one database as the instances of one service do; ``beat()`` is one heartbeat, called
directly where a test needs the view to move on at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from aiohttp import ClientSession, web
from sqlalchemy import select

from bus.envelope import Envelope
from runtime import migrate
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.cluster import Cluster, forwarding_middleware, install, rendezvous
from runtime.messages import BusBinding
from runtime.store import StateStore, cluster_members, create_engine
from tests.support.cluster import free_base_port

KEYS = [f"entity-{i}" for i in range(300)]


@pytest.fixture
async def engine(db_url):
    engine = create_engine(db_url)
    await migrate.upgrade(engine, [migrate.RUNTIME])
    yield engine
    await engine.dispose()


@pytest.fixture
async def members(engine):
    made: list[Cluster] = []

    async def make(address: str, **kwargs) -> Cluster:
        cluster = Cluster(engine, address, heartbeat_interval=0.1, member_timeout=0.5, **kwargs)
        await cluster.start()
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        await cluster.stop()


async def _settle(*clusters: Cluster) -> None:
    for c in clusters:
        await c.beat()


def _owners(clusters: list[Cluster], key: str) -> list[str]:
    return [c.address for c in clusters if c.owns(key)]


async def test_members_join_and_agree_on_one_owner_per_entity(members):
    a, b, c = [await members(f"http://127.0.0.1:{p}") for p in (20001, 20002, 20003)]
    await _settle(a, b, c)
    assert (
        a.addresses
        == b.addresses
        == c.addresses
        == ("http://127.0.0.1:20001", "http://127.0.0.1:20002", "http://127.0.0.1:20003")
    )
    counts = {x.address: 0 for x in (a, b, c)}
    for key in KEYS:
        owners = _owners([a, b, c], key)
        assert len(owners) == 1, f"{key}: owners {owners}"  # never two owners in a steady view
        assert owners[0] == rendezvous(a.addresses, key)
        counts[owners[0]] += 1
    assert min(counts.values()) > len(KEYS) / 3 * 0.6, counts


async def test_a_member_that_leaves_hands_over_only_its_own_entities(members):
    a, b, c = [await members(f"http://127.0.0.1:{p}") for p in (20011, 20012, 20013)]
    await _settle(a, b, c)
    before = {key: rendezvous(a.addresses, key) for key in KEYS}
    await c.stop()
    await _settle(a, b)
    assert a.addresses == b.addresses == ("http://127.0.0.1:20011", "http://127.0.0.1:20012")
    for key in KEYS:
        owners = _owners([a, b], key)
        assert len(owners) == 1
        if before[key] != c.address:
            assert owners[0] == before[key], "an entity moved although its owner stayed"


async def test_a_silent_member_is_declared_dead_and_its_entities_move(members, engine):
    a = await members("http://127.0.0.1:20021")
    b = await members("http://127.0.0.1:20022")
    await _settle(a, b)
    orphan = next(k for k in KEYS if b.owns(k))
    # b "crashes": its heartbeat stops, it never says it leaves.
    assert b._task is not None
    b._task.cancel()
    await asyncio.gather(b._task, return_exceptions=True)
    started = time.monotonic()
    while not a.owns(orphan):
        assert time.monotonic() - started < 5, "the dead member's entities did not move"
        await asyncio.sleep(0.05)
    moved_after = time.monotonic() - started
    assert moved_after >= 0.4, "declared dead before its timeout"
    async with engine.connect() as conn:
        status = (
            await conn.execute(select(cluster_members.c.status).where(cluster_members.c.member_id == b.member_id))
        ).scalar_one()
    assert status == "dead"

    # b was only paused: its next heartbeat finds it declared dead; it drops its copies and joins again anew.
    evicted: list[str] = []
    b.on_evicted = lambda: evicted.append("dropped")
    old_id = b.member_id
    await b.beat()
    await a.beat()
    assert evicted == ["dropped"] and b.member_id != old_id
    assert a.addresses == b.addresses and len(a.addresses) == 2


async def test_a_restart_at_the_same_address_supersedes_the_old_incarnation(members, engine):
    a = await members("http://127.0.0.1:20031")
    crashed = await members("http://127.0.0.1:20032")
    assert crashed._task is not None
    crashed._task.cancel()  # SIGKILL: no leave
    await asyncio.gather(crashed._task, return_exceptions=True)
    restarted = await members("http://127.0.0.1:20032")
    await a.beat()
    active = [m for m in a.members if m.address == "http://127.0.0.1:20032"]
    assert [m.member_id for m in active] == [restarted.member_id]


# ---------------------------------------------------------------------------------------------------
# Forwarding over real HTTP


@dataclass(frozen=True)
class Bump:
    pass


class CounterActor(Actor):
    type_name = "counter"

    def initial_state(self) -> dict:
        return {"n": 0}

    @handles(Bump)
    def bump(self, msg: Bump, turn: Turn) -> int:
        self.state["n"] += 1
        return self.state["n"]


async def _serve(engine, port: int):
    system = ActorSystem(StateStore(engine), name=f"p{port}")
    system.register(CounterActor)
    cluster = Cluster(
        engine, f"http://127.0.0.1:{port}", heartbeat_interval=0.1, member_timeout=0.5, on_change=system.rebalance
    )
    system.placement = cluster
    binding = BusBinding(system)
    binding.to_actor(Bump, CounterActor)

    async def key_of(request: web.Request) -> str | None:
        return request.match_info.get("id")

    async def bump(request: web.Request) -> web.Response:
        n = await system.ref(CounterActor, request.match_info["id"]).ask(Bump())
        return web.json_response({"n": n, "served_by": cluster.address})

    app = web.Application(middlewares=[forwarding_middleware(key_of)])
    install(app, cluster)
    app.router.add_post("/counters/{id}", bump)
    await cluster.start()
    await system.start()
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def close() -> None:
        await runner.cleanup()
        await system.stop()
        await cluster.stop()

    return system, cluster, binding, close


async def test_requests_and_bus_messages_reach_the_owner(engine):
    base = free_base_port(2)
    p1, c1, bus1, close1 = await _serve(engine, base)
    p2, c2, _, close2 = await _serve(engine, base + 1)
    try:
        await c1.beat()
        await c2.beat()
        assert c1.addresses == c2.addresses and len(c1.addresses) == 2
        key = next(k for k in KEYS if c2.owns(k))  # lives on member 2

        async with ClientSession() as http:
            for expected in (1, 2, 3):
                async with http.post(f"http://127.0.0.1:{base}/counters/{key}") as resp:
                    body = await resp.json()
                assert resp.status == 200 and body == {"n": expected, "served_by": c2.address}
        assert p1.live_count == 0 and p2.live_count == 1

        # The bus gave member 1 a message for member 2's entity: it is applied on 2, acknowledged after.
        env = Envelope(type="Bump", session_id=key, body={})
        await bus1(env)
        assert c1.forwarded["bus"] == 1
        assert await p2.ref(CounterActor, key).ask(Bump()) == 5
        assert await p2.store.seen(f"counter/{key}", env.message_id)
        assert p1.live_count == 0

        # The owner is gone without a word: member 1 serves the entity itself (fenced), nothing is refused.
        await close2()
        async with ClientSession() as http, http.post(f"http://127.0.0.1:{base}/counters/{key}") as resp:
            body = await resp.json()
        assert resp.status == 200 and body["n"] == 6 and body["served_by"] == c1.address
    finally:
        await close1()
        if c2._task is not None:
            await close2()
