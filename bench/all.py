"""Run every benchmark one after the other and write their headline figures as one markdown table.

    python -m bench.all [--full] [--only NAME ...] [--out var/bench/results.md]

Each benchmark runs in its own process (``python -m bench.<name>``, ``--quick`` unless ``--full``), bounded in
time, with ``ECOM_BENCH_RESULTS`` pointing at a scratch file that :func:`bench.report.figure` appends to. Their
full output goes to ``<out dir>/<name>.log``; the table (figure, value, target) goes to ``--out`` and to stdout.
A benchmark that fails or runs out of time is listed as such; the others still run. Numbers are never judged
here: the targets are printed beside them for the reader.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.report import RESULTS_ENV, Figure, interpreter, read, reference_loop_ms

# (module, extra arguments, seconds allowed) in the order the issues list them.
BENCHES: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("catalog", (), 900.0),
    ("checkout", (), 900.0),
    ("storefront", ("--embedded",), 900.0),  # its own shop: one a developer runs is left alone
    ("identity", (), 600.0),
    ("gateway", (), 900.0),
    ("actors", (), 600.0),
    ("bus", (), 600.0),
)


def _value(figure: Figure) -> str:
    text = f"{figure.value:,.0f}" if abs(figure.value) >= 100 else f"{figure.value:.3g}"
    return f"{text} {figure.unit}".strip()


def markdown(figures: list[Figure], outcomes: dict[str, str], header: str) -> str:
    lines = [header, "", "| benchmark | figure | value | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {f.bench} | {f.name} | {_value(f)} | {f.target} |" for f in figures]
    failed = {name: outcome for name, outcome in outcomes.items() if outcome != "ok"}
    if failed:
        lines += ["", *(f"- `bench.{name}`: {outcome}" for name, outcome in failed.items())]
    return "\n".join(lines) + "\n"


def run_one(name: str, extra: tuple[str, ...], limit: float, quick: bool, results: str, log_dir: Path) -> str:
    command = [sys.executable, "-m", f"bench.{name}", *(("--quick",) if quick else ()), *extra]
    env = {**os.environ, RESULTS_ENV: results}
    started = time.monotonic()
    with open(log_dir / f"{name}.log", "wb") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return f"stopped after {limit:.0f} s (bound)"
    took = time.monotonic() - started
    print(f"bench.{name}: exit {done.returncode} in {took:.0f} s", flush=True)
    return "ok" if done.returncode == 0 else f"exit status {done.returncode} (see {name}.log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="full runs instead of --quick ones")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--out", default="var/bench/results.md", help="the markdown table's file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHES if not args.only or b[0] in args.only]
    outcomes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ecom-bench-") as scratch:
        results = str(Path(scratch) / "figures.jsonl")
        for name, extra, limit in chosen:
            outcomes[name] = run_one(name, extra, limit, not args.full, results, out.parent)
        figures = read(results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    header = (
        f"Benchmarks {'(full)' if args.full else '(--quick)'} of {commit.stdout.strip() or 'this tree'}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {interpreter()}, "
        f"load average at the end {os.getloadavg()[0]:.1f}, reference loop {reference_loop_ms():.1f} ms "
        "(bench.report: a slower machine shows there, not only in the figures)"
    )
    table = markdown(figures, outcomes, header)
    out.write_text(table)
    print(table)
    return 0 if all(outcome == "ok" for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
