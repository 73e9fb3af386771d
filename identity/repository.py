"""Identity's tables and queries (SQLAlchemy Core, portable across SQLite, PostgreSQL and SQL Server).

Tables, on identity's own :data:`metadata` (the runtime's tables live in the same database, on theirs):

- ``users``: one row per account; ``email`` is stored normalised and is unique; ``password_hash`` is an
  argon2id PHC string; ``roles`` a JSON list; ``disabled`` set by ``ecom users lock``.
- ``clients``: OAuth2 clients. ``secret_hash`` is the SHA-256 of a generated 256-bit secret (NULL for a
  public client such as ``storefront``); redirect URIs, grant types, scopes and roles are JSON lists.
- ``signing_keys``: one row per key, the JSON of :meth:`identity.keys.SigningKey.to_record` (it holds the
  private key: it is never logged and never leaves this table except to sign); ``revision`` makes every
  change a compare-and-set, so two processes rotating at once cannot both win.
- ``refresh_tokens``: SHA-256 of each opaque token, its ``family`` (one per sign-in), and when it was
  rotated or revoked. A rotated token presented again is a replay: the whole family is revoked.
- ``authorization_codes``: SHA-256 of each code, bound to the client, redirect URI and PKCE challenge,
  single use (``used_at``), short-lived; ``family`` names the refresh-token family issued from it, so a
  replayed code revokes what it produced.

Single-use and rotation are conditional ``UPDATE ... WHERE used_at IS NULL`` / ``rotated_at IS NULL`` in the
same transaction as the insert of what replaces them: the database decides which of two concurrent requests
wins, across threads and processes alike (PostgreSQL re-checks the condition after the row lock; SQLite has
one writer at a time).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    false,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from identity.keys import SigningKey
from identity.messages import RegistrationAttempted
from runtime import migrate
from runtime.messages import envelope
from runtime.revocation import AccessRevoked, announcement
from runtime.store import actor_state, as_utc, outbox

# aiosqlite logs every statement *with its parameters* at DEBUG: with ECOM_LOG_LEVEL=DEBUG that would write
# private signing keys and password hashes into the log. Identity never lets it log below INFO.
logging.getLogger("aiosqlite").setLevel(logging.INFO)
log = logging.getLogger(__name__)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("roles", String(200), nullable=False),  # JSON list
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # set at sign-in when the (correct) password fails today's policy; cleared when it is changed (schema v2)
    Column("password_change_required", Boolean, nullable=False, default=False, server_default=false()),
)

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(64), nullable=True),  # NULL: public client (PKCE, no secret)
    Column("redirect_uris", Text, nullable=False),
    Column("post_logout_redirect_uris", Text, nullable=False),
    Column("grant_types", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("roles", Text, nullable=False),  # roles of client_credentials tokens
    Column("created_at", DateTime(timezone=True), nullable=False),
    # may this client's tokens carry the user's roles? First-party clients yes, others only if an admin says so
    Column("roles_allowed", Boolean, nullable=False, default=False, server_default=false()),  # schema v2
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(100), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("record", Text, nullable=False),  # SigningKey.to_record() as JSON: private key inside
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family", String(36), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("scope", String(500), nullable=False),
    Column("auth_time", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("rotated_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Index("ix_refresh_tokens_family", "family"),
    Index("ix_refresh_tokens_user", "user_id", "client_id"),
    Index("ix_refresh_tokens_expires", "expires_at"),
)

authorization_codes = Table(
    "authorization_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", String(500), nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("nonce", String(512), nullable=True),
    Column("auth_time", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Column("family", String(36), nullable=True),
    Index("ix_authorization_codes_expires", "expires_at"),
)

TABLES = (users, clients, signing_keys, refresh_tokens, authorization_codes)

# First-party clients: their tokens carry the user's roles and they may ask for every scope.
FIRST_PARTY_CLIENTS = ("storefront", "admin-console")


def _v2_scopes_and_roles(op: Any, conn: Connection) -> None:
    """Add ``users.password_change_required`` and ``clients.roles_allowed`` (true for the first-party clients).
    Idempotent: a database made by step 1 from today's table definitions has the columns already."""
    have = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in ("users", "clients")}
    if "password_change_required" not in have["users"]:
        with op.batch_alter_table("users") as batch:
            batch.add_column(Column("password_change_required", Boolean, nullable=False, server_default=false()))
    if "roles_allowed" not in have["clients"]:
        with op.batch_alter_table("clients") as batch:
            batch.add_column(Column("roles_allowed", Boolean, nullable=False, server_default=false()))
    conn.execute(update(clients).where(clients.c.client_id.in_(FIRST_PARTY_CLIENTS)).values(roles_allowed=True))


