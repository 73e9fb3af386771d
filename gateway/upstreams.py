"""Upstream instances of each service: choosing one, noticing when one is down, and keeping actors in place.

* :class:`Breaker` (per instance): closed -> open after ``threshold`` consecutive failed attempts (connection
  refused or reset, timeout) -> after ``cooldown`` one probe request is let through (half-open) -> closed on
  its success, open again on its failure. A passing active health check counts as a successful probe.
* Active health checks: ``GET /health/ready`` on every instance each ``interval``; an instance failing
  ``health_failures`` checks in a row is taken out, and put back by its first passing check. Checks never take
  out a service's last instances: when every instance fails its checks (an overloaded service answers them
  late), requests go to them anyway ("panic" routing, as Envoy does) and only the breakers keep them away —
  slow answers are better than certain 503s, and a really dead instance opens its breaker at once.
* :class:`Rendezvous`: a request that names an entity goes to the instance owning it, computed exactly as
  the instances compute it (:func:`runtime.cluster.rendezvous` over the live membership, which every
  instance reports in its readiness answer), so the entity's actor lives in one process. Only while that
  owner is out (unhealthy or breaker open) does the key fall to the next instance by score, which is the
  one the instances pick once the owner is declared dead; it comes back when the owner does. A member
  joining or leaving moves only the keys it gains or loses.
* Requests without a key go to the available instance with the fewest requests in flight (ties rotate).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import aiohttp

from config import ConfigError, Settings
from gateway.client import Pool
from gateway.options import GatewayOptions
from runtime.cluster import normalise, score

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
BREAKER_STATES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class Breaker:
    __slots__ = ("cooldown", "failures", "name", "opened", "opened_at", "probing", "state", "threshold")

    def __init__(self, name: str, threshold: int, cooldown: float) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = CLOSED
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.probing = False
        self.opened = 0  # times it opened (a metric)

    def eligible(self, now: float) -> bool:
        """May a request go to this instance? (No side effect: see :meth:`begin`.)"""
        if self.state == CLOSED:
            return True
        return not self.probing and now - self.opened_at >= self.cooldown

    def begin(self) -> None:
        """A request was sent to this instance; when the breaker is not closed it is the one probe."""
        if self.state != CLOSED:
            self.state = HALF_OPEN
            self.probing = True

    def success(self) -> None:
        if self.failures or self.state != CLOSED:
            if self.state != CLOSED:
                log.warning("upstream %s: circuit breaker closed (probe succeeded)", self.name)
            self.failures = 0
            self.state = CLOSED
            self.probing = False

    def abandon(self) -> None:
        """The attempt ended without a verdict on the instance (our own pool was full, the client left)."""
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            if self.state == CLOSED:
                log.warning("upstream %s: circuit breaker open after %d failures", self.name, self.failures)
            self.state = OPEN
            self.opened_at = now
            self.opened += 1
        self.probing = False


class Instance:
    """One upstream process of a service."""

    __slots__ = (
        "address",
        "breaker",
        "errors",
        "failed_checks",
        "healthy",
        "host",
        "host_line",
        "in_flight",
        "pool",
        "port",
        "requests",
        "service",
        "url",
    )  # fmt: skip

    def __init__(self, service: str, url: str, options: GatewayOptions) -> None:
        self.service = service
        self.url = url
        self.address = normalise(url)  # as the instance names itself in its cluster's membership
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.host_line = f"Host: {parts.netloc}\r\n".encode("ascii")  # precomputed for every request head
        self.pool = Pool(
            self.host,
            self.port,
            limit=options.pool_size,
            connect_timeout=options.connect_timeout,
            keepalive_timeout=options.keepalive_timeout,
            buffer_limit=options.buffer_limit,
            name=f"{service}@{parts.netloc}",
        )
        self.breaker = Breaker(self.pool.name, options.breaker_failures, options.breaker_cooldown)
        self.healthy = True  # until checks say otherwise: start serving at once
        self.failed_checks = 0  # consecutive
        self.in_flight = 0
        self.requests = 0  # attempts sent (a metric)
        self.errors: dict[str, int] = {}  # failed attempts by kind (a metric)

    def available(self, now: float, panic: bool = False) -> bool:
        """May it take a request? In ``panic`` (every instance failed its checks) only its breaker decides."""
        return (self.healthy or panic) and self.breaker.eligible(now)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<Instance {self.service} {self.url}>"


class Rendezvous:
    """Owners of keys among a service's instances: rendezvous hashing over the live membership."""

    _CACHE_SIZE = 65536

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.instances = tuple(instances)
        self._live = self.instances  # members of the cluster's view; every instance until a view arrives
        # key -> instances by falling score: hashing costs more than the rest of the lookup, and the same carts
        # and orders come back again and again. Bounded: cleared when full or when the view changes.
        self._orders: dict[str, tuple[Instance, ...]] = {}

    def set_members(self, addresses: Iterable[str]) -> bool:
        """Adopt the cluster's live membership (as reported by an instance); True if the view changed."""
        wanted = {normalise(a) for a in addresses}
        live = tuple(i for i in self.instances if i.address in wanted) or self.instances
        if live == self._live:
            return False
        self._live = live
        self._orders.clear()
        return True

    def _order(self, key: str) -> tuple[Instance, ...]:
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) >= self._CACHE_SIZE:
                self._orders.clear()
            ranked = sorted(self._live, key=lambda i: score(i.address, key), reverse=True)
            rest = [i for i in self.instances if i not in self._live]  # outside the view: last resort only
            order = self._orders[key] = (*ranked, *rest)
        return order

    def owner(self, key: str) -> Instance:
        """The instance that owns ``key`` in the current view."""
        return self._order(key)[0]

    def lookup(self, key: str, now: float, panic: bool = False) -> Instance | None:
        """The owner of ``key``, or while it is out the available instance that would own it next."""
        for inst in self._order(key):
            if inst.available(now, panic):
                return inst
        return None


