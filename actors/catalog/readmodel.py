"""The catalog's read model: every product, brand and type in memory, indexed for the read API.

Reads (product detail, batch, list and search pages, brands, types) are answered from memory: no thread hop
to a database driver and no query per request, only one shared freshness check (below). The model is loaded
when the service starts and kept in step with the database through the change log that every write appends
to in its own transaction (:func:`~actors.catalog.repository.record_change`: the ProductActor's commit hooks,
and the brand/type creation).

Freshness invariant: **a read that starts after a write's response was sent sees that write, on every
instance.** A write commits (and so logs its version) before its response is sent. Each read waits for
:meth:`CatalogReadModel.fresh`, which is answered only by a check of the change log that was *sent to the
database after the read began* (reads waiting together share one check, as ``StateStore.version`` batches
version reads; a read that arrives while a check is in flight waits for the next one). That check returns
every change newer than the model's version; the model applies them, reading the changed rows after the log,
before answering. Versions are handed out in commit order (the version row stays locked until the writer's
transaction ends), so the log a check sees is a gap-free prefix and nothing committed before it is missed. A
gap at the start of what a check finds means the log was pruned past the model's version: the model then
reloads everything.

Changes are applied without an ``await`` between reading the model and answering, so a request sees one
consistent state; a full reload builds a new index and swaps it in.

ETags: a product's body and ETag (a hash of the body, which carries the price, the stock and ``updated_at``)
are made once when the product enters the model, so they change with every price or stock change and are
the same on every instance.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import hashlib
import logging
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from operator import attrgetter
from typing import Any

import orjson
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from actors.catalog import pictures
from actors.catalog import repository as repo
from runtime.jsonutil import dumps, isoformat
from runtime.store import as_utc

log = logging.getLogger(__name__)

CENT = Decimal("0.01")
_CHUNK = 500  # ids per IN (...) when loading changed products
_SORT_KEY = {"name": attrgetter("name_order"), "price": attrgetter("price_order")}
FREEZE_FROM = 10_000  # products from which a full load is hidden from the garbage collector (see _reload)
RESULTS_KEPT = 400_000  # product ids kept in remembered search results, all searches together

# The freshness check, built once: it runs for every burst of reads, and building the expression each time cost
# more than running it (SQLAlchemy caches the compiled SQL of a statement, not the statement).
_CHANGES_SINCE = (
    select(repo.catalog_changes.c.version, repo.catalog_changes.c.product_id)
    .where(repo.catalog_changes.c.version > bindparam("since"))
    .order_by(repo.catalog_changes.c.version)
)


def product_json(row: Any) -> dict[str, Any]:
    """A product as the API shows it, from a row of ``repository.product_select()``."""
    return {
        "id": row.id,
        "name": row.name,
        "description": row.description,
        "price": str(Decimal(row.price).quantize(CENT)),
        "currency": row.currency,
        "brand_id": row.brand_id,
        "brand": row.brand,
        "type_id": row.type_id,
        "type": row.type,
        "picture_url": pictures.current_url(row.picture_url),
        "available_stock": row.available_stock,
        "restock_threshold": row.restock_threshold,
        "max_stock": row.max_stock,
        "created_at": isoformat(as_utc(row.created_at)),
        "updated_at": isoformat(as_utc(row.updated_at)),
    }


def etag_of(body: bytes) -> str:
    return f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'


@dataclass(frozen=True, slots=True)
class Product:
    """One product as served: its JSON body and ETag made once, and its keys for sorting and search."""

    id: str
    brand_id: str
    type_id: str
    name_order: tuple[str, str]  # (name_key, id): the order of sort=name
    price_order: tuple[int, str]  # (price in cents, id): the order of sort=price (ints compare fast)
    terms: tuple[str, ...]  # search words of the name and the description, sorted (a tuple: 1/8 of a set's size)
    body: bytes
    etag: str

    @property
    def search_key(self) -> tuple[Any, ...]:
        """What search results depend on besides the terms: a change of these re-sorts or re-filters."""
        return (self.name_order, self.price_order, self.brand_id, self.type_id)


def _product(row: Any) -> Product:
    # A copy of exactly the body's size: orjson's own bytes keep its whole output buffer (about 8 KB), which
    # would make a 100,000-product model ten times its size.
    body = bytes(memoryview(dumps(product_json(row))))
    price = Decimal(row.price).quantize(CENT)
    return Product(
        id=row.id,
        brand_id=row.brand_id,
        type_id=row.type_id,
        name_order=(repo.name_key(row.name), row.id),
        price_order=(int(price * 100), row.id),
        terms=tuple(sorted(set(_words(row.name) + _words(row.description)))),
        body=body,
        etag=etag_of(body),
    )


_words_cache: dict[str, list[str]] = {}


def _words(text: str) -> list[str]:
    """``repository.words`` with a bounded memo: catalogs repeat descriptions across variants."""
    found = _words_cache.get(text)
    if found is None:
        found = repo.words(text)
        if len(_words_cache) > 4096:
            _words_cache.clear()
        _words_cache[text] = found
    return found


@dataclass(frozen=True, slots=True)
class Named:
    """The brands or the types: the list as served and the lookups ``brand``/``type`` filters use."""

    items: list[dict[str, str]]  # sorted by name
    body: bytes
    etag: str
    by_id: dict[str, str]
    by_name: dict[str, str]  # lower-cased name -> id

    @classmethod
    def of(cls, rows: Iterable[Any]) -> Named:
        items = sorted(({"id": r.id, "name": r.name} for r in rows), key=lambda i: i["name"])
        body = dumps({"items": items, "total": len(items)})
        return cls(
            items=items,
            body=body,
            etag=etag_of(body),
            by_id={i["id"]: i["name"] for i in items},
            by_name={i["name"].strip().lower(): i["id"] for i in items},
        )

    def resolve(self, ref: str) -> str | None:
        """The id named by ``ref`` (an id, or a name in any case), as ``repository.resolve_named``."""
        as_id = repo.canonical_uuid(ref)
        if as_id is not None:
            return as_id if as_id in self.by_id else None
        return self.by_name.get(ref.strip().lower())


class _Index:
    """Products by id, an inverted index of their words, and sorted listings (built on first use, then kept
    in step with each change)."""

    def __init__(self, products: Iterable[Product]) -> None:
        self.products: dict[str, Product] = {}
        self.by_brand: dict[str, set[str]] = {}
        self.by_type: dict[str, set[str]] = {}
        self.by_term: dict[str, set[str]] = {}
        self.terms: list[str] = []  # every key of by_term, sorted: prefix ranges by bisection
        # (brand_id | None, type_id | None, "name" | "price") -> that listing's sort keys in order
        self.listings: dict[tuple[str | None, str | None, str], list[tuple[Any, str]]] = {}
        # Search results depend on the words, the sort keys, the brand and the type of the products, not on
        # their stock: those changes start a new generation, which drops the ranks and remembered results.
        self.generation = 0
        self._ranks: dict[str, tuple[int, dict[str, int]]] = {}  # field -> (generation, id -> position)
        self.results: dict[tuple[Any, ...], list[str]] = {}  # search -> matching ids in order (this generation)
        self._results_size = 0
        for p in products:
            self.products[p.id] = p
            self.by_brand.setdefault(p.brand_id, set()).add(p.id)
            self.by_type.setdefault(p.type_id, set()).add(p.id)
            for t in p.terms:
                self.by_term.setdefault(t, set()).add(p.id)
        self.terms = sorted(self.by_term)

    # -- changes ----------------------------------------------------------------------------------

    def put(self, new: Product) -> None:
        old = self.products.get(new.id)
        self.products[new.id] = new
        had: tuple[str, ...] = ()
        if old is not None:
            if old.search_key == new.search_key and old.terms == new.terms:
                return  # a stock change: no listing or search order moves
            self._unlist(old)
            self._drop_terms(old.id, set(old.terms).difference(new.terms))
            had = old.terms
        self._next_generation()
        self._list(new)
        self._add_terms(new.id, set(new.terms).difference(had))
        self.by_brand.setdefault(new.brand_id, set()).add(new.id)
        self.by_type.setdefault(new.type_id, set()).add(new.id)

    def remove(self, product_id: str) -> None:
        old = self.products.pop(product_id, None)
        if old is not None:
            self._next_generation()
            self._unlist(old)
            self._drop_terms(old.id, old.terms)

    def _next_generation(self) -> None:
        self.generation += 1
        self.results.clear()
        self._results_size = 0

    def _groups(self, p: Product) -> list[tuple[str | None, str | None, str]]:
        """The listings built so far that hold ``p``."""
        return [
            (brand, kind, field)
            for brand in (None, p.brand_id)
            for kind in (None, p.type_id)
            for field in ("name", "price")
            if (brand, kind, field) in self.listings
        ]

    def _unlist(self, p: Product) -> None:
        self.by_brand[p.brand_id].discard(p.id)
        self.by_type[p.type_id].discard(p.id)
        for group in self._groups(p):
            listing = self.listings[group]
            key = _SORT_KEY[group[2]](p)
            i = bisect.bisect_left(listing, key)
            if i < len(listing) and listing[i] == key:
                del listing[i]

    def _list(self, p: Product) -> None:
        for group in self._groups(p):
            bisect.insort(self.listings[group], _SORT_KEY[group[2]](p))

    def _drop_terms(self, product_id: str, terms: Iterable[str]) -> None:
        for t in terms:
            ids = self.by_term.get(t)
            if ids is None:
                continue
            ids.discard(product_id)
            if not ids:
                del self.by_term[t]
                i = bisect.bisect_left(self.terms, t)
                if i < len(self.terms) and self.terms[i] == t:
                    del self.terms[i]

    def _add_terms(self, product_id: str, terms: Iterable[str]) -> None:
        for t in terms:
            ids = self.by_term.get(t)
            if ids is None:
                self.by_term[t] = ids = set()
                bisect.insort(self.terms, t)
            ids.add(product_id)

    # -- queries ----------------------------------------------------------------------------------

    def listing(self, brand_id: str | None, type_id: str | None, field: str) -> list[tuple[Any, str]]:
        group = (brand_id, type_id, field)
        found = self.listings.get(group)
        if found is None:
            key = _SORT_KEY[field]
            found = sorted(
                key(p)
                for p in self.products.values()
                if (brand_id is None or p.brand_id == brand_id) and (type_id is None or p.type_id == type_id)
            )
            self.listings[group] = found
        return found

    def ranks(self, field: str) -> dict[str, int]:
        """Each product's position in the whole catalog sorted by ``field``: sorting matches by these ints
        is a C-speed sort, rebuilt once per generation."""
        made = self._ranks.get(field)
        if made is None or made[0] != self.generation:
            made = (self.generation, {key[1]: n for n, key in enumerate(self.listing(None, None, field))})
            self._ranks[field] = made
        return made[1]

    def remember(self, key: tuple[Any, ...], ordered: list[str]) -> None:
        """Keep a search's ordered result for this generation, within a bounded number of ids in all."""
        if len(ordered) > RESULTS_KEPT // 4:
            return
        while self.results and self._results_size + len(ordered) > RESULTS_KEPT:
            self._results_size -= len(self.results.pop(next(iter(self.results))))  # the oldest first
        self.results[key] = ordered
        self._results_size += len(ordered)

    def matching(self, word: str) -> AbstractSet[str]:
        """Ids of the products with a word that is ``word`` (short words) or starts with it."""
        if len(word) < repo.PREFIX_MIN:
            return self.by_term.get(word, frozenset())
        low, high = repo.prefix_range(word)
        start = bisect.bisect_left(self.terms, low)
        end = len(self.terms) if high is None else bisect.bisect_left(self.terms, high, lo=start)
        if end - start == 1:
            return self.by_term[self.terms[start]]
        found: set[str] = set()
        for t in self.terms[start:end]:
            found |= self.by_term[t]
        return found


