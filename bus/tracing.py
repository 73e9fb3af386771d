"""W3C trace context on the bus: the envelope's ``headers`` carry ``traceparent`` (and ``tracestate``), and every
delivery to a handler is a CONSUMER span, the child of the span that sent the message.

Off unless :func:`runtime.tracing.configure` handed this module a tracer (``bus`` imports nothing of ``runtime``):
:func:`traced` then returns the handler itself, so a bus without tracing pays nothing per message.

Invariants: the consumer span is made from the headers the message carries, never from the context of the task
that happens to run the handler (a worker serves many sessions), so a redelivered copy is a sibling of its first
delivery, under the same sender.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Tracer

from bus.base import Handler
from bus.envelope import Envelope

__all__ = ["carrier_of", "set_tracer", "traced"]

_tracer: Tracer | None = None


def set_tracer(tracer: Tracer | None) -> None:
    """Turn bus tracing on (a tracer) or off (None). Consumers attached before keep what they had."""
    global _tracer
    _tracer = tracer


def carrier_of(headers: Mapping[str, str]) -> dict[str, str]:
    """The current span's context as W3C headers (``traceparent``, ``tracestate``), added to ``headers``."""
    out = dict(headers)
    propagate.inject(out)
    return out


def traced(handler: Handler, system: str, destination: str) -> Handler:
    """``handler`` in a CONSUMER span per delivery, parented by the envelope's ``traceparent``."""
    tracer = _tracer
    if tracer is None:
        return handler

    async def handle(envelope: Envelope) -> None:
        attributes: dict[str, str | int] = {
            "messaging.system": system,
            "messaging.operation.type": "process",
            "messaging.destination.name": destination,
            "messaging.message.id": envelope.message_id,
            "ecom.message.type": envelope.type,
            "ecom.message.id": envelope.message_id,
            "ecom.session.id": envelope.session_id,
        }
        if envelope.correlation_id:
            attributes["messaging.message.conversation_id"] = envelope.correlation_id
        delivery = envelope.headers.get("delivery-count")
        if delivery is not None and delivery.isdigit():
            attributes["messaging.delivery_count"] = int(delivery)
        with tracer.start_as_current_span(
            f"process {envelope.type}",
            context=propagate.extract(envelope.headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ):
            await handler(envelope)

    return handle
