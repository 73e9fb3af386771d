"""A real token issuer for tests of services other than identity.

It signs genuine ES256 JWTs with a generated key (identity/keys.py, identity/tokens.py) and gives services
a real :class:`runtime.auth.TokenVerifier` holding the public JWKS, so routes are tested with the same
verification code as production, without starting the identity service.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from identity.keys import KeyRing, generate_key
from identity.tokens import TokenIssuer
from runtime.auth import TokenVerifier

ISSUER = "http://127.0.0.1:8001"
AUDIENCE = "ecom"


class TestIdentity:
    __test__ = False  # not a test class, whatever its name says

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.ring = KeyRing(publish_ahead=0)
        self.ring.add(generate_key("ES256"))
        self.tokens = TokenIssuer(self.ring, issuer, audience)

    def token(
        self,
        sub: str | None = None,
        *,
        roles: Collection[str] = ("customer",),
        scopes: Collection[str] = ("openid", "ecom"),
        client_id: str = "storefront",
    ) -> str:
        token, _ = self.tokens.issue_access_token(sub or str(uuid.uuid4()), client_id, list(scopes), list(roles))
        return token

    def admin_token(self, sub: str = "admin-1") -> str:
        return self.token(sub, roles=("admin",))

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def verifier(self) -> TokenVerifier:
        v = TokenVerifier(issuer=self.issuer, audience=self.audience)
        v.set_jwks(self.ring.jwks())
        return v
