"""The order service: OrderActor per order on its own database, the payment processor, and the "order" queue.

Queue ``"order"`` (session = order id) carries:

* ``CheckoutRequested`` (cart), ``StockReserved`` / ``StockRejected`` (catalog): to the OrderActor, with the
  envelope's message id so the actor's inbox drops redelivered copies;
* ``ProcessPayment`` / ``ReversePayment`` (the order's own outbox): to the :class:`PaymentProcessor`, which
  charges outside actor turns and tells the actor the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from alembic.operations import Operations
from sqlalchemy import Connection

from actors.cart.upstream import Upstream, service_urls
from actors.order import api, repository
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
from contracts.checkout import CheckoutRequested
from contracts.queues import ORDER_QUEUE
from contracts.stock import StockRejected, StockReserved
from runtime import host
from runtime.actors import ActorSystem, DuplicateMessage
from runtime.host import ServiceRuntime
from runtime.messages import BusBinding, from_body
from runtime.migrate import Component, Migration, create_tables

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


def create_app(
    settings: Settings,
    *,
    bus: Any = None,
    database_url: str | None = None,
    verifier: Any = None,
    payment_provider: PaymentProvider | None = None,
    timings: SagaTimings | None = None,
    payment_policy: RetryPolicy | None = None,
    cart_url: str | Sequence[str] | None = None,
) -> web.Application:
    runtime = ServiceRuntime.with_database(NAME, settings, bus=bus, database_url=database_url, verifier=verifier)
    assert runtime.system is not None
    actor_class = OrderActor.configured(timings or timings_from(settings))
    runtime.system.register(actor_class)
    if payment_provider is None:
        log.warning("order: payments go to the SimulatedPaymentProvider; no real money moves")
        payment_provider = SimulatedPaymentProvider()
    if isinstance(payment_provider, SimulatedPaymentProvider):
        # The simulator keeps its idempotency keys in this service's database (its own table), durable across
        # restarts and shared by every instance, like a real provider's.
        assert runtime.engine is not None
        payment_provider.bind(runtime.engine)
    processor = PaymentProcessor(payment_provider, _deliver_to(runtime.system, actor_class), payment_policy)
    # Stop hooks run last-registered first: the bus consumer, then the payment processor, then the actors. The
    # actors stop before the runtime stops the outbox relay, so no turn commits (and wakes the relay) while the
    # relay is being cancelled: on Python 3.11 the relay's asyncio.wait_for can swallow a cancellation that comes
    # with a wake-up, and shutdown then never ends. Stopping the actor system twice is harmless.
    runtime.on_stop.append(runtime.system.stop)
    runtime.on_stop.append(processor.close)
    if bus is not None:
        _consume_on_start(runtime, bus_binding(runtime.system, actor_class, processor))
    app = host.create_app(runtime, routes=api.setup)
    # ``cart_url``: like the cart's ``catalog_url``; the cart instances asked about orders not recorded here yet.
    checkouts = AcceptedCheckouts(Upstream("cart", cart_url or service_urls(settings, "cart")))
    runtime.on_start.append(checkouts.start)
    runtime.on_stop.append(checkouts.close)
    app[api.ORDERS] = api.OrderContext(runtime.system, actor_class, checkouts)
    assert runtime.engine is not None
    app[api.LOAD] = api.LoadGauge(runtime.engine)
    app[PAYMENTS] = processor
    return app


def bus_binding(system: ActorSystem, actor_class: type[OrderActor], processor: PaymentProcessor) -> BusBinding:
    binding = BusBinding(system)
    for message_class in (CheckoutRequested, StockReserved, StockRejected):
        binding.to_actor(message_class, actor_class)

    async def process_payment(env: Envelope) -> None:
        processor.start_charge(from_body(ProcessPayment, env.body), env.message_id)

    async def reverse_payment(env: Envelope) -> None:
        await processor.reverse(from_body(ReversePayment, env.body), env.message_id)

    binding.to_handler(ProcessPayment.__name__, process_payment)
    binding.to_handler(ReversePayment.__name__, reverse_payment)
    return binding


def _deliver_to(system: ActorSystem, actor_class: type[OrderActor]) -> Deliver:
    async def deliver(order_id: str, message: Any, message_id: str) -> None:
        try:
            await system.ref(actor_class, order_id).ask(message, message_id=message_id)
        except DuplicateMessage:
            log.debug("order %s: %s %s applied already", order_id, type(message).__name__, message_id)

    return deliver


def _consume_on_start(runtime: ServiceRuntime, binding: BusBinding) -> None:
    consumers: list[Any] = []

    async def consume() -> None:
        consumers.append(await runtime.bus.consume(ORDER_QUEUE, binding))

    async def stop_consuming() -> None:
        while consumers:
            await consumers.pop().stop()

    runtime.on_start.append(consume)
    runtime.on_stop.append(stop_consuming)
