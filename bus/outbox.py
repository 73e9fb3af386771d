"""Moved: the outbox relay is :mod:`runtime.outbox` (it reads the runtime's ``outbox`` table, and ``bus``
is the lower layer: it imports nothing of ``runtime``).

Kept so that ``from bus.outbox import OutboxRelay`` goes on working. The import is lazy (PEP 562): only
asking for ``OutboxRelay`` here loads ``runtime.outbox``; importing ``bus`` or any backend never does.
New code imports ``runtime.outbox``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OutboxRelay"]  # noqa: F822 provided lazily by __getattr__ below (PEP 562)


def __getattr__(name: str) -> Any:
    if name == "OutboxRelay":
        from runtime.outbox import OutboxRelay

        return OutboxRelay
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
