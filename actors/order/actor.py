"""OrderActor: one per order id; it runs the checkout saga of its order.

State machine (every transition is a history entry with its time and reason, and an ``OrderStatusChanged``
event; the first one also publishes ``OrderStarted``)::

    CheckoutRequested -> submitted -> awaiting_validation --every StockReserved--> stock_confirmed
                                        |                                            |
                                        | a StockRejected (once all answered),       | PaymentSucceeded -> paid
                                        | validation deadline, cancel (buyer)        |      -> shipped (admin)
                                        v                                            |
                                    cancelled  <-- PaymentFailed, payment deadline, cancel (buyer)

    Cancelling releases every reservation asked for; from stock_confirmed it also reverses the charge.

Why it is safe under at-least-once delivery, crashes and restarts:

* every turn commits state, outgoing messages (outbox) and the consumed message id (inbox) together, so a
  message is either fully applied or not at all, and a redelivered copy is dropped;
* handlers are also tolerant of *new* copies and late messages: a repeated answer changes nothing; a
  ``StockReserved`` reaching a cancelled order gives the units back; a payment success reaching a cancelled
  order is reversed (refunded);
* the charge never runs inside a turn: the turn that confirms the stock sends ``ProcessPayment`` through its
  outbox and sets the payment deadline. The order's idempotency key at the provider is its id, so asking again
  can never charge twice;
* while it waits (for stock answers, for the payment result) the order has one durable ``wake`` reminder, due
  after an exponential back-off (``retry_interval`` doubling per wake up to ``retry_max_interval``, full jitter;
  see :func:`backoff`) and at the phase's deadline at the latest. On waking before the deadline it re-sends what
  it still waits for (``ReserveStock`` to the products that have not answered, ``ProcessPayment``), but only a
  message that can be presumed lost: never one whose previous copy is still unsent in this service's outbox (or
  left it less than ``retry_interval`` ago) — under a burst the outbox is slow, and copies queued behind copies
  were the retry storm — and at most ``max_resends`` times per message. A request lost with a crashed process (or
  a bus that lost it) is still asked again; the catalog answers a repeated reservation with its first answer. At
  the deadline it cancels: a stock check that never completes or a payment that never answers cannot keep an
  order, or its reserved stock, forever. The reminder goes once the order is paid or cancelled;
* reversing a charge (the compensation of a cancelled payment) is tracked in the state too: the order re-sends
  ``ReversePayment`` on wakes (same back-off and outbox rule, no count limit: the buyer's money is at stake) until
  the payment step confirms it with ``PaymentReversed`` answering the latest request.

Outbox rows per order (what one order can put in the outbox, so a burst of N orders is at most N times this). With
``L`` lines and ``R = max_resends``::

    rows <= 6 events (OrderStarted + 5 status changes) + L*(1+R) ReserveStock + (1+R) ProcessPayment
            + L ReleaseStock or CommitReservation + 1 ReversePayment          (= :func:`outbox_bound`)

and, only after a cancellation: one ``ReleaseStock`` per late ``StockReserved`` (at most ``L*(1+R)``, one per
request), one ``ReversePayment`` per late ``PaymentSucceeded`` (at most ``1+R``), and while a reversal stays
unconfirmed one ``ReversePayment`` per wake at most (wakes at least ``retry_interval`` apart, on average about
``(retry_interval + retry_max_interval) / 2`` once the back-off reaches its cap), never two unsent at once.

The order never charges more than the buyer agreed to at checkout: a reservation at a higher price (the
price rose in between) cancels the order with the reason; a lower one is what the order charges.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from actors.order import repository
from actors.order.messages import (
    CancelOrder,
    CommandResult,
    PaymentFailed,
    PaymentReversed,
    PaymentSucceeded,
    ProcessPayment,
    ReversePayment,
    ShipOrder,
)
from contracts.checkout import (
    Address,
    CheckoutLine,
    CheckoutRequested,
    OrderStarted,
    OrderStatus,
    OrderStatusChanged,
)
from contracts.queues import CATALOG_QUEUE, ORDER_QUEUE
from contracts.stock import (
    CommitReservation,
    RejectReason,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)
from runtime.actors import Actor, ActorSystem, ReminderFired, Turn, handles
from runtime.errors import Conflict, IdempotencyKeyReused, NotFound
from runtime.messages import envelope, from_body, to_body
from runtime.money import CENT, money

log = logging.getLogger(__name__)

MAX_COMMANDS = 20  # idempotency keys of client commands remembered per order
WAKE = "wake"  # reminder while the order waits: ask again, or give up at the deadline
REVERSAL_PENDING, REVERSAL_DONE = "pending", "done"

# Where a line's stock stands.
NOT_REQUESTED, PENDING, RESERVED, REJECTED = "", "pending", "reserved", "rejected"


@dataclass(frozen=True, slots=True)
class SagaTimings:
    """Seconds the saga waits: the :class:`OrderActor`'s injected dependency, built by the service from ``[shop]``
    settings (:func:`actors.order.service.timings_from`)."""

    validation_timeout: float = 900.0  # for every product to answer the reservation
    payment_timeout: float = 300.0  # from stock_confirmed to a payment result
    retry_interval: float = 30.0  # the first re-send of a message presumed lost; the back-off doubles from here
    retry_max_interval: float = 300.0  # cap of the back-off
    max_resends: int = 6  # re-sends of one message at most, before the phase's deadline gives up

    def __post_init__(self) -> None:
        for name in ("validation_timeout", "payment_timeout", "retry_interval", "retry_max_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.retry_max_interval < self.retry_interval:
            raise ValueError("retry_max_interval must be at least retry_interval")
        if self.max_resends < 0:
            raise ValueError("max_resends must be 0 or more")


# ---------------------------------------------------------------------------------------------------
# Problems (the turn is rolled back: the order stays as it was)


class OrderNotCancellable(Conflict):
    slug = "order-not-cancellable"
    title = "The order can no longer be cancelled"


class OrderNotShippable(Conflict):
    slug = "order-not-shippable"
    title = "The order cannot be shipped"


# ---------------------------------------------------------------------------------------------------
# State


@dataclass
class OrderLine:
    product_id: str
    name: str
    unit_price: Decimal  # what the order charges per unit: the checkout price, or a lower reserved one
    quantity: int
    picture_url: str
    stock: str = NOT_REQUESTED
    reserved_price: Decimal | None = None
    available: int = 0  # when rejected: what the catalog had
    reject_reason: str = ""  # a catalog RejectReason
    sent_id: str = ""  # message id of the last ReserveStock sent: is it still queued in our outbox?
    resends: int = 0  # ReserveStock messages sent after the first


@dataclass
class HistoryEntry:
    status: str
    at: datetime
    reason: str = ""


@dataclass
class Payment:
    method: str
    token: str  # the provider's token, kept only while the order may still be charged
    requests: int = 0  # ProcessPayment messages sent (the first and its re-sends)
    sent_id: str = ""  # message id of the last ProcessPayment sent
    charge_id: str = ""
    reversal: str = ""  # "" none asked, "pending" until the provider confirms, "done"
    refunded: bool = False  # the reversal refunded a charge (rather than voiding an unused key)
    reversal_id: str = ""  # message id of the last ReversePayment sent: only its answer may end the reversal
    reversal_reason: str = ""


@dataclass
class CommandRecord:
    key: str
    command: str


@dataclass
class OrderState:
    status: str = ""  # "" = no such order (yet)
    buyer_id: str = ""
    cart_id: str = ""
    lines: list[OrderLine] = field(default_factory=list)
    total: Decimal = Decimal("0.00")
    currency: str = ""
    shipping_address: Address | None = None
    payment: Payment | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    deadline: datetime | None = None  # when the current waiting phase gives up
    wakes: int = 0  # wakes so far in the current waiting phase (or reversal): the back-off's exponent
    history: list[HistoryEntry] = field(default_factory=list)
    commands: list[CommandRecord] = field(default_factory=list)


def order_view(order_id: str, s: OrderState) -> dict[str, Any]:
    """The order as its buyer sees it (JSON-ready: money as strings, times as datetimes)."""
    return {
        "id": order_id,
        "buyer_id": s.buyer_id,
        "status": s.status,
        "lines": [
            {
                "product_id": line.product_id,
                "name": line.name,
                "unit_price": money(line.unit_price),
                "quantity": line.quantity,
                "picture_url": line.picture_url,
            }
            for line in s.lines
        ],
        "total": money(s.total),
        "currency": s.currency,
        "shipping_address": to_body(s.shipping_address) if s.shipping_address is not None else None,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "history": [{"status": h.status, "at": h.at, "reason": h.reason} for h in s.history],
    }


def load_order(data: Any) -> OrderState:
    """An order's state from its stored JSON form (what the actor persists)."""
    return from_body(OrderState, data)


