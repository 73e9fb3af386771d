"""The order service, declared (:data:`SERVICE`): OrderActor per order on its own database, the payment processor,
and the "order" queue.

Queue ``"order"`` (session = order id) carries:

* ``CheckoutRequested`` (cart), ``StockReserved`` / ``StockRejected`` (catalog): to the OrderActor, with the
  envelope's message id so the actor's inbox drops redelivered copies;
* ``ProcessPayment`` / ``ReversePayment`` (the order's own outbox): to the :class:`PaymentProcessor`, which
  charges outside actor turns and tells the actor the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from alembic.operations import Operations
from sqlalchemy import Connection

from actors.order import api, public, repository
from actors.order.actor import OrderActor, SagaTimings
from actors.order.checkouts import AcceptedCheckouts
from actors.order.messages import ProcessPayment, ReversePayment
from actors.order.payment import (
    Deliver,
    PaymentProcessor,
    PaymentProvider,
    RetryPolicy,
    SimulatedPaymentProvider,
)
from bus.envelope import Envelope
from config import Settings
from contracts.checkout import CheckoutRequested, OrderStarted, OrderStatusChanged
from contracts.queues import CATALOG_QUEUE, ORDER_QUEUE
from contracts.stock import CommitReservation, ReleaseStock, ReserveStock, StockRejected, StockReserved
from runtime import host
from runtime.actors import ActorSystem, DuplicateMessage
from runtime.description import (
    ActorType,
    BusRoute,
    Http,
    Queue,
    Resource,
    ServiceContext,
    ServiceDescription,
    ToActor,
    ToHandler,
)
from runtime.messages import BusBinding, from_body
from runtime.migrate import Component, Migration, create_tables
from runtime.upstream import Upstream, service_urls

log = logging.getLogger(__name__)

NAME = "order"


def _index_order_status(op: Operations, _conn: Connection) -> None:
    op.create_index(repository.STATUS_INDEX, repository.orders.name, ["status"])


SCHEMA = Component(
    NAME,
    [
        Migration(1, "orders: one summary row per order for the buyers' lists", create_tables(*repository.TABLES)),
        Migration(
            2,
            "payment_simulator_charges: the payment simulator's durable idempotency keys",
            create_tables(repository.payment_simulator_charges),
        ),
        Migration(3, "orders: index on status, for the saga-load count", _index_order_status),
    ],
)

PAYMENTS: web.AppKey[PaymentProcessor] = web.AppKey("order_payments", PaymentProcessor)


def timings_from(settings: Settings) -> SagaTimings:
    """The saga's timings from ``[shop]`` (ECOM_SHOP_PAYMENT_TIMEOUT, ECOM_SHOP_VALIDATION_TIMEOUT,
    ECOM_SHOP_RETRY_INTERVAL, ECOM_SHOP_RETRY_MAX_INTERVAL): operators tune them without a code change."""
    shop = settings.shop
    return SagaTimings(
        validation_timeout=float(shop.validation_timeout),
        payment_timeout=float(shop.payment_timeout),
        retry_interval=float(shop.retry_interval),
        retry_max_interval=float(shop.retry_max_interval),
    )


@dataclass(frozen=True, slots=True)
class OrderOptions:
    """``create_app``'s overrides (tests, embedded mode): the payment provider (default: the simulator, which keeps
    its idempotency keys in this service's database), the saga's timings (default: :func:`timings_from`) and the
    payment retry policy; ``cart_url``, the cart instances asked about orders not recorded here yet."""

    payment_provider: PaymentProvider | None = None
    timings: SagaTimings | None = None
    payment_policy: RetryPolicy | None = None
    cart_url: str | Sequence[str] | None = (
        None  # like the cart's ``catalog_url``: the cart instances (default: settings')
    )


def _order_deps(ctx: ServiceContext) -> dict[str, Any]:
    return {"timings": ctx.options.timings or timings_from(ctx.settings)}


def _payments(ctx: ServiceContext) -> PaymentProcessor:
    provider = ctx.options.payment_provider
    if provider is None:
        log.warning("order: payments go to the SimulatedPaymentProvider; no real money moves")
        provider = SimulatedPaymentProvider()
    if isinstance(provider, SimulatedPaymentProvider):
        # The simulator keeps its idempotency keys in this service's database (its own table), durable across
        # restarts and shared by every instance, like a real provider's.
        provider.bind(ctx.engine)
    return PaymentProcessor(provider, _deliver_to(ctx.system), ctx.options.payment_policy)


def _deliver_to(system: ActorSystem) -> Deliver:
    async def deliver(order_id: str, message: Any, message_id: str) -> None:
        try:
            await system.ref(OrderActor, order_id).ask(message, message_id=message_id)
        except DuplicateMessage:
            log.debug("order %s: %s %s applied already", order_id, type(message).__name__, message_id)

    return deliver


def _checkouts(ctx: ServiceContext) -> AcceptedCheckouts:
    # the cart instances, asked about an order not recorded here yet (GET never 404s after the checkout's 202)
    return AcceptedCheckouts(Upstream("cart", ctx.options.cart_url or service_urls(ctx.settings, "cart")))


def process_payment(ctx: ServiceContext, _binding: BusBinding) -> BusRoute:
    processor = ctx[PAYMENTS]

    async def route(env: Envelope) -> None:
        processor.start_charge(from_body(ProcessPayment, env.body), env.message_id)

    return route


def reverse_payment(ctx: ServiceContext, _binding: BusBinding) -> BusRoute:
    processor = ctx[PAYMENTS]

    async def route(env: Envelope) -> None:
        await processor.reverse(from_body(ReversePayment, env.body), env.message_id)

    return route


# ---------------------------------------------------------------------------------------------------
# The service

# Stopped after the payment processor and before the runtime stops the outbox relay, so no turn commits (and wakes
# the relay) while the relay is being cancelled: on Python 3.11 the relay's asyncio.wait_for can swallow a
# cancellation that comes with a wake-up, and shutdown then never ends. Stopping the actor system twice is harmless.
CHECKOUTS: web.AppKey[AcceptedCheckouts] = web.AppKey("order_checkouts", AcceptedCheckouts)
ACTORS_STOPPED_FIRST: web.AppKey[ActorSystem] = web.AppKey("order_actors_stopped_first", ActorSystem)

SERVICE = ServiceDescription(
    NAME,
    options=OrderOptions,
    http=Http(api.setup),
    actors=(ActorType(OrderActor, deps=_order_deps),),
    resources=(
        Resource(ACTORS_STOPPED_FIRST, lambda ctx: ctx.system, stop=ActorSystem.stop),
        Resource(PAYMENTS, _payments, stop=PaymentProcessor.close),
        Resource(CHECKOUTS, _checkouts, start=AcceptedCheckouts.start, stop=AcceptedCheckouts.close),
        Resource(api.ORDERS, lambda ctx: api.OrderContext(ctx.system, OrderActor, ctx[CHECKOUTS])),
        Resource(api.LOAD, lambda ctx: api.LoadGauge(ctx.engine)),
    ),
    consumes=(
        Queue(
            ORDER_QUEUE,
            (
                ToActor(CheckoutRequested, OrderActor),
                ToActor(StockReserved, OrderActor),
                ToActor(StockRejected, OrderActor),
                # the order's own payment step: charged outside actor turns, the result told to the actor
                ToHandler(ProcessPayment, process_payment),
                ToHandler(ReversePayment, reverse_payment),
            ),
        ),
    ),
    sends={
        CATALOG_QUEUE: (ReserveStock, ReleaseStock, CommitReservation),
        ORDER_QUEUE: (ProcessPayment, ReversePayment),
    },
    publishes=(OrderStarted, OrderStatusChanged),
    gateway_routes=public.ROUTES,
    schema=SCHEMA,
)


def create_app(settings: Settings, **overrides: Any) -> web.Application:
    """The order application (``overrides``: ``bus``, ``database_url``, ``verifier`` and :class:`OrderOptions`)."""
    return host.service_app(SERVICE, settings, **overrides)
