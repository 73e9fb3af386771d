"""`ecom run --processes`: every service its own process on PostgreSQL + RabbitMQ, one order process killed
mid-saga. Every accepted order still ends `paid` or `cancelled`, none is lost, stock stays consistent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from tests.conftest import PG_HOST, PG_PORT, PG_USER, _pg_admin, require_server

SERVICES = ("identity", "catalog", "cart", "order")
ADDRESS = {"name": "Bob", "street": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}


def _free_base_port() -> int:
    """A base port with room for the service ports and their +10 instances."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 20 < 65000:
            ports = [base + i for i in range(5)] + [base + 10 + i for i in range(5)]
            if all(_port_free(p) for p in ports):
                return base
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture
async def cluster(tmp_path):
    require_server("PostgreSQL", PG_HOST, PG_PORT)
    require_server("RabbitMQ", "127.0.0.1", 5672)
    tag = uuid.uuid4().hex[:8]
    dbs = {name: f"ecom_pp_{name}_{tag}" for name in SERVICES}
    for db in dbs.values():
        await _pg_admin(f'CREATE DATABASE "{db}"')
    base = _free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env.update(
        ECOM_BUS="rabbitmq",
        ECOM_BUS_URL="amqp://guest:guest@127.0.0.1:5672/",
        ECOM_BUS_REDELIVERY_DELAY="0.2",
        ECOM_ADMIN_PASSWORD="correct-horse-battery-staple-9",
        ECOM_DATA_DIR=str(tmp_path / "var"),
        ECOM_ISSUER=f"http://127.0.0.1:{base + 1}",
        ECOM_GATEWAY_RATE_LIMIT="0",
    )
    for i, name in enumerate(("gateway", *SERVICES)):
        env[f"ECOM_{name.upper()}_PORT"] = str(base + i)
    for name, db in dbs.items():
        env[f"ECOM_{name.upper()}_DATABASE_URL"] = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"
    log_path = tmp_path / "processes.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "run", "--processes", "--instances", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gateway = f"http://127.0.0.1:{base}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, log_path.read_text()[-5000:]
                try:
                    async with http.get(f"{gateway}/health/ready") as resp:
                        if resp.status == 200 and all(_port_up(base + i) for i in range(5)) and _port_up(base + 14):
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "cluster not ready in 90 s\n" + log_path.read_text()[-5000:]
                await asyncio.sleep(0.5)
        yield gateway, proc, log_path
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for db in dbs.values():
            await _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _port_up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _order_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "runtime.cli serve order"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def _token(http: aiohttp.ClientSession, gateway: str, email: str) -> str:
    async with http.post(
        f"{gateway}/api/identity/users", json={"email": email, "password": "a-long-passphrase-42", "name": "Bob"}
    ) as resp:
        assert resp.status == 201, await resp.text()
    form = {"grant_type": "password", "client_id": "storefront", "username": email, "password": "a-long-passphrase-42", "scope": "openid ecom"}
    async with http.post(f"{gateway}/connect/token", data=form) as resp:
        return (await resp.json())["access_token"]


async def test_orders_survive_an_order_process_killed_mid_saga(cluster):
    gateway, _proc, log_path = cluster
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway}/api/catalog/products", params={"page_size": "1", "sort": "price"}) as resp:
            product = (await resp.json())["items"][0]
        stock_before = product["available_stock"]
        buyers = [await _token(http, gateway, f"buyer{i}-{uuid.uuid4().hex[:6]}@example.com") for i in range(8)]

        async def buy(token: str) -> str:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.put(f"{gateway}/api/cart/items/{product['id']}", json={"quantity": 1}, headers=headers) as r:
                assert r.status == 200, await r.text()
            body = {"shipping_address": ADDRESS, "payment": {"method": "card", "token": "tok_visa"}}
            async with http.post(f"{gateway}/api/cart/checkout", json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
                return (await r.json())["order_id"]

        first = await asyncio.gather(*(buy(t) for t in buyers[:4]))
        victim = _order_pids()[0]
        os.kill(victim, signal.SIGKILL)  # mid-saga: the first orders are still moving
        second = await asyncio.gather(*(buy(t) for t in buyers[4:]))

        statuses: dict[str, str] = {}
        deadline = time.monotonic() + 90
        for token, order_id in zip(buyers, [*first, *second], strict=True):
            while True:
                async with http.get(f"{gateway}/api/orders/{order_id}", headers={"Authorization": f"Bearer {token}"}) as r:
                    status = (await r.json()).get("status") if r.status == 200 else None
                if status in ("paid", "cancelled"):
                    statuses[order_id] = status
                    break
                assert time.monotonic() < deadline, f"order {order_id} stuck at {status}\n{log_path.read_text()[-4000:]}"
                await asyncio.sleep(0.3)
        async with http.get(f"{gateway}/api/catalog/products/{product['id']}") as resp:
            stock_after = (await resp.json())["available_stock"]
    paid = sum(1 for s in statuses.values() if s == "paid")
    assert len(statuses) == 8, "every accepted order reached an end state"
    assert paid >= 1
    assert stock_after == stock_before - paid, "stock moved exactly by the paid orders: none charged twice, none lost"
