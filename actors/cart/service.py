"""The cart service, declared (:data:`SERVICE`): CartActor per cart on its own database, the catalog client and
checkout admission as resources, and the ``"cart"`` subscription.

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
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from actors.cart import api, public, repository
from actors.cart.actor import CartActor
from actors.cart.admission import Admission
from actors.cart.catalog import CatalogClient
from bus.envelope import Envelope
from config import Settings
from contracts.catalog import ProductPriceChanged
from contracts.checkout import CheckoutRequested, OrderStarted
from contracts.queues import CART_SUBSCRIPTION, ORDER_QUEUE
from runtime import host
from runtime.description import (
    ActorType,
    BusRoute,
    Http,
    Resource,
    ServiceContext,
    ServiceDescription,
    Subscription,
    ToHandler,
)
from runtime.messages import BusBinding, deliver, from_body
from runtime.migrate import Component, Migration, create_tables
from runtime.upstream import Upstream, service_urls

log = logging.getLogger(__name__)

SCHEMA = Component(
    "cart", [Migration(1, "cart_lines: which carts hold a product", create_tables(repository.cart_lines))]
)

FAN_OUT_CONCURRENCY = 32  # carts updated at once for one price change


@dataclass(frozen=True, slots=True)
class CartOptions:
    """``create_app``'s overrides (tests, embedded mode). ``catalog_url`` / ``order_url``: one URL, comma-separated
    URLs or a list (default: the settings'); ``cart_expiry``: seconds (default ``ECOM_SHOP_CART_EXPIRY``)."""

    catalog_url: str | Sequence[str] | None = None
    order_url: str | Sequence[str] | None = None
    cart_expiry: float | None = None


def catalog_urls_from(settings: Settings) -> list[str]:
    """Every catalog instance: ``ECOM_CATALOG_UPSTREAMS`` when set, else the catalog's own port."""
    return service_urls(settings, "catalog")


CATALOG: web.AppKey[CatalogClient] = web.AppKey("cart_catalog", CatalogClient)
ADMISSION: web.AppKey[Admission] = web.AppKey("cart_admission", Admission)


def _catalog(ctx: ServiceContext) -> CatalogClient:
    return CatalogClient(Upstream("catalog", ctx.options.catalog_url or catalog_urls_from(ctx.settings)))


def _admission(ctx: ServiceContext) -> Admission:
    # every order instance whose load checkout admission reads
    order = Upstream("order", ctx.options.order_url or service_urls(ctx.settings, "order"))
    return Admission(ctx.engine, order, ctx.settings.shop)


def _cart_deps(ctx: ServiceContext) -> dict[str, Any]:
    expiry = ctx.options.cart_expiry
    return {"expiry_seconds": expiry if expiry is not None else ctx.settings.shop.cart_expiry}


# ---------------------------------------------------------------------------------------------------
# Events


def price_changed(ctx: ServiceContext, _binding: BusBinding) -> BusRoute:
    system, engine, catalog = ctx.system, ctx.engine, ctx[CATALOG]

    async def route(env: Envelope) -> None:
        event = from_body(ProductPriceChanged, env.body)
        catalog.forget(event.product_id)  # the next lookup must not serve the old price from the cache
        cart_ids = await repository.carts_holding(engine, event.product_id)
        gate = asyncio.Semaphore(FAN_OUT_CONCURRENCY)

        async def one(cart_id: str) -> None:
            async with gate:
                await deliver(system.ref(CartActor, cart_id), event, env)

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

    return route


def order_started(ctx: ServiceContext, binding: BusBinding) -> BusRoute:
    # To the cart named in the body (the session is the order id); through the actor route so that in a cluster the
    # event is handed to the instance owning the cart and its copy in memory is the one that empties.
    to_cart = binding.actor_route(OrderStarted, CartActor, actor_id=lambda event, _env: event.cart_id)
    admission = ctx[ADMISSION]

    async def route(env: Envelope) -> None:
        # The order service counts the order from now on: it is no longer in flight for admission.
        admission.started(from_body(OrderStarted, env.body).order_id)
        await to_cart(env)

    return route


# ---------------------------------------------------------------------------------------------------
# The service

SERVICE = ServiceDescription(
    "cart",
    options=CartOptions,
    http=Http(api.setup),
    actors=(ActorType(CartActor, deps=_cart_deps),),
    resources=(
        Resource(CATALOG, _catalog, start=CatalogClient.start, stop=CatalogClient.close),
        Resource(ADMISSION, _admission, start=Admission.start, stop=Admission.close),
        Resource(api.CART, lambda ctx: api.CartContext(ctx.system, CartActor, ctx[CATALOG], ctx[ADMISSION])),
    ),
    consumes=(
        Subscription(
            CART_SUBSCRIPTION, (ToHandler(ProductPriceChanged, price_changed), ToHandler(OrderStarted, order_started))
        ),
    ),
    sends={ORDER_QUEUE: (CheckoutRequested,)},
    gateway_routes=public.ROUTES,
    schema=SCHEMA,
)


def create_app(settings: Settings, **overrides: Any) -> web.Application:
    """The cart application (``overrides``: ``bus``, ``database_url``, ``verifier`` and :class:`CartOptions`)."""
    return host.service_app(SERVICE, settings, **overrides)
