"""Prometheus metrics: request counts and latency per route, actor and runtime gauges, the outbox, dead letters,
``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from bus.base import BusError
from runtime.errors import ServiceUnavailable

if TYPE_CHECKING:
    from runtime.web.resources import ServiceRuntime

__all__ = ["METRICS_KEY", "Metrics", "metrics_handler", "metrics_registry"]

log = logging.getLogger(__name__)

BACKLOG_TIMEOUT = 1.0  # seconds the outbox count may take at a scrape; past it the gauge is left out
DEAD_LETTERS_TIMEOUT = 1.0  # the same for the dead-letter count (asked of the broker)


class Metrics:
    def __init__(self, service: str, runtime: ServiceRuntime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests", "HTTP requests handled", ["service", "method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["service", "route"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.service = service
        self.runtime = runtime
        self.collector = RuntimeCollector(service, runtime)
        self.registry.register(self.collector)
        # labels() costs a lock and a tuple per call: resolve each label set once.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[(method, route, status)] = self.requests.labels(
                self.service, method, route, str(status)
            )
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = self.latency.labels(self.service, route)
        counter.inc()
        timer.observe(seconds)

    def middleware(self) -> Any:
        @web.middleware
        async def metrics_middleware(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.observe(request.method, route, status, time.perf_counter() - start)

        return metrics_middleware

    async def refresh(self) -> None:
        """Before a scrape: count the outbox rows not yet on the bus and the dead letters of the queues and
        subscriptions the service consumes (a database query and broker calls, so they cannot run inside the
        collector, which Prometheus' client calls synchronously). A gauge is left out of this scrape when
        its source does not answer in time: a missing series, not a stale or made-up number."""
        await asyncio.gather(self._refresh_backlog(), self._refresh_dead_letters())

    async def _refresh_backlog(self) -> None:
        relay = self.runtime.relay
        self.collector.outbox_backlog = None
        if relay is None:
            return
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT):
                self.collector.outbox_backlog = await relay.pending()
        except (TimeoutError, OSError, SQLAlchemyError) as exc:
            log.warning("metrics: outbox backlog of %s not counted: %r", self.service, exc)

    async def _refresh_dead_letters(self) -> None:
        from runtime.deadletters import DeadLetterAdmin

        runtime = self.runtime
        self.collector.dead_letters = None
        if runtime.bus is None or runtime.engine is None:
            return
        try:
            async with asyncio.timeout(DEAD_LETTERS_TIMEOUT):
                # The admin API's count (GET /admin/dead-letters), so the two always agree.
                summary = await DeadLetterAdmin(self.service, runtime.engine, runtime.bus).summary()
        except (TimeoutError, OSError, BusError, ServiceUnavailable) as exc:
            log.warning("metrics: dead letters of %s not counted: %r", self.service, exc)
            return
        self.collector.dead_letters = [(q["queue"], q["kind"], q["count"]) for q in summary]


class RuntimeCollector:
    """Actor and outbox gauges, read when /metrics is scraped."""

    def __init__(self, service: str, runtime: ServiceRuntime) -> None:
        self.service = service
        self.runtime = runtime
        self.outbox_backlog: int | None = None  # set by Metrics.refresh before each scrape
        self.dead_letters: list[tuple[str, str, int]] | None = None  # (queue, kind, count), likewise

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        relay = self.runtime.relay
        if relay is not None:
            relayed = CounterMetricFamily(
                "outbox_relayed", "Outbox messages this process handed to the bus", labels=["service"]
            )
            relayed.add_metric([self.service], relay.relayed)
            yield relayed
            if self.outbox_backlog is not None:
                # The outbox table is the service's, shared by its instances: each reports the same backlog.
                backlog = GaugeMetricFamily(
                    "outbox_backlog", "Outbox messages committed and not yet handed to the bus", labels=["service"]
                )
                backlog.add_metric([self.service], self.outbox_backlog)
                yield backlog
        yield from self._dead_letter_metrics()
        system = self.runtime.system
        if system is None:
            return
        live = GaugeMetricFamily("actor_activations", "Live actor activations", labels=["service", "type"])
        depth = GaugeMetricFamily("actor_mailbox_depth", "Messages waiting in mailboxes", labels=["service", "type"])
        for type_name, info in system.introspect(limit=0).items():
            live.add_metric([self.service, type_name], info["live"])
            depth.add_metric([self.service, type_name], info["mailbox_depth"])
        yield live
        yield depth
        counters = GaugeMetricFamily("actor_events", "Actor runtime counters since start", labels=["service", "event"])
        for event, value in system.stats.items():
            counters.add_metric([self.service, event], value)
        yield counters

    def _dead_letter_metrics(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """Per queue/subscription the service consumes (runtime.deadletters.service_sources): the bus's
        count of messages it dead-lettered (a process counter; broker-side dead-lettering, a consumer dying
        before settling, is not in it), and the dead letters held now (the service's, shared by its
        instances: each reports the same number)."""
        from runtime.deadletters import service_sources

        counted = getattr(self.runtime.bus, "dead_lettered", None)  # every backend has it (bus/deadletters.py)
        if counted is not None:
            total = CounterMetricFamily(
                "bus_dead_lettered",
                "Messages this process's bus dead-lettered after max_attempts failed deliveries (or malformed)",
                labels=["service", "queue", "kind"],
            )
            for name, kind in service_sources(self.service):
                total.add_metric([self.service, name, kind], counted.get((name, kind), 0))
            yield total
        if self.dead_letters is not None:
            held = GaugeMetricFamily(
                "bus_dead_letters",
                "Dead letters held for the queue or subscription",
                labels=["service", "queue", "kind"],
            )
            for name, kind, count in self.dead_letters:
                held.add_metric([self.service, name, kind], count)
            yield held


METRICS_KEY: web.AppKey[Metrics] = web.AppKey("ecom_metrics")


def metrics_registry(app: web.Application) -> CollectorRegistry:
    """The app's Prometheus registry, for services that add collectors of their own."""
    return app[METRICS_KEY].registry


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    await metrics.refresh()
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