# Identity's schema steps (:data:`SCHEMA` is the component made of them).
MIGRATIONS: list[migrate.Migration] = [
    migrate.Migration(
        1, "users, clients, signing keys, refresh tokens, authorization codes", migrate.create_tables(*TABLES)
    ),
    migrate.Migration(
        2, "users.password_change_required, clients.roles_allowed (first-party clients: true)", _v2_scopes_and_roles
    ),
]
SCHEMA = migrate.Component("identity", MIGRATIONS)  # identity's database schema, for `ecom db upgrade`


# ---------------------------------------------------------------------------------------------------
# Records


def _dump_list(values: Iterable[str]) -> str:
    return json.dumps(list(values))


def _load_list(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _opt_utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


class EmailTaken(Exception):
    """Another account already has this (normalised) email."""


class ClientExists(Exception):
    """Another client already has this client_id."""


class KeyConflict(Exception):
    """Another process changed the signing keys since they were loaded; reload and decide again."""


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    name: str
    password_hash: str
    roles: tuple[str, ...]
    disabled: bool
    created_at: datetime
    password_change_required: bool = False

    def public(self) -> dict[str, Any]:
        """What the API shows of an account (never the hash)."""
        return {"id": self.id, "email": self.email, "name": self.name, "roles": list(self.roles)}

    @classmethod
    def from_row(cls, row: Any) -> User:
        return cls(
            id=row.id,
            email=row.email,
            name=row.name,
            password_hash=row.password_hash,
            roles=_load_list(row.roles),
            disabled=bool(row.disabled),
            created_at=as_utc(row.created_at),
            password_change_required=bool(row.password_change_required),
        )


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    secret_hash: str | None
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    scopes: tuple[str, ...]
    roles: tuple[str, ...]
    roles_allowed: bool = False  # the user's roles go into this client's tokens (first-party, or granted by an admin)

    @property
    def is_public(self) -> bool:
        return self.secret_hash is None

    @classmethod
    def from_row(cls, row: Any) -> Client:
        return cls(
            client_id=row.client_id,
            name=row.name,
            secret_hash=row.secret_hash,
            redirect_uris=_load_list(row.redirect_uris),
            post_logout_redirect_uris=_load_list(row.post_logout_redirect_uris),
            grant_types=_load_list(row.grant_types),
            scopes=_load_list(row.scopes),
            roles=_load_list(row.roles),
            roles_allowed=bool(row.roles_allowed),
        )

    def values(self, now: datetime) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "name": self.name,
            "secret_hash": self.secret_hash,
            "redirect_uris": _dump_list(self.redirect_uris),
            "post_logout_redirect_uris": _dump_list(self.post_logout_redirect_uris),
            "grant_types": _dump_list(self.grant_types),
            "scopes": _dump_list(self.scopes),
            "roles": _dump_list(self.roles),
            "roles_allowed": self.roles_allowed,
            "created_at": now,
        }


