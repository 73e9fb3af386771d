"""Shared fixtures: every persistence test runs on SQLite and on the real PostgreSQL server.

PostgreSQL tests get a fresh database each (created and dropped here). When the server is not reachable
they are skipped with the reason, except under ``CI=true`` where a missing server is a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from runtime import migrate
from runtime.store import StateStore, create_engine

PG_HOST = os.environ.get("ECOM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("ECOM_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("ECOM_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("ECOM_TEST_PG_DB", "test")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip (or fail under CI) when a real server the test needs is not there."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: real-server tests must run)")
    pytest.skip(reason)


async def pg_admin(sql: str) -> None:
    """Run one statement on the admin database of the test server (CREATE/DROP DATABASE...)."""
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


_pg_admin = pg_admin  # the old name, still used by some test modules


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    """A URL of an empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    require_server("PostgreSQL", PG_HOST, PG_PORT)
    name = f"ecom_t_{uuid.uuid4().hex[:12]}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


StoreFactory = Callable[..., Awaitable[StateStore]]


@pytest.fixture
async def store_factory(db_url: str) -> AsyncIterator[StoreFactory]:
    """Makes stores on the test database (several = several processes); migrates it first."""
    engines = []

    async def make(**kwargs) -> StateStore:
        engine = create_engine(db_url)
        engines.append(engine)
        if len(engines) == 1:
            await migrate.upgrade(engine, [migrate.RUNTIME])
        return StateStore(engine, **kwargs)

    yield make
    for engine in engines:
        await engine.dispose()


@pytest.fixture
def test_identity():
    """Signs real access tokens; ``test_identity.verifier()`` verifies them (see tests/support/auth.py)."""
    from tests.support.auth import TestIdentity

    return TestIdentity()
