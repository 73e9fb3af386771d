"""Virtual actors: one mailbox per entity id, one message at a time, state committed after every turn.

The model is Orleans' grains on asyncio:

- ``system.ref(CartActor, cart_id)`` never creates anything; the first message *activates* the actor
  (its state is loaded from the store), an idle actor is *deactivated* after ``idle_timeout``, and when
  more than ``max_activations`` are live the least recently used idle ones are evicted. A deactivated
  actor comes back with its persisted state on its next message.
- A *turn* handles one message. Messages of one actor are handled in arrival order; different actors run
  concurrently. An idle actor holds no task: a drain task exists only while its mailbox has messages.
- A turn that changes the state, produces bus messages (outbox), consumes a bus message (inbox) or sets
  reminders is committed in ONE database transaction (see :class:`runtime.store.StateStore`). If the
  handler raises, or the commit fails, nothing of the turn is kept: the state is restored from the last
  committed copy and the error goes to the asker. A version conflict (another process wrote the entity)
  reloads the state and runs the turn again, a bounded number of times.
- Mailboxes are bounded: a full mailbox raises :class:`MailboxFull` at once (HTTP 503 + Retry-After).
- Durable reminders (a row in SQL) deliver :class:`ReminderFired` later, across restarts.

Handlers are methods marked with :func:`handles`; they may be plain functions (fast in-memory turns) or
coroutines (turns that call out). A handler's return value is the reply to ``ask``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol, TypeVar

import orjson

from runtime import jsonutil, tracing
from runtime.errors import Problem, ServiceUnavailable
from runtime.store import (
    CommitOutcome,
    OutboxMessage,
    ReminderChange,
    SqlHook,
    StateStore,
    TurnWrite,
    as_utc,
    utcnow,
)

log = logging.getLogger(__name__)

M = TypeVar("M")
A = TypeVar("A", bound="Actor")

ActorFactory = Callable[[str, "ActorSystem"], "Actor"]
"""Builds one activation: ``factory(actor_id, system)``; an actor class is one (it takes no dependencies)."""


# ---------------------------------------------------------------------------------------------------
# Errors


class ActorError(Exception):
    """Base of the runtime's own errors (as opposed to the errors handlers raise)."""


class MailboxFull(ServiceUnavailable, ActorError):
    """Back-pressure: the actor's mailbox is at its bound. Retry later; nothing was enqueued."""

    slug = "overloaded"
    title = "Too busy"


class AskTimeout(ServiceUnavailable, ActorError):
    """The actor did not answer within the timeout. The message may still be handled later."""

    slug = "actor-timeout"
    title = "Timed out waiting for the entity"


class VersionConflictError(ServiceUnavailable, ActorError):
    """The entity kept changing under this turn (other writers) beyond the retry bound."""

    slug = "conflict-retry"
    title = "Concurrent update"


class DuplicateMessage(ActorError):
    """The message id is in the actor's inbox already: it was applied before and is skipped now."""


class NoHandler(Problem, ActorError):
    status = 500
    slug = "no-handler"
    title = "Actor cannot handle the message"


class Placement(Protocol):
    """Which process owns an entity (see :mod:`runtime.cluster`). Only a hint for efficiency: safety comes
    from the version fence on every commit, never from placement."""

    def owns(self, actor_id: str) -> bool: ...

    def owner_of(self, actor_id: str) -> str | None: ...


# ---------------------------------------------------------------------------------------------------
# Messages the runtime itself delivers


@dataclass(frozen=True, slots=True)
class ReminderFired:
    name: str
    payload: Any
    due_at: datetime


# ---------------------------------------------------------------------------------------------------
# Actor base and handler registration


