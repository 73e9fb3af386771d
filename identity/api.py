"""Identity's HTTP routes.

    GET  /.well-known/openid-configuration   discovery
    GET  /.well-known/jwks.json              public signing keys (pending, active and retired-but-alive)
    GET  /connect/authorize                  authorization request -> sign-in page (CSRF-protected form)
    POST /connect/authorize                  sign-in form -> redirect to the client with a code
    POST /connect/token                      token endpoint (form-encoded, RFC 6749)
    POST /connect/revocation                 revoke a refresh token (RFC 7009)
    POST /connect/introspect                 describe a token, confidential clients only (RFC 7662)
    GET|POST /connect/userinfo               claims of the token's user (OIDC)
    GET  /connect/endsession                 sign out: revoke the user's refresh tokens for the client
    POST /api/identity/users                 register a customer (202 whether or not the email is taken)
    PUT  /api/identity/users/me/password     change one's password (clears password_change_required)
    GET  /api/identity/users                 list accounts (admin)

The three form-encoded OAuth endpoints answer errors in RFC 6749 form (``{"error", "error_description"}``);
every other error is problem+json from the shared host. Every token-bearing answer has ``Cache-Control: no-store``.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp_apispec import docs, request_schema, response_schema
from marshmallow import Schema, fields, validate
from multidict import MultiDict

from identity.accounts import change_password, normalize_email, register_customer
from identity.core import IDENTITY, Identity
from identity.oauth import (
    NO_STORE,
    AuthorizationRequest,
    AuthorizeRedirect,
    OAuthError,
    claims_for_scopes,
    decode_id_token_hint,
    login_failure,
    oauth_json,
    parse_authorization_request,
    redirect_location,
    single_values,
)
from identity.pages import (
    check_csrf,
    clear_csrf_cookie,
    csrf_token_for,
    html_response,
    login_page,
    set_csrf_cookie,
    signed_out_page,
)
from runtime.auth import (
    InvalidToken,
    authenticate,
    check_access,
    optional_principal,
    require,
)
from runtime.errors import BadRequest, Problem, TooManyRequests, ValidationProblem
from runtime.host import json_response, problem_response
from runtime.store import utcnow

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _identity(request: web.Request) -> Identity:
    return request.app[IDENTITY]


def redirect(location: str, *, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location, **NO_STORE})


def _repeated(name: str) -> BadRequest:
    return BadRequest(f"The parameter {name} is repeated.")


# ---------------------------------------------------------------------------------------------------
# Discovery


@routes.get("/.well-known/openid-configuration")
@docs(tags=["oidc"], summary="OpenID Connect discovery document")
async def discovery(request: web.Request) -> web.Response:
    return json_response(_identity(request).discovery(), headers={"Cache-Control": "public, max-age=300"})


@routes.get("/.well-known/jwks.json")
@docs(tags=["oidc"], summary="Public signing keys (JWKS)")
async def jwks(request: web.Request) -> web.Response:
    # Short max-age: a key revoked here should leave caches soon; verifiers refetch on unknown kids anyway.
    return json_response(_identity(request).keys.jwks(), headers={"Cache-Control": "public, max-age=60"})


# ---------------------------------------------------------------------------------------------------
# Authorization endpoint and sign-in page


def _login_form(
    request: web.Request, areq: AuthorizationRequest, *, email: str = "", error: str | None = None
) -> web.Response:
    token = csrf_token_for(request)
    page = login_page(client_name=areq.client.name, fields=areq.fields(), csrf_token=token, email=email, error=error)
    response = html_response(page)
    set_csrf_cookie(response, token, secure=_identity(request).settings.issuer.startswith("https://"))
    return response


@routes.get("/connect/authorize")
@docs(tags=["oidc"], summary="Authorization request (code + PKCE S256): shows the sign-in page")
async def authorize(request: web.Request) -> web.Response:
    identity = _identity(request)
    try:
        areq = await parse_authorization_request(request.query, identity.repo)
    except AuthorizeRedirect as back:
        return redirect(back.location(identity.settings.issuer), status=302)
    return _login_form(request, areq)


@routes.post("/connect/authorize")
@docs(tags=["oidc"], summary="Sign-in form post: redirects to the client with an authorization code")
async def authorize_post(request: web.Request) -> web.Response:
    identity = _identity(request)
    issuer = identity.settings.issuer
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("The sign-in form must be posted form-encoded.")
    form = single_values(await request.post(), _repeated)
    check_csrf(request, form, issuer)
    try:
        areq = await parse_authorization_request(MultiDict(form), identity.repo)
    except AuthorizeRedirect as back:
        return redirect(back.location(issuer))
    email, password = normalize_email(form.get("email", "")), form.get("password", "")
    if not email or not password:
        return _login_form(request, areq, email=email, error="Enter your email and password.")
    outcome = await identity.login(email, password)
    if outcome.user is None:
        return _login_form(request, areq, email=email, error=login_failure(outcome))
    code = await identity.tokens.issue_code(areq, outcome.user)
    return redirect(redirect_location(areq.redirect_uri, {"code": code, "state": areq.state, "iss": issuer}))


# ---------------------------------------------------------------------------------------------------
# Token, revocation, introspection: OAuth error format


def oauth_endpoint(handler: Handler) -> Handler:
    """OAuthError -> RFC 6749 error JSON; any other problem keeps problem+json but is never cached either."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OAuthError as exc:
            return exc.response()
        except Problem as problem:
            response = problem_response(problem, request)
            response.headers.update(NO_STORE)
            return response

    return wrapper


