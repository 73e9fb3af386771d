"""Storefront load generator: many virtual shoppers against the gateway.

    ecom bench storefront [--embedded [--shop-repo DIR] | --target http://127.0.0.1:8000] [--quick] [--users 50]
                          [--duration 300] [--requests N] [--tokens FILE]
                          [--mix browse=30,search=15,details=25,cart=15,checkout=5,orders=10]
    ecom bench storefront --proxy-get /api/catalog/products [--concurrency 64] [--token T] [--duration 10]

Which shop: ``--target`` names a running gateway. ``--embedded`` starts the embedded default
(``python -m runtime.cli run``, bench/shop.py) as a child process for the run: its own temporary data directory,
free ports in 20000-32000 on 127.0.0.1, the per-address limits off, a known admin password; it is stopped with
Ctrl-C at the end. Without either, the configured gateway port is used when something listens there, else the
embedded shop is started. With the embedded shop, every product is first stocked up (``PATCH`` as the admin,
as an operator would before a sale) so that running out of stock stays rare, and the server's RSS is sampled
while the mix runs. ``--quick`` is a short bounded run (20 users, 30 s, for ``make bench-all``); the full run
is 50 users for 5 minutes (issue 14).

Each virtual user registers (``POST /api/identity/users``) and signs in with the password grant at
``/connect/token`` (client ``storefront``), or takes a pre-made token from ``--tokens`` (one per line), then
loops over the storefront mix until the time (``--duration``) or the request count (``--requests``) is used up:

    browse    GET  /api/catalog/products?page=N          search    GET /api/catalog/products?q=word
    details   GET  /api/catalog/products/{id}            cart      PUT /api/cart/items/{id} {quantity}
    checkout  POST /api/cart/checkout (after a cart line), then GET /api/orders/{id} at once (``order@202``)
    orders    GET /api/orders, GET /api/orders/{id}

A progress line is printed while it runs; at the end, per operation: requests, throughput, errors by status
(with the problem type of each refusal, e.g. ``409 insufficient-stock``) and latency percentiles; then the
throughput per window (10 s, or 1 minute for runs of 3 minutes or more) and the last full window over the first,
the worst p99, the 5xx, the 4xx split into those a shopper's own action explains (:data:`EXPLAINED`) and the
others (listed), the server's RSS over time and its CPU time per request (embedded: the figure to compare
versions by on a machine shared with other load, where throughput swings) and the generator's own CPU share.
``--shop-repo DIR`` runs the embedded shop of another checkout (say the main branch's, exported with
``git archive``) with this generator, so two versions are measured side by side with the same client. The headline figures
go to :func:`bench.report.figure`. ``--proxy-get PATH`` instead sends one plain GET as fast as it can from
``--concurrency`` connections, so the gateway's own cost shows next to a direct call of the upstream.

All the shoppers come from one address, so run a shop of your own with its per-address limits off for a load
test: ``ECOM_GATEWAY_RATE_LIMIT=0 ECOM_AUTH_REGISTRATIONS_PER_ADDRESS=0 ecom run``.

It only ever talks to 127.0.0.1: it is a load generator for your own machine, not for anyone else's.
HTTP goes through the gateway's own lean client (gateway/client.py), so the generator costs little CPU next
to what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from bench.report import figure, machine_line
from bench.shop import EmbeddedShop, RssSampler, port_listening
from gateway.client import Pool, UpstreamError
from identity.accounts import ADMIN_EMAIL  # the admin identity creates on its first run

DEFAULT_MIX = {"browse": 30, "search": 15, "details": 25, "cart": 15, "checkout": 5, "orders": 10}
SEARCH_WORDS = ("red", "shirt", "mug", "blue", "cap", "net", "green", "bag", "black", "pen")
ADDRESS = {
    "name": "Load Tester",
    "street": "1 Bench Street",
    "city": "Localhost",
    "postal_code": "12345",
    "country": "GB",
}
PAYMENT = {"method": "card", "token": "tok_visa"}
OK_STATUSES = range(200, 400)
# The 4xx a shopper's own action explains: asking for more units than are left (possible when many shoppers buy
# the same product at once, even with the shelves stocked up), and filling a cart past its limit of products.
# Anything else (a 404 of an order just accepted, a price change nobody made...) is listed as unexplained.
EXPLAINED = frozenset(
    {
        ("cart", 409, "insufficient-stock"),
        ("checkout", 409, "insufficient-stock"),
        ("cart", 409, "cart-full"),
    }
)
STOCK_UNITS = 1_000_000  # per product: more than 50 shoppers buy in 5 minutes, so 409s stay the exception
SIGN_IN_TIMEOUT = 60.0  # password hashing (argon2id) is slow on purpose: sign-up and sign-in may take seconds


class TargetRefused(ValueError):
    pass


def check_target(url: str) -> tuple[str, int]:
    """Only http://127.0.0.1:<port>: refuse every other host."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1":
        raise TargetRefused(f"refusing {url!r}: this load generator only targets http://127.0.0.1")
    return parts.hostname, parts.port or 80


