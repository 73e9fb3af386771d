"""The cart's HTTP API against a real catalog: lines priced by the catalog, limits, bad input, whose cart it is."""

from __future__ import annotations

import uuid

import pytest

from actors.cart import repository
from actors.cart.actor import MAX_LINE_QUANTITY


async def test_lines_are_priced_by_the_catalog_and_totals_are_decimal_strings(shop, catalog):
    lamp = await catalog.add("Desk Lamp", "19.99", picture_url="/img/lamp.png")
    bulb = await catalog.add("Bulb", "0.10")
    me = shop.shopper()

    assert (await me.get())["lines"] == []
    await me.put(lamp, 2)
    cart = await me.put(bulb, 3)

    assert cart["lines"] == [
        {
            "product_id": lamp,
            "name": "Desk Lamp",
            "unit_price": "19.99",
            "quantity": 2,
            "line_total": "39.98",
            "picture_url": "/img/lamp.png",
        },
        {
            "product_id": bulb,
            "name": "Bulb",
            "unit_price": "0.10",
            "quantity": 3,
            "line_total": "0.30",
            "picture_url": "",
        },
    ]
    assert (cart["item_count"], cart["subtotal"], cart["total"], cart["currency"]) == (5, "40.28", "40.28", "USD")
    assert cart["notes"] == [] and cart["updated_at"].endswith("Z")
    assert await me.get() == cart


async def test_set_is_idempotent_zero_removes_and_delete_routes_work(shop, catalog):
    lamp, bulb = await catalog.add("Lamp", "5.00"), await catalog.add("Bulb", "1.00")
    me = shop.shopper()
    first = await me.put(lamp, 4)
    assert await me.put(lamp, 4) == first  # the same PUT again changes nothing, not even the time
    assert (await me.put(lamp, 1))["item_count"] == 1
    await me.put(bulb, 2)

    assert [line["product_id"] for line in (await me.put(lamp, 0))["lines"]] == [bulb]
    resp = await shop.client.delete(f"/api/cart/items/{bulb}", headers=me.headers)
    assert resp.status == 200 and (await resp.json())["lines"] == []
    resp = await shop.client.delete(f"/api/cart/items/{bulb}", headers=me.headers)
    assert resp.status == 200  # removing what is not there is no error: DELETE is idempotent

    await me.put(lamp, 1)
    await me.put(bulb, 1)
    resp = await shop.client.delete("/api/cart", headers=me.headers)
    body = await resp.json()
    assert resp.status == 200 and body["lines"] == [] and body["total"] == "0.00" and body["currency"] is None
    assert await repository.products_in(shop.engine, me.sub) == set()


async def test_query_table_follows_the_lines(shop, catalog):
    a, b = await catalog.add("A"), await catalog.add("B")
    me = shop.shopper()
    await me.put(a, 1)
    await me.put(b, 1)
    assert await repository.products_in(shop.engine, me.sub) == {a, b}
    assert await repository.carts_holding(shop.engine, a) == [me.sub]
    await me.put(a, 0)
    assert await repository.products_in(shop.engine, me.sub) == {b}


async def test_unknown_deleted_and_out_of_stock_products_are_refused_without_change(shop, catalog):
    lamp = await catalog.add("Lamp", "5.00", stock=3)
    gone = await catalog.add("Discontinued")
    await catalog.delete(gone)
    me = shop.shopper()
    await me.put(lamp, 1)
    before = await me.get()

    for product_id in (str(uuid.uuid4()), gone):
        problem = await me.put(product_id, 1, status=404)
        assert problem["type"].endswith("/unknown-product") and product_id in problem["detail"]
    problem = await me.put(lamp, 4, status=409)
    assert problem["type"].endswith("/insufficient-stock") and problem["available"] == 3
    assert "only 3" in problem["detail"]
    assert await me.get() == before


@pytest.mark.parametrize("quantity", [-1, 10_000, MAX_LINE_QUANTITY + 1, "2", 2.5, True, None])
async def test_bad_quantity_is_422_naming_the_field(shop, catalog, quantity):
    lamp = await catalog.add()
    me = shop.shopper()
    resp = await shop.client.put(f"/api/cart/items/{lamp}", json={"quantity": quantity}, headers=me.headers)
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    body = await resp.json()
    assert [e["field"] for e in body["errors"]] == ["quantity"]
    assert (await me.get())["lines"] == []


async def test_missing_quantity_and_malformed_product_id_are_422(shop):
    me = shop.shopper()
    resp = await shop.client.put(f"/api/cart/items/{uuid.uuid4()}", json={}, headers=me.headers)
    assert resp.status == 422 and [e["field"] for e in (await resp.json())["errors"]] == ["quantity"]
    for method in ("put", "delete"):
        resp = await getattr(shop.client, method)(
            "/api/cart/items/not-a-uuid", json={"quantity": 1}, headers=me.headers
        )
        body = await resp.json()
        assert resp.status == 422 and [e["field"] for e in body["errors"]] == ["product_id"], body


async def test_a_customer_reaches_only_their_own_cart(shop, catalog):
    lamp, bulb = await catalog.add("Lamp"), await catalog.add("Bulb")
    alice, mallory = shop.shopper(), shop.shopper()
    await alice.put(lamp, 2)

    assert (await mallory.get())["lines"] == []  # the route has no id: Mallory sees her own (empty) cart
    await mallory.put(bulb, 1)
    resp = await shop.client.delete("/api/cart", headers={**mallory.headers, "X-Cart-Id": alice.sub})
    assert resp.status == 200
    resp = await shop.client.get(f"/api/cart?cart_id={alice.sub}", headers=mallory.headers)
    assert (await resp.json())["lines"] == []

    alice_cart = await alice.get()
    assert [(line["product_id"], line["quantity"]) for line in alice_cart["lines"]] == [(lamp, 2)]
    resp = await shop.client.get(f"/api/cart/admin/actors/cart/{alice.sub}", headers=mallory.headers)
    assert resp.status == 403


async def test_admin_inspects_any_cart_through_the_admin_endpoint(shop, catalog, test_identity):
    lamp = await catalog.add("Lamp", "3.00")
    me = shop.shopper()
    await me.put(lamp, 2)
    resp = await shop.client.get(
        f"/api/cart/admin/actors/cart/{me.sub}", headers=test_identity.headers(test_identity.admin_token())
    )
    assert resp.status == 200
    state = (await resp.json())["state"]
    assert state["lines"][lamp]["quantity"] == 2 and state["lines"][lamp]["unit_price"] == "3.00"


async def test_authentication_comes_before_validation(shop, test_identity):
    resp = await shop.client.put("/api/cart/items/not-a-uuid", json={"quantity": -1})
    assert resp.status == 401 and resp.content_type == "application/problem+json"
    assert "Bearer" in resp.headers["WWW-Authenticate"]
    other_role = test_identity.headers(test_identity.token("svc", roles=("support",)))
    assert (await shop.client.get("/api/cart", headers=other_role)).status == 403
    assert (await shop.client.get("/api/cart")).status == 401
