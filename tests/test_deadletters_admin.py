"""Dead letters through the admin API on the in-memory bus: list, show, replay (through the outbox, same message
id, deduplicated by the consumer's inbox) and discard, admin role only, each change in the audit log.

A service named ``order`` (so its queue is ``order``) with a real actor behind a real BusBinding, over real HTTP,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from bus import Envelope, MemoryBus
from config import load_settings
from runtime import audit, migrate
from runtime.actors import Actor, Turn, handles
from runtime.deadletters import DeadLetterAdmin, Operator
from runtime.errors import Conflict
from runtime.host import ServiceRuntime, create_app
from runtime.messages import BusBinding
from runtime.outbox import REPLAY
from runtime.store import actor_state, create_engine, outbox
from tests.bus_contract import Log

BASE = "/api/order/admin/dead-letters"


@dataclass(frozen=True)
class Bump:
    amount: int


class TallyActor(Actor):
    type_name = "tally"
    broken = True  # a Bump of 13 fails while this is set (a bug, fixed by the time the operator replays)

    def initial_state(self) -> dict[str, Any]:
        return {"total": 0}

    @handles(Bump)
    def bump(self, msg: Bump, turn: Turn) -> None:
        if msg.amount == 13 and TallyActor.broken:
            raise ValueError("13 is not handled yet")
        self.state["total"] += msg.amount


@pytest.fixture
async def make_service(aiohttp_client: Any, db_url: str, tmp_path: Any, test_identity: Any) -> Any:
    """A service ``name`` whose TallyActor takes Bumps from the ``order`` queue or the ``cart`` subscription."""

    async def make(name: str, bus: MemoryBus | None = None) -> Any:
        TallyActor.broken = True
        settings = load_settings({"ECOM_DATA_DIR": str(tmp_path), "ECOM_BUS_OUTBOX_POLL_INTERVAL": "30"})
        bus = bus or MemoryBus(max_attempts=2)
        runtime = ServiceRuntime.with_database(
            name, settings, bus=bus, owns_bus=True, database_url=db_url, verifier=test_identity.verifier()
        )
        await migrate.upgrade(runtime.engine, [migrate.RUNTIME])
        runtime.system.register(TallyActor)
        binding = BusBinding(runtime.system)
        binding.to_actor(Bump, TallyActor)

        async def consume() -> None:
            if name == "cart":
                await bus.subscribe("cart", ["Bump"], binding)
            else:
                await bus.consume(name, binding)

        runtime.on_start.append(consume)
        client = await aiohttp_client(create_app(runtime))
        client.bus, client.runtime = bus, runtime
        client.admin = test_identity.headers(test_identity.admin_token("admin-7"))
        return client

    return make


@pytest.fixture
async def service(make_service: Any) -> Any:
    return await make_service("order")


def bump(session: str, amount: int) -> Envelope:
    return Envelope(type="Bump", session_id=session, body={"amount": amount})


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.02)
    return result


async def total(client: Any, tally: str) -> int:
    """The committed total (read from the database on a connection of its own)."""
    async with client.runtime.engine.connect() as conn:
        row = (
            await conn.execute(
                select(actor_state.c.state).where(actor_state.c.actor_type == "tally", actor_state.c.actor_id == tally)
            )
        ).first()
    return int(orjson.loads(row.state)["total"]) if row else 0


async def test_dead_letters_need_the_admin_role(service: Any, test_identity: Any) -> None:
    assert (await service.get(BASE)).status == 401
    customer = test_identity.headers(test_identity.token("u1"))
    for method, path in (("GET", BASE), ("GET", f"{BASE}/order"), ("POST", f"{BASE}/order/x/replay"),
                         ("DELETE", f"{BASE}/order/x")):  # fmt: skip
        resp = await service.request(method, path, headers=customer)
        assert resp.status == 403 and resp.content_type == "application/problem+json", (method, path)
    resp = await service.get(BASE, headers=service.admin)
    assert resp.status == 200
    assert await resp.json() == {
        "service": "order",
        "bus": "memory",
        "queues": [{"queue": "order", "kind": "queue", "count": 0}],
        "total": 0,
    }


async def test_replay_goes_through_the_outbox_keeps_the_id_and_is_audited(service: Any, db_url: str) -> None:
    poison, fine = bump("t1", 13), bump("t1", 1)
    await service.bus.send("order", poison)
    await service.bus.send("order", fine)
    await until(lambda: _count(service, 1))
    await until(lambda: _total_is(service, "t1", 1))  # the session went on past the dead letter

    listing = await (await service.get(f"{BASE}/order", headers=service.admin)).json()
    assert listing["total"] == 1 and listing["page"] == 1
    assert [x["message_id"] for x in listing["items"]] == [poison.message_id]
    one = await (await service.get(f"{BASE}/order/{poison.message_id}", headers=service.admin)).json()
    assert one["body"] == {"amount": 13} and one["type"] == "Bump" and one["session_id"] == "t1"
    assert one["attempts"] == 2 and "13 is not handled yet" in one["reason"] and one["kind"] == "queue"

    for path in (f"{BASE}/order/no-such-id", f"{BASE}/catalog", f"{BASE}/order/no-such-id/replay"):
        method = "POST" if path.endswith("replay") else "GET"
        resp = await service.request(method, path, headers=service.admin)
        assert resp.status == 404 and resp.content_type == "application/problem+json", path
        assert (await resp.json())["detail"]

    TallyActor.broken = False  # the bug is fixed; now replay
    resp = await service.post(f"{BASE}/order/{poison.message_id}/replay", headers=service.admin)
    assert resp.status == 202
    result = await resp.json()
    assert result["status"] == "replayed" and result["message_id"] == poison.message_id
    assert result["dead_letter_removed"] is True
    await until(lambda: _total_is(service, "t1", 14))
    assert (await (await service.get(BASE, headers=service.admin)).json())["total"] == 0

    async with service.runtime.engine.connect() as conn:
        row = (await conn.execute(select(outbox).where(outbox.c.id == result["outbox_id"]))).one()
    assert (row.kind, row.destination, row.message_id) == (REPLAY, "queue:order", poison.message_id)
    assert Envelope.decode(row.envelope).message_id == poison.message_id

    # The same message id once more (a relay re-send, a second replay): the actor's inbox drops it.
    await service.bus.redeliver("queue", "order", poison)
    await service.bus.wait_idle(10)
    assert await total(service, "t1") == 14

    # Recorded, and the record outlives the process: read back with a new engine.
    await service.close()
    engine = create_engine(db_url)
    try:
        entries = await audit.entries(engine)
    finally:
        await engine.dispose()
    assert [(e["action"], e["actor"], e["via"], e["target"]) for e in entries] == [
        ("dead-letter.replay", "admin-7", "api", f"queue:order/{poison.message_id}")
    ]
    assert entries[0]["details"]["reason"] == one["reason"] and entries[0]["at"].endswith("Z")


async def test_discard_removes_it_and_is_audited(service: Any) -> None:
    first, second = bump("t2", 13), bump("t3", 13)
    await service.bus.send("order", first)
    await service.bus.send("order", second)
    await until(lambda: _count(service, 2))

    resp = await service.delete(f"{BASE}/order/{first.message_id}", headers=service.admin)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "discarded" and body["message_id"] == first.message_id and body["body"] == {"amount": 13}
    listing = await (await service.get(f"{BASE}/order", headers=service.admin)).json()
    assert [x["message_id"] for x in listing["items"]] == [second.message_id]
    again = await service.delete(f"{BASE}/order/{first.message_id}", headers=service.admin)
    assert again.status == 404 and again.content_type == "application/problem+json"

    resp = await service.get("/api/order/admin/audit", headers=service.admin)
    assert resp.status == 200
    entries = (await resp.json())["items"]
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("dead-letter.discard", "admin-7", f"queue:order/{first.message_id}")
    ]
    assert entries == await audit.entries(service.runtime.engine)
    assert (await service.get("/api/order/admin/audit")).status == 401
    bad = await service.get("/api/order/admin/audit?limit=0", headers=service.admin)
    assert bad.status == 422 and (await bad.json())["errors"][0]["field"] == "limit"
    assert await total(service, "t2") == 0  # never applied


async def test_replaying_what_is_still_waiting_in_the_outbox_is_a_conflict(service: Any) -> None:
    poison = bump("t4", 13)
    await service.bus.send("order", poison)
    await until(lambda: _count(service, 1))
    relay = service.runtime.relay
    await relay.stop()  # nothing leaves the outbox now
    admin = DeadLetterAdmin("order", service.runtime.engine, service.bus)
    operator = Operator("tester", "api")
    # Replayed once: its row waits in the outbox; but the dead letter is back (say a second copy).
    letter = await admin.show("order", poison.message_id)
    await admin.replay("order", poison.message_id, operator)
    service.bus._queues["order"].dead.append(letter)
    with pytest.raises(Conflict, match="already waiting in the outbox"):
        await admin.replay("order", poison.message_id, operator)
    assert [e["action"] for e in await audit.entries(service.runtime.engine)] == ["dead-letter.replay"]


async def _count(client: Any, count: int) -> bool:
    return len(await client.bus.dead_letters("order")) >= count


async def _total_is(client: Any, tally: str, value: int) -> bool:
    return await total(client, tally) == value


async def test_a_subscription_dead_letter_is_replayed_to_that_subscription_only(make_service: Any) -> None:
    cart = await make_service("cart")
    others = Log()
    await cart.bus.subscribe("audit-trail", ["Bump"], lambda env: others.add(env.message_id))  # another subscriber
    poison = bump("c1", 13)
    await cart.bus.publish(poison)
    await until(lambda: _dead_in(cart, "cart", 1))
    summary = await (await cart.get("/api/cart/admin/dead-letters", headers=cart.admin)).json()
    assert summary["queues"] == [{"queue": "cart", "kind": "subscription", "count": 1}]

    TallyActor.broken = False
    resp = await cart.post(f"/api/cart/admin/dead-letters/cart/{poison.message_id}/replay", headers=cart.admin)
    assert resp.status == 202 and (await resp.json())["kind"] == "subscription"
    await until(lambda: _total_is(cart, "c1", 13))
    marker = bump("c2", 1)
    await cart.bus.publish(marker)
    await others.wait_for(lambda items: marker.message_id in items)
    assert others.items == [poison.message_id, marker.message_id]  # the replay went to the cart alone
    async with cart.runtime.engine.connect() as conn:
        row = (await conn.execute(select(outbox).where(outbox.c.message_id == poison.message_id))).one()
    assert (row.kind, row.destination, row.sent_at is not None) == (REPLAY, "subscription:cart", True)


async def _dead_in(client: Any, queue: str, count: int) -> bool:
    return len(await client.bus.dead_letters(queue)) >= count
