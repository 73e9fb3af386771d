"""runtime.web.endpoints' input loader: the same values and the same errors as marshmallow's ``Schema.load``.

The loader skips marshmallow's machinery for a valid input of a schema without hooks and hands anything it
cannot load to ``Schema.load`` itself; these tests hold it to giving exactly what ``Schema.load`` gives, on the
schemas of the storefront's hot routes and on the kinds of schema it must leave to marshmallow.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates

from actors.cart.api import CheckoutSchema, IdempotencyHeaders, ProductPath, QuantitySchema
from actors.catalog.api import ConditionalHeaders, ProductIdPath, ProductListQuery
from actors.order.api import PageQuery
from runtime.web.endpoints import _Loader

PRODUCT = str(uuid.uuid4())
ADDRESS = {"name": "A", "street": "1 B St", "city": "C", "postal_code": "123", "country": "GB"}


class WithHook(Schema):
    n = fields.Integer()

    @validates("n")
    def _odd(self, value: int, **_: Any) -> None:
        if value % 2 == 0:
            raise ValidationError("must be odd")


class WithPostLoad(Schema):
    n = fields.Integer(required=True)

    @post_load
    def _wrap(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"wrapped": data}


class Dotted(Schema):
    n = fields.Integer(attribute="a.b")


class Defaults(Schema):
    tags = fields.List(fields.String(), load_default=list)
    when = fields.String(load_default=lambda: "now")
    kept = fields.String(data_key="Kept-As", validate=validate.Length(max=3))


CASES: list[tuple[type[Schema], dict[str, Any]]] = [
    (ProductListQuery, {}),
    (ProductListQuery, {"page": "3"}),
    (ProductListQuery, {"page": "3", "page_size": "100", "q": "red mug", "sort": "-price", "brand": "x"}),
    (ProductListQuery, {"page": "0"}),
    (ProductListQuery, {"page": "x", "page_size": "1000", "sort": "nope", "q": ""}),
    (ProductListQuery, {"page": True}),
    (ConditionalHeaders, {}),
    (ConditionalHeaders, {"If-None-Match": '"abc"'}),
    (ProductIdPath, {"id": PRODUCT}),
    (ProductIdPath, {"id": "{" + PRODUCT + "}"}),
    (ProductIdPath, {"id": "not-a-uuid"}),
    (ProductIdPath, {}),
    (ProductPath, {"product_id": PRODUCT.upper()}),
    (QuantitySchema, {"quantity": 2}),
    (QuantitySchema, {"quantity": "2"}),
    (QuantitySchema, {"quantity": 2.0}),
    (QuantitySchema, {"quantity": -1}),
    (QuantitySchema, {"quantity": None}),
    (QuantitySchema, {"extra": 1}),
    (IdempotencyHeaders, {"Idempotency-Key": "k-1"}),
    (IdempotencyHeaders, {"Idempotency-Key": "has space"}),
    (CheckoutSchema, {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}}),
    (CheckoutSchema, {"shipping_address": {**ADDRESS, "junk": 1}, "payment": {"method": "card", "token": "tok_x"}}),
    (CheckoutSchema, {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "4111 1111 1111 1111"}}),
    (CheckoutSchema, {"shipping_address": "nope", "payment": {}}),
    (PageQuery, {"page": "2", "page_size": "5"}),
    (PageQuery, {"page_size": "0"}),
    (WithHook, {"n": "3"}),
    (WithHook, {"n": "4"}),
    (WithPostLoad, {"n": 1}),
    (Dotted, {"n": 1}),
    (Defaults, {}),
    (Defaults, {"Kept-As": "abc", "tags": ["a"]}),
    (Defaults, {"Kept-As": "abcd"}),
]


def _outcome(load: Any, data: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", load(data)
    except ValidationError as exc:
        return "invalid", exc.messages


@pytest.mark.parametrize(("schema", "data"), CASES)
def test_the_loader_answers_as_marshmallow_does(schema: type[Schema], data: dict[str, Any]) -> None:
    instance = schema()
    expected = _outcome(lambda d: instance.load(d, unknown=EXCLUDE), data)
    got = _outcome(_Loader(instance).load, data)
    assert got == expected
    if got[0] == "ok":
        assert dict(got[1]) == dict(expected[1])


def test_schemas_with_hooks_or_dotted_attributes_are_left_to_marshmallow() -> None:
    assert _Loader(WithHook()).fast is None
    assert _Loader(WithPostLoad()).fast is None
    assert _Loader(Dotted()).fast is None
    assert _Loader(ProductListQuery()).fast is not None
    assert _Loader(CheckoutSchema()).fast is not None  # its nested schemas' hooks run inside their fields


def test_a_callable_default_is_called_for_every_load() -> None:
    loader = _Loader(Defaults())
    first, second = loader.load({}), loader.load({})
    assert first == {"tags": [], "when": "now"}
    assert first["tags"] is not second["tags"]
