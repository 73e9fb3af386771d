"""The state/body codec against the one before issue 14 (tests/codec_reference.py), byte for byte: ``to_body`` and
``to_jsonable``, and the per-class compiled ``from_body`` (same values, same errors), over every bus message and actor
state class of the services with random values from their type hints, and odd values (enums, NaN, subclasses of
builtins, zones with seconds, dataclasses with underscored or extra attributes) that orjson's own forms would
encode differently."""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import inspect
import types
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import jsonutil
from runtime.messages import from_body, to_body
from tests import codec_reference as ref

MODULES = [
    "contracts.catalog",
    "contracts.checkout",
    "contracts.identity",
    "contracts.stock",
    "actors.cart.messages",
    "actors.cart.actor",
    "actors.order.messages",
    "actors.order.actor",
    "actors.catalog.messages",
    "actors.catalog.actor",
    "runtime.actors",
]


def _classes() -> list[type]:
    found: dict[str, type] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__module__ == name:
                found[f"{name}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]


CLASSES = _classes()

# Values as the services make them (aware UTC datetimes, money with cents) and as anything else might
# (naive datetimes, other zones, big ints, odd strings): both encoders must agree on all of them.
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(seconds=-3661)), timezone(timedelta(0), "GMT")]
)
AWARE = st.datetimes(timezones=ZONES)
st.register_type_strategy(datetime, st.one_of(AWARE, st.datetimes()))
st.register_type_strategy(
    Decimal, st.one_of(st.decimals(places=2, allow_nan=False), st.decimals(allow_nan=True, allow_infinity=True))
)


def _instances(cls: type) -> st.SearchStrategy[Any]:
    return st.from_type(cls)


def _old_bytes(value: Any, wire: bool) -> bytes:
    return jsonutil.dumps(ref.to_jsonable(value), wire=wire)


def _same_outcome(new: Any, old: Any) -> None:
    """Both raised the same error, or gave equal values."""
    try:
        expected = old()
    except Exception as exc:  # the new code must raise the same
        with pytest.raises(type(exc)) as caught:
            new()
        assert str(caught.value) == str(exc)
        return
    got = new()
    assert repr(got) == repr(expected)  # repr: Decimal('NaN') is not equal to itself
    assert type(got) is type(expected)


def test_every_service_module_gives_classes() -> None:
    assert {cls.__module__ for cls in CLASSES} == set(MODULES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_bodies_and_states_encode_as_before(cls: type, data: st.DataObject) -> None:
    try:
        value = data.draw(_instances(cls))
    except (ValueError, TypeError):  # a __post_init__ refusing a random value (SagaTimings...)
        return
    for wire in (False, True):
        try:
            old = _old_bytes(value, wire)
        except TypeError as exc:  # an int beyond 64 bits: the new one refuses it too
            with pytest.raises(TypeError, match=str(exc)):
                jsonutil.dumps(to_body(value), wire=wire)
            continue
        assert jsonutil.dumps(to_body(value), wire=wire) == old
        assert jsonutil.dumps(jsonutil.to_jsonable(value), wire=wire) == old
    assert to_body(value) == ref.to_body(value)  # no enum or NaN in these classes: the dicts are equal too


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_bodies_decode_as_before(cls: type, data: st.DataObject) -> None:
    try:
        value = data.draw(_instances(cls))
        body = orjson.loads(orjson.dumps(ref.to_jsonable(value), default=jsonutil.default))
    except (ValueError, TypeError):
        return
    _same_outcome(lambda: from_body(cls, body), lambda: ref.from_body(cls, body))
    # And mistyped bodies: a field replaced by any JSON value, or dropped.
    if body:
        name = data.draw(st.sampled_from(sorted(body)))
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=6,
        )
        bad = {**body, name: data.draw(json_values)}
        _same_outcome(lambda: from_body(cls, bad), lambda: ref.from_body(cls, bad))
        missing = {k: v for k, v in body.items() if k != name}
        _same_outcome(lambda: from_body(cls, missing), lambda: ref.from_body(cls, missing))
    _same_outcome(lambda: from_body(cls, [body]), lambda: ref.from_body(cls, [body]))  # type: ignore[arg-type]


