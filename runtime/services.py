"""The registry of services: which exist, how to build each one, and which schema each database carries.

Every service package has a ``service.py`` with:

- ``create_app(settings: Settings, *, bus: Bus | None = None) -> web.Application``
- ``SCHEMA: runtime.migrate.Component`` (its own tables; the runtime's are added here), or ``None``
  for a service without a database (the gateway),
- optionally ``async def seed(settings) -> None``: first-run data (demo catalog, admin user), idempotent.

A service "exists" once its module imports; ``ecom run`` starts all that exist, in this order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from config import Settings
from runtime import migrate
from runtime.store import create_engine

SERVICE_MODULES: dict[str, str] = {
    "identity": "identity.service",
    "catalog": "actors.catalog.service",
    "cart": "actors.cart.service",
    "order": "actors.order.service",
    "gateway": "gateway.service",
}


@dataclass(frozen=True, slots=True)
class ServiceModule:
    name: str
    module: ModuleType

    def create_app(self, settings: Settings, **kwargs: Any) -> Any:
        return self.module.create_app(settings, **kwargs)

    @property
    def schema(self) -> migrate.Component | None:
        return getattr(self.module, "SCHEMA", None)

    async def seed(self, settings: Settings) -> None:
        seed = getattr(self.module, "seed", None)
        if seed is not None:
            await seed(settings)


def load(name: str) -> ServiceModule | None:
    """The service's module, or None when that service is not built yet."""
    try:
        module = importlib.import_module(SERVICE_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name and SERVICE_MODULES[name].startswith(exc.name):
            return None
        raise
    return ServiceModule(name, module)


def available() -> list[ServiceModule]:
    return [m for m in (load(name) for name in SERVICE_MODULES) if m is not None]


async def upgrade_database(settings: Settings, service: ServiceModule) -> dict[str, tuple[int, int]] | None:
    """Create or migrate the service's database to the newest schema."""
    if service.schema is None:
        return None
    engine = create_engine(settings.database_url(service.name))
    try:
        return await migrate.upgrade(engine, [migrate.RUNTIME, service.schema])
    finally:
        await engine.dispose()
