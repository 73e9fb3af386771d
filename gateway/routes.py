"""The gateway's route table: every service's entries (its ``public.py``), in service order.

The vocabulary (:class:`runtime.routes.Route`, rules, access policies, affinity) lives in :mod:`runtime.routes`.
Services check the token again (defence in depth).
"""

from __future__ import annotations

from runtime.routes import Route
from runtime.services import gateway_routes

ROUTES: tuple[Route, ...] = gateway_routes()
