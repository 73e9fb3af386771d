"""What one identity service instance is made of, shared by its routes (:mod:`identity.api`) and its wiring
(:mod:`identity.service`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from config import Settings
from identity.actor import login
from identity.keystore import KeyManager
from identity.messages import LoginOutcome
from identity.oauth import SCOPES, TokenService
from identity.passwords import Passwords
from identity.repository import Repository
from identity.tokens import TokenIssuer
from runtime.actors import ActorSystem
from runtime.auth import TokenVerifier

log = logging.getLogger(__name__)


class KeyRingVerifier(TokenVerifier):
    """Identity's verifier of its own tokens (userinfo, introspection, admin endpoints).

    Its keys are pushed from the key ring (:meth:`set_jwks` after every key load). Where a service's verifier
    would fetch the JWKS over HTTP — a token with an unknown ``kid``, rate-limited like that fetch — this one
    reloads the ring from the database instead: identity never calls itself over HTTP.
    """

    def __init__(self, keys: KeyManager, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_manager = keys
        self._reloading: set[asyncio.Task[None]] = set()

    async def _fetch(self) -> None:  # the one key-source hook of TokenVerifier (see the report on runtime/auth)
        self._last_fetch_attempt = self._clock()
        await self._key_manager.load()  # calls set_jwks through KeyManager.on_change

    def revoke_key(self, kid: str) -> int:
        """A revocation announced on the bus (``ecom keys revoke`` in another process, or another identity
        instance): stop trusting the key here and reload the ring at once, so this process stops *signing* with
        it too instead of waiting for the periodic reload."""
        dropped = super().revoke_key(kid)
        if self._key_manager.ring.get(kid) is not None and not self._reloading:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return dropped
            task = loop.create_task(self._reload(), name="identity-key-reload")
            self._reloading.add(task)
            task.add_done_callback(self._reloading.discard)
        return dropped

    async def _reload(self) -> None:
        try:
            await self._key_manager.load()
        except Exception:
            log.warning("reloading the signing keys after a revocation failed; the periodic job retries", exc_info=True)


@dataclass(slots=True)
class Identity:
    settings: Settings
    repo: Repository
    keys: KeyManager
    issuer: TokenIssuer
    passwords: Passwords
    verifier: TokenVerifier
    system: ActorSystem
    tokens: TokenService

    async def login(self, email: str, password: str) -> LoginOutcome:
        return await login(self.system, email, password, self.passwords)

    def discovery(self) -> Mapping[str, Any]:
        base = self.settings.issuer.rstrip("/")
        return {
            "issuer": self.settings.issuer,
            "authorization_endpoint": f"{base}/connect/authorize",
            "token_endpoint": f"{base}/connect/token",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "userinfo_endpoint": f"{base}/connect/userinfo",
            "revocation_endpoint": f"{base}/connect/revocation",
            "introspection_endpoint": f"{base}/connect/introspect",
            "end_session_endpoint": f"{base}/connect/endsession",
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(self.tokens.grant_types),
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.settings.auth.signing_alg],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "email",
                "email_verified",
                "name",
                "roles",
            ],
            "authorization_response_iss_parameter_supported": True,
        }


IDENTITY: web.AppKey[Identity] = web.AppKey("identity", Identity)
