"""The server-rendered pages (sign-in form, signed-out notice) and the sign-in form's CSRF protection.

Plain HTML, no script, every value escaped. Pages are sent with a strict Content-Security-Policy, no caching,
``frame-ancestors 'none'`` (no click-jacking of the password form) and ``Referrer-Policy: same-origin``.

CSRF: a server-issued token, bound to the browser and to the authorization request. ``GET /connect/authorize``
sets a random browser nonce in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to the authorize path and puts
a token ``<expiry>.<nonce>.<mac>`` in a hidden form field, where ``mac`` is an HMAC-SHA256, under a secret derived
from identity's key-encryption key (never in the database), of the expiry, the nonce and a hash of the request's
``client_id``, ``redirect_uri``, ``state`` and ``code_challenge``. The ``POST`` must carry the cookie and a token
whose MAC verifies for that cookie and the posted request, issued at most :data:`CSRF_TTL` seconds ago. So an
invented token (or cookie) fails, a token taken from another request (another ``state`` or challenge) fails,
and a cross-site page can neither read the cookie nor make the browser send it (SameSite) — so it cannot sign a
victim into the attacker's account (login CSRF). An ``Origin`` header, when the browser sends one, must be the
origin of the shop's public URL as well (``settings.public_url``: the gateway, where the page is served and
posted; never identity's internal address, and never a value taken from the request's ``Host`` or
``X-Forwarded-*`` headers). Failures are 403 problems (``/csrf``).

The form posts to a relative action, so it goes back to the door the page came through; the cookie is host-only
and scoped to the authorize path, so the browser sends it to the gateway (cookies do not depend on the port).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from runtime.errors import Forbidden

CSRF_COOKIE = "ecom_csrf"
CSRF_FIELD = "csrf_token"
CSRF_PATH = "/connect/authorize"
CSRF_TTL = 600  # seconds a sign-in form may be posted after it was served
_CSRF_NONCE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_CSRF_TOKEN = re.compile(r"^([0-9]{1,12})\.([A-Za-z0-9_-]{43})\.([A-Za-z0-9_-]{43})$")
_BOUND_PARAMS = ("client_id", "redirect_uri", "state", "code_challenge")
_POSTED = "ecom_csrf_posted"  # request key: the checked form, so a re-rendered form is bound to the same request


class CsrfTokens:
    """Issues and checks the sign-in form's tokens. ``secrets`` returns the HMAC secrets, current first (older
    ones still verify: a rekey of identity's KEK does not void forms already on screen)."""

    def __init__(
        self, secrets_fn: Callable[[], Sequence[bytes]], *, ttl: int = CSRF_TTL, clock: Callable[[], float] = time.time
    ) -> None:
        self._secrets = secrets_fn
        self.ttl = ttl
        self.clock = clock

    @staticmethod
    def binding(params: Mapping[str, str]) -> bytes:
        values = [params.get(name) for name in _BOUND_PARAMS]
        return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).digest()

    @staticmethod
    def _mac(secret: bytes, expires: str, nonce: str, binding: bytes) -> str:
        msg = b"ecom-csrf:v1:" + expires.encode() + b":" + nonce.encode() + b":" + binding
        return _b64(hmac.new(secret, msg, hashlib.sha256).digest())

    def issue(self, nonce: str, params: Mapping[str, str]) -> str:
        expires = str(int(self.clock()) + self.ttl)
        return f"{expires}.{nonce}.{self._mac(self._secrets()[0], expires, nonce, self.binding(params))}"

    def valid(self, token: str, nonce: str, params: Mapping[str, str]) -> bool:
        m = _CSRF_TOKEN.match(token)
        if m is None or not _CSRF_NONCE.match(nonce):
            return False
        expires, token_nonce, mac = m.groups()
        now = self.clock()
        if not (now < int(expires) <= now + self.ttl + 5) or not hmac.compare_digest(token_nonce, nonce):
            return False
        binding = self.binding(params)
        return any(hmac.compare_digest(mac, self._mac(s, expires, nonce, binding)) for s in self._secrets())


