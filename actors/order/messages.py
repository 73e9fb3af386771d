"""Messages of the order service: its own saga (payment) messages and HTTP commands.

Bus contract (:mod:`contracts`; both sides import the classes from there):

* in: :class:`~contracts.checkout.CheckoutRequested` (cart) and the catalog's
  :class:`~contracts.stock.StockReserved` / :class:`~contracts.stock.StockRejected` arrive on the
  queue ``"order"`` with ``session_id`` = the order id;
* out: :class:`~contracts.stock.ReserveStock`, ``ReleaseStock`` and ``CommitReservation`` to the queue
  ``"catalog"`` with ``session_id`` = the product id;
* published with ``session_id`` = the order id: :class:`~contracts.checkout.OrderStarted` (the order exists: the
  cart removes what was ordered) and :class:`~contracts.checkout.OrderStatusChanged` (every later transition).

The payment step talks to itself through the order queue so that it is durable and runs outside actor turns:
the turn that confirms the stock sends :class:`ProcessPayment` through its outbox; the order service's consumer
hands it to the payment processor, which charges the provider (retrying transient failures with the same
idempotency key) and answers the actor with :class:`PaymentSucceeded` or :class:`PaymentFailed`. A cancelled
order whose charge may be under way sends :class:`ReversePayment` (void, or refund if it was charged) until the
processor answers :class:`PaymentReversed`.

Money is :class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

# The events the order service publishes live in ``contracts``; re-exported here for older imports.
from contracts.checkout import OrderStarted, OrderStatus, OrderStatusChanged  # noqa: F401
from contracts.queues import ORDER_QUEUE  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# The payment step (queue "order", session = order id; results are asked of the actor directly)


@dataclass(frozen=True, slots=True)
class ProcessPayment:
    """Charge the order. ``deadline`` is when the order stops waiting for the result (its payment timeout):
    retrying after it is pointless, the order is cancelled by then."""

    order_id: str
    amount: Decimal
    currency: str
    method: str
    token: str
    deadline: datetime


@dataclass(frozen=True, slots=True)
class ReversePayment:
    """Make sure the order is not (or no longer) charged: void the idempotency key, refund a charge made."""

    order_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PaymentSucceeded:
    order_id: str
    charge_id: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class PaymentReversed:
    """The provider confirmed the reversal: the key is voided, and a charge made with it refunded."""

    order_id: str
    refunded: bool  # True: there was a charge and it is refunded; False: nothing had been charged
    request_id: str = ""  # message id of the ReversePayment answered: an answer to an older request is told apart


@dataclass(frozen=True, slots=True)
class PaymentFailed:
    """The provider declined the charge for good (transient failures are retried, never reported)."""

    order_id: str
    code: str  # the provider's decline code, e.g. "card_declined"
    message: str


# ---------------------------------------------------------------------------------------------------
# Commands from the HTTP API (in-process)


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """The buyer (or an admin) cancels. ``requester`` is the caller's ``sub``; others' orders are "not found"."""

    requester: str
    is_admin: bool
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class ShipOrder:
    """An admin marks a paid order shipped."""

    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The reply to :class:`CancelOrder` / :class:`ShipOrder`: the order as it is now (JSON-ready) and whether
    this answer replays an earlier request with the same idempotency key."""

    order: dict[str, Any]
    replayed: bool
