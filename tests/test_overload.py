"""Overload: the embedded default (``ecom run``: one process, SQLite files, in-memory bus) under a checkout burst of
several times what it can sustain, for 60 s.

64 buyers hammer checkout with small carts (1-2 lines) through the gateway; admission limits are set low
(ECOM_SHOP_MAX_OPEN_ORDERS=200, ECOM_SHOP_MAX_OUTBOX_BACKLOG=2000) so that admission control has to act. Then:

* every accepted checkout (202) has an order, and every such order ends ``paid`` or ``cancelled`` within the longest
  saga deadline + 60 s after the burst;
* outbox rows per order stay within the bound stated in :mod:`actors.order.actor` for the order's line count
  (:func:`~actors.order.actor.outbox_bound`, plus one ``ReleaseStock`` per late ``StockReserved`` and one
  ``ReversePayment`` per late ``PaymentSucceeded`` after a cancellation), and no kind of request is re-sent more
  than ``max_resends`` times (``ReserveStock`` <= lines x (1 + R), ``ProcessPayment`` <= 1 + R). The bound is per
  order's *lines*, not a fixed 20: the buyer adds 1-2 products per round, but the cart drops what an order took
  only on ``OrderStarted``, so under load a buyer's next checkout still holds the products of a checkout whose
  order has not started yet, and orders of 10+ lines are normal here (the max is reported);
* the process's memory (VmRSS) comes back near where it was before the burst: after <= before x 1.5 + 50 MB
  (before / peak / after reported), waiting a bounded time for it to settle;
* every refused checkout got 503 with a Retry-After header (no other 5xx, no timeout, no dropped connection), and
  the orders in the saga never went far past the admission limit (<= limit + one in-flight checkout per buyer).

Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from actors.order.actor import SagaTimings, outbox_bound
from tests.support.cluster import (
    ADDRESS,
    PORT_OFFSET,
    REPO_ROOT,
    admin_token,
    bearer,
    embedded_env,
    free_base_port,
    new_email,
    register,
    request_json,
    retry_after_of,
)

BUYERS = 64
BURST_SECONDS = 60.0
MAX_OPEN_ORDERS = 200
MAX_OUTBOX_BACKLOG = 2000
PAYMENT_TIMEOUT = 10.0
VALIDATION_TIMEOUT = 15.0
SETTLE_LIMIT = VALIDATION_TIMEOUT + PAYMENT_TIMEOUT + 60.0
MEMORY_SETTLE = 30.0  # seconds memory may take to come back after the orders settled
MAX_RESENDS = SagaTimings().max_resends  # the service's default (not overridden in ENV)
PRODUCTS = 20
STOCK = 10_000_000
PAYMENT_TOKENS = (("tok_visa", 0.8), ("tok_decline", 0.1), ("tok_timeout", 0.1))
FINAL = ("paid", "cancelled")
TEST_TIMEOUT = 300.0
ENV = {
    "ECOM_SHOP_MAX_OPEN_ORDERS": str(MAX_OPEN_ORDERS),
    "ECOM_SHOP_MAX_OUTBOX_BACKLOG": str(MAX_OUTBOX_BACKLOG),
    "ECOM_SHOP_PAYMENT_TIMEOUT": str(PAYMENT_TIMEOUT),
    "ECOM_SHOP_VALIDATION_TIMEOUT": str(VALIDATION_TIMEOUT),
    "ECOM_SHOP_RETRY_INTERVAL": "1",
    "ECOM_SHOP_RETRY_MAX_INTERVAL": "4",
    "ECOM_GATEWAY_RATE_LIMIT": "0",
    "ECOM_LOG_LEVEL": "WARNING",
}


@dataclass
class Embedded:
    proc: subprocess.Popen[bytes]
    base: int
    data_dir: Path
    log_path: Path

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    def db(self, service: str) -> Path:
        return self.data_dir / f"{service}.db"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")


@pytest.fixture
async def embedded(tmp_path) -> AsyncIterator[Embedded]:
    base = free_base_port(len(PORT_OFFSET))
    data_dir = tmp_path / "var"
    log_path = tmp_path / "ecom.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run"],
            env=embedded_env(base, data_dir, **ENV),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running = Embedded(proc, base, data_dir, log_path)
        try:
            await _wait_ready(running)
            yield running
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def _wait_ready(e: Embedded) -> None:
    deadline = time.monotonic() + 60
    pending = {e.base + offset for offset in PORT_OFFSET.values()}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        while pending:
            assert e.proc.poll() is None, f"ecom run exited with {e.proc.returncode}\n{e.log_tail()}"
            for port in sorted(pending):
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                        if resp.status == 200:
                            pending.discard(port)
            assert time.monotonic() < deadline, f"not ready in 60 s: {sorted(pending)}\n{e.log_tail()}"
            await asyncio.sleep(0.3)


# ---------------------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.accepted: dict[str, str] = {}  # order id -> payment token

    def note(self, kind: str, example: str = "") -> None:
        self.counts[kind] += 1
        if example and len(self.examples[kind]) < 5:
            self.examples[kind].append(example)


async def test_checkout_burst_is_admitted_or_refused_with_retry_after_and_everything_settles(embedded: Embedded):
    async with asyncio.timeout(TEST_TIMEOUT):
        await _run(embedded)


async def _run(e: Embedded) -> None:
    gateway = e.gateway
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as http:
        admin = await admin_token(http, gateway)
        products = await _stock_products(http, gateway, admin)
        sem = asyncio.Semaphore(8)

        async def new_buyer(i: int) -> str:
            async with sem:
                return await register(http, gateway, new_email(f"burst{i}"))

        tokens = await asyncio.gather(*(new_buyer(i) for i in range(BUYERS)))
        await asyncio.sleep(2)
        rss_before = e.rss_mb()
        samples: list[dict[str, float]] = []
        burst_end = time.monotonic() + BURST_SECONDS
        sampler = asyncio.create_task(_sample(e, samples, burst_end))
        started = time.monotonic()
        await asyncio.gather(
            *(_buyer(http, gateway, token, products, burst_end, tally, i) for i, token in enumerate(tokens))
        )
        burst_seconds = time.monotonic() - started
        await sampler

    settle_started = time.monotonic()
    states = await _settle(e, set(tally.accepted))
    settle_seconds = time.monotonic() - settle_started
    rss_after, memory_wait = await _memory_after(e, rss_before)
    rss_peak = max([s["rss"] for s in samples] + [rss_before, rss_after])
    outbox = _outbox_per_order(e, set(tally.accepted))
    lines = _lines_per_order(e)

    problems: list[str] = []

    def check(kind: str, bad: list[str]) -> None:
        if bad:
            problems.append(f"- {kind}: {len(bad)}; e.g. " + " | ".join(bad[:5]))

    accepted = tally.accepted
    check("lost orders (202 given, no order)", [o for o in accepted if o not in states])
    check(
        f"orders not paid/cancelled within {SETTLE_LIMIT:g}s after the burst",
        [f"{o} {states[o]}" for o in accepted if o in states and states[o] not in FINAL],
    )
    check(
        "paid orders with a declined/timed-out payment token",
        [o for o, t in accepted.items() if t != "tok_visa" and states.get(o) == "paid"],
    )
    totals = {o: sum(kinds.values()) for o, kinds in outbox.items()}
    over = sorted(((n, o) for o, n in totals.items() if n > _row_bound(lines.get(o, 0))), reverse=True)
    check(
        "orders with more outbox rows than the stated bound for their lines",
        [
            f"{o} ({states.get(o)}, {lines.get(o, 0)} lines, bound {_row_bound(lines.get(o, 0))}): {n} {dict(outbox[o])}"
            for n, o in over
        ],
    )
    sends = 1 + MAX_RESENDS
    check(
        f"orders re-sending a request more than max_resends={MAX_RESENDS} times",
        [
            f"{o} ({states.get(o)}, {lines.get(o, 0)} lines): {dict(kinds)}"
            for o, kinds in outbox.items()
            if kinds["ReserveStock"] > lines.get(o, 0) * sends or kinds["ProcessPayment"] > sends
        ],
    )
    memory_bound = rss_before * 1.5 + 50
    if rss_after > memory_bound:
        problems.append(
            f"- memory did not come back: before {rss_before:.0f} MB, peak {rss_peak:.0f} MB, after {rss_after:.0f} MB "
            f"(bound {memory_bound:.0f} MB, waited {memory_wait:.0f}s)"
        )
    for kind in sorted(tally.counts):
        if kind.startswith(("refused without 503", "503 without Retry-After")):
            problems.append(f"- checkout {kind}: {tally.counts[kind]}; e.g. " + " | ".join(tally.examples[kind]))
    peak_open = max((s["open"] for s in samples), default=0)
    if peak_open > MAX_OPEN_ORDERS + BUYERS:
        problems.append(
            f"- admission did not hold: up to {peak_open:.0f} orders in the saga at once with ECOM_SHOP_MAX_OPEN_ORDERS="
            f"{MAX_OPEN_ORDERS} ({tally.counts['checkout 503']} checkouts refused with 503)"
        )

    statuses = collections.Counter(states.get(o, "missing") for o in accepted)
    print(f"\n[overload] embedded on {gateway}; {BUYERS} buyers for {burst_seconds:.0f}s; settle {settle_seconds:.1f}s")
    print(
        f"[overload] checkouts accepted {len(accepted)} ({len(accepted) / burst_seconds:.1f}/s); orders {dict(statuses)}"
    )
    print(f"[overload] answers: {dict(sorted(tally.counts.items()))}")
    print(f"[overload] orders in the saga: peak {peak_open:.0f} (limit {MAX_OPEN_ORDERS}); unsent outbox rows: peak "
          f"{max((s['backlog'] for s in samples), default=0):.0f} (limit {MAX_OUTBOX_BACKLOG})")  # fmt: skip
    if totals:
        values = sorted(totals.values())
        print(f"[overload] outbox rows per order: max {values[-1]}, median {values[len(values) // 2]}, "
              f"mean {sum(values) / len(values):.1f} over {len(values)} orders; lines per order: max "
              f"{max(lines.values(), default=0)}")  # fmt: skip
    print(f"[overload] memory VmRSS: before {rss_before:.0f} MB, peak {rss_peak:.0f} MB, after {rss_after:.0f} MB "
          f"(bound {memory_bound:.0f} MB, settled after {memory_wait:.0f}s)")  # fmt: skip
    print(f"[overload] {len(problems)} problem(s)" + (":\n" + "\n".join(problems) if problems else ""))
    assert len(accepted) > 0, "no checkout was accepted at all"
    assert not problems, (
        "overload invariants violated:\n" + "\n".join(problems) + "\n--- log tail ---\n" + e.log_tail(3000)
    )


async def _stock_products(http: aiohttp.ClientSession, gateway: str, admin: str) -> list[str]:
    """PRODUCTS products with stock enough that the burst never runs out (refusals then come from admission)."""
    status, body, _ = await request_json(http, "GET", f"{gateway}/api/catalog/products?page_size=100&sort=name")
    assert status == 200, body
    ids = [p["id"] for p in body["items"][:PRODUCTS]]
    for product_id in ids:
        status, body, _ = await request_json(
            http,
            "PATCH",
            f"{gateway}/api/catalog/products/{product_id}",
            json={"max_stock": STOCK, "available_stock": STOCK},
            headers=bearer(admin),
        )
        assert status == 200, body
    return ids


async def _buyer(
    http: aiohttp.ClientSession, gateway: str, token: str, products: list[str], end: float, tally: Tally, index: int
) -> None:
    rng = random.Random(index)
    headers = bearer(token)

    async def refused(status: int | str, resp_headers: Any, what: str, body: Any) -> None:
        """A refusal: 503 must say when to come back; the buyer waits that long (at most 1 s) and tries again."""
        if status == 503:
            retry_after = retry_after_of(resp_headers) if resp_headers is not None else None
            tally.note(f"{what} 503")
            if retry_after is None:
                tally.note(f"503 without Retry-After ({what})", str(body)[:160])
            await asyncio.sleep(min(1.0, retry_after or 0.2) * rng.uniform(0.5, 1.0))
        else:
            tally.note(f"refused without 503 ({what} {status})", str(body)[:160])
            await asyncio.sleep(0.2)

    while time.monotonic() < end:
        for product_id in rng.sample(products, rng.choice((1, 2))):
            status, body, resp_headers = await _attempt(
                http, "PUT", f"{gateway}/api/cart/items/{product_id}", headers, {"quantity": 1}
            )
            if status != 200:
                if isinstance(status, int) and status < 500:
                    tally.note(f"PUT {status}")
                else:
                    await refused(status, resp_headers, "PUT", body)
        key = str(uuid.uuid4())
        payment = rng.choices([t for t, _ in PAYMENT_TOKENS], [w for _, w in PAYMENT_TOKENS])[0]
        body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": payment}}
        while time.monotonic() < end:
            status, answer, resp_headers = await _attempt(
                http, "POST", f"{gateway}/api/cart/checkout", {**headers, "Idempotency-Key": key}, body
            )
            if status == 202:
                tally.note("checkout 202")
                tally.accepted[answer["order_id"]] = payment
                break
            if isinstance(status, int) and status < 500:
                tally.note(f"checkout {status}")  # e.g. 409: the cart was emptied by an earlier order's OrderStarted
                break
            await refused(status, resp_headers, "checkout", answer)


async def _attempt(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any
) -> tuple[Any, Any, Any]:
    """(status, body, headers); a timeout or a dropped connection comes back as the exception's name."""
    try:
        async with http.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            try:
                parsed: Any = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                parsed = text
            return resp.status, parsed, resp.headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        return type(exc).__name__, str(exc), None


