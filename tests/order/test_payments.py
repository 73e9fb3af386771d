"""Exactly one charge per order across crashes: the payment simulator's durable idempotency keys, and the order
service finishing (or refunding) a charge whose result died with the process that asked for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from actors.order import service
from actors.order.actor import SagaTimings
from actors.order.payment import ChargeRequest, SimulatedPaymentProvider
from runtime.store import create_engine
from tests.order.conftest import eventually, migrate, stop_bounded

HAPPY_PATH = ["submitted", "awaiting_validation", "stock_confirmed", "paid"]


def request_for(key: str, token: str = "tok_visa", amount: str = "25.00") -> ChargeRequest:
    return ChargeRequest(key, Decimal(amount), "USD", "card", token)


@pytest.fixture
async def engine(db_url) -> AsyncIterator:
    """The order service's database, migrated (the simulator's table is part of its schema), without a service."""
    await migrate(db_url, service.SCHEMA)
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


async def _status_is(provider: SimulatedPaymentProvider, key: str, status: str) -> bool:
    record = await provider.record(key)
    return record is not None and record.status == status


# ---------------------------------------------------------------------------------------------------
# The simulator's keys


async def test_a_charge_whose_result_was_lost_is_not_made_again(engine):
    first = SimulatedPaymentProvider(engine=engine)
    made = await first.charge(request_for("order-1"))
    # The process that asked dies before its order learns the result: only the provider remembers it. A new process
    # has a new provider client with nothing in memory.
    again = await SimulatedPaymentProvider(engine=engine).charge(request_for("order-1"))
    assert made.approved and again == made, "the first result, with the first charge's id"
    record = await first.record("order-1")
    assert (record.status, record.amount, record.currency, record.attempts) == ("approved", Decimal("25.00"), "USD", 2)
    assert len(await first.records()) == 1


async def test_a_charge_interrupted_mid_way_is_finished_once_by_the_retry(engine):
    dying = SimulatedPaymentProvider(engine=engine, latency=5.0)
    attempt = asyncio.create_task(dying.charge(request_for("order-2")))
    await eventually(lambda: _status_is(dying, "order-2", "pending"), what="the charge to be taken on")
    attempt.cancel()  # the process is killed while the provider works on the charge
    await asyncio.gather(attempt, return_exceptions=True)

    retries = [SimulatedPaymentProvider(engine=engine) for _ in range(3)]
    results = await asyncio.gather(*(p.charge(request_for("order-2")) for p in retries))
    assert all(r.approved for r in results) and len({r.charge_id for r in results}) == 1, "one charge, one id"
    record = await dying.record("order-2")
    assert record.status == "approved" and record.charge_id == results[0].charge_id and record.attempts == 4


async def test_a_declined_key_stays_declined_and_a_key_is_for_one_amount(engine):
    provider = SimulatedPaymentProvider(engine=engine)
    declined = await provider.charge(request_for("order-3", token="tok_decline"))
    assert not declined.approved and declined.code == "card_declined"
    assert await SimulatedPaymentProvider(engine=engine).charge(request_for("order-3", token="tok_visa")) == declined

    await provider.charge(request_for("order-4"))
    other_amount = await provider.charge(request_for("order-4", amount="99.00"))
    assert not other_amount.approved and other_amount.code == "idempotency_key_reused"
    assert (await provider.record("order-4")).amount == Decimal("25.00")


async def test_reversal_voids_an_unused_key_and_refunds_a_charge_once(engine):
    provider = SimulatedPaymentProvider(engine=engine)
    # Reversed before any charge: the key is voided, and a charge still on its way is declined.
    assert not (await provider.reverse("order-5", "cancelled by the buyer")).refunded
    late = await SimulatedPaymentProvider(engine=engine).charge(request_for("order-5"))
    assert not late.approved and late.code == "voided"
    assert await provider.charged("order-5") is None

    made = await provider.charge(request_for("order-6"))
    first, second = await provider.reverse("order-6", "timeout"), await provider.reverse("order-6", "timeout")
    assert first.refunded and second.refunded
    record = await provider.record("order-6")
    assert record.status == "refunded" and record.charge_id == made.charge_id
    # Charging the key again answers the first result; it does not charge anew.
    assert await provider.charge(request_for("order-6")) == made
    assert (await provider.record("order-6")).status == "refunded"


async def test_a_charge_in_flight_when_the_key_is_voided_is_declined(engine):
    slow = SimulatedPaymentProvider(engine=engine, latency=0.5)
    attempt = asyncio.create_task(slow.charge(request_for("order-7")))
    await eventually(lambda: _status_is(slow, "order-7", "pending"), what="the charge to be taken on")
    assert not (await SimulatedPaymentProvider(engine=engine).reverse("order-7", "cancelled")).refunded
    result = await attempt
    assert not result.approved and result.code == "voided"
    assert await slow.charged("order-7") is None


# ---------------------------------------------------------------------------------------------------
# The order service across a crash of the process that was charging


async def _crash_mid_charge(make_orders, catalog, db_url: str, timings: SagaTimings) -> tuple[str, str]:
    """An order whose charge the provider approves while the process that asked for it dies: the order never learns.
    Returns (order id, charge id)."""
    first = await make_orders(payment_provider=SimulatedPaymentProvider(latency=5.0), timings=timings)
    request = await first.checkout((catalog.add(stock=3), "10.00", 2))
    await first.wait_status(request.order_id, "stock_confirmed")
    await eventually(lambda: _status_is(first.provider, request.order_id, "pending"), what="the charge under way")
    await stop_bounded("order", first.client)  # the process dies: its charge task and all it knew are gone
    # The provider completes the charge it had taken on (as a real one does after its client vanished).
    engine = create_engine(db_url)
    try:
        done = await SimulatedPaymentProvider(engine=engine).charge(
            ChargeRequest(request.order_id, Decimal("20.00"), "USD", "card", "tok_visa")
        )
    finally:
        await engine.dispose()
    assert done.approved
    return request.order_id, done.charge_id


async def test_a_charge_approved_for_a_process_that_died_is_the_orders_payment(make_orders, catalog, db_url):
    timings = SagaTimings(validation_timeout=20, payment_timeout=20, retry_interval=0.3, retry_max_interval=0.6)
    order_id, charge_id = await _crash_mid_charge(make_orders, catalog, db_url, timings)

    # A new process, with a provider client that remembers nothing: the order asks again with the same key.
    second = await make_orders(payment_provider=SimulatedPaymentProvider(), timings=timings)
    state = await second.wait_status(order_id, "paid", timeout=15)
    assert [h["status"] for h in state["history"]] == HAPPY_PATH
    assert state["payment"]["charge_id"] == charge_id and charge_id in state["history"][-1]["reason"]
    records = await second.provider.records()
    assert [(r.idempotency_key, r.status) for r in records] == [(order_id, "approved")], "charged once"
    assert records[0].attempts >= 3, "asked again after the crash, answered with the first result"
    assert await second.provider.stray_charges() == []


async def test_a_charge_approved_after_its_order_timed_out_is_refunded(make_orders, catalog, db_url):
    timings = SagaTimings(validation_timeout=20, payment_timeout=1.0, retry_interval=0.3, retry_max_interval=0.6)
    order_id, charge_id = await _crash_mid_charge(make_orders, catalog, db_url, timings)
    await asyncio.sleep(1.0)  # the payment deadline passes while no process runs

    second = await make_orders(payment_provider=SimulatedPaymentProvider(), timings=timings)
    state = await second.wait_status(order_id, "cancelled", timeout=10)
    assert "payment did not complete within 1s" in state["history"][-1]["reason"]
    await eventually(
        lambda: _status_is(second.provider, order_id, "refunded"), timeout=10, what="the charge to be refunded"
    )
    assert (await second.provider.record(order_id)).charge_id == charge_id
    await second.settle()
    payment = (await second.state(order_id))["payment"]
    assert (payment["reversal"], payment["refunded"]) == ("done", True)
    assert await second.provider.stray_charges() == []
