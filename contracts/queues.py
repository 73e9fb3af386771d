"""Queue, topic and subscription names of the bus, and which events each service's subscription takes.

The one place these names are spelled: producers (``turn.send(ORDER_QUEUE, ...)``), consumers
(``bus.consume(CATALOG_QUEUE, ...)``, ``bus.subscribe(CART_SUBSCRIPTION, ...)``) and provisioning
(``ecom bus provision``, through the services' descriptions) all import them from here.

* queues (point to point, ``session_id`` = the entity the message is for):

  - :data:`ORDER_QUEUE`: ``CheckoutRequested`` (cart), ``StockReserved`` / ``StockRejected`` (catalog) and the
    order service's own payment step; session = the order id;
  - :data:`CATALOG_QUEUE`: ``ReserveStock`` / ``ReleaseStock`` / ``CommitReservation`` (order); session = the
    product id.

* events are published on one topic (Azure Service Bus: ``ecom-events``); a service receives the types its
  subscription names in :data:`SUBSCRIPTIONS`. Identity's revocation announcements are not in it: every
  process gets them on a per-process broadcast subscription made at run time (``runtime.revocation``).
"""

from __future__ import annotations

from contracts.catalog import ProductPriceChanged
from contracts.checkout import OrderStarted

# -- queues ------------------------------------------------------------------------------------------

ORDER_QUEUE = "order"
CATALOG_QUEUE = "catalog"

QUEUES: tuple[str, ...] = (ORDER_QUEUE, CATALOG_QUEUE)
"""Every queue a service consumes and another (or the same) service sends to."""

# -- subscriptions to published events ----------------------------------------------------------------

CART_SUBSCRIPTION = "cart"

SUBSCRIPTIONS: dict[str, tuple[str, ...]] = {
    # the cart takes new prices into the lines holding the product, and empties what was ordered
    CART_SUBSCRIPTION: tuple(sorted((ProductPriceChanged.__name__, OrderStarted.__name__))),
}
"""Subscription name -> the event types (envelope ``type``, the class name) it receives, sorted.

The services' descriptions declare what they subscribe to, and ``ecom bus provision`` creates exactly that;
tests/test_contracts.py checks that the descriptions and this table agree."""
