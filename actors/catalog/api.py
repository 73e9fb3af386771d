"""HTTP API of the catalog service (served at these full paths; the gateway proxies them unchanged).

Reads are answered from the in-memory read model (:mod:`actors.catalog.readmodel`, checked fresh against the
change log on every read) with an ``ETag``; a matching ``If-None-Match`` gets 304. Writes are admin-only and
go through the product's :class:`~actors.catalog.actor.ProductActor`.

    GET    /api/catalog/products?page=&page_size=&brand=&type=&q=&sort=name|-name|price|-price
    GET    /api/catalog/products/batch?ids=a,b,c       {"items": [...]}, unknown ids left out
    GET    /api/catalog/products/{id}
    GET    /api/catalog/brands, /api/catalog/types      {"items": [{id, name}], "total": n}
    GET    /api/catalog/pictures/{slug}.svg             a product picture (image/svg+xml; see pictures.py)
    POST   /api/catalog/products                        admin: create (201)
    PATCH  /api/catalog/products/{id}                   admin: change any field, price and stock included
    POST   /api/catalog/products/{id}/restock           admin: add units up to max_stock
    DELETE /api/catalog/products/{id}                   admin: 409 while an open order holds it
    POST   /api/catalog/brands, /api/catalog/types      admin: add a brand / product type

``brand`` and ``type`` (filters and request bodies) take the id or the name of a brand/type.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError, fields, validate
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from actors.catalog import pictures
from actors.catalog import repository as repo
from actors.catalog.actor import ProductActor
from actors.catalog.messages import (
    CreateProduct,
    DeleteProduct,
    RestockProduct,
    UpdateProduct,
)
from actors.catalog.readmodel import CatalogReadModel, Named, batch_body, etag_of, page_body, product_json
from runtime.actors import ActorSystem
from runtime.errors import Conflict, NotFound, ValidationProblem
from runtime.host import AppKeyRuntime, json_response
from runtime.web.endpoints import Auth, Reply, endpoint

PREFIX = "/api/catalog"
ADMIN = Auth(roles=("admin",))
CENT = Decimal("0.01")
MAX_PRICE = Decimal("9999999999.99")  # Numeric(12, 2)
MAX_UNITS = 1_000_000_000  # fits a 32-bit INTEGER column everywhere
MAX_PAGE = 100_000  # keeps OFFSET a sane number; nobody pages 2 million items deep
MAX_BATCH = 100
MAX_SEARCH_WORDS = 8

EXISTING_BRAND = f"id or name of an existing brand (see {PREFIX}/brands)"
EXISTING_TYPE = f"id or name of an existing product type (see {PREFIX}/types)"

READS: web.AppKey[AsyncEngine] = web.AppKey("catalog_reads", AsyncEngine)
READ_MODEL: web.AppKey[CatalogReadModel] = web.AppKey("catalog_read_model", CatalogReadModel)
_LIST_PATH = {repo.brands.name: "brands", repo.product_types.name: "types"}  # table -> path under PREFIX


# ---------------------------------------------------------------------------------------------------
# Schemas (validation and the OpenAPI document)


class MoneyField(fields.Field):
    """Money as a decimal string with at most two places ("19.99"); a plain JSON number is accepted too."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValidationError('must be a decimal string such as "19.99"')
        try:
            amount = Decimal(str(value).strip())  # str() of a float is its shortest repr: no binary noise
        except InvalidOperation:
            raise ValidationError('must be a decimal string such as "19.99"') from None
        if not amount.is_finite():
            raise ValidationError("must be a finite amount")
        if amount < 0:
            raise ValidationError("must not be negative")
        if amount > MAX_PRICE:
            raise ValidationError(f"must not be more than {MAX_PRICE}")
        if amount != amount.quantize(CENT):
            raise ValidationError("must have at most two decimal places")
        return amount.quantize(CENT)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(Decimal(value).quantize(CENT))


