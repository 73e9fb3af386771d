"""Outbox -> relay -> bus -> binding -> actor inbox: the whole asynchronous path, on real databases."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal

import pytest

from bus.memory import MemoryBus
from runtime import migrate
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.messages import BusBinding, envelope, from_body, to_body
from runtime.outbox import OutboxRelay
from runtime.store import StateStore, create_engine


@dataclass(frozen=True)
class Produce:
    n: int


@dataclass(frozen=True)
class Line:
    sku: str
    price: Decimal


@dataclass(frozen=True)
class Ping:
    n: int
    lines: tuple[Line, ...] = ()


class ProducerActor(Actor):
    @handles(Produce)
    def produce(self, msg: Produce, turn: Turn) -> None:
        self.state["sent"] = self.state.get("sent", 0) + 1
        turn.send("target", envelope(Ping(msg.n, (Line("a", Decimal("1.10")),)), session_id="t1"))


class TargetActor(Actor):
    def initial_state(self) -> dict:
        return {"seen": []}

    @handles(Ping)
    def ping(self, msg: Ping, turn: Turn) -> None:
        assert all(line.price == Decimal("1.10") for line in msg.lines), "Decimals survive the bus"
        self.state["seen"].append(msg.n)


def test_message_codec_round_trip_and_errors():
    msg = Ping(3, (Line("x", Decimal("19.99")),))
    body = to_body(msg)
    assert body == {"n": 3, "lines": [{"sku": "x", "price": "19.99"}]}
    assert from_body(Ping, body) == msg
    from bus.base import MalformedMessage

    with pytest.raises(MalformedMessage, match="'n'"):
        from_body(Ping, {"n": "three"})
    with pytest.raises(MalformedMessage, match="missing"):
        from_body(Ping, {})
    with pytest.raises(MalformedMessage, match="float"):
        from_body(Line, {"sku": "x", "price": 1.1})


@pytest.fixture
async def pipeline(db_url, tmp_path):
    """Producer service on the test database, target service on its own SQLite file, one memory bus."""
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    producer_engine = create_engine(db_url)
    target_engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'target.db'}")
    for engine in (producer_engine, target_engine):
        await migrate.upgrade(engine, [migrate.RUNTIME])
    relay = OutboxRelay(producer_engine, bus, poll_interval=0.05)
    producer = ActorSystem(StateStore(producer_engine), on_outbox=relay.notify)
    target = ActorSystem(StateStore(target_engine))
    target.register(TargetActor)
    for system in (producer, target):
        await system.start()
    binding = BusBinding(target)
    binding.to_actor(Ping, TargetActor)
    consumer = await bus.consume("target", binding)
    yield bus, relay, producer, target
    await consumer.stop()
    await relay.stop()
    for system in (producer, target):
        await system.stop()
    await bus.close()
    for engine in (producer_engine, target_engine):
        await engine.dispose()


async def _seen(target: ActorSystem) -> list[int]:
    info = await target.inspect("target", "t1")
    return info["state"]["seen"] if info else []


async def test_committed_messages_reach_the_other_service_in_order(pipeline):
    _bus, relay, producer, target = pipeline
    relay.start()
    for n in range(20):
        await producer.ref(ProducerActor, "p1").ask(Produce(n))
    async with asyncio.timeout(10):
        while len(await _seen(target)) < 20:
            await asyncio.sleep(0.02)
    assert await _seen(target) == list(range(20))
    assert await relay.pending() == 0


async def test_rows_written_while_the_relay_is_down_are_sent_later(pipeline):
    bus, relay, producer, target = pipeline
    for n in range(5):
        await producer.ref(ProducerActor, "p1").ask(Produce(n))
    assert await relay.pending() == 5
    relay.start()  # as a new process would on start-up
    async with asyncio.timeout(10):
        while await relay.pending():
            await asyncio.sleep(0.02)
    await bus.wait_idle()
    assert await _seen(target) == [0, 1, 2, 3, 4]


async def test_redelivered_message_has_no_second_effect(pipeline):
    bus, _relay, _producer, target = pipeline
    env = envelope(Ping(7), session_id="t1")
    await bus.send("target", env)
    await bus.send("target", env)  # the same message id again, as after a relay crash
    await bus.wait_idle()
    assert await _seen(target) == [7]
    assert await bus.dead_letters("target") == []


async def test_unroutable_message_is_dead_lettered_not_lost(pipeline):
    bus, _relay, _producer, _target = pipeline
    await bus.send("target", envelope(Produce(1), session_id="t1"))
    await bus.wait_idle()
    dead = await bus.dead_letters("target")
    assert len(dead) == 1 and dead[0].envelope.type == "Produce" and "no route" in dead[0].reason
