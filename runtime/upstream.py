"""Client-side balancing over every instance of another service (the cart calling the catalog and the order, the
order asking the cart about checkouts).

The gateway balances the requests that come from outside; a service calling another directly has to do the same,
or one dead instance fails every call that picks it (issue 11: the cart used only the first catalog URL, and
killing that instance gave a burst of 503s while the second one was healthy). :class:`Upstream` is the small
version of the gateway's pool for idempotent calls:

* choice: the available instance with the fewest calls in flight, ties rotated (round-robin when idle), so load
  spreads and a slow instance gets fewer calls;
* an instance that fails to connect, times out or answers 5xx is marked down for a cool-down that grows
  exponentially with its consecutive failures (``cooldown * 2**(n-1)``, capped at ``max_cooldown``) with jitter
  (a random 50..100 % of it), so callers in many processes do not all come back to it at the same moment. After
  the cool-down the next call tries it again; a success clears its record;
* the failed call is retried on another instance straight away (after a back-off of a few milliseconds with full
  jitter): the instance, not the call, is what is backed off. A call never goes to the same instance twice, and
  makes at most ``max_attempts`` attempts;
* when no instance is available :class:`NoInstance` says how long until the first one's cool-down ends, for the
  caller's ``Retry-After``.

Only for idempotent requests (GETs): a retried call may have reached the failed instance.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_COOLDOWN = 0.5  # seconds an instance is left alone after its first failure
DEFAULT_MAX_COOLDOWN = 15.0  # cap of the doubling cool-down
DEFAULT_MAX_ATTEMPTS = 3  # instances one call tries at most
DEFAULT_RETRY_BACKOFF = 0.005  # base of the (tiny) jittered pause before trying the next instance, seconds


def service_urls(settings: Settings, service: str) -> list[str]:
    """The base URLs of every instance of ``service``: ``ECOM_<SERVICE>_UPSTREAMS`` (comma-separated, as
    ``ecom run --processes`` passes to every process), else the service's own host and port."""
    return parse_urls(settings.service(service).upstreams) or [settings.base_url(service)]


def parse_urls(urls: str | Iterable[str]) -> list[str]:
    """Comma-separated text or a list of URLs -> the distinct URLs without trailing slashes, in order."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    return list(dict.fromkeys(u.strip().rstrip("/") for u in items if u and u.strip()))


class InstanceFailed(Exception):
    """Raised by an attempt when the instance itself failed (no connection, timed out, 5xx): the instance is
    cooled down and the call moves on to another one. Any other exception ends the call without a verdict."""


class NoInstance(Exception):
    """No instance could answer: all are cooling down, or every attempt failed."""

    def __init__(self, service: str, retry_after: float, last: BaseException | None) -> None:
        super().__init__(f"no instance of {service} is available" + (f" (last error: {last!r})" if last else ""))
        self.retry_after = retry_after
        self.last = last


@dataclass(eq=False)
class Instance:
    url: str
    outstanding: int = 0  # calls in flight
    failures: int = 0  # consecutive failed attempts
    down_until: float = 0.0  # monotonic time its cool-down ends
    marked_at: float = float("-inf")  # monotonic time it was last marked down
    calls: int = 0  # attempts sent (metrics and tests)

    def available(self, now: float) -> bool:
        return now >= self.down_until


class Upstream:
    def __init__(
        self,
        service: str,
        urls: str | Sequence[str],
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        max_cooldown: float = DEFAULT_MAX_COOLDOWN,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        parsed = parse_urls(urls)
        if not parsed:
            raise ValueError(f"{service}: at least one instance URL is needed")
        if cooldown <= 0 or max_cooldown < cooldown or max_attempts < 1 or retry_backoff < 0:
            raise ValueError(
                "cooldown > 0, max_cooldown >= cooldown, max_attempts >= 1 and retry_backoff >= 0 are needed"
            )
        self.service = service
        self.instances = [Instance(url) for url in parsed]
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self._rotation = 0

    @property
    def urls(self) -> list[str]:
        return [i.url for i in self.instances]

    # -- choosing and judging instances -------------------------------------------------------------

    def available(self) -> list[Instance]:
        now = self._clock()
        return [i for i in self.instances if i.available(now)]

    def pick(self, exclude: Iterable[Instance] = ()) -> Instance | None:
        """The available instance with the fewest calls in flight (ties rotate), or None."""
        skip = set(map(id, exclude))
        candidates = [i for i in self.available() if id(i) not in skip]
        if not candidates:
            return None
        least = min(i.outstanding for i in candidates)
        best = [i for i in candidates if i.outstanding == least]
        self._rotation += 1
        return best[self._rotation % len(best)]

    def succeeded(self, instance: Instance) -> None:
        if instance.failures:
            log.info("%s instance %s answers again", self.service, instance.url)
        instance.failures = 0
        instance.down_until = 0.0

    def failed(self, instance: Instance, reason: BaseException | str, *, started: float | None = None) -> float:
        """Cool ``instance`` down; returns the cool-down in seconds. ``started``: when the failed attempt began;
        an attempt that was already in flight when a concurrent one marked the instance down is the same outage
        and does not lengthen the cool-down again (else 20 calls in flight to a killed instance would jump its
        cool-down straight to the cap, and keep it away long after a restart)."""
        if started is not None and instance.marked_at >= started:
            return max(0.0, instance.down_until - self._clock())
        instance.failures += 1
        ceiling = min(self.max_cooldown, self.cooldown * 2 ** min(instance.failures - 1, 30))
        pause = ceiling * self._rng.uniform(0.5, 1.0)
        now = self._clock()
        instance.down_until = max(instance.down_until, now + pause)
        instance.marked_at = now
        log.warning(
            "%s instance %s failed (%s, %d in a row): left alone for %.2fs",
            self.service,
            instance.url,
            reason,
            instance.failures,
            pause,
        )
        return pause

    def retry_after(self) -> float:
        """Seconds until some instance is available again (0 when one is now)."""
        now = self._clock()
        return max(0.0, min(i.down_until for i in self.instances) - now)

    # -- calling -----------------------------------------------------------------------------------

    async def call(self, attempt: Callable[[Instance], Awaitable[T]]) -> T:
        """Run ``attempt(instance)`` on instances until one succeeds. ``attempt`` raises :class:`InstanceFailed`
        when the instance failed; the call then moves to another instance. Raises :class:`NoInstance`."""
        tried: list[Instance] = []
        last: BaseException | None = None
        for number in range(self.max_attempts):
            instance = self.pick(exclude=tried)
            if instance is None:
                break
            if number:
                # Full jitter on a tiny, doubling base: callers that all lost the same instance at once do not
                # arrive at the next one in lock-step; small enough that the failover is still "at once".
                await asyncio.sleep(self._rng.uniform(0, self.retry_backoff * 2 ** (number - 1)))
            tried.append(instance)
            instance.outstanding += 1
            instance.calls += 1
            started = self._clock()
            try:
                result = await attempt(instance)
            except InstanceFailed as exc:
                self.failed(instance, exc.__cause__ or exc, started=started)
                last = exc
                continue
            finally:
                instance.outstanding -= 1
            self.succeeded(instance)
            return result
        raise NoInstance(self.service, self.retry_after(), last)
