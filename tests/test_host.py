"""The shared service host over real HTTP: health, metrics, request ids, problem+json, docs, admin."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp_apispec import docs, request_schema
from marshmallow import Schema, fields, validate

from config import load_settings
from runtime import migrate
from runtime.actors import Actor, Turn, handles
from runtime.errors import Conflict
from runtime.host import (
    AppKeyRuntime,
    ServiceRuntime,
    create_app,
    json_response,
    read_json,
)
from runtime.store import create_engine, ping


@dataclass(frozen=True)
class Add:
    amount: int


@dataclass(frozen=True)
class Hold:
    gate: asyncio.Event


class CounterActor(Actor):
    def initial_state(self) -> dict:
        return {"total": 0}

    @handles(Add)
    def add(self, msg: Add, turn: Turn) -> int:
        if msg.amount == 13:
            raise Conflict("13 is unlucky", slug="unlucky")
        self.state["total"] += msg.amount
        return self.state["total"]

    @handles(Hold)
    async def hold(self, msg: Hold, turn: Turn) -> None:
        await msg.gate.wait()


class AddSchema(Schema):
    amount = fields.Integer(required=True, validate=validate.Range(min=1, max=1000))


def _routes(app: web.Application) -> None:
    @docs(tags=["counter"], summary="Add to a counter")
    @request_schema(AddSchema)
    async def add(request: web.Request) -> web.Response:
        system = request.app[AppKeyRuntime].system
        total = await system.ref(CounterActor, request.match_info["id"]).ask(Add(request["data"]["amount"]))
        return json_response({"total": total})

    async def raw(request: web.Request) -> web.Response:
        body = await read_json(request)
        return json_response({"echo": body})

    async def crash(_request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    async def hold(request: web.Request) -> web.Response:
        system = request.app[AppKeyRuntime].system
        gate = request.app["gate"]
        await system.ref(CounterActor, "held").ask(Hold(gate))
        return json_response({})

    async def form(request: web.Request) -> web.Response:
        return json_response(dict(await request.post()))

    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/health/live")

    app["gate"] = asyncio.Event()
    app.router.add_post("/api/test/form", form)
    app.router.add_post("/api/test/counters/{id}", add)
    app.router.add_post("/api/test/raw", raw)
    app.router.add_get("/api/test/crash", crash)
    app.router.add_post("/api/test/hold", hold)
    app.router.add_get("/api/test/moved", moved)


@pytest.fixture
async def make_client(aiohttp_client, tmp_path, test_identity):
    async def make(*, verifier=False, **env):
        settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_ACTORS_MAILBOX_SIZE": "2", **env})
        runtime = ServiceRuntime.with_database("test", settings, verifier=test_identity.verifier())
        if not verifier:
            runtime.verifier = None
        await migrate.upgrade(runtime.engine, [migrate.RUNTIME])
        runtime.system.register(CounterActor)
        app = create_app(runtime, routes=_routes)
        return await aiohttp_client(app)

    return make


async def test_health_and_readiness(make_client):
    client = await make_client()
    assert (await client.get("/health/live")).status == 200
    resp = await client.get("/health/ready")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"database": "ok"}


async def test_readiness_fails_when_the_database_is_gone(make_client):
    client = await make_client()
    runtime = client.app[AppKeyRuntime]
    # Point the readiness check at a database that cannot be opened, as when the disk or server is gone.
    broken = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", pool_size=1)
    runtime.ready_checks["database"] = lambda: ping(broken)
    try:
        resp = await client.get("/health/ready")
    finally:
        await broken.dispose()
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unavailable" and body["checks"]["database"].startswith("failing")


async def test_request_id_is_passed_on_or_created(make_client):
    client = await make_client()
    resp = await client.get("/health/live", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await client.get("/health/live", headers={"X-Request-Id": "bad id with spaces\u00e9"})
    assert resp.headers["X-Request-Id"] != "bad id with spaces\u00e9" and len(resp.headers["X-Request-Id"]) == 32
    resp = await client.get("/nope")
    assert len(resp.headers["X-Request-Id"]) == 32


async def test_actor_round_trip_and_problem_from_a_turn(make_client):
    client = await make_client()
    resp = await client.post("/api/test/counters/c1", json={"amount": 5})
    assert resp.status == 200 and (await resp.json()) == {"total": 5}
    resp = await client.post("/api/test/counters/c1", json={"amount": 13})
    assert resp.status == 409
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["type"].endswith("/unlucky") and body["detail"] == "13 is unlucky" and body["status"] == 409


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"amount": 0}, "amount"), ({"amount": "x"}, "amount"), ({}, "amount")],
)
async def test_schema_validation_names_the_field(make_client, payload, field):
    client = await make_client()
    resp = await client.post("/api/test/counters/c1", json=payload)
    assert resp.status == 422
    body = await resp.json()
    assert resp.content_type == "application/problem+json"
    assert [e["field"] for e in body["errors"]] == [field]
    assert field in body["detail"]


async def test_malformed_json_is_400_problem(make_client):
    client = await make_client()
    resp = await client.post("/api/test/raw", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    assert "not valid JSON" in (await resp.json())["detail"]


async def test_unhandled_error_is_500_without_internals(make_client):
    client = await make_client()
    resp = await client.get("/api/test/crash")
    assert resp.status == 500 and resp.content_type == "application/problem+json"
    text = await resp.text()
    assert "secret internal detail" not in text and "Traceback" not in text
    assert resp.headers["X-Request-Id"] in (await resp.json())["detail"]


async def test_unknown_route_and_method_are_problems(make_client):
    client = await make_client()
    resp = await client.get("/api/test/nothing-here")
    assert resp.status == 404 and resp.content_type == "application/problem+json"
    resp = await client.delete("/health/live")
    assert resp.status == 405 and resp.content_type == "application/problem+json"
    assert "GET" in resp.headers["Allow"]


async def test_full_mailbox_becomes_503_with_retry_after(make_client):
    client = await make_client()
    first = asyncio.ensure_future(client.post("/api/test/hold"))
    await asyncio.sleep(0.1)
    queued = [asyncio.ensure_future(client.post("/api/test/hold")) for _ in range(2)]
    await asyncio.sleep(0.1)
    resp = await client.post("/api/test/hold")
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["type"].endswith("/overloaded")
    client.app["gate"].set()
    assert [r.status for r in await asyncio.gather(first, *queued)] == [200, 200, 200]


async def test_metrics_count_requests_and_actors(make_client):
    client = await make_client()
    await client.post("/api/test/counters/m1", json={"amount": 1})
    text = await (await client.get("/metrics")).text()
    assert 'http_requests_total{method="POST",route="/api/test/counters/{id}",service="test",status="200"} 1.0' in text
    assert 'actor_activations{service="test",type="counter"} 1.0' in text
    assert "http_request_duration_seconds_bucket" in text


async def test_every_answer_has_its_request_id_and_is_counted_with_its_status(make_client):
    """The host's chain is one middleware: a problem, a redirect raised by a handler and an unmatched path each
    keep the request id and are counted with the status the client got, under the route's label."""
    client = await make_client()
    conflict = await client.post("/api/test/counters/m2", json={"amount": 13}, headers={"X-Request-Id": "r-409"})
    assert conflict.status == 409 and conflict.headers["X-Request-Id"] == "r-409"
    invalid = await client.post("/api/test/counters/m2", json={"amount": 0}, headers={"X-Request-Id": "r-422"})
    assert invalid.status == 422 and invalid.headers["X-Request-Id"] == "r-422"
    moved = await client.get("/api/test/moved", allow_redirects=False, headers={"X-Request-Id": "r-302"})
    assert moved.status == 302 and moved.headers["X-Request-Id"] == "r-302"
    missing = await client.get("/api/test/nowhere", headers={"X-Request-Id": "r-404"})
    assert missing.status == 404 and missing.headers["X-Request-Id"] == "r-404"
    text = await (await client.get("/metrics")).text()
    for line in (
        'http_requests_total{method="POST",route="/api/test/counters/{id}",service="test",status="409"} 1.0',
        'http_requests_total{method="POST",route="/api/test/counters/{id}",service="test",status="422"} 1.0',
        'http_requests_total{method="GET",route="/api/test/moved",service="test",status="302"} 1.0',
        'http_requests_total{method="GET",route="unmatched",service="test",status="404"} 1.0',
    ):
        assert line in text


