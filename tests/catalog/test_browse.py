"""Reads: paging, filters, search, sorting, details, batch, ETags and bad input, over real HTTP."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from actors.catalog import service

PRODUCTS = "/api/catalog/products"


def demo() -> list[dict[str, Any]]:
    return service.load_demo_catalog()["products"]


def matches(product: dict[str, Any], query: str) -> bool:
    """The oracle for search: every query word starts some word of the name or the description (a word
    under three characters must be the whole word)."""
    words = re.findall(r"\w+", f"{product['name']} {product['description']}".lower())

    def found(q: str) -> bool:
        return any(w == q or (len(q) >= 3 and w.startswith(q)) for w in words)

    return all(found(q) for q in re.findall(r"\w+", query.lower()))


async def get_all(client, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a listing, page by page (page_size 100)."""
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        resp = await client.get(PRODUCTS, params={**params, "page": page, "page_size": 100})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        items += body["items"]
        if len(body["items"]) < 100:
            return items, body["total"]
        page += 1


async def test_paging_walks_the_whole_catalog_once(catalog):
    cat = await catalog()
    expected = len(demo())
    seen: list[str] = []
    page = 1
    while True:
        resp = await cat.client.get(PRODUCTS, params={"page": page, "page_size": 13})
        body = await resp.json()
        assert (body["page"], body["page_size"], body["total"]) == (page, 13, expected)
        if not body["items"]:
            break
        assert len(body["items"]) == min(13, expected - len(seen))
        seen += [p["id"] for p in body["items"]]
        page += 1
    assert len(seen) == len(set(seen)) == expected >= 100
    default = await (await cat.client.get(PRODUCTS)).json()
    assert (default["page"], default["page_size"], len(default["items"])) == (1, 20, 20)


async def test_filters_search_and_sorting_return_the_right_items(catalog):
    cat = await catalog()
    data = demo()
    brands = {b["name"]: b["id"] for b in (await (await cat.client.get("/api/catalog/brands")).json())["items"]}
    types = {t["name"]: t["id"] for t in (await (await cat.client.get("/api/catalog/types")).json())["items"]}
    assert len(brands) >= 5 and len(types) >= 5

    def names(items: list[dict[str, Any]]) -> set[str]:
        return {p["name"] for p in items}

    # brand and type, by name (any case) or by id, alone and together
    for params, expected in [
        ({"brand": "Summit Forge"}, {p["name"] for p in data if p["brand"] == "Summit Forge"}),
        ({"brand": "summit forge"}, {p["name"] for p in data if p["brand"] == "Summit Forge"}),
        ({"brand": brands["Polaris Gear"]}, {p["name"] for p in data if p["brand"] == "Polaris Gear"}),
        ({"type": "Tents"}, {p["name"] for p in data if p["type"] == "Tents"}),
        ({"type": types["Climbing"], "brand": "Alpine Ridge"},
         {p["name"] for p in data if p["type"] == "Climbing" and p["brand"] == "Alpine Ridge"}),
    ]:  # fmt: skip
        items, total = await get_all(cat.client, **params)
        assert names(items) == expected and total == len(expected) > 0, params
        assert all(p["brand_id"] == brands[p["brand"]] and p["type_id"] == types[p["type"]] for p in items)

    # text search: words (or word starts) in the name or the description, every word must match
    for q in ("waterproof", "TITAN", "insulated bottle", "down sleeping", "merino", "4 person", "Pour-Over"):
        items, total = await get_all(cat.client, q=q)
        expected = {p["name"] for p in data if matches(p, q)}
        assert names(items) == expected and total == len(expected) > 0, q
    items, total = await get_all(cat.client, q="waterproof", type="Jackets", sort="-price")
    assert names(items) == {p["name"] for p in data if matches(p, "waterproof") and p["type"] == "Jackets"}
    assert [Decimal(p["price"]) for p in items] == sorted((Decimal(p["price"]) for p in items), reverse=True)
    assert await get_all(cat.client, q="zzzyxw") == ([], 0)

    # sorting: by name (case-insensitive) and by price, both ways, ties broken by id
    by_name, _ = await get_all(cat.client, sort="name")
    assert [p["name"] for p in by_name] == sorted((p["name"] for p in data), key=str.casefold)
    reverse, _ = await get_all(cat.client, sort="-name")
    assert reverse == by_name[::-1]
    by_price, _ = await get_all(cat.client, sort="price")
    keys = [(Decimal(p["price"]), p["id"]) for p in by_price]
    assert keys == sorted(keys) and len(keys) == len(data)
    by_price_desc, _ = await get_all(cat.client, sort="-price")
    assert by_price_desc == by_price[::-1]