# ---------------------------------------------------------------------------------------------------
# The actor

H = TypeVar("H", bound=Callable[..., Any])


def _keeps_summary(handler: H) -> H:
    """Wrap a handler that may change the status or total: the ``orders`` row follows in the turn's own
    transaction. Comparing before/after keeps the handlers free of query-table bookkeeping. Coroutine handlers
    get a coroutine wrapper, so the runtime still awaits them (it tells the two kinds apart by the method)."""

    def after(self: OrderActor, turn: Turn, before: tuple[str, Decimal]) -> None:
        if self.state.status and (self.state.status, self.state.total) != before:
            turn.on_commit(repository.save_summary(self.summary(), new=not before[0]))

    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def async_wrapper(self: OrderActor, message: Any, turn: Turn) -> Any:
            before = (self.state.status, self.state.total)
            result = await handler(self, message, turn)
            after(self, turn, before)
            return result

        return async_wrapper  # type: ignore[return-value]  # functools.wraps: the handler's own signature

    @functools.wraps(handler)
    def wrapper(self: OrderActor, message: Any, turn: Turn) -> Any:
        before = (self.state.status, self.state.total)
        result = handler(self, message, turn)
        after(self, turn, before)
        return result

    return wrapper  # type: ignore[return-value]  # functools.wraps: the handler's own signature


