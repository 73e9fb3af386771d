"""OAuth 2.0 / OpenID Connect protocol logic: client authentication, scopes, PKCE, the authorization request,
the four grants, revocation and introspection. HTTP routing and pages are in :mod:`identity.api`.

Errors of the token, revocation and introspection endpoints are :class:`OAuthError` (RFC 6749 §5.2:
``{"error", "error_description"}``, 400 or 401, ``Cache-Control: no-store``); errors of the authorization
endpoint either go back to the client's redirect URI (:class:`AuthorizeRedirect`) or, when the client or
redirect URI cannot be trusted, are a problem+json 400 shown to the user (RFC 6749 §4.1.2.1).

Grants (all of them answer with ``Cache-Control: no-store``):

- ``authorization_code`` + PKCE S256 (browser and mobile storefronts). The code is single-use, lives
  :data:`CODE_TTL` seconds and is bound to the client, the exact redirect URI and the PKCE challenge. A code
  presented twice revokes the refresh tokens issued from it (RFC 6749 §4.1.2).
- ``password``: only the first-party client :data:`STOREFRONT`, and only while ``settings.auth.password_grant``.
- ``client_credentials``: confidential clients; ``sub`` = ``client_id``, roles from the client record.
- ``refresh_token``: rotated on every use. A rotated token presented again — or two concurrent uses of one
  token, of which the database lets exactly one win — revokes its whole family.

A refresh token is issued when the granted scope includes ``offline_access``; an ID token when it includes
``openid``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, cast
from urllib.parse import unquote_plus, urlencode, urlsplit

import orjson
from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, KeySetSerialization
from multidict import MultiMapping

from config import Settings
from identity.accounts import normalize_email
from identity.messages import LoginOutcome
from identity.repository import (
    FIRST_PARTY_CLIENTS,
    AuthorizationCode,
    Client,
    RefreshToken,
    Repository,
    User,
)
from identity.tokens import TokenIssuer, hash_token, new_opaque_token, token_matches
from runtime.auth import InvalidToken, TokenVerifier
from runtime.errors import BadRequest
from runtime.revocation import AccessRevoked

log = logging.getLogger(__name__)

STOREFRONT = "storefront"  # the first-party public client (browser and mobile storefronts, scripts)
USER_SCOPES = ("openid", "profile", "email", "offline_access")
API_SCOPE = "ecom"
SCOPES = (*USER_SCOPES, API_SCOPE)
GRANT_TYPES = ("authorization_code", "refresh_token", "password", "client_credentials")
CODE_TTL = 120.0  # seconds; the exchange follows the redirect at once
MAX_STATE_LENGTH = 1024
MAX_NONCE_LENGTH = 512

_PKCE_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")  # RFC 7636 §4.1
_PKCE_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")  # base64url of a SHA-256 digest, unpadded
_FORM = "application/x-www-form-urlencoded"

LoginFn = Callable[[str, str], Awaitable[LoginOutcome]]

# ---------------------------------------------------------------------------------------------------
# Errors


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, *, status: int = 400, headers: Mapping[str, str] | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return oauth_json(body, status=self.status, headers=self.headers)


def invalid_client(description: str = "Client authentication failed: unknown client or wrong secret.") -> OAuthError:
    return OAuthError("invalid_client", description, status=401, headers={"WWW-Authenticate": 'Basic realm="ecom"'})


NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def oauth_json(body: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response that no cache keeps (tokens and token errors, RFC 6749 §5.1)."""
    all_headers = {**NO_STORE, **(headers or {})}
    return web.Response(body=orjson.dumps(body), status=status, headers=all_headers, content_type="application/json")


