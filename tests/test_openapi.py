"""The OpenAPI documents: each service's own (``/api/docs/swagger.json``, built in-process as production does)
and the gateway's merged one, fetched over real HTTP.

* no operation is documented for HEAD (aiohttp routes HEAD for every GET; the document lists the GET once),
  while HEAD keeps working at runtime;
* the token, revocation and introspection endpoints document their form fields;
* every documented path + method is routable: the service's router matches it (no 404/405 from routing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from argon2 import profiles

from actors.cart import service as cart_service
from actors.catalog import service as catalog_service
from actors.order import service as order_service
from bus.memory import MemoryBus
from config import load_settings
from gateway import docs as gateway_docs
from gateway.options import GatewayOptions
from gateway.routes import ROUTES
from gateway.service import create_app as create_gateway
from identity import service as identity_service
from identity.passwords import Passwords
from runtime.migrate import RUNTIME, upgrade
from runtime.routes import services_of
from runtime.store import create_engine

SPEC = "/api/docs/swagger.json"
SERVICES = ("identity", "catalog", "cart", "order")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
# path parameter values to try: routes may constrain them (digits, uuids, slugs)
PARAM_VALUES = ("1", "00000000-0000-4000-8000-000000000001", "x")


async def _migrate(url: str, *schemas: Any) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine, [RUNTIME, *schemas])
    finally:
        await engine.dispose()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(max_attempts=3)
    await bus.start()
    yield bus
    await bus.close()


@pytest.fixture
async def make_service(
    tmp_path: Any, bus: MemoryBus, test_identity: Any
) -> AsyncIterator[Callable[[str], Awaitable[TestClient]]]:
    """``make_service(name, **options)``: that service's app, built as production builds it, on its own SQLite file
    (``options``: more keyword arguments of the service's ``create_app``, such as the cart's ``catalog_url``)."""
    clients: list[TestClient] = []
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})

    async def make(name: str, **options: Any) -> TestClient:
        url = f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}"
        app: web.Application
        if name == "identity":
            cheap = Passwords(profiles.CHEAPEST)
            await identity_service.seed(settings, url, password_hasher=cheap)
            app = identity_service.create_app(settings, database_url=url, password_hasher=cheap)
        else:
            module = {"catalog": catalog_service, "cart": cart_service, "order": order_service}[name]
            await _migrate(url, module.SCHEMA)
            app = module.create_app(settings, bus=bus, database_url=url, verifier=test_identity.verifier(), **options)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make  # type: ignore[misc]  # a factory with keyword options; the annotation names the common call
    for client in reversed(clients):
        await client.close()


async def _doc(client: TestClient) -> dict[str, Any]:
    resp = await client.get(SPEC)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(path, method) for path, item in doc["paths"].items() for method in item if method in METHODS]


async def _unroutable(app: web.Application, doc: dict[str, Any]) -> list[str]:
    """The documented operations the app's router does not match (404 or 405 from routing)."""
    bad = []
    for path, method in _operations(doc):
        for value in PARAM_VALUES:
            concrete = path
            for param in doc["paths"][path][method].get("parameters", []):
                if param.get("in") == "path":
                    concrete = concrete.replace("{" + param["name"] + "}", value)
            request = make_mocked_request(method.upper(), concrete, app=app)
            match = await app.router.resolve(request)
            if match.http_exception is None:
                break
        else:
            bad.append(f"{method.upper()} {path}")
    return bad


@pytest.mark.parametrize("name", SERVICES)
async def test_service_document_has_no_head_twins_and_every_operation_routes(make_service: Any, name: str) -> None:
    client = await make_service(name)
    doc = await _doc(client)
    operations = _operations(doc)
    assert operations, "the document lists no operation"
    assert [op for op in operations if op[1] == "head"] == []
    gets = [path for path, method in operations if method == "get"]
    assert len(gets) == len(set(gets))
    assert await _unroutable(client.app, doc) == []
    # HEAD still works at runtime: every documented GET is routed for HEAD too, and answered
    heads = {"paths": {p: {"head": item["get"]} for p, item in doc["paths"].items() if "get" in item}}
    assert await _unroutable(client.app, heads) == []
    assert (await client.head("/health/live")).status == 200


def _form_fields(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation.get("parameters", []) if p.get("in") == "formData"}


