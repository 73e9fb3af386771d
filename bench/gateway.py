"""Gateway benchmark: the gateway against nginx and against the upstream served directly.

    ecom bench gateway [--quick] [--duration 10] [--rounds 3] [--connections 64] [--path /api/cart] [--no-rate-limit]

Starts, side by side on 127.0.0.1:

* the upstream: a plain aiohttp JSON handler on uvloop, one process (it also serves the JWKS the gateway
  verifies tokens with, and ``/health/ready``);
* the gateway: ``ecom serve gateway`` in one process (uvloop), every service routed to that upstream, the
  access log off, rate limits on (one bucket per token, set high enough never to refuse), its port served by
  ``gateway/front.py`` (the default ``[gateway] front = "fast"``);
* nginx (the Debian package): one worker, keep-alive upstream pool, access log off, no token checks.

The upstream is pinned to CPU 0 and each proxy to CPU 1 (taskset), wrk runs where the OS puts it. Each round
runs ``wrk -c<connections>`` against the upstream, nginx and the gateway in turn (each round starting one target
later than the one before), all with the same bearer token
(a customer token; ``/api/cart`` needs one and is routed by the token's subject), and the medians over the
rounds are printed with the ratios:

* authenticated gateway req/s / nginx req/s (target >= 0.6), and gateway p99 / nginx p99 (target <= 2);
* gateway req/s / direct upstream req/s;
* CPU time per request of each proxy process and of the upstream (from /proc): on a busy shared machine this is
  steadier than req/s, and it says what each proxy would do with a core of its own.

``--aiohttp-front`` adds the same gateway with ``ECOM_GATEWAY_FRONT=aiohttp`` (aiohttp's server serves everything:
the gateway before gateway/front.py), measured side by side. ``--naive`` adds, for reference, the proxy everyone writes first (aiohttp, one shared ClientSession, no token
check). ``--raw-front`` adds the gateway's hot-path work for this request (token cache, role, rate limit, header
filter, request id, gateway.client's pool) on a bare httptools front: what the checks cost without aiohttp's server
and middleware chain. ``--profile FILE`` records the gateway with py-spy during its first run and prints the top
frames (``--native`` for C frames).

The machine is shared: run it when it is quiet, and read the ratios (measured in the same run), not the
absolute numbers. Without nginx or wrk it says so and measures with a Python load generator
(``bench/storefront.py --proxy-get``) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import figure
from bench.shop import free_port

HOST = "127.0.0.1"
UPSTREAM_CPU = "0"
PROXY_CPU = "1"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream backend {{ server {host}:{upstream}; keepalive 128; }}
  server {{
    listen {host}:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


# ---------------------------------------------------------------------------------------------------
# The upstream process


def run_upstream(port: int, jwks_file: str) -> None:
    import orjson
    from aiohttp import web

    from runtime.cli import install_uvloop

    install_uvloop()
    jwks = Path(jwks_file).read_bytes()
    issuer = f"http://{HOST}:{port}"
    discovery = orjson.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/.well-known/jwks.json"})
    payload = orjson.dumps(
        {
            "items": [
                {"id": "3f0e8e0c-1b1a-4a63-9a55-0c6d1f0f2b11", "name": "Widget", "price": "19.99", "quantity": 2}
            ],
            "subtotal": "39.98",
            "item_count": 2,
        }
    )

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/json")

    async def json_doc(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", lambda _r: json_doc(discovery))
    app.router.add_get("/.well-known/jwks.json", lambda _r: json_doc(jwks))
    app.router.add_get("/health/ready", lambda _r: json_doc(b'{"status":"ok"}'))
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, backlog=4096)


def run_naive_proxy(port: int, upstream: int) -> None:
    """For reference only (``--naive``): the proxy everyone writes first, one shared ClientSession per process."""
    import aiohttp
    from aiohttp import web

    from runtime.cli import install_uvloop

    install_uvloop()
    base = f"http://{HOST}:{upstream}"

    async def session_ctx(app: web.Application) -> Any:
        app["session"] = aiohttp.ClientSession()
        yield
        await app["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        headers = {"Authorization": request.headers.get("Authorization", "")}
        async with request.app["session"].request(
            request.method, base + request.path_qs, headers=headers, data=await request.read()
        ) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, backlog=4096)


def run_raw_front(port: int, upstream: int, jwks_file: str, issuer: str) -> None:
    """For reference only (``--raw-front``): the gateway's hot-path work for this benchmark's request without
    aiohttp's server and middlewares, to tell what they cost. An httptools request parser on uvloop; per request:
    the token (verified-token cache, full verification on a miss), its role, a rate-limit token, the gateway's
    request-header filter, a request id and X-Forwarded-*, and the upstream exchange through gateway.client.Pool.
    Keep-alive GETs only, no routing table, no problem+json errors: not a product, a measuring stick."""
    import httptools
    import orjson

    from gateway.client import Pool
    from gateway.proxy import DROP_REQUEST, IDENTITY_PREFIXES
    from gateway.ratelimit import LocalLimiter
    from runtime.auth import TokenVerifier, check_access
    from runtime.cli import install_uvloop

    install_uvloop()
    rng = random.Random()
    jwks = orjson.loads(Path(jwks_file).read_bytes())
    tasks: set[asyncio.Future[None]] = set()

    class Front(asyncio.Protocol):
        def __init__(self, verifier: TokenVerifier, pool: Pool, limiter: LocalLimiter) -> None:
            self.verifier, self.pool, self.limiter = verifier, pool, limiter
            self.parser = httptools.HttpRequestParser(self)
            self.host_line = f"Host: {HOST}:{upstream}\r\n".encode()
            self.transport: asyncio.Transport | None = None
            self.remote = b"-"
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]  # a TCP server's transport
            self.remote = str(transport.get_extra_info("peername")[0]).encode()

        def connection_lost(self, exc: Exception | None) -> None:
            self.transport = None

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.url, self.headers = b"", []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_message_complete(self) -> None:
            task = asyncio.ensure_future(self.handle(self.parser.get_method(), self.url, self.headers))
            tasks.add(task)  # referenced until done
            task.add_done_callback(tasks.discard)

        async def handle(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
            token, parts = "", []
            for name, value in headers:
                lname = name.lower()
                if lname == b"authorization" and value.startswith(b"Bearer "):
                    token = value[7:].decode("ascii")
                if lname in DROP_REQUEST or lname.startswith(IDENTITY_PREFIXES):
                    continue
                parts.append(b"%s: %s\r\n" % (name, value))
            principal = self.verifier.verify_cached(token) or await self.verifier.verify(token)
            check_access(principal, roles=("customer",))
            self.limiter.take("sub:" + principal.sub)
            rid = b"%032x" % rng.getrandbits(128)
            parts.append(
                b"X-Request-Id: %s\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n\r\n" % (rid, self.remote)
            )
            head = b"%s %s HTTP/1.1\r\n%s%s" % (method, url, self.host_line, b"".join(parts))
            resp = await self.pool.request(head, None, no_body=False, timeout=10.0)
            body = resp.body or b""
            out = [b"HTTP/1.1 %d OK\r\n" % resp.status]
            out += [f"{n}: {v}\r\n".encode("latin-1") for n, v in resp.headers]
            out.append(b"Content-Length: %d\r\nX-Request-Id: %s\r\n\r\n%s" % (len(body), rid, body))
            if self.transport is not None:
                self.transport.write(b"".join(out))

    async def serve() -> None:
        verifier = TokenVerifier(issuer=issuer, audience="ecom")
        verifier.set_jwks(jwks)
        pool = Pool(HOST, upstream)
        limiter = LocalLimiter(1e9, 10**9)
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: Front(verifier, pool, limiter), HOST, port, backlog=4096)
        await asyncio.Event().wait()

    asyncio.run(serve())


# ---------------------------------------------------------------------------------------------------
# Orchestration


def pinned(cpu: str, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu, *cmd]
    return cmd


def wait_http(url: str, timeout: float = 30.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
                if resp.status < 500:
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up: {last}")


def make_keys(tmp: Path) -> tuple[Any, Path]:
    """A key ring to sign tokens with, and the JWKS file that verifies them."""
    import orjson

    from identity.keys import KeyRing, generate_key

    ring = KeyRing(publish_ahead=0, max_token_lifetime=3600)
    ring.add(generate_key("ES256"))
    jwks_file = tmp / "jwks.json"
    jwks_file.write_bytes(orjson.dumps(ring.jwks()))
    return ring, jwks_file


_LAT = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def cpu_seconds(pids: Sequence[int], system_only: bool = False) -> float:
    """User + system CPU time of processes (Linux /proc), to tell each one's cost per request (``system_only``:
    the kernel's part alone: socket calls, the loopback's TCP work, epoll)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (0 if system_only else int(fields[11])) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_wrk(url: str, token: str, duration: float, connections: int, threads: int) -> dict[str, Any]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {token}",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {int(m.group(1)): float(m.group(2)) * _UNIT[m.group(3)] for m in _LAT.finditer(out)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "requests": total,
        "p50": lat.get(50, float("nan")),
        "p99": lat.get(99, float("nan")),
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
    }


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None, cwd: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process (taskset execs the command: the pid is the command's own)."""
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecom bench gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the three targets (default 3)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--path", default="/api/cart", help="the proxied path (default /api/cart: customer token, affinity)"
    )
    parser.add_argument("--no-rate-limit", action="store_true", help="measure the gateway with rate limits off")
    parser.add_argument(
        "--naive",
        action="store_true",
        help="also measure a naive aiohttp proxy (one shared ClientSession, no token check)",
    )
    parser.add_argument(
        "--aiohttp-front",
        action="store_true",
        help="also measure the gateway with ECOM_GATEWAY_FRONT=aiohttp (aiohttp's server for every request)",
    )
    parser.add_argument(
        "--raw-front",
        action="store_true",
        help="also measure the gateway's hot-path work on a bare httptools front (no aiohttp server), for reference",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure the gateway of another source tree (e.g. `git archive main | tar -x -C DIR`), run from"
        " DIR with the same settings, side by side in the same rounds: a before/after on a noisy machine",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: 4 s per wrk run, 2 rounds")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record the gateway during its first wrk run into FILE (collapsed stacks) and print the top",
    )
    parser.add_argument("--native", action="store_true", help="with --profile: C frames too (py-spy --native)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 4.0, 2

    have_wrk, have_nginx = shutil.which("wrk") is not None, shutil.which("nginx") is not None
    if not have_wrk:
        print("wrk is not installed (apt-get install wrk): measuring with the Python load generator instead")
    if not have_nginx:
        print("nginx is not installed (apt-get install nginx): the gateway/nginx ratio cannot be measured")

    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="ecom-bench-gw-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            return _run(args, tmp, procs, have_wrk, have_nginx)
        finally:
            procs.stop()


def _run(args: argparse.Namespace, tmp: Path, procs: Procs, have_wrk: bool, have_nginx: bool) -> int:
    from identity.tokens import TokenIssuer

    ring, jwks_file = make_keys(tmp)
    up_port, gw_port, ng_port = free_port(), free_port(), free_port()
    issuer = f"http://{HOST}:{up_port}"
    token, _ = TokenIssuer(ring, issuer, "ecom", access_token_ttl=3600).issue_access_token(
        "bench-user-1", "storefront", ["openid", "ecom"], ["customer"]
    )
    auth = {"Authorization": f"Bearer {token}"}
    py = sys.executable

    upstream = procs.start(
        pinned(UPSTREAM_CPU, [py, "-m", "bench.gateway", "--role-upstream", str(up_port), str(jwks_file)]),
        log=tmp / "upstream.log",
    )
    wait_http(f"http://{HOST}:{up_port}/health/ready")

    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env.update(
        ECOM_DATA_DIR=str(tmp / "var"),
        ECOM_LOG_LEVEL="WARNING",
        ECOM_PUBLIC_URL=issuer,  # the stand-in upstream issues the tokens and serves the JWKS
        ECOM_GATEWAY_PORT=str(gw_port),
        ECOM_GATEWAY_ACCESS_LOG="false",
        ECOM_GATEWAY_RATE_LIMIT="0" if args.no_rate_limit else "1000000000",
        ECOM_GATEWAY_RATE_BURST="1000000000",
    )
    for name in ("identity", "catalog", "cart", "order"):
        env[f"ECOM_{name.upper()}_UPSTREAMS"] = issuer
    gateway = procs.start(
        pinned(PROXY_CPU, [py, "-m", "runtime.cli", "serve", "gateway"]), env=env, log=tmp / "gateway.log"
    )
    targets: dict[str, str] = {"direct": f"http://{HOST}:{up_port}{args.path}"}
    proxy_pids: dict[str, list[int]] = {"direct": [], "gateway": [gateway.pid]}
    if have_nginx:
        (tmp / "nginx").mkdir()
        conf = tmp / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp / "nginx", host=HOST, upstream=up_port, port=ng_port))
        nginx = procs.start(
            pinned(PROXY_CPU, ["nginx", "-p", str(tmp / "nginx"), "-c", str(conf)]), log=tmp / "nginx.log"
        )
        targets["nginx"] = f"http://{HOST}:{ng_port}{args.path}"
    targets["gateway"] = f"http://{HOST}:{gw_port}{args.path}"
    if args.aiohttp_front:
        ah_port = free_port()
        slow = procs.start(
            pinned(PROXY_CPU, [py, "-m", "runtime.cli", "serve", "gateway"]),
            env={**env, "ECOM_GATEWAY_PORT": str(ah_port), "ECOM_GATEWAY_FRONT": "aiohttp"},
            log=tmp / "gateway-aiohttp.log",
        )
        targets["aiohttpgw"] = f"http://{HOST}:{ah_port}{args.path}"
        proxy_pids["aiohttpgw"] = [slow.pid]
    if args.baseline:
        bl_port = free_port()
        base = procs.start(
            pinned(PROXY_CPU, [py, "-m", "runtime.cli", "serve", "gateway"]),
            env={**env, "ECOM_GATEWAY_PORT": str(bl_port)},
            log=tmp / "gateway-baseline.log",
            cwd=str(Path(args.baseline).resolve()),  # `python -m` imports from the working directory first
        )
        targets["baseline"] = f"http://{HOST}:{bl_port}{args.path}"
        proxy_pids["baseline"] = [base.pid]
    if args.naive:
        nv_port = free_port()
        naive = procs.start(
            pinned(PROXY_CPU, [py, "-m", "bench.gateway", "--role-naive", str(nv_port), str(up_port)]),
            log=tmp / "naive.log",
        )
        targets["naive"] = f"http://{HOST}:{nv_port}{args.path}"
        proxy_pids["naive"] = [naive.pid]
    if args.raw_front:
        rf_port = free_port()
        raw = procs.start(
            pinned(
                PROXY_CPU,
                [py, "-m", "bench.gateway", "--role-raw-front", str(rf_port), str(up_port), str(jwks_file), issuer],
            ),
            log=tmp / "raw-front.log",
        )
        targets["rawfront"] = f"http://{HOST}:{rf_port}{args.path}"
        proxy_pids["rawfront"] = [raw.pid]
    for url in targets.values():
        wait_http(url, headers=auth)
    if have_nginx:
        proxy_pids["nginx"] = [nginx.pid, *children(nginx.pid)]
    # one authenticated request through the gateway first: the token is verified once, then cached
    with urllib.request.urlopen(urllib.request.Request(targets["gateway"], headers=auth), timeout=5) as resp:
        if resp.status != 200:
            print(f"gateway answered {resp.status} to the warm-up request", file=sys.stderr)
            return 1

    pinning = (
        f"upstream pinned to CPU {UPSTREAM_CPU}, proxies to CPU {PROXY_CPU}"
        if pinned(UPSTREAM_CPU, [])
        else "no pinning (taskset missing or one CPU)"
    )
    load = f"wrk -t{args.threads}" if have_wrk else "the Python load generator"
    print(
        f"{pinning}; {load} -c{args.connections} -d{args.duration:g}s x {args.rounds} rounds on {args.path}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    names = list(targets)
    for rnd in range(1, args.rounds + 1):
        # Each round starts one target later: on a shared machine the load comes in bursts, and no target should
        # always run right after (or before) the same one.
        shift = (rnd - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            url = targets[name]
            cpu_before = (
                cpu_seconds([upstream.pid]),
                cpu_seconds(proxy_pids[name]),
                cpu_seconds(proxy_pids[name], system_only=True),
            )
            spy = None
            if args.profile and name == "gateway" and rnd == 1:
                spy = start_profile(procs, gateway.pid, args.duration, Path(args.profile), args.native)
            if have_wrk:
                r = run_wrk(url, token, args.duration, args.connections, args.threads)
            else:
                r = _python_load(url, token, args.duration, args.connections)
            done = max(1, r.get("requests") or int(r["rps"] * args.duration))
            r["upstream_us"] = (cpu_seconds([upstream.pid]) - cpu_before[0]) / done * 1e6
            r["proxy_us"] = (cpu_seconds(proxy_pids[name]) - cpu_before[1]) / done * 1e6
            r["proxy_sys_us"] = (cpu_seconds(proxy_pids[name], system_only=True) - cpu_before[2]) / done * 1e6
            results[name].append(r)
            if spy is not None:
                spy.wait(timeout=args.duration + 30)
            print(
                f"  round {rnd} {name:8s} {r['rps']:10.0f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms"
                f"  cpu/request: upstream {r['upstream_us']:5.0f} us, proxy {r['proxy_us']:5.0f} us"
                f" ({r['proxy_sys_us']:3.0f} in the kernel)  non-2xx {r['non2xx']}  socket errors {r['socket_errors']}",
                flush=True,
            )

    if args.profile:
        print_profile(Path(args.profile))
    keys = ("rps", "p50", "p99", "upstream_us", "proxy_us", "proxy_sys_us")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in results.items()}
    print("\nmedians over the rounds:")
    for name, m in med.items():
        print(
            f"  {name:8s} {m['rps']:10.0f} req/s  p50 {m['p50']:7.2f} ms  p99 {m['p99']:7.2f} ms"
            f"  cpu/request: upstream {m['upstream_us']:5.0f} us, proxy {m['proxy_us']:5.0f} us"
            f" ({m['proxy_sys_us']:3.0f} in the kernel)"
        )
    gw, direct = med["gateway"], med["direct"]
    print("\nratios (same run):")
    if "nginx" in med:
        ng = med["nginx"]
        print(f"  authenticated gateway / nginx req/s   {gw['rps'] / ng['rps']:.2f}   (target >= 0.6)")
        print(f"  gateway p99 / nginx p99               {gw['p99'] / ng['p99']:.2f}   (target <= 2)")
        figure("gateway", "authenticated gateway / nginx req/s", gw["rps"] / ng["rps"], "x", ">= 0.6")
        figure("gateway", "gateway p99 / nginx p99", gw["p99"] / ng["p99"], "x", "<= 2")
        figure("gateway", "gateway / nginx CPU per request", gw["proxy_us"] / ng["proxy_us"], "x")
        print(f"  nginx / direct upstream req/s         {ng['rps'] / direct['rps']:.2f}")
        print(f"  gateway cpu / nginx cpu per request   {gw['proxy_us'] / ng['proxy_us']:.2f}")
    print(f"  gateway / direct upstream req/s       {gw['rps'] / direct['rps']:.2f}")
    figure("gateway", "gateway CPU per request", gw["proxy_us"], "us")
    if "naive" in med:
        print(
            f"  gateway / naive aiohttp proxy req/s   {gw['rps'] / med['naive']['rps']:.2f}"
            "   (the naive one checks no token)"
        )
    print(
        f"  gateway cpu / upstream cpu per request {gw['proxy_us'] / direct['upstream_us']:.2f}"
        "   (the upstream is a bare aiohttp JSON handler)"
    )
    if "naive" in med:
        print(f"  naive cpu / upstream cpu per request   {med['naive']['proxy_us'] / direct['upstream_us']:.2f}")
    if "aiohttpgw" in med:
        ah = med["aiohttpgw"]
        print(f"  gateway / gateway on aiohttp's front req/s {gw['rps'] / ah['rps']:.2f}")
        print(f"  gateway cpu / aiohttp-front cpu per request {gw['proxy_us'] / ah['proxy_us']:.2f}")
        if "nginx" in med:
            print(f"  gateway on aiohttp's front / nginx req/s {ah['rps'] / med['nginx']['rps']:.2f}")
    if "baseline" in med:
        bl = med["baseline"]
        print(f"  gateway / baseline gateway req/s      {gw['rps'] / bl['rps']:.2f}   ({args.baseline})")
        print(f"  gateway cpu / baseline cpu per request {gw['proxy_us'] / bl['proxy_us']:.2f}")
        print(f"  gateway p99 / baseline p99            {gw['p99'] / bl['p99']:.2f}")
        if "nginx" in med:
            print(f"  baseline gateway / nginx req/s        {bl['rps'] / med['nginx']['rps']:.2f}")
    if "rawfront" in med:
        rf = med["rawfront"]
        print(
            f"  raw front cpu / gateway cpu per request {rf['proxy_us'] / gw['proxy_us']:.2f}"
            "   (the same hot-path checks without aiohttp's server and middlewares)"
        )
        if "nginx" in med:
            print(f"  raw front / nginx req/s                {rf['rps'] / med['nginx']['rps']:.2f}")
    failures = sum(r["non2xx"] + r["socket_errors"] for rs in results.values() for r in rs)
    if failures:
        print(f"\nwarning: {failures} failed requests (non-2xx or socket errors); the processes' logs end with:")
        for log in sorted(tmp.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-8:]
            print(f"  --- {log.name}", *(f"  {line}" for line in lines), sep="\n")
    return 0


def start_profile(procs: Procs, pid: int, duration: float, out: Path, native: bool) -> subprocess.Popen[bytes] | None:
    """py-spy (``pip install py-spy``) sampling the gateway for one wrk run, collapsed-stack output."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy): no profile")
        return None
    cmd = [spy, "record", "--pid", str(pid), "--duration", f"{max(1, int(duration))}", "--rate", "200"]
    if native:
        cmd.append("--native")  # C frames too (uvloop, the HTTP parsers, system calls)
    return procs.start([*cmd, "--format", "raw", "--output", str(out)], log=out.with_suffix(".log"))


def print_profile(path: Path, top: int = 15) -> None:
    """The profile's top frames by own time (where the CPU is spent) and by total time (what it is spent under)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        print(f"no profile in {path}")
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [re.sub(r" \(.*?/(?=[^/]*:\d+\)$)", " (", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in {f.rsplit(":", 1)[0] for f in frames}:
            total[frame] = total.get(frame, 0) + n
    if not samples:
        print(f"no samples in {path}")
        return
    print(f"\nprofile of the gateway ({samples} samples, {path}); top by own time:")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {n / samples:6.1%}  {frame}")
    print("top by total time (the frame and everything under it):")
    for frame, n in sorted(total.items(), key=lambda kv: -kv[1])[: top + 10]:
        print(f"  {n / samples:6.1%}  {frame}")


def _python_load(url: str, token: str, duration: float, connections: int) -> dict[str, Any]:
    """Fallback without wrk: the storefront load generator's plain GET mode."""
    from bench.storefront import proxy_get

    return asyncio.run(proxy_get(url, token=token, duration=duration, concurrency=connections, quiet=True))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--role-upstream":
        run_upstream(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "--role-raw-front":
        run_raw_front(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif len(sys.argv) == 4 and sys.argv[1] == "--role-naive":
        run_naive_proxy(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