class Colour(enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    L = 3


class Name(str):
    pass


class Stamp(datetime):
    pass


class Point(NamedTuple):
    x: int
    y: int


@dataclasses.dataclass
class Private:
    shown: str
    _hidden: str = "kept"  # orjson's own dataclass form would drop it


@dataclasses.dataclass(slots=True)
class Slotted:
    a: Decimal
    when: datetime | None = None


@dataclasses.dataclass
class Tree:
    """Nests itself, and holds values other than its hints say: the generated encoder must defer to to_jsonable."""

    label: str
    children: list[Tree] = dataclasses.field(default_factory=list)
    parent: Tree | None = None
    price: Decimal | int = 0
    at: datetime | None = None
    pair: tuple[int, str] = (0, "")
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    anything: Any = None


@dataclasses.dataclass
class Unresolved:
    later: NotDefinedAnywhere  # type: ignore[name-defined]  # noqa: F821 - get_type_hints fails: the generic encoder


ODD_VALUES: list[Any] = [
    Tree("root", [Tree("a", at=datetime(2026, 1, 1, tzinfo=UTC)), Tree("b", price=Decimal("1.5"))], pair=(1, "x")),
    Tree("typed", children=(Tree("tuple"),), at=Stamp(2026, 1, 2), pair=[2, "y"], counts={1: 2}),  # type: ignore[arg-type]
    Tree(
        Name("sub"),
        price=3,
        tags=frozenset({"b", "a"}),
        anything={"k": [Decimal("2")]},
        counts=collections.OrderedDict(z=1),
    ),  # type: ignore[arg-type]
    Tree("wrong", children="not a list", parent=[1], at="text", price=None),  # type: ignore[arg-type]
    Unresolved(Decimal("1")),
    [Colour.RED, Size.L],
    {"k": Colour.RED},
    [float("nan"), float("inf"), -0.0, 1e300],
    [2**70],
    collections.OrderedDict(b=1, a=2),
    collections.defaultdict(list, a=[1]),
    types.MappingProxyType({"a": Decimal("1.10")}),
    {1: "int key", None: "none key", 2.5: "float key"},
    {Name("k"): Name("v")},
    {"s": {3, 1, 2}, "f": frozenset({"b", "a"}), "mixed": {1, "a"}},
    Point(1, 2),
    (1, (2, [3])),
    [date(2026, 1, 2), time(3, 4, 5, 6)],
    [datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)],
    [datetime(2026, 1, 2, tzinfo=timezone(timedelta(seconds=3661))), datetime(999, 1, 1, tzinfo=UTC)],
    Stamp(2026, 1, 2, tzinfo=UTC),
    Private("x"),
    Slotted(Decimal("1.50"), datetime(2026, 1, 2, tzinfo=timezone(timedelta(hours=-5)))),
    [Slotted(Decimal("NaN")), Decimal("-0"), Decimal("1E+3")],
    {"nested": [{"deep": [Private("y")]}]},
    "text",
    7,
    None,
    [],
    {},
    b"bytes",
]


@pytest.mark.parametrize("wire", [False, True])
@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_odd_values_encode_as_before(value: Any, wire: bool) -> None:
    _same_outcome(lambda: jsonutil.dumps(jsonutil.to_jsonable(value), wire=wire), lambda: _old_bytes(value, wire))


def test_a_dataclass_with_extra_attributes_encodes_its_fields_only() -> None:
    value = Private("x")
    value.extra = 1  # type: ignore[attr-defined]  # orjson's own dataclass form would write __dict__ (and drop _hidden)
    assert jsonutil.to_jsonable(value) == {"shown": "x", "_hidden": "kept"}


def test_to_body_still_refuses_what_is_not_a_dataclass() -> None:
    with pytest.raises(TypeError):
        to_body({"a": 1})


def test_every_service_class_gets_a_generated_encoder() -> None:
    """Not the generic one (a hint that does not resolve would make it so silently, and slower)."""
    for cls in CLASSES:
        assert getattr(jsonutil.dataclass_encoder(cls), "__name__", None) == "encode", cls
    assert not isinstance(jsonutil.dataclass_encoder(Unresolved), types.FunctionType)
