"""Messages of the cart service: the cart's own commands and replies.

Bus contract (:mod:`contracts`; both sides import the classes from there):

* on checkout the :class:`~actors.cart.actor.CartActor` sends :class:`~contracts.checkout.CheckoutRequested` to
  the queue ``"order"`` with ``session_id`` = the new order id (a uuid4 the cart makes), through its outbox;
* the order service publishes :class:`~contracts.checkout.OrderStarted` once the order exists; the cart then
  removes what was ordered;
* the catalog publishes :class:`~contracts.catalog.ProductPriceChanged`; every cart holding the product
  takes the new price and shows the customer a note.

Commands (:class:`GetCart`, :class:`SetQuantity`, :class:`RemoveLine`, :class:`ClearCart`, :class:`Checkout`)
come from the HTTP API in-process and never travel on the bus. Money is :class:`~decimal.Decimal` (a decimal
string on the wire), never a float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# The checkout contract with the order service lives in ``contracts``; re-exported here for older imports.
from contracts.checkout import (  # noqa: F401
    Address,
    CheckoutLine,
    CheckoutRequested,
    OrderStarted,
    PaymentDetails,
)
from contracts.queues import CART_SUBSCRIPTION, ORDER_QUEUE  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# Commands from the HTTP API (in-process)


@dataclass(frozen=True, slots=True)
class ProductQuote:
    """What the catalog says about a product right now: the only source of a line's name and price."""

    product_id: str
    name: str
    unit_price: Decimal
    currency: str
    picture_url: str
    available_stock: int


@dataclass(frozen=True, slots=True)
class GetCart:
    pass


@dataclass(frozen=True, slots=True)
class SetQuantity:
    """Set the line of ``quote.product_id`` to ``quantity`` (1..MAX_LINE_QUANTITY), adding it if needed."""

    quote: ProductQuote
    quantity: int


@dataclass(frozen=True, slots=True)
class RemoveLine:
    product_id: str


@dataclass(frozen=True, slots=True)
class ClearCart:
    pass


@dataclass(frozen=True, slots=True)
class Checkout:
    """Check out the cart. ``quotes`` are fresh catalog answers for the cart's products (None: the product is
    gone); a line without a quote makes the cart answer :class:`QuotesNeeded` instead, so the caller fetches
    them (outside the turn) and asks again."""

    buyer_id: str
    idempotency_key: str | None
    shipping_address: Address
    payment: PaymentDetails
    quotes: Mapping[str, ProductQuote | None]
    # Only answer a checkout made earlier with this idempotency key (:class:`NoEarlierCheckout` otherwise);
    # never start one. Used while admission control refuses new checkouts: a retry still learns its order id.
    replay_only: bool = False


# ---------------------------------------------------------------------------------------------------
# Replies to Checkout


@dataclass(frozen=True, slots=True)
class CheckoutAccepted:
    order_id: str
    replayed: bool  # True: the idempotency key was used before and this is that checkout's order


@dataclass(frozen=True, slots=True)
class GetCheckout:
    """Ask the cart about one of its checkouts (the order service asks, for an order it has not recorded yet)."""

    order_id: str


@dataclass(frozen=True, slots=True)
class AcceptedCheckout:
    """Reply to :class:`GetCheckout`: the checkout the 202 was based on. ``order``: the ``CheckoutRequested`` sent
    for it, without the payment details, while its order has not started; None once ``OrderStarted`` came (the
    order service has the order then) or for a checkout recorded before the cart kept it."""

    order_id: str
    started: bool
    order: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class NoEarlierCheckout:
    """Reply to a ``replay_only`` checkout whose idempotency key the cart does not know."""


@dataclass(frozen=True, slots=True)
class QuotesNeeded:
    product_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PriceChange:
    product_id: str
    name: str
    old_price: Decimal
    new_price: Decimal


@dataclass(frozen=True, slots=True)
class PricesChanged:
    """Checkout found prices that moved since the buyer saw them: the cart has the new ones now (and notes
    saying so); the buyer confirms by checking out again."""

    changes: tuple[PriceChange, ...]
