"""ProductActor: one per product id, the only writer of a product's price, stock and reservations.

Why an actor: reservations from many orders race for the same units. The actor handles one message at a
time and commits each turn before the next, so "is there enough stock?" and "take it" can never interleave:
stock never goes below zero, whatever the concurrency, on one process or many (the versioned state makes a
second process's stale turn reload and run again).

Each turn that changes the product also updates its row in the ``products`` query table through a commit
hook, in the same transaction, so the fast read path (plain queries, no actor) is always in step.

Reservations are idempotent per order id: ``reservations`` holds the open ones; ``settled`` remembers how the
most recent orders ended (committed, released, rejected) so a repeated request is answered the same way
without a second effect. ``settled`` is bounded (:data:`SETTLED_LIMIT` orders) because the whole state is
written on every turn and a hot product must stay cheap to write: the bus inbox already drops redelivered
copies of a message, and an order asks again with a new message only while it still waits for its answer
(seconds), not after a hundred later orders of the same product have finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from actors.catalog import repository
from actors.catalog.messages import (
    CreateProduct,
    DeleteProduct,
    RestockProduct,
    UpdateProduct,
)
from contracts.catalog import ProductDeleted, ProductLowStock, ProductPriceChanged
from contracts.queues import ORDER_QUEUE
from contracts.stock import (
    CommitReservation,
    RejectReason,
    ReleaseStock,
    ReserveStock,
    StockRejected,
    StockReserved,
)
from runtime.actors import Actor, Turn, handles
from runtime.errors import Conflict, NotFound, ValidationProblem
from runtime.messages import envelope

SETTLED_LIMIT = 100
CENT = Decimal("0.01")

ABSENT, ACTIVE, DELETED = "absent", "active", "deleted"

# Fields an admin may change, in the order they are applied and checked.
_EDITABLE = (
    "name",
    "description",
    "price",
    "currency",
    "brand_id",
    "type_id",
    "picture_url",
    "available_stock",
    "restock_threshold",
    "max_stock",
)


@dataclass(slots=True)
class Reservation:
    quantity: int
    unit_price: Decimal


@dataclass(slots=True)
class ProductState:
    status: str = ABSENT
    name: str = ""
    description: str = ""
    price: Decimal = Decimal("0.00")
    currency: str = "USD"
    brand_id: str = ""
    type_id: str = ""
    picture_url: str | None = None
    available_stock: int = 0  # units that can still be reserved (reserved ones are already taken off)
    restock_threshold: int = 0
    max_stock: int = 0
    created_at: str = ""  # RFC 3339; strings keep the state plain JSON
    updated_at: str = ""
    reservations: dict[str, Reservation] = field(default_factory=dict)  # open, by order id
    settled: dict[str, dict[str, Any]] = field(default_factory=dict)  # order id -> outcome, oldest first

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["price"] = str(self.price)
        data["reservations"] = {
            order: {"quantity": r.quantity, "unit_price": str(r.unit_price)} for order, r in self.reservations.items()
        }
        data["settled"] = self.settled
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProductState:
        values = dict(data)
        values["price"] = Decimal(values["price"])
        values["reservations"] = {
            order: Reservation(r["quantity"], Decimal(r["unit_price"])) for order, r in data["reservations"].items()
        }
        return cls(**values)


def _timestamp(turn: Turn) -> str:
    return turn.now.isoformat()


class ProductActor(Actor):
    type_name = "product"

    state: ProductState

    def initial_state(self) -> ProductState:
        return ProductState()

    def dump_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def load_state(self, data: dict[str, Any]) -> None:
        self.state = ProductState.from_json(data)

    # -- admin ----------------------------------------------------------------------------------

    @handles(CreateProduct)
    def create(self, msg: CreateProduct, turn: Turn) -> None:
        s = self.state
        if s.status == ACTIVE:
            raise Conflict(f"product {self.id} already exists", slug="product-exists")
        if s.status == DELETED:
            raise Conflict(f"product {self.id} was deleted; product ids are not reused", slug="product-deleted")
        for name in _EDITABLE:
            setattr(s, name, getattr(msg, name))
        s.price = s.price.quantize(CENT)
        s.status = ACTIVE
        s.created_at = s.updated_at = _timestamp(turn)
        self._check_limits()
        turn.on_commit(repository.insert_product(self.query_row()))

    @handles(UpdateProduct)
    def update(self, msg: UpdateProduct, turn: Turn) -> None:
        s = self._require_active()
        before = self.query_row()
        wanted = _wanted(msg)
        changed = [name for name, value in wanted.items() if getattr(s, name) != value]
        if not changed:
            return  # nothing new: no write, no event, the ETag stays valid
        for name in changed:
            setattr(s, name, wanted[name])
        self._check_limits()
        if s.price != before["price"]:
            event = ProductPriceChanged(self.id, before["price"], s.price, s.currency)
            turn.publish(envelope(event, session_id=self.id))
        self._save(turn, before)
        if s.available_stock != before["available_stock"]:
            self._stock_changed(turn)

    @handles(RestockProduct)
    def restock(self, msg: RestockProduct, turn: Turn) -> int:
        """Add up to ``quantity`` units without going over ``max_stock``; returns the units added."""
        s = self._require_active()
        if msg.quantity < 1:
            raise ValidationProblem.field("quantity", "must be at least 1")
        added = max(0, min(msg.quantity, s.max_stock - s.available_stock))
        if added:
            before = self.query_row()
            s.available_stock += added
            self._save(turn, before)
            self._stock_changed(turn)
        return added

    @handles(DeleteProduct)
    def delete(self, msg: DeleteProduct, turn: Turn) -> None:
        s = self.state
        if s.status == ABSENT:
            raise NotFound(f"no product {self.id}")
        if s.status == DELETED:
            return  # deleting twice is what a retried DELETE does: same outcome, nothing more to do
        if s.reservations:
            orders = sorted(s.reservations)
            units = sum(r.quantity for r in s.reservations.values())
            raise Conflict(
                f"product {self.id} is reserved by {len(orders)} open order(s) ({units} unit(s)); "
                "it can be deleted once those orders are paid or cancelled",
                slug="product-reserved",
                open_orders=orders,
            )
        turn.on_commit(repository.remove_product(self.query_row()))
        s.status = DELETED
        s.updated_at = _timestamp(turn)
        turn.publish(envelope(ProductDeleted(self.id), session_id=self.id))

    # -- reservations (from the order service) --------------------------------------------------

    @handles(ReserveStock)
    def reserve(self, msg: ReserveStock, turn: Turn) -> StockReserved | StockRejected:
        s = self.state
        reply = self._earlier_answer(msg)
        if reply is None:
            reply = self._decide(msg)
            if isinstance(reply, StockReserved):
                before = self.query_row()
                s.available_stock -= reply.quantity
                s.reservations[msg.order_id] = Reservation(reply.quantity, reply.unit_price)
                self._save(turn, before)
                self._stock_changed(turn)
            elif reply.reason == RejectReason.INSUFFICIENT_STOCK:
                # Only a refusal that later stock could change needs remembering to stay the same answer.
                self._settle(msg.order_id, outcome="rejected", requested=reply.requested,
                             available=reply.available, reason=reply.reason)  # fmt: skip
        turn.send(ORDER_QUEUE, envelope(reply, session_id=msg.order_id, correlation_id=msg.order_id))
        return reply

    @handles(ReleaseStock)
    def release(self, msg: ReleaseStock, turn: Turn) -> None:
        reservation = self.state.reservations.pop(msg.order_id, None)
        if reservation is None:
            return  # never reserved, or released/committed already: nothing to give back
        # (an open reservation means the product is active: deleting it is refused while one exists)
        before = self.query_row()
        self.state.available_stock += reservation.quantity
        self._settle(msg.order_id, outcome="released", quantity=reservation.quantity)
        self._save(turn, before)
        self._stock_changed(turn)

    @handles(CommitReservation)
    def commit(self, msg: CommitReservation, turn: Turn) -> None:
        reservation = self.state.reservations.pop(msg.order_id, None)
        if reservation is None:
            return
        # The units are sold: stock stays as it is, the order no longer holds the product.
        self._settle(msg.order_id, outcome="committed", quantity=reservation.quantity,
                     unit_price=str(reservation.unit_price))  # fmt: skip

    # -- helpers --------------------------------------------------------------------------------

    def _decide(self, msg: ReserveStock) -> StockReserved | StockRejected:
        s = self.state

        def reject(reason: str) -> StockRejected:
            return StockRejected(msg.order_id, self.id, msg.quantity, s.available_stock, reason)

        if s.status == ABSENT:
            return reject(RejectReason.UNKNOWN_PRODUCT)
        if s.status == DELETED:
            return reject(RejectReason.PRODUCT_DELETED)
        if msg.quantity < 1:
            return reject(RejectReason.INVALID_QUANTITY)
        if msg.quantity > s.available_stock:
            return reject(RejectReason.INSUFFICIENT_STOCK)
        return StockReserved(msg.order_id, self.id, msg.quantity, s.price)

    def _earlier_answer(self, msg: ReserveStock) -> StockReserved | StockRejected | None:
        """The answer this order already got, when it asks again; None for a new order."""
        s = self.state
        open_one = s.reservations.get(msg.order_id)
        if open_one is not None:
            return StockReserved(msg.order_id, self.id, open_one.quantity, open_one.unit_price)
        done = s.settled.get(msg.order_id)
        if done is None:
            return None
        if done["outcome"] == "committed":
            return StockReserved(msg.order_id, self.id, done["quantity"], Decimal(done["unit_price"]))
        if done["outcome"] == "released":
            return StockRejected(msg.order_id, self.id, msg.quantity, s.available_stock, RejectReason.ALREADY_RELEASED)
        return StockRejected(msg.order_id, self.id, done["requested"], done["available"], done["reason"])

    def _settle(self, order_id: str, **outcome: Any) -> None:
        settled = self.state.settled
        settled.pop(order_id, None)
        settled[order_id] = outcome
        while len(settled) > SETTLED_LIMIT:
            del settled[next(iter(settled))]

    def _require_active(self) -> ProductState:
        if self.state.status == ABSENT:
            raise NotFound(f"no product {self.id}")
        if self.state.status == DELETED:
            raise NotFound(f"product {self.id} was deleted", slug="product-deleted")
        return self.state

    def _check_limits(self) -> None:
        """Invariants across fields; the API checks each field alone, this checks them together."""
        s = self.state
        errors: dict[str, str] = {}
        if s.price < 0:
            errors["price"] = "must not be negative"
        for name in ("available_stock", "restock_threshold"):
            value = getattr(s, name)
            if value < 0:
                errors[name] = "must not be negative"
            elif value > s.max_stock:
                errors[name] = f"must not be more than max_stock ({s.max_stock})"
        if errors:
            raise ValidationProblem(errors)

    def _stock_changed(self, turn: Turn) -> None:
        s = self.state
        if s.available_stock <= s.restock_threshold:
            event = ProductLowStock(self.id, s.available_stock, s.restock_threshold)
            turn.publish(envelope(event, session_id=self.id))

    def _save(self, turn: Turn, before: dict[str, Any]) -> None:
        """Stamp the change and bring the query row from ``before`` in step, in this turn's transaction."""
        self.state.updated_at = _timestamp(turn)
        turn.on_commit(repository.update_product(before, self.query_row()))

    def query_row(self) -> dict[str, Any]:
        """The product's row in the ``products`` query table (without the derived columns)."""
        s = self.state
        return {
            "id": self.id,
            "name": s.name,
            "description": s.description,
            "price": s.price,
            "currency": s.currency,
            "brand_id": s.brand_id,
            "type_id": s.type_id,
            "picture_url": s.picture_url,
            "available_stock": s.available_stock,
            "restock_threshold": s.restock_threshold,
            "max_stock": s.max_stock,
            "created_at": datetime.fromisoformat(s.created_at),
            "updated_at": datetime.fromisoformat(s.updated_at),
        }


def _wanted(msg: UpdateProduct) -> dict[str, Any]:
    """The fields an update gives, as they would be stored (``picture_url=""`` means none)."""
    wanted = {name: getattr(msg, name) for name in _EDITABLE if getattr(msg, name) is not None}
    if "picture_url" in wanted:
        wanted["picture_url"] = wanted["picture_url"] or None
    if "price" in wanted:
        wanted["price"] = wanted["price"].quantize(CENT)
    return wanted
