"""Bus faults on the real RabbitMQ: the broker force-closes connections and channels under a running bus.

Each test gets a vhost of its own (created and deleted with ``rabbitmqctl``), so force-closing "all
connections" only ever hits the test's own bus. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest;
``ECOM_TEST_RABBITMQ_URL`` overrides) and ``rabbitmqctl`` for that broker (``ECOM_TEST_RABBITMQCTL``
overrides, e.g. ``docker exec rabbit rabbitmqctl``): skipped when either is missing, a failure under
``CI=true``. Nothing is mocked: the faults are the broker's own (CONNECTION_FORCED, channel errors,
refused logins), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import shlex
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Any

import pytest
from yarl import URL

from bus import BusError, Envelope
from bus.rabbitmq import DEFAULT_URL, RabbitBus, RabbitConsumer
from tests.bus_contract import Log, bounded, eventually, msg
from tests.conftest import require_server

pytestmark = pytest.mark.rabbitmq

RABBIT_URL = os.environ.get("ECOM_TEST_RABBITMQ_URL", DEFAULT_URL)
RABBITMQCTL = shlex.split(os.environ.get("ECOM_TEST_RABBITMQCTL", "rabbitmqctl"))
PARTITIONS = 4

BusMaker = Callable[..., Awaitable[RabbitBus]]


def _require_rabbitmqctl() -> None:
    url = URL(RABBIT_URL)
    require_server("RabbitMQ", url.host or "127.0.0.1", url.port or 5672)
    if shutil.which(RABBITMQCTL[0]) is None:
        reason = f"{RABBITMQCTL[0]!r} not found (set ECOM_TEST_RABBITMQCTL): needed to force-close connections"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: real-server tests must run)")
        pytest.skip(reason)


async def ctl(*args: str) -> str:
    """Run rabbitmqctl (bounded); its output, or an AssertionError with what it said."""
    process = await asyncio.create_subprocess_exec(
        *RABBITMQCTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} did not finish in 30 s") from None
    if process.returncode:
        raise AssertionError(
            f"rabbitmqctl {' '.join(args)} failed ({process.returncode}): {err.decode()}{out.decode()}"
        )
    return out.decode()


class Faults:
    """What the broker can do to the connections of one vhost."""

    def __init__(self, vhost: str, user: str) -> None:
        self.vhost = vhost
        self.user = user

    async def close_all_connections(self) -> None:
        await ctl("close_all_connections", "-p", self.vhost, "test")

    async def close_each_connection(self) -> int:
        """``rabbitmqctl close_connection`` on every connection of the vhost, one by one."""
        # list_connections lists the connections of every vhost (its -p is ignored): filter on ours,
        # or this would close other tests' connections on the same broker.
        rows = [line.split("\t") for line in (await ctl("-q", "list_connections", "pid", "vhost")).splitlines()]
        pids = [row[0].strip() for row in rows if len(row) == 2 and row[1].strip() == self.vhost]
        for pid in pids:
            await ctl("close_connection", pid, "test")
        return len(pids)

    async def refuse_logins(self) -> None:
        await ctl("clear_permissions", "-p", self.vhost, self.user)

    async def allow_logins(self) -> None:
        await ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")


@pytest.fixture
async def faults() -> AsyncIterator[Faults]:
    _require_rabbitmqctl()
    vhost = f"ecom-faults-{uuid.uuid4().hex[:10]}"
    faults = Faults(vhost, URL(RABBIT_URL).user or "guest")
    await ctl("add_vhost", vhost)
    try:
        await faults.allow_logins()
        yield faults
    finally:
        await ctl("delete_vhost", vhost)  # its queues, exchanges and any connection left with it


@pytest.fixture
async def make_bus(faults: Faults) -> AsyncIterator[BusMaker]:
    """Buses ("processes") on the test's vhost, recovering fast; closed (bounded) at teardown."""
    url = str(URL(RABBIT_URL).with_path("/" + faults.vhost))
    made: list[RabbitBus] = []

    async def make(**overrides: Any) -> RabbitBus:
        options: dict[str, Any] = {
            "partitions": PARTITIONS,
            "max_attempts": 3,
            "redelivery_delay": 0.01,
            "timeout": 5.0,
            "reconnect_interval": 0.1,
            "reconnect_max_interval": 0.8,
        }
        options.update(overrides)
        bus = RabbitBus(url, **options)
        made.append(bus)
        await bounded(bus.start(), 10)
        return bus

    yield make
    for bus in made:
        with suppress(Exception):
            await bounded(bus.close(), 10)


