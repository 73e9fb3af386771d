"""Catalog tables and queries (SQLAlchemy Core, portable types).

The :class:`~actors.catalog.actor.ProductActor` state is the source of truth for a product; ``products`` is
its query copy, written by the actor's commit hooks (:func:`insert_product`, :func:`update_product`,
:func:`remove_product`) in the same transaction as the state, so reads never go through an actor and never
see a half-applied change.

The service answers reads from memory (:mod:`actors.catalog.readmodel`), which these tables load and which
the change log (``catalog_version``, ``catalog_changes``, written by :func:`record_change` in every write's
transaction) keeps fresh on every instance. The SQL queries below (:func:`browse`) give the same answers and
are what the read model is tested against; they stay fast at 100,000 products because nothing they do grows
with the catalog:

* pages come from an index in the requested order: ``(name_key, id)``, ``(price, id)``, and the same behind
  ``brand_id`` and ``type_id`` for filtered lists; ``id`` breaks ties so paging is stable;
* the ``total`` of a browse without search comes from ``product_counts`` (products per brand and type, kept
  by the same hooks) instead of counting rows;
* text search uses ``product_terms``, an inverted index: every word of a product's name and description
  (lower-cased, accents removed) with the product's sort keys copied in. A query word matches the words that
  *start* with it (words under three characters: equal to it) through an index range scan on ``term``, and the matches are sorted and counted inside that
  table, so a search costs in proportion to what it finds, never to the catalog. It is the portable form of
  a full-text index: the same statements run on SQLite, PostgreSQL and SQL Server.

``name_key`` and ``term`` use a binary collation on PostgreSQL and SQL Server so that ordering and the
prefix ranges are by code point everywhere (SQLite compares binary by default), whatever the server locale.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Unicode,
    UnicodeText,
    bindparam,
    delete,
    func,
    insert,
    intersect,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import CompoundSelect, Select
from sqlalchemy.sql.elements import ColumnElement

from runtime.store import BatchedHook, SqlHook, execute

metadata = MetaData()

NAME_MAX = 200
TERM_MAX = 40
PREFIX_MIN = 3  # shorter search words match whole words only: "4" finds "4-person", not every "4..."


def _binary_string(length: int) -> Unicode:
    """A string compared by code point on every backend (see the module docstring)."""
    return (
        Unicode(length)
        .with_variant(Unicode(length, collation="C"), "postgresql")
        .with_variant(Unicode(length, collation="Latin1_General_100_BIN2"), "mssql")
    )


IdType = String(36)  # UUID strings
Money = Numeric(12, 2)

brands = Table(
    "brands",
    metadata,
    Column("id", IdType, primary_key=True),
    Column("name", Unicode(100), nullable=False, unique=True),
)

product_types = Table(
    "product_types",
    metadata,
    Column("id", IdType, primary_key=True),
    Column("name", Unicode(100), nullable=False, unique=True),
)

products = Table(
    "products",
    metadata,
    Column("id", IdType, primary_key=True),
    Column("name", Unicode(NAME_MAX), nullable=False),  # Unicode: NVARCHAR on SQL Server
    Column("name_key", _binary_string(NAME_MAX), nullable=False),  # case-folded name: the sort key
    Column("description", UnicodeText, nullable=False),
    Column("price", Money, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("brand_id", IdType, ForeignKey("brands.id"), nullable=False),
    Column("type_id", IdType, ForeignKey("product_types.id"), nullable=False),
    Column("picture_url", Unicode(500), nullable=True),
    Column("available_stock", Integer, nullable=False),
    Column("restock_threshold", Integer, nullable=False),
    Column("max_stock", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_products_name", "name_key", "id"),
    Index("ix_products_price", "price", "id"),
    Index("ix_products_brand_name", "brand_id", "name_key", "id"),
    Index("ix_products_brand_price", "brand_id", "price", "id"),
    Index("ix_products_type_name", "type_id", "name_key", "id"),
    Index("ix_products_type_price", "type_id", "price", "id"),
)

product_terms = Table(
    "product_terms",
    metadata,
    Column("term", _binary_string(TERM_MAX), primary_key=True),
    Column("product_id", IdType, ForeignKey("products.id"), primary_key=True),
    Column("name_key", _binary_string(NAME_MAX), nullable=False),  # copies of the sort keys: a search
    Column("price", Money, nullable=False),  # sorts its matches without reading ``products``
    Index("ix_product_terms_product", "product_id", "term"),
    sqlite_with_rowid=False,  # SQLite: the rows live in the primary key's b-tree, so it covers every query
)

product_counts = Table(
    "product_counts",
    metadata,
    Column("brand_id", IdType, ForeignKey("brands.id"), primary_key=True),
    Column("type_id", IdType, ForeignKey("product_types.id"), primary_key=True),
    Column("products", Integer, nullable=False),
)

catalog_meta = Table(
    "catalog_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

TABLES = (brands, product_types, products, product_terms, product_counts, catalog_meta)

# The change log that keeps every instance's in-memory read model (``readmodel.py``) fresh. Every write to a
# product or to the brands/types bumps ``catalog_version`` (one row) and appends a ``catalog_changes`` row
# with the new version, in the writer's transaction. The UPDATE locks that row until the transaction ends,
# so versions are handed out in commit order: whoever sees version v committed sees every version below it.
catalog_version = Table(
    "catalog_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)

catalog_changes = Table(
    "catalog_changes",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),  # one version per transaction
    Column("product_id", IdType, primary_key=True),  # NAMES_CHANGED: the brands or types changed
)
NAMES_CHANGED = ""

CHANGE_TABLES = (catalog_version, catalog_changes)
CHANGES_KEPT = 10_000  # versions kept in the log; a reader further behind than this reloads everything
_PRUNE_ONE_IN = 256  # writes between prunings, on average

# Ids of named things (brands, types, demo products) made from their names, so seeding is repeatable.
_ID_NAMESPACE = uuid.UUID("4f1c7a52-1f0e-4c69-9a43-2f6a3c2f8d11")


def stable_id(kind: str, name: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{name.strip().casefold()}"))


def canonical_uuid(value: str) -> str | None:
    """``value`` as a lower-case dashed UUID string, or None when it is not a UUID."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------
