"""Money: :class:`~decimal.Decimal` amounts, shown as decimal strings with two places, never floats."""

from __future__ import annotations

from decimal import Decimal

CENT = Decimal("0.01")


def money(amount: Decimal) -> str:
    """An amount for JSON: ``Decimal("19.9")`` -> ``"19.90"``."""
    return str(amount.quantize(CENT))
