"""Identity at the gateway: its entries of the gateway's route table (:mod:`gateway.routes`).

Light on purpose (no service code): the gateway builds its table from every service's ``public.py``. Identity's
own endpoints take client credentials in ``Authorization``, so the gateway checks no token there."""

from __future__ import annotations

from runtime.routes import ANY_TAIL, PUBLIC, Route, admin_rules, rule

ROUTES: tuple[Route, ...] = (
    Route("/.well-known", "identity", (rule(ANY_TAIL, PUBLIC),)),
    Route("/connect", "identity", (rule(ANY_TAIL, PUBLIC),)),
    Route("/api/identity", "identity", (*admin_rules(), rule(ANY_TAIL, PUBLIC))),
)
