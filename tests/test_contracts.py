"""The bus contracts (``contracts``): one home for the messages that cross services and for their queue and
subscription names.

* every cross-service message class is defined once, in ``contracts``, and the services use that very class;
* every queue or subscription a service sends to, consumes or subscribes to is named by a ``contracts.queues``
  constant, never a literal or a local copy;
* what ``ecom bus provision`` creates (``contracts.queues.SUBSCRIPTIONS``) is what the services, started on a
  bus, actually subscribe to; and each queue's consumer takes every contract message sent to that queue.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

import contracts
from actors.cart import service as cart_service
from actors.catalog import service as catalog_service
from actors.order import service as order_service
from bus import MemoryBus
from config import load_settings
from contracts import queues
from runtime.migrate import RUNTIME, upgrade
from runtime.services import bus_plan
from runtime.store import create_engine

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("actors", "bench", "bus", "config", "contracts", "gateway", "identity", "runtime")
PRODUCER_PACKAGES = ("actors", "identity", "gateway")  # code that sends, consumes or subscribes by name

# What travels inside a contract message (CheckoutRequested's parts) is part of the contract too.
PARTS = (contracts.Address, contracts.CheckoutLine, contracts.PaymentDetails)
CONTRACT_CLASSES = (*contracts.MESSAGES, *PARTS)


def _sources(packages: Collection[str]) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# ---------------------------------------------------------------------------------------------------
# Messages: defined once


def test_every_contract_message_is_a_frozen_dataclass_of_contracts() -> None:
    for cls in CONTRACT_CLASSES:
        assert cls.__module__.startswith("contracts."), cls
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
    names = [cls.__name__ for cls in contracts.MESSAGES]
    assert len(names) == len(set(names)), "two contract messages share an envelope type"


def test_each_contract_class_is_defined_only_in_contracts() -> None:
    wanted = {cls.__name__: cls.__module__ for cls in CONTRACT_CLASSES}
    definitions: dict[str, list[str]] = {}
    for path in _sources(SOURCE_PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name in wanted:
                definitions.setdefault(node.name, []).append(_module_name(path))
    assert definitions == {name: [module] for name, module in wanted.items()}


@pytest.mark.parametrize(
    "module",
    ["actors.cart.messages", "actors.order.messages", "actors.catalog.messages", "runtime.revocation"],
)
def test_older_import_paths_give_the_contract_class_itself(module: str) -> None:
    mod = importlib.import_module(module)
    for cls in CONTRACT_CLASSES:
        if hasattr(mod, cls.__name__):
            assert getattr(mod, cls.__name__) is cls, f"{module}.{cls.__name__} is a copy"


# runtime.revocation (the announcements' sender and listener) re-exports identity's events for identity's code.
ALSO_FROM = {cls.__name__: "runtime.revocation" for cls in (contracts.SigningKeyRevoked, contracts.AccessRevoked)}


def test_services_import_contract_messages_from_contracts() -> None:
    """Producers and consumers name the contract classes through ``contracts``, not through another service."""
    names = {cls.__name__ for cls in CONTRACT_CLASSES}
    wrong: list[str] = []
    for path in _sources(PRODUCER_PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("contracts"):
                wrong += [
                    f"{_module_name(path)}: {a.name} from {node.module}"
                    for a in node.names
                    if a.name in names and ALSO_FROM.get(a.name) != node.module
                ]
    assert wrong == []


# ---------------------------------------------------------------------------------------------------
# Queue and subscription names


BUS_CALLS = {"send": "queue", "consume": "queue", "subscribe": "subscription"}
# what a service description declares it consumes (runtime.description): the same names
DECLARED = {"Queue": "queue", "Subscription": "subscription"}
BUS_CALLS.update(DECLARED)


def _bus_calls(path: Path) -> list[tuple[str, ast.expr]]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.func.attr, node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in BUS_CALLS
        and node.args
        and isinstance(node.func.value, ast.Name | ast.Attribute)
        and (
            getattr(node.func.value, "id", None) == "turn"
            or getattr(node.func.value, "attr", getattr(node.func.value, "id", "")) == "bus"
        )
    ] + [
        (node.func.id, node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in DECLARED and node.args
    ]


def _names_from_contracts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("contracts", "contracts.queues")
        for alias in node.names
    }


def test_every_queue_a_service_uses_is_named_in_contracts() -> None:
    known = {"queue": set(queues.QUEUES), "subscription": set(queues.SUBSCRIPTIONS)}
    seen: dict[str, set[str]] = {"queue": set(), "subscription": set()}
    for path in _sources(PRODUCER_PACKAGES):
        calls = _bus_calls(path)
        if not calls:
            continue
        module = importlib.import_module(_module_name(path))
        imported = _names_from_contracts(path)
        for method, arg in calls:
            where = f"{_module_name(path)}: {method}({ast.unparse(arg)}, ...)"
            assert isinstance(arg, ast.Name), f"{where}: name the queue with a contracts.queues constant"
            assert arg.id in imported, f"{where}: {arg.id} is not imported from contracts.queues"
            value = getattr(module, arg.id)
            assert value in known[BUS_CALLS[method]], f"{where}: {value!r} is not a {BUS_CALLS[method]} of contracts"
            seen[BUS_CALLS[method]].add(value)
    # the scan did find the services' calls (a rename of ``turn``/``bus`` would make it vacuous)
    assert seen == known


def test_queue_names_are_spelled_once() -> None:
    """No other module (but the bus's own docs) spells a contract queue name as a constant of its own."""
    values = set(queues.QUEUES) | set(queues.SUBSCRIPTIONS)
    copies: list[str] = []
    for path in _sources(("actors", "identity", "gateway", "runtime")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and node.value.value in values
                and any(isinstance(t, ast.Name) and t.id.endswith(("_QUEUE", "_SUBSCRIPTION")) for t in node.targets)
            ):
                copies.append(f"{_module_name(path)}: {ast.unparse(node)}")
    assert copies == []


def test_subscriptions_name_contract_events() -> None:
    events = {cls.__name__ for cls in contracts.MESSAGES}
    for name, types in queues.SUBSCRIPTIONS.items():
        assert types and set(types) <= events, name
        assert list(types) == sorted(set(types)), name


def test_provisioning_reads_the_contract_subscriptions() -> None:
    plan = bus_plan()
    assert {name: sorted(types) for name, types in plan.subscriptions.items() if types} == {
        name: sorted(types) for name, types in queues.SUBSCRIPTIONS.items()
    }


# ---------------------------------------------------------------------------------------------------
# What the services really do on a bus


class RecordingBus(MemoryBus):
    """A memory bus that remembers every consume/subscribe: (queue or subscription, handler types)."""

    def __init__(self) -> None:
        super().__init__()
        self.consumed: dict[str, set[str]] = {}
        self.subscribed: dict[str, set[str]] = {}
        self.broadcasts: list[set[str]] = []  # per-process subscriptions made at run time, not provisioned
        self._broadcasting = False

    async def consume(self, queue: str, handler: Any, **kwargs: Any) -> Any:
        self.consumed.setdefault(queue, set()).update(getattr(handler, "types", ()))
        return await super().consume(queue, handler, **kwargs)

    async def subscribe(self, subscription: str, event_types: Collection[str], handler: Any, **kwargs: Any) -> Any:
        if self._broadcasting:
            self.broadcasts.append(set(event_types))
        else:
            self.subscribed.setdefault(subscription, set()).update(event_types)
        return await super().subscribe(subscription, event_types, handler, **kwargs)

    async def broadcast(self, event_types: Collection[str], handler: Any) -> Any:
        self._broadcasting = True
        try:
            return await super().broadcast(event_types, handler)
        finally:
            self._broadcasting = False


@pytest.fixture
async def services_on_a_bus(tmp_path, aiohttp_client, test_identity) -> RecordingBus:
    """The cart, order and catalog services started on one recording bus, as ``ecom run`` starts them."""
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    bus = RecordingBus()
    await bus.start()
    nowhere = "http://127.0.0.1:9"  # the cart's upstreams are not called while starting
    factories = {
        "cart": lambda url: cart_service.create_app(
            settings,
            bus=bus,
            database_url=url,
            verifier=test_identity.verifier(),
            catalog_url=nowhere,
            order_url=nowhere,
        ),
        "order": lambda url: order_service.create_app(
            settings, bus=bus, database_url=url, verifier=test_identity.verifier()
        ),
        "catalog": lambda url: catalog_service.create_app(
            settings, bus=bus, database_url=url, verifier=test_identity.verifier()
        ),
    }
    schemas = {"cart": cart_service.SCHEMA, "order": order_service.SCHEMA, "catalog": catalog_service.SCHEMA}
    try:
        for name, factory in factories.items():
            url = f"sqlite+aiosqlite:///{tmp_path / name}.db"
            engine = create_engine(url)
            try:
                await upgrade(engine, [RUNTIME, schemas[name]])
            finally:
                await engine.dispose()
            await aiohttp_client(factory(url))
        yield bus
    finally:
        await bus.close()


async def test_services_subscribe_to_exactly_what_provisioning_creates(services_on_a_bus: RecordingBus) -> None:
    assert services_on_a_bus.subscribed == {name: set(types) for name, types in queues.SUBSCRIPTIONS.items()}
    # every process also hears identity's announcements, on a broadcast subscription of its own
    announcements = {cls.__name__ for cls in contracts.identity.ANNOUNCEMENTS}
    assert services_on_a_bus.broadcasts and all(types == announcements for types in services_on_a_bus.broadcasts)


async def test_every_contract_queue_has_a_consumer_for_what_is_sent_to_it(services_on_a_bus: RecordingBus) -> None:
    consumed = services_on_a_bus.consumed
    assert set(consumed) == set(queues.QUEUES)
    # the contract messages sent to each queue (contracts.stock / contracts.checkout say where they go)
    sent_to = {
        queues.ORDER_QUEUE: {contracts.CheckoutRequested, contracts.StockReserved, contracts.StockRejected},
        queues.CATALOG_QUEUE: {contracts.ReserveStock, contracts.ReleaseStock, contracts.CommitReservation},
    }
    for queue, classes in sent_to.items():
        assert {cls.__name__ for cls in classes} <= consumed[queue], queue