# What the document promises MoneyField accepts (it also takes JSON numbers and surrounding blanks).
MONEY = {"type": "string", "pattern": r"^[0-9]{1,10}(\.[0-9]{1,2})?$", "example": "19.99"}


def _units(**kwargs: Any) -> fields.Integer:
    return fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_UNITS), **kwargs)


class ProductFieldsSchema(Schema):
    """What an admin may set on a product; every field optional (PATCH)."""

    name = fields.String(validate=validate.Length(min=1, max=repo.NAME_MAX))
    description = fields.String(validate=validate.Length(max=4000))
    price = MoneyField(metadata=MONEY)
    currency = fields.String(validate=validate.Regexp(r"^[A-Z]{3}$", error="must be a 3-letter ISO 4217 code"))
    brand = fields.String(validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_BRAND})
    type = fields.String(validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_TYPE})
    picture_url = fields.String(allow_none=True, validate=validate.Length(max=500))
    available_stock = _units()
    restock_threshold = _units()
    max_stock = _units()


class ProductCreateSchema(ProductFieldsSchema):
    id = fields.UUID(metadata={"description": "optional: makes a retried create safe"})
    name = fields.String(required=True, validate=validate.Length(min=1, max=repo.NAME_MAX))
    description = fields.String(load_default="", validate=validate.Length(max=4000))
    price = MoneyField(required=True, metadata=MONEY)
    currency = fields.String(
        load_default="USD", validate=validate.Regexp(r"^[A-Z]{3}$", error="must be a 3-letter ISO 4217 code")
    )
    brand = fields.String(
        required=True, validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_BRAND}
    )
    type = fields.String(
        required=True, validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_TYPE}
    )
    available_stock = _units(load_default=0)
    restock_threshold = _units(load_default=0)
    max_stock = _units(load_default=10_000)


class ProductListQuery(Schema):
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=MAX_PAGE))
    page_size = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    brand = fields.String(
        validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_BRAND + " (else 422)"}
    )
    type = fields.String(
        validate=validate.Length(min=1, max=100), metadata={"description": EXISTING_TYPE + " (else 422)"}
    )
    q = fields.String(
        validate=validate.Length(min=1, max=100),
        metadata={
            "description": f"words to find in the name or description: a letter or digit, and at most "
            f"{MAX_SEARCH_WORDS} runs of ASCII letters, digits and _",
            # what _search_words accepts: a word, at most MAX_SEARCH_WORDS of them
            "pattern": rf"^[^A-Za-z0-9_]*[A-Za-z0-9_]+([^A-Za-z0-9_]+[A-Za-z0-9_]+){{0,{MAX_SEARCH_WORDS - 1}}}"
            r"[^A-Za-z0-9_]*$",
        },
    )
    sort = fields.String(load_default="name", validate=validate.OneOf(repo.SORT_OPTIONS))