async def test_metrics_report_the_outbox_backlog(aiohttp_client, tmp_path):
    """Rows committed to the outbox and not yet on the bus (here: the broker is down) are the backlog."""
    from sqlalchemy import insert

    from bus.envelope import Envelope
    from bus.memory import MemoryBus
    from runtime.store import outbox, utcnow

    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    bus = MemoryBus()  # never started: every send fails, as with a broker that does not answer
    runtime = ServiceRuntime.with_database("test", settings, bus=bus)
    runtime.verifier = None
    await migrate.upgrade(runtime.engine, [migrate.RUNTIME])
    client = await aiohttp_client(create_app(runtime, routes=_routes))
    rows = [Envelope(type="Noted", session_id=f"s{i}", body={}) for i in range(3)]
    async with runtime.engine.begin() as conn:
        await conn.execute(
            insert(outbox),
            [
                {
                    "message_id": e.message_id,
                    "kind": "publish",
                    "destination": "",
                    "envelope": e.encode().decode(),
                    "created_at": utcnow(),
                }
                for e in rows
            ],
        )
    text = await (await client.get("/metrics")).text()
    assert 'outbox_backlog{service="test"} 3.0' in text
    assert 'outbox_relayed_total{service="test"} 0.0' in text


async def test_openapi_document_lists_routes_with_schemas(make_client):
    client = await make_client()
    resp = await client.get("/api/docs/swagger.json")
    spec = await resp.json()
    assert "/api/test/counters/{id}" in spec["paths"]
    assert "AddSchema" in str(spec) or "amount" in str(spec)
    page = await client.get("/api/docs")
    assert page.status == 200 and "swagger" in (await page.text()).lower()


