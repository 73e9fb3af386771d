"""Admin writes: who may make them, validation, events, restock, delete, brands and types."""

from __future__ import annotations

from decimal import Decimal

from contracts.stock import (
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)

PRODUCTS = "/api/catalog/products"


async def test_writes_are_refused_for_anonymous_and_customer_callers(catalog):
    cat = await catalog(seed=False)
    product = await cat.create(name="Guarded Lantern", available_stock=5)
    url = f"{PRODUCTS}/{product['id']}"
    writes = [
        ("POST", PRODUCTS, {"name": "Sneaky", "price": "1.00", "brand": "Northwind Outfitters", "type": "Lighting"}),
        ("POST", PRODUCTS, {"price": "-5"}),  # an invalid body is still 401/403, never a 422 hint
        ("PATCH", url, {"price": "0.01"}),
        ("POST", f"{url}/restock", {"quantity": 5}),
        ("DELETE", url, None),
        ("POST", "/api/catalog/brands", {"name": "Sneaky Brand"}),
    ]
    for who, headers, status in (("anonymous", {}, 401), ("customer", cat.customer(), 403)):
        for method, path, body in writes:
            resp = await cat.client.request(method, path, json=body, headers=headers)
            assert resp.status == status and resp.content_type == "application/problem+json", (who, method, path)
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await cat.client.patch(url, json={"price": "0.01"}, headers={"Authorization": "Bearer not.a.token"})
    assert resp.status == 401
    assert await (await cat.client.get(url)).json() == product  # nothing changed
    assert (await (await cat.client.get(PRODUCTS)).json())["total"] == 1


async def test_bad_product_input_is_a_problem_naming_the_field(catalog):
    cat = await catalog(seed=False)
    valid = {"name": "Camp Lantern", "price": "19.99", "brand": "Northwind Outfitters", "type": "Lighting"}
    cases = [
        ({"price": "-0.01"}, "price"),
        ({"price": "1.999"}, "price"),
        ({"price": "cheap"}, "price"),
        ({"price": "NaN"}, "price"),
        ({"available_stock": -1}, "available_stock"),
        ({"available_stock": "5"}, "available_stock"),
        ({"restock_threshold": -3}, "restock_threshold"),
        ({"brand": "Acme Rockets"}, "brand"),
        ({"type": "Spaceships"}, "type"),
        ({"currency": "usd"}, "currency"),
        ({"name": ""}, "name"),
        ({"id": "not-a-uuid"}, "id"),
        ({"available_stock": 50, "max_stock": 10}, "available_stock"),  # checked by the actor, across fields
    ]
    for change, field in cases:
        resp = await cat.client.post(PRODUCTS, json={**valid, **change}, headers=cat.admin())
        assert resp.status == 422 and resp.content_type == "application/problem+json", change
        assert [e["field"] for e in (await resp.json())["errors"]] == [field], change
    resp = await cat.client.post(PRODUCTS, json={"price": "1.00"}, headers=cat.admin())
    assert resp.status == 422 and {e["field"] for e in (await resp.json())["errors"]} == {"name", "brand", "type"}

    product = await cat.create(available_stock=5, max_stock=10)
    url = f"{PRODUCTS}/{product['id']}"
    for body, field in [({"price": "-1"}, "price"), ({"available_stock": 11}, "available_stock"),
                        ({"max_stock": 4}, "available_stock"), ({}, "body"), ({"brand": "Nope"}, "brand")]:  # fmt: skip
        resp = await cat.client.patch(url, json=body, headers=cat.admin())
        assert resp.status == 422 and [e["field"] for e in (await resp.json())["errors"]] == [field], body
    assert await (await cat.client.get(url)).json() == product, "a refused change leaves nothing behind"
    missing = await cat.client.patch(
        f"{PRODUCTS}/00000000-0000-4000-8000-000000000000", json={"price": "1.00"}, headers=cat.admin()
    )
    assert missing.status == 404