class ProductIds(fields.Field):
    """Comma-separated product ids (UUIDs), at most MAX_BATCH once duplicates are dropped; blanks are ignored."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        if not isinstance(value, str):
            raise ValidationError("must be comma-separated product ids")
        try:
            return _batch_ids(value)
        except ValidationProblem as problem:
            raise ValidationError(problem.errors["ids"]) from None


class BatchQuery(Schema):
    ids = ProductIds(
        required=True,
        metadata={
            # Swagger 2's default collectionFormat for a query array is csv: a,b,c
            "type": "array",
            "items": {"type": "string", "format": "uuid"},
            "minItems": 1,
            "maxItems": MAX_BATCH,
            "description": f"comma-separated product ids, at most {MAX_BATCH}; unknown ids are left out",
        },
    )


class ConditionalHeaders(Schema):
    if_none_match = fields.String(
        data_key="If-None-Match", metadata={"description": "ETag(s) of a copy you have: 304 when it is current"}
    )


class PictureName(Schema):
    name = fields.String(required=True, metadata={"description": "as named by a product's picture_url"})


class ProductIdPath(Schema):
    id = fields.UUID(required=True)


class RestockSchema(Schema):
    quantity = fields.Integer(required=True, strict=True, validate=validate.Range(min=1, max=MAX_UNITS))


class NamedCreateSchema(Schema):
    # a character that is not white space (Python's or ECMA-262's) nor a control: the name is stored trimmed
    name = fields.String(
        required=True, validate=validate.Length(min=1, max=100), metadata={"pattern": r"[^\s\x00-\x1f\x7f-\x9f]"}
    )


class NamedSchema(Schema):
    id = fields.String()
    name = fields.String()


class NamedListSchema(Schema):
    items = fields.List(fields.Nested(NamedSchema))
    total = fields.Integer()


class ProductSchema(Schema):
    id = fields.String()
    name = fields.String()
    description = fields.String()
    price = fields.String(metadata={"example": "19.99"})
    currency = fields.String()
    brand_id = fields.String()
    brand = fields.String()
    type_id = fields.String()
    type = fields.String()
    picture_url = fields.String(allow_none=True)
    available_stock = fields.Integer()
    restock_threshold = fields.Integer()
    max_stock = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class ProductPageSchema(Schema):
    items = fields.List(fields.Nested(ProductSchema))
    page = fields.Integer()
    page_size = fields.Integer()
    total = fields.Integer()


class ProductBatchSchema(Schema):
    items = fields.List(fields.Nested(ProductSchema))


class RestockResultSchema(Schema):
    added = fields.Integer()
    product = fields.Nested(ProductSchema)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _etag_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: weak comparison against any listed tag, or ``*``."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def _cached_body(request: web.Request, body: bytes, etag: str | None = None) -> web.Response:
    """JSON bytes with a strong ETag (``etag`` when it was made with the body, else a hash of it), or 304 when
    the client has them already."""
    etag = etag or etag_of(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers, content_type="application/json")


async def _fresh_model(request: web.Request) -> CatalogReadModel:
    """The read model, holding every change committed before this request (its freshness invariant)."""
    model = request.app[READ_MODEL]
    await model.fresh()
    return model


def _named_ref(named: Named, ref: str, field: str) -> str:
    found = named.resolve(ref)
    if found is None:
        raise ValidationProblem.field(field, f"there is no {field} {ref!r}; see {PREFIX}/{field}s")
    return found


def _engine(request: web.Request) -> AsyncEngine:
    """The engine for plain reads: autocommit, so a read costs no BEGIN and no ROLLBACK round trip.
    Each read is one statement (page and total together), so it needs no transaction to be consistent."""
    return request.app[READS]


def _system(request: web.Request) -> ActorSystem:
    system = request.app[AppKeyRuntime].system
    assert system is not None
    return system


async def _named_id(conn: AsyncConnection, table: Table, ref: str, field: str) -> str:
    found = await repo.resolve_named(conn, table, ref)
    if found is None:
        raise ValidationProblem.field(field, f"there is no {field} {ref!r}; see {PREFIX}/{_LIST_PATH[table.name]}")
    return found


async def _resolve_brand_and_type(conn: AsyncConnection, data: dict[str, Any]) -> dict[str, str]:
    """``brand``/``type`` of a request (id or name) as ``brand_id``/``type_id``; 422 for unknown ones."""
    resolved: dict[str, str] = {}
    for field, table in (("brand", repo.brands), ("type", repo.product_types)):
        if data.get(field) is not None:
            resolved[f"{field}_id"] = await _named_id(conn, table, data[field], field)
    return resolved


_TYPED_WORD = re.compile(r"[A-Za-z0-9_]+")  # a word as the document's pattern counts it (ECMA-262 \w)


_QUERY_WORDS: dict[str, tuple[str, ...]] = {}  # the words of recent accepted queries (folding them costs)
_QUERY_WORDS_KEPT = 4096


def _search_words(q: str | None) -> tuple[str, ...]:
    if q is None:
        return ()
    found = _QUERY_WORDS.get(q)
    if found is None:
        found = _query_words(q)
        if len(_QUERY_WORDS) >= _QUERY_WORDS_KEPT:
            _QUERY_WORDS.clear()
        _QUERY_WORDS[q] = found
    return found


def _query_words(q: str) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(repo.words(q)))
    if not found:
        raise ValidationProblem.field("q", "must contain a letter or a digit to search for")
    # Counted as the document's pattern counts (ECMA-262 \w: ASCII letters, digits, _), so no request it allows is
    # refused; the 100-character limit bounds the search terms that other letters add.
    if len(set(_TYPED_WORD.findall(q))) > MAX_SEARCH_WORDS:
        raise ValidationProblem.field("q", f"may have at most {MAX_SEARCH_WORDS} words")
    return found


def _batch_ids(raw: str) -> list[str]:
    ids: list[str] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        canonical = repo.canonical_uuid(part)
        if canonical is None:
            raise ValidationProblem.field("ids", f"{part[:40]!r} is not a product id (a UUID)")
        ids.append(canonical)
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_BATCH:
        raise ValidationProblem.field("ids", f"at most {MAX_BATCH} ids per request, got {len(ids)}")
    return ids


async def _product(request: web.Request, product_id: str) -> dict[str, Any]:
    """The product's JSON as stored now (after a write: as that write left it)."""
    async with _engine(request).connect() as conn:
        row = await repo.get_product(conn, product_id)
    if row is None:
        raise NotFound(f"no product {product_id}")
    return product_json(row)


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class ProductListing:
    page: int
    page_size: int
    sort: str
    brand: str | None = None
    type: str | None = None
    q: str | None = None


