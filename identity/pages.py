"""The server-rendered pages (sign-in form, signed-out notice) and the sign-in form's CSRF protection.

Plain HTML, no script, every value escaped. Pages are sent with a strict Content-Security-Policy, no caching
and ``frame-ancestors 'none'`` (no click-jacking of the password form).

CSRF: double-submit cookie. ``GET /connect/authorize`` sets a random token in an ``HttpOnly``,
``SameSite=Strict`` cookie scoped to the authorize path and puts the same token in a hidden form field; the
``POST`` must carry both, equal. A cross-site page can neither read the cookie nor make the browser send it
(SameSite), so it cannot forge the post — and so cannot sign a victim into the attacker's account (login
CSRF). An ``Origin`` header, when the browser sends one, must be the issuer's origin as well.
"""

from __future__ import annotations

import hmac
import html
import re
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web

from runtime.errors import Forbidden

CSRF_COOKIE = "ecom_csrf"
CSRF_FIELD = "csrf_token"
CSRF_PATH = "/connect/authorize"
_CSRF_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
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
    """The browser's current CSRF token (kept across tabs), or a new one."""
    existing = request.cookies.get(CSRF_COOKIE, "")
    return existing if _CSRF_TOKEN.match(existing) else secrets.token_urlsafe(32)


def set_csrf_cookie(response: web.StreamResponse, token: str, *, secure: bool) -> None:
    response.set_cookie(CSRF_COOKIE, token, path=CSRF_PATH, httponly=True, samesite="Strict", secure=secure)


def clear_csrf_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(CSRF_COOKIE, path=CSRF_PATH)


def check_csrf(request: web.Request, form: Mapping[str, str], issuer: str) -> None:
    """403 unless the form's token equals the cookie's and any Origin header is the issuer's origin."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != _origin(issuer):
        raise Forbidden("The sign-in form was posted from another site.", slug="csrf")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    posted = form.get(CSRF_FIELD, "")
    if not (_CSRF_TOKEN.match(cookie) and hmac.compare_digest(cookie, posted)):
        raise Forbidden(
            "The sign-in form has expired or did not come from this site; "
            "go back to the application and sign in again.",
            slug="csrf",
        )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
