"""The gateway is the shop's public URL: it owns the forwarded headers identity sees, and it answers the
storefront's redirect URI ``/callback`` (issue 13, item 6). The browser flow end to end is in
tests/e2e/test_browser_signin.py."""

from __future__ import annotations

FORGED = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-For": "10.9.9.9",
    "Forwarded": "for=10.9.9.9;host=evil.example;proto=https",
    "X-Real-IP": "10.9.9.9",
}


async def test_forwarded_headers_are_the_gateways_never_the_clients(make_gateway, start_upstream):
    identity = await start_upstream("identity")
    gw = await make_gateway({"identity": identity.url})
    resp = await gw.post("/connect/authorize", data={"a": "b"}, headers=FORGED)
    assert resp.status == 200
    seen = identity.seen[0]["headers"]
    assert seen["X-Forwarded-Proto"] == "http"  # what the client spoke to the gateway
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{gw.port}"  # the Host the client addressed, not its claim
    assert "Forwarded" not in seen and "X-Real-IP" not in seen
    assert len(seen.getall("X-Forwarded-Host")) == 1 and len(seen.getall("X-Forwarded-Proto")) == 1


async def test_the_callback_page_keeps_the_code_to_this_site(make_gateway):
    gw = await make_gateway()
    resp = await gw.get("/callback", params={"code": "c0de", "state": "s", "iss": "http://x"})
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Referrer-Policy"] == "no-referrer" and resp.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    page = await resp.text()
    assert "You are signed in" in page and "c0de" not in page
    resp = await gw.get("/callback", params={"error": "access_denied", "error_description": "<b>no</b>"})
    assert resp.status == 400
    page = await resp.text()
    assert "&lt;b&gt;no&lt;/b&gt;" in page and "<b>" not in page
    assert (await gw.get("/callback")).status == 400
