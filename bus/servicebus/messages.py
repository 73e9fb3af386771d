"""Envelopes as Service Bus messages and back, and the entity names Service Bus accepts."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

from azure.servicebus import (
    ServiceBusMessage,
    ServiceBusReceivedMessage,
)

from bus.base import (
    check_name,
)
from bus.envelope import Envelope

log = logging.getLogger(__name__)

TOPIC = "ecom-events"
DEFAULT_DUPLICATE_WINDOW = timedelta(minutes=10)
MAX_REASON = 1024  # characters of the error kept as DeadLetterReason
_ENTITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,259}$")


def _check_name(kind: str, name: str) -> None:
    check_name(kind, name)
    if not _ENTITY_NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not a valid Service Bus entity name "
            "(letters, digits, '.', '-', '_'; starting with a letter or digit; at most 260 characters)"
        )


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_message(envelope: Envelope) -> ServiceBusMessage:
    """The Service Bus message for an envelope (raises TypeError for a body that is not JSON)."""
    if not isinstance(envelope, Envelope):
        raise TypeError(f"expected an Envelope, got {type(envelope).__name__}")
    # a comprehension, because dict() of the headers would not be typed as the SDK's wider property map
    properties: dict[str | bytes, Any] = {k: v for k, v in envelope.headers.items()}  # noqa: C416
    return ServiceBusMessage(
        envelope.encode(),
        message_id=envelope.message_id,
        session_id=envelope.session_id,
        correlation_id=envelope.correlation_id,
        subject=envelope.type,
        content_type="application/json",
        application_properties=properties or None,
    )


def _body(message: ServiceBusReceivedMessage) -> bytes:
    body = message.body
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return b"".join(bytes(part) for part in body)
