"""HTTP API of the cart service (full paths; the gateway proxies them unchanged).

    GET    /api/cart                         the caller's cart: lines, totals, item count, price-change notes
    PUT    /api/cart/items/{product_id}      {quantity}: set a line (0 removes it); idempotent
    DELETE /api/cart/items/{product_id}      remove a line (removing an absent line is not an error)
    DELETE /api/cart                         empty the cart
    POST   /api/cart/checkout                {shipping_address, payment} -> 202 {order_id}; Idempotency-Key header
    GET    /api/cart/checkouts/{order_id}    one of the caller's checkouts: {order_id, started, order} (the order
                                             service asks this for an order it has not recorded yet)

The cart is always the caller's own: its id is the token's ``sub``; no route takes a cart id, so a customer
cannot name anyone else's cart. Admins inspect any cart through ``/api/cart/admin/actors/cart/{id}`` (host).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from actors.cart.actor import MAX_LINE_QUANTITY, CartActor, PricesChangedProblem
from actors.cart.admission import Admission, CheckoutOverloaded
from actors.cart.catalog import CatalogClient
from actors.cart.messages import (
    AcceptedCheckout,
    Checkout,
    CheckoutAccepted,
    ClearCart,
    GetCart,
    GetCheckout,
    PricesChanged,
    ProductQuote,
    QuotesNeeded,
    RemoveLine,
    SetQuantity,
)
from contracts.checkout import Address, PaymentDetails
from runtime.actors import ActorRef, ActorSystem
from runtime.auth import Principal
from runtime.errors import Conflict, NotFound
from runtime.host import json_response
from runtime.web.endpoints import Auth, Reply, endpoint

PREFIX = "/api/cart"
CUSTOMER = Auth(roles=("customer", "admin"))
IDEMPOTENCY_HEADER = "Idempotency-Key"
# A checkout asks the cart, fetches quotes for lines it has not priced yet, and asks again; only a cart that keeps
# gaining products while this happens needs more rounds.
CHECKOUT_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class CartContext:
    """What the routes need, set by ``service.create_app``."""

    system: ActorSystem
    actor_class: type[CartActor]
    catalog: CatalogClient
    admission: Admission | None = None  # None: no admission control (a cart without an order service)


CART: web.AppKey[CartContext] = web.AppKey("cart_context", CartContext)


# ---------------------------------------------------------------------------------------------------
# Schemas


class ProductPath(Schema):
    product_id = fields.UUID(required=True)


class CheckoutPath(Schema):
    order_id = fields.String(required=True, validate=validate.Length(min=1, max=64))


class CheckoutRecordSchema(Schema):
    order_id = fields.String(required=True)
    started = fields.Boolean(required=True, metadata={"description": "the order service has recorded the order"})
    order = fields.Dict(
        allow_none=True, metadata={"description": "what was sent to the order service (no payment details)"}
    )


class IdempotencyHeaders(Schema):
    idempotency_key = fields.String(
        data_key=IDEMPOTENCY_HEADER,
        validate=validate.Regexp(
            r"^[\x21-\x7e]{1,255}$",  # visible ASCII, as the IETF Idempotency-Key draft
            error="must be 1 to 255 visible ASCII characters, e.g. a UUID",
        ),
        metadata={"description": "makes retries safe: the same key gives the same order"},
    )


class QuantitySchema(Schema):
    quantity = fields.Integer(
        required=True,
        strict=True,  # "2" and 2.5 are refused, not coerced
        validate=validate.Range(min=0, max=MAX_LINE_QUANTITY),
        metadata={"description": f"0 removes the line; at most {MAX_LINE_QUANTITY}"},
    )


def _text(max_length: int, **kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=1, max=max_length), **kwargs)


class AddressSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # like the top level of every body: fields the document does not name are ignored

    name = _text(200, required=True)
    street = _text(200, required=True)
    city = _text(100, required=True)
    postal_code = _text(20, required=True)
    country = _text(60, required=True)
    state = fields.String(load_default="", validate=validate.Length(max=100))

    @post_load
    def _address(self, data: dict[str, Any], **_: Any) -> Address:
        return Address(**data)


def _not_a_card_number(token: str) -> None:
    if re.fullmatch(r"[\d -]{12,23}", token):
        raise ValidationError("send the payment provider's token, never a card number")


class PaymentSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    method = fields.String(
        required=True,
        validate=validate.Regexp(r"^[a-z][a-z_]{0,31}$", error="must be a payment method name such as card"),
    )
    token = fields.String(
        required=True,
        validate=[
            _not_a_card_number,
            # the lookahead states _not_a_card_number in the document (a pattern is all Swagger 2 has for it)
            validate.Regexp(
                r"^(?![0-9 -]{12,23}$)[A-Za-z0-9_-]{3,200}$",
                error="must be a payment provider token such as tok_visa",
            ),
        ],
    )

    @post_load
    def _payment(self, data: dict[str, Any], **_: Any) -> PaymentDetails:
        return PaymentDetails(**data)


class CheckoutSchema(Schema):
    shipping_address = fields.Nested(AddressSchema, required=True)
    payment = fields.Nested(PaymentSchema, required=True)


class LineSchema(Schema):
    product_id = fields.String()
    name = fields.String()
    unit_price = fields.String(metadata={"example": "19.99"})
    quantity = fields.Integer()
    line_total = fields.String(metadata={"example": "39.98"})
    picture_url = fields.String()


class NoteSchema(Schema):
    product_id = fields.String()
    name = fields.String()
    old_price = fields.String()
    new_price = fields.String()
    changed_at = fields.DateTime()
    message = fields.String()


class CartSchema(Schema):
    lines = fields.List(fields.Nested(LineSchema))
    item_count = fields.Integer()
    subtotal = fields.String(metadata={"example": "39.98"})
    total = fields.String(metadata={"example": "39.98"})
    currency = fields.String(allow_none=True)
    notes = fields.List(fields.Nested(NoteSchema))
    updated_at = fields.DateTime(allow_none=True)


class OrderAcceptedSchema(Schema):
    order_id = fields.String()


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal


@dataclass(frozen=True, slots=True)
class PutItem:
    principal: Principal
    product_id: uuid.UUID
    quantity: int


@dataclass(frozen=True, slots=True)
class DeleteItem:
    principal: Principal
    product_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class CheckoutLookup:
    principal: Principal
    order_id: str


@dataclass(frozen=True, slots=True)
class CheckoutInput:
    principal: Principal
    shipping_address: Address
    payment: PaymentDetails
    idempotency_key: str | None = None


# ---------------------------------------------------------------------------------------------------
# Helpers


def _context(request: web.Request) -> CartContext:
    return request.app[CART]


def _cart_of(request: web.Request, caller: Principal) -> ActorRef:
    """The caller's own cart: the verified token's subject, never an id from the request."""
    ctx = _context(request)
    return ctx.system.ref(ctx.actor_class, caller.sub)


async def _quote(request: web.Request, product_id: str) -> ProductQuote:
    quote = await _context(request).catalog.quote(product_id)
    if quote is None:
        raise NotFound(f"there is no product {product_id} in the catalog (unknown or deleted)", slug="unknown-product")
    return quote


# ---------------------------------------------------------------------------------------------------
# Routes


@endpoint(
    Caller,
    tags=["cart"],
    summary="Your cart",
    description="Lines, totals (decimal strings), item count and price-change notes.",
    responses={200: CartSchema},
    auth=CUSTOMER,
)
async def get_cart(request: web.Request, caller: Caller) -> web.Response:
    return json_response(await _cart_of(request, caller.principal).ask(GetCart()))


@endpoint(
    PutItem,
    tags=["cart"],
    summary="Set the quantity of a product (0 removes it)",
    description="Name and price come from the catalog. Idempotent. 404 unknown product, 409 not enough stock.",
    path=ProductPath,
    body=QuantitySchema,
    responses={200: CartSchema},
    auth=CUSTOMER,
    problems=(409,),
)
async def put_item(request: web.Request, put: PutItem) -> web.Response:
    product_id, cart = str(put.product_id), _cart_of(request, put.principal)
    if put.quantity == 0:
        # Removing needs nothing from the catalog, so it works for deleted products and while the catalog is down.
        return json_response(await cart.ask(RemoveLine(product_id)))
    quote = await _quote(request, product_id)
    return json_response(await cart.ask(SetQuantity(quote, put.quantity)))


@endpoint(
    DeleteItem,
    tags=["cart"],
    summary="Remove a product from your cart",
    description="Removing a product that is not in the cart changes nothing (200).",
    path=ProductPath,
    responses={200: CartSchema},
    auth=CUSTOMER,
)
async def delete_item(request: web.Request, delete: DeleteItem) -> web.Response:
    return json_response(await _cart_of(request, delete.principal).ask(RemoveLine(str(delete.product_id))))


@endpoint(Caller, tags=["cart"], summary="Empty your cart", responses={200: CartSchema}, auth=CUSTOMER)
async def clear_cart(request: web.Request, caller: Caller) -> web.Response:
    return json_response(await _cart_of(request, caller.principal).ask(ClearCart()))


@endpoint(
    CheckoutInput,
    tags=["cart"],
    summary="Check out",
    description=(
        "503 with Retry-After while too many orders are in progress (nothing is changed). "
        "Re-checks every price with the catalog: when one differs from the price the cart last showed you (even if "
        "the cart already took it from a price-change event), the answer is 409 with the new prices (check out "
        "again to confirm). Otherwise 202 with the new order id; the order moves on asynchronously. "
        f"Send an {IDEMPOTENCY_HEADER} header to make retries safe: the same key gives the same order."
    ),
    headers=IdempotencyHeaders,
    body=CheckoutSchema,
    responses={
        202: Reply(
            OrderAcceptedSchema,
            "accepted: the order id (and its URL in Location)",
            {
                "Location": {"type": "string", "description": "the order's URL"},
                "Idempotent-Replayed": {"type": "string", "description": "true: a retry of an accepted checkout"},
            },
        ),
    },
    auth=CUSTOMER,
    problems=(409,),
)
async def checkout(request: web.Request, order: CheckoutInput) -> web.Response:
    command = Checkout(
        buyer_id=order.principal.sub,
        idempotency_key=order.idempotency_key,
        shipping_address=order.shipping_address,
        payment=order.payment,
        quotes={},
    )
    cart, ctx = _cart_of(request, order.principal), _context(request)
    catalog = ctx.catalog
    if ctx.admission is not None:
        try:
            await ctx.admission.check()
        except CheckoutOverloaded:
            # A retry of a checkout that was accepted earlier still gets its order id: that creates nothing.
            if command.idempotency_key is not None:
                reply = await cart.ask(replace(command, replay_only=True))
                if isinstance(reply, CheckoutAccepted):
                    return _accepted(reply)
            raise
    for _ in range(CHECKOUT_ROUNDS):
        reply = await cart.ask(command)
        if isinstance(reply, QuotesNeeded):
            # Fetched outside the turn, so the cart keeps serving other requests meanwhile; fresh, not cached.
            fetched = await catalog.quotes(reply.product_ids, fresh=True)
            command = replace(command, quotes={**command.quotes, **fetched})
            continue
        if isinstance(reply, PricesChanged):
            raise PricesChangedProblem(reply)
        if ctx.admission is not None and isinstance(reply, CheckoutAccepted) and not reply.replayed:
            ctx.admission.accepted(reply.order_id)
        return _accepted(reply)
    raise Conflict("the cart kept changing during checkout; try again", slug="cart-changing")


@endpoint(
    CheckoutLookup,
    tags=["cart"],
    summary="One of your checkouts",
    description="The checkout behind a 202: ``started`` once its order exists; until then ``order`` is what was sent "
    "to the order service (no payment details). The order service asks this for an order it has not recorded yet. "
    "404 when your cart has no such checkout.",
    path=CheckoutPath,
    responses={200: CheckoutRecordSchema},
    auth=CUSTOMER,
)
async def get_checkout(request: web.Request, lookup: CheckoutLookup) -> web.Response:
    reply = await _cart_of(request, lookup.principal).ask(GetCheckout(lookup.order_id))
    if not isinstance(reply, AcceptedCheckout):
        raise NotFound(f"your cart has no checkout for order {lookup.order_id}", slug="checkout-not-found")
    return json_response({"order_id": reply.order_id, "started": reply.started, "order": reply.order})


def _accepted(reply: CheckoutAccepted) -> web.Response:
    headers = {"Location": f"/api/orders/{reply.order_id}"}
    if reply.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response({"order_id": reply.order_id}, status=202, headers=headers)


# ---------------------------------------------------------------------------------------------------
# Wiring


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX, get_cart)
    app.router.add_delete(PREFIX, clear_cart)
    app.router.add_put(f"{PREFIX}/items/{{product_id}}", put_item)
    app.router.add_delete(f"{PREFIX}/items/{{product_id}}", delete_item)
    app.router.add_post(f"{PREFIX}/checkout", checkout)
    app.router.add_get(f"{PREFIX}/checkouts/{{order_id}}", get_checkout)
