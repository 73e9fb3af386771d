"""Tracing with OpenTelemetry: one checkout is one trace, from the gateway's request to the order's ``paid``.

Spans: the HTTP server and client hops (aiohttp's instrumentations; the gateway's own proxy adds a CLIENT span and
writes ``traceparent`` itself, see :func:`proxy_span`), every actor turn (:func:`turn`) and its commit
(:func:`commit`), the outbox relay's sends (:func:`producing`, PRODUCER) and every delivery from a bus
(:mod:`bus.tracing`, CONSUMER). The context crosses

* HTTP in the W3C ``traceparent`` header;
* the mailbox: :func:`capture` keeps the sender's context with the queued message, and the turn is its child;
* the transactional outbox: the envelope's headers get the turn's ``traceparent`` when the message is made
  (``runtime.messages.envelope``), so it is stored in the outbox row with the turn's state and survives a crash
  between commit and relay; the relay's span is the child of that, and re-stamps the headers with itself.

Configured by the standard variables (:func:`configure`): ``OTEL_TRACES_EXPORTER`` = ``none`` (the default),
``otlp``, ``console`` or ``buffer`` (only the in-process ring buffer below), several comma-separated;
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_EXPORTER_OTLP_*`` and
``OTEL_BSP_*`` as the SDK reads them; ``OTEL_SDK_DISABLED=true`` turns everything off.

Off (the default), every hook is one test of a module global and no OpenTelemetry object is made: the runtime's
hot paths (``_enqueue``, a turn, a commit) then cost a function call each. On, every span also goes into a
bounded in-process ring buffer (:class:`SpanRing`, ``ECOM_TRACE_BUFFER_SPANS`` spans, 0 for none) that the admin
endpoint ``<prefix>/traces`` reads: the recent spans of one trace, or of the traces that touched one order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from bus import tracing as bus_tracing

__all__ = [
    "EXPORTERS",
    "SpanRing",
    "capture",
    "commit",
    "configure",
    "enabled",
    "producing",
    "proxy_span",
    "recent_spans",
    "shutdown",
    "traceparent_line",
    "turn",
]

log = logging.getLogger(__name__)

TRACER_NAME = "ecomgateway"
EXPORTERS = ("none", "otlp", "console", "buffer")
DEFAULT_BUFFER_SPANS = 2048
# Health checks and scrapes would otherwise be most of the spans (the gateway polls every instance): left out
# unless the OTEL_PYTHON_*_EXCLUDED_URLS variables say otherwise.
DEFAULT_EXCLUDED_URLS = "/health/live,/health/ready,/metrics"
# The storefront's OAuth redirect target carries the authorization code in its query: never recorded (a server
# span of the gateway would otherwise keep it; client spans drop every query, see _url_without_query).
DEFAULT_SERVER_EXCLUDED_URLS = DEFAULT_EXCLUDED_URLS + ",/callback"

_tracer: Tracer | None = None  # None: tracing is off; every hook tests this first
_provider: TracerProvider | None = None
_ring: SpanRing | None = None
_OFF: AbstractContextManager[None] = contextlib.nullcontext()  # reusable: what every hook returns when off
_EMPTY = Context()


# ---------------------------------------------------------------------------------------------------
# Configuration


def enabled() -> bool:
    return _tracer is not None


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``OTEL_TRACES_EXPORTER`` as a list of known names; an unknown one is a ValueError naming it."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER", "none")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r}; expected {', '.join(EXPORTERS)}")
    return [n for n in names if n != "none"]


def buffer_size(environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get("ECOM_TRACE_BUFFER_SPANS", "").strip()
    if not raw:
        return DEFAULT_BUFFER_SPANS
    if not raw.isdigit() or int(raw) > 1_000_000:
        raise ValueError(f"ECOM_TRACE_BUFFER_SPANS: expected a whole number of spans up to 1000000, got {raw!r}")
    return int(raw)


def configure(
    service_name: str = "ecom",
    *,
    environ: Mapping[str, str] = os.environ,
    processors: Sequence[SpanProcessor] = (),
    install_global: bool = False,
) -> bool:
    """Set tracing up from the ``OTEL_*`` variables; True when it is on. ``processors`` are added to the ones
    the variables ask for (tests pass a SimpleSpanProcessor over an InMemorySpanExporter) and turn tracing on by
    themselves. Calling it again replaces the previous set-up (its spans are flushed first). Apps and client
    sessions made before keep the instrumentation they had: configure before creating them."""
    global _tracer, _provider, _ring
    names = exporter_names(environ)
    size = buffer_size(environ)
    shutdown()
    if not names and not processors:
        return False
    # OTEL_SERVICE_NAME, else a service.name in OTEL_RESOURCE_ATTRIBUTES, else the name the command gives.
    attributes: dict[str, str] = {}
    named = environ.get("OTEL_SERVICE_NAME", "").strip()
    if named or "service.name=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes[SERVICE_NAME] = named or service_name
    resource = Resource.create(attributes)
    provider = TracerProvider(resource=resource)
    for name in dict.fromkeys(names):
        if name in ("otlp", "console"):
            provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    ring = SpanRing(size) if size else None
    if ring is not None:
        provider.add_span_processor(ring)
    for processor in processors:
        provider.add_span_processor(processor)
    _provider, _ring = provider, ring
    _tracer = provider.get_tracer(TRACER_NAME)
    bus_tracing.set_tracer(_tracer)
    _instrument_aiohttp(provider, environ)
    if install_global:
        trace.set_tracer_provider(provider)  # for any other library's instrumentation in this process
    return True


def shutdown() -> None:
    """Tracing off: flush and stop the exporters, undo the aiohttp instrumentation."""
    global _tracer, _provider, _ring
    provider = _provider
    _tracer, _provider, _ring = None, None, None
    bus_tracing.set_tracer(None)
    _uninstrument_aiohttp()
    if provider is not None:
        provider.shutdown()


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    # OTLP over HTTP/protobuf; endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_[TRACES_]*.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _instrument_aiohttp(provider: TracerProvider, environ: Mapping[str, str]) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    # The instrumentations read their exclusions from the process environment when instrumenting.
    if "OTEL_PYTHON_EXCLUDED_URLS" not in environ:
        os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", DEFAULT_SERVER_EXCLUDED_URLS)
        os.environ.setdefault("OTEL_PYTHON_AIOHTTP_CLIENT_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS)
    # Servers: every web.Application made from now on gets the middleware that continues the caller's trace.
    # Clients: every aiohttp.ClientSession made from now on sends traceparent (cart -> catalog, cart -> order,
    # cluster forwarding, JWKS fetches).
    with warnings.catch_warnings():
        # aiohttp discourages subclassing web.Application, which is how the server instrumentation installs itself.
        warnings.filterwarnings("ignore", "Inheritance class", DeprecationWarning)
        AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    AioHttpClientInstrumentor().instrument(tracer_provider=provider, url_filter=_url_without_query)


def _url_without_query(url: Any) -> str:
    """A client span's URL without its query string: queries between services can carry ids, tokens or codes,
    and trace data is kept and shown (ring buffer, admin console, exporters) where requests' data should not be."""
    return str(url.with_query(None).with_fragment(None))


