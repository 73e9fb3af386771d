"""The bus/state codec as it was before issue 14 made it faster (runtime/jsonutil.py's ``to_jsonable``,
runtime/messages.py's ``to_body``/``from_body`` at bd7774d, bus/envelope.py's ``utc_now`` and id): the tests compare
the new code with it, byte for byte. Frozen here on purpose; never edited to follow the runtime."""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from bus.base import MalformedMessage

T = TypeVar("T")


def isoformat(value: Any) -> str:
    return str(value.isoformat().replace("+00:00", "Z"))


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, (set, frozenset)):
        try:
            items: Any = sorted(value)
        except TypeError:
            items = value
        return [to_jsonable(v) for v in items]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def to_body(message: Any) -> dict[str, Any]:
    return {f.name: to_jsonable(getattr(message, f.name)) for f in dataclasses.fields(message)}


def from_body(cls: type[T], body: Mapping[str, Any]) -> T:
    if not isinstance(body, Mapping):
        raise MalformedMessage(f"{cls.__name__}: body must be an object")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedMessage(f"{cls.__name__}: field {f.name!r} is missing")
            continue
        try:
            kwargs[f.name] = _decode(hints[f.name], body[f.name])
        except (TypeError, ValueError, InvalidOperation) as exc:
            raise MalformedMessage(f"{cls.__name__}: field {f.name!r}: {exc}") from None
    return cls(**kwargs)


def _decode(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _decode(arg, value)
    if kind is Any:
        return value
    if kind is Decimal:
        if isinstance(value, float):
            raise TypeError("money must be a decimal string, not a float")
        return Decimal(str(value))
    if kind is datetime:
        return datetime.fromisoformat(value)
    if origin in (tuple, list, frozenset, set):
        args = typing.get_args(kind)
        item = args[0] if args else Any
        if not isinstance(value, list):
            raise TypeError("expected an array")
        return origin([_decode(item, v) for v in value])
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError("expected an object")
        return dict(value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return from_body(kind, value)
    if kind in (str, int, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError("expected a number")
        return float(value)
    return value


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    return str(uuid.uuid4())


def decode(data: Any) -> dict[str, Any]:
    """``Envelope.decode``'s checks as they were: the fields it gave, or MalformedMessage naming the problem."""
    import orjson

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
        created_at = None  # the decoder stamps it now
    elif not isinstance(created_at, str) or not _is_timestamp(created_at):
        raise MalformedMessage("envelope field 'created_at' must be an RFC 3339 timestamp")
    return {
        "type": raw["type"],
        "session_id": raw["session_id"],
        "body": body,
        "message_id": raw["message_id"],
        "correlation_id": correlation_id,
        "headers": headers,
        "created_at": created_at,
    }


def _is_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