CSRF_TOKENS: web.AppKey[CsrfTokens] = web.AppKey("identity_csrf", CsrfTokens)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under that policy a browser sends ``Origin: null`` with the form's POST (Fetch, "serializing
    # a request origin"), and the Origin check below refuses it. same-origin keeps the real Origin on the post to
    # this page's own origin and still gives no referrer to any other site (the page links nowhere anyway).
    "Referrer-Policy": "same-origin",
}

_STYLE = """
body{font-family:system-ui,sans-serif;background:#f5f5f5;margin:0}
main{max-width:22rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}
h1{font-size:1.4rem;margin-top:0}label{display:block;margin:1rem 0 .3rem}
input[type=email],input[type=password]{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}
button{margin-top:1.5rem;width:100%;padding:.6rem;font-size:1rem}
.error{color:#a00;background:#fee;padding:.6rem;border-radius:4px}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def html_response(text: str, *, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


def login_page(
    *, client_name: str, fields: Mapping[str, str], csrf_token: str, email: str = "", error: str | None = None
) -> str:
    """The sign-in form. ``fields`` (the authorization request) are posted back as hidden inputs."""
    esc = html.escape
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items())
    hidden += f'<input type="hidden" name="{CSRF_FIELD}" value="{esc(csrf_token)}">'
    notice = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        f"<h1>Sign in to {esc(client_name)}</h1>{notice}"
        f'<form method="post" action="{CSRF_PATH}">{hidden}'
        '<label for="email">Email</label>'
        f'<input id="email" name="email" type="email" autocomplete="username" required value="{esc(email)}">'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        '<button type="submit">Sign in</button></form>'
    )
    return _page("Sign in", body)


def signed_out_page() -> str:
    return _page("Signed out", "<h1>You are signed out</h1><p>You can close this window.</p>")


# ---------------------------------------------------------------------------------------------------
# CSRF


def csrf_token_for(request: web.Request) -> str:
    """A new form token for the authorization request being shown (the query of the GET, or the form that was
    posted and checked), bound to the browser's nonce cookie (kept across tabs, or a new one)."""
    existing = request.cookies.get(CSRF_COOKIE, "")
    nonce = existing if _CSRF_NONCE.match(existing) else secrets.token_urlsafe(32)
    params = request.get(_POSTED) or request.query
    return request.config_dict[CSRF_TOKENS].issue(nonce, params)


def set_csrf_cookie(response: web.StreamResponse, token: str, *, secure: bool) -> None:
    """The cookie holds the browser nonce the form token was issued for."""
    m = _CSRF_TOKEN.match(token)
    nonce = m.group(2) if m else token
    response.set_cookie(CSRF_COOKIE, nonce, path=CSRF_PATH, httponly=True, samesite="Strict", secure=secure)


def clear_csrf_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(CSRF_COOKIE, path=CSRF_PATH)


def check_csrf(request: web.Request, form: Mapping[str, str], public_url: str) -> None:
    """403 unless the form's token was issued by this server, within :data:`CSRF_TTL`, for this browser's cookie
    and this authorization request; and any Origin header is the origin of ``public_url`` (the gateway: a page
    served by identity's internal address is not the shop's sign-in page)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != _origin(public_url):
        raise Forbidden("The sign-in form was posted from another site.", slug="csrf")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    posted = form.get(CSRF_FIELD, "")
    if not request.config_dict[CSRF_TOKENS].valid(posted, cookie, form):
        raise Forbidden(
            "The sign-in form has expired or did not come from this site; "
            "go back to the application and sign in again.",
            slug="csrf",
        )
    request[_POSTED] = dict(form)


def _origin(url: str) -> str:
    """The serialised origin of ``url`` as a browser sends it in ``Origin``: lower-case, no default port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