async def test_admin_endpoints_closed_by_default(make_client):
    client = await make_client()
    resp = await client.get("/api/test/admin/actors")
    assert resp.status == 403 and resp.content_type == "application/problem+json"


async def test_admin_endpoints_need_the_admin_role(make_client, test_identity):
    client = await make_client(verifier=True)
    await client.post("/api/test/counters/a1", json={"amount": 4})
    resp = await client.get("/api/test/admin/actors")
    assert resp.status == 401 and "Bearer" in resp.headers["WWW-Authenticate"]
    resp = await client.get("/api/test/admin/actors", headers=test_identity.headers(test_identity.token("u1")))
    assert resp.status == 403 and resp.content_type == "application/problem+json"
    resp = await client.get(
        "/api/test/admin/actors/counter/a1", headers=test_identity.headers(test_identity.admin_token())
    )
    assert resp.status == 200 and (await resp.json())["state"] == {"total": 4}


async def test_admin_endpoints_when_opened_show_live_actor(make_client):
    client = await make_client(ECOM_ADMIN_OPEN="true")
    await client.post("/api/test/counters/a1", json={"amount": 4})
    listing = await (await client.get("/api/test/admin/actors")).json()
    assert listing["types"]["counter"]["live"] == 1
    assert listing["types"]["counter"]["actors"][0]["id"] == "a1"
    one = await client.get("/api/test/admin/actors/counter/a1")
    body = await one.json()
    assert body["state"] == {"total": 4} and body["version"] == 1
    assert (await client.get("/api/test/admin/actors/counter/zzz")).status == 404
    assert (await client.get("/api/test/admin/actors/nosuchtype/a1")).status == 404


@pytest.mark.parametrize("path", ["/api/test/counters/deep", "/api/test/raw"], ids=["schema-route", "read_json"])
@pytest.mark.parametrize(
    "body",
    [b"[" * 10_000 + b"]" * 10_000, b'{"amount":' * 40 + b"1" + b"}" * 40, b'{"amount": "\xff\xfe"}', b"\xff\xfe{}"],
    ids=["10000-deep", "40-deep", "invalid-utf8-in-a-string", "invalid-utf8"],
)
async def test_hostile_bodies_are_400_not_500(make_client, path, body):
    client = await make_client()
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "application/problem+json"


