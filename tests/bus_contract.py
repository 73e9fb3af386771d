"""Contract suite every Bus backend must pass (memory, RabbitMQ, Azure Service Bus).

Use it from a backend's test module::

    from tests.bus_contract import *  # noqa: F403  (tests + the fixtures they need)

    @pytest.fixture
    async def bus_factory():
        ...  # yield an async callable returning a *started* Bus with max_attempts=3

Each call of ``bus_factory`` stands for one process connected to the same broker; the contract calls
it twice to get two "processes" competing for one queue. Real brokers should open a new connection
per call and close them all at teardown. The memory bus has no broker to share, so its factory
returns the same MemoryBus each time: two consumers on one MemoryBus compete exactly like two
processes, and Consumer.stop() is what simulates a process dying (tests never close() a process).

Every queue, subscription and event type name is unique per test, so the suite can run against a
shared real broker; every wait is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

import pytest

from bus import Bus, Consumer, DeadLetter, Envelope, MalformedMessage
from bus.deadletters import DeadLetters

# Generous for real brokers (lock renewals, redelivery back-off); the memory bus takes milliseconds.
TIMEOUT = 30.0
MAX_ATTEMPTS = 3  # what bus_factory must configure

BusFactory = Callable[[], Awaitable[Bus]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Log:
    """What handlers saw, with a bounded wait on a condition instead of sleep-polling."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Condition()

    async def add(self, item: Any) -> None:
        async with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = TIMEOUT) -> None:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: predicate(self.items))
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s; log has {len(self.items)}: {self.items[-20:]}") from None

    async def wait_count(self, count: int, timeout: float = TIMEOUT) -> None:
        await self.wait_for(lambda items: len(items) >= count, timeout)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT) -> Any:
    """Bounded polling, only for broker-side state no handler can signal (dead-letter queues)."""
    result = None
    try:
        async with asyncio.timeout(timeout):
            while not (result := await check()):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"condition not met after {timeout}s; last result {result!r}") from None
    return result


async def bounded(awaitable: Awaitable[Any], timeout: float = TIMEOUT) -> Any:
    async with asyncio.timeout(timeout):
        return await awaitable


def msg(session: str, type: str = "Step", **body: Any) -> Envelope:
    return Envelope(type=type, session_id=session, body=body)


BroadcastProbe = Callable[[Bus, Consumer], Awaitable[bool | None]]


@pytest.fixture
def broadcast_exists() -> BroadcastProbe:
    """Whether the queue/subscription behind a broadcast consumer still exists on the broker (None: this
    backend cannot tell). Backend test modules override this fixture; the memory bus has no broker to
    ask, so it is answered here from the bus itself."""

    async def probe(bus: Bus, consumer: Consumer) -> bool | None:
        subscriptions = getattr(bus, "_subscriptions", None)
        name = getattr(consumer, "_name", None)
        if bus.name == "memory" and isinstance(subscriptions, dict) and name is not None:
            return name in subscriptions
        return None

    return probe


@pytest.fixture
async def keep(bus_factory: BusFactory) -> AsyncIterator[Callable[[Consumer], Consumer]]:
    """Register consumers to stop at teardown (before bus_factory closes the buses)."""
    consumers: list[Consumer] = []

    def register(consumer: Consumer) -> Consumer:
        consumers.append(consumer)
        return consumer

    yield register
    for consumer in reversed(consumers):
        with suppress(Exception):
            await bounded(consumer.stop(), 10)


# 1 ------------------------------------------------------------------------------------------


