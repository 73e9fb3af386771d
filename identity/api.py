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
from marshmallow import Schema, fields, validate
from multidict import MultiDict

from identity.accounts import MAX_EMAIL_LENGTH, MAX_NAME_LENGTH, change_password, normalize_email, register_customer
from identity.core import IDENTITY, Identity
from identity.oauth import (
    MAX_NONCE_LENGTH,
    MAX_STATE_LENGTH,
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
from identity.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from runtime.auth import InvalidToken, Principal, optional_principal
from runtime.errors import BadRequest, Problem, TooManyRequests, ValidationProblem
from runtime.host import json_response, problem_response
from runtime.store import utcnow
from runtime.web.endpoints import Auth, ProblemSchema, Reply, endpoint

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _identity(request: web.Request) -> Identity:
    return request.app[IDENTITY]


def redirect(location: str, *, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location, **NO_STORE})


def _repeated(name: str) -> BadRequest:
    return BadRequest(f"The parameter {name} is repeated.")


# ---------------------------------------------------------------------------------------------------
# Documented shapes of the OAuth/OIDC endpoints (their protocol code reads and checks the input itself)

_HTML = "text/html"
_REDIRECT = Reply(None, "redirect (Location)", {"Location": {"type": "string"}})


def _text(description: str, *, required: bool = False, **meta: Any) -> fields.String:
    return fields.String(required=required, metadata={"description": description, **meta})


class OAuthErrorSchema(Schema):
    """RFC 6749 §5.2 error (``application/json``): the token, revocation and introspection endpoints."""

    error = fields.String(metadata={"example": "invalid_grant"})
    error_description = fields.String()


class TokenResponseSchema(Schema):
    access_token = fields.String()
    token_type = fields.String(metadata={"example": "Bearer"})
    expires_in = fields.Integer()
    refresh_token = fields.String()
    id_token = fields.String()
    scope = fields.String()


class AuthorizeQuery(Schema):
    response_type = _text("Must be code.", required=True, enum=["code"])
    client_id = _text("The registered client.", required=True)
    redirect_uri = _text("Exactly one of the client's registered redirect URIs.", required=True)
    scope = _text("Space-separated scopes (default: the client's).")
    state = _text("Returned unchanged to the client.", maxLength=MAX_STATE_LENGTH)
    code_challenge = _text("PKCE: base64url SHA-256 of the verifier (43 characters).", required=True)
    code_challenge_method = _text("Must be S256.", required=True, enum=["S256"])
    nonce = _text("Copied into the ID token.", maxLength=MAX_NONCE_LENGTH)


class SignInForm(AuthorizeQuery):
    email = _text("The account's email.")
    password = _text("The account's password.", format="password")
    csrf_token = _text("The sign-in page's CSRF token (also in its cookie).", required=True)


# Client authentication of the token, revocation and introspection endpoints.
_CLIENT_ID = "The client (or HTTP Basic authentication instead of client_id/client_secret)."
_CLIENT_SECRET = "Confidential clients: the client's secret (or HTTP Basic)."


class TokenForm(Schema):
    grant_type = _text(
        "The grant.", required=True, enum=["authorization_code", "refresh_token", "password", "client_credentials"]
    )
    code = _text("authorization_code: the code from the authorization redirect.")
    redirect_uri = _text("authorization_code: the redirect_uri of the authorization request.")
    code_verifier = _text("authorization_code: the PKCE verifier of the code_challenge.")
    client_id = _text(_CLIENT_ID)
    client_secret = _text(_CLIENT_SECRET, format="password")
    username = _text("password: the account's email.")
    password = _text("password: the account's password.", format="password")
    scope = _text(
        "password, client_credentials, refresh_token: space-separated scopes (default: the client's, or the granted "
        "ones)."
    )
    refresh_token = _text("refresh_token: the refresh token to rotate.")


class RevocationForm(Schema):
    token = _text("The refresh token to revoke.", required=True)
    token_type_hint = _text("Optional hint (RFC 7009).", enum=["refresh_token", "access_token"])
    client_id = _text(_CLIENT_ID)
    client_secret = _text(_CLIENT_SECRET, format="password")


class IntrospectionForm(Schema):
    token = _text("The access or refresh token to describe.", required=True)
    token_type_hint = _text("Which kind to look up first.", enum=["access_token", "refresh_token"])
    client_id = _text(_CLIENT_ID)
    client_secret = _text(_CLIENT_SECRET, format="password")


class EndSessionQuery(Schema):
    id_token_hint = _text("An ID token issued here (may be expired).")
    post_logout_redirect_uri = _text("One of the client's registered post-logout redirect URIs.")
    state = _text("Returned unchanged with the redirect.")
    client_id = _text("The client, when no id_token_hint is sent.")