class CatalogReadModel:
    """The in-memory read side of the catalog (see the module docstring for its freshness invariant)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine  # plain reads: autocommit, each statement sees everything committed before it
        self.version = -1  # the change-log version the model is in step with; -1: not loaded
        self.index = _Index(())
        self.brands = Named.of(())
        self.types = Named.of(())
        self._waiters: list[asyncio.Future[None]] = []
        self._checking = False
        self.checks = 0  # change-log queries made (each answers every read that waited for it)
        self.reloads = 0  # full loads
        # One connection kept for the checks: a pool checkout would cost a ping round trip per check.
        self._conn: AsyncConnection | None = None

    # -- keeping fresh ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._reload()

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection needs no tidy close
                await conn.close()

    async def _connection(self) -> AsyncConnection:
        if self._conn is None or self._conn.invalidated:
            await self.stop()
            self._conn = await self.engine.connect()
        return self._conn

    async def fresh(self) -> None:
        """Return once the model holds every change committed before this call (see the module docstring)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if not self._checking:
            self._checking = True
            asyncio.get_running_loop().create_task(self._check_loop())
        await fut

    async def _check_loop(self) -> None:
        try:
            while self._waiters:
                waiting, self._waiters = self._waiters, []  # later arrivals wait for the next check
                try:
                    await self._catch_up()
                except Exception as exc:  # noqa: BLE001 - handed to every waiting read (a 503 or 500 there)
                    for fut in waiting:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for fut in waiting:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._checking = False

    async def _catch_up(self) -> None:
        """Bring the model up to the log, on the kept connection; a failure closes it (the next check opens
        another) and is handed to the reads that waited."""
        try:
            await self._catch_up_on(await self._connection())
        except BaseException:
            await self.stop()
            raise

    async def _catch_up_on(self, conn: AsyncConnection) -> None:
        if self.version < 0:
            await self._reload(conn)
            return
        self.checks += 1
        changes = (await conn.execute(_CHANGES_SINCE, {"since": self.version})).all()
        if not changes:
            return
        if changes[0].version != self.version + 1:  # pruned past us: what changed is unknown
            log.info("catalog read model: change log pruned past version %d; reloading", self.version)
            await self._reload(conn)
            return
        ids = list(dict.fromkeys(c.product_id for c in changes if c.product_id != repo.NAMES_CHANGED))
        named = await self._load_named(conn) if any(c.product_id == repo.NAMES_CHANGED for c in changes) else None
        rows: dict[str, Any] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            for found in await conn.execute(repo.product_select().where(repo.products.c.id.in_(chunk))):
                rows[found.id] = found
        # No await from here on: readers see the model before or after all of these changes.
        if named is not None:
            self.brands, self.types = named
        for product_id in ids:
            if product_id in rows:
                self.index.put(_product(rows[product_id]))
            else:
                self.index.remove(product_id)
        self.version = changes[-1].version

    async def _load_named(self, conn: Any) -> tuple[Named, Named]:
        brands = Named.of(await conn.execute(select(repo.brands.c.id, repo.brands.c.name)))
        types = Named.of(await conn.execute(select(repo.product_types.c.id, repo.product_types.c.name)))
        return brands, types

    async def _reload(self, conn: AsyncConnection | None = None) -> None:
        """Load everything. The version is read first: rows read after it are at least that new, and any
        change after it is applied (again, harmlessly) by the next check."""
        if conn is None:
            async with self.engine.connect() as own:
                await self._reload(own)
            return
        self.reloads += 1
        version = (await conn.execute(select(repo.catalog_version.c.version))).scalar_one()
        brands, types = await self._load_named(conn)
        rows = (await conn.execute(repo.product_select())).all()
        products: list[Product] = []
        for start in range(0, len(rows), 2000):
            products.extend(_product(row) for row in rows[start : start + 2000])
            await asyncio.sleep(0)  # a big catalog loads without stalling the reads already being served
        index = _Index(products)
        for field in _SORT_KEY:  # built here rather than by the first search to need them
            await asyncio.sleep(0)
            index.ranks(field)
        self.index, self.brands, self.types, self.version = index, brands, types, version
        if len(products) >= FREEZE_FROM:
            # A big catalog is hundreds of thousands of long-lived objects: left to the cyclic garbage
            # collector, each full collection would scan them all (a stall of every request for up to a
            # second). They hold no reference cycles, so they are moved out of its sight (reference counting
            # still frees them).
            gc.collect()
            gc.freeze()
        log.info("catalog read model: %d products loaded at version %d", len(products), version)

    # -- queries (call after fresh()) -------------------------------------------------------------

    def product(self, product_id: str) -> Product | None:
        return self.index.products.get(product_id)

    def products(self, ids: Sequence[str]) -> list[Product]:
        """The products with these ids, in the order asked; unknown ids are left out."""
        found = self.index.products
        return [found[i] for i in ids if i in found]

    def browse(self, query: repo.ProductQuery) -> tuple[list[Product], int]:
        """One page of a listing (filtered, searched, sorted as :func:`repository.browse` documents) and the
        number of products in the whole listing."""
        index = self.index
        field = query.sort.lstrip("-")
        descending = query.sort.startswith("-")
        start, size = query.offset, query.page_size
        if not query.search:
            listing = index.listing(query.brand_id, query.type_id, field)
            total = len(listing)
            if descending:
                keys = listing[max(0, total - start - size) : max(0, total - start)][::-1]
            else:
                keys = listing[start : start + size]
            return [index.products[k[1]] for k in keys], total
        key = (query.search, query.brand_id, query.type_id, field)
        ordered = index.results.get(key)
        if ordered is None:
            matched = self._search(query)
            total = len(matched)
            if start >= total:
                return [], total
            page = self._walk(matched, field, descending, start, start + size)
            if page is not None:
                return [index.products[i] for i in page], total
            ordered = sorted(matched, key=index.ranks(field).__getitem__)
            index.remember(key, ordered)
        total = len(ordered)
        if descending:
            ids = ordered[max(0, total - start - size) : max(0, total - start)][::-1]
        else:
            ids = ordered[start : start + size]
        return [index.products[i] for i in ids], total

    def _walk(self, matched: AbstractSet[str], field: str, descending: bool, start: int, end: int) -> list[str] | None:
        """A page of a search that matches much of the catalog, found by walking the catalog in order until
        the page is full: about ``end * catalog / matches`` steps, cheaper than sorting many matches. None
        when the matches are few or bunched up (the walk would be long): sort them instead."""
        listing = self.index.listing(None, None, field)
        want = min(end, len(matched))
        if len(matched) * 8 < len(listing):
            return None
        limit = 4 * want * len(listing) // len(matched) + 100
        walk = reversed(listing) if descending else iter(listing)
        hits = list(islice((k[1] for k in islice(walk, limit) if k[1] in matched), want))
        return hits[start:] if len(hits) == want else None

    def _search(self, query: repo.ProductQuery) -> AbstractSet[str]:
        """Ids of the products with every search word, in the brand and type asked for."""
        index = self.index
        sets: list[AbstractSet[str]] = [index.matching(w) for w in query.search]
        if query.brand_id is not None:
            sets.append(index.by_brand.get(query.brand_id, frozenset()))
        if query.type_id is not None:
            sets.append(index.by_type.get(query.type_id, frozenset()))
        sets.sort(key=len)
        if len(sets) == 1 or not sets[0]:
            return sets[0]
        return set(sets[0]).intersection(*sets[1:])


def page_body(items: Sequence[Product], page: int, page_size: int, total: int) -> bytes:
    """A list page's JSON, joined from the products' ready-made bodies."""
    tail = orjson.dumps({"page": page, "page_size": page_size, "total": total})
    return b'{"items":[' + b",".join(p.body for p in items) + b"]," + tail[1:]


def batch_body(items: Sequence[Product]) -> bytes:
    return b'{"items":[' + b",".join(p.body for p in items) + b"]}"
