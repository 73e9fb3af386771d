"""Sending: one serialised outbox per entity that batches what piles up while a transfer is in flight."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from azure.servicebus import (
    ServiceBusMessage,
)
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    ServiceBusError,
)

from bus.base import (
    BusError,
)

if TYPE_CHECKING:
    from bus.servicebus.azurebus import AzureBus

log = logging.getLogger(__name__)


class _Outbox:
    """Sends to one entity, one transfer at a time, coalescing what piles up meanwhile into batches.

    The SDK's sender is not made for concurrent ``send_messages`` on one link (they poll the same
    connection and slow each other down), so sends are serialised; messages that arrive while one is
    in flight go together in the next transfer as a ``ServiceBusMessageBatch`` (atomic, and in
    order). Every caller still waits for the broker to accept its own message, so a producer that
    awaits each send keeps its order.
    """

    def __init__(self, bus: AzureBus, entity: str, is_topic: bool) -> None:
        self._bus = bus
        self._entity = entity
        self._is_topic = is_topic
        self._pending: deque[tuple[ServiceBusMessage, asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.transfers = 0

    async def send(self, message: ServiceBusMessage) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"bus:azure:send:{self._entity}")
            self._bus._track(self._task)
        await future

    async def _drain(self) -> None:
        while self._pending:
            items: list[tuple[ServiceBusMessage, asyncio.Future[None]]] = []
            try:
                sender = await self._bus._sender(self._entity, self._is_topic)
                batch = None
                while self._pending:
                    message, future = self._pending[0]
                    if future.cancelled():  # its caller gave up before it went out
                        self._pending.popleft()
                        continue
                    if not items:
                        items.append(self._pending.popleft())
                        continue
                    if batch is None:
                        batch = await sender.create_message_batch()
                        batch.add_message(items[0][0])
                    try:
                        batch.add_message(message)
                    except MessageSizeExceededError:
                        break  # goes in the next transfer
                    items.append(self._pending.popleft())
                if not items:
                    return
                await sender.send_messages(batch if batch is not None and len(items) > 1 else items[0][0])
                self.transfers += 1
            except (ServiceBusError, ValueError) as exc:
                error = BusError(f"azure bus: could not send to {self._entity}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException as exc:  # cancelled (close) or a bug: nobody may wait forever
                for _, future in [*items, *self._pending]:
                    if not future.done():
                        future.set_exception(BusError(f"azure bus: sending to {self._entity} was interrupted: {exc!r}"))
                self._pending.clear()
                raise
            for _, future in items:
                if not future.done():
                    future.set_result(None)