# What the OAuth endpoints answer besides their own results: RFC 6749 errors, not problem+json.
_OAUTH_ERRORS = {
    400: Reply(OAuthErrorSchema, "RFC 6749 error: invalid_request, invalid_grant, unsupported_grant_type, ..."),
    401: Reply(OAuthErrorSchema, "invalid_client", {"WWW-Authenticate": {"type": "string"}}),
}


# ---------------------------------------------------------------------------------------------------
# Discovery


@routes.get("/.well-known/openid-configuration")
@endpoint(tags=["oidc"], summary="OpenID Connect discovery document", responses={200: "the discovery document"})
async def discovery(request: web.Request) -> web.Response:
    return json_response(_identity(request).discovery(), headers={"Cache-Control": "public, max-age=300"})


@routes.get("/.well-known/jwks.json")
@endpoint(tags=["oidc"], summary="Public signing keys (JWKS)", responses={200: "the JSON Web Key Set"})
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
@endpoint(
    tags=["oidc"],
    summary="Authorization request (code + PKCE S256): shows the sign-in page",
    description="An unknown client or redirect_uri is answered here (400); every later error is redirected to the "
    "client (302 with error=...).",
    query=AuthorizeQuery,
    read_by_handler=True,
    responses={200: "the sign-in page", 302: _REDIRECT, 400: Reply(ProblemSchema, "unknown client or redirect_uri")},
    produces=(_HTML,),
)
async def authorize(request: web.Request) -> web.Response:
    identity = _identity(request)
    try:
        areq = await parse_authorization_request(request.query, identity.repo)
    except AuthorizeRedirect as back:
        return redirect(back.location(identity.settings.issuer), status=302)
    return _login_form(request, areq)


@routes.post("/connect/authorize")
@endpoint(
    tags=["oidc"],
    summary="Sign-in form post: redirects to the client with an authorization code",
    description="The sign-in page's form, posted back: the authorization request, email, password and CSRF token.",
    form=SignInForm,
    read_by_handler=True,
    responses={
        200: "the sign-in page again, saying what was wrong",
        303: _REDIRECT,
        400: Reply(ProblemSchema, "not form-encoded, a repeated field, or an unknown client or redirect_uri"),
        403: Reply(ProblemSchema, "the CSRF token is missing or wrong"),
    },
    produces=(_HTML,),
)
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


@routes.post("/connect/token")
@endpoint(
    tags=["oidc"],
    summary="Token endpoint: authorization_code, password, client_credentials, refresh_token",
    description=(
        "Form-encoded (RFC 6749). Which fields each grant_type uses: **authorization_code**: code, redirect_uri,"
        " code_verifier (PKCE S256); **password** (storefront client only, when enabled): username, password,"
        " scope; **client_credentials** (confidential clients): scope; **refresh_token**: refresh_token, scope"
        " (a subset of the granted scopes). Every grant authenticates the client: client_id (public clients) or"
        " client_id + client_secret, or HTTP Basic instead of the two."
    ),
    form=TokenForm,
    read_by_handler=True,
    responses={200: TokenResponseSchema, **_OAUTH_ERRORS},
)
@oauth_endpoint
async def token(request: web.Request) -> web.Response:
    return oauth_json(await _identity(request).tokens.token(request))


@routes.post("/connect/revocation")
@endpoint(
    tags=["oidc"],
    summary="Revoke a refresh token and its family (RFC 7009)",
    description="Form-encoded. Answers 200 whether or not the token was valid.",
    form=RevocationForm,
    read_by_handler=True,
    responses={200: "revoked (or it was not valid)", **_OAUTH_ERRORS},
)
@oauth_endpoint
async def revocation(request: web.Request) -> web.Response:
    await _identity(request).tokens.revoke(request)
    return web.Response(status=200, headers=NO_STORE)


@routes.post("/connect/introspect")
@endpoint(
    tags=["oidc"],
    summary="Token introspection for confidential clients (RFC 7662)",
    description="Form-encoded. The client must be confidential (client_secret or HTTP Basic).",
    form=IntrospectionForm,
    read_by_handler=True,
    responses={200: "the token's claims and active: true, or active: false", **_OAUTH_ERRORS},
)
@oauth_endpoint
async def introspect(request: web.Request) -> web.Response:
    return oauth_json(await _identity(request).tokens.introspect(request))


# ---------------------------------------------------------------------------------------------------
# Userinfo and end-session


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal


