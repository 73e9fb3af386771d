"""Messages of the catalog service: its admin commands as frozen dataclasses.

Bus contract (:mod:`contracts`; both sides import the classes from there):

* the order service sends :class:`~contracts.stock.ReserveStock`, ``ReleaseStock`` and ``CommitReservation`` to
  the queue ``"catalog"`` with ``session_id`` = the product id, so every message of one product reaches its one
  :class:`~actors.catalog.actor.ProductActor` in order;
* the ProductActor answers a reservation with :class:`~contracts.stock.StockReserved` or ``StockRejected`` on the
  queue ``"order"`` with ``session_id`` = ``correlation_id`` = the order id. A repeated reservation for the same
  order gets the same answer again (the first answer may be what was lost) and has no second effect;
* events are published with ``session_id`` = the product id: :class:`~contracts.catalog.ProductPriceChanged`
  (the cart refreshes its prices), ``ProductLowStock``, ``ProductDeleted``.

Admin commands (:class:`CreateProduct`, :class:`UpdateProduct`, :class:`RestockProduct`,
:class:`DeleteProduct`) come from the HTTP API in-process and never travel on the bus.

Money is :class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

# The stock protocol with the order service and the published events live in ``contracts``; re-exported here
# for older imports.
from contracts.catalog import ProductDeleted, ProductLowStock, ProductPriceChanged  # noqa: F401
from contracts.queues import CATALOG_QUEUE, ORDER_QUEUE  # noqa: F401
from contracts.stock import (  # noqa: F401
    CommitReservation,
    RejectReason,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)

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