@dataclass(frozen=True, slots=True)
class RefreshToken:
    token_hash: str
    family: str
    user_id: str
    client_id: str
    scope: str
    auth_time: datetime
    created_at: datetime
    expires_at: datetime
    rotated_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> RefreshToken:
        return cls(
            token_hash=row.token_hash,
            family=row.family,
            user_id=row.user_id,
            client_id=row.client_id,
            scope=row.scope,
            auth_time=as_utc(row.auth_time),
            created_at=as_utc(row.created_at),
            expires_at=as_utc(row.expires_at),
            rotated_at=_opt_utc(row.rotated_at),
            revoked_at=_opt_utc(row.revoked_at),
        )

    def values(self) -> dict[str, Any]:
        return {
            "token_hash": self.token_hash,
            "family": self.family,
            "user_id": self.user_id,
            "client_id": self.client_id,
            "scope": self.scope,
            "auth_time": self.auth_time,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "rotated_at": self.rotated_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class AuthorizationCode:
    code_hash: str
    client_id: str
    user_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    nonce: str | None
    auth_time: datetime
    expires_at: datetime
    used_at: datetime | None = None
    family: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> AuthorizationCode:
        return cls(
            code_hash=row.code_hash,
            client_id=row.client_id,
            user_id=row.user_id,
            redirect_uri=row.redirect_uri,
            scope=row.scope,
            code_challenge=row.code_challenge,
            nonce=row.nonce,
            auth_time=as_utc(row.auth_time),
            expires_at=as_utc(row.expires_at),
            used_at=_opt_utc(row.used_at),
            family=row.family,
        )

    def values(self) -> dict[str, Any]:
        return {
            "code_hash": self.code_hash,
            "client_id": self.client_id,
            "user_id": self.user_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "code_challenge": self.code_challenge,
            "nonce": self.nonce,
            "auth_time": self.auth_time,
            "expires_at": self.expires_at,
            "used_at": self.used_at,
            "family": self.family,
        }


@dataclass(frozen=True, slots=True)
class StoredKey:
    key: SigningKey
    revision: int


# ---------------------------------------------------------------------------------------------------
# The repository


class Repository:
    """Every query identity makes. One instance per service, over the service's engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Revocation announcements (runtime.revocation.AccessRevoked) are written to the outbox in the same
        # transaction as the change. ``revocation_ttl``: how long after an announcement tokens issued before it
        # can still be alive (access-token lifetime + leeway; TokenService sets it from the settings, the
        # default is generous: a longer deny entry refuses nothing more). ``on_revoked`` run after the commit
        # (identity's own verifier applies the event at once); ``wake_outbox`` wakes the outbox relay.
        self.revocation_ttl: float = 24 * 3600.0
        self.on_revoked: list[Callable[[AccessRevoked], None]] = []
        self.wake_outbox: Callable[[], None] | None = None

    # -- the outbox: revocation announcements and account events ---------------------------------

    def access_revoked(self, sub: str, now: datetime, reason: str) -> AccessRevoked:
        return AccessRevoked(sub, not_before=now, until=now + timedelta(seconds=self.revocation_ttl), reason=reason)

    @staticmethod
    async def _to_outbox(conn: AsyncConnection, env: Any, now: datetime) -> None:
        await conn.execute(
            insert(outbox).values(
                message_id=env.message_id,
                kind="publish",
                destination="",
                envelope=env.encode().decode(),
                created_at=now,
            )
        )

    async def _announce(self, conn: AsyncConnection, events: Sequence[AccessRevoked], now: datetime) -> None:
        for event in events:
            await self._to_outbox(conn, announcement(event), now)

    def _after_commit(self, events: Sequence[AccessRevoked]) -> None:
        for event in events:
            log.info("access of %s revoked (%s): announced", event.sub, event.reason)
            for hook in self.on_revoked:
                try:
                    hook(event)
                except Exception:
                    log.exception("revocation hook failed")
        if events and self.wake_outbox is not None:
            self.wake_outbox()

    async def record_registration_attempt(self, user_id: str, email: str, now: datetime) -> None:
        """Someone tried to register an email that has an account: an event for the owner to be told (a mailer
        subscribes to :class:`identity.messages.RegistrationAttempted`), written to the outbox."""
        event = RegistrationAttempted(user_id=user_id, email=email, attempted_at=now)
        async with self.engine.begin() as conn:
            await self._to_outbox(conn, envelope(event, session_id=user_id), now)
        if self.wake_outbox is not None:
            self.wake_outbox()

    # -- users ----------------------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        """Insert ``user``; :class:`EmailTaken` if the email is in use (the unique index decides races)."""
        values = {
            "id": user.id,
            "email": user.email,
            "name": user.name,
            "password_hash": user.password_hash,
            "roles": _dump_list(user.roles),
            "disabled": user.disabled,
            "created_at": user.created_at,
            "updated_at": user.created_at,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(users).values(**values))
        except IntegrityError:
            raise EmailTaken(user.email) from None

    async def user_by_email(self, email: str) -> User | None:
        return await self._one_user(users.c.email == email)

    async def user_by_id(self, user_id: str) -> User | None:
        return await self._one_user(users.c.id == user_id)

    async def _one_user(self, where: Any) -> User | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(where))).first()
        return None if row is None else User.from_row(row)

    async def list_users(self, *, offset: int = 0, limit: int = 100) -> tuple[list[User], int]:
        """One page of users (oldest first) and the total count."""
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
            page = select(users).order_by(users.c.created_at, users.c.id).offset(offset).limit(limit)
            rows = await conn.execute(page)
            return [User.from_row(r) for r in rows], int(total)

    async def update_user(self, user_id: str, now: datetime, *, revoke: str | None = None, **values: Any) -> bool:
        """Set ``roles`` (a list), ``disabled``, ``password_hash`` or ``password_change_required`` of one user;
        False if there is no such user. With ``revoke`` (a reason such as ``"locked"``), in the same transaction:
        every refresh token of the user is revoked and :class:`AccessRevoked` is announced through the outbox."""
        if "roles" in values:
            values["roles"] = _dump_list(values["roles"])
        events: list[AccessRevoked] = []
        async with self.engine.begin() as conn:
            result = await conn.execute(update(users).where(users.c.id == user_id).values(updated_at=now, **values))
            if result.rowcount == 1 and revoke is not None:
                await conn.execute(
                    update(refresh_tokens)
                    .where(refresh_tokens.c.user_id == user_id, refresh_tokens.c.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
                events.append(self.access_revoked(user_id, now, revoke))
                await self._announce(conn, events, now)
        self._after_commit(events)
        return result.rowcount == 1

    async def rehash_password(self, user_id: str, now: datetime, old_hash: str, new_hash: str, **values: Any) -> bool:
        """Replace ``old_hash`` by ``new_hash`` (same password, new parameters) and set ``values`` in one
        statement; False, changing nothing, if the hash is no longer ``old_hash`` (changed meanwhile)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(users)
                .where(users.c.id == user_id, users.c.password_hash == old_hash)
                .values(updated_at=now, password_hash=new_hash, **values)
            )
        return result.rowcount == 1

    # -- clients --------------------------------------------------------------------------------

    async def create_client(self, client: Client, now: datetime) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(clients).values(**client.values(now)))
        except IntegrityError:
            raise ClientExists(client.client_id) from None

    async def client(self, client_id: str) -> Client | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(clients).where(clients.c.client_id == client_id))).first()
        return None if row is None else Client.from_row(row)

    async def set_roles_allowed(self, client_id: str, allowed: bool) -> bool:
        """Let the tokens of a client carry the user's roles (an admin's decision for a third-party client);
        False if there is no such client."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(clients).where(clients.c.client_id == client_id).values(roles_allowed=bool(allowed))
            )
        return result.rowcount == 1

    async def set_redirect_uris(self, client_id: str, uris: Sequence[str]) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(clients).where(clients.c.client_id == client_id).values(redirect_uris=_dump_list(uris))
            )
        return result.rowcount == 1

    async def list_clients(self) -> list[Client]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(clients).order_by(clients.c.client_id))
            return [Client.from_row(r) for r in rows]

    # -- signing keys ---------------------------------------------------------------------------

    # Reading and writing key rows is the key manager's (identity/keystore.py): they are encrypted at rest.

    async def delete_keys(self, kids: Sequence[str]) -> None:
        if not kids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(delete(signing_keys).where(signing_keys.c.kid.in_(list(kids))))

    # -- authorization codes --------------------------------------------------------------------

    async def insert_code(self, code: AuthorizationCode) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(authorization_codes).values(**code.values()))

    async def code(self, code_hash: str) -> AuthorizationCode | None:
        async with self.engine.connect() as conn:
            query = select(authorization_codes).where(authorization_codes.c.code_hash == code_hash)
            row = (await conn.execute(query)).first()
        return None if row is None else AuthorizationCode.from_row(row)

    async def redeem_code(self, code_hash: str, family: str, refresh: RefreshToken | None, now: datetime) -> bool:
        """Mark the code used and store the refresh token issued for it, in one transaction. False when the
        code was used already, has expired or does not exist (nothing is written then)."""
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                update(authorization_codes)
                .where(
                    authorization_codes.c.code_hash == code_hash,
                    authorization_codes.c.used_at.is_(None),
                    authorization_codes.c.expires_at > now,
                )
                .values(used_at=now, family=family)
            )
            if claimed.rowcount != 1:
                return False
            if refresh is not None:
                await conn.execute(insert(refresh_tokens).values(**refresh.values()))
        return True

    # -- refresh tokens -------------------------------------------------------------------------

    async def insert_refresh(self, token: RefreshToken) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(refresh_tokens).values(**token.values()))

    async def refresh_token(self, token_hash: str) -> RefreshToken | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash))).first()
        return None if row is None else RefreshToken.from_row(row)

    async def rotate_refresh(self, old_hash: str, new: RefreshToken, now: datetime) -> bool:
        """Retire ``old_hash`` and store ``new`` atomically. Exactly one of any number of concurrent calls for
        the same ``old_hash`` returns True; the others (and calls for a rotated, revoked or expired token)
        return False having written nothing. The claim is the first statement of the transaction, so SQLite
        takes its write lock before reading anything and never fails on a stale snapshot."""
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                update(refresh_tokens)
                .where(
                    refresh_tokens.c.token_hash == old_hash,
                    refresh_tokens.c.rotated_at.is_(None),
                    refresh_tokens.c.revoked_at.is_(None),
                    refresh_tokens.c.expires_at > now,
                )
                .values(rotated_at=now)
            )
            if claimed.rowcount != 1:
                return False
            await conn.execute(insert(refresh_tokens).values(**new.values()))
        return True

    async def revoke_family(self, family: str, now: datetime, *, reason: str = "family_revoked") -> int:
        """Revoke a refresh-token family (one sign-in). When it revokes anything, the user's access tokens issued
        until now are revoked too (:class:`AccessRevoked`, announced in the same transaction)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(refresh_tokens)
                .where(refresh_tokens.c.family == family, refresh_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            events: list[AccessRevoked] = []
            if result.rowcount:
                subs = await conn.execute(
                    select(refresh_tokens.c.user_id).where(refresh_tokens.c.family == family).distinct()
                )
                events = [self.access_revoked(sub, now, reason) for sub in subs.scalars()]
                await self._announce(conn, events, now)
        self._after_commit(events)
        return result.rowcount

    async def revoke_user_tokens(
        self, user_id: str, now: datetime, client_id: str | None = None, *, reason: str | None = None
    ) -> int:
        """Revoke every refresh token of a user (of one client when given): sign-out, account lock. With a
        ``reason`` (``"signed_out"``) the user's access tokens are revoked as well, announced in the same
        transaction, whether or not there was a refresh token."""
        where = refresh_tokens.c.user_id == user_id
        if client_id is not None:
            where = and_(where, refresh_tokens.c.client_id == client_id)
        events = [self.access_revoked(user_id, now, reason)] if reason is not None else []
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(refresh_tokens).where(where, refresh_tokens.c.revoked_at.is_(None)).values(revoked_at=now)
            )
            await self._announce(conn, events, now)
        self._after_commit(events)
        return result.rowcount

    # -- housekeeping ---------------------------------------------------------------------------

    async def purge(self, now: datetime, *, idle_actor_type: str, idle_before: datetime) -> dict[str, int]:
        """Delete what can no longer matter: expired refresh tokens and codes (a replay of one is refused as
        unknown, which is just as safe), and the stored state of ``idle_actor_type`` actors untouched since
        ``idle_before`` (login throttles whose state has decayed to the initial one, see :mod:`identity.actor`)."""
        async with self.engine.begin() as conn:
            tokens = await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.expires_at <= now))
            codes = await conn.execute(delete(authorization_codes).where(authorization_codes.c.expires_at <= now))
            # The runtime has no "forget this actor" yet: identity removes its own login actors' rows. An actor
            # still live in memory would only see a version conflict on its next write and reload.
            logins = await conn.execute(
                delete(actor_state).where(
                    actor_state.c.actor_type == idle_actor_type, actor_state.c.updated_at < idle_before
                )
            )
        return {
            "refresh_tokens": tokens.rowcount,
            "authorization_codes": codes.rowcount,
            "login_throttles": logins.rowcount,
        }