class OrderActor(Actor):
    """One order and its saga. Its dependency, the saga's ``timings``, is injected by the actor system: the
    service description registers it as ``ActorType(OrderActor, deps=...)`` (:mod:`runtime.description`)."""

    type_name = "order"
    # An order's saga is over within seconds; afterwards it is read from the query table and woken by its
    # reminders or a late message (reloaded from the store). Kept longer, every order of the last 5 minutes stayed
    # in memory under load (issue 14).
    idle_timeout = 60.0
    state: OrderState

    def __init__(self, actor_id: str, system: ActorSystem, *, timings: SagaTimings | None = None) -> None:
        self.timings = timings if timings is not None else SagaTimings()
        super().__init__(actor_id, system)

    def initial_state(self) -> OrderState:
        return OrderState()

    def dump_state(self) -> dict[str, Any]:
        return to_body(self.state)

    def load_state(self, data: Any) -> None:
        self.state = load_order(data)

    # -- the checkout ------------------------------------------------------------------------------

    @handles(CheckoutRequested)
    @_keeps_summary
    def on_checkout(self, msg: CheckoutRequested, turn: Turn) -> None:
        if self.state.status:
            return  # the order exists: a new copy of the request (the inbox drops same-id copies)
        self.state = _new_order(msg)
        self.state.created_at = turn.now
        self._enter(turn, OrderStatus.SUBMITTED, "checkout received")
        turn.publish(envelope(OrderStarted(self.id, msg.buyer_id, msg.cart_id), session_id=self.id))
        problem = _checkout_problem(msg)
        if problem is not None:
            self._cancel(turn, f"invalid checkout: {problem}")
            return
        for line in self.state.lines:
            line.stock = PENDING
            line.sent_id = self._to_catalog(turn, ReserveStock(self.id, line.product_id, line.quantity))
        self._enter(turn, OrderStatus.AWAITING_VALIDATION, f"stock requested for {len(self.state.lines)} product(s)")
        self._wait_until(turn, turn.now + timedelta(seconds=self.timings.validation_timeout))

    @handles(StockReserved)
    @_keeps_summary
    def on_stock_reserved(self, msg: StockReserved, turn: Turn) -> None:
        line = self._line(msg.product_id)
        if line is None:
            return
        if self.state.status == OrderStatus.CANCELLED:
            # A reservation that arrived after the order gave up: give the units back (a no-op if released).
            self._to_catalog(turn, ReleaseStock(self.id, msg.product_id))
            return
        if self.state.status != OrderStatus.AWAITING_VALIDATION or line.stock != PENDING:
            return  # a repeated answer
        line.stock, line.reserved_price = RESERVED, msg.unit_price
        self._after_stock_answer(turn)

    @handles(StockRejected)
    @_keeps_summary
    def on_stock_rejected(self, msg: StockRejected, turn: Turn) -> None:
        line = self._line(msg.product_id)
        if line is None or self.state.status != OrderStatus.AWAITING_VALIDATION or line.stock != PENDING:
            return  # repeated, or late: nothing is held for a rejected reservation
        line.stock, line.available, line.reject_reason = REJECTED, msg.available, msg.reason
        self._after_stock_answer(turn)

    def _after_stock_answer(self, turn: Turn) -> None:
        """Once every product answered: confirm, or cancel naming what was short (or dearer than agreed)."""
        if any(line.stock == PENDING for line in self.state.lines):
            return
        problems = [p for line in self.state.lines if (p := _line_problem(line)) is not None]
        if problems:
            self._cancel(turn, "; ".join(problems))
        else:
            self._confirm_stock(turn)

    def _confirm_stock(self, turn: Turn) -> None:
        s = self.state
        for line in s.lines:
            assert line.reserved_price is not None
            line.unit_price = line.reserved_price  # never above the checkout price (checked before)
        s.total = _total(s.lines)
        self._enter(turn, OrderStatus.STOCK_CONFIRMED, f"{sum(line.quantity for line in s.lines)} unit(s) reserved")
        self._wait_until(turn, turn.now + timedelta(seconds=self.timings.payment_timeout))
        self._request_payment(turn)

    # -- the payment -------------------------------------------------------------------------------

    @handles(PaymentSucceeded)
    @_keeps_summary
    def on_payment_succeeded(self, msg: PaymentSucceeded, turn: Turn) -> None:
        s = self.state
        if s.status == OrderStatus.STOCK_CONFIRMED:
            assert s.payment is not None
            s.payment.charge_id, s.payment.token = msg.charge_id, ""
            for line in s.lines:
                self._to_catalog(turn, CommitReservation(self.id, line.product_id))
            self._stop_waiting(turn)
            self._enter(turn, OrderStatus.PAID, f"charged {money(msg.amount)} {s.currency} ({msg.charge_id})")
        elif s.status == OrderStatus.CANCELLED and s.payment is not None and not s.payment.refunded:
            # Charged after the order was cancelled (the charge was in flight, or its result was late): refund it.
            # A reversal still pending is asked again: its earlier request may have run before this charge did.
            self._reverse_payment(turn, "charged after the order was cancelled")
        # paid or shipped: the same result again

    @handles(PaymentReversed)
    def on_payment_reversed(self, msg: PaymentReversed, turn: Turn) -> None:
        payment = self.state.payment
        if payment is None or payment.reversal != REVERSAL_PENDING:
            return  # a repeated confirmation
        if not msg.refunded and msg.request_id and msg.request_id != payment.reversal_id:
            # "Nothing was charged" from an older request says nothing about a charge made since (that is why the
            # newer request was sent): only the answer to the latest request may end the reversal. A refund does
            # end it, whichever request made it: the key's one charge is refunded.
            return
        payment.reversal, payment.refunded = REVERSAL_DONE, payment.refunded or msg.refunded
        self.state.wakes = 0
        turn.cancel_reminder(WAKE)

    def _reverse_payment(self, turn: Turn, reason: str) -> None:
        """Ask the payment step to void/refund the order's charge, and keep asking (on wakes, with back-off) until it
        confirms: a provider that is down when the order is cancelled must not keep the buyer's money."""
        s = self.state
        assert s.payment is not None
        s.payment.reversal, s.payment.reversal_reason = REVERSAL_PENDING, reason
        self._send_reversal(turn)
        s.wakes = 0
        self._wake_later(turn)

    def _send_reversal(self, turn: Turn) -> None:
        payment = self.state.payment
        assert payment is not None
        env = envelope(ReversePayment(self.id, payment.reversal_reason), session_id=self.id, correlation_id=self.id)
        turn.send(ORDER_QUEUE, env)
        payment.reversal_id = env.message_id

    @handles(PaymentFailed)
    @_keeps_summary
    def on_payment_failed(self, msg: PaymentFailed, turn: Turn) -> None:
        if self.state.status == OrderStatus.STOCK_CONFIRMED:
            self._cancel(turn, f"payment declined: {msg.message} ({msg.code})", payment_decided=True)

    def _request_payment(self, turn: Turn) -> None:
        s = self.state
        assert s.payment is not None and s.deadline is not None
        s.payment.requests += 1
        command = ProcessPayment(self.id, s.total, s.currency, s.payment.method, s.payment.token, s.deadline)
        env = envelope(command, session_id=self.id, correlation_id=self.id)
        turn.send(ORDER_QUEUE, env)
        s.payment.sent_id = env.message_id

    # -- time --------------------------------------------------------------------------------------

    @handles(ReminderFired)
    @_keeps_summary
    async def on_reminder(self, reminder: ReminderFired, turn: Turn) -> None:
        if reminder.name != WAKE:
            log.warning("order %s: unknown reminder %r ignored", self.id, reminder.name)
            return
        s = self.state
        if s.payment is not None and s.payment.reversal == REVERSAL_PENDING:
            if s.payment.reversal_id not in await self._on_its_way([s.payment.reversal_id], turn):
                if not s.payment.reversal_reason:  # an order stored before the reason was kept in the state
                    s.payment.reversal_reason = str(reminder.payload or "order cancelled")
                self._send_reversal(turn)
            self._wake_later(turn)
            return
        if s.status not in (OrderStatus.AWAITING_VALIDATION, OrderStatus.STOCK_CONFIRMED) or s.deadline is None:
            return  # not waiting any more (a reminder already due when the order moved on)
        if turn.now >= s.deadline:
            self._give_up(turn)
            return
        await self._ask_again(turn)
        self._wake_later(turn)

    def _give_up(self, turn: Turn) -> None:
        if self.state.status == OrderStatus.AWAITING_VALIDATION:
            self._cancel(turn, f"the stock check did not complete within {self.timings.validation_timeout:g}s")
        else:
            self._cancel(turn, f"the payment did not complete within {self.timings.payment_timeout:g}s")

    async def _ask_again(self, turn: Turn) -> None:
        """Re-send what the order waits for, but only what can be presumed lost and has re-sends left; the other
        side answers a repeated request without a second effect."""
        s = self.state
        if s.status == OrderStatus.AWAITING_VALIDATION:
            due = [line for line in s.lines if line.stock == PENDING and line.resends < self.timings.max_resends]
            busy = await self._on_its_way([line.sent_id for line in due], turn)
            for line in due:
                if line.sent_id not in busy:
                    line.resends += 1
                    line.sent_id = self._to_catalog(turn, ReserveStock(self.id, line.product_id, line.quantity))
        elif (
            s.payment is not None
            and s.payment.requests <= self.timings.max_resends
            and s.payment.sent_id not in await self._on_its_way([s.payment.sent_id], turn)
        ):
            self._request_payment(turn)

    async def _on_its_way(self, message_ids: list[str], turn: Turn) -> set[str]:
        """Which of these messages cannot be presumed lost: still unsent in this service's outbox (re-sending
        would only queue a copy behind it: the retry storm), or sent less than ``retry_interval`` ago."""
        wanted = [m for m in message_ids if m]
        store = self.system.store
        if not wanted or store is None:
            return set()
        since = turn.now - timedelta(seconds=self.timings.retry_interval)
        return await repository.messages_on_their_way(store.engine, wanted, sent_after=since)

    def _can_resend(self) -> bool:
        s = self.state
        if s.status == OrderStatus.AWAITING_VALIDATION:
            return any(line.stock == PENDING and line.resends < self.timings.max_resends for line in s.lines)
        if s.status == OrderStatus.STOCK_CONFIRMED:
            return s.payment is not None and s.payment.requests <= self.timings.max_resends
        return True  # a pending reversal: asked again until confirmed

    def _wait_until(self, turn: Turn, deadline: datetime) -> None:
        """Wait for answers until ``deadline``, waking (with back-off) to ask again what seems lost."""
        self.state.deadline = deadline
        self.state.wakes = 0
        self._wake_later(turn)

    def _wake_later(self, turn: Turn) -> None:
        """Set the one ``wake`` reminder: after the next back-off delay, at the deadline at the latest; straight at
        the deadline once nothing may be re-sent any more (a wake then would have nothing to do)."""
        s = self.state
        due = turn.now + timedelta(seconds=backoff(s.wakes, self.timings))
        s.wakes += 1
        if s.deadline is not None and (due > s.deadline or not self._can_resend()):
            due = s.deadline
        turn.set_reminder(WAKE, due_at=due)

    def _stop_waiting(self, turn: Turn) -> None:
        self.state.deadline = None
        self.state.wakes = 0
        turn.cancel_reminder(WAKE)

    # -- commands from the API ---------------------------------------------------------------------

    @handles(CancelOrder)
    @_keeps_summary
    def on_cancel(self, msg: CancelOrder, turn: Turn) -> CommandResult:
        self._require_visible_to(msg.requester, msg.is_admin)
        replay = self._replay(msg.idempotency_key, "cancel")
        if replay is not None:
            return replay
        status = self.state.status
        if status in OrderStatus.OPEN:
            by = "the buyer" if msg.requester == self.state.buyer_id else "an admin"
            self._cancel(turn, f"cancelled by {by}")
        elif status != OrderStatus.CANCELLED:
            raise OrderNotCancellable(f"the order is {status}; an order can be cancelled only before it is paid")
        return self._answer(msg.idempotency_key, "cancel")

    @handles(ShipOrder)
    @_keeps_summary
    def on_ship(self, msg: ShipOrder, turn: Turn) -> CommandResult:
        self._require_visible_to("", is_admin=True)
        replay = self._replay(msg.idempotency_key, "ship")
        if replay is not None:
            return replay
        status = self.state.status
        if status == OrderStatus.PAID:
            self._enter(turn, OrderStatus.SHIPPED, "shipped")
        elif status != OrderStatus.SHIPPED:
            raise OrderNotShippable(f"the order is {status}; only a paid order can be shipped")
        return self._answer(msg.idempotency_key, "ship")

    def _require_visible_to(self, requester: str, is_admin: bool) -> None:
        # Someone else's order is "not found", never "forbidden": its existence is not the caller's business.
        if not self.state.status or (not is_admin and self.state.buyer_id != requester):
            raise NotFound(f"there is no order {self.id}", slug="order-not-found")

    def _replay(self, key: str | None, command: str) -> CommandResult | None:
        """The answer to an earlier request with this idempotency key, if there was one."""
        earlier = next((c for c in self.state.commands if c.key == key), None) if key else None
        if earlier is None:
            return None
        if earlier.command != command:
            raise IdempotencyKeyReused(f"this Idempotency-Key was used to {earlier.command} the order; use a new key")
        return CommandResult(self.view(), replayed=True)

    def _answer(self, key: str | None, command: str) -> CommandResult:
        if key:
            self.state.commands.append(CommandRecord(key, command))
            del self.state.commands[:-MAX_COMMANDS]
        return CommandResult(self.view(), replayed=False)

    # -- helpers -----------------------------------------------------------------------------------

    def _enter(self, turn: Turn, status: str, reason: str) -> None:
        """Move to ``status``: a history entry and an event, both in this turn."""
        s = self.state
        old, s.status, s.updated_at = s.status, status, turn.now
        s.history.append(HistoryEntry(status, turn.now, reason))
        event = OrderStatusChanged(self.id, s.buyer_id, old, status, reason, turn.now)
        turn.publish(envelope(event, session_id=self.id))

    def _cancel(self, turn: Turn, reason: str, *, payment_decided: bool = False) -> None:
        """Cancel: release every reservation asked for (a pending one is released after it is made: the
        product's messages are handled in order) and make sure a requested charge does not stand, unless the
        provider already ``payment_decided`` (declined) it."""
        s = self.state
        for line in s.lines:
            if line.stock in (PENDING, RESERVED):
                self._to_catalog(turn, ReleaseStock(self.id, line.product_id))
        self._stop_waiting(turn)
        if s.payment is not None:
            if s.payment.requests and s.status == OrderStatus.STOCK_CONFIRMED and not payment_decided:
                self._reverse_payment(turn, reason)
            s.payment.token = ""
        self._enter(turn, OrderStatus.CANCELLED, reason)

    def _to_catalog(self, turn: Turn, command: ReserveStock | ReleaseStock | CommitReservation) -> str:
        """A stock command to the product's actor (session = product id), sent when this turn commits; returns
        its message id."""
        env = envelope(command, session_id=command.product_id, correlation_id=self.id)
        turn.send(CATALOG_QUEUE, env)
        return env.message_id

    def _line(self, product_id: str) -> OrderLine | None:
        found = next((line for line in self.state.lines if line.product_id == product_id), None)
        if found is None and not self.state.status:
            # Before its checkout (reordered): ignored; the order asks for the stock itself once it exists.
            log.info("order %s: stock answer for %s before the order exists; ignored", self.id, product_id)
        elif found is None:
            log.warning("order %s: stock answer for %s, which the order does not hold; ignored", self.id, product_id)
        return found

    def summary(self) -> repository.OrderSummary:
        s = self.state
        assert s.created_at is not None and s.updated_at is not None
        return repository.OrderSummary(self.id, s.buyer_id, s.status, s.total, s.currency, s.created_at, s.updated_at)

    def view(self) -> dict[str, Any]:
        return order_view(self.id, self.state)


