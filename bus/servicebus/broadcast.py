"""Broadcast: a subscription per process and call (unique name, AutoDeleteOnIdle as a backstop), read by
one session receiver at a time, deleted by stop()."""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
)
from azure.servicebus.aio import ServiceBusReceiver

from bus.base import (
    Handler,
    retry_then_drop,
)
from bus.servicebus.receiving import AzureConsumer

if TYPE_CHECKING:
    from bus.servicebus.azurebus import AzureBus

log = logging.getLogger(__name__)

BROADCAST_AUTO_DELETE = timedelta(minutes=5)  # a broadcast subscription nobody uses this long is deleted


def _broadcast_name() -> str:
    """A unique subscription name an operator can trace to its process (at most 50 characters)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:16].strip("-") or "host"
    return f"bc-{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class AzureBroadcast:
    """A broadcast subscription of this process: stop() stops receiving and deletes the subscription."""

    def __init__(self, bus: AzureBus, subscription: str, event_types: frozenset[str], handler: Handler) -> None:
        self._bus = bus
        self.subscription = subscription
        self.event_types = event_types
        self.recreated = 0
        label = f"{bus.topic}/{subscription}"
        self._consumer = AzureConsumer(
            bus,
            label,
            self._make_receiver,
            retry_then_drop(handler, f"broadcast {label}", bus.broadcast_attempts, bus.broadcast_retry_delay),
            1,  # one session, one handler call at a time: the stream's order
            on_missing=self._recreate,
        )
        self._stopped = False

    def _make_receiver(self) -> ServiceBusReceiver:
        bus = self._bus
        assert bus._receive_client is not None
        return bus._receive_client.get_subscription_receiver(
            bus.topic, self.subscription, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=bus.accept_timeout
        )

    async def _recreate(self) -> None:
        # Deleted under us (AutoDeleteOnIdle after the process was suspended that long, an operator):
        # make it again, or this process would silently stop hearing announcements.
        if self._stopped:
            return
        log.warning("broadcast subscription %s/%s is gone; re-creating it", self._bus.topic, self.subscription)
        await self._bus._create_broadcast(self.subscription, self.event_types)
        self.recreated += 1

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._bus._broadcasts.discard(self)
        await self._consumer.stop()
        await self._bus._delete_broadcast(self.subscription)
