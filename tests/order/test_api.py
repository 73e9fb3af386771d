"""The order API over real HTTP: who sees what, paging, problems, idempotency keys, the OpenAPI document."""

from __future__ import annotations

import asyncio

import pytest

from tests.order.conftest import checkout_request


async def _paid_order(orders, catalog, buyer: str = "buyer-1") -> str:
    request = await orders.checkout((catalog.add(), "10.00", 1), buyer=buyer)
    await orders.wait_status(request.order_id, "paid")
    return request.order_id


async def test_one_order_as_its_buyer_sees_it(orders, catalog):
    product = catalog.add(price="9.99")
    request = await orders.checkout((product, "9.99", 2))
    await orders.wait_status(request.order_id, "paid")
    resp = await orders.client.get(f"/api/orders/{request.order_id}", headers=orders.buyer("buyer-1"))
    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == request.order_id and body["buyer_id"] == "buyer-1" and body["status"] == "paid"
    assert body["lines"] == [
        {
            "product_id": product,
            "name": f"Product {product[:8]}",
            "unit_price": "9.99",
            "quantity": 2,
            "picture_url": "",
        }
    ]
    assert body["total"] == "19.98" and body["currency"] == "USD"
    assert body["shipping_address"]["city"] == "London" and body["shipping_address"]["state"] == ""
    assert [h["status"] for h in body["history"]] == ["submitted", "awaiting_validation", "stock_confirmed", "paid"]
    assert all(h["at"].endswith("Z") for h in body["history"]) and body["created_at"].endswith("Z")
    assert "payment" not in body and "tok_visa" not in await resp.text(), "the payment token is never shown"


async def test_others_orders_are_not_found_and_admins_see_all(orders, catalog):
    order_id = await _paid_order(orders, catalog, buyer="buyer-1")
    path = f"/api/orders/{order_id}"
    for method in ("get", "post"):
        url = path if method == "get" else f"{path}/cancel"
        resp = await getattr(orders.client, method)(url, headers=orders.buyer("someone-else"))
        assert resp.status == 404 and resp.content_type == "application/problem+json"
        assert (await resp.json())["type"].endswith("/order-not-found")
    resp = await orders.client.get(path, headers=orders.admin())
    assert resp.status == 200 and (await resp.json())["buyer_id"] == "buyer-1"
    assert (await orders.client.get("/api/orders/does-not-exist", headers=orders.buyer("buyer-1"))).status == 404
    assert (await orders.client.get("/api/orders/" + "x" * 300, headers=orders.buyer("buyer-1"))).status == 404


async def test_the_list_is_paged_newest_first_and_only_the_buyers_own(orders, catalog):
    mine = []
    for _ in range(5):
        mine.append(await _paid_order(orders, catalog, buyer="buyer-1"))
        await asyncio.sleep(0.01)  # distinct creation times
    theirs = await _paid_order(orders, catalog, buyer="buyer-2")
    headers = orders.buyer("buyer-1")

    first = await (await orders.client.get("/api/orders?page=1&page_size=2", headers=headers)).json()
    assert first["page"] == 1 and first["page_size"] == 2 and first["total"] == 5
    assert [o["id"] for o in first["items"]] == mine[::-1][:2]
    last = await (await orders.client.get("/api/orders?page=3&page_size=2", headers=headers)).json()
    assert [o["id"] for o in last["items"]] == [mine[0]]
    item = first["items"][0]
    assert item["status"] == "paid" and item["total"] == "10.00" and item["buyer_id"] == "buyer-1"
    assert set(item) == {"id", "buyer_id", "status", "total", "currency", "created_at", "updated_at"}

    everyone = await (await orders.client.get("/api/orders?page_size=100", headers=orders.admin())).json()
    assert everyone["total"] == 6 and everyone["items"][0]["id"] == theirs
    default = await (await orders.client.get("/api/orders", headers=orders.buyer("nobody"))).json()
    assert default == {"items": [], "page": 1, "page_size": 20, "total": 0}


async def test_the_list_follows_status_changes(orders, catalog):
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1))
    await orders.wait_status(request.order_id, "awaiting_validation")
    listed = await (await orders.client.get("/api/orders", headers=orders.buyer("buyer-1"))).json()
    assert [o["status"] for o in listed["items"]] == ["awaiting_validation"]
    await catalog.let_go()
    await orders.wait_status(request.order_id, "paid")
    listed = await (await orders.client.get("/api/orders", headers=orders.buyer("buyer-1"))).json()
    assert [o["status"] for o in listed["items"]] == ["paid"]


