"""The admin console at ``/admin`` (gateway/console/), in a real browser, over the real embedded system.

Every service runs in this process as ``ecom run`` runs them (migrated, seeded, one memory bus, SQLite files in
the test's own data directory, real HTTP on ports below 32768), so the test can put a poison message on the bus:
a message of a type the order service does not know, which dead-letters after ``ECOM_BUS_MAX_ATTEMPTS``.

Headless Chromium (Debian's, tests/support/browser.py) signs in as the seeded admin through the console's own
authorization-code + PKCE flow, opens an order actor made by a purchase (its state holds user data written to
look like HTML: it must show as text and run nothing), views and replays the dead letter (back through the
outbox with the same message id, so it dead-letters again under that id) and finds the replay in the audit log.
A customer signing in gets "admin role required", and a customer's token is refused by every admin API the
console uses. The screenshot is kept in var/test-artifacts/admin-console.png.

The tests without a browser check the page's headers and the console endpoints' access rules, and the cluster
and actors views over two catalog instances with cluster membership (and a service whose instance is down).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bus import Envelope
from config import load_settings
from runtime import services
from runtime.cli import start_bus
from tests.support.browser import artifact_path, chromium, require_chromium
from tests.support.cluster import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    PASSWORD,
    PORT_OFFSET,
    admin_token,
    bearer,
    embedded_env,
    free_base_port,
    new_email,
    register,
    request_json,
    token_claims,
)

# Written by the customer into the order: shown by the console as text, never run.
HOSTILE_NAME = '<img src=x onerror="window.pwned=1">Eve'
ADDRESS = {"name": HOSTILE_NAME, "street": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}


@dataclass
class Shop:
    url: str  # the gateway: the public URL
    bus: Any


# Tracing (runtime/tracing.py) is another branch's work: where it is built, the shop runs with its in-process
# span buffer (OTEL_TRACES_EXPORTER=buffer) and the console must show an order's trace; else "not available".
TRACING = importlib.util.find_spec("runtime.tracing") is not None


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """Every service in this process, as ``ecom run`` starts them; yields the gateway's URL and the bus."""
    tracing: Any = importlib.import_module("runtime.tracing") if TRACING else None
    if tracing is not None:  # before any app or client session is made, as `ecom run` does
        assert tracing.configure("ecom", environ={"OTEL_TRACES_EXPORTER": "buffer"})
    base = free_base_port(max(PORT_OFFSET.values()) + 1)
    env = embedded_env(base, tmp_path / "var", ECOM_BUS_MAX_ATTEMPTS="2", ECOM_ACTORS_REMINDER_POLL_INTERVAL="0.2")
    settings = load_settings({k: v for k, v in env.items() if k.startswith("ECOM_")})
    chosen = services.available()
    bus = await start_bus(settings)
    runners: list[web.AppRunner] = []
    try:
        for service in chosen:
            await services.upgrade_database(settings, service)
        for service in chosen:
            await service.seed(settings)
        for service in chosen:
            runner = web.AppRunner(service.create_app(settings, bus=bus), access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", settings.services[service.name].port).start()
        yield Shop(settings.public_url, bus)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await bus.close()
        if tracing is not None:
            tracing.shutdown()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kwargs: Any
) -> tuple[int, Any]:
    headers = {**(bearer(token) if token else {}), **kwargs.pop("headers", {})}
    status, body, _ = await request_json(http, method, url, headers=headers, **kwargs)
    return status, body