async def test_form_with_invalid_utf8_is_400(make_client):
    client = await make_client()
    resp = await client.post(
        "/api/test/form",
        data=b"grant_type=password&username=\xff\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 400, await resp.text()
    assert "UTF-8" in (await resp.json())["detail"]


async def test_a_json_route_refuses_other_media_types_with_415(make_client):
    client = await make_client()
    resp = await client.post(
        "/api/test/counters/c", data=b'{"amount": 1}', headers={"Content-Type": "multipart/form-data"}
    )
    assert resp.status == 415 and resp.content_type == "application/problem+json"


async def test_every_service_hears_revocations_on_the_bus(aiohttp_client, tmp_path, test_identity):
    """A service on a bus drops a signed-out user's cached token, then a revoked key, within a second."""
    from datetime import UTC, datetime, timedelta

    from bus.memory import MemoryBus
    from runtime.revocation import AccessRevoked, SigningKeyRevoked, announcement

    bus = MemoryBus()
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    runtime = ServiceRuntime.with_database("test", settings, bus=bus, owns_bus=True, verifier=test_identity.verifier())
    await migrate.upgrade(runtime.engine, [migrate.RUNTIME])
    runtime.system.register(CounterActor)
    client = await aiohttp_client(create_app(runtime, routes=_routes))
    admin = test_identity.token("admin-1", roles=("admin",))
    other = test_identity.token("admin-2", roles=("admin",))
    for token in (admin, other):
        assert (await client.get("/api/test/admin/actors", headers=test_identity.headers(token))).status == 200

    now = datetime.now(UTC)
    await bus.publish(
        announcement(AccessRevoked("admin-1", now + timedelta(seconds=1), now + timedelta(seconds=900), "signed_out"))
    )
    deadline = asyncio.get_running_loop().time() + 1.0
    while (await client.get("/api/test/admin/actors", headers=test_identity.headers(admin))).status != 401:
        assert asyncio.get_running_loop().time() < deadline, "the signed-out user's cached token still works"
        await asyncio.sleep(0.02)
    assert (await client.get("/api/test/admin/actors", headers=test_identity.headers(other))).status == 200

    kid = test_identity.ring.keys()[0].kid
    await bus.publish(announcement(SigningKeyRevoked(kid, now)))
    deadline = asyncio.get_running_loop().time() + 1.0
    while (await client.get("/api/test/admin/actors", headers=test_identity.headers(other))).status != 401:
        assert asyncio.get_running_loop().time() < deadline, "a token signed with the revoked key still works"
        await asyncio.sleep(0.02)


def test_one_json_encoder_for_the_runtime() -> None:
    """Host responses, actor state and bus message bodies share runtime/jsonutil.py's rules."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from runtime import jsonutil
    from runtime.actors import encode_json
    from runtime.host import dumps, isoformat
    from runtime.messages import to_body

    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert (
        dumps({"price": Decimal("9.90"), "tags": {"b", "a"}, "at": when})
        == b'{"price":"9.90","tags":["a","b"],"at":"2024-05-01T12:00:00Z"}'
    )
    assert dumps({"at": datetime(2024, 5, 1, 12, 0)}) == b'{"at":"2024-05-01T12:00:00Z"}'  # naive: UTC
    assert isoformat(when) == jsonutil.isoformat(when) == "2024-05-01T12:00:00Z"
    assert encode_json({"price": Decimal("1.50"), "ids": frozenset({"y", "x"})}) == '{"price":"1.50","ids":["x","y"]}'

    @dataclass(frozen=True)
    class Priced:
        price: Decimal
        at: datetime
        ids: frozenset[str]

    assert to_body(Priced(Decimal("2.00"), when, frozenset({"b", "a"}))) == {
        "price": "2.00",
        "at": "2024-05-01T12:00:00Z",
        "ids": ["a", "b"],
    }
    with pytest.raises(TypeError):
        dumps({"x": object()})