@pytest.mark.parametrize(("query", "field"), [("page=0", "page"), ("page_size=101", "page_size"), ("page=x", "page")])
async def test_bad_paging_is_422_naming_the_field(orders, query, field):
    resp = await orders.client.get(f"/api/orders?{query}", headers=orders.buyer("buyer-1"))
    assert resp.status == 422 and [e["field"] for e in (await resp.json())["errors"]] == [field]


async def test_authentication_comes_before_validation(orders, catalog):
    assert (await orders.client.get("/api/orders?page=0")).status == 401
    assert (await orders.client.get("/api/orders/some-id")).status == 401
    order_id = await _paid_order(orders, catalog)
    resp = await orders.client.post(f"/api/orders/{order_id}/ship", headers=orders.buyer("buyer-1"))
    assert resp.status == 403, "shipping is for admins"


async def test_cancel_with_an_idempotency_key_answers_the_same_twice(orders, catalog):
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1))
    await orders.wait_status(request.order_id, "awaiting_validation")
    path, headers = f"/api/orders/{request.order_id}", {**orders.buyer("buyer-1"), "Idempotency-Key": "cancel-1"}

    first = await orders.client.post(f"{path}/cancel", headers=headers)
    again = await orders.client.post(f"{path}/cancel", headers=headers)
    assert first.status == again.status == 200
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert await first.json() == await again.json()
    assert [h["status"] for h in (await again.json())["history"]].count("cancelled") == 1

    admin = {**orders.admin(), "Idempotency-Key": "cancel-1"}
    resp = await orders.client.post(f"{path}/ship", headers=admin)
    assert resp.status == 422 and (await resp.json())["type"].endswith("/idempotency-key-reused")
    bad = {**orders.buyer("buyer-1"), "Idempotency-Key": "has space"}
    resp = await orders.client.post(f"{path}/cancel", headers=bad)
    assert resp.status == 422 and (await resp.json())["errors"][0]["field"] == "Idempotency-Key"


async def test_ship_with_an_idempotency_key_ships_once(orders, catalog):
    order_id = await _paid_order(orders, catalog)
    headers = {**orders.admin(), "Idempotency-Key": "ship-1"}
    answers = [await orders.client.post(f"/api/orders/{order_id}/ship", headers=headers) for _ in range(3)]
    assert [r.status for r in answers] == [200, 200, 200]
    assert [r.headers.get("Idempotent-Replayed") for r in answers] == [None, "true", "true"]
    await orders.settle()
    assert orders.statuses(order_id).count("shipped") == 1


async def test_cancelling_twice_without_a_key_changes_nothing_more(orders, catalog):
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1))
    await orders.wait_status(request.order_id, "awaiting_validation")
    for _ in range(2):
        resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.buyer("buyer-1"))
        assert resp.status == 200
    await orders.settle()
    assert orders.statuses(request.order_id) == ["submitted", "awaiting_validation", "cancelled"]


async def test_an_admin_may_cancel_anyones_open_order(orders, catalog):
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1), buyer="buyer-9")
    await orders.wait_status(request.order_id, "awaiting_validation")
    resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.admin())
    assert resp.status == 200 and (await resp.json())["history"][-1]["reason"] == "cancelled by an admin"


async def test_an_unknown_order_cannot_be_cancelled_or_shipped(orders):
    unknown = checkout_request().order_id
    assert (await orders.client.post(f"/api/orders/{unknown}/cancel", headers=orders.buyer("b"))).status == 404
    assert (await orders.client.post(f"/api/orders/{unknown}/ship", headers=orders.admin())).status == 404
    info = await orders.runtime.system.inspect("order", unknown)
    assert info is None or not info["state"]["status"], "asking about an order does not create one"


async def test_openapi_documents_the_order_routes(orders):
    spec = await (await orders.client.get("/api/docs/swagger.json")).json()
    assert {"/api/orders", "/api/orders/{id}", "/api/orders/{id}/cancel", "/api/orders/{id}/ship"} <= set(spec["paths"])
    assert "Idempotency-Key" in str(spec["paths"]["/api/orders/{id}/cancel"])
