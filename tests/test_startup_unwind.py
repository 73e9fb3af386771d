"""Startup unwinds: each part of a ServiceRuntime is its own cleanup context, so when one fails to start
(here a service's on_start hook, or a resource its description declares) everything started before it stops,
and a normal start/stop leaves no background task behind."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from actors.cart import service as cart_service
from actors.cart.admission import Admission
from bus.memory import MemoryBus
from config import load_settings
from contracts import queues
from runtime import migrate
from runtime.description import Http, Queue, Resource, ServiceDescription, ToActor
from runtime.host import AppKeyRuntime, ServiceRuntime, create_app, service_app
from runtime.store import create_engine
from tests.test_service_description import Greet, GreeterActor


class StartFailed(RuntimeError):
    pass


def _runtime_task_names(runtime: ServiceRuntime) -> set[str]:
    """The names of the background tasks the runtime's parts start."""
    name = runtime.system.name if runtime.system is not None else runtime.name
    return {f"{name}-idle-sweeper", f"{name}-reminders", f"{name}-inbox-purge", "outbox-relay", "cluster-heartbeat"}


def _running_runtime_tasks(runtime: ServiceRuntime) -> list[str]:
    names = _runtime_task_names(runtime)
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name() in names and not t.done())


@pytest.fixture
def disposed(monkeypatch: pytest.MonkeyPatch) -> list[AsyncEngine]:
    """Every engine disposed during the test."""
    seen: list[AsyncEngine] = []
    original = AsyncEngine.dispose

    async def dispose(self: AsyncEngine, close: bool = True) -> None:
        seen.append(self)
        await original(self, close)

    monkeypatch.setattr(AsyncEngine, "dispose", dispose)
    return seen


async def _runtime(tmp_path: Any, events: list[str]) -> ServiceRuntime:
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    runtime = ServiceRuntime.with_database("unwind", settings, bus=MemoryBus(), owns_bus=True)
    assert runtime.engine is not None and runtime.relay is not None and runtime.system is not None
    await migrate.upgrade(runtime.engine, [migrate.RUNTIME])

    async def first_hook() -> None:
        events.append("first hook started")

    async def on_stop() -> None:
        events.append("stop hook ran")

    runtime.on_start.append(first_hook)
    runtime.on_stop.append(on_stop)
    return runtime


def _fail_on_start(runtime: ServiceRuntime, events: list[str]) -> None:
    async def failing_hook() -> None:
        # Everything before the hooks runs by now: the actors' loops, the relay, the revocation listener.
        events.append("running before the failure: " + ",".join(_running_runtime_tasks(runtime)))
        assert runtime._revocations is not None
        raise StartFailed("the service cannot start")

    runtime.on_start.append(failing_hook)


async def test_a_failing_start_hook_fails_startup_and_stops_everything_started_before_it(tmp_path, disposed) -> None:
    events: list[str] = []
    runtime = await _runtime(tmp_path, events)
    _fail_on_start(runtime, events)
    relay = runtime.relay
    runner = web.AppRunner(create_app(runtime), handle_signals=False)

    with pytest.raises(StartFailed, match="cannot start"):
        await runner.setup()
    # What web.run_app does after a failed setup: the runner's cleanup stops what did start.
    await runner.cleanup()

    assert events[0] == "first hook started"
    assert (
        events[1] == "running before the failure: outbox-relay,unwind-idle-sweeper,unwind-inbox-purge,unwind-reminders"
    )
    assert events[2:] == ["stop hook ran"]
    assert _running_runtime_tasks(runtime) == []
    assert relay._task is None  # the relay was stopped
    assert runtime._revocations is None  # the revocation listener too
    assert runtime.engine in disposed
    assert runtime.bus._closed


async def test_service_runtime_start_unwinds_by_itself(tmp_path, disposed) -> None:
    """Outside aiohttp, ServiceRuntime.start() stops what it started before raising."""
    events: list[str] = []
    runtime = await _runtime(tmp_path, events)
    _fail_on_start(runtime, events)

    with pytest.raises(StartFailed):
        await runtime.start()

    assert events[-1] == "stop hook ran"
    assert _running_runtime_tasks(runtime) == []
    assert runtime.relay._task is None
    assert runtime.engine in disposed
    await runtime.stop()  # nothing left to stop: harmless