# Search terms


_WORD = re.compile(r"\w+")


def _fold(text: str) -> str:
    """Lower-case without accents, so "Café" is found by "cafe" and sorts next to it."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def name_key(name: str) -> str:
    return _fold(name)[:NAME_MAX]


def words(text: str) -> list[str]:
    """The searchable words of ``text`` in order, folded and cut to the indexed length."""
    return [w[:TERM_MAX] for w in _WORD.findall(_fold(text))]


def prefix_range(prefix: str) -> tuple[str, str | None]:
    """[low, high) covering every string that starts with ``prefix``, in code-point order (None: no end)."""
    following = ord(prefix[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:
        following = 0xE000  # surrogates are not characters and cannot be sent to a database
    if following > 0x10FFFF:
        return prefix, None
    return prefix, prefix[:-1] + chr(following)


# ---------------------------------------------------------------------------------------------------
# Browsing


SORT_OPTIONS = ("name", "-name", "price", "-price")


def _ordering(sort: str, name_key: Any, price: Any, id_: Any) -> tuple[ColumnElement[Any], ...]:
    """ORDER BY for ``sort`` over any source that has the sort keys (products, terms, a subquery)."""
    key = price if sort.lstrip("-") == "price" else name_key
    return (key.desc(), id_.desc()) if sort.startswith("-") else (key.asc(), id_.asc())


@dataclass(frozen=True, slots=True)
class ProductQuery:
    page: int = 1
    page_size: int = 20
    brand_id: str | None = None
    type_id: str | None = None
    search: tuple[str, ...] = ()  # folded words; a product must have a word starting with each
    sort: str = "name"

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size


_PRODUCT_COLUMNS = (
    *(c for c in products.c if c.name != "name_key"),
    brands.c.name.label("brand"),
    product_types.c.name.label("type"),
)


def product_select() -> Select[Any]:
    return (
        select(*_PRODUCT_COLUMNS)
        .join(brands, brands.c.id == products.c.brand_id)
        .join(product_types, product_types.c.id == products.c.type_id)
    )


def _group_conditions(table: Table, query: ProductQuery) -> list[ColumnElement[bool]]:
    """The brand/type filter on ``products`` or ``product_counts`` (both name the columns alike)."""
    conditions: list[ColumnElement[bool]] = []
    if query.brand_id is not None:
        conditions.append(table.c.brand_id == query.brand_id)
    if query.type_id is not None:
        conditions.append(table.c.type_id == query.type_id)
    return conditions


def _matching_word(terms: Any, word: str) -> list[ColumnElement[bool]]:
    """``terms.term`` is ``word`` (short words) or starts with it, as a range the primary key answers."""
    if len(word) < PREFIX_MIN:
        return [terms.c.term == word]
    low, high = prefix_range(word)
    return [terms.c.term >= low] + ([terms.c.term < high] if high is not None else [])


def _matches(query: ProductQuery) -> Select[Any] | CompoundSelect:
    """The products a search finds, with their sort keys: one row per product.

    One index range per word, intersected: the cost follows the number of matches of each word, and a
    set operation leaves no planner the choice of a nested loop on a misestimated range."""
    per_word = [
        select(product_terms.c.product_id, product_terms.c.name_key, product_terms.c.price).where(
            *_matching_word(product_terms, word)
        )
        for word in query.search
    ]
    group = _group_conditions(products, query)
    if group:
        per_word[0] = per_word[0].where(product_terms.c.product_id.in_(select(products.c.id).where(*group)))
    if len(per_word) == 1:
        return per_word[0].distinct()  # "tent" matches both "tent" and "tents" of one product
    return intersect(*per_word)


def count_statement(query: ProductQuery) -> Select[Any]:
    if query.search:
        return select(func.count()).select_from(_matches(query).subquery())
    return select(func.coalesce(func.sum(product_counts.c.products), 0)).where(
        *_group_conditions(product_counts, query)
    )


def page_statement(query: ProductQuery) -> Select[Any]:
    """One page of products with the ``total`` of the whole listing on each row: one round trip."""
    if not query.search:
        total = count_statement(query).scalar_subquery().label("total")
        return (
            product_select()
            .add_columns(total)
            .where(*_group_conditions(products, query))
            .order_by(*_ordering(query.sort, products.c.name_key, products.c.price, products.c.id))
            .limit(query.page_size)
            .offset(query.offset)
        )
    # A search finds its matches once: the window counts them all before the page is cut.
    found = _matches(query).subquery("found")
    page = (
        select(found.c.product_id, found.c.name_key, found.c.price, func.count().over().label("total"))
        .order_by(*_ordering(query.sort, found.c.name_key, found.c.price, found.c.product_id))
        .limit(query.page_size)
        .offset(query.offset)
        .subquery("page")
    )
    return (
        product_select()
        .add_columns(page.c.total)
        .join(page, page.c.product_id == products.c.id)
        .order_by(*_ordering(query.sort, page.c.name_key, page.c.price, page.c.product_id))
    )


async def browse(conn: AsyncConnection, query: ProductQuery) -> tuple[list[Row[Any]], int]:
    """One page of products and the number of products in the whole listing."""
    rows = list(await conn.execute(page_statement(query)))
    if rows:
        return rows, rows[0].total
    if query.page == 1:
        return [], 0
    return [], (await conn.execute(count_statement(query))).scalar_one()  # paged past the end


async def get_products(conn: AsyncConnection, ids: Sequence[str]) -> list[Row[Any]]:
    """The products with these ids, in the order asked; unknown ids are left out."""
    if not ids:
        return []
    rows = {r.id: r for r in await conn.execute(product_select().where(products.c.id.in_(list(ids))))}
    return [rows[i] for i in ids if i in rows]


async def get_product(conn: AsyncConnection, product_id: str) -> Row[Any] | None:
    found = await get_products(conn, [product_id])
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# Brands and types


async def list_named(conn: AsyncConnection, table: Table) -> list[dict[str, str]]:
    rows = await conn.execute(select(table.c.id, table.c.name).order_by(table.c.name))
    return [{"id": r.id, "name": r.name} for r in rows]


async def resolve_named(conn: AsyncConnection, table: Table, ref: str) -> str | None:
    """The id of the brand/type named by its id or (case-insensitively) its name; None if there is none."""
    as_id = canonical_uuid(ref)
    condition = table.c.id == as_id if as_id is not None else func.lower(table.c.name) == ref.strip().lower()
    return (await conn.execute(select(table.c.id).where(condition))).scalar_one_or_none()


async def create_named(conn: AsyncConnection, table: Table, name: str) -> dict[str, str] | None:
    """Add a brand/type; None when the name is taken (also when another writer won the race)."""
    taken = await resolve_named(conn, table, name)
    if taken is not None:
        return None
    row = {"id": stable_id(table.name, name), "name": name}
    await record_change(conn, None)  # first, as every writer does (see record_change)
    try:
        async with conn.begin_nested():
            await conn.execute(insert(table).values(**row))
    except IntegrityError:
        return None
    return row


async def ensure_named(conn: AsyncConnection, table: Table, names: Iterable[str]) -> dict[str, str]:
    """Ids of these brands/types by name, adding the missing ones."""
    ids: dict[str, str] = {}
    for name in dict.fromkeys(names):
        existing = await resolve_named(conn, table, name)
        if existing is None:
            existing = stable_id(table.name, name)
            await record_change(conn, None)
            await conn.execute(insert(table).values(id=existing, name=name))
        ids[name] = existing
    return ids


# ---------------------------------------------------------------------------------------------------
# Writes: commit hooks of the ProductActor
#
# A hook runs inside the turn's transaction. If that transaction fails, all of it is rolled back and the
# turn (hooks included) is run again from the actor's committed state, so a hook never sees its own earlier
# attempt; what it writes is derived from the actor's state, never from what is in the table.


def _row(values: Mapping[str, Any]) -> dict[str, Any]:
    return {**values, "name_key": name_key(values["name"])}


def _term_rows(row: Mapping[str, Any], words_of: Callable[[str], list[str]] = words) -> list[dict[str, Any]]:
    terms = dict.fromkeys(words_of(row["name"]) + words_of(row["description"]))
    return [{"term": t, "product_id": row["id"], "name_key": row["name_key"], "price": row["price"]} for t in terms]


async def _write_terms(conn: AsyncConnection, row: Mapping[str, Any]) -> None:
    await conn.execute(delete(product_terms).where(product_terms.c.product_id == row["id"]))
    terms = _term_rows(row)
    if terms:
        await conn.execute(insert(product_terms), terms)


async def _count(conn: AsyncConnection, brand_id: str, type_id: str, delta: int) -> None:
    where = (product_counts.c.brand_id == brand_id, product_counts.c.type_id == type_id)
    result = await conn.execute(update(product_counts).where(*where).values(products=product_counts.c.products + delta))
    if result.rowcount == 0:
        await conn.execute(insert(product_counts).values(brand_id=brand_id, type_id=type_id, products=delta))


def insert_product(values: Mapping[str, Any]) -> SqlHook:
    """A new product: its row, its words, one more in its brand and type."""
    row = _row(values)

    async def hook(conn: AsyncConnection) -> None:
        await record_change(conn, row["id"])
        await conn.execute(insert(products).values(**row))
        await _write_terms(conn, row)
        await _count(conn, row["brand_id"], row["type_id"], +1)

    return hook


# A stock change (a reservation, a release, a restock): the columns it touches, and its statements, built once.
_STOCK_COLUMNS = frozenset({"available_stock", "updated_at"})
_UPDATE_STOCK = (
    update(products)
    .where(products.c.id == bindparam("pid"))
    .values(available_stock=bindparam("stock"), updated_at=bindparam("at"))
)
_LOG_CHANGE = insert(catalog_changes).values(version=bindparam("v"), product_id=bindparam("p"))


async def _write_stock(conn: AsyncConnection, items: list[tuple[str, int, Any]]) -> None:
    """The stock changes ``(product id, available stock, updated_at)`` of a transaction's turns: its change-log
    rows and its ``products`` rows, one executemany each however many turns changed stock (a :class:`BatchedHook`,
    run after the transaction's other hooks). The version step comes first, as in every writer."""
    version, logged = await _changing(conn)
    new = [pid for pid in dict.fromkeys(pid for pid, _, _ in items) if pid not in logged]
    if new:
        await execute(conn, _LOG_CHANGE, [{"v": version, "p": pid} for pid in new])
        logged.update(new)
    await execute(conn, _UPDATE_STOCK, [{"pid": pid, "stock": stock, "at": at} for pid, stock, at in items])


def update_product(before: Mapping[str, Any], after: Mapping[str, Any]) -> SqlHook:
    """Write what changed between two versions of a product's row (a stock change touches two columns and
    no index); the search words and the counts follow when what they copy changed. A change of the stock
    alone (every reservation) writes only ``products`` and the change log: it is batched with the other stock
    changes of its transaction (:func:`_write_stock`)."""
    changes = {name: value for name, value in after.items() if before.get(name) != value}
    if changes.keys() <= _STOCK_COLUMNS:
        return BatchedHook(_write_stock, (after["id"], after["available_stock"], after["updated_at"]))
    if "name" in changes:
        changes["name_key"] = name_key(after["name"])
    product_id = after["id"]

    async def hook(conn: AsyncConnection) -> None:
        await record_change(conn, product_id)
        await conn.execute(update(products).where(products.c.id == product_id).values(**changes))
        if "name" in changes or "description" in changes:
            await _write_terms(conn, _row(after))
        elif "price" in changes:
            await conn.execute(
                update(product_terms).where(product_terms.c.product_id == product_id).values(price=after["price"])
            )
        if "brand_id" in changes or "type_id" in changes:
            await _count(conn, before["brand_id"], before["type_id"], -1)
            await _count(conn, after["brand_id"], after["type_id"], +1)

    return hook


def remove_product(values: Mapping[str, Any]) -> SqlHook:
    async def hook(conn: AsyncConnection) -> None:
        await record_change(conn, values["id"])
        await conn.execute(delete(product_terms).where(product_terms.c.product_id == values["id"]))
        await conn.execute(delete(products).where(products.c.id == values["id"]))
        await _count(conn, values["brand_id"], values["type_id"], -1)

    return hook


def bulk_rows(values: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Product rows and their term rows for a bulk load (benchmarks), as :func:`insert_product` writes them.
    Follow the load with :func:`rebuild_counts`."""
    words_of = functools.lru_cache(maxsize=4096)(words)  # bulk data repeats its descriptions
    rows, terms = [], []
    for v in values:
        row = _row(v)
        rows.append(row)
        terms.extend(_term_rows(row, words_of))
    return rows, terms


async def record_change(conn: AsyncConnection, product_id: str | None) -> None:
    """Log a change of this product (None: of the brands or types) in the caller's transaction.

    A transaction steps the catalog version once, at its first change, and logs every product it changes
    under that version (a group commit of many turns costs one step and one row per product). The step
    locks the version row until the transaction ends: a concurrent writer waits, and the version it gets is
    higher only if it commits later (see ``catalog_version``). Writers call this *before* their other
    catalog writes, so the version row is the first catalog lock every such transaction takes and two of
    them can never wait on each other's rows the other way round (a deadlock on PostgreSQL)."""
    ref = NAMES_CHANGED if product_id is None else product_id
    version, logged = await _changing(conn)
    if ref not in logged:  # one row per product and version (several name changes in one transaction: one)
        await conn.execute(_LOG_CHANGE, {"v": version, "p": ref})
        logged.add(ref)


_STEP_VERSION = (
    update(catalog_version).values(version=catalog_version.c.version + 1).returning(catalog_version.c.version)
)


async def _changing(conn: AsyncConnection) -> tuple[int, set[str]]:
    """The catalog version of the caller's transaction, stepped at its first change (see :func:`record_change`),
    and the products it logged so far."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection is not None else None
    info = conn.sync_connection.info if conn.sync_connection is not None else {}
    mine: tuple[Any, int, set[str]] | None = info.get("catalog_change")
    if mine is None or transaction is None or mine[0] is not transaction:
        version = (await conn.execute(_STEP_VERSION)).scalar_one()
        mine = info["catalog_change"] = (transaction, version, set())
        if random.randrange(_PRUNE_ONE_IN) == 0:
            await conn.execute(delete(catalog_changes).where(catalog_changes.c.version <= version - CHANGES_KEPT))
    return mine[1], mine[2]


def create_change_log(_op: Any, conn: Any) -> None:
    """Migration step: the change-log tables, starting at version 0."""
    metadata.create_all(conn, tables=list(CHANGE_TABLES))
    conn.execute(insert(catalog_version).values(id=1, version=0))


async def rebuild_counts(conn: AsyncConnection) -> None:
    """Recount ``product_counts`` from ``products`` (after a bulk load, or to repair)."""
    await conn.execute(delete(product_counts))
    grouped = select(products.c.brand_id, products.c.type_id, func.count()).group_by(
        products.c.brand_id, products.c.type_id
    )
    await conn.execute(insert(product_counts).from_select(["brand_id", "type_id", "products"], grouped))


# ---------------------------------------------------------------------------------------------------
# Service bookkeeping


async def get_meta(conn: AsyncConnection, key: str) -> str | None:
    return (await conn.execute(select(catalog_meta.c.value).where(catalog_meta.c.key == key))).scalar_one_or_none()


async def set_meta(conn: AsyncConnection, key: str, value: str) -> None:
    result = await conn.execute(update(catalog_meta).where(catalog_meta.c.key == key).values(value=value))
    if result.rowcount == 0:
        await conn.execute(insert(catalog_meta).values(key=key, value=value))
