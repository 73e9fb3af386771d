"""Forged and doctored tokens are refused at a protected route of another service, which verifies with
runtime/auth against identity's real JWKS endpoint over HTTP. Control: the genuine token passes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from joserfc import jwt

from identity.keys import SigningKey, generate_key
from tests.identity.conftest import IdentityServer, Shop


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def sign(key: SigningKey, claims: dict[str, Any], **header: Any) -> str:
    return jwt.encode(
        {"alg": key.alg, "kid": key.kid, "typ": "at+jwt", **header}, claims, key.to_joserfc(), algorithms=[key.alg]
    )


def forgeries(genuine: str, key: SigningKey) -> dict[str, str]:
    header_b64, payload_b64, signature = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    now = int(time.time())
    hs_header = {"alg": "HS256", "kid": key.kid, "typ": "at+jwt"}
    hs_input = unsigned(hs_header, claims)
    public_pem = key.to_joserfc().as_pem(private=False)
    impostor = generate_key("ES256", kid=key.kid)  # same kid, another private key
    tampered = {**claims, "roles": ["admin", "customer"]}
    return {
        "alg none": unsigned({"alg": "none", "kid": key.kid, "typ": "at+jwt"}, claims) + ".",
        "HS256 keyed with the public key (PEM)": f"{hs_input}.{b64(hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest())}",
        "HS256 keyed with the public JWK": (
            f"{hs_input}.{b64(hmac.new(json.dumps(key.public_jwk()).encode(), hs_input.encode(), hashlib.sha256).digest())}"
        ),
        "wrong key, same kid": sign(impostor, claims),
        "wrong key, unknown kid": sign(generate_key("ES256"), claims),
        "wrong iss": sign(key, {**claims, "iss": "http://127.0.0.1:1"}),
        "wrong aud": sign(key, {**claims, "aud": "another-api"}),
        "expired": sign(key, {**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
        "not yet valid": sign(key, {**claims, "iat": now, "nbf": now + 3600, "exp": now + 7200}),
        "tampered payload": f"{header_b64}.{b64(json.dumps(tampered).encode())}.{signature}",
    }


async def test_forged_tokens_are_refused_by_a_real_service(idsrv: IdentityServer, shop: Shop) -> None:
    await idsrv.register("ann@example.com")
    _, tokens = await idsrv.password_grant("ann@example.com")
    genuine = tokens["access_token"]
    status, _ = await shop.me(genuine)
    assert status == 200, "control: the genuine token passes"

    key = idsrv.identity.keys.ring.active_key()
    for name, forged in forgeries(genuine, key).items():
        status, body = await shop.me(forged)
        assert status == 401, f"{name}: {status} {body}"
        assert body["type"].endswith("/invalid-token"), name
    # the refused tokens did not poison the verifier: the genuine one still passes
    assert (await shop.me(genuine))[0] == 200


async def test_forged_tokens_are_refused_by_identity_itself(idsrv: IdentityServer) -> None:
    """userinfo and introspection use identity's in-process verifier: the same forgeries fail there."""
    await idsrv.register("bob@example.com")
    _, tokens = await idsrv.password_grant("bob@example.com")
    key = idsrv.identity.keys.ring.active_key()
    for name, forged in forgeries(tokens["access_token"], key).items():
        resp = await idsrv.client.get("/connect/userinfo", headers={"Authorization": f"Bearer {forged}"})
        assert resp.status == 401, name
