"""CartActor: one actor per cart (id = the customer's ``sub``), holding lines, price-change notes and checkouts.

Rules the actor enforces (the HTTP layer only parses and fetches catalog data):

* a line's name and unit price come from a catalog :class:`~actors.cart.messages.ProductQuote`, never from
  the client; quantities are 1..:data:`MAX_LINE_QUANTITY`, never more than the catalog's stock, and one cart
  holds at most :data:`MAX_LINES` products;
* a price that changes under a line (catalog event, a newer quote, checkout's re-check) is applied and noted:
  the note keeps the price the customer first saw and the current one, and goes away with the line or when the
  price returns to what it was;
* a customer is never charged a price the cart did not show: every line remembers the price the customer last
  saw (``shown_price``: set whenever the cart is answered to the customer — GET, PUT, DELETE — and by checkout's
  409). A price event updates the line but not what was shown, so checkout re-checks every line against fresh
  quotes and answers :class:`~actors.cart.messages.PricesChanged` (the caller says 409, naming the new prices)
  whenever a fresh price differs from the shown one, even if an event already applied it silently; the buyer
  confirms by checking out again;
  otherwise it sends ``CheckoutRequested`` to the order queue through the outbox and remembers the checkout
  (bounded), so a retry with the same ``Idempotency-Key`` gets the same order id and no second order;
* what the shopper last set is what the cart holds: ``OrderStarted`` removes, once, the lines its checkout
  ordered that the shopper has not set since, and nothing else. The cart keeps showing the ordered lines between
  the checkout's 202 and ``OrderStarted`` (the order is not known to exist before), so a shopper may set a line
  in between; that line is theirs, as the 200 answered it: a new quantity of an ordered product stays exactly as
  set (not reduced by what was ordered), and so does a product added after the checkout (also a repeated PUT of
  the ordered quantity). How: every shopper write of a line (PUT) stamps it with the cart's next sequence
  number (``Line.set_seq``, from ``CartState.seq``, which only grows, even across an expiry), a checkout
  remembers the last number given (``CheckoutRecord.seq``), and ``OrderStarted`` drops an ordered line only
  when its stamp is not newer. Prices moved by events or by checkout's re-check are not shopper writes. A
  redelivered or repeated ``OrderStarted`` finds its checkout ``started`` and removes nothing (besides the
  inbox dropping same-id copies). There is no failed-order path to restore from: the order service publishes
  ``OrderStarted`` for every checkout it receives (an invalid one is cancelled after it), and a cancelled order
  leaves the cart as it is;
* a durable reminder empties a cart no customer command has changed for ``expiry_seconds``; it is armed on the
  first change and, when it fires early because the cart changed since, re-armed for the new deadline (so a busy
  cart does not rewrite its reminder on every turn);
* every turn that changes which products the cart holds updates the ``cart_lines`` query table in the same
  transaction (see :func:`_keeps_index`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from actors.cart import repository
from actors.cart.messages import (
    AcceptedCheckout,
    Checkout,
    CheckoutAccepted,
    ClearCart,
    GetCart,
    GetCheckout,
    NoEarlierCheckout,
    PriceChange,
    PricesChanged,
    ProductQuote,
    QuotesNeeded,
    RemoveLine,
    SetQuantity,
)
from contracts.catalog import ProductPriceChanged
from contracts.checkout import (
    Address,
    CheckoutLine,
    CheckoutRequested,
    OrderStarted,
    PaymentDetails,
)
from contracts.queues import ORDER_QUEUE
from runtime.actors import Actor, ActorSystem, ReminderFired, Turn, handles
from runtime.errors import Conflict, IdempotencyKeyReused, ValidationProblem
from runtime.messages import envelope, from_body, to_body
from runtime.money import CENT, money

log = logging.getLogger(__name__)

MAX_LINE_QUANTITY = 100
MAX_LINES = 500  # distinct products per cart: bounds the state every turn writes
MAX_CHECKOUTS = 20  # checkouts remembered for idempotency keys and OrderStarted
DEFAULT_CART_EXPIRY = 30 * 24 * 3600.0  # seconds a cart may stay unchanged before it is emptied
EXPIRY_REMINDER = "expire"


# ---------------------------------------------------------------------------------------------------
# Problems the cart raises (every one leaves the cart as it was: the turn is rolled back)


class ProductUnavailable(Conflict):
    slug = "product-unavailable"
    title = "The product is not available"


class InsufficientStock(Conflict):
    slug = "insufficient-stock"
    title = "Not enough stock"


class CartFull(Conflict):
    slug = "cart-full"
    title = "The cart is full"


class CurrencyMismatch(Conflict):
    slug = "currency-mismatch"
    title = "The product is sold in another currency"


class CartEmpty(Conflict):
    slug = "cart-empty"
    title = "The cart is empty"


class PricesChangedProblem(Conflict):
    slug = "price-changed"
    title = "Prices changed"

    def __init__(self, reply: PricesChanged) -> None:
        changes = "; ".join(f"{c.name}: {money(c.old_price)} -> {money(c.new_price)}" for c in reply.changes)
        super().__init__(
            f"prices changed since you last saw them ({changes}); the cart shows the new prices, "
            "check out again to confirm",
            price_changes=[
                {
                    "product_id": c.product_id,
                    "name": c.name,
                    "old_price": money(c.old_price),
                    "new_price": money(c.new_price),
                }
                for c in reply.changes
            ],
        )


# ---------------------------------------------------------------------------------------------------
# State


@dataclass
class Line:
    product_id: str
    name: str
    unit_price: Decimal
    quantity: int
    picture_url: str
    # The unit price the customer last saw (the cart answered to them, or checkout's 409 named it). None: a line
    # stored before this field existed; its unit price stands in.
    shown_price: Decimal | None = None
    # CartState.seq when the shopper last set this line (0: before stamps existed); see on_order_started.
    set_seq: int = 0

    @property
    def seen_price(self) -> Decimal:
        return self.shown_price if self.shown_price is not None else self.unit_price


@dataclass
class PriceNote:
    product_id: str
    name: str
    old_price: Decimal  # what the customer saw first
    new_price: Decimal
    changed_at: datetime


@dataclass
class CheckoutRecord:
    order_id: str
    idempotency_key: str | None
    fingerprint: str  # of the address and payment, to tell a retry from a different request with the same key
    quantities: dict[str, int]  # what was ordered: removed from the cart on OrderStarted unless set since
    requested_at: datetime
    started: bool = False
    # CartState.seq at checkout: a line stamped later was set by the shopper after this checkout (0: a checkout
    # stored before stamps existed; every line stamped since is newer).
    seq: int = 0
    # The CheckoutRequested sent (payment details left out) until its order starts: what the order service answers
    # for the order while it has not recorded it yet (``GET /api/orders/{id}`` never 404s after the 202).
    order: dict[str, Any] | None = None


@dataclass
class CartState:
    lines: dict[str, Line] = field(default_factory=dict)
    notes: dict[str, PriceNote] = field(default_factory=dict)
    currency: str = ""
    checkouts: list[CheckoutRecord] = field(default_factory=list)
    changed_at: datetime | None = None  # last change by a customer command (the expiry clock)
    expiry_due: datetime | None = None  # when the armed expiry reminder fires; None: not armed
    seq: int = 0  # the last stamp given to a line the shopper set (Line.set_seq); only grows


# ---------------------------------------------------------------------------------------------------
# The actor

H = TypeVar("H", bound=Callable[..., Any])


def _keeps_index(handler: H) -> H:
    """Wrap a handler that may add or remove lines: the change of the product set goes to ``cart_lines`` in the
    turn's own transaction. Diffing before/after keeps every handler free of index bookkeeping."""

    @functools.wraps(handler)
    def wrapper(self: CartActor, message: Any, turn: Turn) -> Any:
        before = set(self.state.lines)
        result = handler(self, message, turn)
        after = set(self.state.lines)
        if before != after:
            turn.on_commit(repository.reindex(self.id, added=after - before, removed=before - after))
        return result

    return wrapper  # type: ignore[return-value]  # functools.wraps: the handler's own signature


