"""RabbitBus: the shared bus contract against the real RabbitMQ, plus what only this backend promises.

Needs RabbitMQ on 127.0.0.1:5672 (guest/guest; ``ECOM_TEST_RABBITMQ_URL`` overrides): skipped when it
is not reachable, a failure under ``CI=true``. Each test uses its own name prefix (queues and the events
exchange) and deletes what it declared at teardown, so runs never see each other's messages.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq import spec
from yarl import URL

from bus import Bus, BusError, Consumer, Envelope
from bus.rabbitmq import (
    DEAD_LETTER_QUEUE_ARGUMENTS,
    DEFAULT_URL,
    RabbitBroadcast,
    RabbitBus,
    create_bus,
    partition_of,
    partition_queue_arguments,
)
from config.settings import BusSettings, Settings
from tests.bus_contract import *
from tests.bus_contract import MAX_ATTEMPTS, Log, bounded, eventually, msg, unique
from tests.conftest import require_server

pytestmark = pytest.mark.rabbitmq

RABBIT_URL = os.environ.get("ECOM_TEST_RABBITMQ_URL", DEFAULT_URL)
PARTITIONS = 4  # fewer quorum queues per test than the production default of 8: faster set-up

RabbitFactory = Callable[..., Awaitable[RabbitBus]]


def _require_rabbit() -> None:
    url = URL(RABBIT_URL)
    require_server("RabbitMQ", url.host or "127.0.0.1", url.port or 5672)


async def _delete_all(queues: set[str], exchanges: set[str]) -> None:
    connection = await aio_pika.connect(RABBIT_URL, timeout=10)
    try:
        for name in sorted(queues):
            channel = await connection.channel()
            with suppress(Exception):
                await channel.queue_delete(name)
            with suppress(Exception):
                await channel.close()
        for name in sorted(exchanges):
            channel = await connection.channel()
            with suppress(Exception):
                await channel.exchange_delete(name)
            with suppress(Exception):
                await channel.close()
    finally:
        await connection.close()


@pytest.fixture
async def rabbit_factory() -> AsyncIterator[RabbitFactory]:
    """Each call: a new connection ("process") to the same broker, sharing this test's name prefix."""
    _require_rabbit()
    prefix = f"t{uuid.uuid4().hex[:10]}."
    buses: list[RabbitBus] = []

    async def connect(**overrides: Any) -> RabbitBus:
        options: dict[str, Any] = {
            "max_attempts": MAX_ATTEMPTS,
            "partitions": PARTITIONS,
            "redelivery_delay": 0.01,
            "prefix": prefix,
            "timeout": 10.0,
            "reconnect_interval": 0.5,
        }
        options.update(overrides)
        bus = RabbitBus(RABBIT_URL, **options)
        buses.append(bus)
        await bounded(bus.start(), 15)
        return bus

    yield connect
    for bus in buses:
        with suppress(Exception):
            await bounded(bus.close(), 15)
    queues = set().union(*(b.declared_queues for b in buses)) if buses else set()
    exchanges = {f"{prefix}ecom-events"}
    await bounded(_delete_all(queues, exchanges), 30)


@pytest.fixture
async def bus_factory(rabbit_factory: RabbitFactory) -> AsyncIterator[Callable[[], Awaitable[Bus]]]:
    async def connect() -> Bus:
        return await rabbit_factory()

    yield connect


