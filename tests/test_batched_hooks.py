"""Query-table hooks written once per transaction (``runtime.store.BatchedHook``, issue 14).

A group commit of k turns that each change a product's stock or an order's summary writes those rows in one
statement per kind, not k; the rows are the same as turn by turn, a refused turn adds nothing, and an order's
summary row lost to a manual edit is written again. Runs on a SQLite file and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import delete, event, select
from sqlalchemy.dialects import mssql

from actors.catalog import repository as catalog_repo
from actors.catalog import service as catalog_service
from actors.order import repository as order_repo
from actors.order import service as order_service
from runtime import migrate
from runtime.store import BatchedHook, CommitOutcome, StateStore, TurnWrite, create_engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _Statements:
    """Counts the statements the engine sends, by their first three words."""

    def __init__(self, store: StateStore) -> None:
        self.counts: Counter[str] = Counter()
        self._engine = store.engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.counts[" ".join(statement.split()[:3]).upper()] += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


def _write(actor_id: str, version: int, *hooks: Any) -> TurnWrite:
    return TurnWrite("t", actor_id, version, orjson.dumps({"v": version + 1}).decode(), hooks=list(hooks))


async def test_a_batched_hook_runs_once_per_transaction_with_the_accepted_turns_items(store_factory):
    store = await store_factory(group_commit=True)
    calls: list[list[str]] = []

    async def run(_conn: Any, items: list[str]) -> None:
        calls.append(list(items))

    for i in range(6):
        assert await store.commit(_write(f"a{i}", 0, BatchedHook(run, f"first-{i}"))) == CommitOutcome.OK
    assert calls == [[f"first-{i}"] for i in range(6)], "a turn committed alone runs its own item"

    assert await store.commit(_write("a5", 1)) == CommitOutcome.OK  # a5 moves on to version 2
    calls.clear()
    # a5's turn below started from version 1 (another process wrote since): it is refused, its item not written.
    writes = [_write(f"a{i}", 1, BatchedHook(run, f"second-{i}")) for i in range(5)]
    writes.append(_write("a5", 1, BatchedHook(run, "stale")))
    outcomes = await asyncio.gather(*(store.commit(w) for w in writes))
    assert outcomes == [CommitOutcome.OK] * 5 + [CommitOutcome.CONFLICT]
    assert sorted(item for call in calls for item in call) == [f"second-{i}" for i in range(5)]
    assert len(calls) < 5, "the turns committed together shared a call"


async def _catalog_store(store_factory) -> StateStore:
    store = await store_factory(group_commit=True)
    await migrate.upgrade(store.engine, [catalog_service.SCHEMA])
    async with store.engine.begin() as conn:
        brand = (await catalog_repo.ensure_named(conn, catalog_repo.brands, ["B"]))["B"]
        kind = (await catalog_repo.ensure_named(conn, catalog_repo.product_types, ["K"]))["K"]
    for i in range(8):
        row = _product(f"p{i}", brand, kind, stock=100)
        assert await store.commit(_write(f"p{i}", 0, catalog_repo.insert_product(row))) == CommitOutcome.OK
    return store


def _product(pid: str, brand: str, kind: str, *, stock: int, at: datetime = T0) -> dict[str, Any]:
    return {
        "id": pid,
        "name": f"Product {pid}",
        "description": "a thing",
        "price": Decimal("9.99"),
        "currency": "USD",
        "brand_id": brand,
        "type_id": kind,
        "picture_url": None,
        "available_stock": stock,
        "restock_threshold": 1,
        "max_stock": 1000,
        "created_at": T0,
        "updated_at": at,
    }


async def test_stock_changes_of_a_group_commit_are_one_update_and_one_change_log_insert(store_factory):
    store = await _catalog_store(store_factory)
    async with store.engine.connect() as conn:
        products = {r.id: r for r in await conn.execute(select(catalog_repo.products))}
        since = (await conn.execute(select(catalog_repo.catalog_version.c.version))).scalar_one()
    later = datetime(2026, 1, 2, tzinfo=UTC)
    writes = []
    for i in range(8):
        before = _product(f"p{i}", products[f"p{i}"].brand_id, products[f"p{i}"].type_id, stock=100)
        after = {**before, "available_stock": 100 - i - 1, "updated_at": later}
        hook = catalog_repo.update_product(before, after)
        assert isinstance(hook, BatchedHook), "a stock-only change is batched"
        writes.append(_write(f"p{i}", 1, hook))
    statements = _Statements(store)
    try:
        assert await asyncio.gather(*(store.commit(w) for w in writes)) == [CommitOutcome.OK] * 8
    finally:
        statements.close()
    assert store.commits >= 1
    per_commit = statements.counts
    assert per_commit["UPDATE PRODUCTS SET"] <= store.commits and per_commit["UPDATE PRODUCTS SET"] < 8
    assert per_commit["INSERT INTO CATALOG_CHANGES"] < 8

    async with store.engine.connect() as conn:
        result = await conn.execute(select(catalog_repo.products.c.id, catalog_repo.products.c.available_stock))
        stock = {r.id: r.available_stock for r in result}
        logged = (
            await conn.execute(
                select(catalog_repo.catalog_changes.c.product_id).where(catalog_repo.catalog_changes.c.version > since)
            )
        ).scalars()
        changed = sorted(logged)
    assert stock == {f"p{i}": 100 - i - 1 for i in range(8)}
    assert changed == [f"p{i}" for i in range(8)], "every changed product logged once, for the read model"


def _summary(order_id: str, status: str, total: str = "10.00") -> order_repo.OrderSummary:
    return order_repo.OrderSummary(order_id, "buyer", status, Decimal(total), "USD", T0, T0)


async def test_order_summaries_of_a_group_commit_are_one_statement_and_lost_rows_come_back(store_factory):
    store = await store_factory(group_commit=True)
    await migrate.upgrade(store.engine, [order_service.SCHEMA])
    for i in range(6):
        hook = order_repo.save_summary(_summary(f"o{i}", "submitted"), new=True)
        assert await store.commit(_write(f"o{i}", 0, hook)) == CommitOutcome.OK
    async with store.engine.begin() as conn:
        await conn.execute(delete(order_repo.orders).where(order_repo.orders.c.id.in_(["o0", "o3"])))  # a manual edit

    writes = [
        _write(f"o{i}", 1, order_repo.save_summary(_summary(f"o{i}", "paid", "9.50"), new=False)) for i in range(6)
    ]
    statements = _Statements(store)
    try:
        assert await asyncio.gather(*(store.commit(w) for w in writes)) == [CommitOutcome.OK] * 6
    finally:
        statements.close()
    assert statements.counts["INSERT INTO ORDERS"] + statements.counts["UPDATE ORDERS SET"] < 6
    async with store.engine.connect() as conn:
        rows = {r.id: (r.status, Decimal(r.total)) for r in await conn.execute(select(order_repo.orders))}
    assert rows == {f"o{i}": ("paid", Decimal("9.50")) for i in range(6)}, "updated, and the lost rows written again"

    # Alone (one turn, one row): the update that finds no row inserts it.
    async with store.engine.begin() as conn:
        await conn.execute(delete(order_repo.orders).where(order_repo.orders.c.id == "o1"))
    hook = order_repo.save_summary(_summary("o1", "shipped", "9.50"), new=False)
    assert await store.commit(_write("o1", 2, hook)) == CommitOutcome.OK
    async with store.engine.connect() as conn:
        assert (
            await conn.execute(select(order_repo.orders.c.status).where(order_repo.orders.c.id == "o1"))
        ).scalar_one() == "shipped"


async def test_new_and_changed_summaries_of_a_group_commit_are_one_statement(store_factory):
    store = await store_factory(group_commit=True)
    await migrate.upgrade(store.engine, [order_service.SCHEMA])
    for i in range(3):
        hook = order_repo.save_summary(_summary(f"o{i}", "submitted"), new=True)
        assert await store.commit(_write(f"o{i}", 0, hook)) == CommitOutcome.OK
    writes = [_write(f"o{i}", 1, order_repo.save_summary(_summary(f"o{i}", "paid"), new=False)) for i in range(3)]
    writes += [_write(f"n{i}", 0, order_repo.save_summary(_summary(f"n{i}", "submitted"), new=True)) for i in range(3)]
    statements = _Statements(store)
    try:
        assert await asyncio.gather(*(store.commit(w) for w in writes)) == [CommitOutcome.OK] * 6
    finally:
        statements.close()
    async with store.engine.connect() as conn:
        rows = {r.id: r.status for r in await conn.execute(select(order_repo.orders))}
    assert rows == {**{f"o{i}": "paid" for i in range(3)}, **{f"n{i}": "submitted" for i in range(3)}}
    written = sum(n for kind, n in statements.counts.items() if kind in ("INSERT INTO ORDERS", "UPDATE ORDERS SET"))
    assert written == store.commits - 3, "one statement per transaction, new orders and changed ones together"


async def test_the_update_path_without_on_conflict_heals_lost_rows(db_url):
    """What SQL Server runs (no ON CONFLICT there): updates, then the missing rows found and inserted."""
    store_engine = create_engine(db_url)
    try:
        await migrate.upgrade(store_engine, [migrate.RUNTIME, order_service.SCHEMA])
        async with store_engine.begin() as conn:
            await conn.execute(order_repo._INSERT_SUMMARY, [_summary(f"o{i}", "submitted").row() for i in range(4)])
            await conn.execute(delete(order_repo.orders).where(order_repo.orders.c.id == "o2"))
        for rows in ([_summary(f"o{i}", "paid").row() for i in range(4)], [_summary("o1", "shipped").row()]):
            async with store_engine.begin() as conn:
                await order_repo._update_summaries(conn, rows)
        async with store_engine.connect() as conn:
            found = {r.id: r.status for r in await conn.execute(select(order_repo.orders))}
        assert found == {"o0": "paid", "o1": "shipped", "o2": "paid", "o3": "paid"}
    finally:
        await store_engine.dispose()


def test_the_batched_statements_compile_for_sql_server():
    """SQL Server has no ON CONFLICT: its dialect takes the insert/update path, whose statements must compile."""
    dialect = mssql.dialect()
    assert "sqlserver" not in order_repo._UPSERT_SUMMARY and "mssql" not in order_repo._UPSERT_SUMMARY
    for statement in (
        order_repo._INSERT_SUMMARY,
        order_repo._UPDATE_SUMMARY,
        select(order_repo.orders.c.id).where(order_repo.orders.c.id.in_(["a", "b"])),
        catalog_repo._UPDATE_STOCK,
        catalog_repo._LOG_CHANGE,
        catalog_repo._STEP_VERSION,
    ):
        assert str(statement.compile(dialect=dialect))
