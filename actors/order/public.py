"""The order service at the gateway: its entries of the gateway's route table (:mod:`gateway.routes`).

Light on purpose (no service code): the gateway builds its table from every service's ``public.py``."""

from __future__ import annotations

from runtime.routes import ADMIN, CUSTOMER, Affinity, Route, admin_rules, rule

ROUTES: tuple[Route, ...] = (
    Route(
        "/api/orders",
        "order",
        (
            rule(r"/(?P<key>[^/]+)/ship", ADMIN, methods=("POST",), affinity=Affinity.PATH),
            rule(r"/(?P<key>[^/]+)(/.*)?", CUSTOMER, affinity=Affinity.PATH),
            rule(r"/?", CUSTOMER),  # the caller's own orders: a query, balanced
        ),
    ),
    Route("/api/order", "order", admin_rules()),
)
