"""Bus messages as frozen dataclasses, and the binding that delivers bus envelopes to actors.

Each service declares its commands and events in ``messages.py`` as frozen dataclasses. On the bus they
travel as :class:`bus.envelope.Envelope` with ``type`` = the class name and ``body`` = the fields as JSON
(Decimal as a string, datetime as RFC 3339, nested dataclasses as objects, tuples as arrays).

:class:`BusBinding` is the one consumer a service registers per queue/subscription: it decodes the body
into the message class and asks the actor named by ``session_id``, passing the envelope's ``message_id``
so the actor's inbox drops a redelivered copy. A handler error makes the bus redeliver (and in the end
dead-letter) the message.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, TypeVar, cast

from bus.base import MalformedMessage
from bus.envelope import Envelope
from runtime import tracing
from runtime.actors import Actor, ActorRef, ActorSystem, DuplicateMessage
from runtime.cluster import Cluster, is_forwarded
from runtime.jsonutil import dataclass_encoder, to_jsonable

log = logging.getLogger(__name__)

T = TypeVar("T")


def to_body(message: Any) -> dict[str, Any]:
    """A dataclass message as a JSON-compatible dict (:func:`runtime.jsonutil.to_jsonable`)."""
    encode = dataclass_encoder(type(message))
    if encode is None:
        return {f.name: to_jsonable(getattr(message, f.name)) for f in dataclasses.fields(message)}  # raises TypeError
    return encode(message)


_encode = to_jsonable  # the old name of the encoder, kept for any caller of it


def from_body(cls: type[T], body: Mapping[str, Any]) -> T:
    """Build ``cls`` from a body; a missing or mistyped field raises MalformedMessage naming it."""
    if not isinstance(body, Mapping):
        raise MalformedMessage(f"{cls.__name__}: body must be an object")
    kwargs: dict[str, Any] = {}
    for name, required, decode in _plan(cast(type, cls)):
        if name not in body:
            if required:
                raise MalformedMessage(f"{cls.__name__}: field {name!r} is missing")
            continue
        try:
            kwargs[name] = decode(body[name])
        except (TypeError, ValueError, InvalidOperation) as exc:
            raise MalformedMessage(f"{cls.__name__}: field {name!r}: {exc}") from None
    return cls(**kwargs)


Decoder = Callable[[Any], Any]


@cache
def _plan(cls: type) -> tuple[tuple[str, bool, Decoder], ...]:
    """Per field of dataclass ``cls``: its name, whether the body must have it, and its decoder (:func:`_decoder`
    of its type hint). Made once per class: the generic walk over ``dataclasses.fields`` and ``typing`` per value was
    a hot spot of a checkout (issue 14)."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            _decoder(hints[f.name]),
        )
        for f in dataclasses.fields(cls)
    )


