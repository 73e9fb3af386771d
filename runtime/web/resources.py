"""What a service runs on, and how it starts and stops.

:class:`ServiceRuntime` holds the parts (engine, state store, actor system, bus, outbox relay, token
verifier, cluster membership) and the service's hooks. :meth:`ServiceRuntime.cleanup_contexts` gives one
async context per resource, in dependency order:

    engine -> verifier -> bus -> cluster membership -> actor system -> outbox relay -> cluster leave
    -> revocation listener -> the service's declared resources, then its bus consumers -> service hooks

:func:`runtime.host.create_app` appends each to ``app.cleanup_ctx``, so aiohttp starts them in that order
and stops them in reverse; when one fails to start (a service's ``on_start`` hook raising, say), the ones
before it are stopped by the runner's cleanup (``web.run_app`` and the test client do it) and the failure
propagates from startup. :meth:`ServiceRuntime.start` / :meth:`ServiceRuntime.stop` run the same contexts
outside aiohttp, unwinding by themselves when a start fails.

The "cluster leave" context starts nothing: on the way down it leaves the cluster before the relay and the
actor system stop, so peers take this member's entities over at once (the membership context then has
nothing left to do).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from config import Settings
from runtime import store as store_module
from runtime.actors import ActorSystem

__all__ = ["AppKeyRuntime", "ServiceRuntime", "make_verifier"]

log = logging.getLogger("runtime.host")

ResourceContext = Callable[[], AbstractAsyncContextManager[None]]

AppKeyRuntime: web.AppKey[ServiceRuntime] = web.AppKey("ecom_runtime")


@dataclass
class ServiceRuntime:
    """The parts one service runs on. Built by each service's ``service.py`` and started with the app."""

    name: str
    settings: Settings
    engine: AsyncEngine | None = None
    store: store_module.StateStore | None = None
    system: ActorSystem | None = None
    bus: Any = None  # bus.base.Bus
    relay: Any = None  # runtime.outbox.OutboxRelay
    verifier: Any = None  # runtime.auth.TokenVerifier
    cluster: Any = None  # runtime.cluster.Cluster, when several instances may share the database
    ready_checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The service's own parts (runtime.description: its resources, then its consumers), each its own context.
    contexts: list[tuple[str, ResourceContext]] = field(default_factory=list)
    description: Any = None  # runtime.description.ServiceDescription, when built from one
    bus_readiness: bool = True  # False: the bus is not one of the ready checks (the gateway's bus is optional)
    owns_bus: bool = False  # embedded mode shares one bus between services: only its owner closes it
    _revocations: Any = None  # the consumer of identity's revocation announcements
    _left_cluster: bool = False  # the cluster was left early on the way down
    _stack: AsyncExitStack | None = field(default=None, repr=False)  # start()/stop() outside aiohttp

    @classmethod
    def with_database(
        cls,
        name: str,
        settings: Settings,
        *,
        bus: Any = None,
        database_url: str | None = None,
        owns_bus: bool = False,
        verifier: Any = None,
    ) -> ServiceRuntime:
        """A runtime with the service's database, an actor system on it, a token verifier for the identity
        service of ``settings`` (unless one is given) and, if given, the bus with an outbox relay."""
        engine = store_module.create_engine(database_url or settings.database_url(name))
        st = store_module.StateStore(
            engine, group_commit=settings.actors.group_commit, max_batch=settings.actors.max_batch
        )
        relay = None
        if bus is not None:
            from runtime.outbox import OutboxRelay

            relay = OutboxRelay(engine, bus, poll_interval=settings.bus.outbox_poll_interval)
        system = ActorSystem.from_settings(
            st,
            settings,
            name=name,
            on_outbox=relay.notify if relay else None,
            # Only a cluster has other writers; one process on the in-memory bus is the only one.
            exclusive=not settings.cluster.active(settings.bus.backend),
        )
        cluster = None
        if settings.cluster.active(settings.bus.backend):
            from runtime.cluster import Cluster

            c = settings.cluster
            cluster = Cluster(
                engine,
                c.advertise_url or settings.base_url(name),
                heartbeat_interval=c.heartbeat_interval,
                member_timeout=c.member_timeout,
                on_change=system.rebalance,
                on_evicted=system.drop_all,
            )
            system.placement = cluster
        return cls(
            name=name,
            settings=settings,
            engine=engine,
            store=st,
            system=system,
            bus=bus,
            relay=relay,
            owns_bus=owns_bus,
            verifier=verifier if verifier is not None else make_verifier(settings),
            cluster=cluster,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def cleanup_contexts(self) -> list[tuple[str, ResourceContext]]:
        """One async context per resource, in start order (named, for logs and tests). Each looks at the
        runtime when entered, so parts set after the app was made are started too; an absent part's
        context does nothing."""
        return [
            ("engine", self._engine_context),
            ("verifier", self._verifier_context),
            ("bus", self._bus_context),
            ("cluster", self._membership_context),
            ("actors", self._actors_context),
            ("outbox relay", self._relay_context),
            ("cluster leave", self._leave_first_context),
            ("revocations", self._revocations_context),
            *self.contexts,
            ("service hooks", self._hooks_context),
        ]

    async def start(self) -> None:
        """Start every part (outside aiohttp); if one fails, the ones started before it are stopped and
        the failure propagates."""
        stack = AsyncExitStack()
        try:
            for _name, context in self.cleanup_contexts():
                await stack.enter_async_context(context())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    @asynccontextmanager
    async def _engine_context(self) -> AsyncIterator[None]:
        engine = self.engine
        if engine is None:
            yield
            return
        self.ready_checks.setdefault("database", lambda: store_module.ping(engine))
        try:
            yield
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def _verifier_context(self) -> AsyncIterator[None]:
        verifier = self.verifier  # nothing to start: its key set is fetched on first use
        try:
            yield
        finally:
            if verifier is not None:
                await verifier.close()

    @asynccontextmanager
    async def _bus_context(self) -> AsyncIterator[None]:
        bus = self.bus
        if bus is None:
            yield
            return
        if self.bus_readiness:
            self.ready_checks.setdefault("bus", bus.ping)
        owned = self.owns_bus  # embedded mode shares one bus: only its owner starts and closes it
        if owned:
            await bus.start()
        try:
            yield
        finally:
            if owned:
                await bus.close()

    @asynccontextmanager
    async def _membership_context(self) -> AsyncIterator[None]:
        cluster = self.cluster
        if cluster is None:
            yield
            return
        self._left_cluster = False
        try:
            await cluster.start()  # joined before the first turn, so placement is known from the start
        except BaseException:
            await cluster.stop()  # a half-made join is recorded as left
            raise
        try:
            yield
        finally:
            if not self._left_cluster:
                self._left_cluster = True
                await cluster.stop()

    @asynccontextmanager
    async def _actors_context(self) -> AsyncIterator[None]:
        system = self.system  # its idle sweeper, reminder poller and inbox purge
        if system is None:
            yield
            return
        await system.start()
        try:
            yield
        finally:
            await system.stop()

    @asynccontextmanager
    async def _relay_context(self) -> AsyncIterator[None]:
        relay = self.relay
        if relay is None:
            yield
            return
        relay.start()
        try:
            yield
        finally:
            await relay.stop()

    @asynccontextmanager
    async def _leave_first_context(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Leave before the relay and the actors stop: peers take this member's entities over at once.
            if self.cluster is not None and not self._left_cluster:
                self._left_cluster = True
                await self.cluster.stop()

    @asynccontextmanager
    async def _revocations_context(self) -> AsyncIterator[None]:
        if self.bus is None or self.verifier is None:
            yield
            return
        from runtime import revocation

        # Every process hears identity's revocations, so a revoked key or signed-out user stops here too.
        self._revocations = await revocation.listen(self.bus, self.verifier)
        try:
            yield
        finally:
            consumer, self._revocations = self._revocations, None
            if consumer is not None:
                await consumer.stop()

    @asynccontextmanager
    async def _hooks_context(self) -> AsyncIterator[None]:
        """The service's ``on_start`` hooks in order; its ``on_stop`` hooks in reverse on the way down,
        also when an ``on_start`` hook fails (the two lists are not paired: every stop hook runs, and
        each must cope with a start that did not happen)."""
        try:
            for hook in list(self.on_start):
                await hook()
            yield
        finally:
            for hook in reversed(list(self.on_stop)):
                try:
                    await hook()
                except Exception:
                    log.exception("%s: stop hook failed", self.name)


def make_verifier(settings: Settings) -> Any:
    """The token verifier for tokens of the configured identity service (JWKS fetched on first use)."""
    from runtime.auth import TokenVerifier

    return TokenVerifier(
        issuer=settings.issuer,
        jwks_url=settings.jwks_url,  # identity directly, not through the public URL (Settings.jwks_url)
        audience=settings.general.audience,
        leeway=settings.auth.leeway,
        refetch_interval=settings.auth.jwks_refetch_interval,
    )
