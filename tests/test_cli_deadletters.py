"""``ecom bus dead-letters`` as a user runs it (a real ``ecom`` process each time).

RabbitMQ: the command talks to the broker and the service's database itself (own vhost, dropped after).
In-memory bus: the command calls the running ``ecom serve`` process's admin API.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import select

from bus import Envelope
from bus.rabbitmq import RabbitBus
from runtime import audit
from runtime.outbox import REPLAY, OutboxRelay
from runtime.store import create_engine, outbox
from tests.bus_contract import Log, bounded, eventually
from tests.conftest import require_server
from tests.support.cluster import RABBIT_HOST, RABBIT_PORT, free_base_port, rabbitmqctl


def ecom(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bus", "dead-letters", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOM_")}
    env["ECOM_DATA_DIR"] = str(tmp_path / "var")
    env["ECOM_LOG_LEVEL"] = "WARNING"
    return env


# -- RabbitMQ: straight to the broker and the database ---------------------------------------------------


@pytest.fixture
async def rabbit_env(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    require_server("RabbitMQ", RABBIT_HOST, RABBIT_PORT)
    vhost = f"ecom-dlq-{uuid.uuid4().hex[:10]}"
    try:
        await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    except (OSError, RuntimeError) as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"cannot make a RabbitMQ vhost with rabbitmqctl: {exc}")
    await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = base_env(tmp_path)
    env["ECOM_BUS"] = "rabbitmq"
    env["ECOM_BUS_URL"] = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{quote(vhost, safe='')}"
    env["ECOM_BUS_MAX_ATTEMPTS"] = "2"
    try:
        yield env
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


async def test_cli_on_rabbitmq_lists_shows_discards_and_replays_through_the_outbox(
    rabbit_env: dict[str, str], tmp_path: Path
) -> None:
    # What a running order service would do: consume its queue, and fail on two messages.
    bus = RabbitBus(rabbit_env["ECOM_BUS_URL"], max_attempts=2, redelivery_delay=0.01, timeout=10)
    await bounded(bus.start())
    healed: set[str] = set()
    seen = Log()

    async def handler(env: Envelope) -> None:
        await seen.add(env.message_id)
        if env.body.get("poison") and env.message_id not in healed:
            raise ValueError("cannot handle this yet")

    try:
        consumer = await bus.consume("order", handler)
        doomed = Envelope(type="Poison", session_id="o1", body={"poison": True, "n": 1})
        wanted = Envelope(type="Poison", session_id="o2", body={"poison": True, "n": 2})
        for env in (doomed, wanted):
            await bus.send("order", env)
        await eventually(lambda: _at_least(bus, 2))

        listed = await asyncio.to_thread(ecom, rabbit_env, "list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "QUEUE", "KIND", "DEAD", "LETTERS"]
        assert ["order", "order", "queue", "2"] in [line.split() for line in lines]

        one = await asyncio.to_thread(ecom, rabbit_env, "list", "--service", "order", "--json")
        assert one.returncode == 0, one.stderr
        page = json.loads(one.stdout)
        assert page["total"] == 2
        assert {x["message_id"] for x in page["items"]} == {doomed.message_id, wanted.message_id}

        shown = await asyncio.to_thread(ecom, rabbit_env, "show", "--service", "order", wanted.message_id, "--json")
        assert shown.returncode == 0, shown.stderr
        letter = json.loads(shown.stdout)
        assert letter["body"] == {"poison": True, "n": 2} and "cannot handle this yet" in letter["reason"]

        missing = await asyncio.to_thread(ecom, rabbit_env, "show", "--service", "order", "no-such-id")
        assert missing.returncode == 1 and "no dead letter with message id 'no-such-id'" in missing.stderr
        assert "Traceback" not in missing.stderr

        discarded = await asyncio.to_thread(ecom, rabbit_env, "discard", "--service", "order", doomed.message_id)
        assert discarded.returncode == 0, discarded.stderr
        assert f"discarded {doomed.message_id} from queue order" in discarded.stdout

        healed.add(wanted.message_id)
        replayed = await asyncio.to_thread(ecom, rabbit_env, "replay", "--service", "order", wanted.message_id)
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed {wanted.message_id} to queue order through the outbox" in replayed.stdout
        assert [x.envelope.message_id for x in await bus.dead_letters("order")] == []

        # The replay waits in the order database's outbox, for the service's relay to send.
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'var' / 'order.db'}")
        try:
            async with engine.connect() as conn:
                rows = list(await conn.execute(select(outbox).where(outbox.c.sent_at.is_(None))))
            assert [(r.kind, r.destination, r.message_id) for r in rows] == [(REPLAY, "queue:order", wanted.message_id)]
            before = len(seen.items)
            assert await OutboxRelay(engine, bus).relay_once() == 1
            await seen.wait_for(lambda items: wanted.message_id in items[before:])
            assert doomed.message_id not in seen.items[before:]
            entries = await audit.entries(engine)
        finally:
            await engine.dispose()
        who = f"cli:{getpass.getuser()}"
        assert [(e["action"], e["actor"], e["via"]) for e in entries] == [
            ("dead-letter.replay", who, "cli"),
            ("dead-letter.discard", who, "cli"),
        ]
        assert entries[1]["target"] == f"queue:order/{doomed.message_id}"
        await consumer.stop()
    finally:
        await bounded(bus.close())


async def _at_least(bus: RabbitBus, count: int) -> bool:
    return len(await bus.dead_letters("order")) >= count


def test_cli_refuses_bad_arguments_with_one_line(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    no_service = ecom(env, "show", "some-id")
    assert no_service.returncode == 1 and "--service is needed" in no_service.stderr
    wrong = ecom(env, "list", "--service", "identity")
    assert wrong.returncode == 1 and "consumes no bus queue" in wrong.stderr
    no_token = ecom(env, "list")
    assert no_token.returncode == 1 and "ECOM_ADMIN_TOKEN" in no_token.stderr
    for result in (no_service, wrong, no_token):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- in-memory bus: the running process's admin API ------------------------------------------------------


def test_cli_on_the_memory_bus_asks_the_running_process(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    port = free_base_port(1)
    env["ECOM_ORDER_PORT"] = str(port)
    env["ECOM_ADMIN_OPEN"] = "true"  # no identity service in this test to sign an admin token
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "order"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/health/live", proc, log_path)
            cli_env = {**env, "ECOM_ADMIN_TOKEN": "not-checked-while-admin-is-open"}
            listed = ecom(cli_env, "list", "--service", "order", "--json")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout) == {"items": [], "page": 1, "page_size": 100, "total": 0}
            summary = ecom(cli_env, "list")
            assert summary.returncode == 1 and "cannot reach its admin API" in summary.stderr  # catalog: not running
            missing = ecom(cli_env, "replay", "--service", "order", "no-such-id")
            assert missing.returncode == 1
            assert "404" in missing.stderr and "no dead letter with message id 'no-such-id'" in missing.stderr
            piped = ecom({**env}, "show", "--service", "order", "nope", "--token-stdin", stdin="a-token\n")
            assert piped.returncode == 1 and "404" in piped.stderr
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_ready(url: str, proc: subprocess.Popen[Any], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in 60 s: {log_path.read_text()[-3000:]}")
