"""Messages of the cart service: the checkout contract with the order service, and the cart's own commands.

Bus contract (the order service imports these classes from here):

* on checkout the :class:`~actors.cart.actor.CartActor` sends :class:`CheckoutRequested` to the queue ``"order"``
  with ``session_id`` = the new order id (a uuid4 the cart makes), through its outbox;
* the order service publishes ``OrderStarted`` once the order exists; the cart then removes what was ordered.
  The order service owns that event; :class:`OrderStarted` below is only the cart's decoding of it;
* the catalog publishes ``ProductPriceChanged`` (``actors.catalog.messages``); every cart holding the product
  takes the new price and shows the customer a note.

Commands (:class:`GetCart`, :class:`SetQuantity`, :class:`RemoveLine`, :class:`ClearCart`, :class:`Checkout`)
come from the HTTP API in-process and never travel on the bus. Money is :class:`~decimal.Decimal` (a decimal
string on the wire), never a float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

ORDER_QUEUE = "order"
CART_SUBSCRIPTION = "cart"


# ---------------------------------------------------------------------------------------------------
# Cart -> order (queue "order", session = order id)


@dataclass(frozen=True, slots=True)
class CheckoutLine:
    product_id: str
    name: str
    unit_price: Decimal
    quantity: int
    picture_url: str


@dataclass(frozen=True, slots=True)
class Address:
    name: str
    street: str
    city: str
    postal_code: str
    country: str
    state: str = ""


@dataclass(frozen=True, slots=True)
class PaymentDetails:
    """A payment provider's token for the buyer's means of payment, never a card number.

    The order service's payment simulator: ``tok_visa`` approves, ``tok_decline`` declines, ``tok_timeout``
    never completes, ``tok_flaky`` fails transiently."""

    method: str
    token: str


@dataclass(frozen=True, slots=True)
class CheckoutRequested:
    order_id: str
    buyer_id: str
    cart_id: str
    lines: tuple[CheckoutLine, ...]
    shipping_address: Address
    payment: PaymentDetails
    total: Decimal
    currency: str
    requested_at: datetime


# ---------------------------------------------------------------------------------------------------
# Order -> cart (published)


@dataclass(frozen=True, slots=True)
class OrderStarted:
    """Owned by the order service (``actors/order/messages.py``); this copy only decodes it, so the cart does
    not import a package that is built separately. Keep the fields in step with the order service's class."""

    order_id: str
    buyer_id: str
    cart_id: str


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
