"""Codec micro-benchmark: µs per call of what every message and actor turn pays (issue 14).

    python -m bench.codec [--repeat N]

Times, on samples shaped like a checkout's (an order's state with its lines and history, a cart's, the saga's
messages): ``to_body`` of a message and of a state, ``from_body`` back, an envelope made (id, timestamp) and
encoded, decoded, a memory-bus hand-over (encode + decode + the delivery's headers), the stored form of a state
(``encode_json(dump_state())``). Run it from two checkouts (``cd /tmp/base && python -m bench.codec``) with the
same interpreter to compare; each figure is the best of ``--repeat`` timings. Numbers only.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from actors.cart.actor import CartState, CheckoutRecord, Line, PriceNote
from actors.order.actor import CommandRecord, HistoryEntry, OrderLine, OrderState, Payment
from bus import Envelope
from contracts.checkout import Address, CheckoutLine, CheckoutRequested, OrderStatusChanged, PaymentDetails
from contracts.stock import ReserveStock, StockReserved
from runtime.actors import encode_json
from runtime.messages import envelope, from_body, to_body

NOW = datetime(2026, 12, 2, 0, 30, 15, 123456, tzinfo=UTC)
ADDRESS = Address("Bench Buyer", "1 Load Street", "Testville", "12345", "US")


def _order() -> OrderState:
    lines = [
        OrderLine(
            f"product-{i}", f"Product {i}", Decimal("19.99"), 2, f"/pictures/{i}.svg", "reserved", Decimal("19.99")
        )
        for i in range(2)
    ]
    history = [
        HistoryEntry(status, NOW + timedelta(milliseconds=i))
        for i, status in enumerate(("submitted", "stock_confirmed", "paid"))
    ]
    return OrderState(
        status="paid", buyer_id="buyer-1", cart_id="cart-1", lines=lines, total=Decimal("79.96"), currency="USD",
        shipping_address=ADDRESS, payment=Payment("card", "tok_visa", 1, "m-1", "ch_1"), created_at=NOW,
        updated_at=NOW, deadline=None, history=history, commands=[CommandRecord("key-1", "cancel")],
    )  # fmt: skip


def _cart() -> CartState:
    lines = {
        f"product-{i}": Line(f"product-{i}", f"Product {i}", Decimal("19.99"), 2, f"/p/{i}.svg", Decimal("19.99"), i)
        for i in range(2)
    }
    notes = {"product-0": PriceNote("product-0", "Product 0", Decimal("21.00"), Decimal("19.99"), NOW)}
    record = CheckoutRecord(
        "order-1", "key-1", "f" * 64, {"product-0": 2, "product-1": 2}, NOW, True, 2, {"order_id": "order-1"}
    )
    return CartState(lines, notes, "USD", [record], NOW, NOW + timedelta(days=30), 2)


CHECKOUT = CheckoutRequested(
    "order-1", "buyer-1", "cart-1",
    tuple(CheckoutLine(f"product-{i}", f"Product {i}", Decimal("19.99"), 2, f"/p/{i}.svg") for i in range(2)),
    ADDRESS, PaymentDetails("card", "tok_visa"), Decimal("79.96"), "USD", NOW,
)  # fmt: skip
MESSAGES: list[Any] = [
    CHECKOUT,
    ReserveStock("order-1", "product-0", 2),
    StockReserved("order-1", "product-0", 2, Decimal("19.99")),
    OrderStatusChanged("order-1", "buyer-1", "submitted", "paid", "", NOW),
]


def cases() -> dict[str, Callable[[], Any]]:
    order, cart = _order(), _cart()
    order_body, checkout_body = to_body(order), to_body(CHECKOUT)
    env = envelope(CHECKOUT, session_id="cart-1")
    data = env.encode()

    def hand_over() -> Envelope:  # what the memory bus does per message sent and per delivery
        copy = Envelope.decode(env.encode())
        return copy.with_headers(**{"delivery-count": "1"})

    return {
        "to_body(4 saga messages)": lambda: [to_body(m) for m in MESSAGES],
        "to_body(order state)": lambda: to_body(order),
        "to_body(cart state)": lambda: to_body(cart),
        "stored order state (encode_json(to_body))": lambda: encode_json(to_body(order)),
        "from_body(order state)": lambda: from_body(OrderState, order_body),
        "from_body(CheckoutRequested)": lambda: from_body(CheckoutRequested, checkout_body),
        "envelope(ReserveStock)": lambda: envelope(MESSAGES[1], session_id="product-0"),
        "envelope(CheckoutRequested).encode()": lambda: envelope(CHECKOUT, session_id="cart-1").encode(),
        "Envelope.decode": lambda: Envelope.decode(data),
        "memory bus hand-over": hand_over,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="timings per case; the best is shown")
    args = parser.parse_args()
    for name, case in cases().items():
        number = 2000
        best = min(timeit.repeat(case, number=number, repeat=args.repeat)) / number * 1e6
        print(f"{name:45s} {best:8.2f} µs")


if __name__ == "__main__":
    main()
