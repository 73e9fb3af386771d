"""Service descriptions (``runtime.description``): one declaration per service, read by the host (actors built with
their dependencies, resources and consumers as cleanup contexts), by ``ecom bus provision`` (the bus plan), by the
admin endpoints (actor types) and by the gateway (its route table)."""

from __future__ import annotations

import asyncio
import functools
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiormq
import pytest

import contracts
from actors.cart import service as cart_service
from actors.cart.actor import CartActor
from bus.rabbitmq import DEFAULT_URL, RabbitBus
from config import load_settings
from contracts import queues
from gateway import routes as gateway_routes
from runtime import migrate, services
from runtime.actors import Actor, ActorSystem, Turn, handles
from runtime.cli import main
from runtime.description import Http, Queue, ServiceDescription, ToActor
from runtime.host import AppKeyRuntime
from tests.conftest import require_server
from tests.support.cluster import rabbitmqctl

DESCRIPTIONS = {d.name: d for d in services.descriptions()}


# ---------------------------------------------------------------------------------------------------
# What the descriptions say, and who reads it


def test_every_service_is_described_and_its_service_module_declares_it() -> None:
    assert set(DESCRIPTIONS) == set(services.SERVICE_MODULES)
    assert {n: d.actor_types for n, d in DESCRIPTIONS.items()} == {
        "identity": ("login",),
        "catalog": ("product",),
        "cart": ("cart",),
        "order": ("order",),
        "gateway": (),
    }
    for module in services.available():
        assert module.schema is module.description.schema
        assert (module.schema is None) == (not module.description.database)


def test_the_gateway_table_is_the_services_declared_routes_in_service_order() -> None:
    declared = tuple(r for d in DESCRIPTIONS.values() for r in d.gateway_routes)
    assert declared == gateway_routes.ROUTES
    assert services.gateway_routes() == declared
    assert {r.service for r in declared} == {"identity", "catalog", "cart", "order"}
    for description in DESCRIPTIONS.values():
        assert all(r.service == description.name for r in description.gateway_routes)


def test_the_bus_plan_is_what_the_services_consume_and_matches_the_contracts() -> None:
    plan = services.bus_plan()
    assert set(plan.queues) == set(queues.QUEUES)
    assert plan.subscriptions == queues.SUBSCRIPTIONS
    assert plan.topic


def test_what_a_service_sends_to_a_queue_its_consumer_takes() -> None:
    consumers = {q.name: set(q.types) for d in DESCRIPTIONS.values() for q in d.queues}
    for description in DESCRIPTIONS.values():
        for queue, messages in description.sends.items():
            assert {m.__name__ for m in messages} <= consumers[queue], (description.name, queue)


def test_every_subscribed_event_is_published_by_a_service() -> None:
    published = {cls.__name__ for d in DESCRIPTIONS.values() for cls in d.publishes}
    for description in DESCRIPTIONS.values():
        for subscription in description.subscriptions:
            assert set(subscription.types) <= published, subscription.name
    assert published <= {cls.__name__ for cls in contracts.MESSAGES}


def test_two_services_consuming_one_queue_is_refused() -> None:
    twice = ServiceDescription(
        "twice", http=Http(()), consumes=(Queue(queues.ORDER_QUEUE, (ToActor(contracts.OrderStarted, CartActor),)),)
    )
    with pytest.raises(ValueError, match="consumed by order and twice"):
        services.bus_plan([DESCRIPTIONS["order"], twice])


