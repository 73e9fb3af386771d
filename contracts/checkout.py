"""Checkout: the cart hands a checkout to the order service, which announces the order and its progress.

* cart -> order, queue ``"order"`` (:data:`contracts.queues.ORDER_QUEUE`), ``session_id`` = the new order id (a
  uuid4 the cart makes), through the cart's outbox: :class:`CheckoutRequested`;
* order, published with ``session_id`` = the order id: :class:`OrderStarted` (the order exists; the cart removes
  what was ordered) and :class:`OrderStatusChanged` (every later transition, with its reason; values of
  :class:`OrderStatus`).

Wire format: the class name is the envelope type, the fields are the body. Money is
:class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


class OrderStatus:
    """The statuses of an order; stable strings, part of the public API and of :class:`OrderStatusChanged`."""

    SUBMITTED = "submitted"
    AWAITING_VALIDATION = "awaiting_validation"
    STOCK_CONFIRMED = "stock_confirmed"
    PAID = "paid"
    SHIPPED = "shipped"
    CANCELLED = "cancelled"

    OPEN = frozenset({SUBMITTED, AWAITING_VALIDATION, STOCK_CONFIRMED})  # the buyer may still cancel
    ALL = (SUBMITTED, AWAITING_VALIDATION, STOCK_CONFIRMED, PAID, SHIPPED, CANCELLED)


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
# Order events (published, session = order id)


@dataclass(frozen=True, slots=True)
class OrderStarted:
    """The order exists (status ``submitted``); the cart removes the ordered quantities."""

    order_id: str
    buyer_id: str
    cart_id: str


@dataclass(frozen=True, slots=True)
class OrderStatusChanged:
    order_id: str
    buyer_id: str
    old_status: str
    new_status: str
    reason: str
    at: datetime