def _form(name: str, description: str, *, required: bool = False, **schema: Any) -> dict[str, Any]:
    """One documented field of a form-encoded OAuth endpoint (documentation only: the handlers read the form)."""
    return {
        "in": "formData",
        "name": name,
        "type": "string",
        "required": required,
        "description": description,
        **schema,
    }


# Client authentication of the token, revocation and introspection endpoints.
CLIENT_AUTH_FORM = (
    _form("client_id", "The client (or HTTP Basic authentication instead of client_id/client_secret)."),
    _form("client_secret", "Confidential clients: the client's secret (or HTTP Basic).", format="password"),
)


@routes.post("/connect/token")
@docs(
    tags=["oidc"],
    summary="Token endpoint: authorization_code, password, client_credentials, refresh_token",
    description=(
        "Form-encoded (RFC 6749). Which fields each grant_type uses: **authorization_code**: code, redirect_uri,"
        " code_verifier (PKCE S256); **password** (storefront client only, when enabled): username, password,"
        " scope; **client_credentials** (confidential clients): scope; **refresh_token**: refresh_token, scope"
        " (a subset of the granted scopes). Every grant authenticates the client: client_id (public clients) or"
        " client_id + client_secret, or HTTP Basic instead of the two."
    ),
    consumes=["application/x-www-form-urlencoded"],
    parameters=[
        _form(
            "grant_type",
            "The grant.",
            required=True,
            enum=["authorization_code", "refresh_token", "password", "client_credentials"],
        ),
        _form("code", "authorization_code: the code from the authorization redirect."),
        _form("redirect_uri", "authorization_code: the redirect_uri of the authorization request."),
        _form("code_verifier", "authorization_code: the PKCE verifier of the code_challenge."),
        *CLIENT_AUTH_FORM,
        _form("username", "password: the account's email."),
        _form("password", "password: the account's password.", format="password"),
        _form(
            "scope",
            "password, client_credentials, refresh_token: space-separated scopes (default: the client's, or the granted ones).",
        ),
        _form("refresh_token", "refresh_token: the refresh token to rotate."),
    ],
)
@oauth_endpoint
async def token(request: web.Request) -> web.Response:
    return oauth_json(await _identity(request).tokens.token(request))


