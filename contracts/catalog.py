"""Catalog events, published with ``session_id`` = the product id.

:class:`ProductPriceChanged` (the cart refreshes its prices; subscription ``"cart"``), :class:`ProductLowStock`,
:class:`ProductDeleted`. Wire format: the class name is the envelope type, the fields are the body. Money is
:class:`~decimal.Decimal` (a decimal string on the wire), never a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


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