# ---------------------------------------------------------------------------------------------------
# HTTP


class Http:
    """Keep-alive HTTP/1.1 to one 127.0.0.1 target."""

    def __init__(self, base: str, connections: int, timeout: float = 10.0) -> None:
        host, port = check_target(base)
        self.pool = Pool(host, port, limit=connections, buffer_limit=64 << 20, connect_timeout=5.0, name="target")
        self.host_line = f"Host: {host}:{port}\r\n"
        self.timeout = timeout

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """-> (status, body); status 0 when the connection failed or timed out."""
        lines = [f"{method} {path} HTTP/1.1\r\n", self.host_line, "User-Agent: ecom-bench-storefront\r\n"]
        if token:
            lines.append(f"Authorization: Bearer {token}\r\n")
        body: bytes | None = None
        if json is not None:
            body = orjson.dumps(json)
            lines.append("Content-Type: application/json\r\n")
        elif form is not None:
            body = urlencode(form).encode()
            lines.append("Content-Type: application/x-www-form-urlencoded\r\n")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        try:
            resp = await self.pool.request(
                "".join(lines).encode(), body, no_body=method == "HEAD", timeout=timeout or self.timeout
            )
            data = resp.body
            if data is None:
                parts = []
                while chunk := await resp.read():
                    parts.append(chunk)
                data = b"".join(parts)
        except UpstreamError:
            return 0, b""
        return resp.status, data

    async def close(self) -> None:
        await self.pool.close()


# ---------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class OpStats:
    latencies_ms: array = field(default_factory=lambda: array("d"))
    statuses: Counter = field(default_factory=Counter)
    # (409, "insufficient-stock"): every refusal and failure by status and problem type ("" when none was given)
    reasons: Counter[tuple[int, str]] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in OK_STATUSES)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


