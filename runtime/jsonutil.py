"""The runtime's one JSON encoder: what the host answers, what actors store, what messages carry.

The rules, everywhere:

- :class:`~decimal.Decimal` as a string (money travels as a decimal string, never a float),
- sets and frozensets as sorted arrays, tuples as arrays,
- datetimes as RFC 3339 with ``Z`` for UTC (:func:`isoformat`; on the wire naive ones are taken as UTC),
- dataclasses as objects of their fields.

:func:`dumps` is the HTTP/wire form (bytes). :func:`dumps_text` is the same encoder as text; actor state
and reminder payloads use it with ``wire=False``, which keeps orjson's own datetime form for them
(``+00:00``, a naive datetime without a zone), exactly as they have always been stored.
:func:`to_jsonable` turns a value into plain JSON types (bus message bodies, which the envelope encodes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

__all__ = ["WIRE", "default", "dumps", "dumps_text", "field_names", "isoformat", "loads", "to_jsonable"]

WIRE = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z  # datetimes as RFC 3339 with 'Z'; naive ones are UTC

loads = orjson.loads


def default(value: Any) -> Any:
    """orjson's hook for the types it does not know itself."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any, *, wire: bool = True) -> bytes:
    """``value`` as JSON bytes (raises TypeError for a type JSON cannot carry)."""
    return orjson.dumps(value, default=default, option=WIRE if wire else 0)


def dumps_text(value: Any, *, wire: bool = True) -> str:
    return dumps(value, wire=wire).decode()


def isoformat(value: datetime | date) -> str:
    """RFC 3339 with ``Z`` for UTC (a naive datetime keeps no zone)."""
    return value.isoformat().replace("+00:00", "Z")


def to_jsonable(value: Any) -> Any:
    """``value`` in plain JSON types: dataclasses as dicts, Decimal as str, datetimes via :func:`isoformat`,
    sequences and sets as lists (sets sorted when their items compare), mapping keys as strings.

    Dispatches on the exact type first (JSON scalars, Decimal, datetime, list, tuple, dict, a dataclass with its
    field names cached per class): every actor state and bus message body goes through here, and the generic
    ``isinstance``/``dataclasses.fields`` chain was a hot spot of a checkout (issue 14). Any other type (a subclass,
    a set, a Mapping) takes that chain, which gives the same result as before."""
    cls = type(value)
    if cls in _PLAIN:
        return value
    if cls is list or cls is tuple:
        return [to_jsonable(v) for v in value]
    if cls is Decimal:
        return str(value)
    if cls is datetime:
        return isoformat(value)
    if cls is dict:
        return {str(k): to_jsonable(v) for k, v in value.items()}
    names = field_names(cls)
    if names is not None:
        return {name: to_jsonable(getattr(value, name)) for name in names}
    return _to_jsonable_any(value)


_PLAIN = frozenset({str, int, float, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def field_names(cls: type) -> tuple[str, ...] | None:
    """The field names of dataclass ``cls`` in declaration order (what ``dataclasses.fields`` lists), None when
    ``cls`` is not a dataclass; looked up once per class."""
    try:
        return _FIELD_NAMES[cls]
    except KeyError:
        names = tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None
        _FIELD_NAMES[cls] = names
        return names


def _to_jsonable_any(value: Any) -> Any:
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
            items = value  # items that do not compare: any order (as before sorting was tried)
        return [to_jsonable(v) for v in items]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value
