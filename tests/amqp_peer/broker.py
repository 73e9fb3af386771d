"""The broker model of the test peer: entities, sessions, locks, settlement, rules, dead letters.

Pure bookkeeping, no I/O: the AMQP layer (``amqp.py``) calls in when frames arrive and the broker
calls back into link objects (:class:`Receiver`) to deliver messages, hand over a session, or break
a link. Everything runs on one event loop and no method awaits, so state needs no locks.

What is modelled (the Service Bus behaviour the adapter relies on):

- queues, topics and subscriptions; ``requires_session`` entities only take session receivers and
  only accept messages with a session id; every queue and subscription has a ``$DeadLetterQueue``;
- session receivers: a named session or the next available one (held until one has messages, or
  until the link's ``com.microsoft:timeout``); a session is locked by one link at a time until
  ``lock_duration`` runs out unless renewed; an expired lock breaks the link
  (``com.microsoft:session-lock-lost``) and its unsettled messages become available again;
- per session, delivery in sequence-number order; an abandoned (``modified``) or released message
  goes back to its place, so it is delivered again before later ones;
- delivery count (the AMQP header, 0 on the first delivery, as Service Bus sends it): +1 on abandon,
  on lock expiry and when the holder's connection just vanishes; not on ``released`` nor when the
  receiver detaches (its locks are released); at ``max_delivery_count`` the broker dead-letters the
  message itself (``MaxDeliveryCountExceeded``);
- dead-lettering by the client (``rejected`` with ``com.microsoft:dead-letter`` and the reason and
  description in the error info), stored as the ``DeadLetterReason`` / ``DeadLetterErrorDescription``
  application properties like the real broker;
- duplicate detection on queues and topics (``requires_duplicate_detection``; a message id seen within
  the history window is accepted and dropped);
- topic fan-out through subscription rules: true/false filters, correlation filters (subject/label,
  ids, application properties) and the SQL filters ``1=1``, ``1=0`` and ``sys.Label = '...'``
  (other SQL is refused when the rule is created, so a test cannot silently pass on an ignored
  filter); a new subscription gets the ``$Default`` rule (true filter) unless told otherwise;
- ``AutoDeleteOnIdle`` of subscriptions: one without receivers (attached, holding or waiting for a
  session) and without traffic for that long is deleted (any duration, unlike the real 5-minute
  minimum); deleting a subscription detaches its receivers with ``amqp:not-found``.
"""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

DLQ_SUFFIX = "/$deadletterqueue"
SUBSCRIPTIONS = "/subscriptions/"

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"


