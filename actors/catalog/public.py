"""The catalog at the gateway: its entries of the gateway's route table (:mod:`gateway.routes`).

Light on purpose (no service code): the gateway builds its table from every service's ``public.py``."""

from __future__ import annotations

from runtime.routes import ADMIN, ANY_TAIL, OPTIONAL, READS, Affinity, Route, admin_rules, rule

ROUTES: tuple[Route, ...] = (
    Route(
        "/api/catalog",
        "catalog",
        (
            *admin_rules(),
            rule(ANY_TAIL, OPTIONAL, methods=READS),  # browse, search, details: anyone
            # writes to one product (PATCH, DELETE, restock) go to the process holding its ProductActor
            rule(r"/products/(?P<key>[^/]+)(/.*)?", ADMIN, affinity=Affinity.PATH),
            rule(ANY_TAIL, ADMIN),  # create products, brands, types
        ),
    ),
)
