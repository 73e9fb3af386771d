"""Headline figures of a benchmark run, collected for ``make bench-all``'s markdown table.

A benchmark prints everything it measures; the few figures an issue sets a target for it also hands to
:func:`figure`. When ``ECOM_BENCH_RESULTS`` names a file (``bench.all`` sets it), each figure is appended there
as one JSON line, so a benchmark run on its own behaves exactly as before and writes nothing.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
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
    """The best of ``rounds`` timings of a fixed pure-Python workload (dict, str and int work), in milliseconds:
    about 50 ms on the development machine with Debian's CPython, 80-90 ms with pyenv's build of the same version.

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


_DESCRIBE = (
    "import platform, os, sys; "
    "print(platform.python_implementation(), platform.python_version(), os.path.realpath(sys._base_executable))"
)


def interpreter(python: str | None = None) -> str:
    """The interpreter a benchmark ran on: implementation, version and the binary behind the virtual environment
    (``python``: another interpreter's path, asked in a child process; None: this one).

    The build matters as much as the machine: a CPython built without profile-guided and link-time optimisation
    (pyenv's default source build) took 1.7x the time of Debian's build of the same version for the reference
    loop and 1.12x the CPU per storefront request (issue 14). Printed with the figures, it tells them apart."""
    if python is None:
        return (
            f"{platform.python_implementation()} {platform.python_version()} {os.path.realpath(sys._base_executable)}"
        )
    found = subprocess.run([python, "-c", _DESCRIBE], capture_output=True, text=True, check=False, timeout=30)
    return found.stdout.strip() or f"{python} (did not answer)"


def machine_line(shop_python: str | None = None) -> str:
    """What a run's figures depend on besides the code: the reference loop (timed in this process) and the
    interpreters (``shop_python``: the one a shop started for the run uses, when it is another process)."""
    line = f"machine: reference loop {reference_loop_ms():.1f} ms on {interpreter()}"
    if shop_python is not None:
        line += f"; the shop runs on {interpreter(shop_python)}"
    return line + " (bench.report: compare days by these, not versions)"