# ---------------------------------------------------------------------------------------------------
# Pure helpers

_jitter = random.Random()  # spreads re-sends; needs no secrecy, and no seed (each process its own spread)


def backoff(attempt: int, timings: SagaTimings, rng: random.Random = _jitter) -> float:
    """Seconds to the wake number ``attempt`` (0, 1, ...) of a waiting phase: exponential back-off with full jitter.

    The ceiling doubles per attempt from ``retry_interval`` (2x, 4x, 8x ... of it) up to ``retry_max_interval``;
    the delay is uniform between ``retry_interval`` and the ceiling. The jitter spreads the re-sends of a burst of
    orders over the whole window instead of sending them again together; the floor keeps a message younger than
    ``retry_interval`` from being taken for lost."""
    low, cap = timings.retry_interval, timings.retry_max_interval
    ceiling = min(cap, low * 2.0 ** min(attempt + 1, 60))
    return rng.uniform(low, ceiling)


def outbox_bound(lines: int, timings: SagaTimings) -> int:
    """The most outbox rows one order of ``lines`` lines writes from checkout to paid/shipped or cancelled, when no
    answer comes late and a reversal is confirmed the first time (see the module docstring for the rest)."""
    sends = 1 + timings.max_resends
    events = 6  # OrderStarted + submitted, awaiting_validation, stock_confirmed, paid | cancelled, shipped
    return events + lines * sends + sends + lines + 1  # ReserveStock, ProcessPayment, Release|Commit, ReversePayment