class AuthorizeRedirect(Exception):
    """An authorization error sent back to the (validated) redirect URI of the client."""

    def __init__(self, error: str, description: str, redirect_uri: str, state: str | None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.redirect_uri = redirect_uri
        self.state = state

    def location(self, issuer: str) -> str:
        params = {"error": self.error, "error_description": self.description, "state": self.state, "iss": issuer}
        return redirect_location(self.redirect_uri, params)


def redirect_location(redirect_uri: str, params: Mapping[str, str | None]) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{query}"


# ---------------------------------------------------------------------------------------------------
# Request parsing, client authentication, scopes, PKCE


async def read_form(request: web.Request) -> dict[str, str]:
    """The form parameters of an OAuth request; invalid_request if not form-encoded or a parameter repeats."""
    if request.content_type != _FORM:
        raise OAuthError("invalid_request", f"Send the parameters form-encoded ({_FORM}).")
    form = await request.post()
    return single_values(form, lambda name: OAuthError("invalid_request", f"The parameter {name} is repeated."))


def single_values(params: MultiMapping[Any], error: Callable[[str], Exception]) -> dict[str, str]:
    """Parameters as a dict; RFC 6749 §3.1: a parameter must not be sent more than once."""
    out: dict[str, str] = {}
    for name in params:
        values = params.getall(name)
        if len(values) > 1:
            raise error(name)
        value = values[0]
        if not isinstance(value, str):
            raise error(name)
        out[name] = value
    return out


def required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "")
    if not value:
        raise OAuthError("invalid_request", f"The parameter {name} is required.")
    return value


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None  # e.g. the bearer token of a signed-in app calling revocation: not client credentials
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("The Basic credentials are malformed.") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise invalid_client("The Basic credentials are malformed.")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding
    return unquote_plus(client_id), unquote_plus(secret)


async def authenticate_client(
    request: web.Request, form: Mapping[str, str], repo: Repository, *, confidential_only: bool = False
) -> Client:
    """The client making the request: a confidential one proves its secret (Basic or form), a public one
    names itself with ``client_id``. Failures are 401 invalid_client without saying which part was wrong."""
    basic = _basic_credentials(request)
    if basic is not None and "client_secret" in form:
        raise OAuthError("invalid_request", "Use one client authentication method, not two.")
    if basic is not None and form.get("client_id") not in (None, basic[0]):
        raise OAuthError("invalid_request", "client_id differs from the authenticated client.")
    client_id, secret = basic if basic is not None else (form.get("client_id", ""), form.get("client_secret"))
    if not client_id:
        raise invalid_client("Identify the client: client_id (public clients) or client credentials.")
    client = await repo.client(client_id)
    if client is None:
        raise invalid_client()
    if client.is_public:
        if secret:
            raise invalid_client()
        if confidential_only:
            raise invalid_client("This endpoint is for confidential clients.")
        return client
    if not secret or not token_matches(secret, client.secret_hash or ""):
        raise invalid_client()
    return client


def parse_scope(raw: str | None, allowed: tuple[str, ...], *, user: bool = True) -> tuple[str, ...]:
    """The requested scopes (sorted); all the ``allowed`` ones when none is asked for. invalid_scope when a
    scope is unknown, not allowed to the client, or (for a client acting for itself) about a user."""
    if raw is None or not raw.strip():
        scopes = {s for s in allowed if user or s not in USER_SCOPES}
    else:
        scopes = set(raw.split())
    for scope in sorted(scopes):
        if scope not in SCOPES:
            raise OAuthError("invalid_scope", f"Unknown scope {scope!r}; scopes are: {' '.join(SCOPES)}.")
        if scope not in allowed:
            raise OAuthError("invalid_scope", f"This client may not ask for the scope {scope!r}.")
        if not user and scope in USER_SCOPES:
            raise OAuthError("invalid_scope", f"The scope {scope!r} is about a user; client_credentials has none.")
    if not scopes:
        raise OAuthError("invalid_scope", "The client is allowed no scope.")
    return tuple(sorted(scopes))


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def pkce_matches(verifier: str, challenge: str) -> bool:
    return bool(_PKCE_VERIFIER.match(verifier)) and hmac.compare_digest(s256(verifier), challenge)