class Trouble(logging.Handler):
    """Everything that would show a fault was not handled cleanly: exceptions reaching the event loop
    (a task's exception never retrieved, a failing callback) and error logs of the bus or asyncio."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.loop_errors: list[dict[str, Any]] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)

    async def assert_clean(self) -> None:
        gc.collect()  # unretrieved task/future exceptions are reported when the object is collected
        await asyncio.sleep(0)
        assert not self.loop_errors, [(c.get("message"), c.get("exception")) for c in self.loop_errors]
        bad = [
            r.getMessage()
            for r in self.records
            if (r.levelno >= logging.ERROR and r.name.startswith(("bus", "asyncio"))) or "crashed" in r.getMessage()
        ]
        assert not bad, bad

    def messages(self, needle: str) -> list[logging.LogRecord]:
        return [r for r in self.records if needle in r.getMessage()]


@pytest.fixture
async def trouble() -> AsyncIterator[Trouble]:
    loop = asyncio.get_running_loop()
    watcher = Trouble()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(watcher.on_loop_error)
    logging.getLogger().addHandler(watcher)
    try:
        yield watcher
    finally:
        logging.getLogger().removeHandler(watcher)
        loop.set_exception_handler(previous)


async def _up(bus: RabbitBus) -> bool:
    try:
        await bus.ping()
    except BusError:
        return False
    return True


def _alive(bus: RabbitBus, *consumers: RabbitConsumer) -> None:
    """The recovery machinery and every consumer are still there (nothing died silently)."""
    assert bus._supervisor is not None and not bus._supervisor.done()
    for consumer in consumers:
        assert consumer.is_consuming, consumer.name
        assert all(not task.done() or task.cancelled() or task.exception() is None for task in consumer._workers)


class Handled:
    """Handler calls by (kind, session): (round, i, delivery-count); a stuck message on request."""

    def __init__(self, stuck: tuple[str, int] | None = None) -> None:
        self.log = Log()
        self.stuck = stuck  # (session, i) of round 0 that hangs on its first delivery
        self.in_stuck = asyncio.Event()
        self.stuck_cancelled = asyncio.Event()

    async def __call__(self, env: Envelope) -> None:
        count = int(env.headers["delivery-count"])
        if self.stuck == (env.session_id, env.body["i"]) and env.body["round"] == 0 and count == 1:
            self.in_stuck.set()
            try:
                await asyncio.sleep(60)  # in flight, unacked, when the broker cuts the connection
            except asyncio.CancelledError:
                self.stuck_cancelled.set()
                raise
        await asyncio.sleep(0.002)  # a few messages in flight at any time
        await self.log.add((env.type, env.session_id, env.body["round"], env.body["i"], count, env.message_id))

    def ids(self) -> set[str]:
        return {item[5] for item in self.log.items}

    async def wait_for_ids(self, ids: set[str], timeout: float = 20) -> None:
        await self.log.wait_for(lambda items: ids <= {item[5] for item in items}, timeout)

    def assert_in_order(self) -> None:
        """Per type and session, first handlings follow the send order (redeliveries come in order)."""
        firsts: dict[tuple[str, str], list[tuple[int, int]]] = {}
        seen: set[str] = set()
        for kind, session, round_, i, _, message_id in self.log.items:
            if message_id not in seen:
                seen.add(message_id)
                firsts.setdefault((kind, session), []).append((round_, i))
        for key, order in firsts.items():
            assert order == sorted(order), (key, order)


async def _produce(bus: RabbitBus, queue: str, event_type: str, round_: int, count: int, sessions: int = 6) -> set[str]:
    ids: set[str] = set()
    for i in range(count):
        session = f"s{i % sessions}"
        command, event = msg(session, round=round_, i=i), msg(session, type=event_type, round=round_, i=i)
        await bus.send(queue, command)
        await bus.publish(event)
        ids |= {command.message_id, event.message_id}
    return ids


# -- connection force-closed by the broker ------------------------------------------------------


async def test_rabbit_forced_close_of_all_connections_is_recovered(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    bus = await make_bus()
    handled = Handled(stuck=("s1", 7))
    catalog = await bus.consume("catalog", handled, max_concurrent_sessions=4)
    search = await bus.subscribe("search", ["ProductChanged"], handled)

    sent = await _produce(bus, "catalog", "ProductChanged", 0, 30)
    await bounded(handled.in_stuck.wait(), 10)  # ...so at least one message is mid-handler when it happens
    await faults.close_all_connections()  # rabbitmqctl close_all_connections -p <vhost> "test"

    # Publishing right away: it waits for the reconnection and is confirmed on the new connection.
    sent |= await bounded(_produce(bus, "catalog", "ProductChanged", 1, 30), 20)
    await handled.wait_for_ids(sent)
    assert handled.ids() == sent  # nothing lost (duplicates would be fine: the inbox dedupes)
    handled.assert_in_order()
    await bounded(handled.stuck_cancelled.wait(), 1)  # the cut-off handler was cancelled, not left hanging
    redelivered = [item for item in handled.log.items if (item[1], item[2], item[3]) == ("s1", 0, 7)]
    assert redelivered and all(item[4] >= 2 for item in redelivered)  # came back from the broker, and says so

    await eventually(lambda: _up(bus), 10)
    assert bus.reconnects == 1
    assert catalog.channels_lost == 1 and search.channels_lost == 1
    _alive(bus, catalog, search)
    assert trouble.messages("CONNECTION_FORCED")  # it really was the broker that closed it
    await trouble.assert_clean()


async def test_rabbit_connections_closed_one_by_one_repeatedly_are_recovered(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    # Two "processes" on one queue (single active consumer per partition) and two forced closes of
    # every connection, the second as soon as the first recovery is done: a flapping link.
    p1, p2 = await make_bus(), await make_bus()
    handled = Handled()
    consumers = [await p1.consume("catalog", handled), await p2.consume("catalog", handled)]
    consumers.append(await p1.subscribe("search", ["ProductChanged"], handled))
    sent: set[str] = set()
    for round_ in range(2):
        sent |= await bounded(_produce(p1 if round_ % 2 else p2, "catalog", "ProductChanged", round_, 10), 20)
        assert await faults.close_each_connection() == 2  # rabbitmqctl close_connection <pid>, each of them
        await eventually(lambda: _up(p1), 10)
        await eventually(lambda: _up(p2), 10)
    sent |= await bounded(_produce(p1, "catalog", "ProductChanged", 2, 10), 20)
    await handled.wait_for_ids(sent)
    assert handled.ids() == sent
    handled.assert_in_order()
    assert (p1.reconnects, p2.reconnects) == (2, 2)
    _alive(p1, consumers[0], consumers[2])
    _alive(p2, consumers[1])
    await trouble.assert_clean()


# -- channels closed on their own ---------------------------------------------------------------


async def test_rabbit_channel_closed_by_a_channel_error_is_recovered(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    bus = await make_bus()
    handled = Handled()
    consumer = await bus.consume("catalog", handled)
    sent: set[str] = set()
    for i in range(4):
        m = msg(f"s{i}", round=0, i=i)
        await bus.send("catalog", m)
        sent.add(m.message_id)
    await handled.wait_for_ids(sent)

    # The broker closes the consumer's channel (PRECONDITION_FAILED: unknown delivery tag), the
    # connection stays up: only that channel is reopened and re-subscribed.
    channel = consumer._channel
    assert channel is not None
    with suppress(Exception):
        await channel.basic_ack(987654)
    await eventually(lambda: _async(channel.is_closed), 5)
    # The publishing channel too (NOT_FOUND: publishing to an exchange that does not exist).
    publishing = bus._channel
    assert publishing is not None
    with pytest.raises(Exception, match="NOT_FOUND"):
        await publishing.basic_publish(b"x", exchange="no-such-exchange", routing_key="x")

    for i in range(4, 8):  # sending waits for the publishing channel to be back
        m = msg(f"s{i % 4}", round=0, i=i)
        await bounded(bus.send("catalog", m), 10)
        sent.add(m.message_id)
    await handled.wait_for_ids(sent)
    handled.assert_in_order()
    await eventually(lambda: _up(bus), 10)
    assert bus.reconnects == 0  # the connection was never lost
    assert consumer.channels_lost == 1 and consumer._channel is not channel and bus._channel is not publishing
    _alive(bus, consumer)
    await trouble.assert_clean()


async def _async(value: Any) -> Any:
    return value


# -- a broker that refuses us for a while, and close() in the middle of it ------------------------


async def test_rabbit_refused_reconnects_back_off_then_recover(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    bus = await make_bus(reconnect_interval=0.05, reconnect_max_interval=0.4)
    handled = Handled()
    consumer = await bus.consume("catalog", handled)
    await faults.refuse_logins()
    await faults.close_all_connections()  # every reconnection is now refused (no access to the vhost)
    await eventually(lambda: _async(len(trouble.messages("recovery attempt")) >= 4), 10)
    with pytest.raises(BusError, match="down"):
        await bus.ping()
    m = msg("s", round=0, i=0)
    pending = asyncio.ensure_future(bus.send("catalog", m))  # waits for the recovery
    await asyncio.sleep(0.3)
    assert not pending.done()
    failed_at = [r.created for r in trouble.messages("recovery attempt")]
    gaps = [b - a for a, b in itertools.pairwise(failed_at)]
    assert max(gaps) < 0.4 + 0.5  # capped (plus the time of a refused attempt)

    await faults.allow_logins()
    await bounded(pending, 10)
    await handled.wait_for_ids({m.message_id})
    await eventually(lambda: _up(bus), 10)
    assert bus.reconnects == 1
    _alive(bus, consumer)
    # Refused attempts are warnings, not errors: check the rest is clean.
    trouble.records = [r for r in trouble.records if "recovery attempt" not in r.getMessage()]
    await trouble.assert_clean()


async def test_rabbit_close_during_a_reconnect_loop_does_not_hang(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    bus = await make_bus(reconnect_interval=0.05, reconnect_max_interval=0.2)
    handled = Handled()
    await bus.consume("catalog", handled)
    await faults.refuse_logins()
    await faults.close_all_connections()
    await eventually(lambda: _async(len(trouble.messages("recovery attempt")) >= 2), 10)
    waiting = asyncio.ensure_future(bus.send("catalog", msg("s", round=0, i=0)))  # blocked on the outage
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await bounded(bus.close(), 5)
    assert time.monotonic() - started < 2
    with pytest.raises(BusError, match="closed"):
        await bounded(waiting, 2)  # released by close(), not left waiting for its timeout
    supervisor = bus._supervisor
    assert supervisor is None
    await asyncio.sleep(0.3)  # a reconnect loop still running would log another attempt by now
    attempts = len(trouble.messages("recovery attempt"))
    await asyncio.sleep(0.3)
    assert len(trouble.messages("recovery attempt")) == attempts
    await faults.allow_logins()
    trouble.records = [r for r in trouble.records if "recovery attempt" not in r.getMessage()]
    await trouble.assert_clean()


def test_rabbit_reconnect_back_off_is_exponential_jittered_and_capped() -> None:
    bus = RabbitBus(reconnect_interval=0.5, reconnect_max_interval=8.0)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [bus._backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert len(set(delays)) > 1  # jittered: processes cut off together do not retry in lockstep
    assert bus._backoff(1000) <= 8.0
    assert RabbitBus().reconnect_interval == 1.0 and RabbitBus().reconnect_max_interval == 30.0
    with pytest.raises(ValueError):
        RabbitBus(reconnect_interval=0)


# -- broadcast: per-process queues across a forced close -------------------------------------------


async def _queues(faults: Faults) -> list[str]:
    """``rabbitmqctl list_queues -p <vhost> name``: every queue of the test's vhost."""
    out = await ctl("-q", "list_queues", "-p", faults.vhost, "name", "--no-table-headers")
    return sorted(line.strip() for line in out.splitlines() if line.strip())


