"""Schema creation and migration, run by ``ecom db upgrade`` (and by ``make run`` before start).

Each database holds several *components*: the runtime tables of :mod:`runtime.store` plus one service's
own tables. A component is an ordered list of :class:`Migration` steps; ``schema_version`` records the
last step applied per component. Steps receive alembic's :class:`~alembic.operations.Operations`, so
later steps write portable DDL (``op.add_column``, ``op.create_index``) that works on SQLite (through
alembic's batch mode), PostgreSQL and SQL Server alike.

Why not alembic's script directory and ``env.py``: a service database carries the shared runtime
component next to its own, each with its own history, and services are started in-process by tests and
``ecom run`` many times a second; a list of steps in code is simpler to ship and to call from both places,
while alembic still does the DDL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Table, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runtime import audit, store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    upgrade: Callable[[Operations, Connection], None]


def create_tables(*tables: Table) -> Callable[[Operations, Connection], None]:
    """A first migration step: create these tables (and their indexes) as declared in code."""

    def step(_op: Operations, conn: Connection) -> None:
        tables[0].metadata.create_all(conn, tables=list(tables))

    return step


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    migrations: Sequence[Migration]

    @property
    def head(self) -> int:
        return max((m.version for m in self.migrations), default=0)


RUNTIME = Component(
    "runtime",
    [
        Migration(
            1,
            "actor state, outbox, inbox, reminders",
            create_tables(store.actor_state, store.outbox, store.inbox, store.reminders),
        ),
        Migration(2, "cluster membership", create_tables(store.cluster_members)),
        Migration(3, "audit log of admin actions", create_tables(audit.audit_log)),
    ],
)


def _upgrade_sync(conn: Connection, components: Sequence[Component]) -> dict[str, tuple[int, int]]:
    store.schema_version.create(conn, checkfirst=True)
    op = Operations(MigrationContext.configure(conn))
    done: dict[str, tuple[int, int]] = {}
    for component in components:
        row = conn.execute(
            select(store.schema_version.c.version).where(store.schema_version.c.component == component.name)
        ).first()
        current = row.version if row else 0
        start = current
        for migration in sorted(component.migrations, key=lambda m: m.version):
            if migration.version <= current:
                continue
            log.info("migrating %s to %d: %s", component.name, migration.version, migration.description)
            migration.upgrade(op, conn)
            values = {"version": migration.version, "applied_at": store.utcnow()}
            if current == 0 and row is None:
                conn.execute(insert(store.schema_version).values(component=component.name, **values))
                row = True  # type: ignore[assignment]  # from here on only "a row exists" matters
            else:
                conn.execute(
                    update(store.schema_version)
                    .where(store.schema_version.c.component == component.name)
                    .values(**values)
                )
            current = migration.version
        done[component.name] = (start, current)
    return done


async def upgrade(engine: AsyncEngine, components: Sequence[Component]) -> dict[str, tuple[int, int]]:
    """Bring every component to its head in one transaction; returns {component: (from, to)}."""
    async with engine.begin() as conn:
        return await conn.run_sync(_upgrade_sync, components)


async def current_versions(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        has_table = await conn.run_sync(lambda c: inspect(c).has_table(store.schema_version.name))
        if not has_table:
            return {}
        rows = await conn.execute(select(store.schema_version.c.component, store.schema_version.c.version))
        return {r.component: r.version for r in rows}