def handles(message_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method as the handler of ``message_type`` (and its subclasses)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__handles__ = message_type  # type: ignore[attr-defined]  # the marker Actor subclasses collect handlers by
        return fn

    return mark


_json_default = jsonutil.default  # the runtime's one encoder (runtime/jsonutil.py)


def encode_json(value: Any) -> str:
    """Actor state and reminder payloads as JSON text; datetimes keep orjson's plain form (``wire=False``),
    as they have always been stored."""
    return jsonutil.dumps_text(value, wire=False)


class Actor:
    """Base class of every actor. Subclasses set ``type_name`` (used in storage and admin URLs).

    State lives in ``self.state``. Override :meth:`initial_state`, and :meth:`dump_state` /
    :meth:`load_state` when the state is not plain JSON (dataclasses, Decimals). ``persistent = False``
    keeps the actor in memory only (it then cannot use the outbox or reminders).
    """

    type_name: ClassVar[str] = ""
    persistent: ClassVar[bool] = True
    # Seconds an idle activation of this type stays in memory at most: the system's ``idle_timeout`` applies when
    # it is shorter (Orleans' per-grain-type collection age). For entities busy only for a moment (an order: its
    # saga takes a second, then it is read from the query table), so memory follows the rate of new entities
    # times this age, not times the system's longer one (issue 14: RSS grew for the whole 5-minute run).
    idle_timeout: ClassVar[float | None] = None
    _handlers: ClassVar[dict[type, tuple[str, bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("type_name"):
            name = cls.__name__
            cls.type_name = (name[: -len("Actor")] if name.endswith("Actor") and name != "Actor" else name).lower()
        table: dict[type, tuple[str, bool]] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                message_type = getattr(fn, "__handles__", None)
                if message_type is not None:
                    table[message_type] = (attr, inspect.iscoroutinefunction(fn))
        cls._handlers = table

    def __init__(self, actor_id: str, system: ActorSystem) -> None:
        self.id = actor_id
        self.system = system
        self.state: Any = self.initial_state()

    def initial_state(self) -> Any:
        return {}

    def dump_state(self) -> Any:
        """The JSON-compatible form of the state (what is stored and shown to admins)."""
        return self.state

    def load_state(self, data: Any) -> None:
        self.state = data

    async def on_activate(self) -> None:
        """Called after the state is loaded, before the first message."""

    async def on_deactivate(self) -> None:
        """Called when the actor is evicted or idles out. State is already durable."""

    @classmethod
    def resolve(cls, message_type: type) -> tuple[str, bool] | None:
        found = cls._handlers.get(message_type)
        if found is None:
            for klass in message_type.__mro__[1:]:
                found = cls._handlers.get(klass)
                if found is not None:
                    cls._handlers[message_type] = found
                    break
        return found


class Turn:
    """What a handler may do besides changing state; all of it is committed with the turn or not at all."""

    __slots__ = ("actor", "fired", "hooks", "message_id", "now", "outbox", "reminders")

    def __init__(self, actor: Actor, message_id: str | None) -> None:
        self.actor = actor
        self.message_id = message_id
        self.outbox: list[OutboxMessage] = []
        self.reminders: list[ReminderChange] = []
        self.hooks: list[SqlHook] = []
        self.fired: tuple[str, datetime, float | None] | None = None
        self.now = utcnow()

    @property
    def is_empty(self) -> bool:
        return not (self.outbox or self.reminders or self.hooks or self.message_id or self.fired)

    def _require_persistent(self, what: str) -> None:
        if not self.actor.persistent:
            raise RuntimeError(f"{type(self.actor).__name__} is not persistent and cannot use {what}")

    def send(self, queue: str, envelope: Any) -> None:
        """Send a bus message to one service's queue once this turn commits (``envelope``: bus.Envelope)."""
        self._require_persistent("the outbox")
        self.outbox.append(OutboxMessage("send", queue, envelope.message_id, envelope.encode().decode(), envelope))

    def publish(self, envelope: Any) -> None:
        """Publish a bus event to every subscribed service once this turn commits."""
        self._require_persistent("the outbox")
        self.outbox.append(OutboxMessage("publish", "", envelope.message_id, envelope.encode().decode(), envelope))

    def set_reminder(
        self,
        name: str,
        *,
        due_in: float | None = None,
        due_at: datetime | None = None,
        period: float | None = None,
        payload: Any = None,
    ) -> None:
        """Wake this actor with :class:`ReminderFired` later, even across restarts. Replaces one of the same name."""
        self._require_persistent("reminders")
        if (due_in is None) == (due_at is None):
            raise ValueError("give exactly one of due_in and due_at")
        when = as_utc(due_at) if due_at is not None else self.now + timedelta(seconds=due_in or 0.0)
        self.reminders.append(ReminderChange(name, when, period, encode_json(payload)))

    def cancel_reminder(self, name: str) -> None:
        self._require_persistent("reminders")
        self.reminders.append(ReminderChange(name, None))

    def on_commit(self, hook: SqlHook) -> None:
        """Run ``hook(conn)`` inside the turn's transaction (e.g. to keep a query table in step)."""
        self._require_persistent("SQL hooks")
        self.hooks.append(hook)


# ---------------------------------------------------------------------------------------------------
# Activations and refs


class _Activation:
    __slots__ = (
        "actor",
        "committed",
        "handled",
        "key",
        "last_activity",
        "loaded",
        "mailbox",
        "running",
        "version",
    )

    def __init__(self, key: tuple[str, str], actor: Actor) -> None:
        self.key = key
        self.actor = actor
        self.mailbox: deque[tuple[Any, asyncio.Future[Any] | None, str | None, Any]] | None = None
        self.running = False
        self.loaded = False
        self.version = 0
        self.committed = ""  # encoded state of the last commit: the rollback point
        self.handled = 0
        self.last_activity = time.monotonic()

    @property
    def depth(self) -> int:
        return len(self.mailbox) if self.mailbox else 0


class ActorRef:
    """An address of one actor. Cheap to create, valid forever; the actor activates on demand."""

    __slots__ = ("_key", "_system", "actor_class", "id")

    def __init__(self, system: ActorSystem, actor_class: type[Actor], actor_id: str) -> None:
        self._system = system
        self.actor_class = actor_class
        self.id = actor_id
        self._key = (actor_class.type_name, actor_id)

    async def ask(self, message: Any, *, timeout: float | None = None, message_id: str | None = None) -> Any:
        """Enqueue and wait for the reply (or the handler's error). ``message_id`` makes it idempotent."""
        return await self._system._ask(self, message, timeout, message_id)

    async def tell(self, message: Any, *, message_id: str | None = None) -> None:
        """Enqueue only; errors of the turn are logged. Raises :class:`MailboxFull` when full."""
        self._system._enqueue(self, message, None, message_id)

    def __repr__(self) -> str:
        return f"ActorRef({self._key[0]}/{self.id})"


# ---------------------------------------------------------------------------------------------------
# The system


_NO_DEFAULT = object()


class ActorSystem:
    """Hosts the activations of one process (or one service) over one :class:`StateStore`."""

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        mailbox_size: int = 1000,
        ask_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_activations: int = 100_000,
        conflict_retries: int = 5,
        reminder_poll_interval: float = 1.0,
        inbox_retention: float = 7 * 24 * 3600.0,
        on_outbox: Callable[..., None] | None = None,
        name: str = "actors",
        exclusive: bool = False,
        placement: Placement | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.mailbox_size = mailbox_size
        self.ask_timeout = ask_timeout
        self.idle_timeout = idle_timeout
        self.max_activations = max_activations
        self.conflict_retries = conflict_retries
        self.reminder_poll_interval = reminder_poll_interval
        self.inbox_retention = inbox_retention
        # The outbox relay's wake-up (OutboxRelay.notify), so committed messages leave at once. It is given the
        # committed messages themselves, so the relay need not read them back, only when this process is the table's
        # one writer (exclusive); otherwise nothing (the relay polls the table): see runtime.outbox.
        self.on_outbox = on_outbox
        # exclusive: no other process writes this store (the embedded shape), so a copy in memory is the
        # newest by construction. Otherwise a turn that only reads checks its copy's version first.
        self.exclusive = exclusive
        self.placement = placement
        self._activations: OrderedDict[tuple[str, str], _Activation] = OrderedDict()
        self._types: dict[str, type[Actor]] = {}
        self._factories: dict[str, ActorFactory] = {}  # registered with dependencies; else the class builds it
        self._background: list[asyncio.Task[None]] = []
        self._reminders_in_flight: set[tuple[str, str, str]] = set()
        self._closing = False
        self.stats = {
            "handled": 0,
            "failed": 0,
            "activations": 0,
            "deactivations": 0,
            "conflicts": 0,
            "rejected": 0,
            "stale_reads": 0,
            "dropped_not_owned": 0,
        }

    @classmethod
    def from_settings(cls, store: StateStore | None, settings: Any, **kwargs: Any) -> ActorSystem:
        a = settings.actors
        return cls(
            store,
            mailbox_size=a.mailbox_size,
            ask_timeout=a.ask_timeout,
            idle_timeout=a.idle_timeout,
            max_activations=a.max_activations,
            conflict_retries=a.conflict_retries,
            reminder_poll_interval=a.reminder_poll_interval,
            inbox_retention=a.inbox_retention,
            **kwargs,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def register(self, *actor_classes: type[Actor], factory: ActorFactory | None = None) -> None:
        """Declare the actor types this system hosts (needed for reminders and admin lookups).

        ``factory(actor_id, system)`` builds each activation of them, for an actor with dependencies
        (``functools.partial(CartActor, expiry_seconds=60)``: constructor injection, as in Orleans); without
        one the class is called with ``(actor_id, system)``. Refs keep naming the class itself."""
        for cls in actor_classes:
            self._types[cls.type_name] = cls
            if factory is not None:
                self._factories[cls.type_name] = factory
            else:
                self._factories.pop(cls.type_name, None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._sweep_idle(), name=f"{self.name}-idle-sweeper"))
        if self.store is not None:
            self._background.append(loop.create_task(self._poll_reminders(), name=f"{self.name}-reminders"))
            self._background.append(loop.create_task(self._purge_inbox(), name=f"{self.name}-inbox-purge"))

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop background work, let running turns finish (bounded), deactivate everything."""
        self._closing = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        deadline = time.monotonic() + drain_timeout
        while any(a.running for a in self._activations.values()) and time.monotonic() < deadline:  # noqa: ASYNC110 no single event: polls every activation until the deadline
            await asyncio.sleep(0.01)
        for act in list(self._activations.values()):
            await self._deactivate(act)

    def _owns(self, actor_id: str) -> bool:
        return self.placement is None or self.placement.owns(actor_id)

    def rebalance(self) -> int:
        """Drop the idle activations of entities this process no longer owns (after a membership change);
        busy ones go when their mailbox drains. Returns how many were dropped now."""
        dropped = [a for a in self._activations.values() if not a.running and not a.depth and not self._owns(a.key[1])]
        for act in dropped:
            self.stats["dropped_not_owned"] += 1
            self._forget(act)
            if type(act.actor).on_deactivate is not Actor.on_deactivate:
                asyncio.get_running_loop().create_task(act.actor.on_deactivate())
        return len(dropped)

    def drop_all(self) -> None:
        """Forget every idle activation (this process was declared dead: its copies may be stale)."""
        for act in [a for a in self._activations.values() if not a.running and not a.depth]:
            self._forget(act)

    def ref(self, actor_class: type[A], actor_id: str) -> ActorRef:
        if actor_class.type_name not in self._types:
            self._types[actor_class.type_name] = actor_class
        return ActorRef(self, actor_class, actor_id)

    # -- enqueue --------------------------------------------------------------------------------

    def _enqueue(self, ref: ActorRef, message: Any, fut: asyncio.Future[Any] | None, message_id: str | None) -> None:
        if self._closing:
            raise ServiceUnavailable("the service is shutting down", retry_after=1)
        acts = self._activations
        act = acts.get(ref._key)
        if act is None:
            act = self._activate(ref)
        else:
            acts.move_to_end(ref._key)
        box = act.mailbox
        if box is None:
            box = act.mailbox = deque()
        elif len(box) >= self.mailbox_size:
            self.stats["rejected"] += 1
            raise MailboxFull(f"{ref._key[0]} {ref.id} has {len(box)} messages waiting; retry shortly", retry_after=1)
        box.append((message, fut, message_id, tracing.capture()))
        if not act.running:
            act.running = True
            asyncio.get_running_loop().create_task(self._drain(act))

    async def _ask(self, ref: ActorRef, message: Any, timeout: float | None, message_id: str | None) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._enqueue(ref, message, fut, message_id)
        timer = loop.call_later(timeout or self.ask_timeout, _expire, fut, ref, timeout or self.ask_timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    # -- activation -----------------------------------------------------------------------------

    def _activate(self, ref: ActorRef) -> _Activation:
        if len(self._activations) >= self.max_activations:
            self._evict(len(self._activations) - self.max_activations + 1)
        act = _Activation(ref._key, self._factories.get(ref._key[0], ref.actor_class)(ref.id, self))
        self._activations[ref._key] = act
        self.stats["activations"] += 1
        return act

    def _evict(self, count: int) -> None:
        """Deactivate up to ``count`` least recently used idle actors (busy ones are skipped)."""
        victims: list[_Activation] = []
        for act in self._activations.values():
            if len(victims) >= count:
                break
            if not act.running and not act.depth:
                victims.append(act)
        for act in victims:
            self._forget(act)
            if type(act.actor).on_deactivate is not Actor.on_deactivate:
                asyncio.get_running_loop().create_task(act.actor.on_deactivate())

    def _forget(self, act: _Activation) -> None:
        if self._activations.get(act.key) is act:
            del self._activations[act.key]
            self.stats["deactivations"] += 1

    async def _deactivate(self, act: _Activation) -> None:
        self._forget(act)
        try:
            await act.actor.on_deactivate()
        except Exception:
            log.exception("on_deactivate of %s/%s failed", *act.key)

    async def _load(self, act: _Activation) -> None:
        actor = act.actor
        record = await self.store.load(*act.key) if (self.store is not None and actor.persistent) else None
        if record is None:
            act.version = 0
            act.committed = encode_json(actor.dump_state())
        else:
            act.version = record.version
            act.committed = record.state
            actor.load_state(orjson.loads(record.state))
        await actor.on_activate()
        act.loaded = True

    def _rollback(self, act: _Activation) -> None:
        act.actor.load_state(orjson.loads(act.committed))

    # -- turns ----------------------------------------------------------------------------------

    async def _drain(self, act: _Activation) -> None:
        box = act.mailbox
        assert box is not None
        try:
            if not act.loaded:
                try:
                    await self._load(act)
                except Exception as exc:  # noqa: BLE001 any load failure must reach the queued callers, or they would hang
                    # Cannot activate (database down?): fail everything queued, drop the activation so the
                    # next message tries again from scratch.
                    log.warning("activation of %s/%s failed: %r", *act.key, exc)
                    self._forget(act)
                    error = ServiceUnavailable(f"{act.key[0]} {act.key[1]} cannot be loaded right now", retry_after=1)
                    while box:
                        _, fut, _, _ = box.popleft()
                        _fail(fut, error)
                    return
            while box:
                message, fut, message_id, trace_context = box.popleft()
                with tracing.turn(act.key, message, message_id, fut, trace_context):
                    await self._turn(act, message, fut, message_id)
        finally:
            act.running = False
            act.last_activity = time.monotonic()
            if box and self._activations.get(act.key) is act:
                act.running = True
                asyncio.get_running_loop().create_task(self._drain(act))
            elif not box and not self._owns(act.key[1]):
                # Another process owns this entity: its messages were handled here (a fallback, fenced by
                # the version), but a copy kept here would only go stale. The next message loads afresh.
                self.stats["dropped_not_owned"] += 1
                self._forget(act)

    async def _turn(
        self, act: _Activation, message: Any, fut: asyncio.Future[Any] | None, message_id: str | None
    ) -> None:
        actor = act.actor
        entry = type(actor).resolve(type(message))
        if entry is None:
            _fail(fut, NoHandler(f"{type(actor).__name__} has no handler for {type(message).__name__}"))
            return
        method, is_async = entry
        handler = getattr(actor, method)
        persistent = actor.persistent and self.store is not None
        # No look-up of the inbox before the handler: a turn with a message id always commits, and the commit checks
        # the inbox before its first write (DUPLICATE, nothing written, the state rolled back). A query per bus
        # message saved; only a handler that fails on a copy asks the inbox, so that the copy is still reported as
        # a duplicate (dropped), not as a failure (redelivered, then dead-lettered).
        attempts = 0
        while True:
            turn = Turn(actor, message_id)
            if isinstance(message, ReminderFired):
                turn.fired = (message.name, message.due_at, _reminder_period(message))
            try:
                result = handler(message, turn)
                if is_async:
                    result = await result
                encoded = encode_json(actor.dump_state())
            except BaseException as exc:
                self._rollback(act)
                if isinstance(exc, asyncio.CancelledError):
                    self.stats["failed"] += 1
                    _fail(fut, ServiceUnavailable("the turn was cancelled (shutting down)"))
                    raise
                if persistent and message_id is not None and await self._seen(act, message_id):
                    _fail(
                        fut, DuplicateMessage(f"message {message_id} was already applied to {act.key[0]}/{act.key[1]}")
                    )
                    return
                self.stats["failed"] += 1
                if fut is None and not isinstance(exc, Problem):
                    log.exception("%s/%s failed on %s", act.key[0], act.key[1], type(message).__name__)
                _fail(fut, exc)
                return
            changed = encoded != act.committed
            if not persistent or (not changed and turn.is_empty):
                if persistent and not self.exclusive:
                    # A read: answer only from a copy as new as the database, whichever process wrote last.
                    try:
                        current = await self.store.version(*act.key)  # type: ignore[union-attr]  # persistent: there is a store
                    except Exception as exc:  # noqa: BLE001 any failure is answered to the caller as 503
                        _fail(
                            fut,
                            ServiceUnavailable(f"{act.key[0]} {act.key[1]} cannot be checked: {type(exc).__name__}"),
                        )
                        return
                    if current != act.version:
                        self.stats["stale_reads"] += 1
                        self._rollback(act)
                        attempts += 1
                        if await self._reloaded(act, fut, attempts):
                            continue
                        return
                act.committed = encoded
                act.handled += 1
                self.stats["handled"] += 1
                _reply(fut, result)
                return
            # Every other turn steps the version, also one that only consumed a message: that is its fence.
            write = TurnWrite(
                actor_type=act.key[0],
                actor_id=act.key[1],
                expected_version=act.version,
                state=encoded,
                changed=changed,
                outbox=turn.outbox,
                inbox_id=message_id,
                reminders=turn.reminders,
                fired_reminder=turn.fired,
                hooks=turn.hooks,
            )
            try:
                with tracing.commit(write):
                    outcome = await self.store.commit(write)  # type: ignore[union-attr]  # persistent: there is a store
            except BaseException as exc:
                self._rollback(act)
                self.stats["failed"] += 1
                if isinstance(exc, asyncio.CancelledError):
                    _fail(fut, ServiceUnavailable("the turn was cancelled (shutting down)"))
                    raise
                log.warning("commit of %s/%s failed: %r", act.key[0], act.key[1], exc)
                _fail(fut, ServiceUnavailable(f"could not store the change to {act.key[0]} {act.key[1]}; retry"))
                return
            if outcome == CommitOutcome.OK:
                act.version = write.new_version
                act.committed = encoded
                act.handled += 1
                self.stats["handled"] += 1
                if write.outbox and self.on_outbox is not None:
                    self.on_outbox(write.outbox if self.exclusive else ())
                _reply(fut, result)
                return
            self._rollback(act)
            if outcome == CommitOutcome.DUPLICATE:
                _fail(fut, DuplicateMessage(f"message {message_id} was already applied to {act.key[0]}/{act.key[1]}"))
                return
            # Conflict: another writer moved the entity on. Reload and run the turn again on fresh state.
            self.stats["conflicts"] += 1
            attempts += 1
            if not await self._reloaded(act, fut, attempts):
                return

    async def _seen(self, act: _Activation, message_id: str) -> bool:
        """Was this message applied already? (Asked only after a handler failed; unknown counts as not seen.)"""
        try:
            return await self.store.seen(f"{act.key[0]}/{act.key[1]}", message_id)  # type: ignore[union-attr]  # persistent: there is a store
        except Exception:  # noqa: BLE001 - the handler's own error is the one to report
            return False

    async def _reloaded(self, act: _Activation, fut: asyncio.Future[Any] | None, attempts: int) -> bool:
        """Load the newest state for another try of the turn; False (the asker told why) past the retry bound or
        when the state cannot be loaded."""
        if attempts > self.conflict_retries:
            _fail(fut, VersionConflictError(f"{act.key[0]} {act.key[1]} kept changing concurrently; retry"))
            return False
        try:
            await self._load(act)
        except Exception as exc:  # noqa: BLE001 any failure is answered to the caller as 503
            _fail(fut, ServiceUnavailable(f"{act.key[0]} {act.key[1]} cannot be reloaded: {type(exc).__name__}"))
            return False
        return True

    # -- background -----------------------------------------------------------------------------

    def _idle_limit(self, actor_type: type[Actor]) -> float:
        own = actor_type.idle_timeout
        return self.idle_timeout if own is None else min(own, self.idle_timeout)

    async def _sweep_idle(self) -> None:
        while True:
            shortest = min((self._idle_limit(t) for t in self._types.values()), default=self.idle_timeout)
            await asyncio.sleep(max(0.05, min(shortest / 2, 30.0)))
            now = time.monotonic()
            # The OrderedDict is in LRU order: past the shortest limit no activation of any type can be stale.
            stale = []
            for act in self._activations.values():
                if act.last_activity > now - shortest:
                    break
                if act.last_activity <= now - self._idle_limit(type(act.actor)) and not act.running and not act.depth:
                    stale.append(act)
            for act in stale:
                await self._deactivate(act)

    async def _poll_reminders(self) -> None:
        while True:
            try:
                await self.fire_due_reminders()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("reminder poll failed; will retry", exc_info=True)
            await asyncio.sleep(self.reminder_poll_interval)

    async def _purge_inbox(self) -> None:
        # A redelivered bus message arrives within minutes (or is dead-lettered); ids older than the
        # retention can go, so the inbox does not grow without bound.
        while True:
            try:
                await self.store.purge_inbox(utcnow() - timedelta(seconds=self.inbox_retention))  # type: ignore[union-attr]  # started only with a store
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("inbox purge failed; will retry", exc_info=True)
            await asyncio.sleep(3600)

    async def fire_due_reminders(self) -> int:
        """Deliver every due reminder of the registered actor types once; returns how many were sent."""
        assert self.store is not None
        rows = await self.store.due_reminders(list(self._types), utcnow())
        fired = 0
        for row in rows:
            key = (row.actor_type, row.actor_id, row.name)
            if key in self._reminders_in_flight or not self._owns(row.actor_id):
                continue  # in flight here already, or the owner fires it (the fence would refuse a twin anyway)
            cls = self._types[row.actor_type]
            due_at = as_utc(row.due_at)
            msg = _PeriodicReminder(row.name, orjson.loads(row.payload), due_at, row.period)
            self._reminders_in_flight.add(key)
            try:
                fut = asyncio.get_running_loop().create_future()
                self._enqueue(self.ref(cls, row.actor_id), msg, fut, f"reminder:{row.name}:{due_at.isoformat()}")
            except MailboxFull:
                self._reminders_in_flight.discard(key)
                continue
            fut.add_done_callback(functools.partial(self._reminder_done, key))
            fired += 1
        return fired

    def _reminder_done(self, key: tuple[str, str, str], fut: asyncio.Future[Any]) -> None:
        self._reminders_in_flight.discard(key)
        if not fut.cancelled():
            fut.exception()  # retrieved: a failed turn is logged where it ran, not again as "never retrieved"

    # -- introspection --------------------------------------------------------------------------

    def introspect(self, limit: int = 100) -> dict[str, Any]:
        """Live activations per type with their mailbox depth, handled count and last activity."""
        now_mono, now_wall = time.monotonic(), time.time()
        out: dict[str, Any] = {}
        for act in reversed(self._activations.values()):  # most recently used first
            entry = out.setdefault(act.key[0], {"live": 0, "mailbox_depth": 0, "handled": 0, "actors": []})
            entry["live"] += 1
            entry["mailbox_depth"] += act.depth
            entry["handled"] += act.handled
            if len(entry["actors"]) < limit:
                entry["actors"].append(self._describe(act, now_mono, now_wall))
        for type_name in self._types:
            out.setdefault(type_name, {"live": 0, "mailbox_depth": 0, "handled": 0, "actors": []})
        return out

    def _describe(self, act: _Activation, now_mono: float, now_wall: float) -> dict[str, Any]:
        last = datetime.fromtimestamp(now_wall - (now_mono - act.last_activity), UTC)
        return {
            "id": act.key[1],
            "owner": self.placement.owner_of(act.key[1]) if self.placement is not None else "local",
            "mailbox_depth": act.depth,
            "handled": act.handled,
            "running": act.running,
            "version": act.version,
            "last_activity": last.isoformat().replace("+00:00", "Z"),
        }

    async def inspect(self, type_name: str, actor_id: str) -> dict[str, Any] | None:
        """One actor's state and version: live if active, else as stored. None if it never existed."""
        act = self._activations.get((type_name, actor_id))
        if act is not None and act.loaded:
            if self.exclusive or self.store is None or await self.store.version(type_name, actor_id) == act.version:
                info = self._describe(act, time.monotonic(), time.time())
                info.update(type=type_name, active=True, state=orjson.loads(act.committed))
                return info
            # Another process wrote since this copy was loaded: answer what is stored, and let the copy go (if
            # idle) so the next message loads the newest state instead of failing its fence first.
            self.stats["stale_reads"] += 1
            if not act.running and not act.depth:
                self._forget(act)
        if type_name not in self._types:
            return None
        if self.store is None:
            return None
        record = await self.store.load(type_name, actor_id)
        if record is None:
            return None
        return {
            "type": type_name,
            "id": actor_id,
            "owner": self.placement.owner_of(actor_id) if self.placement is not None else "local",
            "active": False,
            "version": record.version,
            "state": orjson.loads(record.state),
            "updated_at": record.updated_at.isoformat().replace("+00:00", "Z"),
            "mailbox_depth": 0,
            "handled": 0,
        }

    @property
    def live_count(self) -> int:
        return len(self._activations)

    def actor_types(self) -> Iterable[str]:
        return self._types.keys()


@dataclass(frozen=True, slots=True)
class _PeriodicReminder(ReminderFired):
    period: float | None = None


def _reminder_period(message: ReminderFired) -> float | None:
    return message.period if isinstance(message, _PeriodicReminder) else None


def _reply(fut: asyncio.Future[Any] | None, result: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future[Any] | None, exc: BaseException) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(exc)
    elif fut is None and isinstance(exc, Problem | DuplicateMessage):
        log.info("tell rejected: %s", exc)


def _expire(fut: asyncio.Future[Any], ref: ActorRef, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(AskTimeout(f"{ref._key[0]} {ref.id} did not answer within {timeout:g}s", retry_after=1))
