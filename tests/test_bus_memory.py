"""MemoryBus: the shared bus contract plus what only the in-memory backend promises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from bus import Bus, BusError, Envelope, MemoryBus
from tests.bus_contract import *
from tests.bus_contract import MAX_ATTEMPTS, BusFactory, Log, bounded, msg, unique


@pytest.fixture
async def bus_factory() -> AsyncIterator[BusFactory]:
    # One MemoryBus stands for the broker *and* every process: consumers on it compete like
    # processes would, and Consumer.stop() plays a process dying. start() is idempotent.
    bus = MemoryBus(max_attempts=MAX_ATTEMPTS)

    async def connect() -> Bus:
        await bus.start()
        return bus

    yield connect
    await bus.close()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(max_attempts=MAX_ATTEMPTS)
    await bus.start()
    yield bus
    await bus.close()


def test_memory_bus_satisfies_protocol() -> None:
    assert isinstance(MemoryBus(), Bus)
    assert MemoryBus.name == "memory"


async def test_memory_stats_wait_idle_and_no_redelivery(bus: MemoryBus) -> None:
    sessions = [unique("s") for _ in range(10)]
    for session in sessions:
        for i in range(3):
            await bus.send("q", msg(session, i=i))
    assert bus.stats()["q"] == {"pending": 30, "in_flight": 0, "dead_letters": 0, "delivered": 0, "completed": 0}
    with pytest.raises(TimeoutError, match="not idle"):
        await bus.wait_idle(timeout=0.05)  # nobody consumes yet

    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        await asyncio.sleep(0)
        seen.append(env.message_id)

    await bus.consume("q", handler)
    await bus.wait_idle(timeout=5)
    assert bus.stats()["q"] == {"pending": 0, "in_flight": 0, "dead_letters": 0, "delivered": 30, "completed": 30}
    assert len(seen) == len(set(seen)) == 30  # handled once each, never again


async def test_memory_wait_idle_can_ignore_other_queues(bus: MemoryBus) -> None:
    await bus.send("unconsumed", msg("s", i=0))
    await bus.consume("busy", Log().add)
    await bus.send("busy", msg("s", i=0))
    await bus.wait_idle(timeout=5, queues=["busy"])
    assert bus.stats()["unconsumed"]["pending"] == 1


async def test_memory_spreads_sessions_over_consumers(bus: MemoryBus) -> None:
    gate = asyncio.Event()
    started = Log()

    def handler_for(name: str) -> Any:
        async def handler(env: Envelope) -> None:
            await started.add(name)
            await gate.wait()

        return handler

    await bus.consume("q", handler_for("a"), max_concurrent_sessions=2)
    await bus.consume("q", handler_for("b"), max_concurrent_sessions=2)
    for i in range(6):
        await bus.send("q", msg(f"s{i}", i=i))
    await started.wait_count(4)
    await asyncio.sleep(0.02)  # give a (wrong) fifth call the chance to start
    assert sorted(started.items) == ["a", "a", "b", "b"]
    gate.set()
    await bus.wait_idle(timeout=5)
    assert len(started.items) == 6


async def test_memory_max_concurrent_sessions_is_a_hard_limit(bus: MemoryBus) -> None:
    running = 0
    peak = 0

    async def handler(env: Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.002)
        running -= 1

    await bus.consume("q", handler, max_concurrent_sessions=3)
    for i in range(40):
        await bus.send("q", msg(f"s{i % 10}", i=i))
    await bus.wait_idle(timeout=5)
    assert peak == 3


async def test_memory_workers_exit_when_idle(bus: MemoryBus) -> None:
    # No task per idle session (or per idle consumer slot): workers only live while there is work.
    baseline = len(asyncio.all_tasks())
    await bus.consume("q", Log().add, max_concurrent_sessions=16)
    for i in range(500):
        await bus.send("q", msg(f"s{i}", i=i))
    assert len(asyncio.all_tasks()) <= baseline + 16
    await bus.wait_idle(timeout=5)
    await asyncio.sleep(0)  # let finished workers be reaped
    assert len(asyncio.all_tasks()) == baseline
    assert bus._queues["q"].sessions == {}  # no per-session residue either


async def test_memory_redelivery_delay_and_delivery_count() -> None:
    slow = MemoryBus(max_attempts=3, redelivery_delay=0.05)
    await slow.start()
    calls: list[tuple[int, str, float]] = []

    async def handler(env: Envelope) -> None:
        calls.append((env.body["i"], env.headers["delivery-count"], time.monotonic()))
        if env.body["i"] == 0 and env.headers["delivery-count"] == "1":
            raise RuntimeError("once")

    try:
        await slow.consume("q", handler)
        await slow.send("q", msg("s", i=0))
        await slow.send("q", msg("s", i=1))
        await slow.wait_idle(timeout=5)
    finally:
        await slow.close()
    assert [(i, count) for i, count, _ in calls] == [(0, "1"), (0, "2"), (1, "1")]
    assert calls[1][2] - calls[0][2] >= 0.045


async def test_memory_dead_letter_details(bus: MemoryBus) -> None:
    async def handler(env: Envelope) -> None:
        raise KeyError("sku-1")

    await bus.consume("q", handler)
    env = msg("s", type="ReserveStock", sku="sku-1")
    await bus.send("q", env)
    await bus.wait_idle(timeout=5)
    [letter] = await bus.dead_letters("q")
    assert (letter.queue, letter.attempts, letter.reason) == ("q", MAX_ATTEMPTS, "KeyError: 'sku-1'")
    assert letter.envelope == env  # as sent, without per-delivery headers
    datetime.fromisoformat(letter.dead_lettered_at)
    assert bus.stats()["q"]["dead_letters"] == 1
    assert await bus.dead_letters("nothing-here") == []


async def test_memory_queue_and_subscription_may_share_a_name(bus: MemoryBus) -> None:
    queue_log, sub_log = Log(), Log()

    async def fail(env: Envelope) -> None:
        await sub_log.add(env.type)
        raise RuntimeError("no")

    await bus.consume("order", queue_log.add)
    await bus.subscribe("order", ["CartCleared"], fail)
    await bus.send("order", msg("o1", type="CheckoutRequested"))
    await bus.publish(msg("o1", type="CartCleared"))
    await bus.wait_idle(timeout=5)
    assert [e.type for e in queue_log.items] == ["CheckoutRequested"]
    assert set(bus.stats()) == {"order", "subscription:order"}
    [letter] = await bus.dead_letters("order")  # both entities' dead letters under the name
    assert letter.envelope.type == "CartCleared"


async def test_memory_stop_hands_session_to_running_peer(bus: MemoryBus) -> None:
    gate = asyncio.Event()
    cancelled = asyncio.Event()
    log = Log()

    async def first_handler(env: Envelope) -> None:
        if env.body["i"] == 2:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await log.add(("first", env.body["i"]))

    async def second_handler(env: Envelope) -> None:
        await log.add(("second", env.body["i"]))

    first = await bus.consume("q", first_handler)
    for i in range(6):
        await bus.send("q", msg("s", i=i))
    await log.wait_count(2)
    await bus.consume("q", second_handler)  # joins while the first holds the session
    await asyncio.sleep(0.01)
    assert log.items == [("first", 0), ("first", 1)]  # session still held: nothing on second
    await bounded(first.stop(), 5)
    assert cancelled.is_set()
    await bus.wait_idle(timeout=5)
    assert log.items == [("first", 0), ("first", 1)] + [("second", i) for i in range(2, 6)]
    assert bus.stats()["q"]["completed"] == 6


async def test_memory_handler_may_stop_its_own_consumer(bus: MemoryBus) -> None:
    log = Log()
    box: dict[str, Any] = {}

    async def handler(env: Envelope) -> None:
        await log.add(env.body["i"])
        if env.body["i"] == 1:
            await box["consumer"].stop()

    box["consumer"] = await bus.consume("q", handler)
    for i in range(4):
        await bus.send("q", msg("s", i=i))
    await log.wait_count(2)
    await asyncio.sleep(0.01)
    assert log.items == [0, 1]
    assert bus.stats()["q"] == {"pending": 2, "in_flight": 0, "dead_letters": 0, "delivered": 2, "completed": 2}
    await bus.consume("q", handler)
    await bus.wait_idle(timeout=5)
    assert log.items == [0, 1, 2, 3]


async def test_memory_close_cancels_in_flight_and_keeps_the_message() -> None:
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    started = asyncio.Event()
    seen: list[str] = []

    async def hang(env: Envelope) -> None:
        seen.append(env.headers["delivery-count"])
        started.set()
        await asyncio.Event().wait()

    await bus.consume("q", hang)
    await bus.send("q", msg("s", i=0))
    await bounded(started.wait(), 5)
    await bounded(bus.close(), 5)
    assert bus.stats()["q"]["pending"] == 1 and bus.stats()["q"]["in_flight"] == 0
    with pytest.raises(BusError):
        await bus.ping()
    with pytest.raises(BusError):
        await bus.send("q", msg("s", i=1))

    await bus.start()  # messages are durable for the life of the object
    await bus.ping()
    log = Log()
    await bus.consume("q", log.add)
    await bus.wait_idle(timeout=5)
    assert seen == ["1"] and log.items[0].headers["delivery-count"] == "2"
    await bus.close()


async def test_memory_not_started_is_an_error() -> None:
    bus = MemoryBus()
    with pytest.raises(BusError, match="not started"):
        await bus.ping()
    with pytest.raises(BusError):
        await bus.send("q", msg("s"))


async def test_memory_body_goes_through_the_codec(bus: MemoryBus) -> None:
    log = Log()
    await bus.consume("q", log.add)
    body = {"at": datetime(2026, 1, 2, tzinfo=UTC), "items": [1]}
    await bus.send("q", Envelope(type="T", session_id="s", body=body))
    body["items"].append(2)  # the sender mutating its dict afterwards must not leak through
    await bus.wait_idle(timeout=5)
    assert log.items[0].body == {"at": "2026-01-02T00:00:00+00:00", "items": [1]}
    with pytest.raises(TypeError):
        await bus.send("q", Envelope(type="T", session_id="s", body={"x": object()}))
    with pytest.raises(TypeError):
        await bus.send("q", {"type": "T"})  # type: ignore[arg-type]


async def test_memory_subscribe_validates_event_types(bus: MemoryBus) -> None:
    with pytest.raises(TypeError):
        await bus.subscribe("svc", "OrderPaid", Log().add)
    with pytest.raises(ValueError):
        await bus.subscribe("svc", [], Log().add)


async def test_memory_leaked_cancelled_error_counts_as_failure(bus: MemoryBus) -> None:
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError()  # not from stop(): must not loop forever

    await bus.consume("q", handler)
    await bus.send("q", msg("s"))
    await bus.wait_idle(timeout=5)
    assert calls == MAX_ATTEMPTS
    [letter] = await bus.dead_letters("q")
    assert letter.reason.startswith("CancelledError")


async def test_memory_throughput_smoke(bus: MemoryBus) -> None:
    # Guards against accidental O(n^2) or per-message task churn: 20k messages well under a second.
    count = 20_000
    done = 0

    async def handler(env: Envelope) -> None:
        nonlocal done
        done += 1

    await bus.consume("q", handler)
    start = time.perf_counter()
    for i in range(count):
        await bus.send("q", msg(f"s{i % 200}", i=i))
    await bus.wait_idle(timeout=10)
    elapsed = time.perf_counter() - start
    assert done == count
    assert elapsed < 5, elapsed
