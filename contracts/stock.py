"""Stock reservation between the order service and the catalog.

* order -> catalog, queue ``"catalog"`` (:data:`contracts.queues.CATALOG_QUEUE`), ``session_id`` = the product
  id, so every message of one product reaches its one ``ProductActor`` in order: :class:`ReserveStock`,
  :class:`ReleaseStock`, :class:`CommitReservation`;
* catalog -> order, queue ``"order"`` (:data:`contracts.queues.ORDER_QUEUE`), ``session_id`` =
  ``correlation_id`` = the order id: :class:`StockReserved` or :class:`StockRejected` (reason: a
  :class:`RejectReason`). A repeated reservation for the same order gets the same answer again (the first
  answer may be what was lost) and has no second effect.

Wire format: the class name is the envelope type, the fields are the body. Money is
:class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


class RejectReason:
    """Why a reservation was refused (``StockRejected.reason``); stable strings, part of the contract."""

    INSUFFICIENT_STOCK = "insufficient_stock"
    UNKNOWN_PRODUCT = "unknown_product"
    PRODUCT_DELETED = "product_deleted"
    INVALID_QUANTITY = "invalid_quantity"
    ALREADY_RELEASED = "already_released"  # the order released this reservation before asking again


# ---------------------------------------------------------------------------------------------------
# Commands from the order service (queue "catalog", session = product id)


@dataclass(frozen=True, slots=True)
class ReserveStock:
    order_id: str
    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class ReleaseStock:
    """Give the order's reserved units back to the stock (order cancelled). Unknown or released: no-op."""

    order_id: str
    product_id: str


@dataclass(frozen=True, slots=True)
class CommitReservation:
    """The order is paid: its reserved units leave the reservations for good; the stock stays decremented."""

    order_id: str
    product_id: str


# ---------------------------------------------------------------------------------------------------
# Replies to the order service (queue "order", session = order id)


@dataclass(frozen=True, slots=True)
class StockReserved:
    order_id: str
    product_id: str
    quantity: int
    unit_price: Decimal  # the price when the units were reserved: what the order charges


@dataclass(frozen=True, slots=True)
class StockRejected:
    order_id: str
    product_id: str
    requested: int
    available: int
    reason: str  # a RejectReason value
