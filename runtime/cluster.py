"""Several instances of one service: membership, placement of entities, and forwarding to the owner.

The model is Orleans' membership table and grain directory, made simple by one rule: the owner of an
entity is a pure function of the live membership (rendezvous hashing of the entity id over the members'
addresses), so no directory has to be stored or kept in step.

- **Membership.** Each instance inserts a row into ``cluster_members`` of the service's own database when
  it starts (a random member id, its address, an incarnation = start time) and heartbeats it every
  ``heartbeat_interval``. A peer whose heartbeat is older than ``member_timeout`` is declared ``dead`` by
  whoever notices first (a conditional update, so one declaration wins). A member that finds itself
  declared dead (it was paused, or cut off from the database) drops every copy it holds and joins again
  under a new id. A clean stop marks the row ``left``, so survivors take over at once rather than after
  the timeout. A restart at the same address supersedes the old incarnation at once.
- **Placement.** ``owner_of(id)`` is the live member with the highest ``hash(address, id)``. Every instance
  and the gateway (which reads the membership from the instances' readiness answers) compute it alike.
  When a member joins or leaves, only the entities it gains or loses move.
- **Forwarding.** A request for an entity owned elsewhere (by the gateway's rule table, see
  :func:`forwarding_middleware`) and a bus message for such an entity (:meth:`Cluster.forward_envelope`)
  are handed to the owner over HTTP. The owner answers only after the turn has committed, so the sender
  acknowledges the bus message after its effect is durable. If the owner cannot be reached the message is
  handled here: safety never depends on placement, every commit is fenced by the entity's version
  (:mod:`runtime.store`).

Placement is a matter of efficiency and of freshness of what a copy in memory answers; correctness under
disagreement (two members briefly believing they own one entity) comes from the fence.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runtime.store import cluster_members, utcnow

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ecom-Forwarded"  # marks a request handed on by a member: never handed on again
MEMBER_TOKEN_HEADER = "X-Ecom-Member-Token"
DELIVER_PATH = "/internal/cluster/deliver"

# Set while a forwarded bus message is handled, so the owner delivers it locally whatever its view says.
_forwarded: contextvars.ContextVar[bool] = contextvars.ContextVar("ecom_forwarded", default=False)


def score(address: str, key: str) -> int:
    """Rendezvous weight of ``address`` for ``key``; the gateway uses the same function."""
    digest = hashlib.blake2b(f"{address}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous(addresses: Iterable[str], key: str) -> str | None:
    """The owner of ``key`` among ``addresses``: the highest weight (ties impossible in practice)."""
    best, best_score = None, -1
    for address in addresses:
        s = score(address, key)
        if s > best_score:
            best, best_score = address, s
    return best


def normalise(address: str) -> str:
    return address.rstrip("/")


@dataclass(frozen=True, slots=True)
class Member:
    member_id: str
    address: str
    incarnation: int
    token: str


class Cluster:
    """This instance's membership in its service's cluster, and the placement computed from it."""

    def __init__(
        self,
        engine: AsyncEngine,
        address: str,
        *,
        heartbeat_interval: float = 1.0,
        member_timeout: float = 5.0,
        on_change: Callable[[], object] | None = None,  # any result is ignored
        on_evicted: Callable[[], object] | None = None,
    ) -> None:
        self.engine = engine
        self.address = normalise(address)
        self.heartbeat_interval = heartbeat_interval
        self.member_timeout = member_timeout
        self.on_change = on_change  # the view changed: drop copies of entities no longer owned
        self.on_evicted = on_evicted  # this member was declared dead: every copy it holds may be stale
        self.member_id = ""
        self.token = ""
        self._members: tuple[Member, ...] = ()
        self._addresses: tuple[str, ...] = (self.address,)
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._bindings: list[Any] = []  # runtime.messages.BusBinding: where forwarded envelopes go
        self._beating = asyncio.Lock()  # one heartbeat at a time, or two could each re-join
        self.view_changes = 0
        self.forwarded = {"http": 0, "bus": 0, "fallback": 0}

    # -- placement ------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[Member, ...]:
        return self._members

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._addresses

    def owner_of(self, actor_id: str) -> str | None:
        return rendezvous(self._addresses, actor_id)

    def owns(self, actor_id: str) -> bool:
        return self.owner_of(actor_id) == self.address

    def member_at(self, address: str) -> Member | None:
        return next((m for m in self._members if m.address == address), None)

    # -- membership -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._join()
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="cluster-heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(cluster_members)
                    .where(cluster_members.c.member_id == self.member_id, cluster_members.c.status == "active")
                    .values(status="left")
                )
        except Exception as exc:  # noqa: BLE001 the database may be gone: peers will declare this member dead instead
            log.warning("cluster: could not record leaving: %r", exc)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _join(self) -> None:
        now = utcnow()
        self.member_id = uuid.uuid4().hex
        self.token = secrets.token_urlsafe(24)
        incarnation = int(time.time() * 1000)
        async with self.engine.begin() as conn:
            # An earlier incarnation at this address (a restart after a crash) is over: say so at once.
            await conn.execute(
                update(cluster_members)
                .where(cluster_members.c.address == self.address, cluster_members.c.status == "active")
                .values(status="dead")
            )
            await conn.execute(
                insert(cluster_members).values(
                    member_id=self.member_id,
                    address=self.address,
                    incarnation=incarnation,
                    status="active",
                    token=self.token,
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        log.info("cluster: %s joined as %s (incarnation %d)", self.address, self.member_id[:8], incarnation)

    async def _heartbeat(self) -> None:
        failures = 0
        while True:
            # Jitter keeps the members of a big cluster from hitting the table in lock step.
            await asyncio.sleep(self.heartbeat_interval * random.uniform(0.8, 1.0))
            try:
                await self.beat()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 the heartbeat loop must outlive any failure; logged, counted
                failures += 1
                log.warning("cluster: heartbeat failed (%d in a row): %r", failures, exc)

    async def beat(self) -> None:
        """One heartbeat: prove liveness, declare silent peers dead, recompute the view."""
        async with self._beating:
            await self._beat()

    async def _beat(self) -> None:
        now = utcnow()
        async with self.engine.begin() as conn:
            alive = await conn.execute(
                update(cluster_members)
                .where(cluster_members.c.member_id == self.member_id, cluster_members.c.status == "active")
                .values(heartbeat_at=now)
            )
            if alive.rowcount == 0:
                evicted = True
            else:
                evicted = False
                cutoff = now - timedelta(seconds=self.member_timeout)
                await conn.execute(
                    update(cluster_members)
                    .where(cluster_members.c.status == "active", cluster_members.c.heartbeat_at < cutoff)
                    .values(status="dead")
                )
                # Rows of members gone for an hour only clutter the table.
                await conn.execute(
                    delete(cluster_members).where(
                        cluster_members.c.status != "active", cluster_members.c.heartbeat_at < now - timedelta(hours=1)
                    )
                )
        if evicted:
            log.warning("cluster: %s was declared dead by a peer; dropping every copy and joining again", self.address)
            if self.on_evicted is not None:
                self.on_evicted()
            await self._join()
        await self.refresh()

    async def refresh(self) -> None:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(cluster_members)
                    .where(cluster_members.c.status == "active")
                    .order_by(cluster_members.c.address)
                )
            ).all()
        members = tuple(Member(r.member_id, normalise(r.address), int(r.incarnation), r.token) for r in rows)
        addresses = tuple(sorted({m.address for m in members} | {self.address}))
        changed = addresses != self._addresses
        self._members = members
        self._addresses = addresses
        if changed:
            self.view_changes += 1
            log.info("cluster: view %d: %s", self.view_changes, ", ".join(addresses))
            if self.on_change is not None:
                self.on_change()

    def describe(self) -> dict[str, Any]:
        return {
            "self": self.address,
            "member_id": self.member_id,
            "members": [
                {"address": m.address, "member_id": m.member_id, "incarnation": m.incarnation} for m in self._members
            ],
            "view_changes": self.view_changes,
            "forwarded": dict(self.forwarded),
        }

    # -- forwarding -----------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=15.0, sock_connect=1.0),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=256),
            )
        return self._http

    def add_binding(self, binding: Any) -> None:
        self._bindings.append(binding)

    def check_token(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.token.encode())

    async def forward_envelope(self, env: Any, owner: str) -> bool:
        """Hand a bus message to its owner and wait until the owner has applied it. False: the owner could
        not be reached (the caller handles the message itself)."""
        member = self.member_at(owner)
        if member is None:
            return False
        try:
            async with self._session().post(
                owner + DELIVER_PATH,
                data=env.encode(),
                headers={MEMBER_TOKEN_HEADER: member.token, "Content-Type": "application/json"},
            ) as resp:
                body = await resp.read()
                if resp.status == 204:
                    self.forwarded["bus"] += 1
                    return True
                if resp.status in (409, 421):  # the owner's view differs (or it restarted): do it here
                    return False
                raise ForwardFailed(f"{owner} answered {resp.status} to {env.type} {env.message_id}: {body[:200]!r}")
        except aiohttp.ClientConnectionError as exc:
            log.info("cluster: owner %s unreachable (%r); handling %s here", owner, exc, env.type)
            self.forwarded["fallback"] += 1
            return False

    async def deliver_forwarded(self, env: Any) -> None:
        token = _forwarded.set(True)
        try:
            for binding in self._bindings:
                if env.type in binding.routes:
                    await binding(env)
                    return
        finally:
            _forwarded.reset(token)
        from bus.base import MalformedMessage

        raise MalformedMessage(f"no route for message type {env.type!r}")

    async def forward_request(self, request: web.Request, owner: str) -> web.StreamResponse | None:
        """Proxy an HTTP request to the owner; None when the owner cannot be reached."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[FORWARDED_HEADER] = self.address
        try:
            async with self._session().request(
                request.method,
                owner + request.path_qs,
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                out = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
                }
                self.forwarded["http"] += 1
                return web.Response(status=resp.status, body=body, headers=out)
        except aiohttp.ClientConnectionError as exc:
            log.info("cluster: owner %s unreachable (%r); serving %s here", owner, exc, request.path)
            self.forwarded["fallback"] += 1
            return None


