"""The message envelope: what every bus backend carries, encoded as JSON with orjson."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from bus.base import MalformedMessage

__all__ = ["Envelope", "utc_now"]


def utc_now() -> str:
    """RFC 3339 UTC with microseconds and a 'Z', the one time format on the wire.

    What ``datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")`` gives (the same clock, microseconds floored),
    without a datetime and strftime per call: every envelope is stamped (issue 14). The text up to the seconds is
    made once per second; the cache is one tuple, replaced whole, so threads never see half of it."""
    global _second
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}Z"


_second: tuple[int, str] = (-1, "")  # (a UTC second since the epoch, its text up to the seconds)


def _new_id() -> str:
    """A random (version 4) UUID as text, like ``str(uuid.uuid4())``, from a per-thread buffer of ``os.urandom``.

    ``uuid.uuid4`` reads 16 bytes from the kernel per id, and every envelope gets one (issue 14): this reads
    256 ids' worth at once. The ids stay unpredictable (the kernel's CSPRNG, as uuid4) and unique: a buffer's bytes
    are handed out once, by the thread that owns it, and a forked child starts with no buffer (it would otherwise
    hand out its parent's next ids)."""
    ids = _ids
    start = ids.start
    chunk = ids.chunk
    if start >= len(chunk):
        chunk = ids.chunk = os.urandom(_CHUNK)
        start = 0
    ids.start = start + 16
    value = int.from_bytes(chunk[start : start + 16]) & _CLEAR | _VERSION_4
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_CHUNK = 16 * 256
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version nibble and the variant bits
_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)  # version 4, variant RFC 4122 (as uuid.UUID(version=4) sets them)


class _Ids(threading.local):
    chunk = b""
    start = 0


_ids = _Ids()


def _forget_ids() -> None:
    global _ids
    _ids = _Ids()


os.register_at_fork(after_in_child=_forget_ids)


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
        # The checks in the order they have always run (the first problem is the one named), unrolled: every
        # message the memory bus and the outbox relay hand on is decoded (issue 14).
        type_ = raw.get("type")
        if not isinstance(type_, str) or not type_:
            raise MalformedMessage("envelope field 'type' must be a non-empty string")
        session_id = raw.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise MalformedMessage("envelope field 'session_id' must be a non-empty string")
        message_id = raw.get("message_id")
        if not isinstance(message_id, str) or not message_id:
            raise MalformedMessage("envelope field 'message_id' must be a non-empty string")
        body = raw.get("body")
        if not isinstance(body, dict):
            raise MalformedMessage("envelope field 'body' must be a JSON object")
        correlation_id = raw.get("correlation_id")
        if correlation_id is not None and not isinstance(correlation_id, str):
            raise MalformedMessage("envelope field 'correlation_id' must be a string or null")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or (headers and not all(isinstance(v, str) for v in headers.values())):
            raise MalformedMessage("envelope field 'headers' must be an object of strings")
        created_at = raw.get("created_at")
        if created_at is None:
            created_at = utc_now()  # tolerate hand-written messages; everything we encode has it
        elif not isinstance(created_at, str) or not _is_timestamp(created_at):
            raise MalformedMessage("envelope field 'created_at' must be an RFC 3339 timestamp")
        # Unknown top-level keys are ignored so newer producers can add fields.
        return cls(type_, session_id, body, message_id, correlation_id, headers, created_at)

    def with_headers(self, **headers: str) -> Envelope:
        """A copy with these headers added/replaced (use ``**{"delivery-count": "2"}`` for dashes)."""
        for key, value in headers.items():
            if not isinstance(value, str):
                raise TypeError(f"header {key!r} must be a str, got {type(value).__name__}")
        # The constructor rather than dataclasses.replace: the memory bus makes one copy per delivery (issue 14).
        return type(self)(
            self.type,
            self.session_id,
            self.body,
            self.message_id,
            self.correlation_id,
            {**self.headers, **headers},
            self.created_at,
        )


def _is_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