def _uninstrument_aiohttp() -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

    for instrumentor in (AioHttpServerInstrumentor(), AioHttpClientInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


# ---------------------------------------------------------------------------------------------------
# Hooks of the actor runtime (runtime/actors.py): each a global test when off


def capture() -> Context | None:
    """The context a message is enqueued in, kept with it in the mailbox (None when tracing is off)."""
    return None if _tracer is None else otel_context.get_current()


def turn(
    key: tuple[str, str], message: Any, message_id: str | None, fut: Any, parent: Context | None
) -> AbstractContextManager[Any]:
    """The span of one actor turn, the child of the context the message was enqueued in (never of whatever the
    mailbox's drain task happens to carry). Marked as an error when the turn answers its asker with one."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    return _TurnSpan(tracer, key, message, message_id, fut, parent)


class _TurnSpan:
    __slots__ = ("_fut", "_span", "_token")

    def __init__(
        self,
        tracer: Tracer,
        key: tuple[str, str],
        message: Any,
        message_id: str | None,
        fut: Any,
        parent: Context | None,
    ) -> None:
        type_name = type(message).__name__
        attributes = {"ecom.actor.type": key[0], "ecom.actor.id": key[1], "ecom.message.type": type_name}
        if message_id is not None:
            attributes["ecom.message.id"] = message_id
        name = getattr(message, "name", None) if hasattr(message, "due_at") else None  # a ReminderFired
        if isinstance(name, str):
            attributes["ecom.reminder"] = name
        self._span = tracer.start_span(f"{key[0]} {type_name}", context=parent or _EMPTY, attributes=attributes)
        self._fut = fut
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span = self._span
        try:
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            else:
                fut = self._fut
                if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is not None:
                    error = fut.exception()
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]  # the token attach() returned
            span.end()


def commit(write: Any) -> AbstractContextManager[Any]:
    """The span of one turn's commit (state, outbox rows, inbox row, reminders in one transaction); ``write`` is
    a :class:`runtime.store.TurnWrite`."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        "commit",
        attributes={
            "ecom.actor.type": write.actor_type,
            "ecom.actor.id": write.actor_id,
            "ecom.commit.version": write.expected_version + 1,
            "ecom.commit.outbox": len(write.outbox),
        },
    )


# ---------------------------------------------------------------------------------------------------
# The outbox relay and the gateway's proxy


@contextlib.contextmanager
def _producer_span(tracer: Tracer, bus: str, kind: str, destination: str, envelope: Any) -> Iterator[Any]:
    operation = "publish" if kind == "publish" else "send"  # "send", or "replay" (a dead letter sent again)
    target = envelope.type if kind == "publish" else destination
    attributes = {
        "messaging.system": bus,
        "messaging.operation.type": operation,
        "messaging.destination.name": target,
        "messaging.message.id": envelope.message_id,
        "ecom.message.type": envelope.type,
        "ecom.message.id": envelope.message_id,
        "ecom.session.id": envelope.session_id,
    }
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    parent = propagate.extract(envelope.headers)
    with tracer.start_as_current_span(
        f"{operation} {target}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
    ):
        yield envelope.with_headers(**bus_tracing.carrier_of({}))


