"""The checkout saga of one order service: stock, payment, timeouts, cancellation, at-least-once delivery, crashes."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from actors.order.actor import SagaTimings
from actors.order.messages import PaymentSucceeded
from actors.order.payment import ChargeRequest, RetryPolicy, SimulatedPaymentProvider
from actors.order.repository import count_by_status
from contracts.checkout import OrderStarted
from contracts.queues import ORDER_QUEUE
from contracts.stock import (
    CommitReservation,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)
from runtime.messages import envelope
from tests.order.conftest import checkout_request, eventually, stop_bounded

HAPPY_PATH = ["submitted", "awaiting_validation", "stock_confirmed", "paid"]


def history(state: dict) -> list[str]:
    return [h["status"] for h in state["history"]]


async def test_happy_path_reserves_charges_once_and_commits(orders, catalog):
    a, b = catalog.add(stock=5, price="9.99"), catalog.add(stock=5, price="2.50")
    request = await orders.checkout((a, "9.99", 2), (b, "2.50", 1))
    state = await orders.wait_status(request.order_id, "paid")
    await orders.settle()

    assert history(state) == HAPPY_PATH
    assert state["total"] == "22.48" and all(h["at"] for h in state["history"])
    assert [(m.product_id, m.quantity) for m in catalog.of(ReserveStock)] == [(a, 2), (b, 1)]
    assert sorted(m.product_id for m in catalog.of(CommitReservation)) == sorted([a, b])
    assert catalog.stock == {a: 3, b: 4} and not catalog.reservations and not catalog.of(ReleaseStock)
    charge = await orders.provider.charged(request.order_id)
    assert charge is not None and charge.amount == Decimal("22.48") and orders.provider.calls == 1
    assert charge.status == "approved" and charge.attempts == 1 and charge.currency == "USD"
    assert [e.order_id for e in orders.events_of(OrderStarted)] == [request.order_id]
    assert orders.statuses(request.order_id) == HAPPY_PATH
    assert await count_by_status(orders.engine) == {"paid": 1}


async def test_out_of_stock_releases_the_reserved_and_names_the_short(orders, catalog):
    plenty, scarce = catalog.add(stock=10), catalog.add(stock=1)
    request = await orders.checkout((plenty, "10.00", 3), (scarce, "10.00", 2))
    state = await orders.wait_status(request.order_id, "cancelled")
    await orders.settle()

    assert history(state) == ["submitted", "awaiting_validation", "cancelled"]
    reason = state["history"][-1]["reason"]
    assert f"Product {scarce[:8]}" in reason and "2 requested, 1 available" in reason and plenty[:8] not in reason
    assert [m.product_id for m in catalog.of(ReleaseStock)] == [plenty]
    assert catalog.stock == {plenty: 10, scarce: 1} and not catalog.reservations
    assert orders.provider.calls == 0


async def test_declined_payment_releases_stock_and_cancels(orders, catalog):
    product = catalog.add(stock=4)
    request = await orders.checkout((product, "10.00", 4), token="tok_decline")
    state = await orders.wait_status(request.order_id, "cancelled")
    await orders.settle()

    assert history(state) == ["submitted", "awaiting_validation", "stock_confirmed", "cancelled"]
    assert "payment declined" in state["history"][-1]["reason"] and "card_declined" in state["history"][-1]["reason"]
    assert catalog.stock[product] == 4 and not catalog.reservations and not catalog.committed
    assert await orders.provider.charged(request.order_id) is None
    assert (await orders.provider.record(request.order_id)).decline_code == "card_declined"
    assert state["payment"]["token"] == "", "the token is not kept once the order can no longer be charged"
    assert state["payment"]["reversal"] == "", "a declined charge has nothing to reverse"


async def test_amount_above_the_provider_limit_is_declined(orders, catalog):
    product = catalog.add(stock=10, price="4000.00")
    request = await orders.checkout((product, "4000.00", 3))
    state = await orders.wait_status(request.order_id, "cancelled")
    assert "amount_over_limit" in state["history"][-1]["reason"]


async def test_transient_payment_failures_are_retried_with_the_same_key(orders, catalog):
    product = catalog.add()
    request = await orders.checkout((product, "10.00", 1), token="tok_flaky")
    state = await orders.wait_status(request.order_id, "paid")
    assert history(state) == HAPPY_PATH
    assert orders.provider.calls == 3 and await orders.provider.charged(request.order_id) is not None
    assert (await orders.provider.record(request.order_id)).attempts == 3


async def test_a_payment_that_never_completes_is_cancelled_by_the_deadline(make_orders, catalog):
    orders = await make_orders(timings=SagaTimings(validation_timeout=20, payment_timeout=0.6, retry_interval=10))
    product = catalog.add(stock=3)
    request = await orders.checkout((product, "10.00", 2), token="tok_timeout")
    await orders.wait_status(request.order_id, "stock_confirmed")
    state = await orders.wait_status(request.order_id, "cancelled", timeout=5)
    await orders.settle()

    assert "did not complete within 0.6s" in state["history"][-1]["reason"]
    assert catalog.stock[product] == 3 and not catalog.reservations
    assert await orders.provider.voided(request.order_id), "the key is voided: a charge still on its way is declined"
    assert await orders.provider.charged(request.order_id) is None
    await eventually(lambda: orders.payments.in_flight == 0, what="the hanging charge to be stopped")


async def test_a_check_that_never_completes_is_cancelled_by_the_deadline(make_orders, catalog):
    orders = await make_orders(timings=SagaTimings(validation_timeout=0.5, payment_timeout=10, retry_interval=10))
    a, b = catalog.add(stock=3), catalog.add(stock=3)
    catalog.hold = True
    request = await orders.checkout((a, "10.00", 1), (b, "10.00", 1))
    state = await orders.wait_status(request.order_id, "cancelled", timeout=5)
    await catalog.let_go()
    await orders.settle()
    assert "stock check did not complete within 0.5s" in state["history"][-1]["reason"]
    assert catalog.stock == {a: 3, b: 3} and not catalog.reservations


async def test_a_lost_request_is_asked_again_by_the_retry_reminder(make_orders, catalog):
    orders = await make_orders(timings=SagaTimings(validation_timeout=20, payment_timeout=10, retry_interval=0.3))
    product = catalog.add(stock=3)
    catalog.drop = 1  # the first answer is lost
    request = await orders.checkout((product, "10.00", 2))
    await orders.wait_status(request.order_id, "paid", timeout=5)
    assert len(catalog.of(ReserveStock)) >= 2 and catalog.stock[product] == 1, "asked again, reserved once"
    assert orders.provider.calls == 1


async def test_cancel_while_awaiting_stock_releases_late_reservations(orders, catalog):
    a, b = catalog.add(stock=5), catalog.add(stock=5)
    catalog.hold = True
    request = await orders.checkout((a, "10.00", 2), (b, "10.00", 1))
    await eventually(lambda: len(catalog.held) == 2, what="both reservations made and held")
    resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"

    await catalog.let_go()  # the answers arrive after the order was cancelled
    await orders.settle()
    state = await orders.state(request.order_id)
    assert history(state) == ["submitted", "awaiting_validation", "cancelled"]
    assert state["history"][-1]["reason"] == "cancelled by the buyer"
    assert catalog.stock == {a: 5, b: 5} and not catalog.reservations, "every unit came back"
    assert orders.provider.calls == 0


async def test_cancel_during_payment_voids_the_charge(make_orders, catalog):
    provider = SimulatedPaymentProvider(latency=1.5)  # a slow provider: the cancel comes while it charges
    orders = await make_orders(payment_provider=provider, payment_policy=RetryPolicy(call_timeout=5))
    product = catalog.add(stock=2)
    request = await orders.checkout((product, "10.00", 2))
    await orders.wait_status(request.order_id, "stock_confirmed")
    await eventually(lambda: orders.payments.in_flight == 1, what="the charge to be under way")
    resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 200
    await eventually(lambda: provider.voided(request.order_id), what="the payment to be voided")
    assert orders.payments.in_flight == 0, "the charge in flight was stopped"
    await asyncio.sleep(provider.latency)  # a charge that had not been stopped would be recorded by now

    assert (await orders.state(request.order_id))["status"] == "cancelled"
    assert await provider.charged(request.order_id) is None
    await orders.settle()
    assert catalog.stock[product] == 2
    payment = (await orders.state(request.order_id))["payment"]
    assert (payment["reversal"], payment["refunded"]) == ("done", False), "voided, confirmed, nothing to refund"


async def test_a_reversal_is_asked_again_until_the_provider_confirms_it(make_orders, catalog):
    provider = SimulatedPaymentProvider()
    timings = SagaTimings(validation_timeout=20, payment_timeout=20, retry_interval=0.3)
    orders = await make_orders(payment_provider=provider, timings=timings, payment_policy=RetryPolicy(call_timeout=0.2))
    request = await orders.checkout((catalog.add(), "10.00", 1), token="tok_timeout")
    await orders.wait_status(request.order_id, "stock_confirmed")
    provider.latency = 1.0  # the provider is too slow to answer the reversal in time
    resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 200
    await asyncio.sleep(0.8)
    assert (await orders.state(request.order_id))["payment"]["reversal"] == "pending"
    assert not await provider.voided(request.order_id)

    provider.latency = 0.0  # it recovers: the next wake asks again, and this time it is confirmed
    state = await eventually(
        lambda: _reversal_done(orders, request.order_id), timeout=5, what="the reversal to be confirmed"
    )
    assert await provider.voided(request.order_id) and state["status"] == "cancelled"
    await orders.settle()
    assert await orders.bus.dead_letters(ORDER_QUEUE) == [], "nothing given up on"


async def _reversal_done(orders, order_id: str) -> dict | None:
    state = await orders.state(order_id)
    return state if state["payment"]["reversal"] == "done" else None


async def test_a_success_that_arrives_after_cancellation_is_refunded(make_orders, catalog):
    provider = SimulatedPaymentProvider()
    timings = SagaTimings(validation_timeout=20, payment_timeout=20, retry_interval=0.3, retry_max_interval=0.6)
    orders = await make_orders(payment_provider=provider, timings=timings, payment_policy=RetryPolicy(call_timeout=0.2))
    request = await orders.checkout((catalog.add(), "10.00", 1), token="tok_timeout")
    await orders.wait_status(request.order_id, "stock_confirmed")
    await eventually(lambda: _status_is(provider, request.order_id, "pending"), what="the charge to be under way")
    provider.latency = 1.0  # reversals time out for now: the key is not voided yet
    resp = await orders.client.post(f"/api/orders/{request.order_id}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 200

    # The provider finishes the charge it had taken on after all (a real gateway may), and its success reaches the
    # cancelled order late.
    late = await SimulatedPaymentProvider(engine=orders.engine).charge(
        ChargeRequest(request.order_id, Decimal("10.00"), "USD", "card", "tok_visa")
    )
    assert late.approved
    await orders.ask(request.order_id, PaymentSucceeded(request.order_id, late.charge_id, Decimal("10.00")))
    provider.latency = 0.0  # the provider answers again: the next reversal refunds
    state = await eventually(
        lambda: _reversal_done(orders, request.order_id), timeout=10, what="the reversal to be confirmed"
    )
    assert state["status"] == "cancelled" and state["payment"]["refunded"]
    record = await provider.record(request.order_id)
    assert record.status == "refunded" and record.charge_id == late.charge_id
    assert await provider.stray_charges() == []


async def _status_is(provider: SimulatedPaymentProvider, key: str, status: str) -> bool:
    record = await provider.record(key)
    return record is not None and record.status == status


async def test_paid_orders_ship_and_cannot_be_cancelled(orders, catalog):
    product = catalog.add()
    request = await orders.checkout((product, "10.00", 1))
    path = f"/api/orders/{request.order_id}"
    await orders.wait_status(request.order_id, "paid")

    resp = await orders.client.post(f"{path}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 409 and (await resp.json())["type"].endswith("/order-not-cancellable")
    resp = await orders.client.post(f"{path}/ship", headers=orders.admin())
    assert resp.status == 200 and (await resp.json())["status"] == "shipped"
    resp = await orders.client.post(f"{path}/cancel", headers=orders.buyer("buyer-1"))
    assert resp.status == 409
    await orders.settle()
    assert orders.statuses(request.order_id) == [*HAPPY_PATH, "shipped"]
    assert await count_by_status(orders.engine) == {"shipped": 1}


async def test_only_a_paid_order_can_be_shipped(orders, catalog):
    catalog.hold = True
    request = await orders.checkout((catalog.add(), "10.00", 1))
    await orders.wait_status(request.order_id, "awaiting_validation")
    resp = await orders.client.post(f"/api/orders/{request.order_id}/ship", headers=orders.admin())
    assert resp.status == 409 and (await resp.json())["type"].endswith("/order-not-shippable")


async def test_duplicated_messages_change_nothing(orders, catalog):
    product = catalog.add(stock=5)
    request = await orders.checkout((product, "10.00", 2))
    await orders.wait_status(request.order_id, "paid")
    await orders.settle()
    first = await orders.state(request.order_id)

    # The same envelopes again (a relay that crashed before marking them sent), and new copies with new ids
    # (a sender that sent twice): the inbox drops the first kind, the handlers ignore the second.
    checkout = envelope(request, session_id=request.order_id)
    for env in (checkout, checkout, envelope(request, session_id=request.order_id)):
        await orders.bus.send(ORDER_QUEUE, env)
    again = StockReserved(request.order_id, product, 2, Decimal("10.00"))
    for env in [*catalog.replies, envelope(again, session_id=request.order_id)]:
        await orders.bus.send(ORDER_QUEUE, env)
    await orders.settle()

    assert await orders.state(request.order_id) == first
    assert len(catalog.of(ReserveStock)) == 1 and len(catalog.of(CommitReservation)) == 1
    assert catalog.stock[product] == 3 and orders.provider.calls == 1
    assert len(orders.events_of(OrderStarted)) == 1 and orders.statuses(request.order_id) == HAPPY_PATH
    assert await orders.bus.dead_letters(ORDER_QUEUE) == []


async def test_reordered_answers_give_the_same_outcome(orders, catalog):
    a, b, c = catalog.add(stock=5), catalog.add(stock=0), catalog.add(stock=5)
    catalog.hold = True
    request = await orders.checkout((a, "10.00", 1), (b, "10.00", 1), (c, "10.00", 1))
    await eventually(lambda: len(catalog.held) == 3, what="three answers held")
    await catalog.let_go(reverse=True)  # the rejection of b arrives between c's and a's reservations
    state = await orders.wait_status(request.order_id, "cancelled")
    await orders.settle()
    assert "out of stock" in state["history"][-1]["reason"] and b[:8] in state["history"][-1]["reason"]
    assert sorted(m.product_id for m in catalog.of(ReleaseStock)) == sorted([a, c])
    assert catalog.stock == {a: 5, b: 0, c: 5}


async def test_an_answer_before_its_checkout_is_ignored(orders, catalog):
    product = catalog.add(stock=5)
    request = checkout_request((product, "10.00", 1))
    early = StockRejected(request.order_id, product, 1, 0, "insufficient_stock")
    await orders.bus.send(ORDER_QUEUE, envelope(early, session_id=request.order_id))
    await orders.settle()
    assert not ((await orders.state(request.order_id)) or {}).get("status"), "no order made up from a stray answer"

    await orders.bus.send(ORDER_QUEUE, envelope(request, session_id=request.order_id))
    state = await orders.wait_status(request.order_id, "paid")
    assert history(state) == HAPPY_PATH


async def test_an_inconsistent_checkout_becomes_a_cancelled_order(orders, catalog):
    product = catalog.add()
    request = await orders.checkout((product, "10.00", 2), total="15.00")
    state = await orders.wait_status(request.order_id, "cancelled")
    await orders.settle()
    assert history(state) == ["submitted", "cancelled"]
    assert "invalid checkout" in state["history"][-1]["reason"] and "20.00" in state["history"][-1]["reason"]
    assert catalog.received == [], "nothing reserved for it"
    assert [e.order_id for e in orders.events_of(OrderStarted)] == [request.order_id], "the cart still learns of it"


async def test_a_price_that_rose_cancels_and_one_that_fell_is_what_is_charged(orders, catalog):
    dearer, cheaper = catalog.add(price="12.00"), catalog.add(price="8.00")
    rose = await orders.checkout((dearer, "10.00", 1))
    fell = await orders.checkout((cheaper, "10.00", 2))
    state = await orders.wait_status(rose.order_id, "cancelled")
    assert "price changed" in state["history"][-1]["reason"] and "12.00" in state["history"][-1]["reason"]
    state = await orders.wait_status(fell.order_id, "paid")
    assert state["total"] == "16.00" and state["lines"][0]["unit_price"] == "8.00"
    assert (await orders.provider.charged(fell.order_id)).amount == Decimal("16.00")
    await orders.settle()
    assert catalog.stock[dearer] == 10, "the dearer reservation was given back"


async def test_a_restart_in_the_middle_of_payments_finishes_every_order_once(make_orders, catalog, settings):
    provider = SimulatedPaymentProvider(latency=0.3)
    timings = SagaTimings(validation_timeout=20, payment_timeout=20, retry_interval=0.3)
    first = await make_orders(payment_provider=provider, timings=timings)
    product = catalog.add(stock=100)
    requests = [await first.checkout((product, "10.00", 1), buyer=f"buyer-{i}") for i in range(8)]
    await eventually(lambda: first.payments.in_flight >= 4, what="charges under way")
    await stop_bounded("order", first.client)  # the process dies: charges in flight are lost, maybe made

    second = await make_orders(payment_provider=provider, timings=timings)
    for request in requests:
        state = await second.wait_status(request.order_id, "paid", timeout=15)
        assert history(state) == HAPPY_PATH
        assert await provider.charged(request.order_id) is not None
    charges = [r for r in await provider.records() if r.approved]
    assert len(charges) == 8 and len({c.charge_id for c in charges}) == 8, "one charge per order, however often asked"
    assert await provider.stray_charges() == []
    await second.settle()
    assert catalog.stock[product] == 92 and len(catalog.committed) == 8 and not catalog.reservations
