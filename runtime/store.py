"""Persistence shared by every service: engine factory, runtime tables and the per-turn commit.

Each service owns one database. Besides its own query tables, every service database holds the
runtime tables defined here:

- ``actor_state``: one row per actor (``version`` is bumped by every state-changing turn),
- ``outbox``: messages produced by committed turns, published by :class:`runtime.outbox.OutboxRelay`,
- ``inbox``: ids of bus messages already applied, so a redelivered message has no second effect,
- ``reminders``: durable timers that wake an actor later,
- ``cluster_members``: the instances of the service sharing this database (see :mod:`runtime.cluster`),
- ``schema_version``: what :mod:`runtime.migrate` has applied.

All types are portable SQLAlchemy types so the same statements run on SQLite, PostgreSQL and SQL Server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import operator
import os
import random
import re
import sqlite3
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    TextClause,
    and_,
    bindparam,
    delete,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, MultipleResultsFound, NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY, so the 64-bit key becomes INTEGER there.
BigId = BigInteger().with_variant(Integer, "sqlite")

actor_state = Table(
    "actor_state",
    metadata,
    Column("actor_type", String(64), primary_key=True),
    Column("actor_id", String(128), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("state", Text, nullable=False),  # JSON text, encoded by the runtime with orjson
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # "send" or "publish"
    Column("destination", String(128), nullable=False),  # queue for "send", "" for "publish"
    Column("envelope", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Index("ix_outbox_unsent", "sent_at", "id"),
)

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(200), primary_key=True),  # "<actor type>/<actor id>"
    Column("message_id", String(200), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Index("ix_inbox_processed_at", "processed_at"),
)

reminders = Table(
    "reminders",
    metadata,
    Column("actor_type", String(64), primary_key=True),
    Column("actor_id", String(128), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("period", Float, nullable=True),  # seconds; None: fires once
    Column("payload", Text, nullable=False),
    Index("ix_reminders_due", "actor_type", "due_at"),
)

cluster_members = Table(
    "cluster_members",
    metadata,
    Column("member_id", String(64), primary_key=True),  # random per process start
    Column("address", String(256), nullable=False),  # base URL peers and the gateway reach it at
    Column("incarnation", BigInteger, nullable=False),  # start time in ms: a restart at one address supersedes
    Column("status", String(16), nullable=False),  # "active", "left" (clean stop) or "dead" (declared by a peer)
    Column("token", String(64), nullable=False),  # proves to this member that a forwarded call comes from the cluster
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)

schema_version = Table(
    "schema_version",
    metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


# Statements of the per-turn hot path, built once: constructing a Core statement costs more Python time
# than executing a cached one, and every turn runs these.
_LOAD = select(actor_state.c.version, actor_state.c.state, actor_state.c.updated_at).where(
    actor_state.c.actor_type == bindparam("t"), actor_state.c.actor_id == bindparam("i")
)
_EXISTS = select(actor_state.c.version).where(
    actor_state.c.actor_type == bindparam("t"), actor_state.c.actor_id == bindparam("i")
)
_INSERT_STATE = insert(actor_state).values(
    actor_type=bindparam("t"), actor_id=bindparam("i"), version=1, state=bindparam("s"), updated_at=bindparam("now")
)
_UPDATE_STATE = (
    update(actor_state)
    .where(
        actor_state.c.actor_type == bindparam("t"),
        actor_state.c.actor_id == bindparam("i"),
        actor_state.c.version == bindparam("v"),
    )
    .values(version=bindparam("nv"), state=bindparam("s"), updated_at=bindparam("now"))
)
_SEEN = select(inbox.c.message_id).where(inbox.c.consumer == bindparam("c"), inbox.c.message_id == bindparam("m"))


_SEEN_CHUNK = 256  # pairs a statement: the default batch in one, under SQLite's expression depth (1,000)


@functools.lru_cache(maxsize=64)
def _seen_pairs(n: int) -> Select[tuple[str, str]]:
    """Which of ``n`` (consumer, message id) pairs the inbox holds: one probe of the primary key per pair, bound
    as ``c0, m0, c1, m1...``; built once per batch size.

    Each pair names both key columns. ``message_id IN (...)`` alone (the second column of the key) made SQLite
    scan the whole inbox at every commit, on the event loop, slower with every message ever consumed (issue 14);
    ``consumer IN (...) AND message_id IN (...)`` probes every combination, quadratic in a large batch; a row-value
    ``IN`` is a scan again on SQLite and does not exist on SQL Server. An OR of pairs is a probe per pair on
    SQLite, PostgreSQL and SQL Server (2 parameters a pair: a full batch stays under SQL Server's 2,100)."""
    return select(inbox.c.consumer, inbox.c.message_id).where(
        or_(*(and_(inbox.c.consumer == bindparam(f"c{i}"), inbox.c.message_id == bindparam(f"m{i}")) for i in range(n)))
    )


@functools.lru_cache(maxsize=64)
def _version_pairs(n: int) -> Select[tuple[str, str, int]]:
    """The stored versions of ``n`` entities, bound as ``t0, i0, t1, i1...``: a probe of the primary key per entity
    (an OR of pairs, for the reasons :func:`_seen_pairs` gives)."""
    return select(actor_state.c.actor_type, actor_state.c.actor_id, actor_state.c.version).where(
        or_(
            *(
                and_(actor_state.c.actor_type == bindparam(f"t{i}"), actor_state.c.actor_id == bindparam(f"i{i}"))
                for i in range(n)
            )
        )
    )


@functools.lru_cache(maxsize=16)
def _step_returning_sql(n: int) -> TextClause:
    """PostgreSQL: step ``n`` entities' versions in one statement, returning those whose version held (bound as
    ``t0, i0, v0, s0, t1...`` and ``now``; the casts type the VALUES list, which PostgreSQL would take as text)."""
    rows = ", ".join(
        f"(CAST(:t{k} AS VARCHAR), CAST(:i{k} AS VARCHAR), CAST(:v{k} AS BIGINT), CAST(:s{k} AS TEXT))"
        for k in range(n)
    )
    return text(
        "UPDATE actor_state AS a SET version = v.ver + 1, state = v.s, updated_at = :now "
        f"FROM (VALUES {rows}) AS v (t, i, ver, s) "
        "WHERE a.actor_type = v.t AND a.actor_id = v.i AND a.version = v.ver "
        "RETURNING a.actor_type, a.actor_id"
    )


async def _step_returning(conn: AsyncConnection, writes: Sequence[TurnWrite], now: datetime) -> set[tuple[str, str]]:
    """The entities of ``writes`` (each at most once) whose version step held; the others were not written."""
    stepped: set[tuple[str, str]] = set()
    for start in range(0, len(writes), _SEEN_CHUNK):
        chunk: list[tuple[str, str, int, str]] = [
            (w.actor_type, w.actor_id, w.expected_version, w.state) for w in writes[start : start + _SEEN_CHUNK]
        ]
        size = 1 << (len(chunk) - 1).bit_length()  # padded with rows that match nothing: 9 statement shapes
        chunk += [("", "", -1, "")] * (size - len(chunk))
        params: dict[str, Any] = {"now": now}
        for k, (t, i, v, st) in enumerate(chunk):
            params.update({f"t{k}": t, f"i{k}": i, f"v{k}": v, f"s{k}": st})
        stepped.update((r.actor_type, r.actor_id) for r in await execute(conn, _step_returning_sql(size), params))
    return stepped


def _padded(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` lengthened to the next power of two by repeating the last one (a probe of the same key twice finds
    the same row): the probes of a batch then come in 9 sizes, not 256, and a driver that prepares each statement
    per connection (asyncpg) keeps them all prepared instead of preparing one for nearly every batch."""
    size = 1 << (len(pairs) - 1).bit_length()
    return pairs + [pairs[-1]] * (size - len(pairs))


_INSERT_INBOX = insert(inbox).values(consumer=bindparam("c"), message_id=bindparam("m"), processed_at=bindparam("now"))
_INSERT_OUTBOX = insert(outbox).values(
    message_id=bindparam("mid"),
    kind=bindparam("k"),
    destination=bindparam("d"),
    envelope=bindparam("e"),
    created_at=bindparam("now"),
)
_REMINDER_KEY = and_(
    reminders.c.actor_type == bindparam("t"), reminders.c.actor_id == bindparam("i"), reminders.c.name == bindparam("n")
)
_FIRED_KEY = and_(_REMINDER_KEY, reminders.c.due_at == bindparam("due"))
_FIRED_EXISTS = select(reminders.c.name).where(_FIRED_KEY)
_FIRED_DELETE = delete(reminders).where(_FIRED_KEY)
_FIRED_RESCHEDULE = update(reminders).where(_FIRED_KEY).values(due_at=bindparam("next_due"))
_REMINDER_DELETE = delete(reminders).where(_REMINDER_KEY)
_DUE = (  # every second per service: built once
    select(reminders)
    .where(reminders.c.actor_type.in_(bindparam("types", expanding=True)), reminders.c.due_at <= bindparam("now"))
    .order_by(reminders.c.due_at)
    .limit(bindparam("limit"))
)
_REMINDER_VALUES: dict[str, Any] = {
    "actor_type": bindparam("t"),
    "actor_id": bindparam("i"),
    "name": bindparam("n"),
    "due_at": bindparam("due"),
    "period": bindparam("period"),
    "payload": bindparam("payload"),
}
_REMINDER_INSERT = insert(reminders).values(_REMINDER_VALUES)


def _reminder_upsert(insert_of: Any) -> Any:
    statement = insert_of(reminders).values(_REMINDER_VALUES)
    return statement.on_conflict_do_update(
        index_elements=[reminders.c.actor_type, reminders.c.actor_id, reminders.c.name],
        set_={name: statement.excluded[name] for name in ("due_at", "period", "payload")},
    )


# Where the dialect has ON CONFLICT: a reminder set (again) is one upsert, not a delete and an insert (the order
# saga moves its deadline at almost every turn: a statement, on PostgreSQL a round trip, per group commit).
_REMINDER_UPSERT = {"sqlite": _reminder_upsert(sqlite.insert), "postgresql": _reminder_upsert(postgresql.insert)}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every datetime the runtime stores is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------
# Engines


def create_engine(url: str, *, echo: bool = False, pool_size: int = 10) -> AsyncEngine:
    """An async engine for ``sqlite+aiosqlite``, ``postgresql+asyncpg`` or ``mssql+aioodbc`` URLs."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.get_driver_name() != "aiosqlite":
            raise ValueError(f"SQLite needs the async driver: use sqlite+aiosqlite:// (got {url!r})")
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or "mode=memory" in str(parsed)
        if in_memory:
            # One shared connection, or every checkout would see its own empty database.
            engine = create_async_engine(url, echo=echo, poolclass=StaticPool, module=_INLINE_SQLITE)
        else:
            _private_sqlite_file(Path(database))
            # No overflow: a closing connection is held until the next loop iteration (SQLAlchemy shields the close
            # in a task), so bursts of turns went past the pool and opened, then closed, a connection each, every
            # open and close a hop to a new aiosqlite thread (issue 14: 565 in 1,500 orders). The same twenty at
            # most, kept open.
            engine = create_async_engine(url, echo=echo, pool_size=pool_size * 2, max_overflow=0, module=_INLINE_SQLITE)
        _tune_sqlite(engine, in_memory=in_memory, path=database)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "asyncpg":
            raise ValueError(f"PostgreSQL needs the async driver: use postgresql+asyncpg:// (got {url!r})")
        # Twenty kept, ten more in a burst (thirty at most, as before): with ten kept, a checkout burst opened and
        # closed an overflow connection per turn (issue 14: 456 connects in 1,000 orders, each a TLS probe, an
        # authentication, a server process and the adapter's type set-up: more than the turns' own statements).
        engine = create_async_engine(url, echo=echo, pool_size=pool_size * 2, max_overflow=pool_size)
        _ping_when_idle(engine)
        return engine
    if backend == "mssql":
        if parsed.get_driver_name() != "aioodbc":
            raise ValueError(f"SQL Server needs the async driver: use mssql+aioodbc:// (got {url!r})")
        # fast_executemany batches outbox/inbox inserts in one round trip on pyodbc.
        return create_async_engine(
            url, echo=echo, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=True, fast_executemany=True
        )
    raise ValueError(
        f"unsupported database URL {url!r}: expected sqlite+aiosqlite, postgresql+asyncpg or mssql+aioodbc"
    )


PING_AFTER_IDLE = 2.0  # seconds a pooled PostgreSQL connection may rest before it is checked at its next checkout


def _ping_when_idle(engine: AsyncEngine) -> None:
    """``pool_pre_ping``, but only for a connection that rested in the pool longer than ``PING_AFTER_IDLE`` seconds.

    Pre-ping costs a round trip at every checkout, and a turn checks a connection out for its load and again for its
    commit (issue 14: round trips are what a PostgreSQL commit costs). What it is for is a connection the server
    dropped while it sat in the pool (a server restart, an idle timeout, a network cut); one in constant use fails
    its next statement in such a case anyway, which the caller sees as it would see the failure a moment later. A
    connection that fails the ping is replaced (the pool retries the checkout), as with pre-ping."""
    sync = engine.sync_engine

    @event.listens_for(sync, "connect")
    def _connected(_dbapi_connection: Any, record: Any) -> None:
        record.info["ecom_rested_since"] = time.monotonic()

    @event.listens_for(sync, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["ecom_rested_since"] = time.monotonic()

    @event.listens_for(sync, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("ecom_rested_since", 0.0) <= PING_AFTER_IDLE:
            return
        try:
            sync.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # any failure means: do not use this connection
            raise DisconnectionError(f"pooled connection failed its ping: {exc!r}") from exc


def _private_sqlite_file(db: Path) -> None:
    """The data folder 0700 and the database file 0600 (SQLite gives its -wal and -shm files the database file's
    mode). A data folder or file that is more open is tightened, with a warning; a folder shared with others
    (not ours, sticky like /tmp, the home or working directory) is left alone, with a warning."""
    folder = db.parent
    if not folder.exists():
        missing = [folder, *(p for p in folder.parents if not p.exists())]
        for path in reversed(missing):  # every folder made here is 0700, whatever the umask
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
                os.chmod(path, 0o700)
    else:
        st = folder.stat()
        if st.st_mode & 0o077:
            resolved = folder.resolve()
            shared = (
                st.st_uid != os.getuid()
                or st.st_mode & stat.S_ISVTX
                or resolved in (Path.home().resolve(), Path.cwd().resolve(), Path(resolved.anchor))
            )
            if shared:
                log.warning(
                    "the database %s is in %s, which others can enter (mode %o): keep it in a private data folder",
                    db,
                    folder,
                    st.st_mode & 0o777,
                )
            else:
                log.warning("data folder %s was open to others (mode %o); made 0700", folder, st.st_mode & 0o777)
                os.chmod(folder, 0o700)
    if not db.exists():
        with contextlib.suppress(FileExistsError):  # an empty file is an empty database to SQLite
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077 and path.stat().st_uid == os.getuid():
            log.warning("database file %s was readable by others (mode %o); made 0600", path, mode & 0o777)
            os.chmod(path, 0o600)


# ---------------------------------------------------------------------------------------------------
# SQLite without thread hops

SQLITE_BUSY_WAIT = 10.0  # seconds a statement waits for another connection's lock (what busy_timeout was)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_BUSY_SNAPSHOT = 5, 6, 517


class _InlineCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor, run on the event loop's own thread (see :class:`_InlineConnection`)."""

    __slots__ = ()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._settle(self._adapt_connection._run(_run_statement, operation, parameters))  # type: ignore[attr-defined]  # always an _InlineConnection

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._settle(self._adapt_connection._run(_run_many, operation, seq_of_parameters))  # type: ignore[attr-defined]  # always an _InlineConnection

    def _settle(self, outcome: tuple[Any, list[Any], int, int]) -> None:
        self.description, rows, self.lastrowid, self.rowcount = outcome
        self._rows = deque(rows)


class _InlineConnection(AsyncAdapt_aiosqlite_connection):
    """A SQLite connection whose statements, commits and rollbacks run on the event loop's thread.

    aiosqlite runs every call on a thread of its own, and SQLAlchemy's adapter makes three or four such calls per
    statement (open a cursor, execute, fetch, close) plus one per commit and rollback. Each hand-off wakes a thread
    and then the event loop again; on one core those switches were the largest single cost of a turn (issue 14). A
    SQLite statement of this service takes microseconds (WAL, ``synchronous=NORMAL``: a commit does not wait for the
    disk), less than one hand-off, so it runs in place. Connecting and closing still use aiosqlite's thread.

    The one thing that may not run in place is waiting for a lock: another connection's write transaction (of this
    process, suspended at an ``await``, or of another process) would block the loop, and the holder could never
    finish. So ``busy_timeout`` is 0 on these connections: a locked statement fails at once (having done nothing)
    and is tried again after yielding to the loop, with jittered back-off, for ``SQLITE_BUSY_WAIT`` seconds at most
    (what ``busy_timeout`` gave before), then raises the lock error as before.
    """

    __slots__ = ("checkpointer",)
    checkpointer: _WalCheckpointer | None

    @property
    def isolation_level(self) -> str | None:
        level: str | None = self._connection._conn.isolation_level
        return level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._run(_set_isolation_level, value)

    def cursor(self, server_side: bool = False) -> AsyncAdapt_aiosqlite_cursor:
        return super().cursor(server_side) if server_side else _InlineCursor(self)

    def commit(self) -> None:
        self._run(_commit)
        if self.checkpointer is not None:
            self.checkpointer.committed()

    def rollback(self) -> None:
        self._run(_rollback)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            conn = self._connection._conn  # aiosqlite's sqlite3 connection
        except ValueError as error:
            self._handle_exception(error)
        # Through await_ even though nothing suspends unless the database is locked: SQLAlchemy's async layer
        # insists that a statement switched to the loop's greenlet (a switch, not a trip through the loop).
        return self.await_(_in_place(fn, conn, args))


def _is_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    # A stale snapshot (BUSY_SNAPSHOT) never clears by waiting: it goes to the caller at once, as it always did.
    return code is not None and code != _SQLITE_BUSY_SNAPSHOT and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


async def _in_place(fn: Callable[..., Any], conn: sqlite3.Connection, args: tuple[Any, ...]) -> Any:
    """``fn(conn, *args)`` now; while the database is locked, again after yielding to the loop (the holder may be
    one of its tasks), with jittered back-off, for ``SQLITE_BUSY_WAIT`` seconds at most."""
    try:
        return fn(conn, *args)
    except sqlite3.OperationalError as error:
        if not _is_busy(error):
            raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SQLITE_BUSY_WAIT
    ceiling = 0.001
    while True:
        await asyncio.sleep(random.uniform(0.0, ceiling))  # full jitter: waiters do not retry in step
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or loop.time() >= deadline:
                raise
        ceiling = min(ceiling * 2, 0.05)


def _run_statement(conn: sqlite3.Connection, operation: Any, parameters: Any) -> tuple[Any, list[Any], int, int]:
    cursor = conn.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        if cursor.description:
            return cursor.description, cursor.fetchall(), -1, -1
        return None, [], cursor.lastrowid or 0, cursor.rowcount
    finally:
        cursor.close()


def _run_many(conn: sqlite3.Connection, operation: Any, seq_of_parameters: Any) -> tuple[Any, list[Any], int, int]:
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, seq_of_parameters)
        return None, [], cursor.lastrowid or 0, cursor.rowcount
    finally:
        cursor.close()


def _commit(conn: sqlite3.Connection) -> None:
    conn.commit()


def _rollback(conn: sqlite3.Connection) -> None:
    conn.rollback()


def _set_isolation_level(conn: sqlite3.Connection, value: Any) -> None:
    conn.isolation_level = value


class _InlineSqliteDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """The aiosqlite DBAPI adapter handing out :class:`_InlineConnection` (given to the engine as ``module``)."""

    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        # Opened on aiosqlite's thread, used on the loop's: the connection is never used by both at once.
        kw["check_same_thread"] = False
        adapted = super().connect(*arg, **kw)
        inline = _InlineConnection(self, adapted._connection)
        inline.checkpointer = None  # set by _tune_sqlite for a file database
        return inline


_INLINE_SQLITE = _InlineSqliteDBAPI(aiosqlite, sqlite3)


# ---------------------------------------------------------------------------------------------------
# The store's own statements on SQLite and PostgreSQL: compiled once, run on the driver


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A statement compiled once for SQLite and one set of parameter names: its text, how the positional values are
    taken from a parameter dict, and the row type of its result (None: it returns no rows)."""

    sql: str
    take: Callable[[dict[str, Any]], Any]  # the given parameters' values, in the order of their ``?``
    constants: tuple[tuple[int, Any], ...]  # (position, bound value) of literals the caller does not give (version=1)
    processors: tuple[
        tuple[int, Callable[[Any], Any]], ...
    ]  # (position, the column type's conversion: datetime -> text)
    single: bool  # one value taken: ``take`` answers it bare, not in a tuple
    row: type | None
    readers: tuple[Callable[[Any], Any] | None, ...] | None  # per result column (text -> datetime), None: none needed

    def rows(self, raw: list[Any]) -> list[Any]:
        assert self.row is not None
        make = self.row._make  # type: ignore[attr-defined]  # a namedtuple class
        readers = self.readers
        if readers is None:
            return [make(r) for r in raw]
        return [
            make(v if read is None or v is None else read(v) for v, read in zip(r, readers, strict=True)) for r in raw
        ]

    def bind(self, params: dict[str, Any]) -> Sequence[Any]:
        taken = self.take(params)
        if not self.constants and not self.processors:
            return (taken,) if self.single else taken
        values = [taken] if self.single else list(taken)
        for position, value in self.constants:
            values.insert(position, value)
        for position, process in self.processors:
            value = values[position]
            if value is not None:
                values[position] = process(value)
        return values


class _DirectResult:
    """The part of SQLAlchemy's ``Result`` callers of :func:`execute` use (``rowcount``, iteration, ``first()``,
    ``all()``, ``scalar_one()``), from a statement run directly."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Any:
        return iter(self.rows)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> list[Any]:
        return self.rows

    def scalar_one(self) -> Any:
        if len(self.rows) != 1:
            raise NoResultFound("no row") if not self.rows else MultipleResultsFound("more than one row")
        return self.rows[0][0]


_PREPARED: dict[tuple[Any, str, tuple[str, ...]], _Prepared | None] = {}  # (statement, dialect, parameter names)
_namedtuple: Any = collections.namedtuple  # a row type whose field names are known only at run time


def _prepare(stmt: Any, dialect: Any, names: tuple[str, ...]) -> _Prepared | None:
    """``stmt`` compiled for ``dialect`` (SQLite's or asyncpg's) and the parameter ``names`` given, or None when it
    needs what only SQLAlchemy's execution does (an expanding ``IN``, a value computed by a callable, a required
    value missing from ``names``, which SQLAlchemy then reports, a column conversion of a result on PostgreSQL) or
    returns rows of a write (``RETURNING``; on PostgreSQL a ``text()`` one is run: its rows are named by the
    server)."""
    if isinstance(stmt, TextClause) and dialect.name == "sqlite":
        return None  # its rows would come back unnamed
    compiled = stmt.compile(dialect=dialect, column_keys=list(names))
    if compiled.positiontup is None or compiled.literal_execute_params or compiled.post_compile_params:
        return None
    if compiled.effective_returning:
        return None
    row: type | None = None
    readers: tuple[Callable[[Any], Any] | None, ...] | None = None
    if isinstance(stmt, Select):
        columns = list(stmt.selected_columns)
        readers = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
        if all(read is None for read in readers):
            readers = None
        elif dialect.name != "sqlite":
            return None  # asyncpg converts what it reads by the column's type; the processors expect a coltype
        row = _namedtuple("_Row", [str(c.key) for c in columns])
    binds = [compiled.binds[name] for name in compiled.positiontup]
    if any(b.callable is not None for b in binds) or any(b.required and b.key not in names for b in binds):
        return None  # SQLAlchemy computes it, or says which value is missing
    given = [b.key for b in binds if b.key in names]
    processors = [b.type.dialect_impl(dialect).bind_processor(dialect) for b in binds]
    constants = tuple(
        (i, b.value if processors[i] is None or b.value is None else processors[i](b.value))
        for i, b in enumerate(binds)
        if b.key not in names
    )
    return _Prepared(
        sql=compiled.string,
        take=operator.itemgetter(*given) if given else (lambda _params: ()),
        constants=constants,
        processors=tuple(
            (i, process) for i, process in enumerate(processors) if process is not None and binds[i].key in names
        ),
        single=len(given) == 1,
        row=row,
        readers=readers,
    )


async def execute(conn: AsyncConnection, stmt: Any, params: dict[str, Any] | list[dict[str, Any]] | None = None) -> Any:
    """``conn.execute(stmt, params)`` for statements on a hot path (the store's commits, the query-table hooks that
    run in them, the reads behind every activation): build the statement once, at import, and run it here.

    On an in-place SQLite connection (:class:`_InlineConnection`) and on an asyncpg connection (in its transaction,
    begun as SQLAlchemy's autobegin would) the statement, compiled once, goes straight to the driver in the
    connection's transaction: per statement, SQLAlchemy's execution (parameter building, the compiled cache, the
    execution context, the cursor and result wrappers, the greenlet switches) cost several times what SQLite itself
    took, and it ran on the event loop's one thread (issue 14: a third of a checkout's CPU was SQLAlchemy; on
    PostgreSQL SQLAlchemy also compiled the order summaries' ``ON CONFLICT`` upsert at every commit, a construct its
    cache does not take). Same errors as SQLAlchemy raises (``IntegrityError`` ...; a connection found closed is
    invalidated, as SQLAlchemy does), same cursor events for listeners (the tests and ``bench.checkout --count``
    count statements with them), the same column conversions both ways, the same prepared statements on asyncpg
    (the adapter's per-connection cache). A statement this cannot run alike (see :func:`_prepare`) and every other
    case go through SQLAlchemy, so the result is the same wherever it runs; the answer offers what callers use of a
    ``Result``: ``rowcount``, its rows, ``first()``, ``all()``, ``scalar_one()``."""
    sync = conn.sync_connection
    dbapi = sync.connection.dbapi_connection if sync is not None else None
    if params == [] or sync is None:
        return await conn.execute(stmt, params)
    if isinstance(dbapi, _InlineConnection):
        run: Callable[..., Awaitable[tuple[list[Any], int]]] = _run_sqlite
    elif isinstance(dbapi, AsyncAdapt_asyncpg_connection):
        if not sync.in_transaction():
            if sync._transaction is None:
                sync._autobegin()  # what SQLAlchemy's execute does first (a read on ``engine.connect()``: a load)
            if not sync.in_transaction():
                return await conn.execute(stmt, params)  # a failed transaction: SQLAlchemy says what to do
        run = _run_asyncpg
    else:
        return await conn.execute(stmt, params)
    if params is None:
        params = {}
    many = isinstance(params, list)
    # Compiled for the parameters' names, as SQLAlchemy does (an INSERT without values() names the columns given).
    key = (stmt, conn.dialect.name, tuple(params[0] if isinstance(params, list) else params))
    try:
        prepared = _PREPARED[key]
    except KeyError:
        prepared = _PREPARED[key] = _prepare(stmt, conn.dialect, key[2])
    if prepared is None:
        return await conn.execute(stmt, params)
    args: Any = [prepared.bind(p) for p in params] if many else prepared.bind(params)
    sql = prepared.sql
    if sync._has_events or sync.engine._has_events:  # how SQLAlchemy itself decides to dispatch them
        for fn in sync.dispatch.before_cursor_execute:
            sql, args = fn(sync, None, sql, args, None, many)
    if prepared.row is None:
        return _DirectResult(*await run(conn, dbapi, sql, args, many, True))
    rows, rowcount = await run(conn, dbapi, sql, args, many, False)
    return _DirectResult(prepared.rows(rows), rowcount)


async def _run_sqlite(
    conn: AsyncConnection, dbapi: _InlineConnection, sql: str, args: Any, many: bool, _named: bool
) -> tuple[list[Any], int]:
    try:
        _, rows, _, rowcount = await _in_place(
            _run_many if many else _run_statement, dbapi._connection._conn, (sql, args)
        )
    except sqlite3.Error as error:
        raise DBAPIError.instance(sql, args, error, sqlite3.Error) from error
    return rows, rowcount


_STATUS_COUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")  # the adapter's reading of a status


async def _run_asyncpg(
    conn: AsyncConnection, dbapi: AsyncAdapt_asyncpg_connection, sql: str, args: Any, many: bool, named: bool
) -> tuple[list[Any], int]:
    """What the adapter's cursor does (its lock, its transaction begun on first use, its prepared-statement cache,
    its reading of the row count), without SQLAlchemy's execution around it. Rows come back as asyncpg's records,
    or ``named`` tuples with the server's column names (for a statement with no row type of its own)."""
    try:
        async with dbapi._execute_mutex:
            if not dbapi._started:
                await dbapi._start_transaction()
            if many:
                await dbapi._connection.executemany(sql, args)
                return [], -1  # asyncpg does not count the rows of an executemany (nor does SQLAlchemy's adapter)
            schema_asof = conn.dialect._invalidate_schema_cache_asof  # type: ignore[attr-defined]
            prepared, attributes = await dbapi._prepare(sql, schema_asof)
            records = await prepared.fetch(*args)
            counted = _STATUS_COUNT.match(prepared.get_statusmsg() or "")
            rowcount = int(counted.group(1)) if counted else -1
            if not named or not records:
                return records, rowcount
            make = _record_type(tuple(a.name for a in attributes))._make
            return [make(r.values()) for r in records], rowcount
    except Exception as error:  # translated below as SQLAlchemy would, or raised as it is
        try:
            dbapi._handle_exception(error)  # raises the DBAPI error SQLAlchemy's adapter would (or ``error`` itself)
        except dbapi.dbapi.Error as translated:
            closed = conn.dialect.is_disconnect(translated, dbapi, None)  # type: ignore[arg-type]
            if closed:
                await conn.invalidate(translated)
            raise DBAPIError.instance(
                sql, args, translated, dbapi.dbapi.Error, connection_invalidated=closed, dialect=conn.dialect
            ) from error
        raise


@functools.lru_cache(maxsize=256)
def _record_type(names: tuple[str, ...]) -> Any:
    return _namedtuple("_Row", names, rename=True)


class _WalCheckpointer:
    """Checkpoints one SQLite file's write-ahead log on a thread, never on the event loop's.

    SQLite checkpoints by itself in the commit that takes the log past 1,000 pages: that commit copies the pages
    into the database file and fsyncs both, milliseconds to tens of milliseconds, and with statements run in place
    (:class:`_InlineConnection`) that was the event loop waiting (issue 14: commits averaged 0.57 ms under the
    checkout bench, most of it in these checkpoints; a simple commit takes under 0.01 ms). So the connections turn
    that off (``wal_autocheckpoint=0``) and every :data:`EVERY` commits this runs a PASSIVE checkpoint on a
    connection of its own, on a worker thread (sqlite3 releases the GIL meanwhile): it copies what no reader
    still needs and never waits for a lock, so neither readers nor the writer are held up. Past
    :data:`RESTART_FRAMES` it also runs a RESTART, which holds writers back (they retry without blocking the loop)
    while it copies the rest, so that the log starts over. At most one runs at a time per file. Durability is
    unchanged: a commit is in the log, which a checkpoint only copies."""

    EVERY = 200  # commits between checkpoints: a few pages a commit, about the 1,000 pages SQLite would wait for
    RESTART_FRAMES = 4000  # log frames (pages, 4 KiB) past which the log is made to start over: ~16 MiB
    RESTART_WAIT = 1.0  # seconds the restart waits for a writer to finish (then it is tried at the next one)

    def __init__(self, path: str) -> None:
        self.path = path
        self._commits = 0
        self._running = False
        self.checkpoints = 0  # completed (tests and diagnostics read it)

    def committed(self) -> None:
        self._commits += 1
        if self._commits >= self.EVERY and not self._running:
            self._commits = 0
            self._running = True
            _checkpoint_thread().submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=self.RESTART_WAIT)) as conn:
                _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if frames > self.RESTART_FRAMES:
                    # Under steady writes the log never starts again from its beginning (that needs a writer to
                    # begin after a complete checkpoint): it would grow for as long as the load lasts. RESTART
                    # waits for the writer of the moment, copies the rest and makes the next writer start the log
                    # over; writers meanwhile see the database busy and retry without blocking the loop.
                    conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error as error:  # the next one tries again; the log only grows meanwhile
            log.warning("checkpoint of %s failed: %s", self.path, error)
        finally:
            self._running = False


@functools.cache
def _checkpoint_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-checkpoint")


def _tune_sqlite(engine: AsyncEngine, *, in_memory: bool, path: str = "") -> None:
    checkpointer = None if in_memory else _WalCheckpointer(path)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not in_memory:
            # WAL lets readers run beside the one writer; NORMAL sync is durable across process crashes
            # (the WAL is fsynced at checkpoints), which is the failure model of this service.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run off the loop: _WalCheckpointer
            dbapi_connection.checkpointer = checkpointer
        # 0: a locked statement fails at once and waits without blocking the event loop (_InlineConnection).
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


# ---------------------------------------------------------------------------------------------------
# The per-turn write set and its commit


SqlHook = Callable[[AsyncConnection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BatchedHook:
    """A hook whose writes the turns of one transaction make together: ``run`` is called once per transaction with
    the ``item`` of every accepted turn that added a hook with that same ``run`` (in turn order), after the turns'
    other hooks and before their inbox/outbox rows. So a group commit of k turns that each update their query row
    costs one executemany instead of k statements (issue 14: statements, not rows, were the cost). Same transaction
    as the version steps: a turn is still all or nothing, and a refused turn adds no item. Called alone (``hook(conn)``)
    it runs for its own item, so it is an ordinary :data:`SqlHook` too."""

    run: Callable[[AsyncConnection, list[Any]], Awaitable[None]]
    item: Any

    async def __call__(self, conn: AsyncConnection) -> None:
        await self.run(conn, [self.item])


@dataclass(slots=True)
class OutboxMessage:
    kind: str  # "send" | "publish"
    destination: str
    message_id: str
    envelope: str  # encoded envelope (JSON text)
    # The bus.Envelope that ``envelope`` encodes, when a turn made it: the relay hands it over without parsing the
    # text it just wrote (every bus encodes what it is given, so the broker gets the same bytes either way).
    decoded: Any = None


@dataclass(slots=True)
class ReminderChange:
    name: str
    due_at: datetime | None  # None: cancel
    period: float | None = None
    payload: str = "null"


@dataclass(slots=True)
class TurnWrite:
    """Everything one actor turn wants to make durable, committed atomically or not at all.

    Every committed turn moves the entity from ``expected_version`` to ``expected_version + 1``, also a
    turn that left the state as it was but consumed a message or changed a reminder: that version step is
    the fence. A turn that ran on a copy older than the database (another process wrote since) fails it
    and writes nothing at all: no state, no outbox row, no inbox row, no reminder change, no hook.

    One exception keeps unknown ids from leaving rows behind: a turn on an entity never stored that leaves
    it in its initial state (``changed`` false, e.g. a reservation refused for an unknown product) only
    checks that no row exists. Were one being inserted concurrently, this turn serialises before that
    insert: it read nothing that insert changed.
    """

    actor_type: str
    actor_id: str
    expected_version: int  # version the turn started from; 0 for an actor never stored
    state: str  # the state after the turn, encoded (the same text when the turn did not change it)
    changed: bool = True  # False: the turn left the state as it was
    outbox: list[OutboxMessage] = field(default_factory=list)
    inbox_id: str | None = None
    reminders: list[ReminderChange] = field(default_factory=list)
    fired_reminder: tuple[str, datetime, float | None] | None = None  # (name, due_at, period)
    hooks: list[SqlHook] = field(default_factory=list)

    @property
    def consumer(self) -> str:
        return f"{self.actor_type}/{self.actor_id}"

    @property
    def new_version(self) -> int:
        return self.expected_version + 1 if (self.changed or self.expected_version) else 0


class _Rows:
    """The inbox, outbox and reminder rows of a transaction's turns, written after its last turn: one statement per
    table (an executemany), however many turns the transaction holds.

    Written in turn order, so outbox ids still follow commit order (the relay sends in id order). Reminder changes
    are folded per (actor, name) into the last one: a delete of every changed key, then an insert of those whose
    last change sets a time, which is what deleting and inserting them one by one in order would leave (where the
    database has ``ON CONFLICT``: a delete of the cancelled ones and an upsert of the others, the same rows). A fired
    reminder is deleted or moved by its turn before this runs, so a change of the same name set by that turn wins,
    as before. Hooks (query tables) still run per turn and never read these tables; the items of
    :class:`BatchedHook` s are written here first, one call per kind of hook.
    """

    __slots__ = ("batched", "inbox", "outbox", "reminders")

    def __init__(self) -> None:
        self.inbox: list[dict[str, Any]] = []
        self.outbox: list[dict[str, Any]] = []
        self.reminders: dict[tuple[str, str, str], ReminderChange] = {}
        self.batched: dict[Callable[[AsyncConnection, list[Any]], Awaitable[None]], list[Any]] = {}

    def add(self, w: TurnWrite, now: datetime) -> None:
        if w.inbox_id is not None:
            self.inbox.append({"c": w.consumer, "m": w.inbox_id, "now": now})
        for m in w.outbox:
            self.outbox.append({"mid": m.message_id, "k": m.kind, "d": m.destination, "e": m.envelope, "now": now})
        for change in w.reminders:
            key = (w.actor_type, w.actor_id, change.name)
            self.reminders.pop(key, None)  # re-inserted last: dict order is the order of the last changes
            self.reminders[key] = change

    async def write(self, conn: AsyncConnection) -> None:
        for run, items in self.batched.items():
            await run(conn, items)
        if self.inbox:
            await execute(conn, _INSERT_INBOX, self.inbox)
        if self.outbox:
            await execute(conn, _INSERT_OUTBOX, self.outbox)
        if self.reminders:
            upsert = _REMINDER_UPSERT.get(conn.dialect.name)
            deleted = [
                {"t": t, "i": i, "n": n}
                for (t, i, n), c in self.reminders.items()
                if upsert is None or c.due_at is None
            ]
            if deleted:
                await execute(conn, _REMINDER_DELETE, deleted)
            inserts = [
                {"t": t, "i": i, "n": n, "due": c.due_at, "period": c.period, "payload": c.payload}
                for (t, i, n), c in self.reminders.items()
                if c.due_at is not None
            ]
            if inserts:
                await execute(conn, _REMINDER_INSERT if upsert is None else upsert, inserts)


class CommitOutcome:
    OK = "ok"
    CONFLICT = "conflict"  # another writer changed the entity since the turn's version
    DUPLICATE = "duplicate"  # the inbox already holds this message id, or the reminder already fired


class _Conflict(Exception):
    """Refused before the turn wrote anything: the entity's version moved on."""


class _Duplicate(Exception):
    """Refused before the turn wrote anything: the message or reminder was consumed already."""


class _BatchConflict(Exception):
    """A batch's version steps, made in one statement, did not all hold: the batch is committed turn by turn."""


class _LateDuplicate(Exception):
    """Found after the turn's first write: the whole transaction must roll back (a batch then retries alone)."""


@dataclass(frozen=True, slots=True)
class StateRecord:
    version: int
    state: str
    updated_at: datetime


class StateStore:
    """Reads actor state and commits turns, one transaction per turn or per group of turns.

    With ``group_commit`` the turns of many actors that finish together share one transaction: a single
    flusher drains everything queued while the previous transaction was in flight. Atomicity per turn is
    kept: a turn whose version check fails is skipped inside the batch (it wrote nothing yet), and if the
    batch transaction fails as a whole, every turn in it is retried alone in its own transaction.
    """

    def __init__(
        self, engine: AsyncEngine, *, group_commit: bool = True, max_batch: int = 256, flushers: int | None = None
    ):
        self.engine = engine
        self.group_commit = group_commit
        self.max_batch = max_batch
        # SQLite has one writer at a time: more flushers would only wait on its lock.
        is_sqlite = engine.dialect.name == "sqlite"
        self._flushers_max = flushers or (1 if is_sqlite else 3)
        self._flushers = 0
        self._pending: list[tuple[TurnWrite, asyncio.Future[str]]] = []
        self._version_waiters: dict[tuple[str, str], list[asyncio.Future[int]]] = {}
        self._version_flusher = False
        self.commits = 0  # transactions committed
        self.turns_committed = 0

    # -- reads ----------------------------------------------------------------------------------

    async def load(self, actor_type: str, actor_id: str) -> StateRecord | None:
        async with self.engine.connect() as conn:
            row = (await execute(conn, _LOAD, {"t": actor_type, "i": actor_id})).first()
        if row is None:
            return None
        return StateRecord(version=row.version, state=row.state, updated_at=as_utc(row.updated_at))

    async def version(self, actor_type: str, actor_id: str) -> int:
        """The stored version of an actor, 0 if it was never stored: what a read checks its copy against.

        Reads that wait together share one query (as turns share a group commit): one round trip answers
        every version asked for while the previous query was in flight."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._version_waiters.setdefault((actor_type, actor_id), []).append(fut)
        if not self._version_flusher:
            self._version_flusher = True
            asyncio.get_running_loop().create_task(self._check_versions())
        return await fut

    async def _check_versions(self) -> None:
        try:
            while self._version_waiters:
                waiting, self._version_waiters = self._version_waiters, {}
                by_type: dict[str, list[str]] = {}
                for actor_type, actor_id in waiting:
                    by_type.setdefault(actor_type, []).append(actor_id)
                try:
                    found: dict[tuple[str, str], int] = {}
                    async with self.engine.connect() as conn:
                        for actor_type, ids in by_type.items():
                            for start in range(0, len(ids), 500):
                                stmt = select(actor_state.c.actor_id, actor_state.c.version).where(
                                    actor_state.c.actor_type == actor_type,
                                    actor_state.c.actor_id.in_(ids[start : start + 500]),
                                )
                                for row in await conn.execute(stmt):
                                    found[(actor_type, row.actor_id)] = int(row.version)
                except Exception as exc:  # noqa: BLE001 whatever failed is handed to every waiting turn
                    for futs in waiting.values():
                        for fut in futs:
                            if not fut.done():
                                fut.set_exception(exc)
                    continue
                for key, futs in waiting.items():
                    for fut in futs:
                        if not fut.done():
                            fut.set_result(found.get(key, 0))
        finally:
            self._version_flusher = False

    async def seen(self, consumer: str, message_id: str) -> bool:
        async with self.engine.connect() as conn:
            return (await conn.execute(_SEEN, {"c": consumer, "m": message_id})).first() is not None

    # -- writes ---------------------------------------------------------------------------------

    async def commit(self, write: TurnWrite) -> str:
        """Make ``write`` durable; returns a :class:`CommitOutcome` value or raises the database error."""
        if not self.group_commit:
            return await self._commit_alone(write)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((write, fut))
        if self._flushers < self._flushers_max:
            self._flushers += 1
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        # The flusher keeps one connection while it has work: a checkout from the pool and its return (connection
        # object, pool events, the reset, the close SQLAlchemy runs as a task of its own) cost as much again as a
        # small transaction itself (issue 14: 180 against 85 us a commit on SQLite). It goes back once the queue is
        # empty, so a resting connection is still pinged before use, and after a failure that invalidated it.
        conn: AsyncConnection | None = None
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                if conn is None or conn.invalidated:
                    if conn is not None:
                        await conn.close()
                    conn = await self.engine.connect()
                if len(batch) == 1:
                    await self._settle_alone(*batch[0], conn=conn)
                    continue
                try:
                    outcomes = await self._commit_batch([w for w, _ in batch], conn)
                except Exception:
                    log.debug("group commit of %d turns failed; committing them one by one", len(batch), exc_info=True)
                    for write, fut in batch:
                        await self._settle_alone(write, fut, conn=None)
                    continue
                for (_, fut), outcome in zip(batch, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result(outcome)
        finally:
            self._flushers -= 1  # before any await: a turn queued meanwhile starts a flusher of its own
            if conn is not None:
                await conn.close()

    async def _settle_alone(self, write: TurnWrite, fut: asyncio.Future[str], *, conn: AsyncConnection | None) -> None:
        try:
            outcome = await self._commit_alone(write, conn)
        except Exception as exc:  # noqa: BLE001 the turn learns of it and rolls back; the flusher goes on
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(outcome)

    @contextlib.asynccontextmanager
    async def _transaction(self, conn: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        """A transaction on ``conn`` (the flusher's), or on a connection of its own from the pool."""
        if conn is None:
            async with self.engine.begin() as own:
                yield own
        else:
            async with conn.begin():
                yield conn

    async def _commit_alone(self, write: TurnWrite, conn: AsyncConnection | None = None) -> str:
        try:
            async with self._transaction(conn) as conn:
                rows = _Rows()
                await self._apply(conn, write, await self._seen_ids(conn, [write]), rows)
                await rows.write(conn)
            self.commits += 1
            self.turns_committed += 1
            return CommitOutcome.OK
        except _Conflict:
            return CommitOutcome.CONFLICT
        except (_Duplicate, _LateDuplicate):
            return CommitOutcome.DUPLICATE
        except IntegrityError:
            # Lost a race the pre-checks could not see: a concurrent first insert of the same actor, or the
            # same inbox id committed by another process. Tell which, so the turn reloads or stops.
            if write.inbox_id is not None and await self.seen(write.consumer, write.inbox_id):
                return CommitOutcome.DUPLICATE
            return CommitOutcome.CONFLICT

    async def _commit_batch(self, writes: Sequence[TurnWrite], conn: AsyncConnection | None = None) -> list[str]:
        outcomes: list[str] = []
        async with self._transaction(conn) as conn:
            seen = await self._seen_ids(conn, writes)
            if conn.dialect.supports_sane_multi_rowcount or conn.dialect.name == "postgresql":
                outcomes = await self._commit_stepped(conn, writes, seen)
                self.commits += 1
                self.turns_committed += outcomes.count(CommitOutcome.OK)
                return outcomes
            rows = _Rows()
            for write in writes:
                try:
                    await self._apply(conn, write, seen, rows)
                except _Conflict:
                    outcomes.append(CommitOutcome.CONFLICT)
                except _Duplicate:
                    outcomes.append(CommitOutcome.DUPLICATE)
                else:
                    outcomes.append(CommitOutcome.OK)
                    if write.inbox_id is not None:
                        seen.add((write.consumer, write.inbox_id))
            await rows.write(conn)
        self.commits += 1
        self.turns_committed += outcomes.count(CommitOutcome.OK)
        return outcomes

    async def _commit_stepped(
        self, conn: AsyncConnection, writes: Sequence[TurnWrite], seen: set[tuple[str, str]]
    ) -> list[str]:
        """A group commit in a constant number of statements: every version step of the batch in one UPDATE, the new
        entities in one INSERT, then the turns' own writes (fired reminders, hooks) and their rows.

        The same outcomes as :meth:`_apply` turn by turn: every check runs before the batch's first write, so a stale
        turn is refused having written nothing (its hooks never run). How the one UPDATE tells which steps held:

        * where the driver counts the rows of an executemany (SQLite), the batch's versions are probed first (one
          statement) and the stale turns refused; should a version move between the probe and the step (another
          process committed in between: SQLite refuses the stale snapshot's write anyway), the step updates fewer
          rows than it names and the whole batch rolls back, to be committed turn by turn;
        * on PostgreSQL, ``UPDATE ... FROM (VALUES ...) RETURNING`` names the entities it stepped: the others are
          the stale turns, refused before any other write of the batch (one round trip for the batch's steps instead
          of one per turn)."""
        probe = conn.dialect.supports_sane_multi_rowcount
        versions = await self._versions(conn, writes) if probe else {}
        outcomes: list[str] = []
        checked: list[tuple[int, TurnWrite, dict[str, Any] | None]] = []
        for w in writes:
            try:
                fired = await self._check(conn, w, seen)
                if probe:
                    if versions.get((w.actor_type, w.actor_id), 0) != w.expected_version:
                        raise _Conflict
                elif (
                    not w.expected_version
                    and not w.changed
                    and (await execute(conn, _EXISTS, {"t": w.actor_type, "i": w.actor_id})).first() is not None
                ):
                    raise _Conflict
            except _Conflict:
                outcomes.append(CommitOutcome.CONFLICT)
            except _Duplicate:
                outcomes.append(CommitOutcome.DUPLICATE)
            else:
                outcomes.append(CommitOutcome.OK)
                checked.append((len(outcomes) - 1, w, fired))
        now = utcnow()
        stepping = [w for _, w, _ in checked if w.expected_version]
        if len({(w.actor_type, w.actor_id) for w in stepping}) != len(stepping):
            # Two turns of one entity in a batch (never from one ActorSystem: its turns of an entity are sequential):
            # one statement could not tell which of the two steps held. Turn by turn, the second one is refused.
            raise _BatchConflict("an entity appears twice in the batch")
        if stepping and probe:
            steps = [
                {"t": w.actor_type, "i": w.actor_id, "v": w.expected_version, "nv": w.expected_version + 1}
                | {"s": w.state, "now": now}
                for w in stepping
            ]
            if (await execute(conn, _UPDATE_STATE, steps)).rowcount != len(steps):
                raise _BatchConflict(f"the versions of {len(steps)} entities moved on during the group commit")
        elif stepping:
            stepped = await _step_returning(conn, stepping, now)
            for k, w, _ in checked:
                if w.expected_version and (w.actor_type, w.actor_id) not in stepped:
                    outcomes[k] = CommitOutcome.CONFLICT
        accepted = [(w, fired) for k, w, fired in checked if outcomes[k] == CommitOutcome.OK]
        created = [
            {"t": w.actor_type, "i": w.actor_id, "s": w.state, "now": now}
            for w, _ in accepted
            if not w.expected_version and w.changed
        ]
        if created:
            # A row stored meanwhile fails this insert on the primary key: the batch is then retried turn by turn.
            await execute(conn, _INSERT_STATE, created)
        rows = _Rows()
        for w, fired in accepted:
            if w.inbox_id is not None:
                seen.add((w.consumer, w.inbox_id))
            await self._after_step(conn, w, fired, rows, now)
        await rows.write(conn)
        return outcomes

    async def _versions(self, conn: AsyncConnection, writes: Sequence[TurnWrite]) -> dict[tuple[str, str], int]:
        """The stored version of each entity of ``writes`` (absent: never stored)."""
        keys = sorted({(w.actor_type, w.actor_id) for w in writes})
        found: dict[tuple[str, str], int] = {}
        for start in range(0, len(keys), _SEEN_CHUNK):
            chunk = _padded(keys[start : start + _SEEN_CHUNK])
            params = {f"{col}{i}": value for i, key in enumerate(chunk) for col, value in zip("ti", key, strict=True)}
            for r in await execute(conn, _version_pairs(len(chunk)), params):
                found[(r.actor_type, r.actor_id)] = int(r.version)
        return found

    async def _seen_ids(self, conn: AsyncConnection, writes: Sequence[TurnWrite]) -> set[tuple[str, str]]:
        wanted = [(w.consumer, w.inbox_id) for w in writes if w.inbox_id is not None]
        if not wanted:
            return set()
        pairs: list[tuple[str, str]] = sorted(set(wanted))
        seen: set[tuple[str, str]] = set()
        for start in range(0, len(pairs), _SEEN_CHUNK):
            chunk = _padded(pairs[start : start + _SEEN_CHUNK])
            params = {f"{col}{i}": value for i, pair in enumerate(chunk) for col, value in zip("cm", pair, strict=True)}
            seen.update((r.consumer, r.message_id) for r in await execute(conn, _seen_pairs(len(chunk)), params))
        return seen

    async def _apply(self, conn: AsyncConnection, w: TurnWrite, seen: set[tuple[str, str]], rows: _Rows) -> None:
        """Write one turn.

        Every check that may refuse the turn runs before its first write, so a refused turn inside a group
        commit has written nothing and the batch goes on: group and single commits give the same outcome.
        The version step comes first among the writes; once it holds, this transaction owns the entity's row
        (row lock until commit), so what the checks read about this entity cannot change before the commit.

        The turn's inbox, outbox and reminder rows are not written here but added to ``rows``, which the
        transaction writes after its last turn, one statement per table for all its turns (issue 14: statements,
        not rows, were the cost). Only turns that passed their checks add rows, so a refused turn still writes
        nothing; they are in the same transaction as the version steps, so a turn is still all or nothing.
        """
        fired = await self._check(conn, w, seen)
        now = utcnow()
        key = {"t": w.actor_type, "i": w.actor_id}
        if w.expected_version == 0:
            if w.changed:
                # No look-up first: a row stored meanwhile (another process created the entity) fails this insert
                # on the primary key, which rolls the transaction back; alone, that is the CONFLICT it would have
                # been (see _commit_alone), in a group the batch is retried turn by turn. One query per new
                # entity saved, for a race that needs two processes to create the same entity at once.
                await execute(conn, _INSERT_STATE, {**key, "s": w.state, "now": now})
            elif (await execute(conn, _EXISTS, key)).first() is not None:
                raise _Conflict
        else:
            params = {**key, "v": w.expected_version, "nv": w.expected_version + 1, "s": w.state, "now": now}
            if (await execute(conn, _UPDATE_STATE, params)).rowcount != 1:
                raise _Conflict
        await self._after_step(conn, w, fired, rows, now)

    async def _check(self, conn: AsyncConnection, w: TurnWrite, seen: set[tuple[str, str]]) -> dict[str, Any] | None:
        """The checks of a turn that need no version: a consumed message seen before, a fired reminder gone
        (raises :class:`_Duplicate`). Returns the fired reminder's key, for :meth:`_after_step`."""
        if w.inbox_id is not None and (w.consumer, w.inbox_id) in seen:
            raise _Duplicate
        if w.fired_reminder is None:
            return None
        name, due_at, _ = w.fired_reminder
        fired = {"t": w.actor_type, "i": w.actor_id, "n": name, "due": due_at}
        if (await execute(conn, _FIRED_EXISTS, fired)).first() is None:
            raise _Duplicate  # already fired (another process) or cancelled since
        return fired

    async def _after_step(
        self, conn: AsyncConnection, w: TurnWrite, fired: dict[str, Any] | None, rows: _Rows, now: datetime
    ) -> None:
        """A turn's writes after its version step: the fired reminder done, its rows, its hooks."""
        if fired is not None:
            assert w.fired_reminder is not None
            _, due_at, period = w.fired_reminder
            if period:
                result = await execute(conn, _FIRED_RESCHEDULE, {**fired, "next_due": _next_due(due_at, period, now)})
            else:
                result = await execute(conn, _FIRED_DELETE, fired)
            if result.rowcount == 0:
                # Only turns of this entity touch its reminders, and they all step the version we hold: so
                # this means a write outside the runtime. Undo the whole transaction rather than guess.
                raise _LateDuplicate
        rows.add(w, now)
        for hook in w.hooks:
            if isinstance(hook, BatchedHook):
                rows.batched.setdefault(hook.run, []).append(hook.item)
            else:
                await hook(conn)

    async def purge_inbox(self, before: datetime) -> int:
        """Forget consumed message ids older than ``before``: the inbox only has to outlive redelivery."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(inbox).where(inbox.c.processed_at < before))
        return result.rowcount or 0

    # -- reminders ------------------------------------------------------------------------------

    async def due_reminders(self, actor_types: Sequence[str], now: datetime, limit: int = 500) -> list[Any]:
        if not actor_types:
            return []
        async with self.engine.connect() as conn:
            return list(await conn.execute(_DUE, {"types": list(actor_types), "now": now, "limit": limit}))

    async def reminders_of(self, actor_type: str, actor_id: str) -> list[Any]:
        stmt = select(reminders).where(reminders.c.actor_type == actor_type, reminders.c.actor_id == actor_id)
        async with self.engine.connect() as conn:
            return list(await conn.execute(stmt))


def _next_due(due_at: datetime, period: float, now: datetime) -> datetime:
    """The next firing after ``now`` on the reminder's own grid, so a long outage fires it once, not N times."""
    from datetime import timedelta

    step = timedelta(seconds=period)
    nxt = as_utc(due_at) + step
    if nxt <= now:
        missed = int((now - nxt) / step) + 1
        nxt += step * missed
    return nxt
