"""The embedded shop (``python -m runtime.cli run``) as a child process of a benchmark, and its memory over time.

:class:`EmbeddedShop` starts the default one-process system the way a user's ``ecom run`` does, with only what a
load test on one machine needs changed: its own temporary data directory (fresh SQLite files), its own free ports
in 20000-32000 on 127.0.0.1, the per-address limits off (every virtual shopper comes from 127.0.0.1) and a known
admin password (so the bench can stock the shelves as an operator would). No ``ECOM_*`` variable of the caller's
shell leaks in. ``stop()`` sends Ctrl-C (the shop shuts down cleanly) and kills it only if it does not exit.

:class:`RssSampler` reads ``VmRSS`` of the shop's process tree from ``/proc`` every few seconds, and the CPU
time the tree used while it ran (so a change's cost per request shows even on a machine shared with other load,
where throughput alone swings).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PORT_LOW, PORT_HIGH = 20000, 32000  # below the ephemeral range (32768-60999): no clash with outgoing connections
SERVICES = ("gateway", "identity", "catalog", "cart", "order")  # one port each, from the base port up
REPO_ROOT = Path(__file__).resolve().parents[1]


def port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:``port`` (SO_REUSEADDR: a connection in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_base_port(span: int, *, low: int = PORT_LOW, high: int = PORT_HIGH, attempts: int = 200) -> int:
    """A base port such that base .. base + span - 1 are all free, all within ``low``-``high`` (the benches and the
    tests' process clusters share this one finder)."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(low, high - span)
        if all(port_free(base + i) for i in range(span)):
            return base
    raise RuntimeError(f"no free range of {span} ports in {low}-{high}")


def free_port() -> int:
    """One free port on 127.0.0.1 in 20000-32000."""
    return free_base_port(1)


@dataclass
class EmbeddedShop:
    """One ``runtime.cli run`` child; ``url`` is its gateway. Use as a context manager (start, then stop)."""

    ready_within: float = 120.0  # migrations and the first start of every service, on a loaded machine
    admin_password: str = field(default_factory=lambda: f"bench-admin-{secrets.token_urlsafe(12)}")
    base: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    # The checkout whose shop runs (its own .venv's Python when it has one): another checkout's shop can be
    # measured with this generator, so two versions compare side by side with the same client.
    repo: Path = REPO_ROOT

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "shop.log"

    def env(self) -> dict[str, str]:
        assert self.workdir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p)
        env.update(
            ECOM_HOST="127.0.0.1",
            ECOM_DATA_DIR=str(self.workdir / "var"),
            ECOM_ADMIN_PASSWORD=self.admin_password,
            ECOM_GATEWAY_RATE_LIMIT="0",  # all the shoppers share one address
            ECOM_AUTH_REGISTRATIONS_PER_ADDRESS="0",
        )
        for offset, name in enumerate(SERVICES):
            env[f"ECOM_{name.upper()}_PORT"] = str(self.base + offset)
        return env

    @property
    def python(self) -> str:
        """The interpreter the shop runs on: its checkout's virtual environment, else this process's."""
        venv = self.repo / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable

    def start(self) -> float:
        """Start the shop and wait until every service answers ``/health/ready``; returns the seconds it took."""
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="ecom-bench-shop-"))
        self.base = free_base_port(len(SERVICES))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "runtime.cli", "run"],
                env=self.env(),
                cwd=self.repo,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the bench's terminal reaches the shop only through stop()
                preexec_fn=_stop_with_parent,
            )
        pending = [self.base + i for i in range(len(SERVICES))]
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the shop exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - started > self.ready_within:
                raise RuntimeError(f"the shop was not ready in {self.ready_within:.0f} s:\n{self.log_tail()}")
            pending = [port for port in pending if not _ready(port)]
            if pending:
                time.sleep(0.3)
        return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ctrl-C, then SIGKILL after ``timeout``; removes the data directory. Returns the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            code = self.proc.returncode
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedShop:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_with_parent() -> None:
    """In the child, before exec: Ctrl-C it when the bench dies, even by SIGKILL (bench.all's time bound), so no
    shop is left running on its own (Linux only; elsewhere only stop() does)."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------------------------------------------
# Memory


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (those still running)."""
    found = []
    todo = [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (0 once they are gone)."""
    total = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its running descendants, in seconds (0 once they are gone)."""
    total = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        parts = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 on; utime, stime are 14, 15
        total += int(parts[11]) + int(parts[12])
    return total / _TICK


@dataclass
class RssSampler:
    """``samples``: (seconds since start, RSS in MiB) every ``interval`` seconds while ``run()`` runs;
    ``cpu``: the CPU seconds the process tree used meanwhile, ``wall``: the seconds it ran."""

    pid: int
    interval: float = 5.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    cpu: float = 0.0
    wall: float = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        started = time.perf_counter()
        cpu_before = cpu_seconds(self.pid)
        try:
            await self._sample(stop, started)
        finally:
            self.cpu = cpu_seconds(self.pid) - cpu_before
            self.wall = time.perf_counter() - started

    async def _sample(self, stop: asyncio.Event, started: float) -> None:
        while True:
            self.samples.append((time.perf_counter() - started, rss_kib(self.pid) / 1024))
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
                break
            except TimeoutError:
                pass
        self.samples.append((time.perf_counter() - started, rss_kib(self.pid) / 1024))

    def summary(self) -> str:
        if not self.samples:
            return "RSS: no samples"
        values = [mib for _, mib in self.samples]
        series = " ".join(f"{t:.0f}s:{mib:.0f}" for t, mib in _thin(self.samples, 16))
        return (
            f"server RSS (MiB) min {min(values):.0f}, max {max(values):.0f}, first {values[0]:.0f}, "
            f"last {values[-1]:.0f} ({len(values)} samples every {self.interval:g} s)\n  {series}"
        )


def _thin(samples: list[tuple[float, float]], at_most: int) -> list[tuple[float, float]]:
    """At most ``at_most`` evenly spread samples, the first and the last always among them."""
    if len(samples) <= at_most:
        return samples
    step = (len(samples) - 1) / (at_most - 1)
    return [samples[round(i * step)] for i in range(at_most)]