@routes.post("/connect/revocation")
@docs(
    tags=["oidc"],
    summary="Revoke a refresh token and its family (RFC 7009)",
    description="Form-encoded. Answers 200 whether or not the token was valid.",
    consumes=["application/x-www-form-urlencoded"],
    parameters=[
        _form("token", "The refresh token to revoke.", required=True),
        _form("token_type_hint", "Optional hint (RFC 7009).", enum=["refresh_token", "access_token"]),
        *CLIENT_AUTH_FORM,
    ],
)
@oauth_endpoint
async def revocation(request: web.Request) -> web.Response:
    await _identity(request).tokens.revoke(request)
    return web.Response(status=200, headers=NO_STORE)


@routes.post("/connect/introspect")
@docs(
    tags=["oidc"],
    summary="Token introspection for confidential clients (RFC 7662)",
    description="Form-encoded. The client must be confidential (client_secret or HTTP Basic).",
    consumes=["application/x-www-form-urlencoded"],
    parameters=[
        _form("token", "The access or refresh token to describe.", required=True),
        _form("token_type_hint", "Which kind to look up first.", enum=["access_token", "refresh_token"]),
        *CLIENT_AUTH_FORM,
    ],
)
@oauth_endpoint
async def introspect(request: web.Request) -> web.Response:
    return oauth_json(await _identity(request).tokens.introspect(request))


# ---------------------------------------------------------------------------------------------------
# Userinfo and end-session


@docs(tags=["oidc"], summary="Claims about the signed-in user (needs the openid scope)")
async def userinfo(request: web.Request) -> web.Response:
    p = await authenticate(request)
    check_access(p, scopes=("openid",))
    user = await _identity(request).repo.user_by_id(p.sub)
    if user is None or user.disabled:
        raise InvalidToken("The token's account no longer exists or is locked.")
    claims: dict[str, Any] = {"sub": user.id, **claims_for_scopes(user, p.scopes)}
    client = await _identity(request).repo.client(p.client_id) if p.client_id else None
    if client is not None and client.roles_allowed:  # roles only to the clients allowed to carry them
        claims["roles"] = list(user.roles)
    if user.password_change_required:
        claims["password_change_required"] = True
    return json_response(claims, headers=NO_STORE)


routes.get("/connect/userinfo")(userinfo)
routes.post("/connect/userinfo")(userinfo)


@routes.get("/connect/endsession")
@docs(tags=["oidc"], summary="Sign out: revoke the user's refresh tokens for the client (ID token hint or bearer)")
async def endsession(request: web.Request) -> web.Response:
    identity = _identity(request)
    q = single_values(request.query, _repeated)
    sub, client_id = await _signed_in_party(request, identity, q)
    client = await identity.repo.client(client_id) if client_id else None
    target = q.get("post_logout_redirect_uri")
    if target is not None and (client is None or target not in client.post_logout_redirect_uris):
        raise BadRequest("post_logout_redirect_uri is not registered for this client.", slug="invalid-logout-request")
    if sub is not None and client is not None:
        # revokes the refresh tokens and announces AccessRevoked (same transaction): access tokens end now too
        await identity.repo.revoke_user_tokens(sub, utcnow(), client_id=client.client_id, reason="signed_out")
    if target:
        response = redirect(redirect_location(target, {"state": q.get("state")}), status=302)
    else:
        response = html_response(signed_out_page())
    clear_csrf_cookie(response)
    return response


async def _signed_in_party(
    request: web.Request, identity: Identity, q: dict[str, str]
) -> tuple[str | None, str | None]:
    """(user id, client id) from an ``id_token_hint`` (may be expired: signing out late is fine) or a bearer
    access token; (None, client_id parameter) when the request carries neither."""
    client_id = q.get("client_id")
    hint = q.get("id_token_hint")
    if hint:
        claims = decode_id_token_hint(hint, identity.keys.jwks(), identity.settings.issuer)
        if claims is None:
            raise BadRequest("id_token_hint is not an ID token issued here.", slug="invalid-logout-request")
        if client_id not in (None, claims["aud"]):
            raise BadRequest("client_id differs from the ID token's audience.", slug="invalid-logout-request")
        return claims["sub"], claims["aud"]
    p = await optional_principal(request)
    if p is not None:
        return p.sub, p.client_id
    return None, client_id


