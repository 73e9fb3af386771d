"""Payments: the :class:`PaymentProvider` port, the simulator that ships with the service, and the processor
that runs charges outside actor turns.

The port is what a real gateway adapter (Stripe, Adyen...) implements. Its contract:

* ``charge`` is idempotent per ``idempotency_key``, which is always the order id: a repeated call with the same
  key returns the first call's result and never charges again, also when the first call was made by a process
  that died before it learned the result (the provider keeps its keys, not us); a key that was voided can no
  longer be charged;
* a transient problem (provider unreachable, 5xx, rate limited) raises :class:`PaymentUnavailable`; the caller
  retries with the same key. A call may also hang: the caller bounds every call with a timeout;
* ``reverse(idempotency_key)`` names the charge by the same key (the order id): it voids the key (a charge still
  in flight will be declined) or refunds the charge made with it. It is idempotent too: a key is refunded at most
  once, and reversing again answers the same. (A real adapter sends its refund call with an idempotency key
  derived from the order id, e.g. ``refund:<order id>``, so a retried refund is one refund.)

:class:`SimulatedPaymentProvider` is a stand-in with deterministic rules, named as such so nobody mistakes it for
a real gateway: no money ever moves. It keeps its keys durably in its own table, as a real provider would.

:class:`PaymentProcessor` is the order service's side: it receives ``ProcessPayment`` from the bus, charges in a
background task (never inside an actor turn, which would hold the order's mailbox for as long as the provider
takes) and tells the order actor the outcome. The bus message is settled when the task starts, so a process that
dies mid-charge, or between the provider's answer and the order's turn that records it, loses the task and the
answer — never the money's trail: the order asks again (its wake, with back-off) with the same key and the
provider answers with the first result; if the order times out first, its reversal refunds the charge. Every
approved charge thus ends as its order's payment or refunded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from actors.order.messages import (
    PaymentFailed,
    PaymentReversed,
    PaymentSucceeded,
    ProcessPayment,
    ReversePayment,
)
from actors.order.repository import orders, payment_simulator_charges
from runtime.errors import ServiceUnavailable
from runtime.store import as_utc

log = logging.getLogger(__name__)


class PaymentUnavailable(Exception):
    """A transient failure: nothing was decided; try again later with the same idempotency key."""


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    idempotency_key: str
    amount: Decimal
    currency: str
    method: str
    token: str


@dataclass(frozen=True, slots=True)
class ChargeResult:
    approved: bool
    charge_id: str = ""  # the provider's id of the charge, when approved
    code: str = ""  # decline code, when declined
    message: str = ""


@dataclass(frozen=True, slots=True)
class ReverseResult:
    refunded: bool  # True: a charge was made and is refunded now; False: nothing was charged (key voided)


class PaymentProvider(Protocol):
    async def charge(self, request: ChargeRequest) -> ChargeResult: ...

    async def reverse(self, idempotency_key: str, reason: str) -> ReverseResult: ...


# ---------------------------------------------------------------------------------------------------
# The simulator

PENDING, APPROVED, DECLINED, REFUNDED = "pending", "approved", "declined", "refunded"
VOIDED = "voided"  # the decline code of a key reversed before it was charged


class Tokens:
    """Payment tokens the simulator knows (the storefront's test cards)."""

    APPROVE = "tok_visa"
    DECLINE = "tok_decline"
    FLAKY = "tok_flaky"  # fails transiently ``flaky_failures`` times per key (per process), then approves
    TIMEOUT = "tok_timeout"  # never completes


@dataclass(frozen=True, slots=True)
class SimulatedCharge:
    """One idempotency key's record at the simulator (a row of ``payment_simulator_charges``)."""

    idempotency_key: str
    order_id: str
    amount: Decimal | None  # None: the key was voided before any charge
    currency: str
    status: str  # pending | approved | declined | refunded
    charge_id: str
    decline_code: str
    attempts: int  # charge calls with this key, by any process
    created_at: datetime
    updated_at: datetime

    @property
    def approved(self) -> bool:
        """A charge was made with the key (refunded since, or not)."""
        return self.status in (APPROVED, REFUNDED)

    @property
    def refunded(self) -> bool:
        return self.status == REFUNDED

    @property
    def result(self) -> ChargeResult:
        """What a charge with this key answers, again and again."""
        if self.approved:
            return ChargeResult(True, charge_id=self.charge_id)
        if self.decline_code == VOIDED:
            return ChargeResult(False, code=VOIDED, message="the payment was cancelled before it completed")
        return ChargeResult(False, code=self.decline_code, message=_DECLINES.get(self.decline_code, "declined"))


_DECLINES = {
    "card_declined": "the card was declined",
    "invalid_token": "the payment token is not known to the provider",
    "amount_over_limit": "the amount is above the provider's limit",
    "idempotency_key_reused": "the idempotency key was used for another amount",
}


@dataclass
class SimulatedPaymentProvider:
    """A payment provider simulator with deterministic rules; no money moves. For development, tests and demos.

    Rules: ``tok_visa`` approves, ``tok_decline`` declines (``card_declined``), an amount above ``limit``
    declines (``amount_over_limit``), ``tok_flaky`` raises :class:`PaymentUnavailable` ``flaky_failures`` times
    per key and then approves, ``tok_timeout`` never answers, any other token declines (``invalid_token``).
    ``latency`` seconds pass between taking a charge on and deciding it (and before a reversal); ``failure_rate``
    makes a call fail transiently at random (seeded, so a run can be repeated).

    Like a real gateway it keeps its idempotency keys itself, durably: a row per key in
    ``payment_simulator_charges`` in the ``engine``'s database (the order service binds its own; see
    :meth:`bind`). A charge first claims its key (a ``pending`` row), then decides, and writes the decision only
    if the row is still pending. So, across processes and crashes:

    * a repeated charge returns the first decision, and the key is charged at most once: a retry that finds the
      row pending (the first attempt died with its process, or is still running elsewhere) decides it itself, and
      of two deciders only the first write counts; the other reads it back;
    * a reversal of a pending key voids it (``declined`` / ``voided``) and the attempt still running then answers
      ``voided``; a reversal of an approved key refunds it (``refunded``); reversing twice answers the same;
    * a key is for one amount: a charge of another amount with it is declined (``idempotency_key_reused``).
    """

    engine: AsyncEngine | None = None
    limit: Decimal = Decimal("10000.00")
    latency: float = 0.0
    flaky_failures: int = 2
    failure_rate: float = 0.0
    seed: int = 0
    calls: int = 0  # charge calls received by this instance, retries included
    _flaky: dict[str, int] = field(default_factory=dict)
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def bind(self, engine: AsyncEngine) -> None:
        """Keep the records in this database (the order service's, migrated with the table)."""
        self.engine = engine

    def _db(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("the payment simulator has no database: bind() it to the order service's engine")
        return self.engine

    # -- the port ----------------------------------------------------------------------------------

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls += 1
        if not (self.latency or self.failure_rate) and request.token not in (Tokens.FLAKY, Tokens.TIMEOUT):
            # Nothing can happen between taking the key on and deciding (no latency, no transient failure): the
            # first call claims and decides in one insert of the decided row. A key already there (a repeated
            # call, a reversal that voided it) fails the insert and takes the general path below, which answers
            # what was recorded first: the same rules, one statement instead of four for the usual charge.
            result = self._decide(request)
            if await self._record_decided(request, result):
                return result
        record = await self._claim(request)
        if record.amount is not None and (record.amount, record.currency) != (request.amount, request.currency):
            return ChargeResult(False, code="idempotency_key_reused", message=_DECLINES["idempotency_key_reused"])
        if record.status != PENDING:
            return record.result  # decided before (by this process or one that is gone): the same answer
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.failure_rate and self._random.random() < self.failure_rate:
            raise PaymentUnavailable("simulated provider hiccup")
        if request.token == Tokens.TIMEOUT:
            await asyncio.Event().wait()  # never set: the caller's timeout ends this
        if request.token == Tokens.FLAKY:
            failures = self._flaky[request.idempotency_key] = self._flaky.get(request.idempotency_key, 0) + 1
            if failures <= self.flaky_failures:
                raise PaymentUnavailable(f"simulated transient failure {failures} of {self.flaky_failures}")
        return await self._decide_once(request.idempotency_key, self._decide(request))

    def _decide(self, request: ChargeRequest) -> ChargeResult:
        if request.token not in (Tokens.APPROVE, Tokens.FLAKY):
            if request.token == Tokens.DECLINE:
                return ChargeResult(False, code="card_declined", message=_DECLINES["card_declined"])
            return ChargeResult(False, code="invalid_token", message=_DECLINES["invalid_token"])
        if request.amount > self.limit:
            return ChargeResult(
                False, code="amount_over_limit", message=f"the amount is above the limit of {self.limit}"
            )
        return ChargeResult(True, charge_id=f"ch_sim_{uuid.uuid4().hex[:16]}")

    async def reverse(self, idempotency_key: str, reason: str) -> ReverseResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        table = payment_simulator_charges
        key = table.c.idempotency_key == idempotency_key
        for _ in range(5):  # each round either settles or lost a race that changed the row: read it again
            now = _now()
            try:
                async with self._db().begin() as conn:
                    row = (await conn.execute(select(table).where(key))).first()
                    if row is None:
                        # Never charged: void the key, so a charge still on its way is declined.
                        await conn.execute(
                            insert(table).values(
                                idempotency_key=idempotency_key,
                                order_id=idempotency_key,
                                amount=None,
                                currency=None,
                                status=DECLINED,
                                charge_id="",
                                decline_code=VOIDED,
                                message=reason[:255],
                                attempts=0,
                                created_at=now,
                                updated_at=now,
                            )
                        )
                        return ReverseResult(refunded=False)
                    if row.status in (DECLINED, REFUNDED):
                        return ReverseResult(refunded=row.status == REFUNDED)
                    changed = (
                        {"status": REFUNDED}
                        if row.status == APPROVED
                        else {"status": DECLINED, "decline_code": VOIDED, "message": reason[:255]}
                    )
                    done = await conn.execute(
                        update(table).where(key, table.c.status == row.status).values(updated_at=now, **changed)
                    )
                    if done.rowcount == 1:
                        return ReverseResult(refunded=row.status == APPROVED)
            except IntegrityError:
                continue  # a charge claimed the key meanwhile
        raise PaymentUnavailable("the key kept changing during the reversal; try again")

    # -- the records -------------------------------------------------------------------------------

    async def _record_decided(self, request: ChargeRequest, result: ChargeResult) -> bool:
        """Insert the key's row already decided; False (nothing written) when the key has a row already."""
        now = _now()
        try:
            async with self._db().begin() as conn:
                await conn.execute(
                    _INSERT_CHARGE,
                    {
                        "idempotency_key": request.idempotency_key,
                        "order_id": request.idempotency_key,
                        "amount": str(request.amount),
                        "currency": request.currency,
                        "status": APPROVED if result.approved else DECLINED,
                        "charge_id": result.charge_id,
                        "decline_code": result.code,
                        "message": result.message[:255],
                        "attempts": 1,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
        except IntegrityError:
            return False
        return True

    async def _claim(self, request: ChargeRequest) -> SimulatedCharge:
        """The key's record, created ``pending`` by the first call; every call is counted in ``attempts``."""
        table = payment_simulator_charges
        key = table.c.idempotency_key == request.idempotency_key
        for _ in range(3):
            now = _now()
            try:
                async with self._db().begin() as conn:
                    done = await conn.execute(update(table).where(key).values(attempts=table.c.attempts + 1))
                    if not done.rowcount:
                        await conn.execute(
                            insert(table).values(
                                idempotency_key=request.idempotency_key,
                                order_id=request.idempotency_key,
                                amount=str(request.amount),
                                currency=request.currency,
                                status=PENDING,
                                charge_id="",
                                decline_code="",
                                message="",
                                attempts=1,
                                created_at=now,
                                updated_at=now,
                            )
                        )
                    row = (await conn.execute(select(table).where(key))).one()
                return _record(row)
            except IntegrityError:
                continue  # another caller inserted the key first: count this call on its row
        raise PaymentUnavailable("could not claim the idempotency key; try again")

    async def _decide_once(self, idempotency_key: str, result: ChargeResult) -> ChargeResult:
        """Write the decision if the key is still pending; otherwise answer what was written first."""
        table = payment_simulator_charges
        key = table.c.idempotency_key == idempotency_key
        values = {
            "status": APPROVED if result.approved else DECLINED,
            "charge_id": result.charge_id,
            "decline_code": result.code,
            "message": result.message[:255],
            "updated_at": _now(),
        }
        async with self._db().begin() as conn:
            done = await conn.execute(update(table).where(key, table.c.status == PENDING).values(**values))
            if done.rowcount == 1:
                return result
            row = (await conn.execute(select(table).where(key))).one()
        return _record(row).result

    # -- what tests, the benchmark and operators look at ------------------------------------------

    async def record(self, idempotency_key: str) -> SimulatedCharge | None:
        """The key's record, whatever its status; None when the key was never used."""
        async with self._db().connect() as conn:
            row = (
                await conn.execute(
                    select(payment_simulator_charges).where(
                        payment_simulator_charges.c.idempotency_key == idempotency_key
                    )
                )
            ).first()
        return _record(row) if row is not None else None

    async def charged(self, idempotency_key: str) -> SimulatedCharge | None:
        """The charge made with this key, refunded or not; None when the key was never charged."""
        found = await self.record(idempotency_key)
        return found if found is not None and found.approved else None

    async def voided(self, idempotency_key: str) -> bool:
        """The key was reversed before it was charged: no charge can be made with it any more."""
        found = await self.record(idempotency_key)
        return found is not None and found.decline_code == VOIDED

    async def records(self) -> list[SimulatedCharge]:
        async with self._db().connect() as conn:
            rows = await conn.execute(
                select(payment_simulator_charges).order_by(payment_simulator_charges.c.created_at)
            )
            return [_record(row) for row in rows]

    async def stray_charges(self) -> list[SimulatedCharge]:
        """Charges that stand (approved, not refunded) for an order that is not paid or shipped. Once every saga has
        settled this is empty: an approved charge ends as its order's payment or refunded."""
        t, o = payment_simulator_charges, orders
        query = (
            select(t)
            .select_from(t.outerjoin(o, o.c.id == t.c.order_id))
            .where(t.c.status == APPROVED, or_(o.c.status.is_(None), o.c.status.not_in(("paid", "shipped"))))
        )
        async with self._db().connect() as conn:
            return [_record(row) for row in await conn.execute(query)]


_INSERT_CHARGE = insert(payment_simulator_charges)  # built once: the hot path of every simulated charge


def _record(row: Any) -> SimulatedCharge:
    return SimulatedCharge(
        idempotency_key=row.idempotency_key,
        order_id=row.order_id,
        amount=Decimal(row.amount) if row.amount is not None else None,
        currency=row.currency or "",
        status=row.status,
        charge_id=row.charge_id,
        decline_code=row.decline_code,
        attempts=row.attempts,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------------
# The processor


Deliver = Callable[[str, Any, str], Awaitable[None]]  # (order id, result message, message id)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    call_timeout: float = 10.0  # seconds one provider call may take before it counts as a transient failure
    first_delay: float = 0.05  # seconds before the first retry; doubled every time, up to max_delay
    max_delay: float = 2.0
    max_concurrent: int = 256  # charges in flight at once per process


class PaymentProcessor:
    """Runs the payment step of orders: one charge task per order at a time, results told to the order actor.

    ``deliver(order_id, message, message_id)`` hands a :class:`PaymentSucceeded` / :class:`PaymentFailed` /
    :class:`PaymentReversed` to the order actor; the message id derives from the request's, so a redelivered
    request that charges again (and gets the remembered result) is dropped by the actor's inbox.
    """

    def __init__(self, provider: PaymentProvider, deliver: Deliver, policy: RetryPolicy | None = None) -> None:
        self.provider = provider
        self.deliver = deliver
        self.policy = policy or RetryPolicy()
        self._gate = asyncio.Semaphore(self.policy.max_concurrent)
        self._charging: dict[str, asyncio.Task[None]] = {}  # by order id

    # -- bus handlers ------------------------------------------------------------------------------

    def start_charge(self, command: ProcessPayment, message_id: str) -> None:
        """Start charging in the background and return at once, so the bus session is not held for as long as
        the provider takes. A request for an order already being charged here is dropped: that charge answers."""
        if command.order_id in self._charging:
            return
        task = asyncio.get_running_loop().create_task(
            self._charge(command, message_id), name=f"charge:{command.order_id}"
        )
        self._charging[command.order_id] = task
        task.add_done_callback(functools.partial(self._charge_done, command.order_id))

    async def reverse(self, command: ReversePayment, message_id: str) -> None:
        """Stop any charge of the order in flight here, void/refund at the provider, and confirm to the order.
        A provider failure is only logged: the order keeps asking (its wake reminder) until it has the confirmation,
        so retrying here as well would only hold the bus session."""
        task = self._charging.pop(command.order_id, None)
        if task is not None:
            # Wait until it has stopped, so the provider sees the reversal after anything that attempt wrote (the
            # provider's own conditional writes keep it correct either way; this keeps it simple to reason about).
            task.cancel()
            await asyncio.wait({task}, timeout=self.policy.call_timeout)
        try:
            async with asyncio.timeout(self.policy.call_timeout):
                result = await self.provider.reverse(command.order_id, command.reason)
        except (PaymentUnavailable, TimeoutError) as exc:
            log.warning("order %s: payment reversal failed, the order will ask again: %r", command.order_id, exc)
            return
        if result.refunded:
            log.info("order %s: charge refunded (%s)", command.order_id, command.reason)
        reversed_ = PaymentReversed(command.order_id, result.refunded, request_id=message_id)
        until = datetime.now(UTC) + timedelta(seconds=self.policy.call_timeout)
        await self._tell(command.order_id, reversed_, f"{message_id}/result", until)

    async def close(self) -> None:
        tasks = list(self._charging.values())
        self._charging.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._charging)

    # -- the charge --------------------------------------------------------------------------------

    async def _charge(self, command: ProcessPayment, message_id: str) -> None:
        request = ChargeRequest(command.order_id, command.amount, command.currency, command.method, command.token)
        async with self._gate:
            result = await self._charge_until_decided(request, command.deadline)
        if result is None:
            return  # out of time: the order's payment timeout cancels it and reverses the key
        message: PaymentSucceeded | PaymentFailed
        if result.approved:
            message = PaymentSucceeded(command.order_id, result.charge_id, command.amount)
        else:
            message = PaymentFailed(command.order_id, result.code, result.message)
        await self._tell(command.order_id, message, f"{message_id}/result", command.deadline)

    async def _tell(self, order_id: str, message: Any, message_id: str, until: datetime) -> None:
        """Hand the result to the order, retrying while the actor is momentarily unavailable (full mailbox, ask
        timeout, database blip) until ``until``. The provider has decided: losing the answer here would leave the
        order to find it only on its next wake, or to time out and refund a charge it could have kept. Retries
        carry the same message id, so the actor applies the result once."""
        delay = self.policy.first_delay
        while True:
            try:
                await self.deliver(order_id, message, message_id)
                return
            except ServiceUnavailable as exc:
                if datetime.now(UTC) + timedelta(seconds=delay) >= until:
                    raise
                log.info("order %s: %s not delivered yet (%r); retrying", order_id, type(message).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.policy.max_delay)

    async def _charge_until_decided(self, request: ChargeRequest, deadline: datetime) -> ChargeResult | None:
        """Charge, retrying transient failures (same key) with backoff until the order's deadline."""
        delay = self.policy.first_delay
        attempt = 0
        while True:
            attempt += 1
            left = (deadline - datetime.now(UTC)).total_seconds()
            if left <= 0:
                log.warning(
                    "order %s: no payment result before the deadline (%d attempts)",
                    request.idempotency_key,
                    attempt - 1,
                )
                return None
            try:
                async with asyncio.timeout(min(self.policy.call_timeout, left)):
                    return await self.provider.charge(request)
            except (PaymentUnavailable, TimeoutError) as exc:
                log.info("order %s: payment attempt %d failed transiently: %r", request.idempotency_key, attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.policy.max_delay)

    def _charge_done(self, order_id: str, task: asyncio.Task[None]) -> None:
        if self._charging.get(order_id) is task:
            del self._charging[order_id]
        if not task.cancelled() and task.exception() is not None:
            # The result could not be told (actor unavailable): the order's retry reminder asks again.
            log.warning("order %s: payment step failed: %r", order_id, task.exception())
