"""The cart's synchronous view of the catalog: product name, price, currency and stock over HTTP.

Prices never come from the client; they come from here. One :class:`CatalogClient` per service process:

* one shared ``aiohttp.ClientSession`` (opened with the service, closed with it) and a total timeout per call,
  so a slow catalog costs a request at most ``timeout`` seconds;
* a short TTL cache of answers (unknown products included), because a customer changing quantities asks for
  the same product again and again and a price a few seconds old is fine while shopping: checkout asks with
  ``fresh=True`` and the ``ProductPriceChanged`` event drops the cached entry of that product;
* single flight: concurrent lookups of the same ids share one request instead of stampeding the catalog;
* failures become problems: unreachable, timed out or 5xx -> :class:`CatalogUnavailable` (503 + Retry-After);
  any other unexpected answer -> 502. A request never fails with a 500 because the catalog misbehaved.

It reads ``GET /api/catalog/products/batch?ids=a,b,c`` -> ``{"items": [product, ...]}`` (unknown or deleted ids
are left out), at most :data:`BATCH_SIZE` ids per call (the catalog's limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from actors.cart.messages import ProductQuote
from runtime.errors import BadGateway, ServiceUnavailable
from runtime.host import request_id_var

log = logging.getLogger(__name__)

BATCH_PATH = "/api/catalog/products/batch"
BATCH_SIZE = 100  # the catalog answers at most this many ids per batch request
DEFAULT_TIMEOUT = 2.0  # seconds for a whole catalog call, connecting included
DEFAULT_TTL = 3.0  # seconds an answer is reused
MAX_CACHED = 10_000  # products cached at most (least recently stored go first)
RETRY_AFTER = 2.0


class CatalogUnavailable(ServiceUnavailable):
    slug = "catalog-unavailable"
    title = "The catalog is unavailable"


class CatalogClient:
    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT, ttl: float = DEFAULT_TTL) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.ttl = ttl
        self.requests = 0  # calls made to the catalog (tests and metrics read it)
        self._session: aiohttp.ClientSession | None = None
        self._cache: OrderedDict[str, tuple[float, ProductQuote | None]] = OrderedDict()
        self._flights: dict[tuple[str, ...], asyncio.Task[dict[str, ProductQuote | None]]] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

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
        chunks = [tuple(missing[i : i + BATCH_SIZE]) for i in range(0, len(missing), BATCH_SIZE)]
        for part in await asyncio.gather(*(self._shared_fetch(chunk) for chunk in chunks)):
            found.update(part)
        return found

    def forget(self, product_id: str) -> None:
        """Drop a cached answer (the product changed)."""
        self._cache.pop(product_id, None)

    # -- fetching ------------------------------------------------------------------------------

    async def _shared_fetch(self, ids: tuple[str, ...]) -> dict[str, ProductQuote | None]:
        task = self._flights.get(ids)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(ids))
            self._flights[ids] = task
            task.add_done_callback(lambda t: self._landed(ids, t))
        # shield: a requester that goes away (client disconnected) must not cancel the others' fetch.
        return await asyncio.shield(task)

    def _landed(self, ids: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        if self._flights.get(ids) is task:
            del self._flights[ids]
        if not task.cancelled():
            task.exception()  # retrieved here, so a fetch whose requesters all left logs no warning

    async def _fetch(self, ids: tuple[str, ...]) -> dict[str, ProductQuote | None]:
        if self._session is None:
            raise CatalogUnavailable("the cart service is not connected to the catalog (starting or stopping)")
        self.requests += 1
        url = self.base_url + BATCH_PATH
        request_id = request_id_var.get()  # "-" outside a request (an event's fan-out): let the catalog make one
        headers = {"X-Request-Id": request_id} if request_id != "-" else {}
        try:
            async with self._session.get(url, params={"ids": ",".join(ids)}, headers=headers) as resp:
                if resp.status >= 500:
                    raise CatalogUnavailable(f"the catalog answered {resp.status}; try again shortly", retry_after=RETRY_AFTER)
                if resp.status != 200:
                    log.warning("catalog batch lookup answered %s: %s", resp.status, (await resp.text())[:300])
                    raise BadGateway(f"the catalog refused the product lookup ({resp.status})")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("catalog unreachable at %s: %r", url, exc)
            raise CatalogUnavailable(
                "the catalog cannot be reached right now; nothing was changed, try again shortly", retry_after=RETRY_AFTER
            ) from None
        except ValueError:  # not JSON
            raise BadGateway("the catalog sent an answer the cart cannot read") from None
        answers: dict[str, ProductQuote | None] = dict.fromkeys(ids)
        for quote in _parse_items(body):
            if quote.product_id in answers:
                answers[quote.product_id] = quote
        self._remember(answers)
        return answers

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