@endpoint(
    Caller,
    tags=["oidc"],
    summary="Claims about the signed-in user (needs the openid scope)",
    responses={200: "the user's claims"},
    auth=Auth(scopes=("openid",), api=False),
)
async def userinfo(request: web.Request, caller: Caller) -> web.Response:
    p = caller.principal
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
@endpoint(
    tags=["oidc"],
    summary="Sign out: revoke the user's refresh tokens for the client (ID token hint or bearer)",
    query=EndSessionQuery,
    read_by_handler=True,
    responses={
        200: "the signed-out page",
        302: _REDIRECT,
        400: Reply(ProblemSchema, "a repeated parameter, a foreign id_token_hint or an unregistered redirect URI"),
        401: Reply(ProblemSchema, "a bearer token was sent and it is not valid"),
    },
    produces=(_HTML,),
)
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
        required=True,
        metadata={
            "description": "normalised: trimmed, lower-cased",
            "example": "ann@example.com",
            "format": "email",
            "maxLength": MAX_EMAIL_LENGTH,
        },
    )
    password = fields.String(
        required=True,
        load_only=True,
        validate=validate.Length(max=MAX_PASSWORD_LENGTH),  # longer is refused before any hashing
        metadata={
            "minLength": MIN_PASSWORD_LENGTH,
            "description": "8 to 1024 characters that are hard to guess (zxcvbn score 3 or more; not built from "
            "the email, the name or the shop's name)",
        },
    )
    name = fields.String(
        required=True,
        metadata={
            "example": "Ann Smith",
            "maxLength": MAX_NAME_LENGTH,
            # what accounts.name_problem accepts: no control characters, not only blanks
            "pattern": r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$",
        },
    )


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
    new_password = fields.String(
        required=True,
        load_only=True,
        validate=validate.Length(max=MAX_PASSWORD_LENGTH),
        metadata={"minLength": MIN_PASSWORD_LENGTH, "description": "hard to guess (as at registration)"},
    )


REGISTRATION_ACCEPTED = {
    "status": "accepted",
    "detail": "If this email address was not registered yet, its account is ready: sign in with it. "
    "If it was, nothing changed and the account's owner is told of this attempt.",
}


@dataclass(frozen=True, slots=True)
class Registration:
    email: str
    password: str
    name: str


@dataclass(frozen=True, slots=True)
class PasswordChange:
    principal: Principal
    current_password: str
    new_password: str


@dataclass(frozen=True, slots=True)
class UserListing:
    page: int
    page_size: int


@routes.post("/api/identity/users")
@endpoint(
    Registration,
    tags=["identity"],
    summary="Register a customer account",
    description="The answer is the same whether or not the email already has an account (nothing is created then, "
    "and the owner is told): registration does not reveal which emails are registered. 422 names the field: an "
    "email that is not deliverable-looking or mixes scripts, a password that is easy to guess, a bad name.",
    body=RegistrationSchema,
    responses={202: Reply(RegistrationAcceptedSchema, "accepted (the same answer for a new and a taken email)")},
    problems=(429,),
)
async def register(request: web.Request, new: Registration) -> web.Response:
    identity = _identity(request)
    limits = registration_limits(request.app)
    limits.check(client_address(request), normalize_email(new.email))
    await register_customer(identity.repo, identity.passwords, email=new.email, password=new.password, name=new.name)
    return json_response(REGISTRATION_ACCEPTED, status=202, headers=NO_STORE)


@routes.put("/api/identity/users/me/password")
@endpoint(
    PasswordChange,
    tags=["identity"],
    summary="Change your password (clears password_change_required)",
    description="422 names the field: current_password is wrong, or new_password is refused (easy to guess).",
    body=PasswordChangeSchema,
    responses={204: "changed"},
    auth=Auth(api=False),
)
async def change_own_password(request: web.Request, change: PasswordChange) -> web.Response:
    identity = _identity(request)
    user = await identity.repo.user_by_id(change.principal.sub)
    if user is None or user.disabled:
        raise InvalidToken("The token's account no longer exists or is locked.")
    # through the login throttle of the account's email: guesses of the current password are counted and locked
    outcome = await identity.login(user.email, change.current_password)
    if outcome.user is None or outcome.user.id != user.id:
        raise ValidationProblem.field(
            "current_password", login_failure(outcome).replace("email or password", "password")
        )
    await change_password(identity.repo, identity.passwords, user, change.new_password)
    return web.Response(status=204, headers=NO_STORE)


@routes.get("/api/identity/users")
@endpoint(
    UserListing,
    tags=["identity"],
    summary="List accounts (admin)",
    query=PageQuerySchema,
    responses={200: UserPageSchema},
    auth=Auth(roles=("admin",)),
)
async def list_users(request: web.Request, listing: UserListing) -> web.Response:
    page, size = listing.page, listing.page_size
    users, total = await _identity(request).repo.list_users(offset=(page - 1) * size, limit=size)
    return json_response({"items": [u.public() for u in users], "page": page, "page_size": size, "total": total})
