"""The admin view of a service's pending work: ``GET <prefix>/pending`` (admin role, as every admin endpoint).

Answers, from the service's database (shared by its instances, so any instance gives the same answer):

- ``outbox``: ``{"backlog": n}``, messages committed and not yet handed to the bus (``null`` without an outbox);
- ``reminders``: ``{"due": n, "items": [...]}``: how many reminders are due and not yet fired, and the ``limit``
  soonest reminders (due or not), each ``{actor_type, actor_id, name, due_at, period, due}``.

The admin console (gateway/console/) shows these per service; ``/metrics`` has the backlog as a number only.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from runtime.store import as_utc, outbox, reminders, utcnow
from runtime.web.admin import _int_query, require_admin
from runtime.web.resources import AppKeyRuntime
from runtime.web.responses import json_response

__all__ = ["add_pending_routes", "admin_pending"]


def add_pending_routes(app: web.Application, prefix: str) -> None:
    app.router.add_get(f"{prefix}/pending", admin_pending)


async def admin_pending(request: web.Request) -> web.Response:
    await require_admin(request)
    runtime = request.app[AppKeyRuntime]
    limit = _int_query(request, "limit", 20, 0, 500)
    body: dict[str, Any] = {"service": runtime.name, "outbox": None, "reminders": None}
    if runtime.engine is None:  # the gateway: no database, nothing pending
        return json_response(body)
    now = utcnow()
    async with runtime.engine.connect() as conn:
        backlog = (await conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))).scalar_one()
        due = (await conn.execute(select(func.count()).where(reminders.c.due_at <= now))).scalar_one()
        rows = list(await conn.execute(select(reminders).order_by(reminders.c.due_at).limit(limit)))
    body["outbox"] = {"backlog": backlog}
    body["reminders"] = {
        "due": due,
        "items": [
            {
                "actor_type": row.actor_type,
                "actor_id": row.actor_id,
                "name": row.name,
                "due_at": as_utc(row.due_at).isoformat().replace("+00:00", "Z"),
                "period": row.period,
                "due": as_utc(row.due_at) <= now,
            }
            for row in rows
        ],
    }
    return json_response(body)