async def test_a_normal_start_and_stop_leaves_no_task_behind(tmp_path, disposed) -> None:
    events: list[str] = []
    runtime = await _runtime(tmp_path, events)
    before = asyncio.all_tasks()
    runner = web.AppRunner(create_app(runtime), handle_signals=False)

    await runner.setup()
    assert _running_runtime_tasks(runtime) == sorted(_runtime_task_names(runtime) - {"cluster-heartbeat"})
    assert set(runtime.ready_checks) >= {"database", "bus"}
    await runner.cleanup()

    assert events == ["first hook started", "stop hook ran"]
    assert _running_runtime_tasks(runtime) == []
    await asyncio.sleep(0)
    leftover = [t.get_name() for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    assert leftover == []
    assert runtime.relay._task is None
    assert runtime.engine in disposed


async def test_parts_stop_in_reverse_dependency_order(tmp_path) -> None:
    """Hooks, then the revocation listener, the relay, the actors, the bus, the verifier, the engine."""
    runtime = await _runtime(tmp_path, [])
    order: list[str] = []

    def spy(obj: Any, method: str, label: str) -> None:
        original = getattr(obj, method)

        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            order.append(label)
            return await original(*args, **kwargs)

        setattr(obj, method, wrapped)

    spy(runtime.relay, "stop", "relay")
    spy(runtime.system, "stop", "actors")
    spy(runtime.bus, "close", "bus")
    spy(runtime.verifier, "close", "verifier")

    async def hook_stop() -> None:
        order.append("hooks")

    runtime.on_stop.append(hook_stop)
    runner = web.AppRunner(create_app(runtime), handle_signals=False)
    await runner.setup()
    await runner.cleanup()
    assert order == ["hooks", "relay", "actors", "bus", "verifier"]


# ---------------------------------------------------------------------------------------------------
# Declared resources and consumers (runtime.description) are cleanup contexts: a failed start unwinds fully


class Part:
    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name, self.events, self.fail = name, events, fail

    async def start(self) -> None:
        self.events.append(f"{self.name} started")
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")

    async def stop(self) -> None:
        self.events.append(f"{self.name} stopped")


A: web.AppKey[Part] = web.AppKey("a", Part)
B: web.AppKey[Part] = web.AppKey("b", Part)
C: web.AppKey[Part] = web.AppKey("c", Part)


def _described(events: list[str], *, b_fails: bool) -> ServiceDescription:
    return ServiceDescription(
        "unwind",
        http=Http(()),
        actors=(),
        resources=(
            Resource(A, lambda ctx: Part("a", events), start=Part.start, stop=Part.stop),
            Resource(B, lambda ctx: Part("b", events, fail=b_fails), start=Part.start, stop=Part.stop),
            Resource(C, lambda ctx: Part("c", events), start=Part.start, stop=Part.stop),
        ),
        consumes=(Queue("unwind", (ToActor(Greet, GreeterActor),)),),
    )


class CountingBus(MemoryBus):
    def __init__(self) -> None:
        super().__init__()
        self.consumers: list[Any] = []
        self.subscribed: list[str] = []

    async def subscribe(self, subscription: str, event_types: Any, handler: Any, **kwargs: Any) -> Any:
        self.subscribed.append(subscription)
        return await super().subscribe(subscription, event_types, handler, **kwargs)

    async def consume(self, queue: str, handler: Any, **kwargs: Any) -> Any:
        consumer = await super().consume(queue, handler, **kwargs)
        self.consumers.append(consumer)
        return consumer


async def _migrate(url: str, schema: migrate.Component | None = None) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine, [migrate.RUNTIME, *([schema] if schema else [])])
    finally:
        await engine.dispose()


async def test_a_resource_that_fails_to_start_unwinds_everything_started_before_it(
    tmp_path: Any, disposed: list[AsyncEngine]
) -> None:
    events: list[str] = []
    url = f"sqlite+aiosqlite:///{tmp_path / 'unwind.db'}"
    await _migrate(url)
    bus = CountingBus()
    await bus.start()
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    app = service_app(_described(events, b_fails=True), settings, bus=bus, database_url=url)
    runtime = app[AppKeyRuntime]
    assert [name for name, _ in runtime.cleanup_contexts()][-6:] == [
        "revocations",
        "a",
        "b",
        "c",
        "consumer unwind",
        "service hooks",
    ]
    engine = runtime.engine
    runner = web.AppRunner(app, handle_signals=False)
    with pytest.raises(RuntimeError, match="b cannot start"):
        await runner.setup()
    await runner.cleanup()
    # b's stop runs for its half-made start; c and the consumer never started; a stops last
    assert events == ["a started", "b started", "b stopped", "a stopped"]
    assert bus.consumers == []
    assert runtime._revocations is None and runtime.relay._task is None
    assert engine in disposed
    await bus.close()


async def test_a_normal_start_and_stop_runs_the_parts_in_order_and_back(tmp_path: Any) -> None:
    events: list[str] = []
    url = f"sqlite+aiosqlite:///{tmp_path / 'unwind.db'}"
    await _migrate(url)
    bus = CountingBus()
    await bus.start()
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    app = service_app(_described(events, b_fails=False), settings, bus=bus, database_url=url)
    assert app[A].name == "a"  # each resource is in the app under its key
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert events == ["a started", "b started", "c started"] and len(bus.consumers) == 1
    await runner.cleanup()
    assert events[3:] == ["c stopped", "b stopped", "a stopped"]
    await bus.close()


async def test_the_cart_service_unwinds_its_catalog_client_when_admission_fails(
    tmp_path: Any, test_identity: Any
) -> None:
    """A real service: its admission control fails to start (fault injected), so the catalog client started before
    it is closed again and the startup fails."""

    async def refuse(_admission: Admission) -> None:
        raise RuntimeError("admission cannot start")

    # the cart's own description, with its admission control's start replaced by one that fails
    resources = tuple(
        dataclasses.replace(r, start=refuse) if r.key is cart_service.ADMISSION else r
        for r in cart_service.SERVICE.resources
    )
    described = dataclasses.replace(cart_service.SERVICE, resources=resources)
    url = f"sqlite+aiosqlite:///{tmp_path / 'cart.db'}"
    await _migrate(url, cart_service.SCHEMA)
    settings = load_settings({"ECOM_DATA_DIR": str(tmp_path)})
    bus = CountingBus()
    await bus.start()
    app = service_app(
        described,
        settings,
        bus=bus,
        database_url=url,
        verifier=test_identity.verifier(),
        catalog_url="http://127.0.0.1:9",
    )
    catalog = app[cart_service.CATALOG]
    runner = web.AppRunner(app, handle_signals=False)
    with pytest.raises(RuntimeError, match="admission cannot start"):
        await runner.setup()
    await runner.cleanup()
    assert catalog._session is None  # started, then closed by the unwind
    assert app[AppKeyRuntime].system._background == []
    assert queues.CART_SUBSCRIPTION not in bus.subscribed  # the subscription never started
    await bus.close()
