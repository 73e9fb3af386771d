"""Headline figures of a benchmark run, collected for ``make bench-all``'s markdown table.

A benchmark prints everything it measures; the few figures an issue sets a target for it also hands to
:func:`figure`. When ``ECOM_BENCH_RESULTS`` names a file (``bench.all`` sets it), each figure is appended there
as one JSON line, so a benchmark run on its own behaves exactly as before and writes nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import orjson

RESULTS_ENV = "ECOM_BENCH_RESULTS"


@dataclass(frozen=True, slots=True)
class Figure:
    bench: str  # the module: "checkout", "catalog", ...
    name: str  # what was measured, with its conditions: "SQLite, 32 buyers: paid orders/s"
    value: float
    unit: str = ""
    target: str = ""  # the target as text (">= 300"), or "" for a figure shown for context


def figure(bench: str, name: str, value: float, unit: str = "", target: str = "") -> None:
    """Record one headline figure (no-op unless ``ECOM_BENCH_RESULTS`` is set)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    line = orjson.dumps(asdict(Figure(bench, name, float(value), unit, target))) + b"\n"
    with open(path, "ab") as out:  # one write per line: figures of concurrent benches never interleave
        out.write(line)


def read(path: str) -> list[Figure]:
    try:
        with open(path, "rb") as source:
            return [Figure(**orjson.loads(line)) for line in source if line.strip()]
    except FileNotFoundError:
        return []


def reference_loop_ms(rounds: int = 3) -> float:
    """The best of ``rounds`` timings of a fixed pure-Python workload (dict, str and int work, ~50 ms on the
    development machine on a quiet day), in milliseconds.

    The machine these benchmarks run on is shared: the same code measured on two days differed by 2x (issue 14).
    Printed next to absolute figures, it tells a slower machine from a slower version; figures measured side by
    side in one run need no such correction."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        table: dict[int, str] = {}
        for i in range(200_000):
            table[i & 1023] = str(i)
            if len(table[i & 1023]) > 5:
                table.pop(i & 511, None)
        best = min(best, time.perf_counter() - started)
    return best * 1000