@dataclass(frozen=True, slots=True)
class ProductBatch:
    ids: list[str]


@dataclass(frozen=True, slots=True)
class ProductRef:
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class PictureRef:
    name: str


@dataclass(frozen=True, slots=True)
class NewProduct:
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProductChange:
    id: uuid.UUID
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Restock:
    id: uuid.UUID
    quantity: int


@dataclass(frozen=True, slots=True)
class NewName:
    name: str


NOT_MODIFIED = Reply(None, "not modified: the If-None-Match ETag is current", {"ETag": {"type": "string"}})


def _cached(schema: type[Schema]) -> dict[int, Reply]:
    """The answers of a cached read: the body with its ETag, or 304."""
    etag = {"ETag": {"type": "string", "description": "send it back in If-None-Match"}}
    return {200: Reply(schema, "OK", etag), 304: NOT_MODIFIED}


# ---------------------------------------------------------------------------------------------------
# Reads


@endpoint(
    ProductListing,
    tags=["catalog"],
    summary="Browse and search products",
    description="Paged; filter by brand and type, search words, sort.",
    query=ProductListQuery,
    headers=ConditionalHeaders,
    responses=_cached(ProductPageSchema),
)
async def list_products(request: web.Request, listing: ProductListing) -> web.Response:
    words = _search_words(listing.q)
    model = await _fresh_model(request)
    query = repo.ProductQuery(
        page=listing.page,
        page_size=listing.page_size,
        brand_id=_named_ref(model.brands, listing.brand, "brand") if listing.brand is not None else None,
        type_id=_named_ref(model.types, listing.type, "type") if listing.type is not None else None,
        search=words,
        sort=listing.sort,
    )
    items, total = model.browse(query)
    return _cached_body(request, page_body(items, query.page, query.page_size, total))


@endpoint(
    ProductBatch,
    tags=["catalog"],
    summary="Several products by id (for the cart); unknown ids are left out",
    query=BatchQuery,
    headers=ConditionalHeaders,
    responses=_cached(ProductBatchSchema),
)
async def batch_products(request: web.Request, batch: ProductBatch) -> web.Response:
    model = await _fresh_model(request)
    return _cached_body(request, batch_body(model.products(batch.ids)))


