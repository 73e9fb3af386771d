"""HTTP API of the order service (full paths; the gateway proxies them unchanged).

    GET  /api/orders?page=&page_size=     the caller's orders, newest first (admins: everybody's), from the query table
    GET  /api/orders/{id}                 one order: lines, totals, address, status and history
    POST /api/orders/{id}/cancel          cancel before it is paid (reserved stock goes back); Idempotency-Key header
    POST /api/orders/{id}/ship            admin: mark a paid order shipped; Idempotency-Key header
    GET  /api/order/internal/load         internal: {"open_orders": n, "outbox_backlog": m}, for admission control

The load endpoint is for the other services (the cart refuses checkouts while the order service is overloaded).
It reveals only two counts, so it needs no token; the gateway does not route ``/api/order/internal`` at all.

A customer sees only their own orders: anyone else's answers 404, exactly like an order that does not exist.
Reading never wakes an actor: the list comes from the ``orders`` table, one order from its committed state. An order
the cart accepted (202) but this service has not recorded yet is answered from the cart's checkout record, as
``submitted`` (:mod:`actors.order.checkouts`): after the 202, ``GET /api/orders/{id}`` never answers 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from marshmallow import Schema, fields, validate
from sqlalchemy.ext.asyncio import AsyncEngine

from actors.order.actor import OrderActor, OrderState, accepted_order, load_order, order_view
from actors.order.checkouts import AcceptedCheckouts
from actors.order.messages import CancelOrder, CommandResult, ShipOrder
from actors.order.repository import OrderSummary, SagaLoad, list_orders, saga_load
from contracts.checkout import CheckoutRequested, OrderStatus
from runtime.actors import ActorRef, ActorSystem
from runtime.auth import Principal
from runtime.errors import NotFound
from runtime.host import AppKeyRuntime, json_response
from runtime.messages import from_body
from runtime.money import money
from runtime.web.endpoints import Auth, Reply, endpoint

log = logging.getLogger(__name__)

PREFIX = "/api/orders"
CUSTOMER = Auth(roles=("customer", "admin"))
ADMIN = Auth(roles=("admin",))
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_PAGE = 100_000
MAX_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class OrderContext:
    """What the routes need, set by ``service.create_app``."""

    system: ActorSystem
    actor_class: type[OrderActor]
    checkouts: AcceptedCheckouts | None = None  # the cart's accepted checkouts, asked on a miss (never 404 after 202)


ORDERS: web.AppKey[OrderContext] = web.AppKey("order_context", OrderContext)
LOAD_PATH = "/api/order/internal/load"


class LoadGauge:
    """The saga backlog, counted at most once per ``ttl`` seconds per process: the cart may ask on every checkout,
    and a burst of checkouts must not become a burst of COUNT queries. Concurrent readers of an expired value wait
    for one query instead of each running their own."""

    def __init__(self, engine: AsyncEngine, ttl: float = 0.5) -> None:
        self.engine = engine
        self.ttl = ttl
        self.queries = 0  # counts run so far (what the cache saves is visible in tests and metrics)
        self._value: SagaLoad | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> SagaLoad | None:
        return self._value if self._value is not None and time.monotonic() - self._at < self.ttl else None

    async def read(self) -> SagaLoad:
        value = self._fresh()
        if value is not None:
            return value
        async with self._lock:
            value = self._fresh()
            if value is None:
                value = await saga_load(self.engine, sorted(OrderStatus.OPEN))
                self.queries += 1
                self._value, self._at = value, time.monotonic()
            return value


LOAD: web.AppKey[LoadGauge] = web.AppKey("order_load", LoadGauge)


# ---------------------------------------------------------------------------------------------------
# Schemas


class PageQuery(Schema):
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=MAX_PAGE))
    page_size = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class OrderLineSchema(Schema):
    product_id = fields.String()
    name = fields.String()
    unit_price = fields.String(metadata={"example": "9.99"})
    quantity = fields.Integer()
    picture_url = fields.String()


class AddressSchema(Schema):
    name = fields.String()
    street = fields.String()
    city = fields.String()
    postal_code = fields.String()
    country = fields.String()
    state = fields.String()


class HistorySchema(Schema):
    status = fields.String(metadata={"enum": list(OrderStatus.ALL)})
    at = fields.DateTime()
    reason = fields.String()


class OrderSchema(Schema):
    id = fields.String()
    buyer_id = fields.String()
    status = fields.String(metadata={"enum": list(OrderStatus.ALL)})
    lines = fields.List(fields.Nested(OrderLineSchema))
    total = fields.String(metadata={"example": "19.98"})
    currency = fields.String()
    shipping_address = fields.Nested(AddressSchema)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    history = fields.List(fields.Nested(HistorySchema))


class OrderSummarySchema(Schema):
    id = fields.String()
    buyer_id = fields.String()
    status = fields.String(metadata={"enum": list(OrderStatus.ALL)})
    total = fields.String(metadata={"example": "19.98"})
    currency = fields.String()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class OrderPageSchema(Schema):
    items = fields.List(fields.Nested(OrderSummarySchema))
    page = fields.Integer()
    page_size = fields.Integer()
    total = fields.Integer()


class LoadSchema(Schema):
    open_orders = fields.Integer(metadata={"description": "orders in submitted, awaiting_validation, stock_confirmed"})
    outbox_backlog = fields.Integer(metadata={"description": "messages of the order service not yet on the bus"})


class OrderPath(Schema):
    id = fields.String(required=True, metadata={"description": "the order id (a UUID, as checkout answered it)"})


class IdempotencyHeaders(Schema):
    idempotency_key = fields.String(
        data_key=IDEMPOTENCY_HEADER,
        validate=validate.Regexp(
            r"^[\x21-\x7e]{1,255}$",  # visible ASCII, as the IETF Idempotency-Key draft
            error="must be 1 to 255 visible ASCII characters, e.g. a UUID",
        ),
        metadata={"description": "makes retries safe: a retry with the same key changes nothing more"},
    )


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class PageInput:
    principal: Principal
    page: int
    page_size: int


@dataclass(frozen=True, slots=True)
class OrderInput:
    principal: Principal
    id: str


@dataclass(frozen=True, slots=True)
class CommandInput:
    principal: Principal
    id: str
    idempotency_key: str | None = None


# ---------------------------------------------------------------------------------------------------
# Helpers


def _context(request: web.Request) -> OrderContext:
    return request.app[ORDERS]


def _is_admin(p: Principal) -> bool:
    return "admin" in p.roles


def _summary_json(s: OrderSummary) -> dict[str, Any]:
    return {
        "id": s.id,
        "buyer_id": s.buyer_id,
        "status": s.status,
        "total": money(s.total),
        "currency": s.currency,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def _command_response(result: CommandResult) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if result.replayed else None
    return json_response(result.order, headers=headers)


# ---------------------------------------------------------------------------------------------------
# Routes


@endpoint(
    PageInput,
    tags=["orders"],
    summary="Your orders, newest first",
    description="Admins see every buyer's orders.",
    query=PageQuery,
    responses={200: OrderPageSchema},
    auth=CUSTOMER,
)
async def get_orders(request: web.Request, query: PageInput) -> web.Response:
    p = query.principal
    engine = request.app[AppKeyRuntime].engine
    assert engine is not None  # the order service always has its database
    found = await list_orders(
        engine, buyer_id=None if _is_admin(p) else p.sub, page=query.page, page_size=query.page_size
    )
    return json_response(
        {
            "items": [_summary_json(s) for s in found.items],
            "page": query.page,
            "page_size": query.page_size,
            "total": found.total,
        }
    )


@endpoint(
    OrderInput,
    tags=["orders"],
    summary="One order",
    description="Lines, totals, shipping address, status and its history. Someone else's order answers 404.",
    path=OrderPath,
    responses={200: OrderSchema},
    auth=CUSTOMER,
)
async def get_order(request: web.Request, wanted: OrderInput) -> web.Response:
    order_id, p = _order_id(wanted.id), wanted.principal
    ctx = _context(request)
    order = await _committed_order(ctx, order_id)
    if order is None and ctx.checkouts is not None and _cart_made(order_id):
        # Not recorded here (yet): the cart's checkout record, on which its 202 was based, answers for it.
        accepted = await ctx.checkouts.find(order_id, request.headers.get("Authorization", ""))
        if accepted is not None and accepted.started:
            order = await _committed_order(ctx, order_id)  # started: committed here before the cart heard of it
        elif accepted is not None and accepted.order is not None:
            order = _accepted_order(accepted.order)
    if order is None or (order.buyer_id != p.sub and not _is_admin(p)):
        raise NotFound(f"there is no order {order_id}", slug="order-not-found")
    return json_response(order_view(order_id, order))


async def _committed_order(ctx: OrderContext, order_id: str) -> OrderState | None:
    # The committed state, live or stored: reading does not go through (or wake) the actor's mailbox.
    info = await ctx.system.inspect(OrderActor.type_name, order_id)
    order = load_order(info["state"]) if info is not None else None
    return order if order is not None and order.status else None


def _accepted_order(body: dict[str, Any]) -> OrderState | None:
    try:
        return accepted_order(from_body(CheckoutRequested, {**body, "payment": {"method": "", "token": ""}}))
    except (TypeError, ValueError, KeyError) as exc:  # a cart of another version: not an answer, a miss
        log.warning("the cart's checkout record could not be read as an order: %r", exc)
        return None


_REPLAYED = {"Idempotent-Replayed": {"type": "string", "description": "true: a retry with a known key"}}


@endpoint(
    CommandInput,
    tags=["orders"],
    summary="Cancel an order before it is paid",
    description="Reserved stock goes back to the catalog; a payment in progress is voided. 409 once paid. "
    f"Cancelling a cancelled order changes nothing. Send an {IDEMPOTENCY_HEADER} header to make retries safe.",
    path=OrderPath,
    headers=IdempotencyHeaders,
    responses={200: Reply(OrderSchema, "the order as the command left it", _REPLAYED)},
    auth=CUSTOMER,
    problems=(409,),
)
async def cancel_order(request: web.Request, cancel: CommandInput) -> web.Response:
    p = cancel.principal
    command = CancelOrder(p.sub, _is_admin(p), cancel.idempotency_key)
    return _command_response(await _order(request, cancel.id).ask(command))


@endpoint(
    CommandInput,
    tags=["orders"],
    summary="Mark a paid order shipped (admin)",
    description=f"409 unless the order is paid. Send an {IDEMPOTENCY_HEADER} header to make retries safe.",
    path=OrderPath,
    headers=IdempotencyHeaders,
    responses={200: Reply(OrderSchema, "the order as the command left it", _REPLAYED)},
    auth=ADMIN,
    problems=(409,),
)
async def ship_order(request: web.Request, ship: CommandInput) -> web.Response:
    return _command_response(await _order(request, ship.id).ask(ShipOrder(ship.idempotency_key)))


@endpoint(
    tags=["internal"],
    summary="Saga backlog, for admission control (internal)",
    description="Open orders and unsent outbox messages, counted at most every half second. Counts only; no token.",
    responses={200: LoadSchema},
)
async def get_load(request: web.Request) -> web.Response:
    load = await request.app[LOAD].read()
    return json_response({"open_orders": load.open_orders, "outbox_backlog": load.outbox_backlog})


def _cart_made(order_id: str) -> bool:
    """Whether ``order_id`` could be one a cart gave (``str(uuid4())``): only those are worth asking the cart about,
    and only for those can a cart that does not answer make the order service unsure (503 rather than 404)."""
    try:
        return str(uuid.UUID(order_id)) == order_id
    except ValueError:
        return False


def _order_id(order_id: str) -> str:
    if len(order_id) > MAX_ID_LENGTH:  # no order has such an id; don't carry it to the database
        raise NotFound(f"there is no order {order_id[:MAX_ID_LENGTH]}...", slug="order-not-found")
    return order_id


def _order(request: web.Request, order_id: str) -> ActorRef:
    ctx = _context(request)
    return ctx.system.ref(ctx.actor_class, _order_id(order_id))


# ---------------------------------------------------------------------------------------------------
# Wiring


def setup(app: web.Application) -> None:
    app.router.add_get(PREFIX, get_orders)
    app.router.add_get(f"{PREFIX}/{{id}}", get_order)
    app.router.add_post(f"{PREFIX}/{{id}}/cancel", cancel_order)
    app.router.add_post(f"{PREFIX}/{{id}}/ship", ship_order)
    app.router.add_get(LOAD_PATH, get_load)