async def test_details_batch_and_etag_round_trip(catalog):
    cat = await catalog()
    first, second, *_ = (await (await cat.client.get(PRODUCTS, params={"sort": "price"})).json())["items"]

    resp = await cat.client.get(f"{PRODUCTS}/{first['id']}")
    assert resp.status == 200
    product = await resp.json()
    assert product == first
    assert set(product) >= {"id", "name", "description", "price", "currency", "brand", "type", "picture_url",
                            "available_stock", "restock_threshold", "max_stock", "created_at", "updated_at"}  # fmt: skip
    assert re.fullmatch(r"\d+\.\d\d", product["price"]) and product["updated_at"].endswith("Z")

    # ETag + If-None-Match: 304 without a body, also for a weak or listed tag; a change makes a new tag
    etag = resp.headers["ETag"]
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        again = await cat.client.get(f"{PRODUCTS}/{first['id']}", headers={"If-None-Match": header})
        assert again.status == 304 and await again.read() == b"" and again.headers["ETag"] == etag
    listing = await cat.client.get(PRODUCTS, params={"brand": first["brand"]})
    list_etag = listing.headers["ETag"]
    assert (
        await cat.client.get(PRODUCTS, params={"brand": first["brand"]}, headers={"If-None-Match": list_etag})
    ).status == 304
    patched = await cat.client.patch(f"{PRODUCTS}/{first['id']}", json={"price": "1.23"}, headers=cat.admin())
    assert patched.status == 200 and (await patched.json())["price"] == "1.23"
    changed = await cat.client.get(f"{PRODUCTS}/{first['id']}", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag and (await changed.json())["price"] == "1.23"
    relisted = await cat.client.get(PRODUCTS, params={"brand": first["brand"]}, headers={"If-None-Match": list_etag})
    assert relisted.status == 200 and relisted.headers["ETag"] != list_etag

    # batch: in the order asked, unknown ids left out, duplicates once
    unknown = "00000000-0000-4000-8000-000000000000"
    resp = await cat.client.get(
        f"{PRODUCTS}/batch", params={"ids": f"{second['id']},{unknown},{first['id']},{second['id']}"}
    )
    assert [p["id"] for p in (await resp.json())["items"]] == [second["id"], first["id"]]
    batch_etag = resp.headers["ETag"]
    resp = await cat.client.get(
        f"{PRODUCTS}/batch", params={"ids": f"{second['id']},{first['id']}"}, headers={"If-None-Match": batch_etag}
    )
    assert resp.status == 304

    resp = await cat.client.get(f"{PRODUCTS}/{unknown}")
    assert resp.status == 404 and resp.content_type == "application/problem+json"
    brands = await cat.client.get("/api/catalog/brands")
    assert (
        await cat.client.get("/api/catalog/brands", headers={"If-None-Match": brands.headers["ETag"]})
    ).status == 304


BAD_READS = [
    (PRODUCTS, {"page_size": "0"}, "page_size"),
    (PRODUCTS, {"page_size": "10000"}, "page_size"),
    (PRODUCTS, {"page_size": "ten"}, "page_size"),
    (PRODUCTS, {"page": "0"}, "page"),
    (PRODUCTS, {"page": "99999999999999999999"}, "page"),
    (PRODUCTS, {"sort": "cost"}, "sort"),
    (PRODUCTS, {"brand": "No Such Brand"}, "brand"),
    (PRODUCTS, {"type": "Spaceships"}, "type"),
    (PRODUCTS, {"q": "!!!"}, "q"),
    (PRODUCTS, {"q": "x" * 101}, "q"),
    (f"{PRODUCTS}/not-a-uuid", {}, "id"),
    (f"{PRODUCTS}/batch", {"ids": "abc"}, "ids"),
    (f"{PRODUCTS}/batch", {}, "ids"),
    (f"{PRODUCTS}/batch", {"ids": ",".join(f"00000000-0000-4000-8000-{i:012d}" for i in range(101))}, "ids"),
]


async def test_bad_input_is_a_problem_naming_the_field(catalog):
    cat = await catalog(seed=False)  # one service for all cases: a fresh database each would be slow
    for path, params, field in BAD_READS:
        resp = await cat.client.get(path, params=params)
        assert resp.status == 422 and resp.content_type == "application/problem+json", (path, params)
        body = await resp.json()
        assert [e["field"] for e in body["errors"]] == [field] and field in body["detail"], (path, params, body)