@pytest.fixture
def broadcast_exists() -> Callable[[Bus, Consumer], Awaitable[bool | None]]:
    """Whether a broadcast consumer's server-named queue is still on the broker (passive declare)."""

    async def probe(bus: Bus, consumer: Consumer) -> bool | None:
        assert isinstance(bus, RabbitBus) and isinstance(consumer, RabbitBroadcast) and consumer.queue
        channel = await _raw_channel(bus)
        try:
            await channel.queue_declare(consumer.queue, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            with suppress(Exception):
                await channel.close()

    return probe


async def _raw_channel(bus: RabbitBus) -> aiormq.abc.AbstractChannel:
    assert bus._connection is not None
    return await bus._connection.channel(publisher_confirms=False)


async def _drain(bus: RabbitBus, queue: str) -> list[Envelope]:
    """Take every message off a queue, in order (test helper). A consumer, not basic.get: quorum
    queues with single-active-consumer refuse basic.get."""
    channel = await _raw_channel(bus)
    out: list[Envelope] = []
    try:
        count = (await channel.queue_declare(queue, passive=True)).message_count or 0
        if count:
            done = asyncio.Event()

            async def take(message: aiormq.abc.DeliveredMessage) -> None:
                out.append(Envelope.decode(message.body))
                if len(out) >= count:
                    done.set()

            await channel.basic_consume(queue, take, no_ack=True)
            await bounded(done.wait(), 10)
    finally:
        await channel.close()
    return out


# -- configuration ------------------------------------------------------------------------------


def test_rabbit_bus_satisfies_protocol_and_factory_reads_settings() -> None:
    bus = create_bus(
        Settings(
            bus=BusSettings(
                backend="rabbitmq", max_attempts=7, max_concurrent_sessions=5, partitions=3, redelivery_delay=0.5
            )
        )
    )
    assert isinstance(bus, Bus) and bus.name == "rabbitmq"
    assert (bus.url, bus.max_attempts, bus.max_concurrent_sessions, bus.partitions, bus.redelivery_delay) == (
        DEFAULT_URL, 7, 5, 3, 0.5,
    )  # fmt: skip
    other = create_bus(Settings(bus=BusSettings(backend="rabbitmq", url="amqp://u:p@mq:5673/v")))
    assert other.url == "amqp://u:p@mq:5673/v"

    from runtime.cli import make_bus

    assert isinstance(make_bus(Settings(bus=BusSettings(backend="rabbitmq"))), RabbitBus)
    with pytest.raises(ValueError):
        RabbitBus(partitions=0)


async def test_rabbit_not_started_and_closed_are_errors(rabbit_factory: RabbitFactory) -> None:
    with pytest.raises(BusError, match="not started"):
        await RabbitBus(RABBIT_URL).ping()
    bus = await rabbit_factory()
    await bus.ping()
    await bus.close()
    with pytest.raises(BusError, match="closed"):
        await bus.ping()
    with pytest.raises(BusError):
        await bus.send("q", msg("s"))


async def test_rabbit_unreachable_broker_is_a_bus_error() -> None:
    bus = RabbitBus("amqp://guest:secret@127.0.0.1:1/", timeout=5)
    with pytest.raises(BusError) as info:
        await bounded(bus.start(), 10)
    assert "secret" not in str(info.value)  # the password never ends up in logs or health output


def test_rabbit_partition_of_is_stable() -> None:
    # crc32, not hash(): the same in every process and every Python run (PYTHONHASHSEED).
    assert partition_of("order-42", 8) == zlib.crc32(b"order-42") % 8 == 6  # pinned: a change re-routes live sessions
    assert [partition_of(f"s{i}", 4) for i in range(8)] == [zlib.crc32(f"s{i}".encode()) % 4 for i in range(8)]
    assert partition_of("ü-€", 5) == zlib.crc32("ü-€".encode()) % 5


# -- topology -----------------------------------------------------------------------------------


async def test_rabbit_partition_routing_is_stable_across_instances(rabbit_factory: RabbitFactory) -> None:
    a, b = await rabbit_factory(), await rabbit_factory()
    queue = unique("route")
    sessions = [unique("s") for _ in range(12)]
    for session in sessions:
        await a.send(queue, msg(session, via="a"))
        await b.send(queue, msg(session, via="b"))

    seen: dict[str, list[tuple[int, str]]] = {}
    for k in range(PARTITIONS):
        for env in await _drain(a, f"{a.prefix}{queue}.p{k}"):
            seen.setdefault(env.session_id, []).append((k, env.body["via"]))
    assert set(seen) == set(sessions)
    for session in sessions:
        # Both "processes" put the session's messages into the one partition its id hashes to.
        expected = partition_of(session, PARTITIONS)
        assert seen[session] == [(expected, "a"), (expected, "b")], session
    assert len({partition_of(s, PARTITIONS) for s in sessions}) > 1  # and sessions do spread out


async def test_rabbit_events_go_to_the_session_partition_of_each_subscription(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory()
    paid, other = unique("Paid"), unique("Other")
    billing, audit = unique("billing"), unique("audit")
    gate = asyncio.Event()

    async def hold(env: Envelope) -> None:
        await gate.wait()

    # Subscribe (declares and binds), then stop at once: the events stay in the queues for inspection.
    for name, types in ((billing, [paid]), (audit, [paid, other])):
        consumer = await bus.subscribe(name, types, hold)
        await consumer.stop()
    sessions = [unique("o") for _ in range(6)]
    for session in sessions:
        await bus.publish(msg(session, type=paid))
        await bus.publish(msg(session, type=other))
    gate.set()

    for name, types in ((billing, {paid}), (audit, {paid, other})):
        for k in range(PARTITIONS):
            envs = await _drain(bus, f"{bus.prefix}{name}.events.p{k}")
            assert all(partition_of(e.session_id, PARTITIONS) == k for e in envs), (name, k)
            for session in sessions:
                mine = [e.type for e in envs if e.session_id == session]
                if partition_of(session, PARTITIONS) == k:
                    assert mine == [t for t in (paid, other) if t in types]


async def test_rabbit_queues_are_quorum_with_single_active_consumer(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory()
    queue, subscription = unique("args"), unique("svc")
    await bus.send(queue, msg("s"))
    consumer = await bus.subscribe(subscription, [unique("Evt")], Log().add)
    await consumer.stop()

    async def redeclare(name: str, arguments: dict[str, Any]) -> bool:
        """True when the broker accepts a declaration with exactly these arguments (AMQP has no
        'describe queue': an existing queue only accepts an equivalent redeclaration)."""
        channel = await _raw_channel(bus)
        try:
            await channel.queue_declare(name, durable=True, arguments=arguments)
            return True
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        finally:
            with suppress(Exception):
                await channel.close()

    for base in (f"{bus.prefix}{queue}", f"{bus.prefix}{subscription}.events"):
        dlq = f"{base}.dlq"
        arguments = partition_queue_arguments(dlq, bus.delivery_limit)
        assert arguments["x-queue-type"] == "quorum" and arguments["x-single-active-consumer"] is True
        for k in range(PARTITIONS):
            name = f"{base}.p{k}"
            assert await redeclare(name, arguments), name
            assert not await redeclare(name, {**arguments, "x-single-active-consumer": False}), name
            assert not await redeclare(name, {**arguments, "x-queue-type": "classic"}), name
        assert await redeclare(dlq, DEAD_LETTER_QUEUE_ARGUMENTS)
        assert not await redeclare(dlq, {"x-queue-type": "classic"})

    # A process configured differently is told so, naming the queue, instead of silently misrouting.
    odd = await rabbit_factory(delivery_limit=bus.delivery_limit + 1)
    with pytest.raises(BusError, match=r"\.p0"):
        await odd.send(queue, msg("s"))


# -- consuming ------------------------------------------------------------------------------------


async def test_rabbit_sessions_in_one_partition_run_concurrently(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory(partitions=1)  # every session shares the one partition
    queue = unique("mux")
    gate = asyncio.Event()
    started = Log()
    running = 0
    peak = 0

    async def handler(env: Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await started.add((env.session_id, env.body["i"]))
            await gate.wait()
        finally:
            running -= 1

    consumer = await bus.consume(queue, handler, max_concurrent_sessions=3)
    try:
        for i in range(2):
            for session in ("a", "b", "c", "d"):
                await bus.send(queue, msg(session, i=i))
        await started.wait_count(3)
        await asyncio.sleep(0.1)  # give a (wrong) fourth call the chance to start
        assert len(started.items) == 3 and peak == 3  # max_concurrent_sessions is a hard limit
        assert sorted(s for s, _ in started.items) == ["a", "b", "c"]  # three sessions, not a+a...
        gate.set()
        await started.wait_count(8)
        for session in "abcd":
            assert [i for s, i in started.items if s == session] == [0, 1]
    finally:
        await consumer.stop()


async def test_rabbit_message_survives_connection_loss_mid_handling(rabbit_factory: RabbitFactory) -> None:
    p1, p2 = await rabbit_factory(), await rabbit_factory()
    queue = unique("crash")
    session = unique("s")
    in_handler = asyncio.Event()
    cancelled = asyncio.Event()
    first: list[int] = []
    second = Log()

    async def dying(env: Envelope) -> None:
        if env.body["i"] == 2:
            in_handler.set()
            try:
                await asyncio.Event().wait()  # stuck until the connection goes
            except asyncio.CancelledError:
                cancelled.set()
                raise
        first.append(env.body["i"])

    async def survivor(env: Envelope) -> None:
        await second.add((env.body["i"], int(env.headers["delivery-count"])))

    box: dict[str, Consumer] = {}
    await p1.consume(queue, dying)
    box["p2"] = await p2.consume(queue, survivor)  # registered second: standby on every partition
    for i in range(6):
        await p1.send(queue, msg(session, i=i))
    await bounded(in_handler.wait())
    assert not second.items  # single active consumer: p2 gets nothing while p1 is alive

    # The process's AMQP connection is closed under it (not through the bus): the broker requeues the
    # unacked messages in order and makes p2 active; p1 drops its copies and cancels the stuck handler,
    # and its supervisor reconnects it in the background.
    assert p1._connection is not None
    await bounded(p1._connection.close(), 10)

    await second.wait_count(4)
    await bounded(cancelled.wait())
    assert first == [0, 1]
    assert [i for i, _ in second.items] == [2, 3, 4, 5]
    assert second.items[0][1] >= 2  # a redelivery, and it says so
    await bounded(eventually(lambda: _is_up(p1), 20), 25)  # p1 reconnected on its own, now standby

    # ...with its consumers re-registered: once p2 goes, p1 is active again and carries on in order.
    survivor_consumer = box["p2"]
    await bounded(survivor_consumer.stop())
    for i in range(6, 9):
        await p2.send(queue, msg(session, i=i))
    await eventually(lambda: _async(len(first) == 5), 20)
    assert first == [0, 1, 6, 7, 8]


async def _async(value: Any) -> Any:
    return value


async def _is_up(bus: RabbitBus) -> bool:
    try:
        await bus.ping()
    except BusError:
        return False
    return True


async def test_rabbit_close_returns_in_flight_messages_to_the_queue(rabbit_factory: RabbitFactory) -> None:
    p1 = await rabbit_factory()
    queue = unique("close")
    session = unique("s")
    started = asyncio.Event()

    async def hang(env: Envelope) -> None:
        started.set()
        await asyncio.Event().wait()

    await p1.consume(queue, hang)
    await p1.send(queue, msg(session, i=0))
    await p1.send(queue, msg(session, i=1))
    await bounded(started.wait())
    await bounded(p1.close(), 15)

    p2 = await rabbit_factory()
    log = Log()
    await p2.consume(queue, log.add)
    await log.wait_count(2)
    assert [e.body["i"] for e in log.items] == [0, 1]
    assert int(log.items[0].headers["delivery-count"]) == 2


async def test_rabbit_crash_loop_is_dead_lettered_by_the_broker(rabbit_factory: RabbitFactory) -> None:
    # A message whose consumer dies every time it is handled cannot be counted by any process:
    # x-delivery-limit on the partition moves it to the DLQ instead of redelivering it forever.
    bus = await rabbit_factory(delivery_limit=2, partitions=1)
    assert bus._connection is not None
    version = str(bus._connection.server_properties.get("version", "0"))
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (4, 3):
        # From 4.3 the limit counts explicit failures (nack/reject) only, not returns by a dying
        # consumer (those are x-acquired-count), so a crash loop is no longer cut short by the broker.
        pytest.skip(f"RabbitMQ {version}: x-delivery-limit no longer counts returns on consumer death")
    queue = unique("crashloop")
    poison = msg(unique("s"), type="Crash")
    await bus.send(queue, poison)
    deliveries = 0
    for _ in range(6):
        if await bus.dead_letters(queue):
            break
        started = asyncio.Event()

        async def crash(env: Envelope, started: asyncio.Event = started) -> None:
            started.set()
            await asyncio.Event().wait()

        consumer = await bus.consume(queue, crash)
        try:
            await bounded(started.wait(), 5)
            deliveries += 1
        except TimeoutError:
            pass  # already dead-lettered
        await consumer.stop()
    letters = await eventually(lambda: bus.dead_letters(queue), 10)
    assert [letter.envelope.message_id for letter in letters] == [poison.message_id]
    assert letters[0].reason.startswith("DeliveryLimitExceeded")
    assert letters[0].queue == queue
    assert deliveries == 3  # the first delivery + delivery_limit redeliveries


async def test_rabbit_malformed_message_is_dead_lettered_untried(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory(partitions=1)
    queue = unique("garbage")
    log = Log()
    await bus.consume(queue, log.add)
    channel = await _raw_channel(bus)
    try:
        await channel.basic_publish(
            b"not an envelope", routing_key=f"{bus.prefix}{queue}.p0",
            properties=spec.Basic.Properties(message_id="m-1", delivery_mode=2),
        )  # fmt: skip
    finally:
        await channel.close()
    await bus.send(queue, msg("s", i=1))
    await log.wait_count(1)
    [letter] = await eventually(lambda: bus.dead_letters(queue))
    assert letter.reason.startswith("MalformedMessage") and letter.attempts == 0
    assert letter.envelope.type == "<malformed>" and letter.envelope.body["raw"] == "not an envelope"


async def test_rabbit_listing_dead_letters_keeps_them(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory()
    queue, subscription = unique("dl"), unique("svc")
    event_type = unique("Evt")

    async def fail(env: Envelope) -> None:
        raise RuntimeError(f"no {env.body['i']}")

    await bus.consume(queue, fail)
    await bus.subscribe(subscription, [event_type], fail)
    for i in range(3):
        await bus.send(queue, msg(unique("s"), i=i))
    await bus.publish(msg(unique("s"), type=event_type, i=9))

    letters = await eventually(lambda: _have(bus, queue, 3))
    again = await bus.dead_letters(queue)
    assert [x.envelope.message_id for x in again] == [x.envelope.message_id for x in letters]
    assert sorted(x.reason for x in letters) == ["RuntimeError: no 0", "RuntimeError: no 1", "RuntimeError: no 2"]
    assert all(x.queue == queue and x.attempts == MAX_ATTEMPTS for x in letters)
    assert [x.dead_lettered_at for x in letters] == sorted(x.dead_lettered_at for x in letters)
    [event_letter] = await eventually(lambda: bus.dead_letters(subscription))
    assert (event_letter.queue, event_letter.reason) == (subscription, "RuntimeError: no 9")
    assert await bus.dead_letters(unique("never-declared")) == []


async def _have(bus: RabbitBus, queue: str, count: int) -> list[Any]:
    letters = await bus.dead_letters(queue)
    return letters if len(letters) >= count else []


async def test_rabbit_handler_may_stop_its_own_consumer(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory()
    queue = unique("self")
    log = Log()
    box: dict[str, Consumer] = {}

    async def handler(env: Envelope) -> None:
        await log.add(env.body["i"])
        if env.body["i"] == 1:
            await box["consumer"].stop()

    box["consumer"] = await bus.consume(queue, handler)
    for i in range(4):
        await bus.send(queue, msg("s", i=i))
    await log.wait_count(2)
    await asyncio.sleep(0.1)
    assert log.items == [0, 1]
    await bus.consume(queue, handler)
    await log.wait_for(lambda items: 3 in items)
    assert log.items == [0, 1, 2, 3]  # the message that stopped the consumer was completed, not redone


async def test_rabbit_redelivery_delay_and_delivery_count(rabbit_factory: RabbitFactory) -> None:
    bus = await rabbit_factory(redelivery_delay=0.2)
    queue = unique("delay")
    calls = Log()

    async def handler(env: Envelope) -> None:
        await calls.add((env.body["i"], env.headers["delivery-count"], time.monotonic()))
        if env.body["i"] == 0 and env.headers["delivery-count"] == "1":
            raise RuntimeError("once")

    await bus.consume(queue, handler)
    await bus.send(queue, msg("s", i=0))
    await bus.send(queue, msg("s", i=1))
    await calls.wait_count(3)
    assert [(i, count) for i, count, _ in calls.items] == [(0, "1"), (0, "2"), (1, "1")]
    assert calls.items[1][2] - calls.items[0][2] >= 0.18  # retried in-process after the delay