class CartActor(Actor):
    """One customer's cart. Its dependency, ``expiry_seconds``, is injected by the actor system: the service
    description registers it as ``ActorType(CartActor, deps=...)`` (:mod:`runtime.description`)."""

    type_name = "cart"
    state: CartState

    def __init__(self, actor_id: str, system: ActorSystem, *, expiry_seconds: float = DEFAULT_CART_EXPIRY) -> None:
        if expiry_seconds <= 0:
            raise ValueError("cart expiry must be a positive number of seconds")
        self.expiry_seconds = expiry_seconds
        super().__init__(actor_id, system)

    # -- state (Decimals and datetimes as strings) -------------------------------------------------

    def initial_state(self) -> CartState:
        return CartState()

    def dump_state(self) -> dict[str, Any]:
        return to_body(self.state)

    def load_state(self, data: Any) -> None:
        state = from_body(CartState, data)
        state.lines = {key: from_body(Line, value) for key, value in data["lines"].items()}
        state.notes = {key: from_body(PriceNote, value) for key, value in data["notes"].items()}
        self.state = state

    # -- customer commands -------------------------------------------------------------------------

    @handles(GetCart)
    def get(self, _msg: GetCart, _turn: Turn) -> dict[str, Any]:
        # Writes only when a price moved since the customer's last look (the turn is a read otherwise).
        return self.shown()

    @handles(SetQuantity)
    @_keeps_index
    def set_quantity(self, msg: SetQuantity, turn: Turn) -> dict[str, Any]:
        quote, state = msg.quote, self.state
        # A cart is in one currency; a product may change it only when it is the cart's only line.
        others = set(state.lines) - {quote.product_id}
        self._check_can_sell(quote, msg.quantity, currency=state.currency if others else "")
        wanted = Line(quote.product_id, quote.name, quote.unit_price, msg.quantity, quote.picture_url)
        current = state.lines.get(quote.product_id)
        if (
            current is not None
            and replace(current, shown_price=None, set_seq=0) == wanted
            and not self._awaits_order(current)
        ):
            return self.shown()  # a repeated PUT: nothing to write (unless a price moved since the last look)
        state.seq += 1
        wanted.set_seq = state.seq
        if current is None:
            if len(state.lines) >= MAX_LINES:
                raise CartFull(f"a cart holds at most {MAX_LINES} different products; remove some first")
            state.lines[quote.product_id] = wanted
        else:
            self._reprice(current, quote.unit_price, turn.now)
            current.name, current.quantity, current.picture_url = wanted.name, wanted.quantity, wanted.picture_url
            current.set_seq = wanted.set_seq
        state.currency = quote.currency
        self._changed(turn)
        return self.shown()

    @handles(RemoveLine)
    @_keeps_index
    def remove_line(self, msg: RemoveLine, turn: Turn) -> dict[str, Any]:
        if msg.product_id in self.state.lines:
            self._drop_line(msg.product_id)
            self._changed(turn)
        return self.shown()

    @handles(ClearCart)
    @_keeps_index
    def clear(self, _msg: ClearCart, turn: Turn) -> dict[str, Any]:
        if self.state.lines or self.state.notes:
            for product_id in list(self.state.lines):
                self._drop_line(product_id)
            self.state.notes.clear()
            self._changed(turn)
        return self.shown()  # checkouts are kept: a retried checkout still finds its order

    @handles(Checkout)
    def checkout(
        self, msg: Checkout, turn: Turn
    ) -> CheckoutAccepted | QuotesNeeded | PricesChanged | NoEarlierCheckout:
        state = self.state
        fingerprint = _fingerprint(msg.shipping_address, msg.payment)
        earlier = self._checkout_with_key(msg.idempotency_key)
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used for a checkout with another address or payment; use a new key"
                )
            return CheckoutAccepted(earlier.order_id, replayed=True)
        if msg.replay_only:
            return NoEarlierCheckout()
        if not state.lines:
            raise CartEmpty("add products to the cart before checking out")
        unquoted = tuple(product_id for product_id in state.lines if product_id not in msg.quotes)
        if unquoted:
            return QuotesNeeded(unquoted)
        quotes = self._sellable(msg.quotes)
        # Compared with what the customer SAW, not with the line: a ProductPriceChanged event may have moved the
        # line already (with a note) while the customer has not looked since; charging that price would charge a
        # price the cart never showed. The fresh price is applied either way (it may also have moved back).
        changes: list[PriceChange] = []
        for line in state.lines.values():
            fresh = quotes[line.product_id].unit_price
            seen = line.seen_price
            self._reprice(line, fresh, turn.now)
            if fresh != seen:
                changes.append(PriceChange(line.product_id, line.name, seen, fresh))
            line.shown_price = fresh  # the 409 names the new price: the next checkout confirms it
        if changes:
            return PricesChanged(tuple(changes))
        order_id = str(uuid.uuid4())
        request = self._order_request(order_id, msg, turn.now)
        turn.send(ORDER_QUEUE, envelope(request, session_id=order_id))
        state.checkouts.append(
            CheckoutRecord(
                order_id,
                msg.idempotency_key,
                fingerprint,
                {p: line.quantity for p, line in state.lines.items()},
                turn.now,
                order={k: v for k, v in to_body(request).items() if k != "payment"},  # never keep the payment token
                seq=state.seq,
            )
        )
        del state.checkouts[:-MAX_CHECKOUTS]
        self._changed(turn)
        return CheckoutAccepted(order_id, replayed=False)

    @handles(GetCheckout)
    def get_checkout(self, msg: GetCheckout, _turn: Turn) -> AcceptedCheckout | None:
        record = next((c for c in self.state.checkouts if c.order_id == msg.order_id), None)
        return None if record is None else AcceptedCheckout(record.order_id, record.started, record.order)

    # -- events ------------------------------------------------------------------------------------

    @handles(ProductPriceChanged)
    def on_price_changed(self, event: ProductPriceChanged, turn: Turn) -> None:
        # Idempotent: a line already at the new price (a redelivery, or a quote that was newer) stays as it is.
        line = self.state.lines.get(event.product_id)
        if line is not None:
            self._reprice(line, event.new_price, turn.now)

    @handles(OrderStarted)
    @_keeps_index
    def on_order_started(self, event: OrderStarted, _turn: Turn) -> None:
        record = next((c for c in self.state.checkouts if c.order_id == event.order_id), None)
        if record is None or record.started:
            return  # not ours (or forgotten), or applied already
        record.started, record.order = True, None  # the order service has the order now
        for product_id in record.quantities:
            line = self.state.lines.get(product_id)
            # A line set after the checkout holds what the shopper set then (answered 200): never taken from.
            if line is not None and line.set_seq <= record.seq:
                self._drop_line(product_id)

    @handles(ReminderFired)
    @_keeps_index
    def on_reminder(self, reminder: ReminderFired, turn: Turn) -> None:
        if reminder.name != EXPIRY_REMINDER:
            log.warning("cart %s: unknown reminder %r ignored", self.id, reminder.name)
            return
        state = self.state
        state.expiry_due = None
        deadline = state.changed_at + timedelta(seconds=self.expiry_seconds) if state.changed_at else turn.now
        if deadline > turn.now:
            self._arm_expiry(turn, deadline)  # changed since the reminder was set: wait for the new deadline
            return
        log.info("cart %s expired after %gs unchanged", self.id, self.expiry_seconds)
        # Checkouts whose order has not started stay: their 202 was given, and the order service may still ask.
        # The stamps go on growing: a line set after the expiry must stay newer than those checkouts.
        self.state = CartState(checkouts=[c for c in state.checkouts if not c.started], seq=state.seq)

    # -- helpers -----------------------------------------------------------------------------------

    def _check_can_sell(self, quote: ProductQuote, quantity: int, *, currency: str) -> None:
        """Refuse a quantity the catalog cannot supply, or a product not sold in ``currency`` ("" = any)."""
        if not 1 <= quantity <= MAX_LINE_QUANTITY:
            raise ValidationProblem.field("quantity", f"must be between 1 and {MAX_LINE_QUANTITY}")
        if quantity > quote.available_stock:
            raise InsufficientStock(
                f"only {quote.available_stock} of {quote.name} in stock, {quantity} wanted",
                product_id=quote.product_id,
                available=quote.available_stock,
            )
        if currency and quote.currency != currency:
            raise CurrencyMismatch(f"{quote.name} is sold in {quote.currency}, the cart is in {currency}")

    def _sellable(self, quotes: Mapping[str, ProductQuote | None]) -> dict[str, ProductQuote]:
        """The quote of every line, once each line is checked to be still sold, in stock and in the cart's currency."""
        checked: dict[str, ProductQuote] = {}
        for line in self.state.lines.values():
            quote = quotes[line.product_id]
            if quote is None:
                raise ProductUnavailable(
                    f"{line.name} is no longer sold; remove it from the cart to check out", product_id=line.product_id
                )
            self._check_can_sell(quote, line.quantity, currency=self.state.currency)
            checked[line.product_id] = quote
        return checked

    def _reprice(self, line: Line, new_price: Decimal, now: datetime) -> PriceChange | None:
        """Give ``line`` the new price and note it for the customer; None when the price did not change."""
        if line.unit_price == new_price:
            return None
        notes = self.state.notes
        first_seen = notes[line.product_id].old_price if line.product_id in notes else line.unit_price
        change = PriceChange(line.product_id, line.name, line.unit_price, new_price)
        line.unit_price = new_price
        if first_seen == new_price:
            notes.pop(line.product_id, None)  # back to what the customer saw: nothing to tell
        else:
            notes[line.product_id] = PriceNote(line.product_id, line.name, first_seen, new_price, now)
        return change

    def _drop_line(self, product_id: str) -> None:
        self.state.lines.pop(product_id, None)
        self.state.notes.pop(product_id, None)
        if not self.state.lines:
            self.state.currency = ""

    def _changed(self, turn: Turn) -> None:
        self.state.changed_at = turn.now
        if self.state.expiry_due is None:
            self._arm_expiry(turn, turn.now + timedelta(seconds=self.expiry_seconds))

    def _arm_expiry(self, turn: Turn, due: datetime) -> None:
        turn.set_reminder(EXPIRY_REMINDER, due_at=due)
        self.state.expiry_due = due

    def _awaits_order(self, line: Line) -> bool:
        """Whether ``line``, as it is, belongs to a checkout whose ``OrderStarted`` has not come: it would be removed
        then, so a shopper's PUT of it must stamp it even when it changes nothing."""
        return any(
            not c.started and line.product_id in c.quantities and line.set_seq <= c.seq for c in self.state.checkouts
        )

    def _checkout_with_key(self, key: str | None) -> CheckoutRecord | None:
        if key is None:
            return None
        return next((c for c in self.state.checkouts if c.idempotency_key == key), None)

    def _order_request(self, order_id: str, msg: Checkout, now: datetime) -> CheckoutRequested:
        lines = tuple(
            CheckoutLine(line.product_id, line.name, line.unit_price, line.quantity, line.picture_url)
            for line in self.state.lines.values()
        )
        return CheckoutRequested(
            order_id=order_id,
            buyer_id=msg.buyer_id,
            cart_id=self.id,
            lines=lines,
            shipping_address=msg.shipping_address,
            payment=msg.payment,
            total=self.total(),
            currency=self.state.currency,
            requested_at=now,
        )

    def shown(self) -> dict[str, Any]:
        """The view answered to the customer: every line's price is now one the customer has seen."""
        for line in self.state.lines.values():
            line.shown_price = line.unit_price
        return self.view()

    def total(self) -> Decimal:
        return sum((line.unit_price * line.quantity for line in self.state.lines.values()), Decimal(0)).quantize(CENT)

    def view(self) -> dict[str, Any]:
        """The cart as the customer sees it (JSON-ready)."""
        state = self.state
        return {
            "lines": [
                {
                    "product_id": line.product_id,
                    "name": line.name,
                    "unit_price": money(line.unit_price),
                    "quantity": line.quantity,
                    "line_total": money(line.unit_price * line.quantity),
                    "picture_url": line.picture_url,
                }
                for line in state.lines.values()
            ],
            "item_count": sum(line.quantity for line in state.lines.values()),
            "subtotal": money(self.total()),
            "total": money(self.total()),
            "currency": state.currency or None,
            "notes": [_note_view(note, state.currency) for note in state.notes.values()],
            "updated_at": state.changed_at,
        }


def _note_view(note: PriceNote, currency: str) -> dict[str, Any]:
    direction = "dropped" if note.new_price < note.old_price else "rose"
    return {
        "product_id": note.product_id,
        "name": note.name,
        "old_price": money(note.old_price),
        "new_price": money(note.new_price),
        "changed_at": note.changed_at,
        "message": f"The price of {note.name} {direction} from {money(note.old_price)} to {money(note.new_price)} {currency}.",
    }


def _fingerprint(address: Address, payment: PaymentDetails) -> str:
    # Only a digest is kept in the state: the payment token itself travels once, in CheckoutRequested.
    canonical = orjson.dumps({"address": to_body(address), "payment": to_body(payment)}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