async def test_token_revocation_and_introspection_document_their_form_fields(make_service: Any) -> None:
    doc = await _doc(await make_service("identity"))
    token = doc["paths"]["/connect/token"]["post"]
    assert token["consumes"] == ["application/x-www-form-urlencoded"]
    fields = _form_fields(token)
    assert set(fields) == {
        "grant_type",
        "code",
        "redirect_uri",
        "code_verifier",
        "client_id",
        "client_secret",
        "username",
        "password",
        "scope",
        "refresh_token",
    }
    assert fields["grant_type"]["required"] is True
    assert set(fields["grant_type"]["enum"]) == {
        "authorization_code",
        "refresh_token",
        "password",
        "client_credentials",
    }
    # which grant uses which field
    assert fields["code_verifier"]["description"].startswith("authorization_code")
    assert fields["username"]["description"].startswith("password")
    assert fields["refresh_token"]["description"].startswith("refresh_token")
    for grant in fields["grant_type"]["enum"]:
        assert f"**{grant}**" in token["description"]

    for path in ("/connect/revocation", "/connect/introspect"):
        operation = doc["paths"][path]["post"]
        assert operation["consumes"] == ["application/x-www-form-urlencoded"]
        fields = _form_fields(operation)
        assert {"token", "token_type_hint", "client_id", "client_secret"} == set(fields)
        assert fields["token"]["required"] is True


async def test_token_endpoint_still_reads_the_form_it_read_before(make_service: Any) -> None:
    """Documenting the fields changed nothing in what the endpoint accepts: OAuth errors, not schema problems."""
    client = await make_service("identity")
    resp = await client.post("/connect/token", data={"grant_type": "nope", "client_id": "storefront"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "unsupported_grant_type"
    resp = await client.post("/connect/revocation", data={"token": "unknown", "client_id": "storefront"})
    assert resp.status == 200


async def test_gateway_merged_document_has_no_head_twins(
    make_service: Any, aiohttp_client: Any, test_identity: Any
) -> None:
    services = {name: await make_service(name) for name in SERVICES}
    assert set(services_of(ROUTES)) <= set(services)
    upstreams = {name: str(client.make_url("")).rstrip("/") for name, client in services.items()}
    gateway = await aiohttp_client(
        create_gateway(
            load_settings({}),
            verifier=test_identity.verifier(),
            upstreams={name: upstreams[name] for name in services_of(ROUTES)},
            options=GatewayOptions(),
        )
    )
    doc = await _doc(gateway)
    assert set(doc["x-services"].values()) == {"ok"}, doc["x-services"]
    operations = _operations(doc)
    assert [op for op in operations if op[1] == "head"] == []
    assert ("/connect/token", "post") in operations
    assert _form_fields(doc["paths"]["/connect/token"]["post"])["grant_type"]["required"] is True
    # every merged operation is routed by the service that documents it
    for name, client in services.items():
        prefixes = [r.prefix for r in ROUTES if r.service == name]
        own = {
            "paths": {
                p: item for p, item in doc["paths"].items() if any(p == x or p.startswith(x + "/") for x in prefixes)
            }
        }
        assert await _unroutable(client.app, own) == [], name


def test_merge_drops_head_twins_of_a_service_that_still_documents_them() -> None:
    get = {"summary": "read", "responses": {}}
    doc = {
        "swagger": "2.0",
        "paths": {
            "/api/catalog/items": {"get": get, "head": get},
            "/api/catalog/ping": {"head": {"summary": "only head", "responses": {}}},
        },
    }
    routes = [r for r in ROUTES if r.service == "catalog"]
    merged = gateway_docs.merge("t", routes, [("catalog", doc)])
    items = merged["paths"]["/api/catalog/items"]
    assert list(items) == ["get"] and items["get"]["summary"] == "read"  # plus the gateway's own answers
    assert "head" in merged["paths"]["/api/catalog/ping"]  # a lone HEAD operation is no twin
    assert doc["paths"]["/api/catalog/items"]["head"] == get  # the service's document is not altered


@pytest.mark.parametrize("name", SERVICES)
async def test_every_operation_documents_its_problem_answers(make_service: Any, name: str) -> None:
    """problem+json is a documented media type of every operation, with the answers the host can give it."""
    doc = await _doc(await make_service(name))
    assert doc["definitions"]["Problem"]["properties"]["errors"]["type"] == "array"
    for path, method in _operations(doc):
        operation = doc["paths"][path][method]
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        assert "application/problem+json" in operation["produces"], where
        assert responses["503"]["headers"]["Retry-After"]["type"] == "integer", where
        params = {p["in"] for p in operation.get("parameters", [])}
        if "body" in params:
            assert {"400", "413", "415", "422"} <= set(responses), where
            assert operation["consumes"] == ["application/json"], where
        if operation.get("security"):
            assert {"401", "403"} <= set(responses), where
            assert responses["401"]["schema"] == {"$ref": "#/definitions/Problem"}, where
        if "path" in params:
            assert "404" in responses, where