# ---------------------------------------------------------------------------------------------------
# Accounts


class RegistrationSchema(Schema):
    email = fields.String(
        required=True, metadata={"description": "normalised: trimmed, lower-cased", "example": "ann@example.com"}
    )
    password = fields.String(
        required=True,
        load_only=True,
        metadata={
            "description": "8 to 1024 characters that are hard to guess (zxcvbn score 3 or more; not built from "
            "the email, the name or the shop's name)"
        },
    )
    name = fields.String(required=True, metadata={"example": "Ann Smith"})


class UserSchema(Schema):
    id = fields.String(metadata={"description": "UUID"})
    email = fields.String()
    name = fields.String()
    roles = fields.List(fields.String())


class UserPageSchema(Schema):
    items = fields.List(fields.Nested(UserSchema))
    page = fields.Integer()
    page_size = fields.Integer()
    total = fields.Integer()


class PageQuerySchema(Schema):
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=100_000))
    page_size = fields.Integer(load_default=20, validate=validate.Range(min=1, max=200))


# ---------------------------------------------------------------------------------------------------
# Registration rate limits (identity's own, tighter than the gateway's general limit)


@dataclass(slots=True)
class TokenBuckets:
    """Token buckets in memory, one per key: ``capacity`` requests at once, refilled at ``per_minute``/60 per
    second. Buckets that have refilled completely are forgotten, so memory follows recent traffic only; past
    ``max_keys`` live buckets the least recently touched go first."""

    per_minute: float
    capacity: float
    max_keys: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when a request for ``key`` may go ahead (a token is taken), else seconds until one is there."""
        now = self.clock()
        rate = self.per_minute / 60.0
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[key] = (tokens - 1.0, now)  # re-inserted last: the dict is in order of last use
        if len(self._buckets) > self.max_keys:
            self._forget(now, rate)
        return 0.0

    def _forget(self, now: float, rate: float) -> None:
        full_after = self.capacity / rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]


@dataclass(slots=True)
class RegistrationLimits:
    """Registrations a minute per email and per client address (each a burst of as many); None: no limit.
    Defaults 5 and 20: ``ECOM_AUTH_REGISTRATIONS_PER_EMAIL`` / ``ECOM_AUTH_REGISTRATIONS_PER_ADDRESS``."""

    per_email: TokenBuckets | None = field(default_factory=lambda: TokenBuckets(5, 5))
    per_address: TokenBuckets | None = field(default_factory=lambda: TokenBuckets(20, 20))

    @classmethod
    def of(cls, per_email: int, per_address: int) -> RegistrationLimits:
        return cls(
            TokenBuckets(per_email, per_email) if per_email > 0 else None,
            TokenBuckets(per_address, per_address) if per_address > 0 else None,
        )

    def check(self, address: str, email: str) -> None:
        wait = self.per_address.take(address) if self.per_address is not None else 0.0
        if wait:
            raise TooManyRequests(
                f"Too many registrations from your address; try again in {math.ceil(wait)} seconds.", wait
            )
        wait = self.per_email.take(email) if email and self.per_email is not None else 0.0
        if wait:
            raise TooManyRequests(
                f"Too many registrations for this email; try again in {math.ceil(wait)} seconds.", wait
            )


_limits: weakref.WeakKeyDictionary[web.Application, RegistrationLimits] = weakref.WeakKeyDictionary()


def registration_limits(app: web.Application) -> RegistrationLimits:
    """The registration limits of one identity application (one set per process and app)."""
    limits = _limits.get(app)
    if limits is None:
        auth = app[IDENTITY].settings.auth
        limits = _limits[app] = RegistrationLimits.of(auth.registrations_per_email, auth.registrations_per_address)
    return limits


def client_address(request: web.Request) -> str:
    """The caller's address. Behind the gateway (a peer on the loopback or a private network) it is the last
    ``X-Forwarded-For`` entry, the one the gateway added; a client's own X-Forwarded-For is never trusted."""
    remote = request.remote or "-"
    try:
        peer = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if peer.is_loopback or peer.is_private:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        if forwarded:
            last = forwarded[-1].split(",")[-1].strip()
            if last:
                return last
    return remote