class BrokerError(Exception):
    """A request the broker refuses; ``condition`` is the AMQP error condition to report."""

    def __init__(self, condition: bytes, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description
        self.status = status


NOT_FOUND = b"amqp:not-found"
NOT_ALLOWED = b"amqp:not-allowed"
SESSION_LOCK_LOST = b"com.microsoft:session-lock-lost"
MESSAGE_LOCK_LOST = b"com.microsoft:message-lock-lost"
SESSION_CANNOT_BE_LOCKED = b"com.microsoft:session-cannot-be-locked"
ARGUMENT_ERROR = b"com.microsoft:argument-error"
TIMEOUT = b"com.microsoft:timeout"


def _key(name: str) -> str:
    """Entity names are case-insensitive in Service Bus."""
    return name.strip("/").lower()


@dataclass(eq=False)
class Message:
    """One stored copy of a message in one entity (a queue, a subscription or a DLQ)."""

    seq: int
    enqueued_ms: int
    bare: bytes  # properties + application-properties + body sections exactly as sent
    message_id: str | None
    session_id: str | None
    subject: str | None
    correlation_id: str | None
    to: str | None
    reply_to: str | None
    content_type: str | None
    app_props: dict[str, Any]
    annotations: dict[str, Any]  # message annotations the sender set (x-opt-partition-key...)
    delivery_count: int = 0
    lock_token: uuid.UUID | None = None
    locked_by: Receiver | None = None
    locked_until: float = 0.0  # non-session entities: per-message lock
    dead_letter_source: str | None = None

    @property
    def available(self) -> bool:
        return self.locked_by is None


class Receiver(Protocol):
    """What the broker needs from a link the peer sends messages on (amqp.py implements it)."""

    name: str
    credit: int

    def deliver(self, entity: Entity, message: Message, locked_until: float) -> None: ...

    def session_acquired(self, entity: Entity, session: SessionState) -> None: ...

    def session_unavailable(self) -> None: ...

    def lock_lost(self, description: str) -> None: ...


@dataclass(eq=False)
class SessionState:
    session_id: str
    messages: list[Message] = field(default_factory=list)  # in sequence order
    owner: Receiver | None = None
    locked_until: float = 0.0
    state: bytes | None = None
    renewals: int = 0


@dataclass(eq=False)
class Waiter:
    receiver: Receiver
    deadline: float


@dataclass
class Rule:
    name: str
    kind: str  # "true", "false", "correlation", "sql"
    sql: str | None = None
    correlation: dict[str, Any] = field(default_factory=dict)  # subject, message_id, ..., properties

    def matches(self, message: Message) -> bool:
        if self.kind == "true":
            return True
        if self.kind == "false":
            return False
        if self.kind == "sql":
            label = _sql_label(self.sql or "")
            if label is _SQL_TRUE:
                return True
            if label is _SQL_FALSE:
                return False
            return message.subject == label
        c = self.correlation
        for attr in ("subject", "message_id", "session_id", "correlation_id", "to", "reply_to", "content_type"):
            wanted = c.get(attr)
            if wanted is not None and getattr(message, attr) != wanted:
                return False
        return all(message.app_props.get(key) == wanted for key, wanted in (c.get("properties") or {}).items())


_SQL_TRUE, _SQL_FALSE = object(), object()
_LABEL_RE = re.compile(r"^\s*sys\.label\s*=\s*'((?:[^']|'')*)'\s*$", re.IGNORECASE)


def _sql_label(sql: str) -> Any:
    text = sql.strip()
    if re.fullmatch(r"1\s*=\s*1", text):
        return _SQL_TRUE
    if re.fullmatch(r"1\s*=\s*0", text):
        return _SQL_FALSE
    match = _LABEL_RE.match(text)
    if match is None:
        raise BrokerError(ARGUMENT_ERROR, f"the test peer does not evaluate the SQL filter {sql!r}", 400)
    return match.group(1).replace("''", "'")


def check_rule(rule: Rule) -> Rule:
    if rule.kind == "sql":
        _sql_label(rule.sql or "")
    elif rule.kind not in ("true", "false", "correlation"):
        raise BrokerError(ARGUMENT_ERROR, f"unknown filter kind {rule.kind!r}", 400)
    return rule


class Entity:
    """A queue, a subscription or a dead-letter queue: something messages are received from."""

    def __init__(
        self,
        broker: Broker,
        path: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 60.0,
        dead_letter: bool = True,
    ) -> None:
        self.broker = broker
        self.path = path  # as created, e.g. "orders", "ecom-events/Subscriptions/order"
        self.requires_session = requires_session
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.sessions: dict[str, SessionState] = {}
        self.messages: list[Message] = []  # non-session entities
        self.waiters: list[Waiter] = []  # session receivers waiting for the next available session
        self.receivers: list[Receiver] = []  # attached non-session receivers
        self.dlq: Entity | None = (
            Entity(
                broker,
                path + "/$DeadLetterQueue",
                max_delivery_count=2**31,
                lock_duration=lock_duration,
                dead_letter=False,
            )
            if dead_letter
            else None
        )
        self._seq = itertools.count(1)
        self.properties: dict[str, Any] = {}  # the ATOM description, for reads

    # -- enqueue -------------------------------------------------------------------------------

    def enqueue(self, template: Message) -> Message:
        if self.requires_session and not template.session_id:
            raise BrokerError(
                ARGUMENT_ERROR,
                "The SessionId was not set on a message, and it cannot be sent to the entity. Entities that "
                "have session support enabled can only receive messages that have the SessionId set.",
            )
        message = Message(
            seq=next(self._seq),
            enqueued_ms=int(time.time() * 1000),
            bare=template.bare,
            message_id=template.message_id,
            session_id=template.session_id,
            subject=template.subject,
            correlation_id=template.correlation_id,
            to=template.to,
            reply_to=template.reply_to,
            content_type=template.content_type,
            app_props=dict(template.app_props),
            annotations=dict(template.annotations),
            delivery_count=template.delivery_count,
            dead_letter_source=template.dead_letter_source,
        )
        if self.requires_session:
            assert message.session_id is not None
            session = self.sessions.get(message.session_id)
            if session is None:
                session = self.sessions[message.session_id] = SessionState(message.session_id)
            session.messages.append(message)
            if session.owner is not None:
                self.pump_session(session)
            else:
                self.assign_sessions()
        else:
            self.messages.append(message)
            self.pump()
        return message

    # -- sessions ------------------------------------------------------------------------------

    def accept_session(self, receiver: Receiver, session_id: str | None, timeout: float) -> None:
        """A session receiver attached: lock the named session, or the next available one (maybe later)."""
        if not self.requires_session:
            raise BrokerError(
                NOT_ALLOWED,
                f"It is not possible for an entity that does not require sessions to create a session receiver: {self.path}",
            )
        now = time.time()
        if session_id is not None:
            session = self.sessions.get(session_id)
            if session is None:
                session = self.sessions[session_id] = SessionState(session_id)
            if session.owner is not None and session.locked_until > now:
                raise BrokerError(
                    SESSION_CANNOT_BE_LOCKED,
                    f"The requested session '{session_id}' cannot be accepted. It may be locked by another receiver.",
                    410,
                )
            self._lock(session, receiver)
            return
        self.waiters.append(Waiter(receiver, now + timeout))
        self.assign_sessions()

    def _lock(self, session: SessionState, receiver: Receiver) -> None:
        session.owner = receiver
        session.locked_until = time.time() + self.lock_duration
        receiver.session_acquired(self, session)
        self.pump_session(session)

    def assign_sessions(self) -> None:
        """Hand unlocked sessions with available messages to waiting receivers (oldest message first)."""
        if not self.waiters:
            return
        candidates = sorted(
            (s for s in self.sessions.values() if s.owner is None and any(m.available for m in s.messages)),
            key=lambda s: s.messages[0].seq,
        )
        for session in candidates:
            if not self.waiters:
                return
            waiter = self.waiters.pop(0)
            self._lock(session, waiter.receiver)

    def pump_session(self, session: SessionState) -> None:
        receiver = session.owner
        if receiver is None:
            return
        for message in session.messages:
            if receiver.credit <= 0:
                return
            if message.available:
                self._hand_out(message, receiver, session.locked_until)

    def release_session(self, session: SessionState, *, count_delivery: bool) -> None:
        """The owner is gone (detach, dropped connection, expired lock): unlock, return its messages."""
        owner = session.owner
        session.owner = None
        session.locked_until = 0.0
        for message in list(session.messages):
            if message.locked_by is owner and owner is not None:
                self._unlock(message, count_delivery=count_delivery)
        if not session.messages and session.state is None:
            self.sessions.pop(session.session_id, None)
        self.assign_sessions()

    def renew_session(self, session_id: str, receiver_name: str | None) -> float:
        session = self.sessions.get(session_id)
        now = time.time()
        if session is None or session.owner is None or session.locked_until <= now:
            raise BrokerError(SESSION_LOCK_LOST, f"The session lock has expired on the session '{session_id}'.", 410)
        if receiver_name is not None and session.owner.name != receiver_name:
            raise BrokerError(SESSION_LOCK_LOST, f"The session '{session_id}' is locked by another receiver.", 410)
        session.locked_until = now + self.lock_duration
        session.renewals += 1
        self.broker.renewals.append((self.path, session_id, session.locked_until))
        return session.locked_until

    def session_of(self, session_id: str, receiver_name: str | None) -> SessionState:
        session = self.sessions.get(session_id)
        if session is None or session.owner is None or session.locked_until <= time.time():
            raise BrokerError(SESSION_LOCK_LOST, f"The session lock has expired on the session '{session_id}'.", 410)
        if receiver_name is not None and session.owner.name != receiver_name:
            raise BrokerError(SESSION_LOCK_LOST, f"The session '{session_id}' is locked by another receiver.", 410)
        return session

    # -- non-session receive (dead-letter queues, non-session queues) -----------------------------

    def attach_receiver(self, receiver: Receiver) -> None:
        if self.requires_session:
            raise BrokerError(
                NOT_ALLOWED,
                f"It is not possible for an entity that requires sessions to create a non-sessionful message receiver: {self.path}",
            )
        self.receivers.append(receiver)
        self.pump()

    def detach_receiver(self, receiver: Receiver, *, count_delivery: bool) -> None:
        if receiver in self.receivers:
            self.receivers.remove(receiver)
        for message in list(self.messages):
            if message.locked_by is receiver:
                self._unlock(message, count_delivery=count_delivery)
        self.waiters = [w for w in self.waiters if w.receiver is not receiver]
        for session in list(self.sessions.values()):
            if session.owner is receiver:
                self.release_session(session, count_delivery=count_delivery)

    def pump(self) -> None:
        if self.requires_session:
            for session in list(self.sessions.values()):
                self.pump_session(session)
            return
        for message in self.messages:
            if not message.available:
                continue
            receiver = next((r for r in self.receivers if r.credit > 0), None)
            if receiver is None:
                return
            self._hand_out(message, receiver, time.time() + self.lock_duration)

    # -- delivery and settlement ---------------------------------------------------------------

    def _hand_out(self, message: Message, receiver: Receiver, locked_until: float) -> None:
        message.lock_token = uuid.uuid4()
        message.locked_by = receiver
        message.locked_until = locked_until
        self.broker.deliveries += 1
        receiver.deliver(self, message, locked_until)

    def _queue_of(self, message: Message) -> list[Message]:
        if self.requires_session:
            assert message.session_id is not None
            return self.sessions[message.session_id].messages
        return self.messages

    def _unlock(self, message: Message, *, count_delivery: bool) -> None:
        message.locked_by = None
        message.lock_token = None
        if count_delivery:
            message.delivery_count += 1
            if message.delivery_count >= self.max_delivery_count and self.dlq is not None:
                self.dead_letter(
                    message,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {self.max_delivery_count} delivery attempts.",
                )

    def _remove(self, message: Message) -> None:
        queue = self._queue_of(message)
        if message in queue:
            queue.remove(message)
        if self.requires_session and message.session_id is not None:
            session = self.sessions.get(message.session_id)
            if session is not None and not session.messages and session.owner is None and session.state is None:
                del self.sessions[message.session_id]

    def settle(self, message: Message, receiver: Receiver, outcome: str, **details: Any) -> None:
        """Apply a settlement from ``receiver``; raise BrokerError when it no longer holds the lock."""
        if message.locked_by is not receiver:
            raise BrokerError(
                MESSAGE_LOCK_LOST, "The lock supplied is invalid: it expired or the message was settled.", 410
            )
        if self.requires_session:
            session = self.sessions.get(message.session_id or "")
            if session is None or session.owner is not receiver or session.locked_until <= time.time():
                raise BrokerError(SESSION_LOCK_LOST, "The session lock has expired.", 410)
        if outcome == "accepted":
            self.broker.completed += 1
            message.locked_by = None
            self._remove(message)
        elif outcome == "released":
            self._unlock(message, count_delivery=False)
        elif outcome == "modified":
            if details.get("undeliverable_here"):
                raise BrokerError(NOT_ALLOWED, "deferral is not modelled by the test peer")
            self._unlock(message, count_delivery=bool(details.get("delivery_failed", True)))
        elif outcome == "rejected":
            message.locked_by = None
            self.dead_letter(message, details.get("reason"), details.get("description"))
        else:
            raise BrokerError(NOT_ALLOWED, f"unknown outcome {outcome!r}")
        self.pump_after_settle(message)

    def pump_after_settle(self, message: Message) -> None:
        if self.requires_session and message.session_id in self.sessions:
            self.pump_session(self.sessions[message.session_id])
        else:
            self.pump()

    def dead_letter(self, message: Message, reason: str | None, description: str | None) -> None:
        self._remove(message)
        message.locked_by = None
        message.lock_token = None
        if self.dlq is None:
            return
        props = dict(message.app_props)
        if reason is not None:
            props["DeadLetterReason"] = reason
        if description is not None:
            props["DeadLetterErrorDescription"] = description
        copy = Message(
            seq=0,
            enqueued_ms=message.enqueued_ms,
            bare=self.broker.rewrite_app_props(message.bare, props),
            message_id=message.message_id,
            session_id=message.session_id,
            subject=message.subject,
            correlation_id=message.correlation_id,
            to=message.to,
            reply_to=message.reply_to,
            content_type=message.content_type,
            app_props=props,
            annotations=dict(message.annotations),
            delivery_count=message.delivery_count,
            dead_letter_source=self.path,
        )
        self.broker.dead_lettered += 1
        stored = self.dlq.enqueue(copy)
        stored.enqueued_ms = message.enqueued_ms

    def find_locked(self, token: uuid.UUID) -> Message | None:
        pool: Iterable[Message] = (
            itertools.chain.from_iterable(s.messages for s in self.sessions.values())
            if self.requires_session
            else self.messages
        )
        return next((m for m in pool if m.lock_token == token and m.locked_by is not None), None)

    def peek(self, from_seq: int, count: int, session_id: str | None = None) -> list[Message]:
        if self.requires_session:
            pool = [m for s in self.sessions.values() if session_id in (None, s.session_id) for m in s.messages]
        else:
            pool = list(self.messages)
        return sorted((m for m in pool if m.seq >= from_seq), key=lambda m: m.seq)[:count]

    def all_messages(self) -> list[Message]:
        if self.requires_session:
            return sorted((m for s in self.sessions.values() for m in s.messages), key=lambda m: m.seq)
        return list(self.messages)

    # -- time ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for waiter in [w for w in self.waiters if w.deadline <= now]:
            self.waiters.remove(waiter)
            waiter.receiver.session_unavailable()
        for session in list(self.sessions.values()):
            if session.owner is not None and session.locked_until <= now:
                owner = session.owner
                self.broker.expired_locks.append((self.path, session.session_id))
                self.release_session(session, count_delivery=True)
                owner.lock_lost(f"The session lock has expired on the session '{session.session_id}'.")
        if not self.requires_session:
            for message in list(self.messages):
                if message.locked_by is not None and message.locked_until <= now:
                    self._unlock(message, count_delivery=True)
            self.pump()


class DuplicateDetector:
    def __init__(self, window: float) -> None:
        self.window = window
        self.seen: dict[str, float] = {}

    def is_duplicate(self, message_id: str | None, now: float) -> bool:
        if message_id is None:
            return False
        expiry = self.seen.get(message_id)
        if expiry is not None and expiry > now:
            return True
        self.seen[message_id] = now + self.window
        return False

    def tick(self, now: float) -> None:
        for key in [k for k, v in self.seen.items() if v <= now]:
            del self.seen[key]


class Queue(Entity):
    def __init__(self, broker: Broker, path: str, *, duplicate_window: float | None = None, **kwargs: Any) -> None:
        super().__init__(broker, path, **kwargs)
        self.dedup = DuplicateDetector(duplicate_window) if duplicate_window else None


class Subscription(Entity):
    def __init__(
        self, broker: Broker, topic: Topic, name: str, *, auto_delete_on_idle: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(broker, f"{topic.path}/Subscriptions/{name}", **kwargs)
        self.topic = topic
        self.name = name
        self.rules: dict[str, Rule] = {}
        self.auto_delete_on_idle = auto_delete_on_idle  # seconds; None: never
        self.last_active = time.time()

    def in_use(self) -> bool:
        return bool(self.waiters or self.receivers or any(s.owner is not None for s in self.sessions.values()))

    def receivers_of(self) -> list[Any]:
        """Every link reading from it: attached, holding a session, waiting for one."""
        links: list[Any] = [*self.receivers, *(w.receiver for w in self.waiters)]
        links += [s.owner for s in self.sessions.values() if s.owner is not None]
        return links

    def accepts(self, message: Message) -> bool:
        return any(rule.matches(message) for rule in self.rules.values())


class Topic:
    def __init__(self, broker: Broker, path: str, *, duplicate_window: float | None = None) -> None:
        self.broker = broker
        self.path = path
        self.subscriptions: dict[str, Subscription] = {}
        self.dedup = DuplicateDetector(duplicate_window) if duplicate_window else None
        self.properties: dict[str, Any] = {}

    def publish(self, message: Message) -> int:
        copies = 0
        for sub in list(self.subscriptions.values()):
            if sub.accepts(message):
                sub.last_active = time.time()
                sub.enqueue(message)
                copies += 1
        return copies


class Broker:
    """All entities of one namespace, plus counters tests can assert on."""

    def __init__(self, *, rewrite_app_props: Any = None) -> None:
        self.queues: dict[str, Queue] = {}
        self.topics: dict[str, Topic] = {}
        # Set by the AMQP layer: re-encode a bare message with new application properties.
        self.rewrite_app_props = rewrite_app_props or (lambda bare, props: bare)
        self.renewals: list[tuple[str, str, float]] = []
        self.expired_locks: list[tuple[str, str]] = []
        self.duplicates_dropped = 0
        self.deleted_subscriptions: list[tuple[str, str, str]] = []  # (topic, name, why)
        self.deliveries = 0
        self.completed = 0
        self.dead_lettered = 0
        self.sent = 0

    # -- entity management (what the ATOM endpoint and tests call) ---------------------------

    def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 60.0,
        requires_duplicate_detection: bool = False,
        duplicate_window: float = 600.0,
    ) -> Queue:
        key = _key(name)
        if key in self.queues or key in self.topics:
            raise BrokerError(
                b"com.microsoft:entity-already-exists", f"The messaging entity '{name}' already exists.", 409
            )
        queue = Queue(
            self,
            name,
            requires_session=requires_session,
            max_delivery_count=max_delivery_count,
            lock_duration=lock_duration,
            duplicate_window=duplicate_window if requires_duplicate_detection else None,
        )
        self.queues[key] = queue
        return queue

    def create_topic(
        self, name: str, *, requires_duplicate_detection: bool = False, duplicate_window: float = 600.0
    ) -> Topic:
        key = _key(name)
        if key in self.queues or key in self.topics:
            raise BrokerError(
                b"com.microsoft:entity-already-exists", f"The messaging entity '{name}' already exists.", 409
            )
        topic = self.topics[key] = Topic(
            self, name, duplicate_window=duplicate_window if requires_duplicate_detection else None
        )
        return topic

    def create_subscription(
        self,
        topic_name: str,
        name: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 60.0,
        default_rule: Rule | None = None,
        auto_delete_on_idle: float | None = None,
    ) -> Subscription:
        topic = self.topic(topic_name)
        key = _key(name)
        if key in topic.subscriptions:
            raise BrokerError(b"com.microsoft:entity-already-exists", f"The subscription '{name}' already exists.", 409)
        sub = Subscription(
            self,
            topic,
            name,
            requires_session=requires_session,
            max_delivery_count=max_delivery_count,
            lock_duration=lock_duration,
            auto_delete_on_idle=auto_delete_on_idle,
        )
        rule = check_rule(default_rule or Rule("$Default", "true"))
        sub.rules[rule.name] = rule
        topic.subscriptions[key] = sub
        return sub

    def delete_subscription(self, topic_name: str, name: str, *, why: str = "deleted") -> Subscription:
        """Remove it; links still reading from it are detached with amqp:not-found, as Service Bus does."""
        topic = self.topic(topic_name)
        sub = topic.subscriptions.pop(_key(name), None)
        if sub is None:
            raise BrokerError(NOT_FOUND, f"The subscription '{name}' could not be found.", 404)
        links = sub.receivers_of()
        sub.waiters.clear()
        sub.receivers.clear()
        for session in sub.sessions.values():
            session.owner = None
        for link in links:
            gone = getattr(link, "entity_deleted", None)
            if gone is not None:
                gone(f"The messaging entity '{sub.path}' was {why}.")
        self.deleted_subscriptions.append((topic.path, sub.name, why))
        return sub

    def create_rule(self, topic_name: str, subscription: str, rule: Rule) -> Rule:
        sub = self.subscription(topic_name, subscription)
        if rule.name in sub.rules:
            raise BrokerError(b"com.microsoft:entity-already-exists", f"The rule '{rule.name}' already exists.", 409)
        sub.rules[rule.name] = check_rule(rule)
        return rule

    def delete_rule(self, topic_name: str, subscription: str, rule_name: str) -> None:
        sub = self.subscription(topic_name, subscription)
        if sub.rules.pop(rule_name, None) is None:
            raise BrokerError(NOT_FOUND, f"The rule '{rule_name}' does not exist.", 404)

    def queue(self, name: str) -> Queue:
        queue = self.queues.get(_key(name))
        if queue is None:
            raise BrokerError(NOT_FOUND, f"The messaging entity '{name}' could not be found.", 404)
        return queue

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(_key(name))
        if topic is None:
            raise BrokerError(NOT_FOUND, f"The messaging entity '{name}' could not be found.", 404)
        return topic

    def subscription(self, topic_name: str, name: str) -> Subscription:
        sub = self.topic(topic_name).subscriptions.get(_key(name))
        if sub is None:
            raise BrokerError(
                NOT_FOUND, f"The messaging entity '{topic_name}/Subscriptions/{name}' could not be found.", 404
            )
        return sub

    # -- addressing ----------------------------------------------------------------------------

    def source(self, path: str) -> Entity:
        """The entity a receiver link reads from: queue, topic/Subscriptions/sub, or their DLQ."""
        key = _key(path)
        dead = key.endswith(DLQ_SUFFIX)
        if dead:
            key = key[: -len(DLQ_SUFFIX)]
        entity: Entity
        if SUBSCRIPTIONS in key:
            topic, sub = key.split(SUBSCRIPTIONS, 1)
            entity = self.subscription(topic, sub)
        else:
            entity = self.queue(key)
        if dead:
            assert entity.dlq is not None
            return entity.dlq
        return entity

    def send(self, path: str, message: Message) -> str:
        """A sender link delivered ``message`` to ``path``; returns what happened (for tests)."""
        key = _key(path)
        now = time.time()
        self.sent += 1
        if key in self.queues:
            queue = self.queues[key]
            if queue.dedup is not None and queue.dedup.is_duplicate(message.message_id, now):
                self.duplicates_dropped += 1
                return "duplicate"
            queue.enqueue(message)
            return "enqueued"
        if key in self.topics:
            topic = self.topics[key]
            if topic.dedup is not None and topic.dedup.is_duplicate(message.message_id, now):
                self.duplicates_dropped += 1
                return "duplicate"
            return f"published to {topic.publish(message)}"
        raise BrokerError(NOT_FOUND, f"The messaging entity '{path}' could not be found.", 404)

    def check_target(self, path: str) -> None:
        key = _key(path)
        if key not in self.queues and key not in self.topics:
            raise BrokerError(NOT_FOUND, f"The messaging entity '{path}' could not be found.", 404)

    def expire_lock(self, path: str, session_id: str) -> None:
        """Make a session lock run out now (as if its holder stopped renewing); the next tick acts."""
        session = self.source(path).sessions[session_id]
        session.locked_until = time.time() - 0.001

    def entities(self) -> list[Entity]:
        found: list[Entity] = []
        for queue in self.queues.values():
            found += [queue, queue.dlq] if queue.dlq else [queue]
        for topic in self.topics.values():
            for sub in topic.subscriptions.values():
                found += [sub, sub.dlq] if sub.dlq else [sub]
        return found

    def tick(self) -> None:
        now = time.time()
        for entity in self.entities():
            entity.tick(now)
        for holder in (*self.queues.values(), *self.topics.values()):
            if holder.dedup is not None:
                holder.dedup.tick(now)
        for topic in self.topics.values():
            for sub in list(topic.subscriptions.values()):
                if sub.in_use():
                    sub.last_active = now
                elif sub.auto_delete_on_idle is not None and now - sub.last_active >= sub.auto_delete_on_idle:
                    self.delete_subscription(topic.path, sub.name, why="deleted after AutoDeleteOnIdle")
