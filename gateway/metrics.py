"""Gateway metrics, exported with the host's at ``/metrics``.

The hot path only bumps plain integers on the instance, service and limiter objects; this collector turns them
into Prometheus families when ``/metrics`` is scraped, so no metric costs a label lookup or a lock per request.
Request counts and the latency histogram per route prefix come from the host's middleware
(``http_requests_total``, ``http_request_duration_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.ratelimit import Limiter
from gateway.upstreams import Upstreams


class GatewayCollector:
    def __init__(self, upstreams: Upstreams, limiter: Limiter | None) -> None:
        self.upstreams = upstreams
        self.limiter = limiter

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily(
            "gateway_upstream_up", "1 while the instance passes its health checks", labels=["service", "instance"]
        )
        breaker = GaugeMetricFamily(
            "gateway_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            labels=["service", "instance"],
        )
        opened = CounterMetricFamily(
            "gateway_breaker_opened", "Times the breaker opened", labels=["service", "instance"]
        )
        in_flight = GaugeMetricFamily(
            "gateway_upstream_in_flight", "Requests in flight", labels=["service", "instance"]
        )
        pool = GaugeMetricFamily(
            "gateway_upstream_connections", "Open pooled connections", labels=["service", "instance"]
        )
        attempts = CounterMetricFamily(
            "gateway_upstream_attempts", "Attempts sent upstream", labels=["service", "instance"]
        )
        errors = CounterMetricFamily(
            "gateway_upstream_errors",
            "Failed attempts by kind (connect, reset, timeout, protocol, busy)",
            labels=["service", "instance", "kind"],
        )
        retries = CounterMetricFamily(
            "gateway_upstream_retries", "Attempts repeated after a failure", labels=["service"]
        )
        panics = CounterMetricFamily(
            "gateway_upstream_panic",
            "Requests routed while every instance failed its health checks",
            labels=["service"],
        )
        for service in self.upstreams.services.values():
            retries.add_metric([service.name], service.retries)
            panics.add_metric([service.name], service.panics)
            for inst in service.instances:
                labels = [service.name, inst.url]
                up.add_metric(labels, 1 if inst.healthy else 0)
                breaker.add_metric(labels, inst.breaker.state)
                opened.add_metric(labels, inst.breaker.opened)
                in_flight.add_metric(labels, inst.in_flight)
                pool.add_metric(labels, inst.pool.open_connections)
                attempts.add_metric(labels, inst.requests)
                for kind, count in sorted(inst.errors.items()):
                    errors.add_metric([*labels, kind], count)
        yield from (up, breaker, opened, in_flight, pool, attempts, errors, retries, panics)
        if self.limiter is not None:
            limited = CounterMetricFamily("gateway_rate_limited", "Requests refused with 429")
            limited.add_metric([], self.limiter.limited)
            backend = CounterMetricFamily(
                "gateway_ratelimit_backend_errors",
                "Requests judged by the per-process bucket because the shared store (Redis) failed",
            )
            backend.add_metric([], self.limiter.backend_errors)
            yield limited
            yield backend
