"""Payments: the :class:`PaymentProvider` port, the simulator that ships with the service, and the processor
that runs charges outside actor turns.

The port is what a real gateway adapter (Stripe, Adyen...) implements. Its contract:

* ``charge`` is idempotent per ``idempotency_key`` (the order id): a repeated call with the same key returns the
  first call's result and never charges again; a key that was voided can no longer be charged;
* a transient problem (provider unreachable, 5xx, rate limited) raises :class:`PaymentUnavailable`; the caller
  retries with the same key. A call may also hang: the caller bounds every call with a timeout;
* ``reverse`` voids a key (a charge still in flight will be declined) or refunds the charge made with it.

:class:`SimulatedPaymentProvider` is a stand-in with deterministic rules, named as such so nobody mistakes it for
a real gateway: no money ever moves.

:class:`PaymentProcessor` is the order service's side: it receives ``ProcessPayment`` from the bus, charges in a
background task (never inside an actor turn, which would hold the order's mailbox for as long as the provider
takes) and tells the order actor the outcome. A process that dies mid-charge loses only the task: the order
asks again (its retry reminder) with the same key, and the provider answers from its memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from actors.order.messages import (
    PaymentFailed,
    PaymentReversed,
    PaymentSucceeded,
    ProcessPayment,
    ReversePayment,
)

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


class Tokens:
    """Payment tokens the simulator knows (the storefront's test cards)."""

    APPROVE = "tok_visa"
    DECLINE = "tok_decline"
    FLAKY = "tok_flaky"  # fails transiently ``flaky_failures`` times per key, then approves
    TIMEOUT = "tok_timeout"  # never completes


@dataclass(slots=True)
class SimulatedCharge:
    request: ChargeRequest
    result: ChargeResult
    refunded: bool = False


@dataclass
class SimulatedPaymentProvider:
    """A payment provider simulator with deterministic rules; no money moves. For development, tests and demos.

    Rules: ``tok_visa`` approves, ``tok_decline`` declines (``card_declined``), an amount above ``limit``
    declines (``amount_over_limit``), ``tok_flaky`` raises :class:`PaymentUnavailable` ``flaky_failures`` times
    per key and then approves, ``tok_timeout`` never answers, any other token declines (``invalid_token``).
    Every call first waits ``latency`` seconds; ``failure_rate`` makes any call fail transiently at random
    (seeded, so a run can be repeated). Results are remembered per idempotency key, like a real gateway.
    """

    limit: Decimal = Decimal("10000.00")
    latency: float = 0.0
    flaky_failures: int = 2
    failure_rate: float = 0.0
    seed: int = 0
    charges: dict[str, SimulatedCharge] = field(default_factory=dict)  # by idempotency key
    voided: set[str] = field(default_factory=set)
    calls: int = 0  # charge calls received, retries included
    _flaky: dict[str, int] = field(default_factory=dict)
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        self.calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        # From here to the end there is no await before the result is recorded: concurrent calls with one key
        # cannot both charge.
        key = request.idempotency_key
        earlier = self.charges.get(key)
        if earlier is not None:
            return earlier.result
        if key in self.voided:
            return ChargeResult(False, code="voided", message="the payment was cancelled before it completed")
        if self.failure_rate and self._random.random() < self.failure_rate:
            raise PaymentUnavailable("simulated provider hiccup")
        if request.token == Tokens.TIMEOUT:
            await asyncio.Event().wait()  # never set: the caller's timeout ends this
        if request.token == Tokens.FLAKY:
            failures = self._flaky[key] = self._flaky.get(key, 0) + 1
            if failures <= self.flaky_failures:
                raise PaymentUnavailable(f"simulated transient failure {failures} of {self.flaky_failures}")
        result = self._decide(request)
        self.charges[key] = SimulatedCharge(request, result)
        return result

    def _decide(self, request: ChargeRequest) -> ChargeResult:
        if request.token not in (Tokens.APPROVE, Tokens.FLAKY):
            if request.token == Tokens.DECLINE:
                return ChargeResult(False, code="card_declined", message="the card was declined")
            return ChargeResult(False, code="invalid_token", message="the payment token is not known to the provider")
        if request.amount > self.limit:
            return ChargeResult(
                False, code="amount_over_limit", message=f"the amount is above the limit of {self.limit}"
            )
        return ChargeResult(True, charge_id=f"ch_sim_{uuid.uuid4().hex[:16]}")

    async def reverse(self, idempotency_key: str, reason: str) -> ReverseResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        self.voided.add(idempotency_key)
        charge = self.charges.get(idempotency_key)
        if charge is None or not charge.result.approved:
            return ReverseResult(refunded=False)
        charge.refunded = True
        return ReverseResult(refunded=True)

    # -- what tests and the benchmark look at ------------------------------------------------------

    def charged(self, idempotency_key: str) -> SimulatedCharge | None:
        """The approved charge of this key, refunded or not; None when the key was never charged."""
        charge = self.charges.get(idempotency_key)
        return charge if charge is not None and charge.result.approved else None


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
        task.add_done_callback(lambda t, order_id=command.order_id: self._charge_done(order_id, t))

    async def reverse(self, command: ReversePayment, message_id: str) -> None:
        """Stop any charge of the order in flight here, void/refund at the provider, and confirm to the order.
        A provider failure is only logged: the order keeps asking (its wake reminder) until it has the confirmation,
        so retrying here as well would only hold the bus session."""
        task = self._charging.pop(command.order_id, None)
        if task is not None:
            task.cancel()
        try:
            async with asyncio.timeout(self.policy.call_timeout):
                result = await self.provider.reverse(command.order_id, command.reason)
        except (PaymentUnavailable, TimeoutError) as exc:
            log.warning("order %s: payment reversal failed, the order will ask again: %r", command.order_id, exc)
            return
        if result.refunded:
            log.info("order %s: charge refunded (%s)", command.order_id, command.reason)
        reversed_ = PaymentReversed(command.order_id, result.refunded, request_id=message_id)
        await self.deliver(command.order_id, reversed_, f"{message_id}/result")

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
        await self.deliver(command.order_id, message, f"{message_id}/result")

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