class ForwardFailed(Exception):
    """The owner took a forwarded bus message and failed it: the bus redelivers it later."""


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


def is_forwarded() -> bool:
    return _forwarded.get()


# ---------------------------------------------------------------------------------------------------
# HTTP: the internal delivery endpoint and the forwarding middleware

AppKeyCluster: web.AppKey[Cluster] = web.AppKey("ecom_cluster")

KeyOf = Callable[[web.Request], Awaitable[str | None]]


async def _deliver(request: web.Request) -> web.Response:
    cluster = request.app[AppKeyCluster]
    if not cluster.check_token(request.headers.get(MEMBER_TOKEN_HEADER)):
        # Either not a member, or a member whose view names a previous incarnation of this address.
        return web.Response(status=421, text="not this member")
    from bus.envelope import Envelope

    env = Envelope.decode(await request.read())
    await cluster.deliver_forwarded(env)
    return web.Response(status=204)


def install(app: web.Application, cluster: Cluster) -> None:
    app[AppKeyCluster] = cluster
    app.router.add_post(DELIVER_PATH, _deliver)


def forwarding_middleware(key_of: KeyOf) -> Any:
    """Hands a request for an entity owned by another member to that member. ``key_of(request)`` names the
    entity (None: the request is not about one entity). A request forwarded once is served where it lands."""

    @web.middleware
    async def forward(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        cluster = request.app.get(AppKeyCluster)
        if cluster is None or FORWARDED_HEADER in request.headers or len(cluster.addresses) < 2:
            return await handler(request)
        key = await key_of(request)
        if key is None:
            return await handler(request)
        owner = cluster.owner_of(key)
        if owner is None or owner == cluster.address:
            return await handler(request)
        response = await cluster.forward_request(request, owner)
        return response if response is not None else await handler(request)

    return forward


def route_key_of(service: str) -> KeyOf:
    """The entity a request to ``service`` is about, by the gateway's route table (its affinity rules), so the
    gateway and the instances agree on which requests name one entity and which entity that is."""
    from runtime.routes import Affinity
    from runtime.services import gateway_routes  # lazily: the service registry imports this module's users

    routes = [r for r in gateway_routes() if r.service == service]

    async def key_of(request: web.Request) -> str | None:
        path = request.path
        for route in routes:
            if path != route.prefix and not path.startswith(route.prefix + "/"):
                continue
            found = route.resolve(request.method, path[len(route.prefix) :])
            if found is None:
                return None
            rule, match = found
            if rule.affinity is Affinity.PATH:
                return match.group("key")
            if rule.affinity is Affinity.SUB:
                from runtime.auth import authenticate

                return (await authenticate(request)).sub
            return None
        return None

    return key_of
