"""What tracing costs the actor runtime: asks and tells per second, and persisted turns per second on SQLite, with
tracing off, with tracing on (spans kept only in the in-process ring buffer: the SDK's whole cost without an
exporter's I/O), and optionally with the runtime as it was before the tracing hooks (``--before REV``: that
revision's ``runtime/actors.py``, loaded from git beside the current one).

    python -m bench.tracing [--quick] [--before main] [--rounds 3]

Prints numbers and ratios to "off" side by side (best of ``--rounds``); it never fails on speed. The target: off
costs next to nothing against before (a module-global test per hook).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import actors as current_actors
from runtime import migrate, tracing
from runtime.store import StateStore, create_engine


@dataclass(frozen=True, slots=True)
class Inc:
    pass


def _actor_classes(module: types.ModuleType) -> tuple[type, type]:
    """A counter (in memory) and a persisted 1 KB document actor on ``module``'s runtime."""

    class Counter(module.Actor):
        persistent = False
        type_name = "counter"

        def initial_state(self) -> dict:
            return {"n": 0}

        @module.handles(Inc)
        def inc(self, msg: Inc, turn: Any) -> int:
            self.state["n"] += 1
            return self.state["n"]

    class Doc(module.Actor):
        type_name = "doc"

        def initial_state(self) -> dict:
            return {"n": 0, "payload": "x" * 1000}

        @module.handles(Inc)
        def inc(self, msg: Inc, turn: Any) -> int:
            self.state["n"] += 1
            return self.state["n"]

    return Counter, Doc


def _load_before(rev: str) -> types.ModuleType | None:
    """``runtime/actors.py`` as it is at ``rev``, as a module of its own (None when git cannot give it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:runtime/actors.py"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"(no 'before' column: {exc})", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_loader("runtime._actors_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the classes are made
    exec(compile(source, f"{rev}:runtime/actors.py", "exec"), module.__dict__)
    return module


async def asks(module: types.ModuleType, counter: type, actors: int, total: int, window: int = 500) -> float:
    system = module.ActorSystem(None, mailbox_size=window + 10, max_activations=actors + 10)
    refs = [system.ref(counter, str(i)) for i in range(actors)]
    for r in refs:
        await r.ask(Inc())
    start = time.perf_counter()
    done = 0
    while done < total:
        await asyncio.gather(*(refs[(done + k) % actors].ask(Inc()) for k in range(window)))
        done += window
    elapsed = time.perf_counter() - start
    await system.stop()
    return done / elapsed


async def tells(module: types.ModuleType, counter: type, actors: int, total: int) -> float:
    system = module.ActorSystem(None, mailbox_size=total + 1, max_activations=actors + 10)
    refs = [system.ref(counter, str(i)) for i in range(actors)]
    for r in refs:
        await r.ask(Inc())
    per = total // actors
    start = time.perf_counter()
    for _ in range(per):
        for r in refs:
            await r.tell(Inc())
    await asyncio.gather(*(r.ask(Inc()) for r in refs))
    elapsed = time.perf_counter() - start
    await system.stop()
    return per * actors / elapsed


async def persisted(module: types.ModuleType, doc: type, url: str, actors: int, total: int) -> float:
    engine = create_engine(url)
    store = StateStore(engine)
    system = module.ActorSystem(store, exclusive=True, max_activations=actors + 10)
    refs = [system.ref(doc, f"d{i}") for i in range(actors)]
    for r in refs:
        await r.ask(Inc())
    per = total // actors
    start = time.perf_counter()
    for _ in range(per):
        await asyncio.gather(*(r.ask(Inc()) for r in refs))
    elapsed = time.perf_counter() - start
    await system.stop()
    await engine.dispose()
    return per * actors / elapsed


def hook_cost(n: int) -> float:
    """Nanoseconds the runtime's tracing hooks add to one persisted turn: capture at enqueue, the turn's span, the
    commit's span (the context managers entered and left around nothing)."""
    write = types.SimpleNamespace(actor_type="doc", actor_id="d1", expected_version=1, outbox=[])
    key, message = ("doc", "d1"), Inc()
    start = time.perf_counter()
    for _ in range(n):
        context = tracing.capture()
        with tracing.turn(key, message, None, None, context), tracing.commit(write):
            pass
    return (time.perf_counter() - start) / n * 1e9


async def run(args: argparse.Namespace) -> None:
    scale = 5 if args.quick else 1
    variants: list[tuple[str, types.ModuleType, bool]] = []
    if args.before:
        before = _load_before(args.before)
        if before is not None:
            variants.append((f"before ({args.before})", before, False))
    variants += [("off", current_actors, False), ("on (ring buffer)", current_actors, True)]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            # Every other round in reverse order, each variant after a collection: the order of runs on a shared
            # machine otherwise shows up as a difference between the variants.
            for name, module, traced in variants if round_no % 2 == 0 else variants[::-1]:
                gc.collect()
                counter, doc = _actor_classes(module)
                if traced:
                    tracing.configure("bench", environ={"OTEL_TRACES_EXPORTER": "buffer"})
                url = f"sqlite+aiosqlite:///{os.path.join(tmp, f'{round_no}-{len(results)}-{name[:3]}.db')}"
                engine = create_engine(url)
                await migrate.upgrade(engine, [migrate.RUNTIME])
                await engine.dispose()
                try:
                    row = {
                        "asks/s": await asks(module, counter, 100, 200_000 // scale),
                        "tells/s": await tells(module, counter, 100, 200_000 // scale),
                        "persisted turns/s": await persisted(module, doc, url, 20, 4_000 // scale),
                    }
                finally:
                    tracing.shutdown()
                best = results.setdefault(name, row)
                for key, value in row.items():
                    best[key] = max(best[key], value)
    metrics = ["asks/s", "tells/s", "persisted turns/s"]
    print(f"{'':20}" + "".join(f"{m:>20}{'ratio':>8}" for m in metrics))
    for name, row in results.items():
        cells = "".join(f"{row[m]:>20,.0f}{row[m] / results['off'][m]:>8.2f}" for m in metrics)
        print(f"{name:20}{cells}")
    print(f"(best of {args.rounds} rounds; ratio: to 'off'; one process, machine shared: compare within one run)")
    n = 200_000 // scale
    off = min(hook_cost(n) for _ in range(args.rounds))
    tracing.configure("bench", environ={"OTEL_TRACES_EXPORTER": "buffer"})
    try:
        on = min(hook_cost(n // 20) for _ in range(args.rounds))
    finally:
        tracing.shutdown()
    print(f"hooks per persisted turn (capture + turn span + commit span): off {off:,.0f} ns, on {on:,.0f} ns")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tracing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the work, for a smoke run")
    parser.add_argument(
        "--before", metavar="REV", default="", help="also measure runtime/actors.py at this git revision"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (the best is shown)")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args(argv)
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
