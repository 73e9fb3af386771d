"""The cart service: CartActor per cart on its own database, the catalog client, and the bus subscription.

Bus: subscription ``"cart"`` to ``ProductPriceChanged`` (catalog) and ``OrderStarted`` (order).

* ``ProductPriceChanged`` names a product, not a cart: the ``cart_lines`` query table says which carts hold it and
  the event is asked of each of them with the event's message id, so every cart's inbox drops a redelivered copy.
  If any cart fails, the event fails and is redelivered; carts that took it already skip it.
* ``OrderStarted`` goes to the cart named in its body (its session is the order id, not the cart), on the instance
  that owns that cart when the service runs as a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from actors.cart import api, repository
from actors.cart.actor import CartActor
from actors.cart.admission import Admission
from actors.cart.catalog import CatalogClient
from actors.cart.upstream import Upstream, service_urls
from bus.envelope import Envelope
from config import Settings
from contracts.catalog import ProductPriceChanged
from contracts.checkout import OrderStarted
from contracts.queues import CART_SUBSCRIPTION
from runtime import host
from runtime.host import ServiceRuntime
from runtime.messages import BusBinding, deliver, from_body
from runtime.migrate import Component, Migration, create_tables

log = logging.getLogger(__name__)

SCHEMA = Component(
    "cart", [Migration(1, "cart_lines: which carts hold a product", create_tables(repository.cart_lines))]
)

FAN_OUT_CONCURRENCY = 32  # carts updated at once for one price change


def catalog_urls_from(settings: Settings) -> list[str]:
    """Every catalog instance: ``ECOM_CATALOG_UPSTREAMS`` when set, else the catalog's own port."""
    return service_urls(settings, "catalog")


def create_app(
    settings: Settings,
    *,
    bus: Any = None,
    database_url: str | None = None,
    verifier: Any = None,
    catalog_url: str | Sequence[str] | None = None,
    order_url: str | Sequence[str] | None = None,
    cart_expiry: float | None = None,
) -> web.Application:
    runtime = ServiceRuntime.with_database("cart", settings, bus=bus, database_url=database_url, verifier=verifier)
    assert runtime.system is not None and runtime.engine is not None
    actor_class = CartActor.with_expiry(cart_expiry if cart_expiry is not None else settings.shop.cart_expiry)
    runtime.system.register(actor_class)
    # ``catalog_url``: one URL, comma-separated URLs or a list (tests and embedded mode); else the settings'.
    catalog = CatalogClient(Upstream("catalog", catalog_url or catalog_urls_from(settings)))
    runtime.on_start.append(catalog.start)
    runtime.on_stop.append(catalog.close)
    # ``order_url``: like ``catalog_url``, every order instance whose load checkout admission reads.
    admission = Admission(
        runtime.engine, Upstream("order", order_url or service_urls(settings, "order")), settings.shop
    )
    runtime.on_start.append(admission.start)
    runtime.on_stop.append(admission.close)
    if bus is not None:
        _subscribe_on_start(runtime, actor_class, catalog, admission)
    app = host.create_app(runtime, routes=api.setup)
    app[api.CART] = api.CartContext(runtime.system, actor_class, catalog, admission)
    return app


# ---------------------------------------------------------------------------------------------------
# Events


def _subscribe_on_start(
    runtime: ServiceRuntime, actor_class: type[CartActor], catalog: CatalogClient, admission: Admission | None = None
) -> None:
    system, engine = runtime.system, runtime.engine
    assert system is not None and engine is not None
    consumers: list[Any] = []

    async def tell_cart(cart_id: str, event: Any, env: Envelope) -> None:
        await deliver(system.ref(actor_class, cart_id), event, env)

    async def price_changed(env: Envelope) -> None:
        event = from_body(ProductPriceChanged, env.body)
        catalog.forget(event.product_id)  # the next lookup must not serve the old price from the cache
        cart_ids = await repository.carts_holding(engine, event.product_id)
        gate = asyncio.Semaphore(FAN_OUT_CONCURRENCY)

        async def one(cart_id: str) -> None:
            async with gate:
                await tell_cart(cart_id, event, env)

        results = await asyncio.gather(*(one(cart_id) for cart_id in cart_ids), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning(
                "price change of %s reached %d of %d carts; will be redelivered",
                event.product_id,
                len(cart_ids) - len(failed),
                len(cart_ids),
            )
            raise failed[0]

    async def subscribe() -> None:
        binding = BusBinding(system)
        binding.to_handler(ProductPriceChanged.__name__, price_changed)
        # To the cart named in the body (the session is the order id); through ``to_actor`` so that in a cluster the
        # event is handed to the instance owning the cart and its copy in memory is the one that empties.
        binding.to_actor(OrderStarted, actor_class, actor_id=lambda event, _env: event.cart_id)
        if admission is not None:
            to_cart = binding.routes[OrderStarted.__name__]

            async def order_started(env: Envelope) -> None:
                # The order service counts the order from now on: it is no longer in flight for admission.
                admission.started(from_body(OrderStarted, env.body).order_id)
                await to_cart(env)

            binding.to_handler(OrderStarted.__name__, order_started)
        consumers.append(await runtime.bus.subscribe(CART_SUBSCRIPTION, binding.types, binding))

    async def unsubscribe() -> None:
        for consumer in consumers:
            await consumer.stop()

    runtime.on_start.append(subscribe)
    runtime.on_stop.append(unsubscribe)