async def test_create_update_search_and_events(catalog):
    cat = await catalog(seed=False)
    product = await cat.create(name="Glacier Lantern", description="A bright lantern", price="20", available_stock=30,
                               restock_threshold=5, max_stock=50, picture_url="/images/glacier.webp")  # fmt: skip
    assert (product["price"], product["available_stock"], product["brand"], product["type"]) == (
        "20.00",
        30,
        "Northwind Outfitters",
        "Lighting",
    )
    url = f"{PRODUCTS}/{product['id']}"
    resp = await cat.client.get(url)
    assert await resp.json() == product

    # price change: one event with the old and the new price
    resp = await cat.client.patch(url, json={"price": "24.50"}, headers=cat.admin())
    assert resp.status == 200 and (await resp.json())["price"] == "24.50"
    # same values again: nothing happens, no event
    assert (
        await cat.client.patch(url, json={"price": "24.5", "name": "Glacier Lantern"}, headers=cat.admin())
    ).status == 200
    # stock down to the threshold: low-stock event; rename: search follows; null removes the picture
    resp = await cat.client.patch(
        url,
        json={"available_stock": 5, "name": "Crevasse Lamp", "picture_url": None, "type": "Climbing"},
        headers=cat.admin(),
    )
    updated = await resp.json()
    assert (updated["available_stock"], updated["name"], updated["picture_url"], updated["type"]) == (
        5,
        "Crevasse Lamp",
        None,
        "Climbing",
    )
    assert updated["created_at"] == product["created_at"] and updated["updated_at"] > product["updated_at"]
    found = await (await cat.client.get(PRODUCTS, params={"q": "crevasse"})).json()
    assert [p["id"] for p in found["items"]] == [product["id"]]
    assert (await (await cat.client.get(PRODUCTS, params={"q": "glacier"})).json())["total"] == 0

    # the totals follow a product that moves to another type
    for kind, total in (("Climbing", 1), ("Lighting", 0)):
        listing = await (await cat.client.get(PRODUCTS, params={"type": kind})).json()
        assert listing["total"] == total and len(listing["items"]) == total, kind

    # search results sort by the current price
    cheaper = await cat.create(name="Crevasse Marker", price="30.00")
    by_price = await (await cat.client.get(PRODUCTS, params={"q": "crevasse", "sort": "price"})).json()
    assert [p["id"] for p in by_price["items"]] == [product["id"], cheaper["id"]]
    await cat.client.patch(f"{PRODUCTS}/{cheaper['id']}", json={"price": "3.00"}, headers=cat.admin())
    by_price = await (await cat.client.get(PRODUCTS, params={"q": "crevasse", "sort": "price"})).json()
    assert [p["id"] for p in by_price["items"]] == [cheaper["id"], product["id"]] and by_price["total"] == 2

    await cat.settle()
    assert cat.events_of("ProductPriceChanged") == [
        {"product_id": product["id"], "old_price": "20.00", "new_price": "24.50", "currency": "USD"},
        {"product_id": cheaper["id"], "old_price": "30.00", "new_price": "3.00", "currency": "USD"},
    ]
    assert cat.events_of("ProductLowStock") == [
        {"product_id": product["id"], "available_stock": 5, "restock_threshold": 5}
    ]
    assert all(e.session_id == e.body["product_id"] for e in cat.events)

    # an id chosen by the client makes a retried create safe: the second one is a conflict, not a copy
    chosen = "6b0f2f8e-8a8c-4d39-9a0e-3f7f3c1f0b11"
    assert (await cat.create(id=chosen))["id"] == chosen
    again = await cat.client.post(
        PRODUCTS,
        json={"id": chosen, "name": "X", "price": "1", "brand": "Northwind Outfitters", "type": "Lighting"},
        headers=cat.admin(),
    )
    assert again.status == 409


async def test_restock_adds_up_to_max_stock(catalog):
    cat = await catalog(seed=False)
    product = await cat.create(available_stock=8, max_stock=10)
    url = f"{PRODUCTS}/{product['id']}/restock"
    resp = await cat.client.post(url, json={"quantity": 5}, headers=cat.admin())
    body = await resp.json()
    assert resp.status == 200 and body["added"] == 2 and body["product"]["available_stock"] == 10
    assert (await (await cat.client.post(url, json={"quantity": 1}, headers=cat.admin())).json())["added"] == 0
    resp = await cat.client.post(url, json={"quantity": 0}, headers=cat.admin())
    assert resp.status == 422 and (await resp.json())["errors"][0]["field"] == "quantity"


async def test_delete_is_refused_while_an_open_order_holds_the_product(catalog):
    cat = await catalog(seed=False)
    product = await cat.create(available_stock=5)
    pid, url = product["id"], f"{PRODUCTS}/{product['id']}"
    assert isinstance(await cat.ask(pid, ReserveStock("order-1", pid, 2)), StockReserved)

    resp = await cat.client.delete(url, headers=cat.admin())
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["type"].endswith("/product-reserved") and problem["open_orders"] == ["order-1"]
    assert "open order" in problem["detail"]
    assert (await cat.client.get(url)).status == 200

    await cat.ask(pid, ReleaseStock("order-1", pid))
    assert (await cat.client.delete(url, headers=cat.admin())).status == 204
    assert (await cat.client.get(url)).status == 404
    assert (await cat.client.delete(url, headers=cat.admin())).status == 204  # a retried delete: same outcome
    assert (await cat.client.patch(url, json={"price": "1.00"}, headers=cat.admin())).status == 404
    assert (await (await cat.client.get(PRODUCTS, params={"q": "lantern"})).json())["total"] == 0
    assert (await (await cat.client.get(PRODUCTS)).json()) == {"items": [], "page": 1, "page_size": 20, "total": 0}
    late = await cat.ask(pid, ReserveStock("order-2", pid, 1))
    assert isinstance(late, StockRejected) and late.reason == "product_deleted"
    await cat.settle()
    assert cat.events_of("ProductDeleted") == [{"product_id": pid}]
    missing = await cat.client.delete(f"{PRODUCTS}/00000000-0000-4000-8000-000000000000", headers=cat.admin())
    assert missing.status == 404


async def test_brands_and_types_can_be_added(catalog):
    cat = await catalog(seed=False)
    resp = await cat.client.post("/api/catalog/brands", json={"name": "Fjordline"}, headers=cat.admin())
    assert resp.status == 201
    brand = await resp.json()
    dup = await cat.client.post("/api/catalog/brands", json={"name": "FJORDLINE"}, headers=cat.admin())
    assert dup.status == 409 and dup.content_type == "application/problem+json"
    resp = await cat.client.post("/api/catalog/types", json={"name": "Kayaks"}, headers=cat.admin())
    assert resp.status == 201
    product = await cat.create(brand=brand["id"], type="kayaks", price="899.00")
    assert (product["brand"], product["type"], Decimal(product["price"])) == ("Fjordline", "Kayaks", Decimal(899))
    names = [b["name"] for b in (await (await cat.client.get("/api/catalog/brands")).json())["items"]]
    assert "Fjordline" in names and names == sorted(names)
