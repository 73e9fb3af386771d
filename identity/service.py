"""The identity service, declared (:data:`SERVICE`): store, key ring, login throttle, token service and routes.

``create_app(settings)`` builds the aiohttp application from it on the shared host (:mod:`runtime.host`); the seed
(:mod:`identity.seed`) creates what a first run needs and nothing twice; the schema is
:data:`identity.repository.SCHEMA`.

``password_hasher`` (``create_app`` and ``seed``) takes a :class:`identity.passwords.Passwords` with other
argon2id parameters: tests pass a cheap one; production leaves it unset and gets the ``[auth] argon2_*`` settings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web

from config import Settings
from contracts.identity import ANNOUNCEMENTS
from identity import api, public, repository
from identity.actor import LoginActor, LoginContext, LoginPolicy, login
from identity.core import IDENTITY, Identity, KeyRingVerifier
from identity.keystore import CHECK_INTERVAL, KeyManager
from identity.oauth import TokenService
from identity.pages import CSRF_TOKENS, CsrfTokens
from identity.passwords import Passwords
from identity.repository import Repository
from identity.seed import seed
from identity.tokens import TokenIssuer
from runtime import host
from runtime.description import ActorType, Http, Resource, ServiceContext, ServiceDescription
from runtime.store import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IdentityOptions:
    """``create_app``'s overrides: ``password_hasher``, argon2id with other parameters (tests pass a cheap one)."""

    password_hasher: Passwords | None = None


def login_policy(settings: Settings) -> LoginPolicy:
    return LoginPolicy(settings.auth.lockout_after, settings.auth.lockout_seconds)


@dataclass(slots=True)
class Hashing:
    """The password hasher: the caller's (tests), or one from the ``[auth] argon2_*`` settings whose argon2
    threads are this app's, shut down with it."""

    passwords: Passwords
    owned: bool

    @classmethod
    def build(cls, ctx: ServiceContext) -> Hashing:
        given: Passwords | None = ctx.options.password_hasher
        return cls(given, False) if given is not None else cls(Passwords.from_settings(ctx.settings.auth), True)

    async def stop(self) -> None:
        if self.owned:
            self.passwords.shutdown()


HASHING: web.AppKey[Hashing] = web.AppKey("identity_hashing", Hashing)


def _identity(ctx: ServiceContext) -> Identity:
    """Store, key ring, token issuer and service. Unless the caller gave a verifier, identity verifies tokens
    against its own key ring (it replaces the HTTP-fetching one the runtime made, which has opened nothing)."""
    settings, runtime, system = ctx.settings, ctx.runtime, ctx.system
    repo = Repository(ctx.engine)
    keys = KeyManager.from_settings(repo, settings)
    if not ctx.verifier_given:
        runtime.verifier = KeyRingVerifier(
            keys,
            issuer=settings.issuer,
            audience=settings.general.audience,
            leeway=settings.auth.leeway,
            refetch_interval=settings.auth.jwks_refetch_interval,
        )
    keys.on_change = runtime.verifier.set_jwks
    keys.on_revoke = runtime.verifier.revoke_key  # this process refuses the key at once (others: the outbox)
    if runtime.relay is not None:
        keys.on_outbox = runtime.relay.notify  # the announcement leaves now, not at the next poll
    # the repository's outbox rows (revocation announcements) leave at once, like the actors' messages
    repo.wake_outbox = system.on_outbox
    passwords = ctx[HASHING].passwords
    issuer = TokenIssuer(keys.ring, settings.issuer, settings.general.audience, settings.auth.access_token_ttl)
    tokens = TokenService(
        repo=repo,
        issuer=issuer,
        verifier=runtime.verifier,
        login=functools.partial(login, system, passwords=passwords),
        settings=settings,
    )
    return Identity(settings, repo, keys, issuer, passwords, runtime.verifier, system, tokens)


async def _prepare(identity: Identity) -> None:
    await identity.keys.ensure_active()  # first run without seed: a key is made here
    await identity.passwords.warm_up()  # the dummy hash for unknown emails, before the first login


class Housekeeping:
    """The periodic job (:func:`housekeep`) as a task, from start to stop."""

    def __init__(self, identity: Identity, interval: float = CHECK_INTERVAL) -> None:
        self.identity = identity
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="identity-housekeeping")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await housekeep(self.identity)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("identity housekeeping failed; will retry", exc_info=True)


async def housekeep(identity: Identity) -> None:
    """One round of the periodic job: keys (reload, rotate when due, prune) and expired rows."""
    await identity.keys.check()
    lifetime = login_policy(identity.settings).state_lifetime
    now = utcnow()
    await identity.repo.purge(now, idle_actor_type=LoginActor.type_name, idle_before=now - timedelta(seconds=lifetime))


# ---------------------------------------------------------------------------------------------------
# The service

LOGIN: web.AppKey[LoginContext] = web.AppKey("identity_login", LoginContext)
HOUSEKEEPING: web.AppKey[Housekeeping] = web.AppKey("identity_housekeeping", Housekeeping)

SERVICE = ServiceDescription(
    "identity",
    options=IdentityOptions,
    http=Http(api.routes, title="EcomGateway identity (OAuth 2.0 / OpenID Connect)"),
    actors=(ActorType(LoginActor, deps=lambda ctx: {"context": ctx[LOGIN]}),),
    resources=(
        Resource(HASHING, Hashing.build, stop=Hashing.stop),
        Resource(IDENTITY, _identity, start=_prepare),
        Resource(
            LOGIN, lambda ctx: LoginContext(ctx[IDENTITY].repo, ctx[IDENTITY].passwords, login_policy(ctx.settings))
        ),
        Resource(CSRF_TOKENS, lambda ctx: CsrfTokens(functools.partial(ctx[IDENTITY].keys.kek.hmac_secrets, "csrf"))),
        Resource(
            HOUSEKEEPING, lambda ctx: Housekeeping(ctx[IDENTITY]), start=Housekeeping.start, stop=Housekeeping.stop
        ),
    ),
    publishes=ANNOUNCEMENTS,
    gateway_routes=public.ROUTES,
    schema=repository.SCHEMA,
    seed=seed,
)


def create_app(settings: Settings, **overrides: Any) -> web.Application:
    """The identity application (``overrides``: ``bus``, ``database_url``, ``verifier`` (default: one fed from
    identity's own key ring) and :class:`IdentityOptions`)."""
    return host.service_app(SERVICE, settings, **overrides)