def producing(bus: str, kind: str, destination: str, envelope: Any) -> AbstractContextManager[Any]:
    """Around the relay's hand-over of one outbox row: a PRODUCER span, the child of the turn that wrote the row
    (its ``traceparent`` is in the stored envelope); entering gives the envelope re-stamped with this span, so
    the consumer is its child. An envelope without a trace context (written while tracing was off) goes as it
    is, without a span."""
    tracer = _tracer
    if tracer is None or "traceparent" not in envelope.headers:
        return contextlib.nullcontext(envelope)
    return _producer_span(tracer, bus, kind, destination, envelope)


def context_headers() -> dict[str, str]:
    """The current span as W3C headers for a message being made (empty when tracing is off)."""
    if _tracer is None:
        return {}
    return bus_tracing.carrier_of({})


def proxy_span(service: str, request: Any) -> AbstractContextManager[Any]:
    """The gateway's CLIENT span around one proxied request (all its attempts; ``request``: the aiohttp
    request); :func:`traceparent_line` then writes its context into the upstream request."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    method = request.method
    return tracer.start_as_current_span(
        f"proxy {method} {service}",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": method, "url.path": request.path, "ecom.upstream.service": service},
    )


def traceparent_line(request_headers: Mapping[str, str]) -> bytes:
    """The trace-context header lines of a proxied request: the current span's when tracing is on, else the
    client's own ``traceparent``/``tracestate`` passed through unchanged (the gateway then is not in the trace,
    but a traced caller's services still are)."""
    if _tracer is not None:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    elif "traceparent" in request_headers:
        carrier = {k: request_headers[k] for k in ("traceparent", "tracestate") if k in request_headers}
    else:
        return b""
    return b"".join(
        f"{k}: {v}\r\n".encode("latin-1", "replace") for k, v in carrier.items() if k in ("traceparent", "tracestate")
    )


# ---------------------------------------------------------------------------------------------------
# The ring buffer and what the admin endpoint reads from it


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain JSON: ids in W3C hex, times in Unix nanoseconds."""
    ctx = span.context
    parent = span.parent
    status = span.status
    return {
        "trace_id": _hex(ctx.trace_id, 32) if ctx else None,
        "span_id": _hex(ctx.span_id, 16) if ctx else None,
        "parent_span_id": _hex(parent.span_id, 16) if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get(SERVICE_NAME),
        "start_time": span.start_time,
        "end_time": span.end_time,
        "duration_ms": round((span.end_time - span.start_time) / 1e6, 3) if span.end_time and span.start_time else None,
        "status": status.status_code.name,
        "status_description": status.description,
        "attributes": dict(span.attributes or {}),
    }


class SpanRing(SpanProcessor):
    """The last ``size`` finished spans of this process, oldest first (a bounded deque: the oldest fall out).
    Spans are kept as the SDK gives them and turned into JSON only when read."""

    def __init__(self, size: int = DEFAULT_BUFFER_SPANS) -> None:
        if size < 1:
            raise ValueError("a span ring holds at least one span")
        self.size = size
        self._spans: deque[ReadableSpan] = deque(maxlen=size)
        self._lock = threading.Lock()  # spans may end on other threads (an exporter's, a library's)

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self._spans.append(span)

    def spans(self) -> list[ReadableSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()


def _touches_order(span: ReadableSpan, order_id: str) -> bool:
    """A turn of the order's actor, or a bus message to it (its session) or about it (correlated with it): so each
    process finds its part of the order's traces, the cart's (CheckoutRequested) and the catalog's too."""
    attrs = span.attributes or {}
    if attrs.get("ecom.actor.id") == order_id and attrs.get("ecom.actor.type") == "order":
        return True
    return attrs.get("ecom.session.id") == order_id or attrs.get("messaging.message.conversation_id") == order_id


def recent_spans(*, trace_id: str | None = None, order_id: str | None = None, limit: int = 1000) -> dict[str, Any]:
    """The buffered spans of one trace, or of every trace with a span about one order (its actor's turns, the
    bus messages correlated with it), oldest first, at most ``limit``. Only this process's spans: in a
    multi-process deployment each service keeps its own (an OTLP backend has the whole trace)."""
    ring = _ring
    if ring is None:
        return {"enabled": _tracer is not None, "buffer": 0, "traces": [], "spans": []}
    spans = ring.spans()
    if trace_id is not None:
        wanted = {trace_id.lower()}
    elif order_id is not None:
        wanted = {_hex(s.context.trace_id, 32) for s in spans if s.context and _touches_order(s, order_id)}
    else:
        wanted = {_hex(s.context.trace_id, 32) for s in spans if s.context}
    chosen = [s for s in spans if s.context and _hex(s.context.trace_id, 32) in wanted]
    chosen.sort(key=lambda s: s.start_time or 0)
    records = [span_record(s) for s in chosen[-limit:]] if limit else []
    return {"enabled": True, "buffer": ring.size, "traces": sorted({r["trace_id"] for r in records}), "spans": records}
