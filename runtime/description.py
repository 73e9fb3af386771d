"""A service, declared: one frozen :class:`ServiceDescription` per service says everything the runtime needs.

Each service's ``service.py`` declares ``SERVICE = ServiceDescription(...)``:

- ``actors``: its actor types, each with its dependencies (:class:`ActorType`): the actor system builds every
  activation as ``Actor(actor_id, system, **deps)``, constructor injection as in Orleans/Dapr, so no service
  subclasses an actor at run time to configure it;
- ``resources``: what else it runs (a catalog client, admission control, the payment processor, identity's
  housekeeping): each a :class:`Resource` built when the app is made, kept under its ``web.AppKey`` (so routes
  and later resources find it) and started and stopped as its own cleanup context;
- ``consumes``: the queues and subscriptions it takes messages from (:class:`Queue`, :class:`Subscription`,
  names from :mod:`contracts.queues`), and where each message type goes (:class:`ToActor`, :class:`ToHandler`);
  ``sends`` and ``publishes``: what it puts on the bus;
- ``http``: its aiohttp routes and app options (:class:`Http`); ``gateway_routes``: the entries of the
  gateway's route table for it (from the service's light ``public.py``, so the gateway imports no service);
- ``schema`` (:class:`runtime.migrate.Component`) and ``seed`` (first-run data);
- ``options``: a frozen dataclass of the overrides its ``create_app`` takes besides ``bus``, ``database_url``
  and ``verifier`` (tests and embedded mode).

Readers: :func:`runtime.host.service_app` builds and starts the service from it; :mod:`runtime.services` lists
the descriptions for ``ecom run``/``serve``/``db``, computes the bus plan ``ecom bus provision`` creates
(:func:`runtime.services.bus_plan`) and the gateway's route table; the admin endpoints list its actor types.

Start order (each part its own cleanup context, :mod:`runtime.web.resources`): the runtime's parts (engine ...
revocation listener), then the resources in declaration order, then the consumers; the way down is the
reverse, so no message is consumed once a resource it needs is stopped. A resource whose start fails has its
``stop`` called (it must cope with a half-made start) and everything started before it is stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aiohttp import web

from runtime.actors import Actor, ActorFactory

if TYPE_CHECKING:
    from bus.envelope import Envelope
    from config import Settings
    from runtime.messages import BusBinding
    from runtime.migrate import Component
    from runtime.routes import Route
    from runtime.web.resources import ServiceRuntime

__all__ = [
    "ActorType",
    "BusRoute",
    "Http",
    "NoOptions",
    "Queue",
    "Resource",
    "ServiceContext",
    "ServiceDescription",
    "Subscription",
    "ToActor",
    "ToHandler",
]

T = TypeVar("T")

BusRoute = Callable[["Envelope"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class NoOptions:
    """A service whose ``create_app`` takes no overrides besides ``bus``, ``database_url`` and ``verifier``."""


@dataclass(frozen=True, slots=True)
class ActorType:
    """An actor type the service hosts; ``deps(context)`` gives the keyword arguments its constructor takes
    besides ``(actor_id, system)``, computed once when the app is made (after the resources are built)."""

    actor: type[Actor]
    deps: Callable[[ServiceContext], Mapping[str, Any]] | None = None

    @property
    def type_name(self) -> str:
        return self.actor.type_name

    def factory(self, context: ServiceContext) -> ActorFactory | None:
        if self.deps is None:
            return None
        return functools.partial(self.actor, **self.deps(context))


@dataclass(frozen=True, slots=True)
class Resource(Generic[T]):
    """Something the service runs besides the runtime's parts. ``build(context)`` makes it when the app is made
    (opening nothing); ``start`` / ``stop`` run as its cleanup context. ``stop`` also runs when ``start`` fails,
    so it must cope with a start that did not happen or half happened."""

    key: web.AppKey[T]
    build: Callable[[ServiceContext], T]
    start: Callable[[T], Awaitable[Any]] | None = None
    stop: Callable[[T], Awaitable[Any]] | None = None

    @property
    def name(self) -> str:
        # aiohttp keeps an AppKey's name ("module.name") private; the last part names the cleanup context
        full: str = getattr(self.key, "_name", "") or repr(self.key)
        return full.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class ToActor:
    """Envelopes of ``message`` go to the ``actor`` named by the session id, or by ``actor_id(message, env)``."""

    message: type
    actor: type[Actor]
    actor_id: Callable[[Any, Envelope], str] | None = None


@dataclass(frozen=True, slots=True)
class ToHandler:
    """Envelopes of ``message`` go to the coroutine ``make(context, binding)`` returns (made at start, when the
    resources exist; ``binding.actor_route`` gives the delivery to an actor, for a handler that adds to it)."""

    message: type
    make: Callable[[ServiceContext, BusBinding], BusRoute]


Delivery = ToActor | ToHandler


@dataclass(frozen=True, slots=True)
class _Consumed:
    """What a service consumes from the bus: a name and a delivery per message type."""

    name: str
    deliveries: tuple[Delivery, ...]

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted(d.message.__name__ for d in self.deliveries))


@dataclass(frozen=True, slots=True)
class Queue(_Consumed):
    """A queue the service consumes (point to point, session = the entity)."""


@dataclass(frozen=True, slots=True)
class Subscription(_Consumed):
    """The service's subscription to published events: it receives exactly the types of its deliveries."""


