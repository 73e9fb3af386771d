"""Messages of the catalog service: commands, events and replies as frozen dataclasses.

Bus contract (other services import these classes from here):

* the order service sends :class:`ReserveStock`, :class:`ReleaseStock` and :class:`CommitReservation` to the
  queue ``"catalog"`` with ``session_id`` = the product id, so every message of one product reaches its one
  :class:`~actors.catalog.actor.ProductActor` in order;
* the ProductActor answers a reservation with :class:`StockReserved` or :class:`StockRejected` on the queue
  ``"order"`` with ``session_id`` = ``correlation_id`` = the order id. A repeated reservation for the same
  order gets the same answer again (the first answer may be what was lost) and has no second effect;
* events are published with ``session_id`` = the product id: :class:`ProductPriceChanged` (the cart
  refreshes its prices), :class:`ProductLowStock`, :class:`ProductDeleted`.

Admin commands (:class:`CreateProduct`, :class:`UpdateProduct`, :class:`RestockProduct`,
:class:`DeleteProduct`) come from the HTTP API in-process and never travel on the bus.

Money is :class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

CATALOG_QUEUE = "catalog"
ORDER_QUEUE = "order"


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


# ---------------------------------------------------------------------------------------------------
# Events (published, session = product id)


@dataclass(frozen=True, slots=True)
class ProductPriceChanged:
    product_id: str
    old_price: Decimal
    new_price: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class ProductLowStock:
    product_id: str
    available_stock: int
    restock_threshold: int


@dataclass(frozen=True, slots=True)
class ProductDeleted:
    product_id: str


# ---------------------------------------------------------------------------------------------------
# Admin commands (in-process, from the HTTP API)


@dataclass(frozen=True, slots=True)
class CreateProduct:
    product_id: str
    name: str
    description: str
    price: Decimal
    currency: str
    brand_id: str
    type_id: str
    picture_url: str | None
    available_stock: int
    restock_threshold: int
    max_stock: int


@dataclass(frozen=True, slots=True)
class UpdateProduct:
    """Change any of these fields in one turn; ``None`` leaves a field as it is, ``picture_url=""`` clears it."""

    product_id: str
    name: str | None = None
    description: str | None = None
    price: Decimal | None = None
    currency: str | None = None
    brand_id: str | None = None
    type_id: str | None = None
    picture_url: str | None = None
    available_stock: int | None = None
    restock_threshold: int | None = None
    max_stock: int | None = None


@dataclass(frozen=True, slots=True)
class RestockProduct:
    """Add units, up to ``max_stock``; the reply is how many were added."""

    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class DeleteProduct:
    product_id: str