async def test_bus_session_fifo_under_concurrent_producers(bus_factory: BusFactory, keep: Any) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    queue = unique("fifo")
    sessions = [unique("s") for _ in range(20)]
    producers, per_producer = 5, 10  # 50 messages per session, 1000 in all
    log = Log()

    async def handler(env: Envelope) -> None:
        if env.body["i"] % 3 == 0:
            await asyncio.sleep(0)  # let other sessions interleave
        await log.add((env.session_id, env.body["p"], env.body["i"]))

    keep(await p1.consume(queue, handler, max_concurrent_sessions=8))
    keep(await p2.consume(queue, handler, max_concurrent_sessions=8))

    async def produce(p: int) -> None:
        bus = (p1, p2)[p % 2]
        rng = random.Random(p)
        for i in range(per_producer):
            for session in rng.sample(sessions, len(sessions)):
                await bus.send(queue, msg(session, p=p, i=i))
                if rng.random() < 0.2:
                    await asyncio.sleep(0)  # interleave producers

    await bounded(asyncio.gather(*(produce(p) for p in range(producers))))
    total = len(sessions) * producers * per_producer
    await log.wait_count(total)

    received: dict[tuple[str, int], list[int]] = defaultdict(list)
    for session, p, i in log.items:
        received[session, p].append(i)
    assert len(log.items) == total
    for session in sessions:
        for p in range(producers):
            assert received[session, p] == list(range(per_producer)), (session, p)


# 2 ------------------------------------------------------------------------------------------


async def test_bus_one_handler_call_per_session_across_consumers(bus_factory: BusFactory, keep: Any) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    queue = unique("excl")
    sessions = [unique("s") for _ in range(6)]
    per_session = 15
    active: dict[str, int] = defaultdict(int)
    overlaps: list[str] = []
    log = Log()
    rng = random.Random(2)

    def make_handler(name: str) -> Callable[[Envelope], Awaitable[None]]:
        async def handler(env: Envelope) -> None:
            active[env.session_id] += 1
            if active[env.session_id] > 1:
                overlaps.append(f"{env.session_id} #{env.body['i']} on {name}")
            try:
                await asyncio.sleep(rng.uniform(0, 0.003))  # hold the session across awaits
            finally:
                active[env.session_id] -= 1
            await log.add((env.session_id, env.body["i"]))

        return handler

    keep(await p1.consume(queue, make_handler("p1"), max_concurrent_sessions=4))
    keep(await p2.consume(queue, make_handler("p2"), max_concurrent_sessions=4))
    for i in range(per_session):
        for session in sessions:
            await p1.send(queue, msg(session, i=i))
    await log.wait_count(len(sessions) * per_session)

    assert not overlaps, overlaps[:10]
    for session in sessions:
        assert [i for s, i in log.items if s == session] == list(range(per_session))


# 3 ------------------------------------------------------------------------------------------


