"""The cart's synchronous view of the catalog: product name, price, currency and stock over HTTP.

Prices never come from the client; they come from here. One :class:`CatalogClient` per service process:

* every catalog instance (``ECOM_CATALOG_UPSTREAMS``) through an :class:`~runtime.upstream.Upstream`: the
  least busy available instance answers; one that cannot be reached, times out or answers 5xx is cooled down and
  the lookup (a GET: idempotent) moves on to another instance at once, at most ``max_attempts`` of them;
* one shared ``aiohttp.ClientSession`` (opened with the service, closed with it) and a total timeout per attempt,
  so a slow instance costs a request at most ``timeout`` seconds before the next one is tried;
* a short TTL cache of answers (unknown products included), because a customer changing quantities asks for
  the same product again and again and a price a few seconds old is fine while shopping: checkout asks with
  ``fresh=True`` and the ``ProductPriceChanged`` event drops the cached entry of that product;
* single flight and batching: a cached lookup of an id already being fetched joins that request, and the ids of
  lookups made in the same turn of the event loop go in one batch request (up to :data:`BATCH_SIZE`), so a burst
  of shoppers adding different products costs the catalog a few requests, not one each (200 concurrent adds made
  200 requests, and on a loaded machine some outlived the timeout: 503s); a ``fresh`` lookup makes its own request
  (joining one that started earlier could answer an older price);
* failures become problems: no instance reachable, all timed out or 5xx -> :class:`CatalogUnavailable`
  (503 + Retry-After);
  any other unexpected answer -> 502. A request never fails with a 500 because the catalog misbehaved.

It reads ``GET /api/catalog/products/batch?ids=a,b,c`` -> ``{"items": [product, ...]}`` (unknown or deleted ids
are left out), at most :data:`BATCH_SIZE` ids per call (the catalog's limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from actors.cart.messages import ProductQuote
from runtime.errors import BadGateway, ServiceUnavailable
from runtime.host import request_id_var
from runtime.upstream import Instance, InstanceFailed, NoInstance, Upstream

log = logging.getLogger(__name__)

BATCH_PATH = "/api/catalog/products/batch"
BATCH_SIZE = 100  # the catalog answers at most this many ids per batch request
DEFAULT_TIMEOUT = 2.0  # seconds for one attempt at one catalog instance, connecting included
CONNECT_TIMEOUT = 0.5  # seconds to open a connection: a blackholed instance must leave time for another one
DEFAULT_TTL = 3.0  # seconds an answer is reused
MAX_CACHED = 10_000  # products cached at most (least recently stored go first)
RETRY_AFTER = 2.0


class CatalogUnavailable(ServiceUnavailable):
    slug = "catalog-unavailable"
    title = "The catalog is unavailable"


class CatalogClient:
    def __init__(
        self, upstream: Upstream | str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ttl: float = DEFAULT_TTL
    ) -> None:
        # A URL, comma-separated URLs or a list of them: every catalog instance.
        self.upstream = upstream if isinstance(upstream, Upstream) else Upstream("catalog", upstream)
        self.timeout = timeout
        self.ttl = ttl
        self.requests = 0  # calls made to the catalog (tests and metrics read it)
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[str, tuple[float, ProductQuote | None]] = OrderedDict()
        self._flights: dict[str, asyncio.Task[dict[str, ProductQuote | None]]] = {}  # id -> the fetch that asks it
        self._gathering: list[str] = []  # ids of the batch not sent yet (it goes at the loop's next turn)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(CONNECT_TIMEOUT, self.timeout))
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- lookups -------------------------------------------------------------------------------

    async def quote(self, product_id: str) -> ProductQuote | None:
        """The product, or None when the catalog does not know it (never existed or deleted)."""
        return (await self.quotes([product_id]))[product_id]

    async def quotes(self, product_ids: Iterable[str], *, fresh: bool = False) -> dict[str, ProductQuote | None]:
        """Every asked id mapped to its product or None. ``fresh`` skips the cache (checkout's re-check)."""
        wanted = list(dict.fromkeys(product_ids))
        found: dict[str, ProductQuote | None] = {}
        missing: list[str] = []
        now = time.monotonic()
        for product_id in wanted:
            entry = None if fresh else self._cache.get(product_id)
            if entry is not None and entry[0] > now:
                found[product_id] = entry[1]
            else:
                missing.append(product_id)
        fetches: list[Awaitable[dict[str, ProductQuote | None]]]
        if fresh:
            chunks = [tuple(missing[i : i + BATCH_SIZE]) for i in range(0, len(missing), BATCH_SIZE)]
            fetches = [self._fetch(chunk) for chunk in chunks]
        else:
            # shield: a requester that goes away (client disconnected) must not cancel the others' fetch.
            fetches = [asyncio.shield(task) for task in dict.fromkeys(self._flight(pid) for pid in missing)]
        asked = set(missing)
        for part in await asyncio.gather(*fetches):
            found.update((pid, quote) for pid, quote in part.items() if pid in asked)
        return found

    def forget(self, product_id: str) -> None:
        """Drop a cached answer (the product changed)."""
        self._cache.pop(product_id, None)

    # -- fetching ------------------------------------------------------------------------------

    def _flight(self, product_id: str) -> asyncio.Task[dict[str, ProductQuote | None]]:
        """The fetch that will answer ``product_id``: one in flight that asks it, else the batch being gathered."""
        task = self._flights.get(product_id)
        if task is not None:
            return task
        if not self._gathering or len(self._gathering) >= BATCH_SIZE:
            self._gathering = batch = [product_id]
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            task.add_done_callback(lambda t: self._landed(batch, t))
        else:
            self._gathering.append(product_id)
            task = self._flights[self._gathering[0]]
        self._flights[product_id] = task
        return task

    async def _send_batch(self, batch: list[str]) -> dict[str, ProductQuote | None]:
        await asyncio.sleep(0)  # one turn of the loop: the lookups made meanwhile join this batch
        if self._gathering is batch:
            self._gathering = []
        return await self._fetch(tuple(batch))

    def _landed(self, batch: list[str], task: asyncio.Task[Any]) -> None:
        if self._gathering is batch:
            self._gathering = []
        for product_id in batch:
            if self._flights.get(product_id) is task:
                del self._flights[product_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so a fetch whose requesters all left logs no warning

    async def _fetch(self, ids: tuple[str, ...]) -> dict[str, ProductQuote | None]:
        if self._session is None:
            raise CatalogUnavailable("the cart service is not connected to the catalog (starting or stopping)")
        self.requests += 1
        try:
            body = await self.upstream.call(lambda instance: self._attempt(instance, ids))
        except NoInstance as exc:
            log.warning("catalog lookup failed on every instance: %s", exc)
            raise CatalogUnavailable(
                "the catalog cannot be reached right now; nothing was changed, try again shortly",
                retry_after=max(RETRY_AFTER, exc.retry_after),
            ) from None
        answers: dict[str, ProductQuote | None] = dict.fromkeys(ids)
        for quote in _parse_items(body):
            if quote.product_id in answers:
                answers[quote.product_id] = quote
        self._remember(answers)
        return answers

    async def _attempt(self, instance: Instance, ids: tuple[str, ...]) -> Any:
        """One batch lookup at one instance: its JSON body, :class:`InstanceFailed` when the instance is at fault
        (the call moves on to another), a problem when the answer is wrong in a way another instance would repeat."""
        assert self._session is not None
        url = instance.url + BATCH_PATH
        request_id = request_id_var.get()  # "-" outside a request (an event's fan-out): let the catalog make one
        headers = {"X-Request-Id": request_id} if request_id != "-" else {}
        try:
            async with self._session.get(url, params={"ids": ",".join(ids)}, headers=headers) as resp:
                if resp.status >= 500:
                    raise InstanceFailed(f"answered {resp.status}")
                if resp.status != 200:
                    log.warning(
                        "catalog batch lookup at %s answered %s: %s",
                        instance.url,
                        resp.status,
                        (await resp.text())[:300],
                    )
                    raise BadGateway(f"the catalog refused the product lookup ({resp.status})")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InstanceFailed(f"unreachable: {exc!r}") from exc
        except ValueError:  # not JSON
            raise BadGateway("the catalog sent an answer the cart cannot read") from None

    def _remember(self, answers: dict[str, ProductQuote | None]) -> None:
        expires = time.monotonic() + self.ttl
        for product_id, quote in answers.items():
            self._cache[product_id] = (expires, quote)
            self._cache.move_to_end(product_id)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)


def _parse_items(body: Any) -> list[ProductQuote]:
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise BadGateway("the catalog's batch answer has no item list")
    return [_parse_product(item) for item in items]


def _parse_product(item: Any) -> ProductQuote:
    try:
        price = item["price"]
        if not isinstance(price, str):  # the contract: a decimal string, never a float
            raise TypeError("price is not a decimal string")
        quote = ProductQuote(
            product_id=str(item["id"]),
            name=str(item["name"]),
            unit_price=Decimal(price),
            currency=str(item["currency"]),
            picture_url=str(item.get("picture_url") or ""),
            available_stock=int(item["available_stock"]),
        )
    except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
        log.warning("unreadable product from the catalog: %r (%s)", item, exc)
        raise BadGateway("the catalog sent a product the cart cannot read") from None
    if not quote.unit_price.is_finite() or quote.unit_price < 0:
        raise BadGateway(f"the catalog sent an invalid price for product {quote.product_id}")
    return quote
