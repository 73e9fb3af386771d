"""AzureBus against the real azure-servicebus SDK, talking AMQP 1.0 (and ATOM over HTTPS) to the
test peer in tests/amqp_peer/ that plays a Service Bus namespace on 127.0.0.1.

The shared contract suite runs unchanged; the rest checks what only Service Bus does: session lock
renewal and expiry, broker dead-lettering, subscription rules, duplicate detection, provisioning.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import (
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusError,
    SessionCannotBeLockedError,
)

from bus import Bus, BusError, Envelope
from bus.azure import TOPIC, AzureBroadcast, AzureBus, create_bus, provision
from bus.servicebus.management import REPLAY_RULE
from config import ConfigError, load_settings
from runtime.cli import register_bus as register  # `ecom bus provision` (every backend)
from tests.amqp_peer import AmqpPeer
from tests.bus_contract import *  # the contract tests and the fixtures they use
from tests.bus_contract import (
    MAX_ATTEMPTS,
    BusFactory,
    Log,
    bounded,
    eventually,
    msg,
    unique,
)
from tests.test_bus_faults import Trouble, trouble  # noqa: F401  (the fixture too)


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[AmqpPeer]:
    async with AmqpPeer(tls_dir=tmp_path / "tls") as peer:
        yield peer


def azure_bus(peer: AmqpPeer, **options: Any) -> AzureBus:
    settings: dict[str, Any] = {
        "connection_string": peer.connection_string,
        "max_attempts": MAX_ATTEMPTS,
        # The contract expects the bus to keep a repeated message id (consumers dedupe); Service Bus
        # duplicate detection would drop it, so it is off here and tested on its own below.
        "duplicate_detection_window": None,
        "accept_timeout": 5.0,
        "session_idle_timeout": 0.3,
        "admin_options": {"connection_verify": peer.ca_file},
    }
    settings.update(options)
    return AzureBus(**settings)


@pytest.fixture
async def bus_factory(peer: AmqpPeer) -> AsyncIterator[BusFactory]:
    buses: list[AzureBus] = []

    async def connect() -> Bus:
        bus = azure_bus(peer)  # a new SDK client (its own connections) per "process"
        await bus.start()
        buses.append(bus)
        return bus

    yield connect
    await bounded(asyncio.gather(*(bus.close() for bus in buses)), 30)


@pytest.fixture
def broadcast_exists(peer: AmqpPeer) -> Any:
    """Whether a broadcast consumer's subscription is still in the peer's namespace."""

    async def probe(bus: Bus, consumer: Any) -> bool:
        assert isinstance(consumer, AzureBroadcast)
        return consumer.subscription.lower() in peer.broker.topic(TOPIC).subscriptions

    return probe


# -- Azure Service Bus specifics ----------------------------------------------------------------


@pytest.fixture
async def buses(peer: AmqpPeer) -> AsyncIterator[Any]:
    """Make AzureBus instances with test options; all closed (consumers first) at teardown."""
    made: list[AzureBus] = []

    async def make(**options: Any) -> AzureBus:
        bus = azure_bus(peer, **options)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    await bounded(asyncio.gather(*(bus.close() for bus in made)), 30)


def raw_client(peer: AmqpPeer) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(peer.connection_string, retry_total=0)


async def test_azure_session_lock_is_renewed_while_a_handler_runs(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses(lock_duration=timedelta(seconds=1))
    queue, session = unique("renew"), unique("s")
    log = Log()

    async def slow(env: Envelope) -> None:
        await log.add(("start", env.body["i"], env.headers["delivery-count"]))
        if env.body["i"] == 0:
            await asyncio.sleep(3.5)  # 3.5 lock durations
        await log.add(("done", env.body["i"]))

    await bus.consume(queue, slow)
    await bus.send(queue, msg(session, i=0))
    await bus.send(queue, msg(session, i=1))
    await log.wait_for(lambda items: ("done", 1) in items, timeout=15)

    assert log.items == [("start", 0, "1"), ("done", 0), ("start", 1, "1"), ("done", 1)]  # never redelivered
    renewals = [(until) for path, sid, until in peer.broker.renewals if sid == session]
    assert len(renewals) >= 3, renewals  # the renew-session-lock requests reached the broker...
    assert renewals == sorted(renewals) and renewals[-1] - renewals[0] >= 1.5  # ...and moved the lock on
    assert not peer.broker.expired_locks
    ops = [op for path, op, _ in peer.management_requests if path == queue]
    assert "com.microsoft:renew-session-lock" in ops
    await eventually(lambda: _async(not peer.broker.queue(queue).all_messages()), 5)


async def _async(value: Any) -> Any:
    return value


async def test_azure_expired_lock_redelivers_the_sessions_unsettled_messages_in_order(
    peer: AmqpPeer, buses: Any
) -> None:
    bus = await buses(lock_duration=timedelta(seconds=1))
    queue, session = unique("expiry"), unique("s")
    await bus.send(queue, msg(session, i=0))  # creates the queue (lock 1 s) through the admin API
    for i in (1, 2):
        await bus.send(queue, msg(session, i=i))

    # A receiver that takes the session and two messages, then stops renewing and settling.
    async with raw_client(peer) as client:
        receiver = client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=5)
        async with receiver:
            got = await receiver.receive_messages(max_message_count=2, max_wait_time=5)
            assert [Envelope.decode(b"".join(m.body)).body["i"] for m in got] == [0, 1]
            assert receiver.session.session_id == session
            await eventually(lambda: _async(peer.broker.expired_locks), 5)
            with pytest.raises(ServiceBusError) as lost:
                await receiver.complete_message(got[0])  # too late: the broker took the session back
            assert "lock" in str(lost.value).lower()

    log = Log()
    await bus.consume(queue, lambda env: log.add((env.body["i"], env.headers["delivery-count"])))
    await log.wait_count(3)
    # Another receiver gets them all, in order; the two whose lock expired count a failed delivery.
    assert log.items == [(0, "2"), (1, "2"), (2, "1")]
    assert (queue, session) in peer.broker.expired_locks


async def test_azure_lost_lock_cancels_the_handler_and_the_session_is_picked_up_again(
    peer: AmqpPeer, buses: Any
) -> None:
    bus = await buses(lock_duration=timedelta(seconds=5))
    queue, session = unique("lost"), unique("s")
    log = Log()
    cancelled = asyncio.Event()
    first_call = True

    async def handler(env: Envelope) -> None:
        nonlocal first_call
        await log.add(("start", env.body["i"], env.headers["delivery-count"]))
        if env.body["i"] == 0 and first_call:
            first_call = False
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await log.add(("done", env.body["i"]))

    consumer = await bus.consume(queue, handler)
    for i in range(3):
        await bus.send(queue, msg(session, i=i))
    await log.wait_for(lambda items: ("start", 0, "1") in items)
    peer.broker.expire_lock(queue, session)  # the broker loses the lock (as if renewals stopped)

    await bounded(cancelled.wait(), 10)  # the adapter noticed and cancelled the stale handler
    await log.wait_for(lambda items: ("done", 2) in items)
    assert log.items == [
        ("start", 0, "1"),
        ("start", 0, "2"),  # redelivered after the lock expired (one more delivery counted)
        ("done", 0),
        ("start", 1, "1"),
        ("done", 1),
        ("start", 2, "1"),
        ("done", 2),
    ]
    assert consumer.locks_lost >= 1


async def test_azure_lost_locks_are_dropped_cleanly_and_the_consumer_goes_on(
    peer: AmqpPeer,
    buses: Any,
    trouble: Trouble,  # noqa: F811 the fixture imported above
) -> None:
    # Two processes. Every session's first message hangs on its first delivery in p1, and its handler
    # turns the cancellation into an error of its own (the worst case for stray task exceptions). The
    # broker then takes every lock back while p2's receivers wait for sessions: they are stolen.
    p1 = await buses(lock_duration=timedelta(seconds=2))
    p2 = await buses(lock_duration=timedelta(seconds=2))
    queue = unique("stolen")
    sessions = [unique("s") for _ in range(3)]
    log = Log()
    cancelled = Log()

    def handler(process: str) -> Any:
        async def handle(env: Envelope) -> None:
            count = int(env.headers["delivery-count"])
            if env.session_id in sessions and env.body["i"] == 0 and count == 1:
                await log.add(("hang", process, env.session_id))
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    await cancelled.add(env.session_id)
                    raise RuntimeError("cleanup failed after the lock was lost") from None
            await log.add(("done", process, env.session_id, env.body["i"], count, env.message_id))

        return handle

    c1 = await p1.consume(queue, handler("p1"), max_concurrent_sessions=8)
    sent: dict[str, list[str]] = {s: [] for s in sessions}

    async def send(process: AzureBus, session: str, i: int) -> None:
        message = msg(session, i=i)
        sent.setdefault(session, []).append(message.message_id)
        await process.send(queue, message)

    for session in sessions:
        for i in range(3):
            await send(p1, session, i)
    await log.wait_for(lambda items: len([x for x in items if x[0] == "hang"]) == len(sessions))
    c2 = await p2.consume(queue, handler("p2"), max_concurrent_sessions=8)  # waiting receivers
    for session in sessions:
        peer.broker.expire_lock(queue, session)  # as if p1's renewals had stopped reaching the broker

    await cancelled.wait_count(len(sessions), timeout=10)  # p1 noticed, and dropped each session
    for session in sessions:  # the same sessions go on
        await send(p2, session, 3)

    def done(items: list[Any]) -> dict[str, list[str]]:
        per_session: dict[str, list[str]] = {}
        for item in items:
            if item[0] == "done" and item[5] not in per_session.get(item[2], []):
                per_session.setdefault(item[2], []).append(item[5])
        return per_session

    await log.wait_for(lambda items: all(len(done(items).get(s, [])) == len(ids) for s, ids in sent.items()), 20)
    assert done(log.items) == sent  # nothing lost, and each session still in order
    first = [x for x in log.items if x[0] == "done" and x[3] == 0]
    assert all(x[4] >= 2 for x in first)  # the messages whose lock was lost came back, counted
    assert c1.locks_lost >= len(sessions)

    # p1's consumer goes on accepting sessions: with p2 gone, new sessions all go to p1.
    await c2.stop()
    accepted = c1.sessions_accepted
    fresh = [unique("s") for _ in range(3)]
    for session in fresh:
        await send(p1, session, 0)
        await send(p1, session, 1)
    await log.wait_for(lambda items: all(len(done(items).get(s, [])) == 2 for s in fresh), 20)
    assert {x[1] for x in log.items if x[0] == "done" and x[2] in fresh} == {"p1"}
    assert c1.sessions_accepted >= accepted + len(fresh)
    assert c1._workers and all(not t.done() for t in c1._workers)  # its workers are alive
    await eventually(lambda: _async(not peer.broker.queue(queue).all_messages()), 10)
    await p1.ping()
    await trouble.assert_clean()  # no "Task exception was never retrieved", no worker crash


async def test_azure_dropped_connection_redelivers_the_unsettled_message(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses(lock_duration=timedelta(seconds=30))
    queue, session = unique("drop"), unique("s")
    log = Log()
    gate = asyncio.Event()
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        await log.add(("start", env.body["i"], env.headers["delivery-count"]))
        if env.body["i"] == 0 and calls == 1:
            await gate.wait()  # still busy when the network goes
        await log.add(("done", env.body["i"]))

    await bus.consume(queue, handler)
    for i in range(2):
        await bus.send(queue, msg(session, i=i))
    await log.wait_count(1)
    assert peer.drop_connections() > 0  # every client connection, no AMQP goodbye

    # The broker lost the lock holder: message 0 is available again, counted as a failed delivery,
    # and the adapter's reconnecting receivers pick the session up again.
    await log.wait_for(lambda items: ("start", 0, "2") in items, timeout=20)
    gate.set()  # the first call finishes, but its settlement can no longer count
    await log.wait_for(lambda items: ("done", 1) in items)
    starts = [entry for entry in log.items if entry[0] == "start"]
    assert starts[:2] == [("start", 0, "1"), ("start", 0, "2")] and starts[-1] == ("start", 1, "1")
    await eventually(lambda: _async(not peer.broker.queue(queue).all_messages()), 10)
    # Sending works again too (the SDK reconnects the sender).
    await bus.send(queue, msg(session, i=2))
    await log.wait_for(lambda items: ("done", 2) in items)


async def test_azure_dead_letters_carry_reason_and_broker_max_delivery_count(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses()
    queue, session = unique("dlq"), unique("s")

    async def fail(env: Envelope) -> None:
        raise LookupError(f"no product {env.body['sku']}")

    poison = msg(session, type="ReserveStock", sku="sku-9")
    consumer = await bus.consume(queue, fail)
    await bus.send(queue, poison)
    [letter] = await eventually(lambda: bus.dead_letters(queue))
    await consumer.stop()
    assert (letter.attempts, letter.reason) == (MAX_ATTEMPTS, "LookupError: no product sku-9")
    assert letter.envelope == poison
    # On the broker: in the queue's $DeadLetterQueue with the reason as Service Bus properties.
    [stored] = peer.broker.queue(queue).dlq.all_messages()
    assert stored.app_props["DeadLetterReason"] == "LookupError: no product sku-9"
    assert '"attempts": 3' in stored.app_props["DeadLetterErrorDescription"]
    assert stored.message_id == poison.message_id and stored.subject == "ReserveStock"
    assert peer.broker.queue(queue).max_delivery_count == MAX_ATTEMPTS  # created with the bus's max_attempts

    # A receiver that keeps abandoning without ever dead-lettering: the broker does it at
    # MaxDeliveryCount, and dead_letters() reports that too.
    other = msg(unique("t"), type="Other")
    await bus.send(queue, other)
    async with raw_client(peer) as client:
        receiver = client.get_queue_receiver(queue, session_id=other.session_id, max_wait_time=5)
        async with receiver:
            for _ in range(MAX_ATTEMPTS):  # the session stays locked: each abandon comes straight back
                [message] = await receiver.receive_messages(max_message_count=1, max_wait_time=5)
                await receiver.abandon_message(message)
    letters = await eventually(lambda: _async_len(bus.dead_letters(queue), 2))
    broker_letter = next(x for x in letters if x.envelope.message_id == other.message_id)
    assert broker_letter.reason.startswith("MaxDeliveryCountExceeded")
    assert broker_letter.attempts == MAX_ATTEMPTS


async def _async_len(awaitable: Any, count: int) -> Any:
    items = await awaitable
    return items if len(items) >= count else None


async def test_azure_subscription_rules_filter_by_subject(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses()
    sub = unique("billing")
    paid, shipped, other = unique("Paid"), unique("Shipped"), unique("Other")
    log = Log()
    consumer = await bus.subscribe(sub, [paid, shipped], lambda env: log.add(env.type))

    rules = peer.broker.subscription(TOPIC, sub).rules
    # one rule per type and the replay rule (dead letters replayed to this subscription alone); $Default is gone
    assert sorted(rules) == sorted([paid, shipped, REPLAY_RULE])
    assert {r.correlation.get("subject") for n, r in rules.items() if n != REPLAY_RULE} == {paid, shipped}
    assert peer.broker.subscription(TOPIC, sub).requires_session

    session = unique("o")
    for event_type in (paid, other, shipped):
        await bus.publish(msg(session, type=event_type))
    await log.wait_count(2)
    assert log.items == [paid, shipped]
    published = [m for address, m in peer.sent_messages if address == TOPIC]
    assert [m.subject for m in published] == [paid, other, shipped]  # subject = envelope type on the wire

    # Subscribing again with other types replaces the rules (the latest subscriber's types win).
    await consumer.stop()
    log2 = Log()
    await bus.subscribe(sub, [other], lambda env: log2.add(env.type))
    assert sorted(peer.broker.subscription(TOPIC, sub).rules) == sorted([other, REPLAY_RULE])
    for event_type in (paid, other):
        await bus.publish(msg(session, type=event_type))
    await log2.wait_count(1)
    await asyncio.sleep(0.3)
    assert log2.items == [other]


async def test_azure_duplicate_message_id_is_dropped_within_the_window(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses(duplicate_detection_window=timedelta(seconds=1))
    queue = unique("dedup")
    log = Log()
    await bus.consume(queue, lambda env: log.add((env.message_id, env.body["i"])))
    env = msg(unique("s"), i=1)
    await bus.send(queue, env)
    await bus.send(queue, env)  # same message_id within the window: Service Bus drops it
    later = msg(env.session_id, i=2)
    await bus.send(queue, later)
    await log.wait_count(2)
    assert log.items == [(env.message_id, 1), (later.message_id, 2)]
    assert peer.broker.duplicates_dropped == 1
    assert peer.broker.queue(queue).dedup is not None  # created with duplicate detection
    await asyncio.sleep(1.1)  # outside the window the same id is a new message again
    await bus.send(queue, env)
    await log.wait_count(3)
    assert log.items[-1] == (env.message_id, 1)


async def test_azure_max_concurrent_sessions_is_a_hard_limit(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses()
    queue = unique("limit")
    running = peak = 0
    log = Log()

    async def handler(env: Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        await log.add(env.session_id)

    await bus.consume(queue, handler, max_concurrent_sessions=2)
    for i in range(12):
        await bus.send(queue, msg(f"s{i % 6}", i=i))
    await log.wait_count(12)
    assert peak == 2


async def test_azure_provision_creates_queues_topic_subscriptions_and_rules(peer: AmqpPeer) -> None:
    settings = load_settings(
        env={"ECOM_BUS": "azure", "ECOM_BUS_URL": peer.connection_string, "ECOM_BUS_MAX_ATTEMPTS": "4"}
    )
    options = {"connection_verify": peer.ca_file}
    report = await provision(
        settings, queues=["order", "catalog"], subscriptions={"cart": ["OrderStarted"]}, admin_options=options
    )
    assert report == [
        "queue order: created",
        "queue catalog: created",
        f"topic {TOPIC}: created",
        (
            f"subscription {TOPIC}/cart: created subscription {TOPIC}/cart, "
            "created rule OrderStarted (subject = 'OrderStarted'), "
            "created rule ecom-replay (ecom-replay-to = 'cart': replayed dead letters), deleted rule $Default"
        ),
    ]
    order = peer.broker.queue("order")
    assert (order.requires_session, order.max_delivery_count, order.lock_duration) == (True, 4, 60.0)
    assert order.dedup is not None and order.dedup.window == 600
    assert sorted(peer.broker.subscription(TOPIC, "cart").rules) == ["OrderStarted", REPLAY_RULE]
    # What went over the wire is the SDK's ATOM, signed with the connection string's key.
    puts = [(path, body) for method, path, body in peer.atom.requests if method == "PUT"]
    assert [path for path, _ in puts][:3] == ["order", "catalog", TOPIC]
    assert "<RequiresSession>true</RequiresSession>" in puts[0][1]
    assert "<MaxDeliveryCount>4</MaxDeliveryCount>" in puts[0][1]

    again = await provision(
        settings, queues=["order"], subscriptions={"cart": ["OrderStarted", "OrderPaid"]}, admin_options=options
    )
    assert again == [
        "queue order: exists",
        f"topic {TOPIC}: exists",
        f"subscription {TOPIC}/cart: created rule OrderPaid (subject = 'OrderPaid')",
    ]


async def test_azure_cli_bus_provision(peer: AmqpPeer, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ecom")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "bus",
            "provision",
            "--queue",
            "order",
            "--subscription",
            "cart=OrderStarted,OrderPaid",
            "--ca-file",
            str(peer.ca_file),
        ]
    )
    settings = load_settings(env={"ECOM_BUS": "azure", "ECOM_BUS_URL": peer.connection_string})
    # The command runs its own event loop (like `ecom` does), so off this test's loop.
    code = await asyncio.to_thread(args.handler, settings, args)
    assert code == 0
    out = capsys.readouterr().out
    assert "queue order: created" in out and f"topic {TOPIC}: created" in out
    assert sorted(peer.broker.subscription(TOPIC, "cart").rules) == ["OrderPaid", "OrderStarted", REPLAY_RULE]
    with pytest.raises(ConfigError):
        bad = parser.parse_args(["bus", "provision", "--subscription", "cart"])
        bad.handler(settings, bad)


def test_azure_create_bus_configuration() -> None:
    bus = create_bus(
        load_settings(
            env={
                "ECOM_BUS": "azure",
                "ECOM_BUS_URL": "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
                "ECOM_BUS_MAX_ATTEMPTS": "7",
                "ECOM_BUS_MAX_CONCURRENT_SESSIONS": "3",
            }
        )
    )
    assert isinstance(bus, Bus)
    assert (bus.name, bus.max_attempts, bus.max_concurrent_sessions) == ("azure", 7, 3)
    with pytest.raises(ConfigError, match="ECOM_BUS_URL or ECOM_BUS_NAMESPACE"):
        create_bus(load_settings(env={"ECOM_BUS": "azure"}))
    with pytest.raises(ConfigError, match="connection string"):
        create_bus(load_settings(env={"ECOM_BUS": "azure", "ECOM_BUS_URL": "amqp://guest@localhost"}))
    try:
        import azure.identity.aio  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="azure-identity"):
            create_bus(load_settings(env={"ECOM_BUS": "azure", "ECOM_BUS_NAMESPACE": "x.servicebus.windows.net"}))


async def test_azure_peer_speaks_service_bus_to_the_raw_sdk(peer: AmqpPeer) -> None:
    """Protocol checks of the peer itself, with the SDK and no adapter in between."""
    peer.broker.create_queue("plain")
    peer.broker.create_queue("sessions", requires_session=True, lock_duration=30)
    async with raw_client(peer) as client:
        async with client.get_queue_sender("sessions") as sender:
            await sender.send_messages([ServiceBusMessage(f"m{i}", session_id="a") for i in range(3)])  # a batch
            with pytest.raises(ServiceBusError):  # a session queue refuses a message without session id
                await sender.send_messages(ServiceBusMessage("no session"))
        async with client.get_queue_receiver("sessions", session_id="a", max_wait_time=5) as holder:
            await holder.session.set_state("step-2")
            assert await holder.session.get_state() == b"step-2"
            before = holder.session.locked_until_utc
            assert await holder.session.renew_lock() > before
            with pytest.raises(SessionCannotBeLockedError):  # one receiver per session
                async with client.get_queue_receiver("sessions", session_id="a", max_wait_time=2) as other:
                    await other.receive_messages(max_message_count=1, max_wait_time=1)
            peeked = await holder.peek_messages(max_message_count=10)
            assert [str(m) for m in peeked] == ["m0", "m1", "m2"]
            assert [m.sequence_number for m in peeked] == [1, 2, 3]
        with pytest.raises(MessagingEntityNotFoundError):
            async with client.get_queue_sender("nowhere") as sender:
                await sender.send_messages(ServiceBusMessage("x"))
    wrong = peer.connection_string.replace(f"SharedAccessKey={peer.key}", "SharedAccessKey=d3Jvbmc=")
    async with ServiceBusClient.from_connection_string(wrong, retry_total=0) as client:
        with pytest.raises(ServiceBusAuthenticationError):  # the CBS put-token is checked
            async with client.get_queue_sender("plain") as sender:
                await sender.send_messages(ServiceBusMessage("x"))
    assert "ANONYMOUS" in peer.sasl_mechanisms
    assert any(r.get("operation") == "put-token" for r in peer.cbs_requests)


async def test_azure_broadcast_subscription_rules_auto_delete_and_recreation(peer: AmqpPeer, buses: Any) -> None:
    bus = await buses()
    bus.broadcast_auto_delete = timedelta(seconds=1)  # Service Bus's minimum is 5 min; the peer takes any
    revoked, locked = unique("KeyRevoked"), unique("Locked")
    log = Log()
    consumer = await bus.broadcast([revoked, locked], lambda env: log.add(env.body["n"]))
    assert isinstance(consumer, AzureBroadcast) and len(consumer.subscription) <= 50
    sub = peer.broker.subscription(TOPIC, consumer.subscription)
    # Exactly the types (no $Default rule matching everything), per process, gone when idle.
    assert {name: rule.correlation.get("subject") for name, rule in sub.rules.items()} == {
        revoked: revoked,
        locked: locked,
    }
    assert sub.requires_session and sub.auto_delete_on_idle == 1.0

    # Deleted under a running process (AutoDeleteOnIdle while it was suspended, an operator): re-created.
    peer.broker.delete_subscription(TOPIC, consumer.subscription)
    await eventually(lambda: _async(consumer.recreated >= 1), 15)
    await bus.publish(msg(unique("identity"), type=revoked, n=1))
    await log.wait_count(1, timeout=15)

    # A process that dies without stop(): its receivers go, the subscription is deleted once idle.
    await bounded(consumer._consumer.stop())
    await eventually(lambda: _async(consumer.subscription.lower() not in peer.broker.topic(TOPIC).subscriptions), 10)
    assert (TOPIC, consumer.subscription, "deleted after AutoDeleteOnIdle") in peer.broker.deleted_subscriptions
    await bounded(consumer.stop())  # already gone: no error

    # close() deletes the broadcast subscriptions of the process.
    other = await bus.broadcast([revoked], Log().add)
    assert other.subscription.lower() in peer.broker.topic(TOPIC).subscriptions
    await bounded(bus.close())
    assert other.subscription.lower() not in peer.broker.topic(TOPIC).subscriptions


async def test_azure_broadcast_without_manage_rights_is_a_bus_error(buses: Any) -> None:
    bus = await buses(auto_provision=False)
    with pytest.raises(BusError, match="Manage rights"):
        await bus.broadcast(["KeyRevoked"], Log().add)
