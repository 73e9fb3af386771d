"""Tracing: one checkout is one trace, from the gateway's request to the order's ``paid``.

The real gateway, catalog, cart and order apps on real ports (real HTTP between them), joined by the memory bus
or by the real RabbitMQ (a vhost of the test's own, deleted after), with the SDK's in-memory exporter: the test
follows the parent links of the span of the turn that made the order ``paid`` back to the gateway's request and
checks every hop on the way. Also: the admin endpoint reading the in-process ring buffer, the JSON log lines, and
what configuration turns tracing on.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from yarl import URL

from actors.order.actor import SagaTimings
from actors.order.payment import SimulatedPaymentProvider
from bus import Envelope, MemoryBus
from bus.rabbitmq import DEFAULT_URL, RabbitBus
from config import ConfigError, load_settings
from gateway.service import create_app as create_gateway
from runtime import logs, tracing
from runtime.store import create_engine, outbox
from tests.e2e.conftest import ADDRESS, SERVICES, Shop
from tests.order.conftest import eventually, migrate, stop_bounded
from tests.support.cluster import rabbitmqctl, require_cluster_servers

RABBIT_URL = URL(DEFAULT_URL)

# The parent chain of the turn that makes the order paid, from the gateway's request down (labels: see _label).
CHAIN = [
    "CLIENT",  # the test's own aiohttp client: a traced caller, whose trace the gateway continues
    "SERVER",  # the gateway's request
    "proxy POST cart",  # the gateway's proxy, which writes traceparent into the upstream request
    "SERVER",  # the cart service's request
    "turn cart Checkout",
    "send order",  # the outbox relay hands CheckoutRequested to the bus...
    "process CheckoutRequested",  # ...and the order service takes it
    "turn order CheckoutRequested",
    "send catalog",
    "process ReserveStock",
    "turn product ReserveStock",
    "send order",
    "process StockReserved",
    "turn order StockReserved",  # the last answer: stock confirmed, payment requested
    "send order",
    "process ProcessPayment",
    "turn order PaymentSucceeded",  # paid
]


@pytest.fixture
def exporter() -> Any:
    """Tracing on (no exporter from the environment, the ring buffer, and this in-memory exporter) before any
    app is made; off again after."""
    memory = InMemorySpanExporter()
    assert tracing.configure("ecom-test", environ={}, processors=[SimpleSpanProcessor(memory)])
    yield memory
    tracing.shutdown()


@pytest.fixture
def settings(tmp_path) -> Any:
    return load_settings(
        {
            "ECOM_DATA_DIR": str(tmp_path),
            "ECOM_ACTORS_REMINDER_POLL_INTERVAL": "0.05",
            "ECOM_BUS_OUTBOX_POLL_INTERVAL": "0.05",
            "ECOM_GATEWAY_RATE_LIMIT": "0",
        }
    )


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def bus(request) -> AsyncIterator[Any]:
    """The bus joining the services: the memory bus, or the real RabbitMQ on a vhost of this test's own
    (deleted afterwards with everything in it)."""
    if request.param == "memory":
        memory = MemoryBus(max_attempts=3)
        await memory.start()
        yield memory
        await memory.close()
        return
    require_cluster_servers()
    vhost = f"ecom-tracing-{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        user = RABBIT_URL.user or "guest"
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        rabbit = RabbitBus(str(RABBIT_URL.with_path("/" + vhost)), partitions=2, timeout=10.0)
        await asyncio.wait_for(rabbit.start(), 20)
        try:
            yield rabbit
        finally:
            await asyncio.wait_for(rabbit.close(), 20)
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


@pytest.fixture
async def shop_with_gateway(exporter, bus, settings, tmp_path, test_identity) -> AsyncIterator[tuple[Shop, TestClient]]:
    """Catalog, cart and order (each on its SQLite file) and the gateway in front of them, all on real ports."""
    databases = {name: f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}" for name in SERVICES}
    for name, module in SERVICES.items():
        await migrate(databases[name], module.SCHEMA)
    # The saga's defaults (re-sends after 30 s): a re-send, which starts a trace of its own from the order's
    # reminder, cannot make the paid turn part of another trace on a slow machine.
    shop = Shop(settings, databases, bus, test_identity, SimulatedPaymentProvider(), timings=SagaTimings())
    await shop.start()
    upstreams = {name: str(client.make_url("")).rstrip("/") for name, client in shop.clients.items()}
    gateway = TestClient(
        TestServer(create_gateway(settings, verifier=test_identity.verifier(), upstreams=upstreams), host="127.0.0.1")
    )
    await gateway.start_server()
    try:
        for kind, name in (("brands", "Trace Brand"), ("types", "Trace Type")):
            resp = await shop.clients["catalog"].post(f"/api/catalog/{kind}", json={"name": name}, headers=shop.admin())
            assert resp.status == 201, await resp.text()
        yield shop, gateway
    finally:
        await stop_bounded("gateway", gateway)
        await shop.stop()


def _label(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    if "ecom.actor.type" in attrs and span.name != "commit":
        return f"turn {attrs['ecom.actor.type']} {attrs['ecom.message.type']}"
    if span.kind is trace.SpanKind.SERVER:
        return "SERVER"
    if span.kind is trace.SpanKind.CLIENT and not span.name.startswith("proxy "):
        return "CLIENT"  # aiohttp's client instrumentation
    return span.name


def _chain(spans: list[ReadableSpan], leaf: ReadableSpan) -> list[ReadableSpan]:
    by_id = {s.context.span_id: s for s in spans}
    chain = [leaf]
    while chain[-1].parent is not None:
        parent = by_id.get(chain[-1].parent.span_id)
        assert parent is not None, f"the parent of {_label(chain[-1])!r} is not among the finished spans"
        chain.append(parent)
    return chain[::-1]


async def _add_product(shop: Shop, name: str, price: str) -> str:
    body = {
        "name": name,
        "price": price,
        "brand": "Trace Brand",
        "type": "Trace Type",
        "available_stock": 5,
        "max_stock": 100,
    }
    resp = await shop.clients["catalog"].post("/api/catalog/products", json=body, headers=shop.admin())
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def test_one_checkout_is_one_trace_from_the_gateway_to_paid(shop_with_gateway, exporter):
    shop, gateway = shop_with_gateway
    lamp, mug = await _add_product(shop, "Lamp", "9.99"), await _add_product(shop, "Mug", "4.50")
    buyer = shop.buyer()
    for product, quantity in ((lamp, 2), (mug, 1)):
        resp = await gateway.put(f"/api/cart/items/{product}", json={"quantity": quantity}, headers=buyer.headers)
        assert resp.status == 200, await resp.text()
    exporter.clear()
    body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}}
    resp = await gateway.post("/api/cart/checkout", json=body, headers=buyer.headers)
    assert resp.status == 202, await resp.text()
    order_id = (await resp.json())["order_id"]
    await buyer.wait(order_id, "paid", timeout=30)

    def paid_turn() -> ReadableSpan | None:
        return next(
            (
                s
                for s in exporter.get_finished_spans()
                if _label(s) == "turn order PaymentSucceeded" and s.attributes["ecom.actor.id"] == order_id
            ),
            None,
        )

    leaf = await eventually(paid_turn, 10, "the span of the turn that made the order paid")
    spans = list(exporter.get_finished_spans())
    chain = _chain(spans, leaf)
    assert [_label(s) for s in chain] == CHAIN
    trace_id = leaf.context.trace_id
    assert {s.context.trace_id for s in chain} == {trace_id}
    assert chain[0].parent is None
    gateway_server, proxied, cart_server = chain[1:4]
    for server in (gateway_server, cart_server):
        assert server.attributes.get("http.target", server.attributes.get("url.path")) == "/api/cart/checkout"
    assert proxied.kind is trace.SpanKind.CLIENT and proxied.attributes["ecom.upstream.service"] == "cart"
    # Every hop names what it carried.
    cart_turn, checkout_sent = chain[4], chain[5]
    assert cart_turn.attributes["ecom.actor.id"] == buyer.sub
    assert (
        checkout_sent.kind is trace.SpanKind.PRODUCER
        and checkout_sent.attributes["messaging.destination.name"] == "order"
    )
    # The trace crossed the transactional outbox in the row itself: the stored envelope carries the cart turn's
    # traceparent (the relay, a task of its own, took it from there).
    engine = create_engine(shop.databases["cart"])
    try:
        async with engine.connect() as conn:
            stored = (
                await conn.execute(
                    select(outbox.c.envelope).where(
                        outbox.c.message_id == checkout_sent.attributes["messaging.message.id"]
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    traceparent = Envelope.decode(stored).headers["traceparent"]
    assert traceparent.startswith(f"00-{trace_id:032x}-{cart_turn.context.span_id:016x}-")  # then the flags
    consumer, order_turn = chain[6], chain[7]
    assert order_turn.attributes["ecom.actor.id"] == order_id
    assert order_turn.attributes["ecom.message.id"] == consumer.attributes["messaging.message.id"]
    assert consumer.kind is trace.SpanKind.CONSUMER
    assert consumer.attributes["messaging.system"] == ("memory" if isinstance(shop.bus, MemoryBus) else "rabbitmq")

    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    # Both products' reservations are turns of this trace, and every turn that changed state has its commit.
    reserved = {s.attributes["ecom.actor.id"] for s in in_trace if _label(s) == "turn product ReserveStock"}
    assert reserved == {lamp, mug}
    turn_ids = {s.context.span_id for s in in_trace if _label(s).startswith("turn ")}
    commits = [s for s in in_trace if s.name == "commit"]
    assert commits and all(c.parent is not None and c.parent.span_id in turn_ids for c in commits)
    assert any(c.parent.span_id == leaf.context.span_id for c in commits)  # the paid turn's own commit
    # The cart's calls to other services during the checkout (fresh prices, admission) are HTTP client spans.
    cart_calls = [
        s for s in in_trace if _label(s) == "CLIENT" and s.parent and s.parent.span_id == cart_server.context.span_id
    ]
    assert cart_calls, "the cart's calls to the catalog (fresh prices) are client spans of its request"
    urls = [str(s.attributes.get(k)) for s in cart_calls for k in ("http.url", "url.full") if k in s.attributes]
    assert urls and not any("?" in url for url in urls), f"client spans keep no query string: {urls}"

    # The admin endpoint finds the checkout's trace in the ring buffer by the order id, and by the trace id.
    trace_hex = format(trace_id, "032x")
    resp = await gateway.get(f"/api/gateway/admin/traces?order_id={order_id}", headers=shop.admin())
    assert resp.status == 200, await resp.text()
    found = await resp.json()
    assert trace_hex in found["traces"]
    names = {(s["name"], s["attributes"].get("ecom.actor.id")) for s in found["spans"]}
    assert ("order PaymentSucceeded", order_id) in names
    resp = await gateway.get(f"/api/gateway/admin/traces?trace_id={trace_hex}", headers=shop.admin())
    by_trace = await resp.json()
    assert by_trace["traces"] == [trace_hex]
    assert {s["trace_id"] for s in by_trace["spans"]} == {trace_hex}
    assert {s["span_id"] for s in by_trace["spans"]} >= {format(s.context.span_id, "016x") for s in chain}


async def test_admin_traces_needs_the_admin_role_and_checks_its_input(exporter, settings, test_identity):
    app = create_gateway(settings, verifier=test_identity.verifier(), upstreams={"cart": "http://127.0.0.1:1"})
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/api/gateway/admin/traces")
        assert resp.status == 401
        customer = test_identity.headers(test_identity.token())
        assert (await client.get("/api/gateway/admin/traces", headers=customer)).status == 403
        admin = test_identity.headers(test_identity.admin_token())
        resp = await client.get("/api/gateway/admin/traces?trace_id=xyz", headers=admin)
        assert resp.status == 422
        assert (await resp.json())["errors"][0]["field"] == "trace_id"


def test_the_ring_buffer_is_bounded():
    ring = tracing.SpanRing(3)
    memory = InMemorySpanExporter()
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(ring)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("t")
    for i in range(5):
        with tracer.start_as_current_span(f"s{i}"):
            pass
    assert [s.name for s in ring.spans()] == ["s2", "s3", "s4"]
    assert len(memory.get_finished_spans()) == 5


def test_json_log_lines_carry_the_trace_and_span_ids(exporter):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside any span")
        with tracing.turn(("order", "o-1"), object(), None, None, None) as span:
            logger.warning("inside a turn: %s", "o-1")
            ctx = span.get_span_context()
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["message"] == "outside any span" and "trace_id" not in outside
    assert inside["message"] == "inside a turn: o-1" and inside["level"] == "WARNING"
    assert inside["logger"] == "tests.tracing" and inside["time"].endswith("Z")
    assert inside["trace_id"] == format(ctx.trace_id, "032x") and inside["span_id"] == format(ctx.span_id, "016x")


def test_configuration_from_the_otel_variables():
    assert tracing.configure(environ={}) is False and not tracing.enabled()  # none by default
    assert tracing.configure(environ={"OTEL_TRACES_EXPORTER": "none"}) is False
    assert tracing.configure(environ={"OTEL_TRACES_EXPORTER": "buffer", "OTEL_SDK_DISABLED": "true"}) is False
    with pytest.raises(ValueError, match="'zipkin'"):
        tracing.configure(environ={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="ECOM_TRACE_BUFFER_SPANS"):
        tracing.configure(environ={"OTEL_TRACES_EXPORTER": "buffer", "ECOM_TRACE_BUFFER_SPANS": "-1"})
    try:
        env = {"OTEL_TRACES_EXPORTER": "buffer", "OTEL_SERVICE_NAME": "shop-a", "ECOM_TRACE_BUFFER_SPANS": "10"}
        assert tracing.configure("ecom-x", environ=env) and tracing.enabled()
        with tracing.turn(("cart", "c-1"), object(), "m-1", None, None):
            pass
        got = tracing.recent_spans()
        assert got["buffer"] == 10 and [s["name"] for s in got["spans"]] == ["cart object"]
        assert got["spans"][0]["attributes"] == {
            "ecom.actor.type": "cart",
            "ecom.actor.id": "c-1",
            "ecom.message.type": "object",
            "ecom.message.id": "m-1",
        }
        # OTEL_SERVICE_NAME wins over the name the command gives (which is for when it is unset).
        assert got["spans"][0]["service"] == "shop-a"
    finally:
        tracing.shutdown()
    assert not tracing.enabled() and tracing.turn(("cart", "c"), object(), None, None, None) is tracing._OFF
    assert tracing.capture() is None and tracing.context_headers() == {}


def test_log_format_is_a_checked_setting():
    assert load_settings({}).general.log_format == "json"
    assert load_settings({"ECOM_LOG_FORMAT": "text"}).general.log_format == "text"
    with pytest.raises(ConfigError, match="ECOM_LOG_FORMAT"):
        load_settings({"ECOM_LOG_FORMAT": "xml"})
    assert isinstance(logs.formatter("json"), logs.JsonFormatter)
    assert logs.formatter("text")._fmt == logs.TEXT_FORMAT


def test_otlp_exports_to_the_configured_endpoint(monkeypatch):
    """``otlp`` sends OTLP/HTTP protobuf to OTEL_EXPORTER_OTLP_ENDPOINT (a real HTTP receiver on 127.0.0.1 here),
    with the service name of OTEL_SERVICE_NAME; shutdown flushes what is batched."""
    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/traces"
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_SERVICE_NAME": "shop-otlp",
    }
    try:
        for name, value in env.items():  # the exporter reads its endpoint from the process environment
            monkeypatch.setenv(name, value)
        assert tracing.configure("ecom", environ=env)
        with tracing.turn(("order", "o-9"), object(), "m-9", None, None):
            pass
        tracing.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert received, "nothing reached the OTLP endpoint"
    request = ExportTraceServiceRequest.FromString(received[0])
    resource_spans = request.resource_spans[0]
    names = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert names["service.name"] == "shop-otlp"
    (span,) = resource_spans.scope_spans[0].spans
    assert span.name == "order object"
    assert {a.key: a.value.string_value for a in span.attributes}["ecom.actor.id"] == "o-9"


def test_each_process_finds_its_part_of_an_orders_traces():
    """By order id: the order's turns, a message to it (its session) and one correlated with it, each with the rest
    of its trace in this process's buffer; other traces are left out."""
    try:
        assert tracing.configure("ecom", environ={"OTEL_TRACES_EXPORTER": "buffer"})
        found_by: dict[str, str] = {}
        for how in ("session", "correlation", "turn", "other"):
            with tracing.turn(("cart", f"c-{how}"), object(), None, None, None) as span:
                found_by[how] = format(span.get_span_context().trace_id, "032x")
                if how == "turn":
                    with tracing.turn(("order", "o-1"), object(), None, None, tracing.capture()):  # asked from the cart
                        pass
                    continue
                session, correlation = ("o-1", None) if how == "session" else ("p-1", "o-1")
                if how == "other":
                    session, correlation = "o-2", "o-2"
                made = Envelope("Msg", session, {}, correlation_id=correlation, headers=tracing.context_headers())
            with tracing.producing("memory", "send", "order", made) as sent:
                assert sent.headers["traceparent"] != made.headers["traceparent"]  # re-stamped with the send span
        got = tracing.recent_spans(order_id="o-1")
        assert set(got["traces"]) == {found_by["session"], found_by["correlation"], found_by["turn"]}
        assert {s["name"] for s in got["spans"]} >= {"cart object", "order object", "send order"}
        assert tracing.recent_spans(order_id="o-1", limit=0)["spans"] == []
    finally:
        tracing.shutdown()
    assert tracing.recent_spans(order_id="o-1") == {"enabled": False, "buffer": 0, "traces": [], "spans": []}
