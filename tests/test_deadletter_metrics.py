"""Dead letters in ``/metrics``: ``bus_dead_letters`` (held now, counted through the bus's DeadLetters operations
before each scrape) and ``bus_dead_lettered_total`` (messages this process's bus dead-lettered).

A service named ``order`` (so it consumes the ``order`` queue) whose bus handler fails every delivery, served over
real HTTP, on the in-memory bus and on the real RabbitMQ (this test's own queue names, deleted after it: the
harness of tests/test_bus_rabbitmq.py). ``/metrics`` is parsed with Prometheus' own parser. On RabbitMQ the scrapes
must count the dead letter without reading it (a read returns it to the DLQ, which counts as a redelivery).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus import Envelope, MemoryBus
from config import load_settings
from runtime import migrate
from runtime.host import ServiceRuntime, create_app
from tests.test_bus_rabbitmq import RABBIT_URL, RabbitFactory, rabbit_factory  # noqa: F401 - the fixture, used by name

LABELS = {"service": "order", "queue": "order", "kind": "queue"}


async def samples(client: Any) -> dict[str, float]:
    """The dead-letter samples of the order queue in one scrape, by sample name."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name.startswith("bus_dead_letter") and sample.labels == LABELS:
                assert sample.name not in found, f"{sample.name} twice for {LABELS}"
                found[sample.name] = sample.value
    return found


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    return result


@pytest.fixture
def make_service(aiohttp_client: Any, tmp_path: Any, test_identity: Any) -> Any:
    """An ``order`` service on ``bus`` whose queue handler fails every delivery (so each message is dead-lettered
    after the bus's max_attempts)."""

    async def make(bus: Any, *, owns_bus: bool) -> Any:
        settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_BUS_OUTBOX_POLL_INTERVAL": "30"})
        runtime = ServiceRuntime.with_database(
            "order",
            settings,
            bus=bus,
            owns_bus=owns_bus,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'order.db'}",
            verifier=test_identity.verifier(),
        )
        await migrate.upgrade(runtime.engine, [migrate.RUNTIME])

        async def fail(envelope: Envelope) -> None:
            raise ValueError(f"cannot take {envelope.type}")

        async def consume() -> None:
            await bus.consume("order", fail)

        runtime.on_start.append(consume)
        return await aiohttp_client(create_app(runtime))

    return make


async def dead_letter_one(client: Any, bus: Any) -> None:
    """Before: both series at 0. A message is dead-lettered: the gauge and the counter both at 1."""
    assert await samples(client) == {"bus_dead_letters": 0, "bus_dead_lettered_total": 0}
    await bus.send("order", Envelope(type="Bump", session_id="t-1", body={"amount": 13}))

    async def stored() -> bool:  # the counter is bumped once the dead letter is stored (RabbitMQ: confirmed)
        return bool(bus.dead_lettered["order", "queue"])

    await until(stored)
    for _ in range(3):
        assert await samples(client) == {"bus_dead_letters": 1, "bus_dead_lettered_total": 1}


async def test_memory_bus_dead_letter_shows_in_metrics(make_service: Any) -> None:
    bus = MemoryBus(max_attempts=2)
    client = await make_service(bus, owns_bus=True)
    await dead_letter_one(client, bus)


@pytest.mark.rabbitmq
async def test_rabbitmq_dead_letter_shows_in_metrics(make_service: Any, rabbit_factory: RabbitFactory) -> None:  # noqa: F811 - the fixture
    bus = await rabbit_factory(max_attempts=2)  # this test's own queue names, deleted after it
    client = await make_service(bus, owns_bus=False)
    await dead_letter_one(client, bus)
    # The scrapes counted the dead letter without reading it: it was never returned to its DLQ (RabbitMQ 4.0-4.2
    # would count each return against the DLQ's delivery limit and drop the message at the limit).
    connection = await aiormq.connect(RABBIT_URL)
    try:
        channel = await connection.channel()
        got = await channel.basic_get(f"{bus.prefix}order.dlq", no_ack=False)
        assert got.body and got.delivery.redelivered is False  # type: ignore[union-attr]  # a GetOk here
    finally:
        await connection.close()  # returns the message to the DLQ
    # A broker that cannot answer: the gauge is left out of the scrape (no made-up 0), the counter stays.
    await bus.close()
    assert await samples(client) == {"bus_dead_lettered_total": 1}