class Service:
    """The instances of one service, with the ring for keyed requests and balancing for the rest."""

    def __init__(self, name: str, urls: Sequence[str], options: GatewayOptions) -> None:
        if not urls:
            raise ValueError(f"service {name} has no upstream instances")
        self.name = name
        self.instances = tuple(Instance(name, url, options) for url in urls)
        self.placement = Rendezvous(self.instances)
        self._next = 0
        self.retries = 0  # a metric
        self.panics = 0  # requests sent while every instance failed its health checks (a metric)

    def pick(self, key: str | None, now: float, avoid: Instance | None = None) -> Instance | None:
        """The instance for a request: the key's owner, or the least busy available one (not ``avoid`` if
        another is available). None when every breaker is open."""
        inst = self._pick(key, now, avoid, False)
        if inst is None and not any(i.healthy for i in self.instances):
            inst = self._pick(key, now, avoid, True)
            if inst is not None:
                self.panics += 1
        return inst

    def _pick(self, key: str | None, now: float, avoid: Instance | None, panic: bool) -> Instance | None:
        instances = self.instances
        if len(instances) == 1:
            inst = instances[0]
            return inst if inst.available(now, panic) else None
        if key is not None:
            return self.placement.lookup(key, now, panic)
        n = len(instances)
        start = self._next = (self._next + 1) % n
        best: Instance | None = None
        for step in range(n):
            inst = instances[(start + step) % n]
            if inst is avoid or not inst.available(now, panic):
                continue
            if best is None or inst.in_flight < best.in_flight:
                best = inst
        if best is None and avoid is not None and avoid.available(now, panic):
            return avoid
        return best

    def any_available(self, now: float) -> bool:
        return any(inst.available(now) for inst in self.instances)


def parse_upstreams(name: str, raw: str | Iterable[str]) -> list[str]:
    """``"http://127.0.0.1:8002, http://127.0.0.1:8012"`` -> base URLs; ConfigError names the setting."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    urls: list[str] = []
    for item in (i.strip().rstrip("/") for i in items):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme != "http" or not parts.hostname or parts.path or parts.query or parts.username:
            raise ConfigError(
                f"ECOM_{name.upper()}_UPSTREAMS: expected comma-separated http://host:port base URLs, got {item!r}"
            )
        if item not in urls:
            urls.append(item)
    return urls


class Upstreams:
    """Every routed service's instances, and the health checks that watch them."""

    def __init__(self, services: Mapping[str, Sequence[str]], options: GatewayOptions) -> None:
        self.options = options
        self.services = {name: Service(name, urls, options) for name, urls in services.items()}
        self.session: aiohttp.ClientSession | None = None  # control-plane HTTP: health checks, docs
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        names: Iterable[str],
        options: GatewayOptions,
        overrides: Mapping[str, str | Sequence[str]] | None = None,
    ) -> Upstreams:
        """Instances per service: ``overrides``, else ``ECOM_<SERVICE>_UPSTREAMS``, else the service's own port."""
        services: dict[str, list[str]] = {}
        for name in names:
            raw = (overrides or {}).get(name)
            if raw is None:
                raw = settings.services[name].upstreams if name in settings.services else ""
            services[name] = parse_upstreams(name, raw) or [settings.base_url(name)]
        return cls(services, options)

    def instances(self) -> Iterable[Instance]:
        for service in self.services.values():
            yield from service.instances

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        await self.check_all()  # know the state before the first request
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="gateway-health-checks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for inst in self.instances():
            await inst.pool.close()
        if self.session is not None:
            await self.session.close()

    async def ready(self) -> None:
        """Readiness: raise unless some service has an instance to serve (one service down is not the gateway
        down: browsing works while orders are out)."""
        now = asyncio.get_running_loop().time()
        if not any(service.any_available(now) for service in self.services.values()):
            raise RuntimeError("no upstream instance is available")

    # -- health checks ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval)
            try:
                await self.check_all()
            except Exception:  # never let the watcher die
                log.exception("health checks failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(inst) for inst in self.instances()))

    def _note_membership(self, inst: Instance, body: object) -> None:
        cluster = body.get("cluster") if isinstance(body, dict) else None
        members = cluster.get("members") if isinstance(cluster, dict) else None
        if (
            isinstance(members, list)
            and all(isinstance(m, str) for m in members)
            and self.services[inst.service].placement.set_members(members)
        ):
            log.info("upstream %s: cluster view %s", inst.service, ", ".join(members))

    async def check(self, inst: Instance) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(
                f"{inst.url}/health/ready", timeout=aiohttp.ClientTimeout(total=self.options.health_timeout)
            ) as resp:
                ok = resp.status == 200
                reason = f"answered {resp.status}"
                if ok:
                    self._note_membership(inst, await resp.json(content_type=None))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a body not JSON
            ok, reason = False, type(exc).__name__
        inst.failed_checks = 0 if ok else inst.failed_checks + 1
        if ok and not inst.healthy:
            log.warning("upstream %s: healthy again, back in", inst.pool.name)
            inst.healthy = True
        elif inst.healthy and inst.failed_checks >= self.options.health_failures:
            # one slow answer from a busy instance is not an outage; the breaker reacts to real failures at once
            log.warning(
                "upstream %s: %d health checks failed (%s), taken out", inst.pool.name, inst.failed_checks, reason
            )
            inst.healthy = False
        if ok and inst.breaker.state != CLOSED:
            now = asyncio.get_running_loop().time()
            if now - inst.breaker.opened_at >= inst.breaker.cooldown:
                inst.breaker.success()  # the check was the probe
        return ok