async def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def purchase(http: aiohttp.ClientSession, gateway: str, token: str) -> str:
    """One product in the cart, checked out and paid; the order id."""
    status, products = await call(http, "GET", f"{gateway}/api/catalog/products?page_size=1&sort=price")
    assert status == 200 and products["items"], products
    product = products["items"][0]["id"]
    status, body = await call(http, "PUT", f"{gateway}/api/cart/items/{product}", token, json={"quantity": 1})
    assert status == 200, body
    status, body = await call(
        http,
        "POST",
        f"{gateway}/api/cart/checkout",
        token,
        json={"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert status == 202, body
    order_id: str = body["order_id"]

    async def paid() -> bool:
        status, order = await call(http, "GET", f"{gateway}/api/orders/{order_id}", token)
        return status == 200 and order["status"] == "paid"

    await eventually(paid, 30, f"order {order_id} to be paid")
    return order_id


async def poison(bus: Any) -> str:
    """A message of a type the order service has no route for, on its queue: dead-lettered after 2 attempts."""
    envelope = Envelope(type="PoisonPill", session_id=str(uuid.uuid4()), body={"note": "<b>not bold</b>"})
    await bus.send("order", envelope)

    async def dead() -> bool:
        return any(letter.envelope.message_id == envelope.message_id for letter in await bus.dead_letters("order"))

    await eventually(dead, 20, "the poison message to be dead-lettered")
    return envelope.message_id


# -- without a browser ------------------------------------------------------------------------------------


async def test_the_page_is_static_and_locked_down_and_the_cluster_view_is_for_admins(shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{shop.url}/admin") as resp:
            assert resp.status == 200
            page = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert f'content="{shop.url}/admin/callback"' in page  # the redirect URI, from the public URL
        assert "<script>" not in page  # no inline script: only <script src=...>
        async with http.get(f"{shop.url}/admin/static/console.js") as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            assert "innerHTML" not in await resp.text()  # values are rendered as text only
        async with http.get(f"{shop.url}/admin/static/..%2Fhandlers.py") as resp:
            assert resp.status == 404

        status, body = await call(http, "GET", f"{shop.url}/admin/api/cluster")
        assert status == 401, body
        customer = await register(http, shop.url, new_email("console-customer"))
        status, body = await call(http, "GET", f"{shop.url}/admin/api/cluster", customer)
        assert status == 403, body
        status, body = await call(http, "GET", f"{shop.url}/admin/api/actors", customer)
        assert status == 403, body
        admin = await admin_token(http, shop.url)
        status, body = await call(http, "GET", f"{shop.url}/admin/api/cluster", admin)
        assert status == 200, body
        by_name = {s["name"]: s for s in body["services"]}
        assert set(by_name) == {"identity", "catalog", "cart", "order"}
        assert by_name["order"]["admin"] == "/api/order/admin"
        assert [i["ready"] for i in by_name["catalog"]["instances"]] == [True]
        # live actors, asked of every instance with the caller's token (which the service checks again)
        status, body = await call(http, "GET", f"{shop.url}/admin/api/actors?limit=5", admin)
        assert status == 200, body
        by_name = {s["name"]: s for s in body["services"]}
        (catalog,) = by_name["catalog"]["instances"]
        assert catalog["status"] == 200 and "product" in catalog["body"]["types"], catalog
        status, body = await call(http, "GET", f"{shop.url}/admin/api/actors?limit=x", admin)
        assert status == 422 and body["errors"][0]["field"] == "limit", body

        # the pending-work view each service gained: reminders (the paid order's none; carts' expiry) and backlog
        status, body = await call(http, "GET", f"{shop.url}/api/cart/admin/pending", admin)
        assert status == 200 and body["outbox"]["backlog"] >= 0 and body["reminders"]["due"] >= 0, body
        status, body = await call(http, "GET", f"{shop.url}/api/cart/admin/pending", customer)
        assert status == 403, body


# -- in a real browser -------------------------------------------------------------------------------------


async def test_an_admin_opens_an_actor_and_replays_a_dead_letter_in_a_browser(shop: Shop) -> None:
    require_chromium()
    from playwright.async_api import expect  # installed: require_chromium checked

    gateway = shop.url
    async with aiohttp.ClientSession() as http:
        customer_email = new_email("console-buyer")
        customer = await register(http, gateway, customer_email)
        order_id = await purchase(http, gateway, customer)
        message_id = await poison(shop.bus)
        discarded_id = await poison(shop.bus)
        status, products = await call(http, "GET", f"{gateway}/api/catalog/products?page_size=2&sort=-price")
        assert status == 200, products
        resting = products["items"][0]["id"]  # the dearest product: nobody bought it, so its actor is not live
        admin = await admin_token(http, gateway)
        admin_sub = token_claims(admin)["sub"]

    problems: list[str] = []  # console errors (a CSP violation is one) and failed requests
    async with chromium() as browser:
        page = await browser.new_page()
        page.on("console", lambda m: problems.append(f"{m.text} {m.location}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # the replay's confirmation

        # sign in through the console: its own code + PKCE flow, the sign-in page, back to /admin
        await page.goto(f"{gateway}/admin")
        await page.click("#signin")
        await page.wait_for_url(f"{gateway}/connect/authorize?**")
        await page.fill("#email", ADMIN_EMAIL)
        await page.fill("#password", ADMIN_PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{gateway}/admin")  # the callback finished and left the address bar
        await expect(page.locator("#view-console")).to_be_visible()
        await expect(page.locator("#who-name")).to_have_text(ADMIN_EMAIL)
        assert "code=" not in page.url

        # cluster members and live actors of every service
        await expect(page.locator("#cluster tr[data-service=order]")).to_have_count(1)
        await expect(page.locator("#cluster tr[data-service=gateway]")).to_have_count(0)
        actor_row = page.locator(f'#actors tr[data-actor="order/{order_id}"]')
        await expect(actor_row).to_have_count(1)
        await expect(actor_row).to_contain_text("local")  # the owner: one process, no cluster

        # one actor: state and version, the customer's text shown as text
        await actor_row.locator("button.open-actor").click()
        state = page.locator("#actor-state")
        await expect(page.locator("#actor-title")).to_contain_text(order_id)
        await expect(state).to_contain_text('"status": "paid"')
        await expect(state).to_contain_text(HOSTILE_NAME.replace('"', '\\"'))  # JSON-escaped, literally
        await expect(page.locator("#actor table")).to_contain_text("version")
        assert await page.evaluate("window.pwned") is None
        assert await page.locator("#actor img").count() == 0

        # any actor by its id, live or not: one that is not active is read as stored
        await page.select_option("#actor-service", "catalog")
        await page.fill("#actor-type", "product")
        await page.fill("#actor-id", resting)
        await page.click("#actor-form button[type=submit]")
        await expect(page.locator("#actor-title")).to_contain_text(resting)
        await expect(page.locator("#actor table")).to_contain_text("no (as stored)")
        await expect(state).to_contain_text('"available_stock"')

        # the order's traces: its spans where tracing keeps them, else the section says it is not available
        await expect(page.locator("#trace-order")).to_have_value(order_id)
        await page.click("#trace-form button[type=submit]")
        if TRACING:  # the checkout's trace, from the gateway's request to the order's turns
            await expect(page.locator("#traces h3").first).to_contain_text(re.compile(r"trace [0-9a-f]{32}"))
            await expect(page.locator("#traces").get_by_text("order CheckoutRequested").first).to_be_visible()
        else:
            await expect(page.locator("#traces-unavailable")).to_contain_text("not available on this deployment")

        # the dead letter: view it, replay it
        letter_row = page.locator(f'#dead-letters tr[data-message-id="{message_id}"]')
        await expect(letter_row).to_contain_text("PoisonPill")
        await letter_row.locator("button.view-letter").click()
        await expect(page.locator("#dead-letter pre")).to_contain_text("<b>not bold</b>")
        await letter_row.locator("button.replay-letter").click()
        await expect(page.locator("#flash")).to_contain_text(f"Replayed {message_id}")
        replayed = page.locator('#audit tr[data-action="dead-letter.replay"]')
        await expect(replayed).to_contain_text(message_id)
        await expect(replayed).to_contain_text(admin_sub)

        # the other: discard it
        await page.locator(f'#dead-letters tr[data-message-id="{discarded_id}"] button.discard-letter').click()
        await expect(page.locator("#flash")).to_contain_text(f"Discarded {discarded_id}")
        await expect(page.locator('#audit tr[data-action="dead-letter.discard"]')).to_contain_text(discarded_id)
        await expect(page.locator(f'#dead-letters tr[data-message-id="{discarded_id}"]')).to_have_count(0)
        await page.screenshot(path=str(artifact_path("admin-console.png")), full_page=True)

        # a customer signing in is told the console needs the admin role
        await page.click("#signout")
        await page.click("#signin")
        await page.wait_for_url(f"{gateway}/connect/authorize?**")
        await page.fill("#email", customer_email)
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit]")
        await expect(page.locator("#view-denied")).to_be_visible()
        await expect(page.locator("#view-denied")).to_contain_text("Admin role required")
        await page.screenshot(path=str(artifact_path("admin-console-denied.png")), full_page=True)
    # the only failed requests allowed: the traces view's, answered 404 where tracing keeps no spans
    assert not [p for p in problems if "/admin/traces?" not in p], problems

    async with aiohttp.ClientSession() as http:
        # the replay is in the order service's audit log, by the admin, with the message id
        status, audit = await call(http, "GET", f"{gateway}/api/order/admin/audit?action=dead-letter.replay", admin)
        assert status == 200, audit
        (entry,) = [e for e in audit["items"] if e["target"].endswith("/" + message_id)]
        assert admin_sub in entry["actor"] and entry["via"] == "api"

        # it went back through the outbox with the same message id: the order service still has no route for
        # it, so it is dead-lettered again under that id
        async def again() -> bool:
            status, body = await call(http, "GET", f"{gateway}/api/order/admin/dead-letters/order", admin)
            return status == 200 and any(item["message_id"] == message_id for item in body["items"])

        await eventually(again, 20, "the replayed message to come back to the dead letters")

        # a customer's token opens none of the console's APIs
        customer = await register(http, gateway, new_email("console-other"))
        for method, path in (
            ("GET", "/admin/api/cluster"),
            ("GET", "/api/order/admin/actors"),
            ("GET", f"/api/order/admin/actors/order/{order_id}"),
            ("GET", "/api/order/admin/dead-letters"),
            ("POST", f"/api/order/admin/dead-letters/order/{message_id}/replay"),
            ("DELETE", f"/api/order/admin/dead-letters/order/{message_id}"),
            ("GET", "/api/order/admin/audit"),
            ("GET", "/api/order/admin/pending"),
        ):
            status, body = await call(http, method, gateway + path, customer)
            assert status == 403, (method, path, status, body)
        status, audit = await call(http, "GET", f"{gateway}/api/order/admin/audit", admin)
        # the refused changed nothing: the audit log has the two changes made in the console, newest first
        assert [e["action"] for e in audit["items"]] == ["dead-letter.discard", "dead-letter.replay"], audit
        assert all(d.envelope.message_id != discarded_id for d in await shop.bus.dead_letters("order")), "kept"


async def test_the_cluster_and_actor_views_ask_every_instance(tmp_path: Path, test_identity: Any) -> None:
    """Two catalog instances on one database with cluster membership, and a service whose one instance is down:
    the cluster view lists both catalog instances with the members each sees, the actors view has an answer from
    each, and the instance that is down is reported as such without hiding the others."""
    from actors.catalog import service as catalog_service
    from gateway import service as gateway_service
    from tests.order.conftest import migrate

    base = free_base_port(4)
    catalog_ports, gateway_port, down_port = (base, base + 1), base + 2, base + 3
    database = f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    await migrate(database, catalog_service.SCHEMA)
    common = {"ECOM_DATA_DIR": str(tmp_path), "ECOM_CLUSTER_ENABLED": "true", "ECOM_CLUSTER_HEARTBEAT_INTERVAL": "0.2"}
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()

    try:
        for port in catalog_ports:
            settings = load_settings({**common, "ECOM_CATALOG_PORT": str(port)})
            app = catalog_service.create_app(settings, database_url=database, verifier=test_identity.verifier())
            await serve(app, port)
        catalog_urls = [f"http://127.0.0.1:{port}" for port in catalog_ports]
        down_url = f"http://127.0.0.1:{down_port}"  # nothing listens there
        gateway = gateway_service.create_app(
            load_settings({**common, "ECOM_GATEWAY_PORT": str(gateway_port), "ECOM_GATEWAY_RATE_LIMIT": "0"}),
            verifier=test_identity.verifier(),
            upstreams={"catalog": catalog_urls, "identity": down_url, "cart": down_url, "order": down_url},
        )
        await serve(gateway, gateway_port)
        url = f"http://127.0.0.1:{gateway_port}"
        admin = test_identity.admin_token()

        async with aiohttp.ClientSession() as http:

            async def both_members() -> Any:
                status, body = await call(http, "GET", f"{url}/admin/api/cluster", admin)
                assert status == 200, body
                catalog = next(s for s in body["services"] if s["name"] == "catalog")
                seen = [sorted(i["members"] or []) for i in catalog["instances"]]
                return body if seen == [sorted(catalog_urls)] * 2 else None

            body = await eventually(both_members, 20, "both catalog instances to see each other")
            by_name = {s["name"]: s for s in body["services"]}
            instances = by_name["catalog"]["instances"]
            assert [(i["url"], i["ready"], i["self"]) for i in instances] == [(u, True, u) for u in catalog_urls]
            assert by_name["catalog"]["members"] == sorted(catalog_urls)
            (order,) = by_name["order"]["instances"]
            assert order["ready"] is False and order["error"], order

            status, body = await call(http, "GET", f"{url}/admin/api/actors", admin)
            assert status == 200, body
            by_name = {s["name"]: s for s in body["services"]}
            answers = by_name["catalog"]["instances"]
            assert [a["url"] for a in answers] == catalog_urls
            assert all(a["status"] == 200 and "product" in a["body"]["types"] for a in answers), answers
            assert all(a["body"]["cluster"] is not None for a in answers), answers
            (order,) = by_name["order"]["instances"]
            assert order["body"] is None and order["error"], order

            # the services check the forwarded token themselves: a customer's is refused at the gateway first
            status, body = await call(http, "GET", f"{url}/admin/api/actors", test_identity.token())
            assert status == 403, body
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
