"""Message bus: envelope, Bus protocol and backends (memory here; rabbitmq/azure import their SDKs)."""

from bus.base import Bus, BusError, Consumer, DeadLetter, Handler, MalformedMessage
from bus.envelope import Envelope, utc_now
from bus.memory import MemoryBus, MemoryConsumer

__all__ = [
    "Bus",
    "BusError",
    "Consumer",
    "DeadLetter",
    "Envelope",
    "Handler",
    "MalformedMessage",
    "MemoryBus",
    "MemoryConsumer",
    "utc_now",
]
