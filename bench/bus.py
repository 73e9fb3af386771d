"""Bus benchmark: messages/s and end-to-end latency per backend (memory, RabbitMQ), 1 and 1,000 sessions.

    python -m bench.bus [--quick] [--backend memory|rabbitmq|all] [--url AMQP_URL] [--all-cores]

For each backend and session count, two phases:

- throughput: ``--producers`` concurrent senders push N messages (session = i mod sessions) while one
  consumer (a second connection for RabbitMQ, i.e. another "process") handles them with a no-op
  handler; msg/s is N over the time from the first send to the last handled message. The latency of
  every message under that load (handled - about to send) is reported as load p50/p99.
- latency: M messages one at a time (send, wait until handled, next), so nothing queues: the bare
  end-to-end latency p50/p99 through the backend (for RabbitMQ: publish + confirm + quorum queue +
  delivery + in-process session dispatch).

Every phase is bounded in count and in time (``--phase-timeout``); a phase that runs out of time prints
what it got. RabbitMQ runs use a unique name prefix and delete their queues afterwards. Numbers only:
it never fails on speed. Skips RabbitMQ (with a note) when the broker is not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass

from yarl import URL

from bus import Bus, Envelope, MemoryBus

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Result:
    backend: str
    sessions: int
    messages: int
    handled: int
    seconds: float
    load_latencies: list[float]
    e2e_latencies: list[float]
    note: str = ""

    @property
    def rate(self) -> float:
        return self.handled / self.seconds if self.seconds > 0 else 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # ms


class _Sink:
    """Counts handled messages and records latencies; wakes waiters at a target count."""

    def __init__(self) -> None:
        self.count = 0
        self.latencies: list[float] = []
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, target: int) -> None:
        self.target = target
        self.reached.clear()
        if self.count >= target:
            self.reached.set()

    async def handler(self, env: Envelope) -> None:
        self.latencies.append(time.perf_counter() - env.body["t"])
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


BusPair = tuple[Bus, Bus, Callable[[], Awaitable[None]]]  # producer, consumer, cleanup


async def _memory_pair() -> BusPair:
    bus = MemoryBus(max_attempts=5, max_concurrent_sessions=64)
    await bus.start()
    return bus, bus, bus.close


async def _rabbit_pair(url: str, partitions: int) -> BusPair:
    from bus.rabbitmq import RabbitBus

    prefix = f"bench{uuid.uuid4().hex[:8]}."
    producer = RabbitBus(url, partitions=partitions, prefix=prefix, connection_name="bench-producer")
    consumer = RabbitBus(url, partitions=partitions, prefix=prefix, connection_name="bench-consumer")
    await producer.start()
    await consumer.start()

    async def cleanup() -> None:
        await consumer.close()
        names = producer.declared_queues | consumer.declared_queues
        exchanges = producer.declared_exchanges | consumer.declared_exchanges
        await producer.close()
        import aio_pika

        connection = await aio_pika.connect(url, timeout=10)
        try:
            for name in sorted(names):
                channel = await connection.channel()
                with suppress(Exception):
                    await channel.queue_delete(name)
                with suppress(Exception):
                    await channel.close()
            for name in exchanges:
                channel = await connection.channel()
                with suppress(Exception):
                    await channel.exchange_delete(name)
                with suppress(Exception):
                    await channel.close()
        finally:
            await connection.close()

    return producer, consumer, cleanup


async def _run_one(
    backend: str,
    make: Callable[[], Awaitable[BusPair]],
    sessions: int,
    messages: int,
    samples: int,
    producers: int,
    timeout: float,
) -> Result:
    producer, consumer_bus, cleanup = await make()
    sink = _Sink()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    result = Result(backend, sessions, messages, 0, 0.0, [], [])
    try:
        consumer = await consumer_bus.consume(queue, sink.handler)
        # warm-up: declarations, connection, first deliveries (not measured)
        warm = min(sessions, 50)
        sink.expect(warm)
        for i in range(warm):
            await producer.send(queue, Envelope(type="Warm", session_id=f"s{i}", body={"t": time.perf_counter()}))
        await asyncio.wait_for(sink.reached.wait(), timeout)
        sink.count, sink.latencies = 0, []

        # throughput under load
        sink.expect(messages)
        per = messages // producers
        counts = [per + (1 if p < messages % producers else 0) for p in range(producers)]

        async def produce(p: int, count: int) -> None:
            for j in range(count):
                i = p + j * producers
                env = Envelope(type="Bench", session_id=f"s{i % sessions}", body={"i": i, "t": time.perf_counter()})
                await producer.send(queue, env)

        start = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(produce(p, c) for p, c in enumerate(counts)), sink.reached.wait()), timeout
            )
        except TimeoutError:
            result.note = f"throughput phase timed out after {timeout:.0f}s"
        result.seconds = time.perf_counter() - start
        result.handled = sink.count
        result.load_latencies = sink.latencies

        # unloaded end-to-end latency: one message in flight at a time
        sink.count, sink.latencies = 0, []
        deadline = time.perf_counter() + timeout
        for i in range(samples):
            if time.perf_counter() > deadline:
                result.note += f"; latency phase stopped after {i} samples (time)"
                break
            sink.expect(i + 1)
            env = Envelope(type="Ping", session_id=f"s{i % sessions}", body={"i": i, "t": time.perf_counter()})
            await producer.send(queue, env)
            try:
                await asyncio.wait_for(sink.reached.wait(), timeout)
            except TimeoutError:
                result.note += "; latency phase timed out"
                break
        result.e2e_latencies = sink.latencies
        await consumer.stop()
    finally:
        await cleanup()
    return result


def _reachable(url: str) -> bool:
    parsed = URL(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5672), timeout=1.0):
            return True
    except OSError:
        return False


def _print(result: Result) -> None:
    print(
        f"{result.backend:<9} {result.sessions:>8} {result.handled:>8}/{result.messages:<8} "
        f"{result.rate:>10,.0f} {_pct(result.load_latencies, 0.5):>10.2f} {_pct(result.load_latencies, 0.99):>10.2f} "
        f"{_pct(result.e2e_latencies, 0.5):>9.3f} {_pct(result.e2e_latencies, 0.99):>9.3f}"
        + (f"  ({result.note.lstrip('; ')})" if result.note else ""),
        flush=True,
    )


async def run(args: argparse.Namespace) -> list[Result]:
    backends = ["memory", "rabbitmq"] if args.backend == "all" else [args.backend]
    quick = args.quick
    plans = {
        "memory": (args.messages or (20_000 if quick else 100_000), args.samples or (200 if quick else 2_000)),
        "rabbitmq": (args.messages or (3_000 if quick else 20_000), args.samples or (100 if quick else 1_000)),
    }
    print(
        f"{'backend':<9} {'sessions':>8} {'handled/sent':>17} {'msg/s':>10} "
        f"{'load p50':>10} {'load p99':>10} {'e2e p50':>9} {'e2e p99':>9}   (latencies in ms)"
    )
    results: list[Result] = []
    for backend in backends:
        if backend == "rabbitmq" and not _reachable(args.url):
            print(f"rabbitmq  skipped: broker not reachable at {URL(args.url).with_password(None)}")
            continue
        messages, samples = plans[backend]
        for sessions in (1, 1000):
            if backend == "memory":
                make: Callable[[], Awaitable[BusPair]] = _memory_pair
            else:
                make = functools.partial(_rabbit_pair, args.url, args.partitions)
            result = await _run_one(backend, make, sessions, messages, samples, args.producers, args.phase_timeout)
            _print(result)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.bus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke run (~10-20 s)")
    parser.add_argument("--backend", choices=["memory", "rabbitmq", "all"], default="all")
    parser.add_argument("--url", default=os.environ.get("ECOM_BUS_URL") or DEFAULT_URL, help="RabbitMQ AMQP URL")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--messages", type=int, default=0, help="messages per throughput run (default by backend)")
    parser.add_argument("--samples", type=int, default=0, help="one-at-a-time latency samples (default by backend)")
    parser.add_argument("--producers", type=int, default=16, help="concurrent senders in the throughput phase")
    parser.add_argument("--phase-timeout", type=float, default=120.0, help="seconds each phase may take at most")
    parser.add_argument("--all-cores", action="store_true", help="do not pin this process to one core")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.quick and args.phase_timeout == 120.0:
        args.phase_timeout = 30.0
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install() if sys.version_info < (3, 12) else None
        except ImportError:
            pass
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
