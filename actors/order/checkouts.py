"""Orders accepted by the cart that this service has not recorded yet: so ``GET /api/orders/{id}`` never 404s after
the checkout's 202 (issue 14).

Why the order service asks the cart. The 202 of ``POST /api/cart/checkout`` is sent once the cart's turn has
committed, in one transaction of the cart's database, the checkout record and the ``CheckoutRequested`` outbox row.
The order itself is created later, when the order actor handles that message (relay, bus, the order's own commit):
a buyer who follows the ``Location`` at once could find nothing. The two writes are in two services' databases, so
they cannot share a transaction; the alternatives were weighed:

* the cart answering 202 only after the order service confirmed the order (a call to it, or waiting for
  ``OrderStarted``) puts a second service's commit and a network call on every checkout, and a confirmation that
  does not come (timeout) leaves the cart with a committed checkout it can neither report as failed (a retry would
  order twice) nor as accepted without breaking the promise;
* reading the cart's outbox from here would couple the order service to another service's database.

So the record the 202 was based on answers for the order: on a miss, this service asks the cart for the caller's
checkout with that order id (``GET {cart}/api/cart/checkouts/{id}``, with the caller's own bearer token: the cart is
the token subject's, so nobody learns about another buyer's checkout). The cart keeps the ``CheckoutRequested`` it
sent (without the payment details) in the checkout record until ``OrderStarted``; the order is answered from it as
``submitted``, exactly what the order actor makes of it first. When the cart says the order has started, the
order exists here: it is read again (it was committed before ``OrderStarted`` was published). Nothing is added to
the checkout path; a miss costs one call to the cart, and a buyer polling an order that is still on its way costs
at most one call per ``ttl`` (the cart's answer about a pending order is kept that long, per order and caller: a
backlog of polled orders must not become a second backlog at the cart). The order's own record, once there, is
always read first, so the kept answer never hides it.

This holds in a cluster: the record is durable in the cart's database before the 202, and every cart instance
answers from it (a read there checks its copy against the stored version). What it does not cover: an admin
reading another buyer's order before it is recorded (the record is found through the caller's own cart), and a
checkout the cart has forgotten before its order started (more than ``MAX_CHECKOUTS`` newer checkouts meanwhile).
A cart that cannot say (no instance answers within ``timeout``, or every one fails) makes a miss of an id a cart
could have made (a UUID) a 503 with ``Retry-After``, never a 404: a 404 would tell a buyer whose 202 was sent that
the order does not exist, when all that is known is that the cart could not be asked (under load, a 1 s lookup
timing out answered 404 before).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from runtime.errors import ServiceUnavailable
from runtime.host import request_id_var
from runtime.upstream import Instance, InstanceFailed, NoInstance, Upstream

log = logging.getLogger(__name__)

CHECKOUT_PATH = "/api/cart/checkouts/"
DEFAULT_TIMEOUT = 2.0  # seconds for one cart instance's answer (a miss waits at most this, then 503)
RETRY_AFTER = 1.0  # seconds a caller is asked to wait when the cart could not be asked
DEFAULT_TTL = 1.0  # seconds the cart's answer about a pending order is reused for the same order and caller
MAX_KEPT = 10_000  # pending answers kept at most (oldest go first)


@dataclass(frozen=True, slots=True)
class AcceptedCheckout:
    """The cart's answer: ``started`` once the order exists here; ``order``: the CheckoutRequested body until then."""

    started: bool
    order: dict[str, Any] | None


class AcceptedCheckouts:
    """Asks the cart service (every instance, through an :class:`Upstream`) for one of the caller's checkouts."""

    def __init__(
        self, upstream: Upstream | str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ttl: float = DEFAULT_TTL
    ) -> None:
        self.upstream = upstream if isinstance(upstream, Upstream) else Upstream("cart", upstream)
        self.timeout = timeout
        self.ttl = ttl
        self.lookups = 0  # calls made to the cart (tests read it)
        self._session: aiohttp.ClientSession | None = None
        # (order id, caller's authorization) -> (monotonic time, pending answer): only answers with an order body
        self._kept: OrderedDict[tuple[str, str], tuple[float, AcceptedCheckout]] = OrderedDict()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def find(self, order_id: str, authorization: str) -> AcceptedCheckout | None:
        """The caller's checkout of ``order_id``; None when the cart has none. Raises :class:`ServiceUnavailable`
        (503, ``Retry-After``) when no cart instance could say (logged): not knowing is not "no such order"."""
        if self._session is None or not authorization:
            return None
        key = (order_id, authorization)
        kept = self._kept.get(key)
        if kept is not None and time.monotonic() - kept[0] < self.ttl:
            return kept[1]
        self.lookups += 1
        try:
            body = await self.upstream.call(lambda instance: self._attempt(instance, order_id, authorization))
        except NoInstance as exc:
            log.warning("order %s: the cart cannot be asked about its checkout: %s", order_id, exc)
            raise ServiceUnavailable(
                f"the order {order_id} is not recorded here yet, and the cart that accepted it cannot be asked now",
                retry_after=RETRY_AFTER,
                slug="order-pending",
            ) from exc
        if body is None:
            return None
        order = body.get("order") if isinstance(body, dict) else None
        started = isinstance(body, dict) and body.get("started") is True
        found = AcceptedCheckout(started, order if isinstance(order, dict) else None)
        if not found.started and found.order is not None:
            now = time.monotonic()
            self._kept[key] = (now, found)
            self._kept.move_to_end(key)
            # Oldest first: expired answers go as new ones come, so what is kept is the last ``ttl`` seconds' worth
            # (under the storefront mix the cap alone kept 10,000 answers with their orders, minutes old).
            while self._kept and (len(self._kept) > MAX_KEPT or now - next(iter(self._kept.values()))[0] >= self.ttl):
                self._kept.popitem(last=False)
        return found

    async def _attempt(self, instance: Instance, order_id: str, authorization: str) -> Any:
        assert self._session is not None
        headers = {"Authorization": authorization}
        request_id = request_id_var.get()
        if request_id != "-":
            headers["X-Request-Id"] = request_id
        try:
            async with self._session.get(instance.url + CHECKOUT_PATH + order_id, headers=headers) as resp:
                if resp.status >= 500:
                    raise InstanceFailed(f"answered {resp.status}")
                if resp.status != 200:
                    return None  # 404: no such checkout in the caller's cart (401/403: not the caller's to know)
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InstanceFailed(f"unreachable: {exc!r}") from exc
        except ValueError:  # not JSON: nothing to answer from
            return None
