"""Prometheus metrics: request counts and latency per route, actor and runtime gauges, the outbox, ``/metrics``."""

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

if TYPE_CHECKING:
    from runtime.web.resources import ServiceRuntime

__all__ = ["METRICS_KEY", "Metrics", "metrics_handler", "metrics_registry"]

log = logging.getLogger(__name__)

BACKLOG_TIMEOUT = 1.0  # seconds the outbox count may take at a scrape; past it the gauge is left out


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
        """Before a scrape: count the outbox rows not yet on the bus (a database query, so it cannot run inside
        the collector, which Prometheus' client calls synchronously). The gauge is left out of this scrape
        when the database does not answer in time: a missing series, not a stale or made-up number."""
        relay = self.runtime.relay
        self.collector.outbox_backlog = None
        if relay is None:
            return
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT):
                self.collector.outbox_backlog = await relay.pending()
        except (TimeoutError, OSError, SQLAlchemyError) as exc:
            log.warning("metrics: outbox backlog of %s not counted: %r", self.service, exc)


class RuntimeCollector:
    """Actor and outbox gauges, read when /metrics is scraped."""

    def __init__(self, service: str, runtime: ServiceRuntime) -> None:
        self.service = service
        self.runtime = runtime
        self.outbox_backlog: int | None = None  # set by Metrics.refresh before each scrape

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


METRICS_KEY: web.AppKey[Metrics] = web.AppKey("ecom_metrics")


def metrics_registry(app: web.Application) -> CollectorRegistry:
    """The app's Prometheus registry, for services that add collectors of their own."""
    return app[METRICS_KEY].registry


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    await metrics.refresh()
    return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