class Recorder:
    def __init__(self, limit: int = 0) -> None:
        self.ops: dict[str, OpStats] = {}
        self.total = 0
        self.limit = limit  # requests in all, 0 = no limit
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.sign_in: Recorder | None = None  # the sign-up/sign-in phase, reported apart
        self.window = 10.0  # seconds per throughput window (stability: the last full window against the first)
        self.windows: Counter[int] = Counter()  # window index -> requests completed in it
        self.rss: RssSampler | None = None  # the server's memory while the mix ran, when it was sampled

    def record(self, op: str, status: int, seconds: float, reason: str = "") -> None:
        stats = self.ops.get(op)
        if stats is None:
            stats = self.ops[op] = OpStats()
        stats.latencies_ms.append(seconds * 1000)
        stats.statuses[status] += 1
        if reason or status >= 400 or status == 0:
            stats.reasons[(status, reason)] += 1
        self.total += 1
        self.windows[int((time.perf_counter() - self.started) / self.window)] += 1

    def window_rates(self) -> list[float]:
        """Requests per second in each full window (a last, partial one is left out)."""
        full = int(self.elapsed / self.window)
        return [self.windows.get(i, 0) / self.window for i in range(full)]

    def stability(self) -> float:
        """Throughput of the last full window over the first (1.0 = steady; nan with fewer than two windows)."""
        rates = self.window_rates()
        return rates[-1] / rates[0] if len(rates) >= 2 and rates[0] else float("nan")

    def refusals(self) -> tuple[Counter[str], Counter[str], int]:
        """(4xx a shopper's own action explains, every other 4xx, 5xx count), the first two keyed by
        ``"<operation> <status> <problem type>"``."""
        explained: Counter[str] = Counter()
        unexplained: Counter[str] = Counter()
        server_errors = 0
        for op, stats in self.ops.items():
            for (status, reason), n in stats.reasons.items():
                key = f"{op} {status} {reason or '(no problem type)'}".strip()
                if status >= 500:
                    server_errors += n
                elif 400 <= status < 500:
                    (explained if (op, status, reason) in EXPLAINED else unexplained)[key] += n
        return explained, unexplained, server_errors

    @property
    def failures(self) -> int:
        """Requests that got no HTTP answer at all (connection refused or reset, time-out)."""
        return sum(s.statuses.get(0, 0) for s in self.ops.values())

    def worst_p99(self) -> tuple[str, float]:
        timed = [(s.percentile(0.99), op) for op, s in self.ops.items() if s.count]
        if not timed:
            return "", float("nan")
        p99, op = max(timed)
        return op, p99

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.total >= self.limit

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.ops.values())

    def report(self, summary: bool = True) -> str:
        """The table per operation; with ``summary``, then throughput windows, worst p99 and the refusals."""
        elapsed = self.elapsed
        rows = []
        if self.sign_in is not None and self.sign_in.ops:
            rows += ["sign-in phase:", self.sign_in.report(summary=False), "storefront mix:"]
        header = (
            f"{'operation':10s} {'requests':>9s} {'req/s':>9s} {'errors':>7s} {'p50 ms':>8s} {'p90 ms':>8s} "
            f"{'p99 ms':>8s} {'max ms':>8s}  statuses"
        )
        rows.append(header)
        for name in sorted(self.ops):
            s = self.ops[name]
            statuses = " ".join(f"{code}:{n}" for code, n in sorted(s.statuses.items()))
            typed = [(f"{code} {why}", n) for (code, why), n in s.reasons.most_common() if why]
            if typed:  # the problem types of the refusals, so every 4xx/5xx is explained
                statuses += " (" + ", ".join(f"{why}: {n}" for why, n in typed) + ")"
            rows.append(
                f"{name:10s} {s.count:9d} {s.count / elapsed:9.1f} {s.errors:7d} {s.percentile(0.5):8.2f} "
                f"{s.percentile(0.9):8.2f} {s.percentile(0.99):8.2f} {max(s.latencies_ms, default=0):8.2f}  {statuses}"
            )
        rows.append(f"{'total':10s} {self.total:9d} {self.total / elapsed:9.1f} {self.errors:7d}   in {elapsed:.1f} s")
        if not summary:
            return "\n".join(rows)
        rates = self.window_rates()
        if rates:
            rows.append(
                f"throughput per {self.window:g} s window (req/s): "
                + " ".join(f"{r:.0f}" for r in rates)
                + f"; last/first {self.stability():.2f}"
            )
        op, p99 = self.worst_p99()
        explained, unexplained, server_errors = self.refusals()
        rows.append(f"worst p99: {p99:.1f} ms ({op}); 5xx: {server_errors}; no answer: {self.failures}")
        rows.append(
            f"4xx explained by the shopper's own action: {sum(explained.values())}"
            + "".join(f"\n  {key}: {n}" for key, n in explained.most_common())
        )
        rows.append(
            f"4xx unexplained: {sum(unexplained.values())}"
            + "".join(f"\n  {key}: {n}" for key, n in unexplained.most_common())
        )
        if self.rss is not None:
            rows.append(self.rss.summary())
            if self.rss.wall and self.total:
                rows.append(
                    f"server CPU {self.rss.cpu:.1f} s in {self.rss.wall:.1f} s "
                    f"({100 * self.rss.cpu / self.rss.wall:.0f}% of one core): "
                    f"{1e6 * self.rss.cpu / self.total:.0f} us per request"
                )
        return "\n".join(rows)


