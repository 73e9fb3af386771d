"""Azure Service Bus backend (``ECOM_BUS=azure``), on ``azure-servicebus`` (``azure.servicebus.aio``).

Mapping of the Bus contract (bus/base.py) onto Service Bus:

- ``send(queue, env)``: a session-enabled queue per service; the message's ``session_id`` is the
  envelope's (the target entity id), so Service Bus delivers one entity's messages in order to one
  receiver at a time. ``publish(env)``: the topic ``ecom-events``; every subscribing service has a
  session-enabled subscription with one rule per event type, a correlation filter on ``subject``
  (= the envelope type). Every message carries ``message_id`` (duplicate detection),
  ``correlation_id``, the headers as application properties, and the envelope JSON as its body.
- Consumers are session processors: receivers on ``NEXT_AVAILABLE_SESSION``, each holding one
  session while it has messages (up to ``max_concurrent_sessions`` at once, plus a couple of idle
  receivers waiting for the next session). A held session's lock is renewed in the background; if the
  lock is lost anyway the handler is cancelled and the session dropped, so Service Bus hands it (and
  its unsettled message) to whoever accepts it next.
- Handler returns: complete. Handler raises: abandon (the delivery count goes up and the same receiver
  gets the message again before any later one of the session); on the ``max_attempts``-th delivery:
  dead-letter with the error as ``DeadLetterReason`` and the attempt count and time as a JSON
  ``DeadLetterErrorDescription``. Queues and subscriptions are created with ``MaxDeliveryCount =
  max_attempts`` so a message whose receiver keeps dying is dead-lettered by the broker too.
- ``broadcast(types, h)``: a subscription per call (unique name, ``AutoDeleteOnIdle`` as a backstop
  for a process that dies without stopping it, a correlation rule on ``subject`` per type) read by one
  session receiver at a time; stop()/close() delete it through the management API.
- ``dead_letters(name)`` peeks the ``$DeadLetterQueue`` of the queue and of the subscription with that
  name (peeking locks nothing). ``discard_dead_letter`` receives from it in peek-lock mode, completes the
  one message and abandons the others; ``redeliver`` sends to the queue, or publishes on the topic with
  subject ``ecom-replay`` and ``ecom-replay-to = <subscription>``, which only that subscription's
  ``ecom-replay`` rule matches (every subscription gets that rule; bus/deadletters.py). The broker-level
  message id of a redelivery gets a suffix so duplicate detection does not drop it; the envelope keeps its id.
- Entities are created on first use through ``ServiceBusAdministrationClient`` (needs a connection
  string with Manage rights); without them the bus logs it once and relies on ``ecom bus provision``
  having created everything beforehand (see :func:`provision`).

The code is in the package ``bus.servicebus`` (connection, messages, management, sending, receiving,
broadcast, azurebus); this module is the backend's public face (``runtime.cli`` imports ``bus.<backend>``
and calls ``create_bus``; ``ecom bus provision``, in ``runtime.cli``, calls :func:`provision`).

Configured by ``ECOM_BUS_URL`` (a connection string) or ``ECOM_BUS_NAMESPACE`` (with
``azure.identity.aio.DefaultAzureCredential``, imported only then).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from azure.servicebus.aio.management import ServiceBusAdministrationClient

from bus.servicebus.azurebus import AzureBus
from bus.servicebus.broadcast import AzureBroadcast
from bus.servicebus.connection import _connection_args
from bus.servicebus.management import _Provisioner, rule_name
from bus.servicebus.messages import (
    DEFAULT_DUPLICATE_WINDOW,
    TOPIC,
    _check_name,
    to_message,
)
from bus.servicebus.receiving import AzureConsumer

if TYPE_CHECKING:
    from config import Settings

__all__ = ["TOPIC", "AzureBroadcast", "AzureBus", "AzureConsumer", "create_bus", "provision"]
# Also importable from here, as before the split.
__all__ += ["DEFAULT_DUPLICATE_WINDOW", "rule_name", "to_message"]


# -- configuration, provisioning, CLI -----------------------------------------------------------


def create_bus(settings: Settings, **options: Any) -> AzureBus:
    """The AzureBus for these settings (``runtime.cli.make_bus`` calls this for ``ECOM_BUS=azure``)."""
    args = _connection_args(settings)
    return AzureBus(
        **args,
        close_credential="credential" in args,
        max_attempts=settings.bus.max_attempts,
        max_concurrent_sessions=settings.bus.max_concurrent_sessions,
        **options,
    )


async def provision(
    settings: Settings,
    *,
    queues: Sequence[str],
    subscriptions: Mapping[str, Collection[str]],
    lock_duration: timedelta = timedelta(seconds=60),
    duplicate_detection_window: timedelta | None = DEFAULT_DUPLICATE_WINDOW,
    admin_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the service queues, the ``ecom-events`` topic, and the subscriptions with their rules.

    Idempotent: existing entities are kept (their settings are not changed), rules are made to match
    exactly the given event types. ``ecom bus provision`` passes what the services' descriptions consume
    (:func:`runtime.services.bus_plan`). Returns one line per thing done or found, for the CLI to print.
    """
    args = _connection_args(settings)
    options = dict(admin_options or {})
    if "connection_string" in args:
        admin = ServiceBusAdministrationClient.from_connection_string(args["connection_string"], **options)
    else:
        admin = ServiceBusAdministrationClient(args["namespace"], args["credential"], **options)
    provisioner = _Provisioner(
        admin,
        topic=TOPIC,
        max_delivery_count=settings.bus.max_attempts,
        lock_duration=lock_duration,
        duplicate_window=duplicate_detection_window,
    )
    report: list[str] = []
    try:
        for queue in queues:
            _check_name("queue", queue)
            created = await provisioner.queue(queue)
            report.append(f"queue {queue}: {'created' if created else 'exists'}")
        created = await provisioner.ensure_topic()
        report.append(f"topic {TOPIC}: {'created' if created else 'exists'}")
        for name, types in subscriptions.items():
            _check_name("subscription", name)
            if isinstance(types, str) or not types:
                raise ValueError(f"subscription {name}: give a non-empty collection of event types")
            changes = await provisioner.subscription(name, frozenset(types))
            report.append(f"subscription {TOPIC}/{name}: {', '.join(changes) if changes else 'up to date'}")
    finally:
        await admin.close()
        credential = args.get("credential")
        if credential is not None:
            await credential.close()
    return report
