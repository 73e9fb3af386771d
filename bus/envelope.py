"""The message envelope: what every bus backend carries, encoded as JSON with orjson."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from bus.base import MalformedMessage

__all__ = ["Envelope", "utc_now"]


def utc_now() -> str:
    """RFC 3339 UTC with microseconds and a 'Z', the one time format on the wire."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    return str(uuid.uuid4())


def _default(obj: Any) -> Any:
    # Bodies/headers may be read-only mappings (MappingProxyType...); orjson only knows dict.
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    session_id: str
    body: Mapping[str, Any]
    message_id: str = field(default_factory=_new_id)
    correlation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)

    def encode(self) -> bytes:
        """JSON bytes; raises TypeError when the body is not JSON-compatible."""
        return orjson.dumps(
            {
                "message_id": self.message_id,
                "type": self.type,
                "session_id": self.session_id,
                "correlation_id": self.correlation_id,
                "created_at": self.created_at,
                "headers": self.headers,
                "body": self.body,
            },
            default=_default,
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview | str) -> Envelope:
        """Parse and validate; anything wrong raises MalformedMessage naming the problem."""
        try:
            raw = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise MalformedMessage(f"envelope is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise MalformedMessage(f"envelope must be a JSON object, got {type(raw).__name__}")
        for name in ("type", "session_id", "message_id"):
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise MalformedMessage(f"envelope field {name!r} must be a non-empty string")
        body = raw.get("body")
        if not isinstance(body, dict):
            raise MalformedMessage("envelope field 'body' must be a JSON object")
        correlation_id = raw.get("correlation_id")
        if correlation_id is not None and not isinstance(correlation_id, str):
            raise MalformedMessage("envelope field 'correlation_id' must be a string or null")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise MalformedMessage("envelope field 'headers' must be an object of strings")
        created_at = raw.get("created_at")
        if created_at is None:
            created_at = utc_now()  # tolerate hand-written messages; everything we encode has it
        elif not isinstance(created_at, str) or not _is_timestamp(created_at):
            raise MalformedMessage("envelope field 'created_at' must be an RFC 3339 timestamp")
        # Unknown top-level keys are ignored so newer producers can add fields.
        return cls(
            type=raw["type"],
            session_id=raw["session_id"],
            body=body,
            message_id=raw["message_id"],
            correlation_id=correlation_id,
            headers=headers,
            created_at=created_at,
        )

    def with_headers(self, **headers: str) -> Envelope:
        """A copy with these headers added/replaced (use ``**{"delivery-count": "2"}`` for dashes)."""
        for key, value in headers.items():
            if not isinstance(value, str):
                raise TypeError(f"header {key!r} must be a str, got {type(value).__name__}")
        return dataclasses.replace(self, headers={**self.headers, **headers})


def _is_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
