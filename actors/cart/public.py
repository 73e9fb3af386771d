"""The cart at the gateway: its entries of the gateway's route table (:mod:`gateway.routes`).

Light on purpose (no service code): the gateway builds its table from every service's ``public.py``."""

from __future__ import annotations

from runtime.routes import ANY_TAIL, CUSTOMER, Affinity, Route, admin_rules, rule

# A customer's cart lives in one process: every request goes to the owner of the token's subject.
ROUTES: tuple[Route, ...] = (
    Route("/api/cart", "cart", (*admin_rules(), rule(ANY_TAIL, CUSTOMER, affinity=Affinity.SUB))),
)