@dataclass(frozen=True, slots=True)
class Http:
    """The service's HTTP side. ``routes``: route definitions or a ``setup(app)`` function (the service's
    ``api.py``). The rest is for a service that needs more of the app (the gateway): a body limit, middlewares
    after the host's, and ``on_app(context, app)`` for response hooks or metric collectors."""

    routes: Sequence[web.AbstractRouteDef] | Callable[[web.Application], None]
    title: str | None = None
    client_max_size: Callable[[ServiceContext], int] | None = None
    middlewares: Callable[[ServiceContext], Sequence[Any]] | None = None
    on_app: Callable[[ServiceContext, web.Application], None] | None = None


@dataclass(frozen=True, slots=True)
class ServiceDescription:
    name: str
    http: Http
    options: type = NoOptions
    database: bool = True  # its own database, state store and actor system (the gateway has none)
    actors: tuple[ActorType, ...] = ()
    resources: tuple[Resource[Any], ...] = ()
    consumes: tuple[Queue | Subscription, ...] = ()
    sends: Mapping[str, tuple[type, ...]] = field(default_factory=dict)  # queue -> message classes sent to it
    publishes: tuple[type, ...] = ()  # event classes
    gateway_routes: tuple[Route, ...] = ()
    schema: Component | None = None
    seed: Callable[[Settings], Awaitable[Any]] | None = None
    bus_readiness: bool = True  # False: a bus that does not answer does not make the service unready

    @property
    def actor_types(self) -> tuple[str, ...]:
        return tuple(a.type_name for a in self.actors)

    @property
    def queues(self) -> tuple[Queue, ...]:
        return tuple(c for c in self.consumes if isinstance(c, Queue))

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(c for c in self.consumes if isinstance(c, Subscription))


@dataclass(slots=True)
class ServiceContext:
    """What the declared factories get: the settings, the runtime's parts, the ``create_app`` options and the
    resources built so far (``context[KEY]``)."""

    description: ServiceDescription
    settings: Settings
    runtime: ServiceRuntime
    options: Any  # an instance of ``description.options``
    verifier_given: bool = False  # the caller passed its own token verifier (tests): keep it
    resources: dict[web.AppKey[Any], Any] = field(default_factory=dict)

    def __getitem__(self, key: web.AppKey[T]) -> T:
        try:
            value: T = self.resources[key]
        except KeyError:
            raise KeyError(f"{self.description.name}: resource {key!r} is not built yet (declared later?)") from None
        return value

    @property
    def system(self) -> Any:  # runtime.actors.ActorSystem; None without a database
        return self.runtime.system

    @property
    def engine(self) -> Any:  # sqlalchemy AsyncEngine; None without a database
        return self.runtime.engine
