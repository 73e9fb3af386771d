"""The cart service's query table: which carts hold which product.

A cart's lines live in its actor state; ``cart_lines`` only answers the one question the state cannot: "which
carts hold product X?" (to fan a ``ProductPriceChanged`` out to them). The CartActor keeps it in step inside
the same transaction as its state (``turn.on_commit``), so the two never disagree after a commit.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from sqlalchemy import Column, Index, MetaData, String, Table, bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runtime.store import SqlHook, execute

metadata = MetaData()

cart_lines = Table(
    "cart_lines",
    metadata,
    Column("cart_id", String(128), primary_key=True),  # = actor id (the customer's `sub`)
    Column("product_id", String(64), primary_key=True),
    Index("ix_cart_lines_product", "product_id", "cart_id"),
)


def reindex(cart_id: str, *, added: AbstractSet[str], removed: AbstractSet[str]) -> SqlHook:
    """A hook for ``turn.on_commit`` that applies one turn's change of the cart's product set.

    Added rows are deleted before they are inserted, so a row left over by an earlier failure or a manual edit
    cannot break the turn with a duplicate key: the table heals instead."""
    changed = [{"c": cart_id, "p": product_id} for product_id in sorted(added | removed)]
    rows = [{"c": cart_id, "p": product_id} for product_id in sorted(added)]

    async def hook(conn: AsyncConnection) -> None:
        if changed:
            await execute(conn, _DELETE_LINE, changed)
        if rows:
            await execute(conn, _INSERT_LINE, rows)

    return hook


# Built once and run by key (an executemany), not as an IN list: every cart turn that changes its products runs them.
_DELETE_LINE = delete(cart_lines).where(
    cart_lines.c.cart_id == bindparam("c"), cart_lines.c.product_id == bindparam("p")
)
_INSERT_LINE = insert(cart_lines).values(cart_id=bindparam("c"), product_id=bindparam("p"))


async def carts_holding(engine: AsyncEngine, product_id: str) -> list[str]:
    async with engine.connect() as conn:
        result = await conn.execute(select(cart_lines.c.cart_id).where(cart_lines.c.product_id == product_id))
        return [row.cart_id for row in result]


async def products_in(engine: AsyncEngine, cart_id: str) -> set[str]:
    """The product ids indexed for one cart (for tests and admin checks)."""
    async with engine.connect() as conn:
        result = await conn.execute(select(cart_lines.c.product_id).where(cart_lines.c.cart_id == cart_id))
        return {row.product_id for row in result}
