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
import functools
import keyword
import types
import typing
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

__all__ = [
    "WIRE",
    "dataclass_encoder",
    "default",
    "dumps",
    "dumps_text",
    "field_names",
    "isoformat",
    "loads",
    "to_jsonable",
]

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
    encode = dataclass_encoder(cls)
    if encode is not None:
        return encode(value)
    return _to_jsonable_any(value)


_PLAIN = frozenset({str, int, float, bool, type(None)})
_SEQUENCES = frozenset({list, tuple})
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


_ENCODERS: dict[type, Callable[[Any], dict[str, Any]] | None] = {}


def dataclass_encoder(cls: type) -> Callable[[Any], dict[str, Any]] | None:
    """:func:`to_jsonable` for instances of dataclass ``cls`` (None when ``cls`` is not one), made once per class.

    The function is generated from the fields' type hints so that a field holding what its hint says (a str, a
    Decimal, a datetime, a list of dataclasses...) is converted inline, without a :func:`to_jsonable` call per value:
    every actor state is encoded per turn (issue 14). Each inline conversion is guarded by the exact type it is
    right for; any other value goes to :func:`to_jsonable`. So the result is :func:`to_jsonable`'s, field by field,
    whatever the instance holds."""
    try:
        return _ENCODERS[cls]
    except KeyError:
        pass
    names = field_names(cls)
    if names is None:
        _ENCODERS[cls] = None
        return None
    _ENCODERS[cls] = functools.partial(_encode_fields, names)  # while generating, for a class nesting itself
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a hint that does not resolve: the generic encoder does without hints
        return _ENCODERS[cls]
    if not all(name.isidentifier() and not keyword.iskeyword(name) for name in names):
        return _ENCODERS[cls]  # not names to write ``o.name`` with (dataclass would not make such a class)
    _ENCODERS[cls] = _generate(cls, names, hints)
    return _ENCODERS[cls]


def _encode_fields(names: tuple[str, ...], value: Any) -> dict[str, Any]:
    return {name: to_jsonable(getattr(value, name)) for name in names}


def _generate(cls: type, names: tuple[str, ...], hints: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    namespace: dict[str, Any] = {
        "J": to_jsonable, "P": _PLAIN, "S": _SEQUENCES, "E": _ENCODERS, "Decimal": Decimal, "datetime": datetime
    }  # fmt: skip
    lines = ["def encode(o):\n    d = {}"]
    for name in names:
        lines.append(f"    v = o.{name}\n    d[{name!r}] = {_expression(hints.get(name, Any), 'v', namespace, 0)}")
    lines.append("    return d")
    code = compile("\n".join(lines), f"<to_jsonable of {cls.__module__}.{cls.__qualname__}>", "exec")
    exec(code, namespace)  # source made above from the field names (identifiers) and the type hints only
    encode: Callable[[Any], dict[str, Any]] = namespace["encode"]
    return encode


def _expression(kind: Any, var: str, namespace: dict[str, Any], depth: int) -> str:
    """Python source that gives ``to_jsonable(<var>)`` when ``var`` holds a value of type hint ``kind``; the source
    checks the value's exact type and calls ``J`` (to_jsonable) for anything else."""
    if kind is Any:
        return f"J({var})"
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _expression(args[0] if args[1] is type(None) else args[1], var, namespace, depth)
        return f"(None if {var} is None else {inner})"
    if isinstance(kind, type) and kind in _PLAIN:
        return f"({var} if type({var}) in P else J({var}))"
    if kind is Decimal:
        return f"(str({var}) if type({var}) is Decimal else J({var}))"
    if kind is datetime:
        return f"({var}.isoformat().replace('+00:00', 'Z') if type({var}) is datetime else J({var}))"
    item = f"x{depth}"
    if origin in (list, tuple) and (len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis)):
        inner = _expression(args[0], item, namespace, depth + 1)
        return f"([{inner} for {item} in {var}] if type({var}) in S else J({var}))"
    if origin is dict and len(args) == 2:
        key = f"k{depth}"
        inner = _expression(args[1], item, namespace, depth + 1)
        return f"({{str({key}): {inner} for {key}, {item} in {var}.items()}} if type({var}) is dict else J({var}))"
    if isinstance(kind, type) and dataclass_encoder(kind) is not None:
        label = f"C{len(namespace)}"
        namespace[label] = kind
        return f"(E[{label}]({var}) if type({var}) is {label} else J({var}))"
    return f"J({var})"


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
