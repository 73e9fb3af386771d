"""CORS, the access log, metrics, health endpoints and the merged OpenAPI document."""

from __future__ import annotations

import json
import logging

from tests.gateway.conftest import eventually


async def test_cors_preflight_is_answered_by_the_gateway(make_gateway, start_upstream):
    cart = await start_upstream("cart")
    gw = await make_gateway({"cart": cart.url}, cors_origins="https://shop.example, https://m.shop.example")
    resp = await gw.options(
        "/api/cart/items/p-1",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "PUT" in resp.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in resp.headers["Vary"]
    assert not cart.seen  # never forwarded

    resp = await gw.options(
        "/api/cart", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_headers_on_actual_responses(make_gateway, start_upstream, test_identity):
    catalog = await start_upstream("catalog")
    cart = await start_upstream("cart")
    gw = await make_gateway(
        {"catalog": catalog.url, "cart": cart.url}, cors_origins="https://shop.example", buffer_limit=1024
    )
    origin = {"Origin": "https://shop.example"}
    for path in ("/api/catalog/products", "/api/catalog/big?size=100000"):  # buffered and streamed
        resp = await gw.get(path, headers=origin)
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers["Vary"]
        await resp.read()
    resp = await gw.get("/api/cart", headers=origin)  # errors too, or the browser hides them from the script
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    resp = await gw.get("/api/catalog/products", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await gw.get("/api/catalog/products")
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_without_cors_origins_preflights_are_not_special(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    resp = await gw.options(
        "/api/catalog/products", headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"}
    )
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_access_log_has_one_structured_line_per_request(make_gateway, start_upstream, test_identity, caplog):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url}, access_log=True)
    with caplog.at_level(logging.INFO, logger="ecom.access"):
        await gw.get("/api/catalog/products?x=1", headers={"X-Request-Id": "req-42"})
        await gw.get("/api/cart")  # 401 at the gateway
        await gw.get("/health/live")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ecom.access"]
    assert len(lines) == 3
    first = lines[0]
    assert first["method"] == "GET" and first["path"] == "/api/catalog/products" and first["status"] == 200
    assert first["upstream"] == catalog.url and first["request_id"] == "req-42"
    assert first["duration_ms"] >= 0 and first["client"] == "127.0.0.1"
    assert lines[1]["status"] == 401 and lines[1]["upstream"] == "-"
    assert lines[2]["path"] == "/health/live" and lines[2]["status"] == 200


async def test_metrics_and_health(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    gw = await make_gateway({"catalog": catalog.url})
    for _ in range(3):
        await gw.get("/api/catalog/products")
    assert (await gw.get("/health/live")).status == 200
    assert (await gw.get("/health/ready")).status == 200
    text = await (await gw.get("/metrics", headers=gw.admin_headers)).text()
    assert 'http_requests_total{method="GET",route="/api/catalog{tail}",service="gateway",status="200"} 3.0' in text
    assert "http_request_duration_seconds_bucket" in text
    assert f'gateway_upstream_up{{instance="{catalog.url}",service="catalog"}} 1.0' in text
    assert f'gateway_breaker_state{{instance="{catalog.url}",service="catalog"}} 0.0' in text
    assert f'gateway_upstream_attempts_total{{instance="{catalog.url}",service="catalog"}} 3.0' in text
    assert "gateway_upstream_in_flight" in text and "gateway_upstream_connections" in text


def _doc(service: str, paths: dict, definitions: dict) -> dict:
    return {
        "swagger": "2.0",
        "info": {"title": f"EcomGateway {service} API", "version": "v1"},
        "tags": [{"name": service}],
        "paths": {"/health/live": {"get": {"summary": "not public"}}, **paths},
        "definitions": definitions,
    }


async def test_docs_are_merged_from_the_services(make_gateway, start_upstream):
    catalog = await start_upstream("catalog")
    cart = await start_upstream("cart")
    order = await start_upstream("order")
    await order.server.close()
    catalog.docs = _doc(
        "catalog",
        {"/api/catalog/products": {"get": {"responses": {"200": {"schema": {"$ref": "#/definitions/Product"}}}}}},
        {"Product": {"type": "object"}, "Problem": {"type": "object", "properties": {"a": {"type": "string"}}}},
    )
    cart.docs = _doc(
        "cart",
        {"/api/cart": {"get": {"responses": {"409": {"schema": {"$ref": "#/definitions/Problem"}}}}}},
        {"Problem": {"type": "object", "properties": {"b": {"type": "integer"}}}},
    )
    order.docs = _doc("order", {"/api/orders": {"get": {}}}, {"Order": {"type": "object"}})
    gw = await make_gateway({"catalog": catalog.url, "cart": cart.url, "order": order.url}, docs_ttl=0.2)

    resp = await gw.get("/api/docs/swagger.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["swagger"] == "2.0" and doc["info"]["title"] == "EcomGateway API"
    assert set(doc["paths"]) == {"/api/catalog/products", "/api/cart"}  # no /health of any service
    assert doc["definitions"]["Problem"] == catalog.docs["definitions"]["Problem"]
    assert doc["definitions"]["CartProblem"] == cart.docs["definitions"]["Problem"]  # a clash, renamed
    assert doc["paths"]["/api/cart"]["get"]["responses"]["409"]["schema"]["$ref"] == "#/definitions/CartProblem"
    assert doc["x-services"]["catalog"] == "ok" and doc["x-services"]["order"].startswith("unavailable")
    assert "order" in doc["info"]["description"]
    assert {t["name"] for t in doc["tags"]} == {"catalog", "cart"}
    assert "bearer" in doc["securityDefinitions"]

    await start_upstream(port=order.port, upstream=order)  # back: it joins the document soon

    async def order_listed() -> bool:
        return "/api/orders" in (await (await gw.get("/api/docs/swagger.json")).json())["paths"]

    await eventually(order_listed, timeout=10, what="order docs merged")
    page = await gw.get("/api/docs")  # the Swagger UI page reads the merged document
    assert page.status == 200 and "swagger.json" in await page.text()
