"""Per-client rate limits: token buckets (``rate`` tokens per second, at most ``burst``), one request one token.

:class:`LocalLimiter` keeps the buckets in this process. :class:`RedisLimiter` keeps them in Redis, updated by
one Lua script per request (read, refill, take, write and expire in one atomic step, timed by the Redis server's
clock so gateways on different hosts agree), so several gateway processes enforce one limit per client.

When Redis cannot be reached the limiter *fails open to the per-process limit*: requests are judged by a local
bucket (the same rate, per process) and ``gateway_ratelimit_backend_errors_total`` counts every fallback, with a
warning logged at most every 30 s. Refusing every request because the limiter's store is down would turn a Redis
outage into a full outage; letting everything through would leave no protection at all; a per-process limit
keeps the service up and still stops a single client from flooding it. Redis is retried after ``retry_after``
seconds, so an outage costs one failed attempt per interval, not one per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_SWEEP_EVERY = 10_000  # bucket creations between sweeps of full (idle) buckets


class LocalLimiter:
    """Token buckets in a dict: ``key -> [tokens, last refill time]``."""

    local = True  # ``take`` answers synchronously: the proxy skips an await on its hot path

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}
        self._created = 0
        self.limited = 0  # requests refused (a metric)
        self.backend_errors = 0  # kept for a uniform metrics interface

    def take(self, key: str) -> float:
        """0.0 when the request may pass, else the seconds until a token is back."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._created += 1
            if self._created % _SWEEP_EVERY == 0 or len(self._buckets) >= self.max_keys:
                self._sweep(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return 0.0
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        tokens = min(tokens, self.burst)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        self.limited += 1
        return (1.0 - tokens) / self.rate

    async def acquire(self, key: str) -> float:
        return self.take(key)

    def peek(self, key: str) -> float:
        """What :meth:`take` would answer, without taking a token."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(bucket[0] + (self._clock() - bucket[1]) * self.rate, self.burst)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing); if still too many, the oldest."""
        full_after = self.burst / self.rate
        buckets = self._buckets
        for key in [k for k, (_, last) in buckets.items() if now - last >= full_after]:
            del buckets[key]
        if len(buckets) >= self.max_keys:
            for key in sorted(buckets, key=lambda k: buckets[k][1])[: len(buckets) - self.max_keys // 2]:
                del buckets[key]

    async def close(self) -> None:
        pass


# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst. Returns the wait in seconds as a string ("0" = allowed):
# Lua numbers would be truncated to integers on the way back.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisLimiter:
    """Token buckets shared through Redis; falls back to a :class:`LocalLimiter` while Redis is unreachable."""

    local = False

    def __init__(
        self,
        url: str,
        rate: float,
        burst: int,
        *,
        prefix: str = "ecom:ratelimit:",
        timeout: float = 0.25,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.rate = float(rate)
        self.burst = int(burst)
        self.prefix = prefix
        self.retry_after = retry_after
        self._clock = clock
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._script = self._redis.register_script(TOKEN_BUCKET_LUA)
        self._fallback = LocalLimiter(rate, burst, clock=clock)
        self._down_until = 0.0
        self._last_warning = float("-inf")
        self.limited = 0
        self.backend_errors = 0  # requests judged locally because Redis failed (the fail-open warning metric)

    async def acquire(self, key: str) -> float:
        from redis.exceptions import RedisError

        if self._down_until and self._clock() < self._down_until:
            return self._local(key)
        try:
            raw = await self._script(keys=[self.prefix + key], args=[self.rate, self.burst])
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + self.retry_after
            self._warn(exc)
            return self._local(key)
        self._down_until = 0.0
        wait = float(raw)
        if wait > 0:
            self.limited += 1
        return wait

    def _local(self, key: str) -> float:
        self.backend_errors += 1
        wait = self._fallback.take(key)
        if wait > 0:
            self.limited += 1
        return wait

    def _warn(self, exc: BaseException) -> None:
        now = self._clock()
        if now - self._last_warning >= 30.0:
            self._last_warning = now
            log.warning(
                "rate limits: Redis at %s is unreachable (%s); limiting per process until it is back",
                self.url,
                type(exc).__name__,
            )

    async def close(self) -> None:
        await self._redis.aclose()


Limiter = LocalLimiter | RedisLimiter


class AuthLimits:
    """Tighter buckets per client address for the endpoints that guess at credentials or create accounts:

    * ``signin``: failed sign-ins (``POST /connect/token`` answered 400 or 401). Only failures take a token;
      while the bucket is empty every sign-in from the address is refused (429) before it reaches identity.
    * ``register``: registrations (``POST /api/identity/users``), every attempt.

    Both are a fiftieth of the general rate (default 1/s) with a burst of a tenth (sign-in failures, at least 5)
    or a fifth (registrations, at least 10) of the general burst. They are kept in this process (not in Redis):
    several gateway processes each allow this much; identity's own lock-out still applies per account.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        slow = max(rate / 50.0, 0.01)
        self.signin = LocalLimiter(slow, max(5, burst // 10), clock=clock)
        self.register = LocalLimiter(slow, max(10, burst // 5), clock=clock)

    @property
    def limited(self) -> int:
        return self.signin.limited + self.register.limited


def make_limiter(rate: float, burst: int, redis_url: str = "") -> Limiter | None:
    """The limiter for the options: None when limits are off (``rate`` 0)."""
    if rate <= 0:
        return None
    if redis_url:
        return RedisLimiter(redis_url, rate, burst)
    return LocalLimiter(rate, burst)
