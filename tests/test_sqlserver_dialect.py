"""SQL Server cannot run here, so the production dialect is checked by compiling everything for it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import and_, create_mock_engine, delete, insert, select, update
from sqlalchemy.dialects import mssql
from sqlalchemy.dialects.mssql import pyodbc  # noqa: F401 - registers mssql.pyodbc

from runtime import migrate, store
from runtime.store import actor_state, inbox, outbox, reminders


def test_every_runtime_table_creates_on_sql_server():
    ddl: list[str] = []
    engine = create_mock_engine(
        "mssql+pyodbc://", lambda sql, *a, **k: ddl.append(str(sql.compile(dialect=engine.dialect)))
    )
    store.metadata.create_all(engine, checkfirst=False)
    text = "\n".join(ddl)
    for table in ("actor_state", "outbox", "inbox", "reminders", "schema_version"):
        assert f"CREATE TABLE {table}" in text
    assert "IDENTITY" in text, "outbox id is an identity column on SQL Server"
    assert "DATETIMEOFFSET" in text, "timezone-aware times keep their offset on SQL Server"
    assert "CREATE INDEX ix_outbox_unsent" in text


def _compile(stmt) -> str:
    # The pyodbc flavour is the one aioodbc uses underneath.
    return str(stmt.compile(dialect=mssql.pyodbc.dialect(), compile_kwargs={"render_postcompile": True}))


def test_turn_statements_compile_for_sql_server():
    now = datetime.now(UTC)
    statements = [
        select(actor_state.c.version, actor_state.c.state).where(
            actor_state.c.actor_type == "cart", actor_state.c.actor_id == "1"
        ),
        update(actor_state)
        .where(actor_state.c.actor_type == "cart", actor_state.c.actor_id == "1", actor_state.c.version == 3)
        .values(version=4, state="{}", updated_at=now),
        insert(actor_state).values(actor_type="cart", actor_id="1", version=1, state="{}", updated_at=now),
        insert(inbox).values(consumer="cart/1", message_id="m", processed_at=now),
        store._seen_pairs(2),  # the commit's inbox check, as the store runs it
        insert(outbox).values(message_id="m", kind="send", destination="order", envelope="{}", created_at=now),
        select(outbox.c.id, outbox.c.envelope).where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id).limit(500),
        select(reminders)
        .where(reminders.c.actor_type.in_(["cart"]), reminders.c.due_at <= now)
        .order_by(reminders.c.due_at)
        .limit(500),
        delete(reminders).where(and_(reminders.c.actor_type == "cart", reminders.c.due_at == now)),
    ]
    compiled = [_compile(s) for s in statements]
    assert "TOP" in compiled[6] and "LIMIT" not in compiled[6], "SQL Server pages with TOP, not LIMIT"
    assert "AND actor_state.version = :version_1" in compiled[1], "the optimistic version check survives"
    assert all("'cart'" not in c for c in compiled), "values are bound parameters, never inlined"


def test_migration_runner_is_dialect_neutral():
    # The runner itself only uses schema_version with Core statements: compile those for mssql too.
    assert migrate.RUNTIME.head >= 1
    stmt = select(store.schema_version.c.version).where(store.schema_version.c.component == "runtime")
    assert "schema_version" in _compile(stmt)


def test_engine_factory_builds_the_sql_server_engine():
    pytest.importorskip("aioodbc", reason="aioodbc needs the unixODBC library (libodbc2)")
    engine = store.create_engine("mssql+aioodbc://user:pw@127.0.0.1:1433/ecom?driver=ODBC+Driver+18+for+SQL+Server")
    assert engine.dialect.name == "mssql" and engine.dialect.driver == "aioodbc"


@pytest.mark.parametrize(
    "url", ["sqlite:///x.db", "postgresql://u@h/db", "mysql+aiomysql://u@h/db", "mssql+pyodbc://u@h/db"]
)
def test_engine_factory_refuses_sync_or_unknown_drivers(url):
    with pytest.raises(ValueError, match=r"async driver|unsupported"):
        store.create_engine(url)
