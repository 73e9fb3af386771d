"""The bus contracts between services: the messages that cross a service boundary and the queue, topic and
subscription names they travel on. Producers and consumers alike import them from here; nothing is copied.

=====================  ==================================================================================
module                 what
=====================  ==================================================================================
:mod:`contracts.queues`    queue and subscription names; ``SUBSCRIPTIONS`` (what ``ecom bus provision`` makes)
:mod:`contracts.checkout`  cart -> order ``CheckoutRequested``; order events ``OrderStarted``, ``OrderStatusChanged``
:mod:`contracts.stock`     order <-> catalog reservations: ``ReserveStock`` ... ``StockReserved``/``StockRejected``
:mod:`contracts.catalog`   catalog events: ``ProductPriceChanged``, ``ProductLowStock``, ``ProductDeleted``
:mod:`contracts.identity`  identity's revocation announcements: ``SigningKeyRevoked``, ``AccessRevoked``
=====================  ==================================================================================

Wire format: an envelope's ``type`` is the class name and its body the fields (``runtime.messages``), so a
class here is renamed or a field changed only together with every producer and consumer. Messages that stay
inside one service (HTTP commands, the order's payment step) live in that service's ``messages.py``.
"""

from __future__ import annotations

from contracts.catalog import ProductDeleted, ProductLowStock, ProductPriceChanged
from contracts.checkout import (
    Address,
    CheckoutLine,
    CheckoutRequested,
    OrderStarted,
    OrderStatus,
    OrderStatusChanged,
    PaymentDetails,
)
from contracts.identity import IDENTITY_SESSION, AccessRevoked, SigningKeyRevoked
from contracts.queues import (
    CART_SUBSCRIPTION,
    CATALOG_QUEUE,
    ORDER_QUEUE,
    QUEUES,
    SUBSCRIPTIONS,
)
from contracts.stock import (
    CommitReservation,
    RejectReason,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)

MESSAGES: tuple[type, ...] = (
    CheckoutRequested,
    OrderStarted,
    OrderStatusChanged,
    ReserveStock,
    ReleaseStock,
    CommitReservation,
    StockReserved,
    StockRejected,
    ProductPriceChanged,
    ProductLowStock,
    ProductDeleted,
    SigningKeyRevoked,
    AccessRevoked,
)
"""Every message (envelope type) that crosses a service boundary. Their parts (``CheckoutLine``, ``Address``,
``PaymentDetails``) travel inside ``CheckoutRequested``."""

__all__ = [
    "CART_SUBSCRIPTION",
    "CATALOG_QUEUE",
    "IDENTITY_SESSION",
    "MESSAGES",
    "ORDER_QUEUE",
    "QUEUES",
    "SUBSCRIPTIONS",
    "AccessRevoked",
    "Address",
    "CheckoutLine",
    "CheckoutRequested",
    "CommitReservation",
    "OrderStarted",
    "OrderStatus",
    "OrderStatusChanged",
    "PaymentDetails",
    "ProductDeleted",
    "ProductLowStock",
    "ProductPriceChanged",
    "RejectReason",
    "ReleaseStock",
    "ReserveStock",
    "SigningKeyRevoked",
    "StockRejected",
    "StockReserved",
]
