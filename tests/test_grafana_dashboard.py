"""The Grafana dashboard (deploy/grafana/ecomgateway.json) asks only for what the services export.

Starts the embedded shop (``ecom run``: every service in one process, real HTTP, SQLite, memory bus), sends a few
requests through the gateway so the per-route series exist, and reads every service's ``/metrics`` (the gateway's
with an admin token, as Prometheus scrapes it). Every PromQL expression of the dashboard is parsed (promql-parser,
the Prometheus grammar) and each metric it selects must be one the services exported, each label it matches or
groups by must be one that metric carries, and each label value it names (``event="handled"``) must be one seen.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import PORT_OFFSET, admin_token, bearer, embedded_shop

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "ecomgateway.json"

# Grafana's variables, replaced by values of the same kind before parsing (they are not PromQL).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$service": ".*"}

# What issue 15 asks the dashboard to show, as the series that show it.
REQUIRED = {
    "requests": "http_requests_total",
    "latency": "http_request_duration_seconds_bucket",
    "live actors": "actor_activations",
    "mailbox depth": "actor_mailbox_depth",
    "outbox backlog": "outbox_backlog",
    "dead letters": "bus_dead_letters",
    "dead letters (rate)": "bus_dead_lettered_total",
}


# The sample names a family of each type has (the text format's names: counters end in _total).
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "unknown": ("",)}


@dataclass
class Exported:
    """Sample names with the label names each carries, and the label values seen per (sample, label).

    A family declared with no sample yet (``gateway_upstream_errors`` before any upstream error) counts as
    exported; its labels are unknown (None), so only its name is checked."""

    labels: dict[str, set[str] | None] = field(default_factory=dict)
    values: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            if not family.samples:
                for suffix in SAMPLE_SUFFIXES[family.type]:
                    self.labels.setdefault(family.name + suffix, None)
            for sample in family.samples:
                known = self.labels.get(sample.name)
                self.labels[sample.name] = (known or set()) | set(sample.labels)
                for label, value in sample.labels.items():
                    self.values[(sample.name, label)].add(value)


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            visit(panel.get("panels", []))

    visit(dashboard["panels"])
    return found


def _concrete(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    leftover = re.search(r"\$\{?\w+", expr)
    assert leftover is None, f"unknown Grafana variable {leftover.group()} in {expr}"
    return expr


def _words(pattern: str) -> list[str] | None:
    """The alternatives of a regex that is only a list of words (``handled|failed``); None for a real pattern."""
    parts = pattern.split("|")
    return parts if all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts) else None


def _selectors(tree: Any) -> list[Any]:
    nodes: list[Any] = []

    def collect(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            nodes.append(node)

    promql_parser.walk(tree, collect)
    return nodes


def problems(expr: str, exported: Exported) -> list[str]:
    """What in ``expr`` the services do not export (empty when everything is there)."""
    found: list[str] = []

    def check(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                found.append(f"selector without a metric name: {node}")
                return
            if name not in exported.labels:
                found.append(f"metric {name} is not exported")
                return
            labels = exported.labels[name]
            if labels is None:  # declared, no sample yet: its labels cannot be seen
                return
            for matcher in node.matchers.matchers:
                if matcher.name not in labels:
                    found.append(f"{name} has no label {matcher.name}")
                    continue
                wanted = (
                    [matcher.value]
                    if matcher.op == promql_parser.MatchOp.Equal
                    else _words(matcher.value)
                    if matcher.op == promql_parser.MatchOp.Re
                    else None
                )
                for value in wanted or []:
                    if value not in exported.values[(name, matcher.name)]:
                        found.append(f'{name} never has {matcher.name}="{value}"')
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            names = [selector.name for selector in _selectors(node.expr) if selector.name]
            if any(exported.labels.get(n, set()) is None for n in names):
                return
            for label in node.modifier.labels:
                if not any(label in (exported.labels.get(n) or ()) for n in names):
                    found.append(f"aggregation by {label}: none of {sorted(set(names))} has that label")

    promql_parser.walk(promql_parser.parse(_concrete(expr)), check)
    return found


@pytest.fixture
async def exported(tmp_path) -> AsyncIterator[Exported]:
    """The metrics of every service of a running embedded shop, after a little traffic."""
    async with embedded_shop(tmp_path) as shop:
        base, gateway = shop.base, shop.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            token = await admin_token(http, gateway)
            for path in ("/api/catalog/products", "/api/catalog/brands", "/api/cart", "/api/orders"):
                async with http.get(gateway + path, headers=bearer(token)) as resp:
                    assert resp.status < 500, f"GET {path}: {resp.status} {await resp.text()}"
            metrics = Exported()
            for service, offset in PORT_OFFSET.items():
                headers = bearer(token) if service == "gateway" else {}
                async with http.get(f"http://127.0.0.1:{base + offset}/metrics", headers=headers) as resp:
                    assert resp.status == 200, f"{service} /metrics: {resp.status}"
                    metrics.add(await resp.text())
        yield metrics


def test_dashboard_is_grafana_json_with_unique_panel_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    ids: list[int] = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            visit(panel.get("panels", []))

    visit(dashboard["panels"])
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    # Panels tile the 24-column grid without covering each other.
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["w"] <= 24, title
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{title} and {other} overlap"
    assert dashboard["uid"] and dashboard["title"]
    assert all(expr.strip() for _, expr in expressions(dashboard))
    # Every query goes to the data source the user picks on import (a variable), never to a fixed uid.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


async def test_every_query_uses_only_exported_metrics_and_labels(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    found = {
        f"{title}: {expr}: {problem}" for title, expr in expressions(dashboard) for problem in problems(expr, exported)
    }
    assert not found, "\n".join(sorted(found))
    used = {
        node.name for _, expr in expressions(dashboard) for node in _selectors(promql_parser.parse(_concrete(expr)))
    }
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing, f"the dashboard shows nothing for {missing}"
    # Dead letters are real samples of every consuming service (0 in a healthy shop), not only declared families,
    # so the labels the panels group by are checked too (tests/test_deadletter_metrics.py shows them at 1).
    for name in ("bus_dead_letters", "bus_dead_lettered_total"):
        assert exported.labels[name] == {"service", "queue", "kind"}, name
        assert exported.values[(name, "service")] == exported.values[(name, "queue")] == {"catalog", "cart", "order"}


async def test_the_check_refuses_what_is_not_exported(exported):
    """The check above can fail: a misspelt metric, a label the metric lacks, a value never seen, a bad group."""
    assert problems("sum(rate(http_request_total[5m]))", exported) == ["metric http_request_total is not exported"]
    assert problems('actor_activations{kind="x"}', exported) == ["actor_activations has no label kind"]
    assert problems('actor_events{event=~"handled|exploded"}', exported) == ['actor_events never has event="exploded"']
    assert problems("sum by (servce) (actor_mailbox_depth)", exported) == [
        "aggregation by servce: none of ['actor_mailbox_depth'] has that label"
    ]
    assert problems('max by (service) (outbox_backlog{service=~"$service"})', exported) == []
    assert problems('bus_dead_letters{queue="orders"}', exported) == ['bus_dead_letters never has queue="orders"']