def test_provision_dry_run_prints_the_plan(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECOM_BUS", "rabbitmq")
    assert main(["bus", "provision", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ecom bus provision (rabbitmq), would create:",
        "  queue catalog",
        "  queue order",
        "  topic (events)",
        "  subscription cart: OrderStarted, ProductPriceChanged",
    ]


# ---------------------------------------------------------------------------------------------------
# Actors built with their dependencies


@dataclass(frozen=True, slots=True)
class Greet:
    name: str


class GreeterActor(Actor):
    persistent = False

    def __init__(self, actor_id: str, system: ActorSystem, *, greeting: str) -> None:
        self.greeting = greeting
        super().__init__(actor_id, system)

    @handles(Greet)
    def greet(self, msg: Greet, turn: Turn) -> str:
        return f"{self.greeting}, {msg.name} (from {self.id})"


async def test_the_actor_system_builds_actors_with_their_dependencies() -> None:
    system = ActorSystem()
    system.register(GreeterActor, factory=functools.partial(GreeterActor, greeting="Hello"))
    try:
        assert await system.ref(GreeterActor, "g1").ask(Greet("Ann")) == "Hello, Ann (from g1)"
    finally:
        await system.stop()


async def test_the_cart_service_injects_its_expiry(tmp_path: Any, aiohttp_client: Any, test_identity: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    url = f"sqlite+aiosqlite:///{tmp_path / 'cart.db'}"
    await _migrate(url, cart_service.SCHEMA)
    app = cart_service.create_app(
        settings, database_url=url, verifier=test_identity.verifier(), catalog_url="http://127.0.0.1:9", cart_expiry=42
    )
    client = await aiohttp_client(app)
    system = client.app[AppKeyRuntime].system
    actor = system._factories["cart"]("c1", system)
    assert type(actor) is CartActor and actor.expiry_seconds == 42
    with pytest.raises(TypeError):
        cart_service.create_app(settings, database_url=url, no_such_option=1)


async def test_admin_endpoints_list_the_declared_actor_types(tmp_path: Any, aiohttp_client: Any) -> None:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_ADMIN_OPEN": "true"})
    url = f"sqlite+aiosqlite:///{tmp_path / 'cart.db'}"
    await _migrate(url, cart_service.SCHEMA)
    client = await aiohttp_client(cart_service.create_app(settings, database_url=url, catalog_url="http://127.0.0.1:9"))
    listing = await (await client.get("/api/cart/admin/actors")).json()
    assert list(listing["types"]) == ["cart"] and listing["types"]["cart"]["live"] == 0
    assert (await client.get("/api/cart/admin/actors/order/x")).status == 404


async def _migrate(url: str, schema: migrate.Component | None = None) -> None:
    from runtime.store import create_engine

    engine = create_engine(url)
    try:
        await migrate.upgrade(engine, [migrate.RUNTIME, *([schema] if schema else [])])
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------------
# `ecom bus provision` on a real RabbitMQ


@pytest.mark.rabbitmq
async def test_rabbitmq_provision_declares_exactly_the_plan() -> None:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"t{uuid.uuid4().hex[:10]}."
    plan = services.bus_plan()
    bus = RabbitBus(DEFAULT_URL, partitions=2, prefix=prefix, timeout=10.0)
    await bus.start()
    try:
        report = await bus.provision(plan.queues, plan.subscriptions)
        assert report == [
            f"queue catalog: 2 partitions + {prefix}catalog.dlq",
            f"queue order: 2 partitions + {prefix}order.dlq",
            f"exchange {prefix}ecom-events: declared",
            "subscription cart: 2 partitions bound to OrderStarted, ProductPriceChanged",
        ]
        assert await bus.provision(plan.queues, plan.subscriptions) == report  # idempotent
        expected = {f"{prefix}{base}.{part}" for base in ("catalog", "order", "cart.events") for part in ("p0", "p1")}
        expected |= {f"{prefix}catalog.dlq", f"{prefix}order.dlq", f"{prefix}cart.events.dlq"}
        assert bus.declared_queues == expected
        connection = await aiormq.connect(DEFAULT_URL)
        try:
            for name in sorted(expected):  # each exists on the broker (a passive declare fails otherwise)
                channel = await connection.channel()
                await channel.queue_declare(name, passive=True)
                await channel.close()
            for absent in (f"{prefix}identity.p0", f"{prefix}cart.p0"):  # nothing the services do not consume
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.queue_declare(absent, passive=True)
            # the bindings hold: a published OrderStarted lands in the cart subscription, nowhere else
            from runtime.messages import envelope

            await bus.publish(envelope(contracts.OrderStarted("o1", "b1", "c1"), session_id="o1"))
            channel = await connection.channel()
            counts = {}
            for name in sorted(expected):
                for _ in range(50):
                    declared = await channel.queue_declare(name, passive=True)
                    if declared.message_count or not name.startswith(f"{prefix}cart.events.p"):
                        break
                    await asyncio.sleep(0.02)
                counts[name] = declared.message_count
            await channel.close()
            holding = [name for name, count in counts.items() if count]
            assert len(holding) == 1 and counts[holding[0]] == 1
            assert holding[0].startswith(f"{prefix}cart.events.p")
        finally:
            await connection.close()
    finally:
        await bus.close()
        connection = await aiormq.connect(DEFAULT_URL)
        try:
            channel = await connection.channel()
            for name in sorted(bus.declared_queues):
                with suppress(Exception):
                    await channel.queue_delete(name)
            with suppress(Exception):
                await channel.exchange_delete(f"{prefix}ecom-events")
        finally:
            await connection.close()


@pytest.mark.rabbitmq
async def test_ecom_bus_provision_creates_the_plan_in_its_own_vhost(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command as an operator runs it, on a vhost of its own: every queue in it afterwards is one the plan
    names (partitions and dead-letter queues), and nothing else."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (needed to give the test its own RabbitMQ vhost)")
    vhost = f"provision-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        monkeypatch.setenv("ECOM_BUS", "rabbitmq")
        monkeypatch.setenv("ECOM_BUS_URL", f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        # `ecom` runs its own event loop, so off this test's loop
        assert await asyncio.to_thread(main, ["bus", "provision"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert (
            out[0] == "queue catalog: 8 partitions + catalog.dlq" and out[1] == "queue order: 8 partitions + order.dlq"
        )
        listed = await asyncio.to_thread(
            rabbitmqctl, "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name"
        )
        names = {line.strip() for line in listed.splitlines() if line.strip()}
        bases = ("catalog", "order", "cart.events")
        assert names == {f"{b}.p{k}" for b in bases for k in range(8)} | {f"{b}.dlq" for b in bases}
    finally:
        with suppress(Exception):
            await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)
