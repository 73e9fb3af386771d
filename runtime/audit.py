"""The audit log: who did what to what, and when, for every admin action that changes something.

One append-only table, ``audit_log``, in each service's database (the runtime component of
:mod:`runtime.migrate`, step 3), so an entry survives restarts, is backed up with the data it is about, and
is written in the same transaction as the change it records (a replay's outbox row, say): there is no
change without its entry, and no entry for a change that was rolled back. Rows are only ever inserted.

``actor`` names who acted: the token's email (or subject) through the admin API, ``cli:<os user>`` for
``ecom`` talking to the broker itself, ``anonymous (ECOM_ADMIN_OPEN)`` when the admin endpoints are open.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Column, DateTime, Index, String, Table, Text, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runtime.store import BigId, as_utc, metadata, utcnow

__all__ = ["audit_log", "entries", "record"]

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(256), nullable=False),  # who: "admin@example.com", "cli:alice", ...
    Column("via", String(16), nullable=False),  # "api" or "cli"
    Column("action", String(64), nullable=False),  # e.g. "dead-letter.replay"
    Column("target", String(512), nullable=False),  # e.g. "queue:order/<message id>"
    Column("details", Text, nullable=False),  # JSON object
    Index("ix_audit_log_at", "at"),
)


async def record(
    conn: AsyncConnection,
    *,
    actor: str,
    via: str,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Append one entry, in the caller's transaction."""
    await conn.execute(
        insert(audit_log).values(
            at=at or utcnow(),
            actor=actor[:256],
            via=via,
            action=action,
            target=target[:512],
            details=orjson.dumps(dict(details or {})).decode(),
        )
    )


async def entries(engine: AsyncEngine, *, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries, newest first (optionally of one action)."""
    stmt = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if action is not None:
        stmt = stmt.where(audit_log.c.action == action)
    async with engine.connect() as conn:
        rows = list(await conn.execute(stmt))
    return [
        {
            "id": row.id,
            "at": as_utc(row.at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "actor": row.actor,
            "via": row.via,
            "action": row.action,
            "target": row.target,
            "details": orjson.loads(row.details),
        }
        for row in rows
    ]