# ---------------------------------------------------------------------------------------------------
# Registration and password change


class RegistrationAcceptedSchema(Schema):
    status = fields.String(metadata={"example": "accepted"})
    detail = fields.String()


class PasswordChangeSchema(Schema):
    current_password = fields.String(required=True, load_only=True)
    new_password = fields.String(required=True, load_only=True)


REGISTRATION_ACCEPTED = {
    "status": "accepted",
    "detail": "If this email address was not registered yet, its account is ready: sign in with it. "
    "If it was, nothing changed and the account's owner is told of this attempt.",
}


@routes.post("/api/identity/users")
@docs(
    tags=["identity"],
    summary="Register a customer account",
    description="The answer is the same whether or not the email already has an account (nothing is created then, "
    "and the owner is told): registration does not reveal which emails are registered.",
    responses={
        202: {"description": "accepted (the same answer for a new and a taken email)"},
        422: {"description": "a field is invalid (named: email, password or name)"},
        429: {"description": "too many registrations from this address or for this email; see Retry-After"},
    },
)
@request_schema(RegistrationSchema)
@response_schema(RegistrationAcceptedSchema, 202)
async def register(request: web.Request) -> web.Response:
    identity = _identity(request)
    data: dict[str, Any] = request["data"]
    limits = registration_limits(request.app)
    limits.check(client_address(request), normalize_email(data["email"]) if isinstance(data["email"], str) else "")
    await register_customer(
        identity.repo, identity.passwords, email=data["email"], password=data["password"], name=data["name"]
    )
    return json_response(REGISTRATION_ACCEPTED, status=202, headers=NO_STORE)


@routes.put("/api/identity/users/me/password")
@docs(
    tags=["identity"],
    summary="Change your password (clears password_change_required)",
    responses={
        204: {"description": "changed"},
        401: {"description": "no valid token"},
        422: {"description": "current_password is wrong or new_password is refused (named)"},
    },
)
@request_schema(PasswordChangeSchema)
async def change_own_password(request: web.Request) -> web.Response:
    identity = _identity(request)
    p = await authenticate(request)
    user = await identity.repo.user_by_id(p.sub)
    if user is None or user.disabled:
        raise InvalidToken("The token's account no longer exists or is locked.")
    data: dict[str, Any] = request["data"]
    # through the login throttle of the account's email: guesses of the current password are counted and locked
    outcome = await identity.login(user.email, data["current_password"])
    if outcome.user is None or outcome.user.id != user.id:
        raise ValidationProblem.field(
            "current_password", login_failure(outcome).replace("email or password", "password")
        )
    await change_password(identity.repo, identity.passwords, user, data["new_password"])
    return web.Response(status=204, headers=NO_STORE)


@routes.get("/api/identity/users")
@docs(tags=["identity"], summary="List accounts (admin)")
@request_schema(PageQuerySchema, locations=["query"])
@response_schema(UserPageSchema, 200)
@require(roles=("admin",))
async def list_users(request: web.Request) -> web.Response:
    page, size = request["data"]["page"], request["data"]["page_size"]
    users, total = await _identity(request).repo.list_users(offset=(page - 1) * size, limit=size)
    return json_response({"items": [u.public() for u in users], "page": page, "page_size": size, "total": total})