def check_redirect_uri(uri: str) -> str | None:
    """None if ``uri`` may be registered, else why not: https anywhere, http only on the loopback interface,
    or a private-use scheme in reverse-domain form (RFC 8252 §7.1); never a fragment."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "not a URI"
    if parts.fragment or "#" in uri:
        return "a redirect URI must not have a fragment"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return None
    if parts.scheme and "." in parts.scheme and parts.scheme not in ("http", "https") and parts.path:
        return None
    return "use https, http on 127.0.0.1/localhost, or a reverse-domain private scheme (com.example.app:/callback)"


_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def build_client(
    client_id: str,
    *,
    name: str | None = None,
    public: bool,
    audience: str,
    redirect_uris: tuple[str, ...] = (),
    post_logout_redirect_uris: tuple[str, ...] = (),
    grant_types: tuple[str, ...] | None = None,
    scopes: tuple[str, ...] | None = None,
    roles: tuple[str, ...] = (),
    roles_allowed: bool | None = None,
) -> tuple[Client, str | None]:
    """A checked client record and, for a confidential client, its generated secret (shown once; only its
    SHA-256 is stored: 256 random bits need no slow hash, and client_credentials stays fast).

    ``scopes``: what the client may ask for (default: every scope for a public client, ``ecom`` for a
    confidential one). ``roles_allowed``: whether its tokens carry the signed-in user's roles; default true for
    the first-party clients (:data:`identity.repository.FIRST_PARTY_CLIENTS`) only — a third-party client gets
    roles only when an admin registers it so. ValueError says what is wrong."""
    if not _CLIENT_ID.match(client_id):
        raise ValueError("client_id: 1-64 letters, digits, '.', '_' or '-'")
    if client_id == audience:
        raise ValueError(f"client_id cannot be the API audience {audience!r} (ID tokens would pass as access tokens)")
    if grant_types is None:
        grant_types = ("authorization_code", "refresh_token") if public else ("client_credentials",)
    unknown = set(grant_types) - set(GRANT_TYPES)
    if unknown:
        raise ValueError(f"unknown grant type {min(unknown)!r}")
    if "password" in grant_types and client_id != STOREFRONT:
        raise ValueError(f"only the first-party client {STOREFRONT!r} may use the password grant")
    if public and "client_credentials" in grant_types:
        raise ValueError("a public client has no secret, so it cannot use client_credentials")
    if "authorization_code" in grant_types and not redirect_uris:
        raise ValueError("the authorization_code grant needs at least one redirect URI")
    for uri in (*redirect_uris, *post_logout_redirect_uris):
        problem = check_redirect_uri(uri)
        if problem is not None:
            raise ValueError(f"redirect URI {uri!r}: {problem}")
    if scopes is None:
        scopes = SCOPES if public else (API_SCOPE,)
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope {min(unknown)!r}; scopes are {' '.join(SCOPES)}")
    secret, secret_hash = (None, None) if public else new_opaque_token()
    client = Client(
        client_id=client_id,
        name=name or client_id,
        secret_hash=secret_hash,
        redirect_uris=tuple(redirect_uris),
        post_logout_redirect_uris=tuple(post_logout_redirect_uris),
        grant_types=tuple(grant_types),
        scopes=tuple(sorted(set(scopes))),
        roles=tuple(sorted(set(roles))),
        roles_allowed=client_id in FIRST_PARTY_CLIENTS if roles_allowed is None else bool(roles_allowed),
    )
    return client, secret


def login_failure(outcome: LoginOutcome) -> str:
    """The one message for every failed sign-in: it reads the same for an unknown email, a wrong password and
    a locked account, so it tells nobody which emails have accounts."""
    if outcome.locked_for > 0:
        return f"Too many failed sign-in attempts for this email; try again in {math.ceil(outcome.locked_for)} seconds."
    return "The email or password is wrong."


def claims_for_scopes(user: User, scopes: tuple[str, ...] | frozenset[str]) -> dict[str, Any]:
    """Profile claims a client may see with these scopes (ID token and userinfo)."""
    claims: dict[str, Any] = {}
    if "email" in scopes:
        claims.update(email=user.email, email_verified=False)  # no confirmation mail is sent (yet)
    if "profile" in scopes:
        claims["name"] = user.name
    return claims


def decode_id_token_hint(token: str, jwks: Mapping[str, Any], issuer: str) -> dict[str, Any] | None:
    """The claims of an ID token this server signed with a key still published, else None. Expiry is not
    checked: an end-session request may well come after the ID token expired (OIDC RP-Initiated Logout §2)."""
    algorithms = sorted({k["alg"] for k in jwks.get("keys", []) if isinstance(k.get("alg"), str)})
    if not algorithms or len(token) > 8192:
        return None
    try:
        # the document's shape is joserfc's to check: a malformed one raises, caught below
        keys = KeySet.import_key_set(cast(KeySetSerialization, dict(jwks)))
        decoded = jwt.decode(token, keys, algorithms=algorithms)
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    claims = decoded.claims
    if decoded.header.get("typ") == "at+jwt" or claims.get("iss") != issuer:
        return None
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("aud"), str):
        return None
    return dict(claims)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# ---------------------------------------------------------------------------------------------------
# The authorization request (GET and POST /connect/authorize)


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    client: Client
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    code_challenge: str
    nonce: str | None

    def fields(self) -> dict[str, str]:
        """The request as hidden form fields, so the login form posts it back unchanged (and it is re-checked)."""
        out = {
            "response_type": "code",
            "client_id": self.client.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
            "code_challenge": self.code_challenge,
            "code_challenge_method": "S256",
        }
        if self.state is not None:
            out["state"] = self.state
        if self.nonce is not None:
            out["nonce"] = self.nonce
        return out


async def parse_authorization_request(params: MultiMapping[Any], repo: Repository) -> AuthorizationRequest:
    """Validate an authorization request. Until the client and its redirect URI are known to match, errors are
    :class:`runtime.errors.BadRequest` (shown to the user: never redirect to an unverified URI); after that they
    are :class:`AuthorizeRedirect` back to the client."""
    for name in ("client_id", "redirect_uri"):
        if len(params.getall(name, [])) > 1:
            raise BadRequest(f"The parameter {name} is repeated.", slug="invalid-authorization-request")
    client_id = params.get("client_id", "")
    client = await repo.client(client_id) if client_id else None
    if client is None:
        raise BadRequest("The sign-in link names no known client (client_id).", slug="invalid-authorization-request")
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:  # exact string match, RFC 9700 §4.1.3
        raise BadRequest(
            "The sign-in link's redirect_uri is not registered for this client.", slug="invalid-authorization-request"
        )
    state = params.get("state")

    def fail(error: str, description: str) -> AuthorizeRedirect:
        return AuthorizeRedirect(error, description, redirect_uri, state if isinstance(state, str) else None)

    p = single_values(params, lambda name: fail("invalid_request", f"The parameter {name} is repeated."))
    if state is not None and len(state) > MAX_STATE_LENGTH:
        raise AuthorizeRedirect("invalid_request", "state is too long.", redirect_uri, None)
    if p.get("response_type") != "code":
        raise fail("unsupported_response_type", "Only response_type=code is supported.")
    if "authorization_code" not in client.grant_types:
        raise fail("unauthorized_client", "This client may not use the authorization code flow.")
    challenge = p.get("code_challenge", "")
    if not challenge:
        raise fail("invalid_request", "PKCE is required: send code_challenge and code_challenge_method=S256.")
    if p.get("code_challenge_method") != "S256":
        raise fail("invalid_request", "code_challenge_method must be S256.")
    if not _PKCE_CHALLENGE.match(challenge):
        raise fail("invalid_request", "code_challenge must be the base64url SHA-256 of the verifier (43 characters).")
    nonce = p.get("nonce")
    if nonce is not None and len(nonce) > MAX_NONCE_LENGTH:
        raise fail("invalid_request", "nonce is too long.")
    if p.get("prompt") == "none":
        raise fail("login_required", "The user must sign in; this server keeps no sign-in session.")
    try:
        scopes = parse_scope(p.get("scope"), client.scopes)
    except OAuthError as exc:
        raise fail(exc.error, exc.description) from None
    return AuthorizationRequest(client, redirect_uri, scopes, p.get("state"), challenge, nonce)


# ---------------------------------------------------------------------------------------------------
# Grants, revocation, introspection


_BAD_CODE = "The authorization code is invalid, expired or already used."
_BAD_REFRESH = "The refresh token is invalid, expired or revoked."


class TokenService:
    """Issues, rotates, revokes and describes tokens."""

    def __init__(
        self,
        *,
        repo: Repository,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        login: LoginFn,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.issuer = issuer
        self.verifier = verifier
        self.login = login
        self.settings = settings
        self.clock = clock
        # Revocations (sign-out, lock, revoked family) are announced by the repository in the transaction of
        # the change; identity's own verifier applies them here at once (other processes hear them on the bus).
        repo.revocation_ttl = settings.auth.access_token_ttl + settings.auth.leeway
        repo.on_revoked.append(self.apply_revocation)
        self._revoked_at: dict[str, tuple[float, float]] = {}  # sub -> (not_before, until), this process's

    def apply_revocation(self, event: AccessRevoked) -> None:
        """Refuse ``event.sub``'s tokens issued before ``event.not_before`` in identity's own verifier, and make
        sure tokens issued from now on are not caught by it (see :meth:`_not_before`)."""
        not_before, until = event.not_before.timestamp(), event.until.timestamp()
        now = self.clock()
        self._revoked_at = {s: v for s, v in self._revoked_at.items() if v[1] > now}
        self._revoked_at[event.sub] = (not_before, until)
        deny = getattr(self.verifier, "deny_subject", None)
        if deny is not None:
            deny(event.sub, not_before, until)

    def _not_before(self, sub: str) -> float | None:
        """A revocation announced in the current second would refuse a token issued in the same second (``iat``
        has whole seconds): the new token's ``iat`` is the next second then."""
        entry = self._revoked_at.get(sub)
        return entry[0] if entry is not None and entry[1] > self.clock() else None

    @property
    def grant_types(self) -> tuple[str, ...]:
        return tuple(g for g in GRANT_TYPES if g != "password" or self.settings.auth.password_grant)

    # -- the authorization code -----------------------------------------------------------------

    async def issue_code(self, areq: AuthorizationRequest, user: User) -> str:
        code, code_hash = new_opaque_token()
        now = self.clock()
        await self.repo.insert_code(
            AuthorizationCode(
                code_hash=code_hash,
                client_id=areq.client.client_id,
                user_id=user.id,
                redirect_uri=areq.redirect_uri,
                scope=" ".join(areq.scopes),
                code_challenge=areq.code_challenge,
                nonce=areq.nonce,
                auth_time=_dt(now),
                expires_at=_dt(now + CODE_TTL),
            )
        )
        return code

    # -- the token endpoint ---------------------------------------------------------------------

    async def token(self, request: web.Request) -> dict[str, Any]:
        form = await read_form(request)
        grant = required(form, "grant_type")
        if grant not in self.grant_types:
            hint = " (the password grant is switched off here)" if grant == "password" else ""
            raise OAuthError("unsupported_grant_type", f"Unsupported grant_type {grant[:40]!r}{hint}.")
        client = await authenticate_client(request, form, self.repo)
        if grant not in client.grant_types or (grant == "password" and client.client_id != STOREFRONT):
            raise OAuthError("unauthorized_client", f"This client may not use the {grant} grant.")
        handler = {
            "authorization_code": self._authorization_code,
            "password": self._password,
            "client_credentials": self._client_credentials,
            "refresh_token": self._refresh_token,
        }[grant]
        return await handler(form, client)

    async def _authorization_code(self, form: Mapping[str, str], client: Client) -> dict[str, Any]:
        code, redirect_uri, verifier = (required(form, n) for n in ("code", "redirect_uri", "code_verifier"))
        record = await self.repo.code(hash_token(code))
        now = self.clock()
        if record is None or record.client_id != client.client_id:
            raise OAuthError("invalid_grant", _BAD_CODE)
        if record.used_at is not None:
            await self._code_replayed(record)
        if record.expires_at.timestamp() <= now:
            raise OAuthError("invalid_grant", _BAD_CODE)
        if record.redirect_uri != redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the one of the authorization request.")
        if not pkce_matches(verifier, record.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge.")
        user = await self._active_user(record.user_id, _BAD_CODE)
        scopes = tuple(record.scope.split())
        family = str(uuid.uuid4())
        refresh, row = self._new_refresh(user, client, scopes, family, auth_time=record.auth_time, now=now)
        if not await self.repo.redeem_code(record.code_hash, family, row, _dt(now)):
            # a concurrent exchange of the same code won: this one is the replay
            await self._code_replayed(await self.repo.code(record.code_hash) or record)
        return self._user_tokens(user, client, scopes, refresh, auth_time=record.auth_time, nonce=record.nonce)

    async def _code_replayed(self, record: AuthorizationCode) -> NoReturn:
        if record.family is not None:
            revoked = await self.repo.revoke_family(record.family, _dt(self.clock()), reason="code_replayed")
            log.warning("code replayed (client %s): %d refresh token(s) revoked", record.client_id, revoked)
        raise OAuthError("invalid_grant", _BAD_CODE)

    async def _password(self, form: Mapping[str, str], client: Client) -> dict[str, Any]:
        username, password = required(form, "username"), required(form, "password")
        scopes = parse_scope(form.get("scope"), client.scopes)
        outcome = await self.login(normalize_email(username), password)
        if outcome.user is None:
            raise OAuthError("invalid_grant", login_failure(outcome))
        now = self.clock()
        refresh, row = self._new_refresh(outcome.user, client, scopes, str(uuid.uuid4()), auth_time=_dt(now), now=now)
        if row is not None:
            await self.repo.insert_refresh(row)
        return self._user_tokens(outcome.user, client, scopes, refresh, auth_time=_dt(now))

    async def _client_credentials(self, form: Mapping[str, str], client: Client) -> dict[str, Any]:
        scopes = parse_scope(form.get("scope"), client.scopes, user=False)
        access, expires_in = self.issuer.issue_access_token(client.client_id, client.client_id, scopes, client.roles)
        return {"access_token": access, "token_type": "Bearer", "expires_in": expires_in, "scope": " ".join(scopes)}

    async def _refresh_token(self, form: Mapping[str, str], client: Client) -> dict[str, Any]:
        record = await self.repo.refresh_token(hash_token(required(form, "refresh_token")))
        now = self.clock()
        if record is None or record.client_id != client.client_id or record.revoked_at is not None:
            raise OAuthError("invalid_grant", _BAD_REFRESH)
        if record.rotated_at is not None:
            await self._refresh_replayed(record, "presented again after rotation")
        if record.expires_at.timestamp() <= now:
            raise OAuthError("invalid_grant", _BAD_REFRESH)
        granted = tuple(record.scope.split())
        scopes = parse_scope(form.get("scope"), granted) if form.get("scope") else granted
        user = await self._active_user(record.user_id, _BAD_REFRESH, family=record.family)
        # The new token keeps the scope of the grant (RFC 6749 §6), even when this access token asks for less.
        refresh, row = self._new_refresh(user, client, granted, record.family, auth_time=record.auth_time, now=now)
        if row is None:  # the grant had offline_access (there is a refresh token); only a client change gets here
            raise OAuthError("invalid_grant", _BAD_REFRESH)
        if not await self.repo.rotate_refresh(record.token_hash, row, _dt(now)):
            await self._refresh_replayed(record, "used twice at the same time")
        return self._user_tokens(user, client, scopes, refresh, auth_time=record.auth_time)

    async def _refresh_replayed(self, record: RefreshToken, how: str) -> NoReturn:
        """Reuse of a rotated token means two parties hold it: one is a thief. Nobody can tell which, so the
        whole family (the sign-in it came from) is revoked and the user signs in again."""
        revoked = await self.repo.revoke_family(record.family, _dt(self.clock()), reason="refresh_token_replayed")
        log.warning(
            "refresh token %s: family %s of user %s revoked (%d tokens)", how, record.family, record.user_id, revoked
        )
        raise OAuthError("invalid_grant", _BAD_REFRESH)

    async def _active_user(self, user_id: str, message: str, *, family: str | None = None) -> User:
        user = await self.repo.user_by_id(user_id)
        if user is None or user.disabled:
            if family is not None:
                await self.repo.revoke_family(family, _dt(self.clock()), reason="locked")
            raise OAuthError("invalid_grant", message)
        return user

    def _new_refresh(
        self, user: User, client: Client, scopes: tuple[str, ...], family: str, *, auth_time: datetime, now: float
    ) -> tuple[str | None, RefreshToken | None]:
        if "offline_access" not in scopes or "refresh_token" not in client.grant_types:
            return None, None
        token, token_hash = new_opaque_token()
        row = RefreshToken(
            token_hash=token_hash,
            family=family,
            user_id=user.id,
            client_id=client.client_id,
            scope=" ".join(scopes),
            auth_time=auth_time,
            created_at=_dt(now),
            expires_at=_dt(now) + timedelta(seconds=self.settings.auth.refresh_token_ttl),
        )
        return token, row

    def _user_tokens(
        self,
        user: User,
        client: Client,
        scopes: tuple[str, ...],
        refresh: str | None,
        *,
        auth_time: datetime,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        # The user's roles go only to clients allowed to carry them: a third-party app signed in as an admin
        # must not hold an admin token.
        roles = user.roles if client.roles_allowed else ()
        access, expires_in = self.issuer.issue_access_token(
            user.id, client.client_id, scopes, roles, not_before=self._not_before(user.id)
        )
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "scope": " ".join(scopes),
        }
        if refresh is not None:
            body["refresh_token"] = refresh
        if user.password_change_required:
            # the password was right but fails today's policy: the app should ask for a new one now
            body["password_change_required"] = True
        if "openid" in scopes:
            body["id_token"] = self.issuer.issue_id_token(
                user.id,
                client.client_id,
                auth_time=auth_time.timestamp(),
                nonce=nonce,
                extra=claims_for_scopes(user, scopes),
            )
        return body

    # -- revocation (RFC 7009) and introspection (RFC 7662) -------------------------------------

    async def revoke(self, request: web.Request) -> None:
        """Revoke a refresh token (with its family: the whole grant, RFC 7009 §2.1). Unknown tokens, access
        tokens (self-contained JWTs, they expire on their own) and tokens of other clients are accepted
        silently: the answer never tells whether a token was valid."""
        form = await read_form(request)
        client = await authenticate_client(request, form, self.repo)
        record = await self.repo.refresh_token(hash_token(required(form, "token")))
        if record is not None and record.client_id == client.client_id:
            await self.repo.revoke_family(record.family, _dt(self.clock()), reason="signed_out")

    async def introspect(self, request: web.Request) -> dict[str, Any]:
        form = await read_form(request)
        client = await authenticate_client(request, form, self.repo, confidential_only=True)
        token = required(form, "token")
        lookups = [self._describe_access, self._describe_refresh]
        if form.get("token_type_hint") == "refresh_token":
            lookups.reverse()
        for lookup in lookups:
            described = await lookup(token, client)
            if described is not None:
                return described
        return {"active": False}

    async def _describe_access(self, token: str, _client: Client) -> dict[str, Any] | None:
        try:
            p = await self.verifier.verify(token)
        except InvalidToken:
            return None
        claims = {k: p.claims[k] for k in ("iss", "aud", "exp", "iat", "nbf", "jti") if k in p.claims}
        return {
            "active": True,
            "token_type": "access_token",
            "sub": p.sub,
            "client_id": p.client_id,
            "scope": " ".join(sorted(p.scopes)),
            "roles": sorted(p.roles),
            **claims,
        }

    async def _describe_refresh(self, token: str, client: Client) -> dict[str, Any] | None:
        record = await self.repo.refresh_token(hash_token(token))
        if (
            record is None
            or record.client_id != client.client_id  # a client learns about its own refresh tokens only
            or record.rotated_at is not None
            or record.revoked_at is not None
            or record.expires_at.timestamp() <= self.clock()
        ):
            return None
        return {
            "active": True,
            "token_type": "refresh_token",
            "sub": record.user_id,
            "client_id": record.client_id,
            "scope": record.scope,
            "iat": int(record.created_at.timestamp()),
            "exp": int(record.expires_at.timestamp()),
        }
