"""Two versions of the embedded shop measured in one run, the storefront mix alternating between them.

    python -m bench.ab --base DIR [--new DIR] [--rounds 3] [--windows 4] [--window 10] [--users 50] [--mix ...]

Why: on the shared development machine the same code's throughput drifted by a quarter within a minute (issue 14:
10-second windows of one 60-second run from 550 to 926 req/s), so two versions measured one after the other differ
by more than most changes do. Here both shops run at once (each a checkout with its own ``.venv``, as
``storefront --shop-repo`` starts it; ``DIR`` is typically ``git archive REV | tar -x -C DIR`` plus ``make
install`` there), their users are signed up once, and the mix runs against one shop at a time in short windows,
each pair of windows in the order A B, then B A, and so on: a drift of the machine falls on both alike. Both shops
run on one core, the load generator on the other. Two processes of the same code differ by a few per cent (an A/A
run of one pair of processes gave 0.92-0.95), so ``rounds`` fresh pairs are started one after the other.

Per window it counts the requests answered and the CPU seconds the shop's process tree used (``/proc``), and prints
per shop the requests/s while loaded and the server CPU per request, and per pair the ratio of CPU per request (new /
base): its median is the figure to quote, the range says how much to trust it. The load generator is this process.
Bounded: ``rounds`` x ``windows`` x 2 x ``window`` seconds of load, plus the start-ups and sign-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import interpreter, machine_line
from bench.shop import EmbeddedShop, cpu_seconds, process_tree
from bench.storefront import DEFAULT_MIX, STOCK_UNITS, Http, Recorder, Shopper, parse_mix, stock_up, storefront


@dataclass
class Side:
    """One shop and what its windows measured."""

    name: str
    shop: EmbeddedShop
    tokens: list[str] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    server_errors: int = 0

    def per_request_us(self, k: int) -> float:
        return 1e6 * self.cpu[k] / max(1, self.requests[k])


async def sign_up(url: str, users: int) -> list[str]:
    """Access tokens of ``users`` new shoppers (registered and signed in through the gateway, 8 at a time)."""
    http = Http(url, connections=8)
    recorder = Recorder()
    password = f"bench-{uuid.uuid4().hex}"
    shoppers = [Shopper(i, http, recorder, random.Random(i), None, password) for i in range(users)]
    gate = asyncio.Semaphore(8)

    async def one(shopper: Shopper) -> str | None:
        async with gate:
            return shopper.token if await shopper.sign_in() else None

    try:
        found = await asyncio.gather(*(one(s) for s in shoppers))
    finally:
        await http.close()
    return [t for t in found if t]


async def prepare(side: Side, users: int) -> None:
    http = Http(side.shop.url, connections=4)
    try:
        await stock_up(http, side.shop.admin_password, STOCK_UNITS)
    finally:
        await http.close()
    side.tokens = await sign_up(side.shop.url, users)
    if not side.tokens:
        raise RuntimeError(f"{side.name}: no shopper could sign up")


async def window(side: Side, users: int, seconds: float, mix: dict[str, int], seed: int) -> None:
    assert side.shop.proc is not None
    pid = side.shop.proc.pid
    before, started = cpu_seconds(pid), time.perf_counter()
    recorder = await storefront(
        side.shop.url, users=users, duration=seconds, tokens=side.tokens, mix=mix, seed=seed, quiet=True
    )
    side.cpu.append(cpu_seconds(pid) - before)
    side.seconds.append(time.perf_counter() - started)
    side.requests.append(recorder.total)
    side.server_errors += recorder.refusals()[2]


async def compare(
    base: Side, new: Side, *, first: int, windows: int, seconds: float, users: int, mix: dict[str, int]
) -> None:
    """``windows`` pairs against the two shops just started (pair numbers from ``first``)."""
    for side in (base, new):
        await prepare(side, users)
    for k in range(first, first + windows):
        pair = (base, new) if k % 2 == 0 else (new, base)
        for side in pair:
            await window(side, users, seconds, mix, seed=k)
        b, n = base.per_request_us(k), new.per_request_us(k)
        print(
            f"window {k + 1:2d}: base {base.requests[k] / base.seconds[k]:7.1f} req/s {b:7.0f} us/req | "
            f"new {new.requests[k] / new.seconds[k]:7.1f} req/s {n:7.0f} us/req | new/base CPU per request {n / b:.3f}",
            flush=True,
        )


def summary(base: Side, new: Side) -> list[str]:
    lines = []
    for side in (base, new):
        requests, cpu, wall = sum(side.requests), sum(side.cpu), sum(side.seconds)
        lines.append(
            f"{side.name:4s} {requests:8d} requests in {wall:6.1f} s loaded: {requests / wall:7.1f} req/s, "
            f"server CPU {1e6 * cpu / max(1, requests):6.0f} us per request, 5xx {side.server_errors}  "
            f"({side.shop.repo})"
        )
    ratios = sorted(new.per_request_us(k) / base.per_request_us(k) for k in range(len(base.requests)))
    throughput = sorted(
        (new.requests[k] / new.seconds[k]) / (base.requests[k] / base.seconds[k]) for k in range(len(base.requests))
    )
    lines.append(
        f"new / base, per pair of windows: CPU per request median {statistics.median(ratios):.3f} "
        f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}), req/s median {statistics.median(throughput):.3f} "
        f"(range {throughput[0]:.3f}-{throughput[-1]:.3f})"
    )
    return lines


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and its children onto ``cpus`` (threads started later inherit it)."""
    for process in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the checkout to compare against (its own .venv)")
    parser.add_argument("--new", default=str(Path(__file__).resolve().parent.parent), help="default: this one")
    parser.add_argument("--rounds", type=int, default=3, help="fresh pairs of shops, one after the other (default 3)")
    parser.add_argument("--windows", type=int, default=4, help="pairs of windows per round (default 4)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of load per window (default 10)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--mix", type=parse_mix, default=DEFAULT_MIX, help="as storefront's --mix")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or args.windows < 1 or not 1 <= args.window <= 120 or not 1 <= args.users <= 1000:
        parser.error("--rounds 1-20, --windows >= 1, --window 1-120 s and --users 1-1000")
    sides = [
        Side("base", EmbeddedShop(repo=Path(args.base).resolve())),
        Side("new", EmbeddedShop(repo=Path(args.new).resolve())),
    ]
    print(
        f"{args.rounds} rounds of {args.windows} pairs of {args.window:g}-second windows, {args.users} users, mix {args.mix}"
    )
    for r in range(args.rounds):
        # A fresh pair of processes per round, started in turn first: two processes of the same code differ by a few
        # per cent (memory layout, hash seeds; an A/A run of one pair: 0.92-0.95), which rounds average out.
        if r:
            for side in sides:
                side.shop = EmbeddedShop(repo=side.shop.repo)
        try:
            for side in sides if r % 2 == 0 else sides[::-1]:
                took = side.shop.start()
                print(
                    f"{side.name}: {side.shop.repo} ready at {side.shop.url} in {took:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            # Both shops on one core, the load generator on the other: unpinned, each shop stays on the core it
            # started on, and the two cores of a shared machine need not be equally fast.
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) >= 2:
                for side in sides:
                    assert side.shop.proc is not None
                    pin(side.shop.proc.pid, {cores[-1]})
                os.sched_setaffinity(0, set(cores[:-1]))
            if r == 0:
                print(machine_line(sides[0].shop.python))  # the base's interpreter; the new one's if it is another
                base_python, new_python = (interpreter(side.shop.python) for side in sides)
                if new_python != base_python:
                    print(f"the new shop runs on {new_python}")
            asyncio.run(
                compare(
                    *sides,
                    first=r * args.windows,
                    windows=args.windows,
                    seconds=args.window,
                    users=args.users,
                    mix=args.mix,
                )
            )
        finally:
            for side in sides:
                side.shop.stop()
    print("\n".join(summary(*sides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