@endpoint(
    ProductRef,
    tags=["catalog"],
    summary="One product",
    path=ProductIdPath,
    headers=ConditionalHeaders,
    responses=_cached(ProductSchema),
)
async def get_product(request: web.Request, product: ProductRef) -> web.Response:
    product_id = str(product.id)
    found = (await _fresh_model(request)).product(product_id)
    if found is None:
        raise NotFound(f"no product {product_id}")
    return _cached_body(request, found.body, found.etag)


def _named_list(table: Table) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @endpoint(
        tags=["catalog"],
        summary=f"All {_LIST_PATH[table.name]}",
        headers=ConditionalHeaders,
        responses=_cached(NamedListSchema),
    )
    async def handler(request: web.Request) -> web.Response:
        model = await _fresh_model(request)
        named = model.brands if table is repo.brands else model.types
        return _cached_body(request, named.body, named.etag)

    return handler


@endpoint(
    PictureRef,
    tags=["catalog"],
    summary="A product picture (SVG), as named by a product's picture_url",
    path=PictureName,
    headers=ConditionalHeaders,
    responses={
        200: Reply(None, "the picture", {"ETag": {"type": "string"}, "Cache-Control": {"type": "string"}}),
        304: NOT_MODIFIED,
    },
    produces=(pictures.CONTENT_TYPE,),
)
async def get_picture(request: web.Request, picture: PictureRef) -> web.Response:
    found = pictures.get(picture.name)
    if found is None:
        raise NotFound("no such picture")
    headers = {
        "ETag": found.etag,
        "Cache-Control": pictures.CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'",  # an SVG opened on its own runs nothing
    }
    if _etag_matches(request.headers.get("If-None-Match"), found.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers=headers, content_type=pictures.CONTENT_TYPE)


# ---------------------------------------------------------------------------------------------------
# Admin writes (through the ProductActor)

_CREATED = {"Location": {"type": "string", "description": "the product's URL"}}


@endpoint(
    NewProduct,
    tags=["catalog admin"],
    summary="Create a product",
    description="brand and type must exist (422 naming the field otherwise); available_stock at most max_stock.",
    body=ProductCreateSchema,
    responses={201: Reply(ProductSchema, "created", _CREATED)},
    auth=ADMIN,
    problems=(409,),
)
async def create_product(request: web.Request, new: NewProduct) -> web.Response:
    data = new.body
    async with _engine(request).connect() as conn:
        ids = await _resolve_brand_and_type(conn, data)
    product_id = str(data.get("id") or uuid.uuid4())
    command = CreateProduct(
        product_id=product_id,
        name=data["name"],
        description=data["description"],
        price=data["price"],
        currency=data["currency"],
        brand_id=ids["brand_id"],
        type_id=ids["type_id"],
        picture_url=data.get("picture_url") or None,
        available_stock=data["available_stock"],
        restock_threshold=data["restock_threshold"],
        max_stock=data["max_stock"],
    )
    await _system(request).ref(ProductActor, product_id).ask(command)
    location = {"Location": f"{PREFIX}/products/{product_id}"}
    return json_response(await _product(request, product_id), status=201, headers=location)


@endpoint(
    ProductChange,
    tags=["catalog admin"],
    summary="Change a product: details, price, stock",
    description="At least one field. brand and type must exist; available_stock at most max_stock (422 otherwise).",
    path=ProductIdPath,
    body=ProductFieldsSchema,
    body_min_properties=1,
    responses={200: ProductSchema},
    auth=ADMIN,
    problems=(409,),
)
async def update_product(request: web.Request, change: ProductChange) -> web.Response:
    data = change.body
    if not data:
        raise ValidationProblem.field("body", "give at least one field to change")
    product_id = str(change.id)
    async with _engine(request).connect() as conn:
        ids: dict[str, Any] = await _resolve_brand_and_type(conn, data)
    changes: dict[str, Any] = {k: v for k, v in data.items() if k not in ("brand", "type")}
    if "picture_url" in changes:
        changes["picture_url"] = changes["picture_url"] or ""  # "" (or null) removes the picture
    await _system(request).ref(ProductActor, product_id).ask(UpdateProduct(product_id, **changes, **ids))
    return json_response(await _product(request, product_id))