# ---------------------------------------------------------------------------------------------------
# Reading the process and its databases


def _sqlite(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


async def _sample(e: Embedded, samples: list[dict[str, float]], end: float) -> None:
    """Once a second during the burst: RSS, orders in the saga, unsent outbox rows."""
    while time.monotonic() < end:
        open_orders = await asyncio.to_thread(
            _sqlite, e.db("order"), "SELECT count(*) FROM orders WHERE status NOT IN ('paid', 'cancelled', 'shipped')"
        )
        backlog = 0
        for service in ("cart", "order", "catalog"):
            rows = await asyncio.to_thread(_sqlite, e.db(service), "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            backlog += rows[0][0] if rows else 0
        samples.append({"rss": e.rss_mb(), "open": open_orders[0][0] if open_orders else 0, "backlog": backlog})
        await asyncio.sleep(1)


async def _settle(e: Embedded, wanted: set[str]) -> dict[str, str]:
    """Order id -> status from the order actors' stored state, once every wanted order ended (or the limit passed)."""
    end = time.monotonic() + SETTLE_LIMIT
    while True:
        rows = await asyncio.to_thread(
            _sqlite, e.db("order"), "SELECT actor_id, state FROM actor_state WHERE actor_type = 'order'"
        )
        states = {actor_id: orjson.loads(state).get("status", "") for actor_id, state in rows}
        if all(states.get(o) in FINAL for o in wanted) or time.monotonic() > end:
            return states
        await asyncio.sleep(1)


async def _memory_after(e: Embedded, before: float) -> tuple[float, float]:
    """VmRSS once it is back under the bound, or after MEMORY_SETTLE seconds; and how long that took."""
    started = time.monotonic()
    while True:
        rss = e.rss_mb()
        if rss <= before * 1.5 + 50 or time.monotonic() - started > MEMORY_SETTLE:
            return rss, time.monotonic() - started
        await asyncio.sleep(1)


def _row_bound(lines: int) -> int:
    """Outbox rows one order of ``lines`` lines may write (actors.order.actor's docstring): outbox_bound, plus after a
    cancellation one ReleaseStock per late StockReserved (<= lines x (1+R)) and one ReversePayment per late
    PaymentSucceeded (<= 1+R). The simulated provider confirms reversals at once, so no unconfirmed-reversal wakes."""
    timings = SagaTimings(
        validation_timeout=VALIDATION_TIMEOUT, payment_timeout=PAYMENT_TIMEOUT, retry_interval=1, retry_max_interval=4
    )
    sends = 1 + timings.max_resends
    return outbox_bound(lines, timings) + lines * sends + sends


def _lines_per_order(e: Embedded) -> dict[str, int]:
    rows = _sqlite(e.db("order"), "SELECT actor_id, state FROM actor_state WHERE actor_type = 'order'")
    return {actor_id: len(orjson.loads(state).get("lines") or []) for actor_id, state in rows}


def _outbox_per_order(e: Embedded, orders: set[str]) -> dict[str, collections.Counter[str]]:
    """Outbox rows of the order service per order (by correlation id, else session id), counted by message type."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for (envelope,) in _sqlite(e.db("order"), "SELECT envelope FROM outbox"):
        data = orjson.loads(envelope)
        key = data.get("correlation_id") or data.get("session_id")
        if key in orders:
            counts[key][data.get("type", "?")] += 1
    return dict(counts)
