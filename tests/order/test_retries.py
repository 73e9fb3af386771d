"""Saga timings from the settings, and re-sends without a retry storm: back-off, a bound per message, never a copy
queued behind one that has not left the outbox yet."""

from __future__ import annotations

import random

import pytest

from actors.order.actor import SagaTimings, backoff, outbox_bound
from actors.order.service import timings_from
from config import load_settings
from contracts.stock import ReleaseStock, ReserveStock
from tests.order.conftest import eventually, outbox_of, service_env

# Fast enough that every re-send happens well within the deadline, even on a slow CI database.
QUICK = SagaTimings(
    validation_timeout=3.0, payment_timeout=3.0, retry_interval=0.05, retry_max_interval=0.2, max_resends=3
)


def types_of(envelopes) -> list[str]:
    return [e.type for e in envelopes]


# ---------------------------------------------------------------------------------------------------
# Settings


def test_timings_come_from_the_shop_settings(tmp_path):
    env = service_env(
        tmp_path,
        ECOM_SHOP_PAYMENT_TIMEOUT="7",
        ECOM_SHOP_VALIDATION_TIMEOUT="70",
        ECOM_SHOP_RETRY_INTERVAL="2.5",
        ECOM_SHOP_RETRY_MAX_INTERVAL="40",
    )
    timings = timings_from(load_settings(env))
    assert (timings.payment_timeout, timings.validation_timeout) == (7.0, 70.0)
    assert (timings.retry_interval, timings.retry_max_interval) == (2.5, 40.0)


async def test_a_changed_payment_timeout_reaches_the_running_saga(make_orders, catalog, tmp_path):
    settings = load_settings(service_env(tmp_path, ECOM_SHOP_PAYMENT_TIMEOUT="1"))
    orders = await make_orders(settings=settings, timings=None)  # None: what the service reads from settings
    product = catalog.add(stock=2)
    request = await orders.checkout((product, "10.00", 1), token="tok_timeout")
    await orders.wait_status(request.order_id, "stock_confirmed")
    state = await orders.wait_status(request.order_id, "cancelled", timeout=5)
    assert "payment did not complete within 1s" in state["history"][-1]["reason"]
    await orders.settle()
    assert catalog.stock[product] == 2


# ---------------------------------------------------------------------------------------------------
# Back-off


@pytest.mark.parametrize("attempt", range(8))
def test_the_backoff_doubles_with_full_jitter_and_is_capped(attempt):
    timings = SagaTimings(retry_interval=1.0, retry_max_interval=20.0)
    ceiling = min(20.0, 2.0 ** (attempt + 1))
    rng = random.Random(attempt)
    delays = [backoff(attempt, timings, rng) for _ in range(400)]
    assert all(1.0 <= d <= ceiling for d in delays)
    # Spread over the window (jitter), not bunched at one end: a burst of orders does not wake together.
    width = ceiling - 1.0
    assert min(delays) < 1.0 + width * 0.1 and max(delays) > ceiling - width * 0.1


def test_a_huge_attempt_number_stays_at_the_cap():
    timings = SagaTimings(retry_interval=1.0, retry_max_interval=300.0)
    assert all(1.0 <= backoff(10_000, timings) <= 300.0 for _ in range(100))


# ---------------------------------------------------------------------------------------------------
# Re-sends in a running saga


async def test_outbox_rows_per_order_stay_bounded_when_the_catalog_never_answers(make_orders, catalog):
    orders = await make_orders(timings=QUICK)
    a, b = catalog.add(), catalog.add()
    catalog.drop = 10_000  # it takes every reservation and never answers
    request = await orders.checkout((a, "10.00", 1), (b, "10.00", 1))
    state = await orders.wait_status(request.order_id, "cancelled", timeout=10)
    await orders.settle()

    assert "stock check did not complete" in state["history"][-1]["reason"]
    rows = await outbox_of(orders.engine, request.order_id)
    reserves = [e for e in rows if e.type == ReserveStock.__name__]
    # Every line was asked 1 + max_resends times (the deadline left room for all), and not once more.
    assert len(reserves) == 2 * (1 + QUICK.max_resends)
    assert [line["resends"] for line in state["lines"]] == [QUICK.max_resends] * 2
    assert len(rows) <= outbox_bound(2, QUICK), types_of(rows)
    assert types_of(rows).count(ReleaseStock.__name__) == 2
    assert len(catalog.of(ReserveStock)) == len(reserves)


async def test_nothing_is_sent_again_while_the_first_copy_is_still_queued(make_orders, catalog):
    timings = SagaTimings(validation_timeout=1.0, payment_timeout=3, retry_interval=0.05, retry_max_interval=0.1)
    orders = await make_orders(timings=timings)
    relay = orders.runtime.relay
    await relay.stop()  # the outbox does not drain (a bus outage, or a backlog): every message stays queued
    a, b = catalog.add(stock=3), catalog.add(stock=3)
    request = await orders.checkout((a, "10.00", 1), (b, "10.00", 1))
    state = await orders.wait_status(request.order_id, "cancelled", timeout=10)
    assert "stock check did not complete" in state["history"][-1]["reason"]
    assert len(state["history"]) == 3 and [line["resends"] for line in state["lines"]] == [0, 0]

    rows = await outbox_of(orders.engine, request.order_id)
    assert types_of(rows).count(ReserveStock.__name__) == 2, "the wakes found them queued: no copies behind them"
    assert await relay.pending() == len(rows), "none of them left"

    relay.start()  # the bus is back: the queued requests go, then the releases of the cancelled order
    await orders.settle()
    await eventually(lambda: catalog.stock == {a: 3, b: 3} and not catalog.reservations, what="stock given back")
    assert len(catalog.of(ReserveStock)) == 2


async def test_a_payment_request_is_sent_again_at_most_max_resends_times(make_orders, catalog):
    orders = await make_orders(timings=QUICK)
    product = catalog.add(stock=2)
    request = await orders.checkout((product, "10.00", 1), token="tok_timeout")  # the charge never completes
    state = await orders.wait_status(request.order_id, "cancelled", timeout=10)
    await orders.settle()

    assert "payment did not complete" in state["history"][-1]["reason"]
    rows = types_of(await outbox_of(orders.engine, request.order_id))
    assert rows.count("ProcessPayment") == 1 + QUICK.max_resends
    assert state["payment"]["requests"] == 1 + QUICK.max_resends
    assert len(rows) <= outbox_bound(1, QUICK), rows
    assert catalog.stock[product] == 2