@endpoint(
    Restock,
    tags=["catalog admin"],
    summary="Add units, up to the product's max_stock",
    path=ProductIdPath,
    body=RestockSchema,
    responses={200: RestockResultSchema},
    auth=ADMIN,
    problems=(409,),
)
async def restock_product(request: web.Request, restock: Restock) -> web.Response:
    product_id = str(restock.id)
    added = await _system(request).ref(ProductActor, product_id).ask(RestockProduct(product_id, restock.quantity))
    return json_response({"added": added, "product": await _product(request, product_id)})


@endpoint(
    ProductRef,
    tags=["catalog admin"],
    summary="Delete a product (refused while an open order holds it)",
    path=ProductIdPath,
    responses={204: "deleted"},
    auth=ADMIN,
    problems=(409,),
)
async def delete_product(request: web.Request, product: ProductRef) -> web.Response:
    product_id = str(product.id)
    await _system(request).ref(ProductActor, product_id).ask(DeleteProduct(product_id))
    return web.Response(status=204)


def _named_create(table: Table) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    kind = "brand" if table is repo.brands else "type"

    @endpoint(
        NewName,
        tags=["catalog admin"],
        summary=f"Add a {kind}",
        body=NamedCreateSchema,
        responses={201: Reply(NamedSchema, "created", {"Location": {"type": "string"}})},
        auth=ADMIN,
        problems=(409,),
    )
    async def handler(request: web.Request, new: NewName) -> web.Response:
        name = new.name.strip()
        if not name:
            raise ValidationProblem.field("name", "must not be blank")
        engine = request.app[AppKeyRuntime].engine
        assert engine is not None  # the catalog service always has its database
        async with engine.begin() as conn:  # a transaction: not the read engine
            row = await repo.create_named(conn, table, name)
        if row is None:
            raise Conflict(f"a {kind} named {name!r} exists already", slug=f"{kind}-exists")
        return json_response(row, status=201, headers={"Location": f"{PREFIX}/{_LIST_PATH[table.name]}"})

    return handler


# ---------------------------------------------------------------------------------------------------
# Wiring


def setup(app: web.Application) -> None:
    runtime = app[AppKeyRuntime]
    assert runtime.engine is not None  # the catalog service always has its database
    app[READS] = runtime.engine.execution_options(isolation_level="AUTOCOMMIT")
    app[READ_MODEL] = model = CatalogReadModel(app[READS])
    runtime.on_start.append(model.start)  # loaded before the service takes requests
    runtime.on_stop.append(model.stop)
    # "batch" before "{id}": the router tries resources in the order they were added.
    app.router.add_get(f"{PREFIX}/products/batch", batch_products)
    app.router.add_get(f"{PREFIX}/products", list_products)
    app.router.add_post(f"{PREFIX}/products", create_product)
    app.router.add_get(f"{PREFIX}/products/{{id}}", get_product)
    app.router.add_patch(f"{PREFIX}/products/{{id}}", update_product)
    app.router.add_delete(f"{PREFIX}/products/{{id}}", delete_product)
    app.router.add_post(f"{PREFIX}/products/{{id}}/restock", restock_product)
    app.router.add_get(f"{pictures.PICTURES_PATH}/{{name}}", get_picture)
    for table in (repo.brands, repo.product_types):
        path = f"{PREFIX}/{_LIST_PATH[table.name]}"
        app.router.add_get(path, _named_list(table))
        app.router.add_post(path, _named_create(table))
