"""Log lines: JSON (one object per line, the default) or the older plain text, chosen by ``ECOM_LOG_FORMAT``.

A JSON line has ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message``, ``request_id`` (the HTTP request
being served, ``-`` outside one), and, inside a recorded span, ``trace_id`` and ``span_id`` in W3C hex, so a
line can be found from its trace and the other way round; ``exception`` holds a traceback when there is one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

__all__ = ["TEXT_FORMAT", "JsonFormatter", "formatter"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the trace ids are those of the span current where the record was made."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            line["trace_id"] = format(ctx.trace_id, "032x")
            line["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``ECOM_LOG_FORMAT`` (``json`` or ``text``)."""
    return JsonFormatter() if kind.lower() == "json" else logging.Formatter(TEXT_FORMAT)
