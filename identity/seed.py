"""Identity's first run: what ``ecom db upgrade`` / ``ecom run`` seed (a signing key, the ``storefront`` and
``admin-console`` clients, the admin user), each only when missing, so seeding twice (or from two processes at
once) changes nothing; and :func:`open_repository`, identity's migrated database for the seed and the CLI.

``password_hasher`` takes a :class:`identity.passwords.Passwords` with other argon2id parameters: tests pass a cheap
one; production leaves it unset and gets the ``[auth] argon2_*`` settings.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

from config import ConfigError, Settings
from identity.accounts import ADMIN_EMAIL, generate_password, register_user
from identity.keystore import KeyManager
from identity.oauth import API_SCOPE, SCOPES, STOREFRONT, build_client
from identity.passwords import Passwords
from identity.repository import SCHEMA, ClientExists, EmailTaken, Repository
from runtime import migrate
from runtime.errors import ValidationProblem
from runtime.store import create_engine, utcnow


@contextlib.asynccontextmanager
async def open_repository(settings: Settings, database_url: str | None = None) -> AsyncIterator[Repository]:
    """identity's database, migrated to the current schema (for seed and the CLI)."""
    engine = create_engine(database_url or settings.database_url("identity"))
    try:
        await migrate.upgrade(engine, [migrate.RUNTIME, SCHEMA])
        yield Repository(engine)
    finally:
        await engine.dispose()


def storefront_redirect_uris(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(redirect URIs, post-logout redirect URIs) of the storefront: the web storefront behind the gateway and
    the mobile app's private-use scheme (RFC 8252). More are added with ``ecom clients set-redirect-uris``."""
    gateway = settings.public_url
    return (f"{gateway}/callback", "com.ecomgateway.storefront:/callback"), (f"{gateway}/",)


async def seed(
    settings: Settings, database_url: str | None = None, *, password_hasher: Passwords | None = None
) -> None:
    """Create the signing key, the storefront and admin-console clients and the admin user when missing (idempotent)."""
    async with open_repository(settings, database_url) as repo:
        await KeyManager.from_settings(repo, settings).ensure_active()
        await _seed_storefront(repo, settings)
        await _seed_admin_console(repo, settings)
        await _seed_admin(repo, settings, password_hasher or Passwords.from_settings(settings.auth))


async def _seed_storefront(repo: Repository, settings: Settings) -> None:
    if await repo.client(STOREFRONT) is not None:
        return
    redirects, logouts = storefront_redirect_uris(settings)
    client, _ = build_client(
        STOREFRONT,
        name="EcomGateway storefront",
        public=True,
        audience=settings.general.audience,
        redirect_uris=redirects,
        post_logout_redirect_uris=logouts,
        grant_types=("authorization_code", "refresh_token", "password"),
        scopes=SCOPES,
    )
    with contextlib.suppress(ClientExists):  # another process seeded it just now
        await repo.create_client(client, utcnow())


ADMIN_CONSOLE = "admin-console"  # the gateway's admin page (gateway/console/): first-party, public, code + PKCE


async def _seed_admin_console(repo: Repository, settings: Settings) -> None:
    """The admin console's client: no secret (a page cannot keep one), the code flow only (no refresh token
    kept in the browser: a session ends with its access token), redirect to ``<public URL>/admin/callback``."""
    if await repo.client(ADMIN_CONSOLE) is not None:
        return
    client, _ = build_client(
        ADMIN_CONSOLE,
        name="EcomGateway admin console",
        public=True,
        audience=settings.general.audience,
        redirect_uris=(f"{settings.public_url}/admin/callback",),
        post_logout_redirect_uris=(f"{settings.public_url}/admin",),
        grant_types=("authorization_code",),
        scopes=("openid", "email", API_SCOPE),
    )
    with contextlib.suppress(ClientExists):  # another process seeded it just now
        await repo.create_client(client, utcnow())


async def _seed_admin(repo: Repository, settings: Settings, passwords: Passwords) -> None:
    if await repo.user_by_email(ADMIN_EMAIL) is not None:
        return
    password = settings.general.admin_password
    generated = not password
    if generated:
        password = generate_password()
    try:
        await register_user(
            repo, passwords, email=ADMIN_EMAIL, password=password, name="Administrator", roles=("admin",)
        )
    except ValidationProblem as exc:
        raise ConfigError(f"ECOM_ADMIN_PASSWORD: {exc.errors.get('password', exc.detail)}") from None
    except EmailTaken:
        return
    if generated:
        # stdout, not the log: shown once to whoever started the first run, never stored anywhere
        print(
            f"Created the admin user {ADMIN_EMAIL} with the generated password:\n\n    {password}\n\n"
            "It is shown only this once. Set ECOM_ADMIN_PASSWORD before the first run to choose it instead.",
            file=sys.stdout,
            flush=True,
        )