def _decoder(kind: Any) -> Decoder:
    """The function that turns a body value into ``kind``: raises TypeError/ValueError/InvalidOperation (with the
    text the old per-value walk gave) for a value of the wrong type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if members:
            # Only the first non-None member is ever tried (as before: unions of messages are Optional[X]).
            first = _decoder(members[0])
            return _optional(first) if len(members) < len(typing.get_args(kind)) else first
    if kind is Any:
        return _as_is
    if kind is Decimal:
        return _decimal
    if kind is datetime:
        return datetime.fromisoformat
    if origin in (tuple, list, frozenset, set):
        args = typing.get_args(kind)
        return _sequence(origin, _decoder(args[0] if args else Any))
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        return _mapping
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return functools.partial(from_body, kind)
    if kind in (str, int, bool):
        return _exactly(kind)
    if kind is float:
        return _float
    return _as_is


def _as_is(value: Any) -> Any:
    return value


def _optional(decode: Decoder) -> Decoder:
    def optional(value: Any) -> Any:
        return None if value is None else decode(value)

    return optional


def _decimal(value: Any) -> Decimal:
    if isinstance(value, float):
        raise TypeError("money must be a decimal string, not a float")
    return Decimal(str(value))


def _sequence(origin: Callable[[list[Any]], Any], decode: Decoder) -> Decoder:
    def sequence(value: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError("expected an array")
        return origin([decode(v) for v in value])

    return sequence


def _mapping(value: Any) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError("expected an object")
    return dict(value)


def _exactly(kind: type) -> Decoder:
    refuse_bool = kind is int

    def exactly(value: Any) -> Any:
        if not isinstance(value, kind) or (refuse_bool and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return exactly


def _float(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError("expected a number")
    return float(value)


def _cluster_of(system: ActorSystem) -> Cluster | None:
    placement = system.placement
    return placement if isinstance(placement, Cluster) else None


def envelope(
    message: Any, *, session_id: str, correlation_id: str | None = None, message_id: str | None = None
) -> Envelope:
    """Wrap a dataclass message for the bus; ``type`` is the class name."""
    extra: dict[str, Any] = {"message_id": message_id} if message_id else {}
    return Envelope(
        type=type(message).__name__,
        session_id=session_id,
        body=to_body(message),
        correlation_id=correlation_id,
        headers=tracing.context_headers(),  # the turn's traceparent, stored with the outbox row
        **extra,
    )


Route = Callable[[Envelope], Awaitable[None]]


async def deliver(ref: ActorRef, message: Any, env: Envelope, *, timeout: float | None = None) -> None:
    """Ask ``ref`` with the envelope's message id, so the actor's inbox drops a redelivered copy."""
    try:
        await ref.ask(message, timeout=timeout, message_id=env.message_id)
    except DuplicateMessage:
        log.debug("duplicate %s %s for %r skipped", env.type, env.message_id, ref)


class BusBinding:
    """Delivers the envelopes of one queue or subscription to actors, by message type."""

    def __init__(self, system: ActorSystem) -> None:
        self.system = system
        self.routes: dict[str, Route] = {}
        cluster = _cluster_of(system)
        if cluster is not None:
            cluster.add_binding(self)  # messages forwarded to this member by its peers come in here

    def to_actor(
        self,
        message_class: type,
        actor_class: type[Actor],
        *,
        actor_id: Callable[[Any, Envelope], str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Envelopes of ``message_class`` go to ``actor_class``; the actor id is the envelope's session id
        unless ``actor_id(message, envelope)`` picks another (an event keyed by one entity, for another)."""
        self.routes[message_class.__name__] = self.actor_route(
            message_class, actor_class, actor_id=actor_id, timeout=timeout
        )

    def actor_route(
        self,
        message_class: type,
        actor_class: type[Actor],
        *,
        actor_id: Callable[[Any, Envelope], str] | None = None,
        timeout: float | None = None,
    ) -> Route:
        """The delivery :meth:`to_actor` registers, for a handler that does more around it."""

        async def route(env: Envelope) -> None:
            message: Any = from_body(message_class, env.body)
            target = actor_id(message, env) if actor_id is not None else env.session_id
            cluster = _cluster_of(self.system)
            if cluster is not None and not is_forwarded() and not cluster.owns(target):
                # The bus gave the session to this member, the entity lives on another: hand it over and
                # acknowledge once the owner has applied it. Per-entity order holds because the bus hands
                # one session's messages out one at a time and this waits for each.
                owner = cluster.owner_of(target)
                if owner is not None and await cluster.forward_envelope(env, owner):
                    return
            await deliver(self.system.ref(actor_class, target), message, env, timeout=timeout)

        return route

    def to_handler(self, type_name: str, handler: Route) -> None:
        """Envelopes of ``type_name`` go to a custom coroutine (e.g. one event fanned out to many actors)."""
        self.routes[type_name] = handler

    @property
    def types(self) -> list[str]:
        return list(self.routes)

    async def __call__(self, env: Envelope) -> None:
        route = self.routes.get(env.type)
        if route is None:
            raise MalformedMessage(f"no route for message type {env.type!r}")
        await route(env)