async def test_bus_blocked_session_does_not_block_others(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    queue = unique("conc")
    blocked, others = unique("blocked"), [unique("free") for _ in range(3)]
    gate = asyncio.Event()
    log = Log()

    async def handler(env: Envelope) -> None:
        await log.add(("start", env.session_id, env.body["i"]))
        if env.session_id == blocked and env.body["i"] == 0:
            await gate.wait()
        await log.add(("done", env.session_id, env.body["i"]))

    keep(await bus.consume(queue, handler, max_concurrent_sessions=4))
    await bus.send(queue, msg(blocked, i=0))
    await bus.send(queue, msg(blocked, i=1))
    await log.wait_for(lambda items: ("start", blocked, 0) in items)
    for session in others:
        await bus.send(queue, msg(session, i=0))

    # The other sessions finish while the first one is stuck in its handler...
    await log.wait_for(lambda items: all(("done", s, 0) in items for s in others))
    # ...and the stuck session's next message has not started (one call per session, in order).
    assert ("done", blocked, 0) not in log.items
    assert ("start", blocked, 1) not in log.items

    gate.set()
    await log.wait_for(lambda items: ("done", blocked, 1) in items)
    mine = [entry for entry in log.items if entry[1] == blocked]
    assert mine == [("start", blocked, 0), ("done", blocked, 0), ("start", blocked, 1), ("done", blocked, 1)]


# 4 ------------------------------------------------------------------------------------------


async def test_bus_failed_message_is_redelivered_before_later_ones(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    queue = unique("retry")
    session, bystander = unique("s"), unique("t")
    failed_once: set[str] = set()
    active: dict[str, int] = defaultdict(int)
    overlaps: list[str] = []
    log = Log()

    async def handler(env: Envelope) -> None:
        active[env.session_id] += 1
        if active[env.session_id] > 1:
            overlaps.append(f"{env.session_id} #{env.body['i']}")
        try:
            await asyncio.sleep(0.001)  # a retry must keep holding the session across awaits
            if env.session_id == session:
                await log.add((env.body["i"], env.message_id, env.headers.get("delivery-count")))
            if env.session_id == session and env.body["i"] == 0 and env.message_id not in failed_once:
                failed_once.add(env.message_id)
                raise RuntimeError("transient")
        finally:
            active[env.session_id] -= 1

    keep(await bus.consume(queue, handler, max_concurrent_sessions=4))
    sent = [msg(session, i=i) for i in range(3)]
    for env in sent:
        await bus.send(queue, env)
    await log.wait_count(1)
    for i in range(5):  # traffic on another session while the failed one is being retried
        await bus.send(queue, msg(bystander, i=i))
    await log.wait_count(4)

    assert not overlaps, overlaps
    assert [i for i, _, _ in log.items] == [0, 0, 1, 2]
    assert log.items[0][1] == log.items[1][1] == sent[0].message_id
    if log.items[1][2] is not None:  # the header is optional, but when present it must count
        assert int(log.items[1][2]) >= 2
    assert await bus.dead_letters(queue) == []


async def test_bus_poison_message_is_dead_lettered_and_session_continues(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    queue = unique("poison")
    session = unique("s")
    marker = uuid.uuid4().hex
    log = Log()

    async def handler(env: Envelope) -> None:
        await log.add(env.body["i"])
        if env.body["poison"]:
            raise ValueError(f"poison {marker}")

    keep(await bus.consume(queue, handler))
    poison = msg(session, type="Poison", i=0, poison=True)
    await bus.send(queue, poison)
    await bus.send(queue, msg(session, i=1, poison=False))
    await log.wait_for(lambda items: 1 in items)

    assert log.items == [0] * MAX_ATTEMPTS + [1]  # exactly max_attempts tries, then the next one
    letters: list[DeadLetter] = await eventually(lambda: bus.dead_letters(queue))
    assert len(letters) == 1
    letter = letters[0]
    assert letter.queue == queue
    assert letter.envelope.message_id == poison.message_id
    assert letter.envelope.type == "Poison"
    assert dict(letter.envelope.body) == dict(poison.body)
    assert letter.attempts == MAX_ATTEMPTS
    assert "ValueError" in letter.reason and marker in letter.reason
    assert letter.dead_lettered_at.endswith("Z") or "+00:00" in letter.dead_lettered_at

    async def counted() -> bool:  # bumped once the backend's dead-lettering is settled, so maybe a moment later
        return bool(bus.dead_lettered[queue, "queue"])  # type: ignore[attr-defined]  # every backend has it, Bus does not declare it

    await eventually(counted)
    assert bus.dead_lettered == {(queue, "queue"): 1}  # type: ignore[attr-defined]  # the one dead letter, for /metrics
    counts = [await bus.dead_letter_count(queue, kind=kind) for kind in (None, "queue", "subscription")]  # type: ignore[attr-defined]  # DeadLetters, not Bus
    assert counts == [1, 1, 0]
    assert await bus.dead_letter_count(unique("never-used")) == 0  # type: ignore[attr-defined]  # DeadLetters, not Bus


# 5 ------------------------------------------------------------------------------------------


async def test_bus_stopped_consumer_hands_over_unsettled_messages(bus_factory: BusFactory, keep: Any) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    queue = unique("handover")
    stuck, other = unique("stuck"), unique("other")
    counts = {stuck: 10, other: 5}
    in_stuck_message = asyncio.Event()
    release = asyncio.Event()
    completed = Log()
    second: list[tuple[str, int]] = []

    async def dying(env: Envelope) -> None:
        if env.session_id == stuck and env.body["i"] == 4:
            in_stuck_message.set()
            await release.wait()  # cancelled by stop(), or released below for backends that don't
            raise RuntimeError("process died")  # never completes on the dead process
        await completed.add((env.session_id, env.body["i"]))

    async def survivor(env: Envelope) -> None:
        second.append((env.session_id, env.body["i"]))
        await completed.add((env.session_id, env.body["i"]))

    first = await p1.consume(queue, dying)
    keep(first)
    for i in range(10):
        await p1.send(queue, msg(stuck, i=i))
        if i < counts[other]:
            await p1.send(queue, msg(other, i=i))
    await bounded(in_stuck_message.wait())
    await bounded(first.stop())
    release.set()

    keep(await p2.consume(queue, survivor))
    await completed.wait_for(lambda items: all((s, n - 1) in items for s, n in counts.items()))
    for session, count in counts.items():
        done = [i for s, i in completed.items if s == session]
        # At-least-once may repeat a message whose settlement was lost, but never go backwards.
        assert done == sorted(done), (session, done)
        assert sorted(set(done)) == list(range(count)), (session, done)
    # The survivor picked the stuck session up at (or, with a lost ack, before) the unsettled message.
    stuck_on_second = [i for s, i in second if s == stuck]
    assert stuck_on_second and stuck_on_second[0] <= 4 and stuck_on_second[-1] == 9


# 6 ------------------------------------------------------------------------------------------


async def test_bus_publish_fans_out_by_event_type(bus_factory: BusFactory, keep: Any) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    paid, shipped, cleared, unrelated, done = (unique(t) for t in ("Paid", "Shipped", "Cleared", "Other", "Done"))
    session = unique("order")  # one session: each subscription sees its events in publish order
    logs = {name: Log() for name in ("billing", "shipping", "cart")}
    subscriptions = {
        "billing": {paid, shipped, done},
        "shipping": {paid, done},
        "cart": {cleared, done},
    }
    names = {name: unique(name) for name in subscriptions}

    # Before any subscription exists, an event reaches nobody (topic semantics).
    await p1.publish(msg(session, type=paid, n=0))

    for name, types in subscriptions.items():

        async def handler(env: Envelope, log: Log = logs[name]) -> None:
            await log.add((env.type, env.body["n"]))

        keep(await p1.subscribe(names[name], types, handler))
    # A second process of the billing service competes for the same subscription: still one copy.
    keep(
        await p2.subscribe(
            names["billing"], subscriptions["billing"], lambda env: logs["billing"].add((env.type, env.body["n"]))
        )
    )

    events = [(paid, 1), (unrelated, 2), (shipped, 3), (cleared, 4), (paid, 5), (done, 6)]
    for type_, n in events:
        await (p1, p2)[n % 2].publish(msg(session, type=type_, n=n))
    for log in logs.values():
        await log.wait_for(lambda items: bool(items) and items[-1][0] == done)

    assert logs["billing"].items == [(paid, 1), (shipped, 3), (paid, 5), (done, 6)]
    assert logs["shipping"].items == [(paid, 1), (paid, 5), (done, 6)]
    assert logs["cart"].items == [(cleared, 4), (done, 6)]


async def test_bus_subscription_is_durable_while_subscriber_is_down(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    event_type, done = unique("Happened"), unique("Done")
    subscription = unique("svc")
    session = unique("s")
    log = Log()

    async def handler(env: Envelope) -> None:
        await log.add(env.body["n"])

    first = await bus.subscribe(subscription, [event_type, done], handler)
    keep(first)
    await bus.publish(msg(session, type=event_type, n=1))
    await log.wait_count(1)
    await bounded(first.stop())

    for n in (2, 3):
        await bus.publish(msg(session, type=event_type, n=n))
    await bus.publish(msg(session, type=done, n=4))
    keep(await bus.subscribe(subscription, [event_type, done], handler))
    await log.wait_for(lambda items: 4 in items)
    assert log.items == [1, 2, 3, 4]


# 7 ------------------------------------------------------------------------------------------


async def test_bus_envelope_round_trip() -> None:
    env = Envelope(
        type="ReserveStock",
        session_id=str(uuid.uuid4()),
        body={"qty": 3, "price": "19.99", "lines": [{"sku": "ä€😀", "ok": True, "note": None}], "ratio": 0.5},
        correlation_id=str(uuid.uuid4()),
        headers={"traceparent": "00-abc-def-01"},
    )
    data = env.encode()
    assert isinstance(data, bytes)
    assert Envelope.decode(data) == env
    assert Envelope.decode(data.decode()) == env  # str input too

    other = Envelope(type="T", session_id="s", body={})
    assert other.message_id != env.message_id
    assert str(uuid.UUID(other.message_id)) == other.message_id
    assert other.created_at.endswith("Z") and "T" in other.created_at
    tagged = env.with_headers(**{"delivery-count": "2"})
    assert tagged.headers == {"traceparent": "00-abc-def-01", "delivery-count": "2"}
    assert env.headers == {"traceparent": "00-abc-def-01"}  # the original is untouched
    assert tagged.message_id == env.message_id


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"just a string"',
        b'{"type": "T", "session_id": "s", "body": {}}',  # no message_id
        b'{"message_id": "m", "session_id": "s", "body": {}}',  # no type
        b'{"message_id": "m", "type": "T", "session_id": "", "body": {}}',
        b'{"message_id": "m", "type": "T", "session_id": "s", "body": [1]}',
        b'{"message_id": "m", "type": "T", "session_id": "s", "body": {}, "headers": {"a": 1}}',
        b'{"message_id": "m", "type": 5, "session_id": "s", "body": {}}',
        b'{"message_id": "m", "type": "T", "session_id": "s", "body": {}, "created_at": "yesterday"}',
    ],
)
async def test_bus_envelope_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        Envelope.decode(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value)  # a reason a person can act on


async def test_bus_delivers_the_envelope_as_sent(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    queue = unique("wire")
    log = Log()
    keep(await bus.consume(queue, log.add))
    sent = Envelope(
        type="CheckoutRequested",
        session_id=str(uuid.uuid4()),
        body={"total": "42.00", "lines": [{"qty": 1}], "note": "ü"},
        correlation_id=str(uuid.uuid4()),
        headers={"traceparent": "00-1-2-01"},
    )
    await bus.send(queue, sent)
    await log.wait_count(1)
    got: Envelope = log.items[0]
    assert (got.type, got.session_id, got.message_id, got.correlation_id, got.created_at) == (
        sent.type, sent.session_id, sent.message_id, sent.correlation_id, sent.created_at,
    )  # fmt: skip
    assert dict(got.body) == dict(sent.body)
    assert {k: got.headers.get(k) for k in sent.headers} == dict(sent.headers)


async def test_bus_same_message_id_twice_is_delivered_with_its_id(bus_factory: BusFactory, keep: Any) -> None:
    # Dedupe is the consumer's job (inbox table); the bus must keep the id so it can.
    bus = await bus_factory()
    queue = unique("dup")
    log = Log()
    keep(await bus.consume(queue, log.add))
    env = msg(unique("s"), i=1)
    await bus.send(queue, env)
    await bus.send(queue, env)
    await log.wait_count(2)
    assert [e.message_id for e in log.items] == [env.message_id, env.message_id]


async def test_bus_late_consumer_gets_earlier_messages(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    queue = unique("late")
    session = unique("s")
    for i in range(5):
        await bus.send(queue, msg(session, i=i))
    log = Log()

    async def handler(env: Envelope) -> None:
        await log.add(env.body["i"])

    keep(await bus.consume(queue, handler))
    await log.wait_count(5)
    assert log.items == [0, 1, 2, 3, 4]


async def test_bus_ping_when_started(bus_factory: BusFactory) -> None:
    bus = await bus_factory()
    await bounded(bus.ping(), 10)
    assert isinstance(bus.name, str) and bus.name


# 8 ------------------------------------------------------------------------------------------
# broadcast: every process gets every event of the types (subscribe: one instance of a service does).


async def test_bus_broadcast_every_process_gets_every_event_in_order(bus_factory: BusFactory, keep: Any) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    revoked, locked, unrelated = unique("KeyRevoked"), unique("Locked"), unique("Other")
    stream, other = unique("identity"), unique("s")
    logs = {"p1": Log(), "p2": Log()}
    active = {"p1": 0, "p2": 0}
    overlaps: list[str] = []

    # Not durable: what was published before a process listened never reaches it.
    await p1.publish(msg(stream, type=revoked, n=-1))

    def make_handler(name: str) -> Callable[[Envelope], Awaitable[None]]:
        async def handler(env: Envelope) -> None:
            active[name] += 1
            if active[name] > 1:
                overlaps.append(f"{name} #{env.body['n']}")
            try:
                await asyncio.sleep(0.001)  # one call at a time, also across awaits
            finally:
                active[name] -= 1
            await logs[name].add((env.session_id, env.type, env.body["n"]))

        return handler

    keep(await p1.broadcast([revoked, locked], make_handler("p1")))
    keep(await p2.broadcast({revoked, locked}, make_handler("p2")))
    # A service subscription on the same types still gets one copy per event, not one per process.
    service, service_log = unique("svc"), Log()
    for bus in (p1, p2):
        keep(await bus.subscribe(service, [revoked, locked], lambda env: service_log.add(env.body["n"])))

    sent: list[tuple[str, str, int]] = []
    for n in range(12):
        session = other if n % 4 == 3 else stream
        type_ = (revoked, locked, unrelated)[n % 3]
        await (p1, p2)[n % 2].publish(msg(session, type=type_, n=n))
        if type_ != unrelated:
            sent.append((session, type_, n))
    for log in logs.values():
        await log.wait_count(len(sent))
    await service_log.wait_count(len(sent))
    await asyncio.sleep(0.2)  # room for a wrong extra copy to show up

    assert not overlaps, overlaps
    for name, log in logs.items():
        assert sorted(log.items, key=lambda item: item[2]) == sent, name  # every event once, nothing else
        for session in (stream, other):  # in publish order (per session at least)
            assert [i for i in log.items if i[0] == session] == [i for i in sent if i[0] == session], name
    assert sorted(service_log.items) == [n for _, _, n in sent]


async def test_bus_stopped_broadcast_gets_nothing_more_and_leaves_nothing(
    bus_factory: BusFactory, keep: Any, broadcast_exists: BroadcastProbe
) -> None:
    p1, p2 = await bus_factory(), await bus_factory()
    event_type = unique("Revoked")
    session = unique("identity")
    first, second = Log(), Log()
    c1 = keep(await p1.broadcast([event_type], lambda env: first.add(env.body["n"])))
    keep(await p2.broadcast([event_type], lambda env: second.add(env.body["n"])))
    assert await broadcast_exists(p1, c1) in (True, None)

    await p1.publish(msg(session, type=event_type, n=1))
    await first.wait_count(1)
    await second.wait_count(1)
    await bounded(c1.stop())
    assert await broadcast_exists(p1, c1) in (False, None)  # nothing left to pile up for nobody
    await bounded(c1.stop())  # idempotent

    for n in (2, 3):
        await (p1, p2)[n % 2].publish(msg(session, type=event_type, n=n))
    await second.wait_for(lambda items: 3 in items)
    await asyncio.sleep(0.2)
    assert first.items == [1]
    assert second.items == [1, 2, 3]


async def test_bus_broadcast_handler_failures_are_retried_then_dropped(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    event_type = unique("Revoked")
    session = unique("identity")
    calls = Log()
    failed_once: set[int] = set()

    async def handler(env: Envelope) -> None:
        n = env.body["n"]
        await calls.add(n)
        if n == 1 and n not in failed_once:  # transient: retried, before the later events
            failed_once.add(n)
            raise RuntimeError("transient")
        if n == 2:  # never works: given up after a few tries, the stream goes on
            raise RuntimeError("broken announcement")

    keep(await bus.broadcast([event_type], handler))
    for n in range(5):
        await bus.publish(msg(session, type=event_type, n=n))
    await calls.wait_for(lambda items: 4 in items)
    await asyncio.sleep(0.2)
    assert [n for n in calls.items if n != 2] == [0, 1, 1, 3, 4]
    tries = calls.items.count(2)
    assert 2 <= tries <= 10, calls.items  # retried a few times, not forever
    assert calls.items.index(3) > max(i for i, n in enumerate(calls.items) if n == 2)  # in order


# Dead letters: show, discard, redeliver (bus/deadletters.py) -------------------------------------------


async def test_bus_dead_letters_show_discard_and_redeliver_to_the_queue(bus_factory: BusFactory, keep: Any) -> None:
    bus = await bus_factory()
    assert isinstance(bus, DeadLetters)
    queue, session = unique("dlq"), unique("s")
    healed: set[str] = set()  # message ids the handler accepts from now on
    log = Log()

    async def handler(env: Envelope) -> None:
        await log.add((env.message_id, env.body["i"]))
        if env.body["poison"] and env.message_id not in healed:
            raise ValueError("poison")

    keep(await bus.consume(queue, handler))
    first, second = msg(session, i=0, poison=True), msg(session, i=1, poison=True)
    for env in (first, second, msg(session, i=2, poison=False)):
        await bus.send(queue, env)
    letters: list[DeadLetter] = await eventually(lambda: _at_least(bus.dead_letters(queue), 2))
    assert [x.envelope.message_id for x in letters] == [first.message_id, second.message_id]
    assert {x.kind for x in letters} == {"queue"}

    shown = await bus.dead_letter(queue, second.message_id)
    assert shown is not None and shown.envelope.message_id == second.message_id and shown.queue == queue
    assert dict(shown.envelope.body) == dict(second.body) and "poison" in shown.reason
    assert await bus.dead_letter(queue, "no-such-id") is None
    assert await bus.dead_letter(queue, second.message_id, kind="subscription") is None

    gone = await bounded(bus.discard_dead_letter(queue, first.message_id))
    assert gone is not None and gone.envelope.message_id == first.message_id
    assert [x.envelope.message_id for x in await bus.dead_letters(queue)] == [second.message_id]  # the other stays
    assert await bounded(bus.discard_dead_letter(queue, first.message_id)) is None  # gone is gone

    healed.add(second.message_id)
    before = len(log.items)
    await bounded(bus.redeliver("queue", queue, shown.envelope))
    await log.wait_for(lambda items: (second.message_id, 1) in items[before:])
    assert (first.message_id, 0) not in log.items[before:]  # the discarded one never comes back
    # Redelivering does not take it off the dead-letter queue: that is the caller's (replay's) next step.
    assert [x.envelope.message_id for x in await bus.dead_letters(queue)] == [second.message_id]
    assert await bounded(bus.discard_dead_letter(queue, second.message_id, kind="queue")) is not None
    assert await bus.dead_letters(queue) == []


async def _at_least(letters: Awaitable[list[DeadLetter]], count: int) -> list[DeadLetter] | None:
    found = await letters
    return found if len(found) >= count else None


async def test_bus_subscription_dead_letter_is_redelivered_to_that_subscription_only(
    bus_factory: BusFactory, keep: Any
) -> None:
    bus = await bus_factory()
    event_type = unique("Priced")
    failing, other = unique("subf"), unique("subo")
    session = unique("p")
    healed = False
    seen_failing, seen_other = Log(), Log()

    async def flaky(env: Envelope) -> None:
        await seen_failing.add((env.message_id, env.body["n"]))
        if not healed:
            raise RuntimeError("subscriber broken")

    keep(await bus.subscribe(failing, [event_type], flaky))
    keep(await bus.subscribe(other, [event_type], lambda env: seen_other.add((env.message_id, env.body["n"]))))
    event = msg(session, type=event_type, n=1)
    await bus.publish(event)
    letters: list[DeadLetter] = await eventually(lambda: bus.dead_letters(failing))
    assert [(x.queue, x.kind, x.envelope.message_id) for x in letters] == [(failing, "subscription", event.message_id)]
    assert await bus.dead_letters(other) == []

    healed = True
    before = len(seen_failing.items)
    await bounded(bus.redeliver("subscription", failing, letters[0].envelope))
    await seen_failing.wait_for(lambda items: (event.message_id, 1) in items[before:])
    marker = msg(session, type=event_type, n=2)  # published after the redelivery: the other subscriber's
    await bus.publish(marker)  # log is complete once it arrives
    await seen_other.wait_for(lambda items: (marker.message_id, 2) in items)
    assert seen_other.items == [(event.message_id, 1), (marker.message_id, 2)]  # not delivered to it again
    assert await bounded(bus.discard_dead_letter(failing, event.message_id)) is not None
    assert await bus.dead_letters(failing) == []
