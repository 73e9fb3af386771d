"""Admission control at checkout: refuse new orders (503 + Retry-After) while the system behind checkout is
already too far behind, instead of letting every queue grow until orders time out.

Two backlogs are measured (issue 11 C):

* the cart service's own outbox: rows not yet relayed to the bus (``outbox.sent_at IS NULL`` in its database).
  A growing count means ``CheckoutRequested`` messages are not leaving (bus down or slow);
* the order service's load, ``GET {order}/api/order/internal/load`` -> ``{"open_orders": n, "outbox_backlog": n}``
  on every order instance (``ECOM_ORDER_UPSTREAMS``), taking the largest of each: orders in the saga and the
  order service's own unsent messages.

Checkout is refused when ``open_orders + in flight > shop.max_open_orders`` or either outbox backlog
``> shop.max_outbox_backlog``.

*In flight* are the checkouts this process accepted (202) whose order has not started yet (no ``OrderStarted`` seen
here). The order service counts an order only once its actor handled ``CheckoutRequested``; until then the request
waits in the cart's outbox and then in the bus (in memory: invisible to both counts). Without this count every
buyer could be accepted again and again while earlier requests still queue for the order service, and the saga
backlog grew far past the limit (the refusal only came once the queued requests had become orders). An entry is
dropped on ``OrderStarted`` or after ``IN_FLIGHT_TTL`` at the latest (an event consumed by another instance of a
cluster, or lost), so a miss can only refuse for a bounded time.

Cost per request: none beyond reading a cached :class:`Load`. A measurement older than ``ttl`` (0.5 s) is
renewed by the first checkout that finds it old; concurrent checkouts wait for that same one measurement (one in
flight, shielded from a client that goes away) whose parts run concurrently and are bounded by ``timeout``.

Failures never refuse a checkout on their own: an order instance that does not answer (or answers something that
is not the contract) is left out — cooled down by its :class:`~runtime.upstream.Upstream`, so a dead
instance costs no time on the following measurements — and when none answers the order load is unknown; the
outbox and the bus buffer the checkout meanwhile, and the local outbox check still applies. A local count that
fails (database down) is unknown too: the checkout's own commit then fails with its own 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from config import ShopSettings
from runtime.errors import ServiceUnavailable
from runtime.store import outbox
from runtime.upstream import Instance, Upstream

log = logging.getLogger(__name__)

LOAD_PATH = "/api/order/internal/load"
DEFAULT_TTL = 0.5  # seconds a measurement is used
DEFAULT_TIMEOUT = 0.5  # seconds for one order instance's answer (a refresh waits at most about this long)
RETRY_AFTER = 2.0  # seconds a refused customer is asked to wait, before jitter
IN_FLIGHT_TTL = 60.0  # seconds an accepted checkout counts as in flight at most, without its OrderStarted


class CheckoutOverloaded(ServiceUnavailable):
    slug = "checkout-overloaded"
    title = "Too many orders are in progress"


@dataclass(frozen=True, slots=True)
class Load:
    """One measurement. None: could not be measured (never a reason to refuse)."""

    cart_outbox: int | None
    open_orders: int | None
    order_outbox: int | None
    measured_at: float  # monotonic


class Admission:
    def __init__(
        self,
        engine: AsyncEngine,
        order: Upstream,
        limits: ShopSettings,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.order = order
        self.max_open_orders = limits.max_open_orders
        self.max_outbox_backlog = limits.max_outbox_backlog
        self.ttl = ttl
        self.timeout = timeout
        self.refused = 0  # checkouts refused (metrics and tests)
        self._clock = clock
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._load: Load | None = None
        self._measuring: asyncio.Task[Load] | None = None
        self._order_known = True  # for logging only the changes between known and unknown
        # order id -> clock() when accepted: checkouts accepted here whose OrderStarted was not seen yet (oldest first)
        self._in_flight: dict[str, float] = {}
        self.in_flight_ttl = IN_FLIGHT_TTL

    # -- checkouts in flight (accepted, order not started yet) -------------------------------------

    def accepted(self, order_id: str) -> None:
        """A checkout was accepted (202, not a replay): it counts against ``max_open_orders`` until its order starts."""
        self._expire()
        self._in_flight[order_id] = self._clock()

    def started(self, order_id: str) -> None:
        """``OrderStarted``: the order service counts the order now."""
        self._in_flight.pop(order_id, None)

    @property
    def in_flight(self) -> int:
        self._expire()
        return len(self._in_flight)

    def _expire(self) -> None:
        cutoff = self._clock() - self.in_flight_ttl
        while self._in_flight:
            order_id, at = next(iter(self._in_flight.items()))
            if at >= cutoff:
                break
            del self._in_flight[order_id]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._measuring is not None:
            self._measuring.cancel()
            await asyncio.gather(self._measuring, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the check ---------------------------------------------------------------------------------

    async def check(self) -> None:
        """Return when a checkout may go ahead; raise :class:`CheckoutOverloaded` when it may not."""
        load = await self.load()
        # Plus the checkouts accepted here that the order service does not count yet. An unknown order load stays
        # unknown (never a reason to refuse on its own): the local outbox check still applies then.
        in_saga = None if load.open_orders is None else load.open_orders + self.in_flight
        for name, value, limit in (
            ("max_open_orders", in_saga, self.max_open_orders),
            ("max_outbox_backlog", load.order_outbox, self.max_outbox_backlog),
            ("max_outbox_backlog", load.cart_outbox, self.max_outbox_backlog),
        ):
            if value is not None and value > limit:
                self.refused += 1
                what = "orders are being processed" if name == "max_open_orders" else "messages are waiting to be sent"
                raise CheckoutOverloaded(
                    f"too many {what} right now ({value}, the limit is {limit}); nothing was changed, "
                    "please check out again in a few seconds",
                    # Jittered, so the refused customers' retries do not come back as one wave.
                    retry_after=RETRY_AFTER * self._rng.uniform(1.0, 2.0),
                    limit=name,
                    setting=f"ECOM_SHOP_{name.upper()}",
                    current=value,
                    maximum=limit,
                )

    async def load(self) -> Load:
        """The current measurement: the cached one while it is younger than ``ttl``, else a new one (shared)."""
        load = self._load
        if load is not None and self._clock() - load.measured_at < self.ttl:
            return load
        if self._measuring is None:
            self._measuring = asyncio.get_running_loop().create_task(self._measure(), name="checkout-admission")
            self._measuring.add_done_callback(self._measured)
        # shield: a checkout whose client went away must not cancel the measurement the others wait for.
        return await asyncio.shield(self._measuring)

    def _measured(self, task: asyncio.Task[Load]) -> None:
        if self._measuring is task:
            self._measuring = None
        if not task.cancelled() and task.exception() is None:
            self._load = task.result()

    async def _measure(self) -> Load:
        started = self._clock()
        cart_outbox, order = await asyncio.gather(self._cart_outbox(), self._order_load())
        open_orders, order_outbox = order if order is not None else (None, None)
        return Load(cart_outbox, open_orders, order_outbox, started)

    # -- the measurements --------------------------------------------------------------------------

    async def _cart_outbox(self) -> int | None:
        # Counted up to just past the limit: above it the exact number changes nothing, and the count stays cheap
        # however far behind the relay is.
        unsent = select(outbox.c.id).where(outbox.c.sent_at.is_(None)).limit(self.max_outbox_backlog + 1).subquery()
        try:
            async with asyncio.timeout(self.timeout), self.engine.connect() as conn:
                return int((await conn.execute(select(func.count()).select_from(unsent))).scalar_one())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 any failure means "unknown": admission goes by the other signals
            log.warning("checkout admission: cannot count the cart's unsent messages: %r", exc)
            return None

    async def _order_load(self) -> tuple[int, int] | None:
        """The largest open-order count and outbox backlog over the order instances that answer; None: none did."""
        instances = self.order.available()
        answers = await asyncio.gather(*(self._ask(instance) for instance in instances)) if instances else []
        known = [a for a in answers if a is not None]
        if not known:
            if self._order_known:
                log.warning("checkout admission: the order service's load is unknown (no instance answered); not used")
            self._order_known = False
            return None
        if not self._order_known:
            log.info("checkout admission: the order service's load is known again")
        self._order_known = True
        return max(a[0] for a in known), max(a[1] for a in known)

    async def _ask(self, instance: Instance) -> tuple[int, int] | None:
        if self._session is None:
            return None
        instance.calls += 1
        instance.outstanding += 1
        try:
            async with self._session.get(instance.url + LOAD_PATH) as resp:
                if resp.status != 200:
                    raise ValueError(f"answered {resp.status}")
                body: Any = await resp.json(content_type=None)
            answer = _parse_load(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 unreachable, timed out, not the contract: this instance is left out for a while
            self.order.failed(instance, f"load: {exc!r}")
            return None
        finally:
            instance.outstanding -= 1
        self.order.succeeded(instance)
        return answer


def _parse_load(body: Any) -> tuple[int, int]:
    if not isinstance(body, dict):
        raise TypeError("the load answer is not an object")
    values = body.get("open_orders"), body.get("outbox_backlog")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"the load answer needs open_orders and outbox_backlog as counts: {body!r}")
    return values  # type: ignore[return-value]  # both checked to be counts just above