async def test_rabbit_broadcast_survives_a_forced_close_and_leaves_no_queue(
    faults: Faults, make_bus: BusMaker, trouble: Trouble
) -> None:
    p1, p2 = await make_bus(), await make_bus()  # two processes listening to the announcements
    event_type = "SigningKeyRevoked"
    logs = (Log(), Log())
    b1 = await p1.broadcast([event_type], lambda env: logs[0].add(env.body["n"]))
    b2 = await p2.broadcast([event_type], lambda env: logs[1].add(env.body["n"]))
    assert b1.queue and b2.queue and b1.queue != b2.queue
    assert await _queues(faults) == sorted([b1.queue, b2.queue])
    await p1.publish(msg("identity", type=event_type, n=0))
    for log in logs:
        await log.wait_count(1)

    before = (b1.queue, b2.queue)
    await faults.close_all_connections()  # the exclusive queues go with the connections
    await eventually(lambda: _up(p1), 10)
    await eventually(lambda: _up(p2), 10)
    # Re-declared (a new server-named queue each) and re-bound by the supervisor; the old ones are gone.
    assert b1.queue not in before and b2.queue not in before
    assert (b1.channels_lost, b1.queues_declared, b2.channels_lost, b2.queues_declared) == (1, 2, 1, 2)
    assert await _queues(faults) == sorted([b1.queue, b2.queue])
    _alive(p1, b1)
    _alive(p2, b2)

    for n in range(1, 6):
        await bounded((p1, p2)[n % 2].publish(msg("identity", type=event_type, n=n)), 10)
    for log in logs:
        await log.wait_for(lambda items: 5 in items, 10)
        assert log.items == [0, 1, 2, 3, 4, 5]  # everything published after the reconnect, in order

    await bounded(b1.stop(), 10)
    assert await _queues(faults) == [b2.queue]  # stopped: its queue is deleted at once
    await bounded(p2.close(), 10)
    assert await _queues(faults) == []  # the process gone: nothing accumulates
    await trouble.assert_clean()
