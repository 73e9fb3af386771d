"""The order service's query table: one summary row per order, for the buyer's paged list.

An order's full record (lines, address, history) lives in its actor state. ``orders`` answers what the state
cannot: "the orders of buyer X, newest first". The OrderActor keeps its row in step inside the same transaction
as its state (``turn.on_commit``), so the list never shows a status the order does not have, and listing never
wakes an actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runtime.store import BatchedHook, SqlHook, as_utc, execute, outbox

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("id", String(64), primary_key=True),  # = actor id
    Column("buyer_id", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("total", Numeric(12, 2), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The buyer's list, newest first, is an index range scan; the admin's list (all buyers) uses the second.
    Index("ix_orders_buyer_created", "buyer_id", "created_at", "id"),
    Index("ix_orders_created", "created_at", "id"),
)

TABLES = (orders,)  # created by migration 1 exactly as declared; later steps change the schema themselves

# The payment simulator's own records (see actors.order.payment.SimulatedPaymentProvider). It lives in the order
# service's database the way a real provider keeps its idempotency keys on its side: durable, outliving any process
# of ours, so a charge retried after a crash finds the first attempt. Not part of the order's own data: nothing in
# the saga reads it. Created by migration 2.
payment_simulator_charges = Table(
    "payment_simulator_charges",
    metadata,
    Column("idempotency_key", String(64), primary_key=True),  # = the order id
    Column("order_id", String(64), nullable=False),
    Column("amount", String(32), nullable=True),  # decimal string; empty (NULL) for a key voided before any charge
    Column("currency", String(3), nullable=True),
    Column("status", String(16), nullable=False),  # pending | approved | declined | refunded
    Column("charge_id", String(64), nullable=False, default=""),  # the provider's id of an approved charge
    Column("decline_code", String(64), nullable=False, default=""),  # e.g. card_declined, voided
    Column("message", String(255), nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=1),  # charge calls received with this key, by any process
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Migration 3: the admission endpoint counts the orders still in the saga; an index on the status makes that a
# range scan over the (few) open orders instead of a scan of every order ever placed.
STATUS_INDEX = "ix_orders_status"


async def messages_on_their_way(engine: AsyncEngine, message_ids: Sequence[str], *, sent_after: datetime) -> set[str]:
    """Which of these outbox messages are still unsent (queued here) or were sent after ``sent_after``. One indexed
    lookup (``outbox.message_id`` is unique); a message not found was sent long ago (purged) or never existed."""
    if not message_ids:
        return set()
    stmt = select(outbox.c.message_id).where(
        outbox.c.message_id.in_(list(message_ids)),
        or_(outbox.c.sent_at.is_(None), outbox.c.sent_at > sent_after),
    )
    async with engine.connect() as conn:
        return {row.message_id for row in await conn.execute(stmt)}


@dataclass(frozen=True, slots=True)
class OrderSummary:
    id: str
    buyer_id: str
    status: str
    total: Decimal
    currency: str
    created_at: datetime
    updated_at: datetime

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "buyer_id": self.buyer_id,
            "status": self.status,
            "total": self.total,
            "currency": self.currency,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


# Built once: every status change of every order runs one of these (SQLAlchemy then reuses the compiled form).
_INSERT_SUMMARY = insert(orders)
_UPDATE_SUMMARY = (
    update(orders)
    .where(orders.c.id == bindparam("order_id"))
    .values(
        status=bindparam("status"),
        total=bindparam("total"),
        currency=bindparam("currency"),
        updated_at=bindparam("updated_at"),
    )
)


def _upsert(insert_of: Any) -> Any:
    statement = insert_of(orders)
    changing = ("status", "total", "currency", "updated_at")
    return statement.on_conflict_do_update(
        index_elements=[orders.c.id], set_={name: statement.excluded[name] for name in changing}
    )


# One statement writes the summaries of a transaction's turns, new orders and changed ones alike; a row lost to a
# manual edit is written again. Where the dialect has no ON CONFLICT (SQL Server): inserts, then updates.
_UPSERT_SUMMARY = {"sqlite": _upsert(sqlite.insert), "postgresql": _upsert(postgresql.insert)}


def save_summary(summary: OrderSummary, *, new: bool) -> SqlHook:
    """A hook for ``turn.on_commit``: insert the row of a ``new`` order, update it afterwards. The summaries of a
    transaction's turns are written together (a :class:`~runtime.store.BatchedHook`: one statement for a group
    commit, instead of one per turn). An update that finds no row (a row lost to a manual edit) inserts it, so the
    table heals instead of failing the turn."""
    return BatchedHook(_write_summaries, (summary.row(), new))


async def _write_summaries(conn: AsyncConnection, items: list[tuple[dict[str, Any], bool]]) -> None:
    upsert = _UPSERT_SUMMARY.get(conn.dialect.name)
    if upsert is not None:
        await execute(conn, upsert, [row for row, _ in items])
        return
    created = [row for row, new in items if new]
    if created:
        await conn.execute(_INSERT_SUMMARY, created)
    changed = [row for row, new in items if not new]
    if changed:
        await _update_summaries(conn, changed)


async def _update_summaries(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    changes = [
        {
            "order_id": row["id"],
            "status": row["status"],
            "total": row["total"],
            "currency": row["currency"],
            "updated_at": row["updated_at"],
        }
        for row in rows
    ]
    result = await conn.execute(_UPDATE_SUMMARY, changes[0] if len(changes) == 1 else changes)
    counted = len(changes) == 1 or conn.dialect.supports_sane_multi_rowcount
    if counted and result.rowcount == len(changes):
        return  # every row was there: the usual case, one statement
    # Some row is missing (or this driver does not count the rows of an executemany): find which, insert those.
    ids = [row["id"] for row in rows]
    found = set((await conn.execute(select(orders.c.id).where(orders.c.id.in_(ids)))).scalars())
    missing = [row for row in rows if row["id"] not in found]
    if missing:
        await conn.execute(_INSERT_SUMMARY, missing)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[OrderSummary]
    total: int


def _page_query(*, of_buyer: bool) -> tuple[Any, Any]:
    where = [orders.c.buyer_id == bindparam("buyer_id")] if of_buyer else []
    page = (
        select(orders)
        .where(*where)
        .order_by(orders.c.created_at.desc(), orders.c.id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return page, select(func.count()).select_from(orders).where(*where)


# Built once, like the statements above: building them cost more than running them (GET /api/orders).
_BUYER_PAGE, _BUYER_COUNT = _page_query(of_buyer=True)
_ALL_PAGE, _ALL_COUNT = _page_query(of_buyer=False)


async def list_orders(engine: AsyncEngine, *, buyer_id: str | None, page: int, page_size: int) -> Page:
    """One page of orders, newest first: the buyer's, or everybody's when ``buyer_id`` is None (admins)."""
    paging = {"limit": page_size, "offset": (page - 1) * page_size}
    async with engine.connect() as conn:
        if buyer_id is None:
            rows = (await conn.execute(_ALL_PAGE, paging)).all()
            total = (await conn.execute(_ALL_COUNT)).scalar_one()
        else:
            rows = (await conn.execute(_BUYER_PAGE, {**paging, "buyer_id": buyer_id})).all()
            total = (await conn.execute(_BUYER_COUNT, {"buyer_id": buyer_id})).scalar_one()
    return Page([_summary(row) for row in rows], total)


@dataclass(frozen=True, slots=True)
class SagaLoad:
    open_orders: int  # orders still in the saga: submitted, awaiting_validation, stock_confirmed
    outbox_backlog: int  # messages committed here and not yet handed to the bus


async def saga_load(engine: AsyncEngine, open_statuses: Sequence[str]) -> SagaLoad:
    """Two indexed counts (``ix_orders_status``, ``ix_outbox_unsent``): cheap however many orders were ever placed,
    as long as few are open and few messages wait, which is what admission control keeps true."""
    open_orders = select(func.count()).select_from(orders).where(orders.c.status.in_(list(open_statuses)))
    backlog = select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
    async with engine.connect() as conn:
        return SagaLoad((await conn.execute(open_orders)).scalar_one(), (await conn.execute(backlog)).scalar_one())


async def count_by_status(engine: AsyncEngine) -> dict[str, int]:
    """How many orders are in each status (for tests, the benchmark and operators)."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(orders.c.status, func.count()).group_by(orders.c.status))
        return dict(rows.tuples().all())


def _summary(row: Any) -> OrderSummary:
    return OrderSummary(
        id=row.id,
        buyer_id=row.buyer_id,
        status=row.status,
        total=Decimal(row.total),
        currency=row.currency,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )
