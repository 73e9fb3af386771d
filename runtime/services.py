"""The registry of services: which exist, and what their descriptions say, for the readers that need all of them.

Every service package has a ``service.py`` declaring ``SERVICE`` (a :class:`runtime.description.ServiceDescription`)
and ``create_app(settings, **overrides)``, and, when it is reached through the gateway, a light ``public.py``
with its ``ROUTES`` (entries of the gateway's route table, importable without the service's code).

Readers: ``ecom run`` / ``ecom serve`` / ``ecom db`` (:func:`available`: app, schema, seed), ``ecom bus
provision`` (:func:`bus_plan`: exactly the queues and subscriptions the services consume), the gateway's route
table (:func:`gateway_routes`). A service "exists" once its module imports; ``ecom run`` starts all that exist,
in this order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from config import Settings
from runtime import migrate
from runtime.description import ServiceDescription
from runtime.store import create_engine

if TYPE_CHECKING:
    from runtime.routes import Route

SERVICE_PACKAGES: dict[str, str] = {
    "identity": "identity",
    "catalog": "actors.catalog",
    "cart": "actors.cart",
    "order": "actors.order",
    "gateway": "gateway",
}

SERVICE_MODULES: dict[str, str] = {name: f"{package}.service" for name, package in SERVICE_PACKAGES.items()}


@dataclass(frozen=True, slots=True)
class ServiceModule:
    name: str
    module: ModuleType

    @property
    def description(self) -> ServiceDescription:
        described: ServiceDescription = self.module.SERVICE
        return described

    def create_app(self, settings: Settings, **kwargs: Any) -> Any:
        return self.module.create_app(settings, **kwargs)

    @property
    def schema(self) -> migrate.Component | None:
        return self.description.schema

    async def seed(self, settings: Settings) -> None:
        if self.description.seed is not None:
            await self.description.seed(settings)


def _import(module_name: str) -> ModuleType | None:
    """The module, or None when it is not built (yet); an import error inside it still raises."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def load(name: str) -> ServiceModule | None:
    """The service's module, or None when that service is not built yet."""
    module = _import(SERVICE_MODULES[name])
    return ServiceModule(name, module) if module is not None else None


def available() -> list[ServiceModule]:
    return [m for m in (load(name) for name in SERVICE_MODULES) if m is not None]


def descriptions() -> list[ServiceDescription]:
    return [m.description for m in available()]


async def upgrade_database(settings: Settings, service: ServiceModule) -> dict[str, tuple[int, int]] | None:
    """Create or migrate the service's database to the newest schema."""
    if service.schema is None:
        return None
    engine = create_engine(settings.database_url(service.name))
    try:
        return await migrate.upgrade(engine, [migrate.RUNTIME, service.schema])
    finally:
        await engine.dispose()


# -- the gateway's route table -------------------------------------------------------------------------


def gateway_routes() -> tuple[Route, ...]:
    """Every service's gateway entries (its ``public.py``), in service order. Imports no service code, so the
    gateway starts without loading the services it routes to."""
    routes: list[Route] = []
    for package in SERVICE_PACKAGES.values():
        module = _import(f"{package}.public")
        if module is not None:
            routes.extend(module.ROUTES)
    return tuple(routes)


# -- the bus ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BusPlan:
    """What the services' descriptions need on the bus: the queues they consume, the subscriptions they take
    (each with its event types, sorted) and whether anything is published (the events topic/exchange)."""

    queues: tuple[str, ...]
    subscriptions: dict[str, tuple[str, ...]]
    topic: bool

    def lines(self) -> list[str]:
        """The plan, one line per entity (``ecom bus provision --dry-run``)."""
        out = [f"queue {name}" for name in self.queues]
        if self.topic:
            out.append("topic (events)")
        out += [f"subscription {name}: {', '.join(types)}" for name, types in self.subscriptions.items()]
        return out


def bus_plan(described: list[ServiceDescription] | None = None) -> BusPlan:
    """The plan of the given descriptions (default: every service's). Two services consuming one queue or one
    subscription name is a mistake in a description, reported here rather than provisioned."""
    described = descriptions() if described is None else described
    queues: dict[str, str] = {}
    subscriptions: dict[str, tuple[str, ...]] = {}
    owners: dict[str, str] = {}
    topic = False
    for d in described:
        for queue in d.queues:
            if queue.name in queues:
                raise ValueError(f"queue {queue.name!r} is consumed by {queues[queue.name]} and {d.name}")
            queues[queue.name] = d.name
        for sub in d.subscriptions:
            if sub.name in subscriptions:
                raise ValueError(f"subscription {sub.name!r} is declared by {owners[sub.name]} and {d.name}")
            subscriptions[sub.name], owners[sub.name] = sub.types, d.name
            topic = True
        topic = topic or bool(d.publishes)
    return BusPlan(tuple(queues), subscriptions, topic)