def accepted_order(msg: CheckoutRequested) -> OrderState:
    """The order a checkout request becomes first (``submitted``): how an order accepted by the cart but not recorded
    here yet is shown (see :mod:`actors.order.checkouts`)."""
    state = _new_order(msg)
    state.payment = None  # never shown, and the request carries no payment details here
    state.status, state.created_at, state.updated_at = OrderStatus.SUBMITTED, msg.requested_at, msg.requested_at
    state.history.append(HistoryEntry(OrderStatus.SUBMITTED, msg.requested_at, "checkout received"))
    return state


def _new_order(msg: CheckoutRequested) -> OrderState:
    lines = [
        OrderLine(line.product_id, line.name, line.unit_price, line.quantity, line.picture_url) for line in msg.lines
    ]
    return OrderState(
        buyer_id=msg.buyer_id,
        cart_id=msg.cart_id,
        lines=lines,
        total=msg.total,
        currency=msg.currency,
        shipping_address=msg.shipping_address,
        payment=Payment(msg.payment.method, msg.payment.token),
    )


def _total(lines: Iterable[OrderLine | CheckoutLine]) -> Decimal:
    return sum((line.unit_price * line.quantity for line in lines), Decimal(0)).quantize(CENT)


def _checkout_problem(msg: CheckoutRequested) -> str | None:
    """Why a checkout request cannot become an order (the cart checks all this; the order does not trust it)."""
    if not msg.lines:
        return "the order has no lines"
    ids = [line.product_id for line in msg.lines]
    if len(set(ids)) != len(ids):
        return "a product appears in more than one line"
    if any(line.quantity < 1 for line in msg.lines):
        return "every quantity must be at least 1"
    if any(line.unit_price < 0 for line in msg.lines):
        return "a unit price is negative"
    lines_total = _total(msg.lines)
    if lines_total != msg.total:
        return f"the total {money(msg.total)} does not match the lines ({money(lines_total)})"
    return None


def _line_problem(line: OrderLine) -> str | None:
    """Why this line stops the order, in words for the buyer; None when it is fine."""
    if line.stock == REJECTED:
        if line.reject_reason == RejectReason.INSUFFICIENT_STOCK:
            return f"out of stock: {line.name} ({line.quantity} requested, {line.available} available)"
        if line.reject_reason in (RejectReason.UNKNOWN_PRODUCT, RejectReason.PRODUCT_DELETED):
            return f"no longer sold: {line.name}"
        return f"not available: {line.name} ({line.reject_reason})"
    if line.reserved_price is not None and line.reserved_price > line.unit_price:
        return (
            f"price changed: {line.name} is now {money(line.reserved_price)}, was {money(line.unit_price)} at checkout"
        )
    return None