async def progress(recorder: Recorder, stop: asyncio.Event, quiet: bool = False) -> None:
    """One status line, rewritten every second on a terminal; a new line every 5 s otherwise (logs)."""
    tty = sys.stderr.isatty()
    interval = 1.0 if tty else 5.0
    last_total, last_time = recorder.total, time.perf_counter()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
        now = time.perf_counter()
        rate = (recorder.total - last_total) / (now - last_time)
        last_total, last_time = recorder.total, now
        if not quiet:
            line = (
                f"[{now - recorder.started:6.1f} s] {recorder.total:8d} requests  {rate:8.1f} req/s  "
                f"errors {recorder.errors:6d}"
            )
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if not quiet and tty:
        print(file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Virtual users


class Shopper:
    def __init__(
        self, n: int, http: Http, recorder: Recorder, rng: random.Random, token: str | None, password: str
    ) -> None:
        self.n = n
        self.http = http
        self.recorder = recorder
        self.rng = rng
        self.token = token
        self.refresh_token: str | None = None
        self.expires_at = float("inf")
        self.email = f"shopper-{uuid.uuid4().hex[:12]}@bench.example"
        self.password = password
        self.products: list[str] = []
        self.orders: list[tuple[float, str]] = []  # (when accepted, order id)
        self.cart_lines = 0

    async def call(self, op: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One request, timed and recorded under ``op``; the body parsed when it is JSON."""
        start = time.perf_counter()
        status, body = await self.http.request(method, path, token=self.token, **kwargs)
        self.recorder.record(op, status, time.perf_counter() - start, _problem_type(status, body))
        if status in OK_STATUSES and body[:1] in (b"{", b"["):
            try:
                return status, orjson.loads(body)
            except orjson.JSONDecodeError:
                pass
        return status, None

    async def sign_in(self) -> bool:
        if self.token:
            return True
        status, _ = await self.call(
            "register",
            "POST",
            "/api/identity/users",
            json={"email": self.email, "password": self.password, "name": f"Shopper {self.n}"},
            timeout=SIGN_IN_TIMEOUT,
        )
        if status not in (201, 202, 409):  # 202: identity answers alike whether the email was taken or not
            return False
        return await self._token(
            {"grant_type": "password", "username": self.email, "password": self.password, "scope": "openid ecom"}
        )

    async def _token(self, form: dict[str, str]) -> bool:
        status, body = await self.call(
            "token", "POST", "/connect/token", form={**form, "client_id": "storefront"}, timeout=SIGN_IN_TIMEOUT
        )
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            return False
        self.token = body["access_token"]
        self.refresh_token = body.get("refresh_token")
        self.expires_at = time.monotonic() + float(body.get("expires_in", 900))
        return True

    async def step(self, op: str) -> None:
        if self.refresh_token and time.monotonic() > self.expires_at - 30:
            token, self.token = self.token, None
            if not await self._token({"grant_type": "refresh_token", "refresh_token": self.refresh_token}):
                self.token = token
        await getattr(self, f"op_{op}")()

    async def op_browse(self) -> None:
        _, body = await self.call("browse", "GET", f"/api/catalog/products?page={self.rng.randint(1, 5)}&page_size=20")
        self._learn_products(body)

    async def op_search(self) -> None:
        _, body = await self.call("search", "GET", f"/api/catalog/products?q={self.rng.choice(SEARCH_WORDS)}")
        self._learn_products(body)

    async def op_details(self) -> None:
        if not self.products:
            return await self.op_browse()
        await self.call("details", "GET", f"/api/catalog/products/{self.rng.choice(self.products)}")

    async def op_cart(self) -> None:
        if not self.products:
            return await self.op_browse()
        product = self.rng.choice(self.products)
        status, _ = await self.call(
            "cart", "PUT", f"/api/cart/items/{product}", json={"quantity": self.rng.randint(1, 3)}
        )
        if status in OK_STATUSES:
            self.cart_lines += 1

    async def op_checkout(self) -> None:
        if not self.cart_lines:
            return await self.op_cart()
        status, body = await self.call(
            "checkout",
            "POST",
            "/api/cart/checkout",
            json={"shipping_address": ADDRESS, "payment": PAYMENT},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        if status in OK_STATUSES:
            self.cart_lines = 0
            if isinstance(body, dict) and isinstance(body.get("order_id"), str):
                self.orders.append((time.monotonic(), body["order_id"]))
                # What a shop's "thank you" page does: follow the 202 at once. The order may not be recorded by the
                # order service yet; it must be answered anyway (status submitted or later), never 404 (issue 14).
                await self.call("order@202", "GET", f"/api/orders/{body['order_id']}")

    async def op_orders(self) -> None:
        if self.orders and self.rng.random() < 0.5:
            await self.call("order", "GET", f"/api/orders/{self.rng.choice(self.orders)[1]}")
        else:
            await self.call("orders", "GET", "/api/orders")

    def _learn_products(self, body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("items"), list):
            ids = [i["id"] for i in body["items"] if isinstance(i, dict) and isinstance(i.get("id"), str)]
            if ids:
                self.products = list(dict.fromkeys([*self.products, *ids]))[-200:]


def _problem_type(status: int, body: bytes) -> str:
    """The last part of a problem+json ``type`` (``insufficient-stock``, ``prices-changed``...) of a refusal."""
    if status < 400 or body[:1] != b"{":
        return ""
    try:
        problem = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    kind = problem.get("type") if isinstance(problem, dict) else None
    return kind.rstrip("/").rsplit("/", 1)[-1] if isinstance(kind, str) and kind else ""


async def stock_up(http: Http, admin_password: str, units: int) -> int:
    """Sign the admin in and set every product's stock (and max_stock) to ``units``; returns the products done."""
    form = {
        "grant_type": "password",
        "client_id": "storefront",
        "username": ADMIN_EMAIL,
        "password": admin_password,
        "scope": "openid ecom",
    }
    status, body = await http.request("POST", "/connect/token", form=form, timeout=SIGN_IN_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"admin sign-in for stocking up: {status} {body[:300]!r}")
    token = orjson.loads(body)["access_token"]
    done = 0
    for page in range(1, 1000):  # bounded: 100 000 products at most
        status, body = await http.request("GET", f"/api/catalog/products?page={page}&page_size=100", token=token)
        if status != 200:
            raise RuntimeError(f"listing products to stock up: {status} {body[:300]!r}")
        items = orjson.loads(body).get("items") or []
        if not items:
            break
        for item in items:
            path = f"/api/catalog/products/{item['id']}"
            status, body = await http.request(
                "PATCH", path, token=token, json={"max_stock": units, "available_stock": units}
            )
            if status != 200:
                raise RuntimeError(f"stocking up {path}: {status} {body[:300]!r}")
            done += 1
    return done


def parse_mix(text: str) -> dict[str, int]:
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_MIX:
            raise ValueError(f"unknown operation {name!r} in --mix (known: {', '.join(DEFAULT_MIX)})")
        mix[name] = int(weight)
    if not any(mix.values()):
        raise ValueError("--mix needs a positive weight")
    return mix


async def storefront(
    target: str,
    *,
    users: int,
    duration: float,
    requests: int = 0,
    tokens: Sequence[str] = (),
    mix: dict[str, int] | None = None,
    seed: int | None = None,
    sign_in_concurrency: int = 8,
    quiet: bool = False,
    admin_password: str | None = None,
    stock_units: int = STOCK_UNITS,
    server_pid: int | None = None,
) -> Recorder:
    """Sign every user in first (not timed against ``duration``: sign-in is deliberately slow), then run the
    mix for ``duration`` seconds or ``requests`` requests, whichever ends first.

    With ``admin_password``, every product is first stocked up to ``stock_units`` as the shop's operator
    would before a sale, so running out of stock does not dominate. With ``server_pid``, the server's RSS is
    sampled while the mix runs (``recorder.rss``)."""
    check_target(target)
    mix = mix or DEFAULT_MIX
    ops, weights = list(mix), list(mix.values())
    http = Http(target, connections=max(1, users))
    recorder = Recorder(limit=requests)
    recorder.window = 60.0 if duration >= 180 else 10.0
    stop = asyncio.Event()
    if admin_password:
        stocked = await stock_up(http, admin_password, stock_units)
        if not quiet:
            print(f"stocked {stocked} products up to {stock_units} units each", file=sys.stderr, flush=True)
    password = f"bench-{uuid.uuid4().hex}"
    master = random.Random(seed)
    shoppers = [
        Shopper(
            i, http, recorder, random.Random(master.random()), tokens[i % len(tokens)] if tokens else None, password
        )
        for i in range(users)
    ]
    loop = asyncio.get_running_loop()
    try:
        if not tokens:
            gate = asyncio.Semaphore(sign_in_concurrency)
            phase = recorder.sign_in = Recorder()

            async def sign_in(shopper: Shopper) -> bool:
                async with gate:
                    shopper.recorder = phase
                    try:
                        return await shopper.sign_in()
                    finally:
                        shopper.recorder = recorder

            signed = await asyncio.gather(*(sign_in(s) for s in shoppers))
            phase.finish()
            shoppers = [s for s, ok in zip(shoppers, signed, strict=True) if ok]
            if not quiet:
                print(
                    f"signed in {len(shoppers)} of {users} users in {phase.elapsed:.1f} s", file=sys.stderr, flush=True
                )

        async def run(shopper: Shopper) -> None:
            while not stop.is_set() and not recorder.exhausted:
                await shopper.step(shopper.rng.choices(ops, weights)[0])
            if recorder.exhausted:
                stop.set()

        recorder.started = time.perf_counter()  # throughput counts the mix, not the sign-in
        ticker = loop.create_task(progress(recorder, stop, quiet))
        if server_pid is not None:
            recorder.rss = RssSampler(server_pid, interval=10.0 if duration >= 180 else 2.0)
            sampling = loop.create_task(recorder.rss.run(stop))
        tasks = [loop.create_task(run(s)) for s in shoppers]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=duration)
            stop.set()
            if pending:
                await asyncio.wait(pending, timeout=15)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        stop.set()
        recorder.finish()
        await ticker
        if server_pid is not None:
            await sampling
    finally:
        stop.set()
        await http.close()
    return recorder


async def proxy_get(
    url: str,
    *,
    token: str | None = None,
    duration: float = 10.0,
    concurrency: int = 64,
    requests: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """GET one URL as fast as ``concurrency`` connections allow -> rps, p50/p99 (ms), failures."""
    parts = urlsplit(url)
    check_target(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    http = Http(f"{parts.scheme}://{parts.netloc}", connections=concurrency)
    recorder = Recorder(limit=requests)
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set() and not recorder.exhausted:
            start = time.perf_counter()
            status, _ = await http.request("GET", path, token=token)
            recorder.record("get", status, time.perf_counter() - start)

    ticker = asyncio.get_running_loop().create_task(progress(recorder, stop, quiet))
    workers = [asyncio.get_running_loop().create_task(worker()) for _ in range(concurrency)]
    await asyncio.wait(workers, timeout=duration)
    stop.set()
    await asyncio.wait(workers)
    await ticker
    await http.close()
    stats = recorder.ops.get("get", OpStats())
    elapsed = time.perf_counter() - recorder.started
    result = {
        "rps": stats.count / elapsed,
        "p50": stats.percentile(0.5),
        "p99": stats.percentile(0.99),
        "non2xx": sum(n for code, n in stats.statuses.items() if code not in OK_STATUSES and code != 0),
        "socket_errors": stats.statuses.get(0, 0),
    }
    if not quiet:
        print(recorder.report())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from config import load_settings

    parser = argparse.ArgumentParser(prog="ecom bench storefront", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="gateway base URL (default: this machine's gateway port)")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="start the embedded shop as a child process for the run (the default when no --target is given "
        "and nothing listens on the gateway port)",
    )
    parser.add_argument("--quick", action="store_true", help="a short bounded run: 20 users, 30 s (bench.all)")
    parser.add_argument("--users", type=int, default=None, help="virtual users (default 50; 20 with --quick)")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default 300; 30 with --quick)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many requests (default: no limit)")
    parser.add_argument("--tokens", help="file of pre-made access tokens, one per line (skips sign-up)")
    parser.add_argument("--mix", default=None, help="operation weights, e.g. browse=30,search=15,details=25,...")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sign-in-concurrency", type=int, default=8, help="users signing up/in at once (default 8)")
    parser.add_argument("--proxy-get", metavar="PATH", help="only GET this path, as fast as possible")
    parser.add_argument("--concurrency", type=int, default=64, help="connections for --proxy-get (default 64)")
    parser.add_argument("--token", help="bearer token for --proxy-get")
    parser.add_argument(
        "--shop-repo",
        default=None,
        help="with --embedded: run the shop of this checkout (e.g. the main branch's, to compare two versions "
        "with the same generator)",
    )
    args = parser.parse_args(argv)
    users = args.users if args.users is not None else (20 if args.quick else 50)
    duration = args.duration if args.duration is not None else (30.0 if args.quick else 300.0)
    if args.embedded and args.target:
        parser.error("--embedded starts its own shop: leave --target out")

    try:
        # --embedded needs no settings: it starts its own shop on ports of its own
        target = "" if args.embedded else (args.target or load_settings().base_url("gateway")).rstrip("/")
        port = 0 if args.embedded else check_target(target)[1]
        tokens: list[str] = []
        if args.tokens:
            with open(args.tokens, encoding="utf-8") as fh:
                tokens = [line.strip() for line in fh if line.strip()]
            if not tokens:
                parser.error(f"{args.tokens} holds no tokens")
        mix = parse_mix(args.mix) if args.mix else None
    except (TargetRefused, ValueError) as exc:
        print(f"ecom bench storefront: {exc}", file=sys.stderr)
        return 2
    embedded = args.embedded or (not args.target and not port_listening(port))
    if not embedded:
        return _run(args, target, users, duration, tokens, mix, shop=None)
    shop = EmbeddedShop(repo=Path(args.shop_repo).resolve()) if args.shop_repo else EmbeddedShop()
    print("starting the embedded shop (python -m runtime.cli run) ...", file=sys.stderr, flush=True)
    try:
        took = shop.start()
    except RuntimeError as exc:
        shop.stop()
        print(f"ecom bench storefront: {exc}", file=sys.stderr)
        return 1
    print(f"embedded shop ready at {shop.url} in {took:.1f} s (pid {shop.proc.pid if shop.proc else '?'})", flush=True)
    try:
        return _run(args, shop.url, users, duration, tokens, mix, shop=shop)
    finally:
        code = shop.stop()
        print(f"embedded shop stopped (exit status {code})", flush=True)


def _run(
    args: argparse.Namespace,
    target: str,
    users: int,
    duration: float,
    tokens: list[str],
    mix: dict[str, int] | None,
    shop: EmbeddedShop | None,
) -> int:
    if args.proxy_get:
        result = asyncio.run(
            proxy_get(
                target + args.proxy_get,
                token=args.token,
                duration=duration,
                concurrency=args.concurrency,
                requests=args.requests,
            )
        )
        failures = result["non2xx"] + result["socket_errors"]
        print(
            f"GET {args.proxy_get}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, "
            f"p99 {result['p99']:.2f} ms, failures {failures}"
        )
        return 0
    bound = f", at most {args.requests} requests" if args.requests else ""
    where = "the embedded shop (started for this run)" if shop else target
    print(f"storefront mix against {where}: {users} users, {duration:g} s{bound}", flush=True)
    print(machine_line(shop.python if shop else None))
    load_before, cpu_before, wall_before = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    recorder = asyncio.run(
        storefront(
            target,
            users=users,
            duration=duration,
            requests=args.requests,
            tokens=tokens,
            mix=mix,
            seed=args.seed,
            sign_in_concurrency=args.sign_in_concurrency,
            admin_password=shop.admin_password if shop else None,
            server_pid=shop.proc.pid if shop and shop.proc else None,
        )
    )
    print(recorder.report())
    # The generator shares the machine with what it measures: its own CPU share tells whether it was the limit.
    cpu, wall = _cpu_seconds() - cpu_before, time.perf_counter() - wall_before
    print(
        f"load generator CPU {cpu:.1f} s in {wall:.1f} s ({100 * cpu / wall:.0f}% of one core); "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores"
    )
    if recorder.total == 0:
        print("no requests were made: is the gateway (and identity) running?", file=sys.stderr)
        return 1
    report_figures(recorder, users, duration, embedded=shop is not None)
    return 0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def report_figures(recorder: Recorder, users: int, duration: float, *, embedded: bool) -> None:
    """The headline figures of issue 14 for ``bench.all``'s table."""
    where = "embedded" if embedded else "running shop"
    run = f"{where}, {users} users, {duration:g} s"
    op, p99 = recorder.worst_p99()
    explained, unexplained, server_errors = recorder.refusals()
    figure("storefront", f"{run}: throughput", recorder.total / recorder.elapsed, "req/s", ">= 3000")
    figure("storefront", f"{run}: worst p99 of any operation ({op})", p99, "ms", "<= 100 ms")
    figure(
        "storefront",
        f"{run}: last / first {recorder.window:g} s window",
        recorder.stability(),
        "",
        ">= 0.9",
    )
    figure("storefront", f"{run}: 5xx", server_errors, "", "0")
    figure("storefront", f"{run}: unexplained 4xx", sum(unexplained.values()), "", "0")
    figure("storefront", f"{run}: requests with no answer", recorder.failures, "", "0")
    figure("storefront", f"{run}: 4xx explained by the shopper's action", sum(explained.values()))
    if recorder.rss is not None and recorder.rss.samples:
        values = [mib for _, mib in recorder.rss.samples]
        figure("storefront", f"{run}: server RSS max", max(values), "MiB")
        figure(
            "storefront", f"{run}: server RSS growth (last - first sample)", values[-1] - values[0], "MiB", "bounded"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
