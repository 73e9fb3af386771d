"""The storefront's redirect target at the public URL: ``GET /callback``.

Identity registers ``<public URL>/callback`` as the web storefront's redirect URI, so after the sign-in form the
browser lands here, on the gateway, with ``code``, ``state`` and ``iss`` (or ``error``) in the query. The
storefront application reads them from the address and exchanges the code at ``/connect/token`` with its PKCE
verifier; this page only tells the person what happened. It runs no script and echoes no query value except an
escaped error description, and it is sent so that the code does not leak: ``Referrer-Policy: no-referrer`` (no
``Referer`` to another site), ``Cache-Control: no-store`` and a CSP that loads nothing.
"""

from __future__ import annotations

import html

from aiohttp import web

PATH = "/callback"

HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STYLE = "body{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}"


async def callback_page(request: web.Request) -> web.Response:
    """200 for a code, 400 for an error or a request with neither (the storefront reads the query itself)."""
    query = request.query
    if "error" in query:
        detail = query.get("error_description") or query["error"]
        status, title = 400, "Sign-in did not complete"
        body = f"<p>{html.escape(detail[:500])}</p><p>Go back to the shop and sign in again.</p>"
    elif "code" in query:
        status, title = 200, "Signed in"
        body = "<p>You are signed in. The shop finishes the sign-in with the code in this address.</p>"
    else:
        status, title = 400, "Nothing to do here"
        body = "<p>This address is where the sign-in page sends you back to the shop.</p>"
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>{title}</h1>{body}</main></body></html>"
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)
