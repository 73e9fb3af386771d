"""AMQP 1.0 connection handling of the test peer: framing, SASL, sessions, links, CBS, $management.

Frames are encoded and decoded with the SDK's own codec (``azure.servicebus._pyamqp``), so the bytes on
the wire are exactly what the SDK produces and parses; the protocol *behaviour* (which frame answers
which, flow control, settlement, the Service Bus extensions) is written here from the AMQP 1.0 spec and
the Service Bus AMQP documentation, and the broker semantics live in ``broker.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from azure.servicebus._pyamqp import performatives as pf
from azure.servicebus._pyamqp._decode import (
    _DECODE_BY_CONSTRUCTOR,
    decode_frame,
    decode_payload,
)
from azure.servicebus._pyamqp._encode import (
    describe_performative,
    encode_annotations,
    encode_application_properties,
    encode_frame,
    encode_payload,
    encode_value,
)
from azure.servicebus._pyamqp.endpoints import Source, Target
from azure.servicebus._pyamqp.error import AMQPError
from azure.servicebus._pyamqp.message import Header, Properties
from azure.servicebus._pyamqp.message import Message as AmqpMessage
from azure.servicebus._pyamqp.outcomes import Accepted, Modified, Rejected, Released
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes

from tests.amqp_peer.broker import (
    NOT_ALLOWED,
    NOT_FOUND,
    TIMEOUT,
    Broker,
    BrokerError,
    Entity,
    Message,
    SessionState,
)

if TYPE_CHECKING:
    from tests.amqp_peer.server import AmqpPeer

log = logging.getLogger(__name__)

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
SESSION_FILTER = b"com.microsoft:session-filter"
LOCKED_UNTIL_UTC = b"com.microsoft:locked-until-utc"
LINK_TIMEOUT = b"com.microsoft:timeout"
DEAD_LETTER = b"com.microsoft:dead-letter"
DOTNET_EPOCH_TICKS = 621355968000000000
BATCH_FORMAT = 0x80013700
MAX_FRAME = 256 * 1024
LINK_CREDIT = 5000  # credit the peer grants to client senders

# Sections of an AMQP message, by descriptor code.
HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS, PROPERTIES, APP_PROPERTIES = 0x70, 0x71, 0x72, 0x73, 0x74
FOOTER = 0x78


def _typed(kind: str, value: Any) -> dict[str, Any]:
    return {TYPE: kind, VALUE: value}


def _text(value: Any) -> Any:
    """Decoded AMQP strings/symbols are bytes; the broker keeps str."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _text(value)


def ticks(unix_seconds: float) -> int:
    return int(unix_seconds * 10_000_000) + DOTNET_EPOCH_TICKS


def split_sections(payload: bytes) -> list[tuple[int, bytes, Any]]:
    """The sections of an encoded message: (descriptor, their exact bytes, decoded value)."""
    sections = []
    buffer = memoryview(payload)
    while buffer:
        descriptor = buffer[2]
        rest, value = _DECODE_BY_CONSTRUCTOR[buffer[3]](buffer[4:])
        size = len(buffer) - len(rest)
        sections.append((descriptor, bytes(buffer[:size]), value))
        buffer = rest
    return sections


def encode_app_props_section(props: dict[str, Any]) -> bytes:
    out = bytearray()
    encode_value(
        out,
        _typed(AMQPTypes.described, (_typed(AMQPTypes.ulong, APP_PROPERTIES), encode_application_properties(props))),
    )
    return bytes(out)


def rewrite_app_props(bare: bytes, props: dict[str, Any]) -> bytes:
    """The bare message with its application-properties section replaced (dead-lettering adds two)."""
    out = bytearray()
    placed = False
    for descriptor, raw, _ in split_sections(bare):
        if descriptor == APP_PROPERTIES:
            out += encode_app_props_section(props)
            placed = True
        elif descriptor > APP_PROPERTIES and not placed:
            out += encode_app_props_section(props)
            out += raw
            placed = True
        else:
            out += raw
    if not placed:
        out += encode_app_props_section(props)
    return bytes(out)


def parse_message(payload: bytes) -> Message:
    """A message as a sender transferred it, ready to store (header/annotations split off)."""
    bare = bytearray()
    annotations: dict[str, Any] = {}
    props: list[Any] = [None] * 13
    app_props: dict[str, Any] = {}
    for descriptor, raw, value in split_sections(payload):
        if descriptor in (HEADER, DELIVERY_ANNOTATIONS):
            continue
        if descriptor == MESSAGE_ANNOTATIONS:
            annotations = {_text(k): _text(v) for k, v in (value or {}).items()}
            continue
        if descriptor == PROPERTIES:
            props = list(value) + [None] * (13 - len(value))
        elif descriptor == APP_PROPERTIES:
            app_props = {_text(k): _text(v) for k, v in (value or {}).items()}
        bare += raw
    message_id = props[0]
    return Message(
        seq=0,
        enqueued_ms=0,
        bare=bytes(bare),
        message_id=None if message_id is None else str(_text(message_id)),
        session_id=_text(props[10]),
        subject=_text(props[3]),
        correlation_id=None if props[5] is None else str(_text(props[5])),
        to=_text(props[2]),
        reply_to=_text(props[4]),
        content_type=_text(props[6]),
        app_props=app_props,
        annotations={k: v for k, v in annotations.items() if not k.startswith("x-opt-") or k == "x-opt-partition-key"},
    )


def encode_delivery(entity: Entity, message: Message, locked_until: float) -> bytes:
    """What the broker transfers: header (delivery count), broker annotations, then the bare message."""
    out = bytearray()
    encode_value(out, describe_performative(Header(delivery_count=message.delivery_count)))
    annotations: dict[Any, Any] = dict(message.annotations)
    annotations[b"x-opt-sequence-number"] = _typed(AMQPTypes.long, message.seq)
    annotations[b"x-opt-enqueued-time"] = _typed(AMQPTypes.timestamp, message.enqueued_ms)
    annotations[b"x-opt-locked-until"] = _typed(AMQPTypes.timestamp, int(locked_until * 1000))
    if message.dead_letter_source:
        annotations[b"x-opt-deadletter-source"] = message.dead_letter_source
    encode_value(
        out,
        _typed(AMQPTypes.described, (_typed(AMQPTypes.ulong, MESSAGE_ANNOTATIONS), encode_annotations(annotations))),
    )
    out += message.bare
    return bytes(out)


def encode_peeked(message: Message) -> bytes:
    out = bytearray()
    encode_value(out, describe_performative(Header(delivery_count=message.delivery_count)))
    annotations: dict[Any, Any] = dict(message.annotations)
    annotations[b"x-opt-sequence-number"] = _typed(AMQPTypes.long, message.seq)
    annotations[b"x-opt-enqueued-time"] = _typed(AMQPTypes.timestamp, message.enqueued_ms)
    if message.dead_letter_source:
        annotations[b"x-opt-deadletter-source"] = message.dead_letter_source
    encode_value(
        out,
        _typed(AMQPTypes.described, (_typed(AMQPTypes.ulong, MESSAGE_ANNOTATIONS), encode_annotations(annotations))),
    )
    out += message.bare
    return bytes(out)


def entity_path(address: Any) -> str:
    """``amqps://host:port/orders`` or ``orders`` -> ``orders``."""
    text = _text(address) or ""
    if "://" in text:
        text = urlparse(text).path
    return text.strip("/")


class Link:
    def __init__(self, session: AmqpSession, name: bytes, handle: int, remote_handle: int, attach: list[Any]) -> None:
        self.session = session
        self.name_bytes = name
        self.name = _text(name)
        self.handle = handle
        self.remote_handle = remote_handle
        self.attach = attach
        self.source = list(attach[5] or []) + [None] * 11 if attach[5] is not None else None
        self.target = list(attach[6] or []) + [None] * 7 if attach[6] is not None else None
        self.properties = attach[13] or {}
        self.closed = False
        self.attached = False

    def reply_attach(self, *, source: Any = "echo", target: Any = "echo", properties: Any = None, role: bool) -> None:
        src = Source(*self.source[:11]) if source == "echo" and self.source else (source if source != "echo" else None)
        tgt = Target(*self.target[:7]) if target == "echo" and self.target else (target if target != "echo" else None)
        self.session.send(
            pf.AttachFrame(
                name=self.name_bytes,
                handle=self.handle,
                role=role,
                send_settle_mode=self.attach[3],
                rcv_settle_mode=self.attach[4],
                source=src,
                target=tgt,
                unsettled=None,
                incomplete_unsettled=False,
                initial_delivery_count=0 if role is False else None,
                max_message_size=MAX_FRAME * 4,
                offered_capabilities=None,
                desired_capabilities=None,
                properties=properties,
            )
        )

    def refuse(self, condition: bytes, description: str, *, role: bool) -> None:
        """Attach with no terminus then detach with the error: how a broker rejects a link."""
        self.reply_attach(source=None, target=None, role=role)
        self.attached = True
        self.detach(condition, description)

    def detach(self, condition: bytes | None = None, description: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        error = AMQPError(condition=condition, description=description, info=None) if condition else None
        self.session.send(pf.DetachFrame(handle=self.handle, closed=True, error=error))
        self.session.forget(self)

    def on_detach(self, *, abrupt: bool = False) -> None:
        """The client detached (or the connection went away)."""


class OutLink(Link):
    """The peer sends on this link (the client's receiver): entity deliveries or node responses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.credit = 0
        self.delivery_count = 0
        self.entity: Entity | None = None
        self.session_state: SessionState | None = None

    # -- broker.Receiver ---------------------------------------------------------------------

    def deliver(self, entity: Entity, message: Message, locked_until: float) -> None:
        assert message.lock_token is not None
        self.credit -= 1
        self.delivery_count += 1
        delivery_id = self.session.transfer(
            self, message.lock_token.bytes_le, encode_delivery(entity, message, locked_until), settled=False
        )
        self.session.unsettled[delivery_id] = (self, entity, message)

    def session_acquired(self, entity: Entity, session: SessionState) -> None:
        self.session_state = session
        self.source[7] = {SESSION_FILTER: session.session_id}
        self.reply_attach(
            role=False, properties={LOCKED_UNTIL_UTC: _typed(AMQPTypes.long, ticks(session.locked_until))}
        )
        self.attached = True

    def session_unavailable(self) -> None:
        self.entity = None
        self.refuse(
            TIMEOUT, "The operation did not complete within the allotted timeout: no session is available.", role=False
        )

    def lock_lost(self, description: str) -> None:
        self.entity = None
        self.session_state = None
        self.detach(b"com.microsoft:session-lock-lost", description)

    def entity_deleted(self, description: str) -> None:
        self.entity = None
        self.session_state = None
        self.detach(NOT_FOUND, description)

    # -- frames --------------------------------------------------------------------------------

    def on_flow(self, fields: list[Any]) -> None:
        delivery_count, link_credit, drain = fields[5], fields[6], fields[8]
        if link_credit is None:
            return
        if delivery_count is None:
            self.credit = link_credit
        else:
            self.credit = delivery_count + link_credit - self.delivery_count
        entity = self.entity
        if entity is not None:
            if self.session_state is not None:
                entity.pump_session(self.session_state)
            else:
                entity.pump()
        if drain and self.credit > 0 and not self.closed:
            self.delivery_count += self.credit
            self.credit = 0
            self.session.send_flow(self, drain=True)
        elif fields[9]:  # echo
            self.session.send_flow(self)

    def on_detach(self, *, abrupt: bool = False) -> None:
        # A receiver that detaches releases its locks (the messages become available, delivery count
        # unchanged: it only counts abandons and expired locks). A connection that just vanishes is
        # treated like an expired lock: the broker lost the holder, so the count goes up.
        entity, self.entity = self.entity, None
        if entity is not None:
            entity.detach_receiver(self, count_delivery=abrupt)

    def respond(
        self,
        request_id: Any,
        status: int,
        description: str,
        body: Any = None,
        *,
        cbs: bool = False,
        condition: bytes | None = None,
    ) -> None:
        """A request/response node (``$cbs``, ``$management``) answers on this link."""
        code_key, text_key = ("status-code", "status-description") if cbs else ("statusCode", "statusDescription")
        app: dict[str, Any] = {code_key: status, text_key: description}
        if condition is not None:
            app["errorCondition"] = _typed(AMQPTypes.symbol, condition)
            app["error-condition"] = _typed(AMQPTypes.symbol, condition)
        message = AmqpMessage(
            properties=Properties(correlation_id=request_id, message_id=uuid.uuid4()),
            application_properties=app,
            value=body,
        )
        out = bytearray()
        encode_payload(out, message)
        self.credit -= 1
        self.delivery_count += 1
        self.session.transfer(self, struct.pack(">I", self.delivery_count), bytes(out), settled=True)


class InLink(Link):
    """The client sends on this link: to an entity, or requests to ``$cbs`` / ``$management``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivery_count = self.attach[9] or 0
        self.credit = 0
        self.partial = bytearray()
        self.first: list[Any] | None = None
        self.address = entity_path(self.target[0]) if self.target else ""

    def grant(self) -> None:
        self.credit = LINK_CREDIT
        self.session.send_flow(self)

    def on_transfer(self, fields: list[Any]) -> None:
        if fields[1] is not None or self.first is None:
            self.first = fields
        self.partial += fields[11]
        if fields[5]:  # more
            return
        first, payload = self.first, bytes(self.partial)
        self.partial = bytearray()
        self.first = None
        self.delivery_count += 1
        self.credit -= 1
        if self.credit < LINK_CREDIT // 2:
            self.grant()
        delivery_id, settled, message_format = first[1], first[4], first[3]
        state: Any = Accepted()
        try:
            self.session.connection.handle_request(self, payload, message_format)
        except BrokerError as exc:
            state = Rejected(error=AMQPError(condition=exc.condition, description=exc.description, info=None))
        if not settled:
            self.session.send(
                pf.DispositionFrame(role=True, first=delivery_id, last=None, settled=True, state=state, batchable=None)
            )


class AmqpSession:
    def __init__(self, connection: PeerConnection, channel: int, begin: list[Any]) -> None:
        self.connection = connection
        self.channel = channel
        self.next_outgoing_id = 0
        self.next_incoming_id = begin[1]
        self.remote_incoming_window = begin[2]
        self.links: dict[int, Link] = {}  # by the client's handle
        self.by_name: dict[bytes, Link] = {}
        self.handles = iter(range(2**31))
        self.unsettled: dict[int, tuple[OutLink, Entity, Message]] = {}
        self.ended = False

    # -- output --------------------------------------------------------------------------------

    def send(self, frame: Any) -> None:
        self.connection.send(self.channel, frame)

    def send_flow(self, link: Link, *, drain: bool = False) -> None:
        if isinstance(link, InLink):
            credit, count = link.credit, link.delivery_count
        else:
            assert isinstance(link, OutLink)
            credit, count = max(link.credit, 0), link.delivery_count
        self.send(
            pf.FlowFrame(
                next_incoming_id=self.next_incoming_id,
                incoming_window=65536,
                next_outgoing_id=self.next_outgoing_id,
                outgoing_window=65536,
                handle=link.handle,
                delivery_count=count,
                link_credit=credit,
                available=None,
                drain=drain,
                echo=False,
                properties=None,
            )
        )

    def transfer(self, link: OutLink, tag: bytes, payload: bytes, *, settled: bool) -> int:
        delivery_id = self.next_outgoing_id
        self.next_outgoing_id += 1
        limit = max(512, (self.connection.remote_max_frame or MAX_FRAME) - 256)
        chunks = [payload[i : i + limit] for i in range(0, len(payload), limit)] or [b""]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            self.send(
                pf.TransferFrame(
                    handle=link.handle,
                    delivery_id=delivery_id if index == 0 else None,
                    delivery_tag=tag if index == 0 else None,
                    message_format=0,
                    settled=settled,
                    more=not last,
                    payload=chunk,
                )
            )
        return delivery_id

    # -- input ---------------------------------------------------------------------------------

    def on_attach(self, fields: list[Any]) -> None:
        name, remote_handle, client_role = fields[0], fields[1], fields[2]
        handle = next(self.handles)
        link: Link
        if client_role:  # the client receives: we send
            link = OutLink(self, name, handle, remote_handle, fields)
        else:
            link = InLink(self, name, handle, remote_handle, fields)
        self.links[remote_handle] = link
        self.by_name[name] = link
        try:
            self.connection.attach(link)
        except BrokerError as exc:
            link.refuse(exc.condition, exc.description, role=not client_role)

    def forget(self, link: Link, *, abrupt: bool = False) -> None:
        self.links.pop(link.remote_handle, None)
        self.by_name.pop(link.name_bytes, None)
        if isinstance(link, OutLink):
            link.on_detach(abrupt=abrupt)
            for delivery_id in [d for d, (owner, _, _) in self.unsettled.items() if owner is link]:
                del self.unsettled[delivery_id]

    def on_detach(self, fields: list[Any]) -> None:
        link = self.links.get(fields[0])
        if link is None:
            return
        if not link.closed:
            if isinstance(link, OutLink) and not link.attached:
                # Detached while we still held its attach (waiting for a session): our half of the
                # link must exist before it can be detached.
                link.reply_attach(source=None, target=None, role=False)
            link.closed = True
            self.send(pf.DetachFrame(handle=link.handle, closed=bool(fields[1]), error=None))
            self.forget(link)

    def on_flow(self, fields: list[Any]) -> None:
        next_incoming_id = fields[0] if fields[0] is not None else 0
        self.remote_incoming_window = next_incoming_id + fields[1] - self.next_outgoing_id
        if fields[4] is None:
            return
        link = self.links.get(fields[4])
        if isinstance(link, OutLink) and not link.closed:
            link.on_flow(fields)

    def on_transfer(self, fields: list[Any]) -> None:
        self.next_incoming_id += 1
        link = self.links.get(fields[0])
        if isinstance(link, InLink):
            link.on_transfer(fields)

    def on_disposition(self, fields: list[Any]) -> None:
        role, first, last, settled, state = fields[0], fields[1], fields[2], fields[3], fields[4]
        if not role:  # from a sender: confirmations of our node responses; nothing to do
            return
        last = first if last is None else last
        for delivery_id in range(first, last + 1):
            entry = self.unsettled.pop(delivery_id, None)
            if entry is None:
                continue
            link, entity, message = entry
            outcome, details, reply = _outcome(state)
            if outcome is None:
                continue
            try:
                entity.settle(message, link, outcome, **details)
            except BrokerError as exc:
                reply = Rejected(error=AMQPError(condition=exc.condition, description=exc.description, info=None))
            if not settled:
                self.send(
                    pf.DispositionFrame(
                        role=False, first=delivery_id, last=None, settled=True, state=reply, batchable=None
                    )
                )

    def end(self, *, abrupt: bool = False) -> None:
        """The session ends (end frame or connection loss): every link goes away."""
        if self.ended:
            return
        self.ended = True
        for link in list(self.links.values()):
            link.closed = True
            self.forget(link, abrupt=abrupt)


def _outcome(state: Any) -> tuple[str | None, dict[str, Any], Any]:
    if not state:
        return None, {}, None
    if "accepted" in state:
        return "accepted", {}, Accepted()
    if "released" in state:
        return "released", {}, Released()
    if "modified" in state:
        values = list(state["modified"]) + [None] * 3
        return (
            "modified",
            {"delivery_failed": bool(values[0]), "undeliverable_here": bool(values[1])},
            Modified(delivery_failed=values[0], undeliverable_here=values[1], message_annotations=None),
        )
    if "rejected" in state:
        error = (state["rejected"] or [None])[0] or [None, None, None]
        error = list(error) + [None] * 3
        info = {_text(k): _text(v) for k, v in (error[2] or {}).items()}
        reason = info.get("DeadLetterReason")
        description = info.get("DeadLetterErrorDescription")
        if error[0] is not None and _text(error[0]) != DEAD_LETTER.decode() and reason is None:
            reason = _text(error[0])
            description = _text(error[1])
        return "rejected", {"reason": reason, "description": description}, Rejected(error=None)
    return None, {}, None


class PeerConnection:
    """One client TCP connection."""

    def __init__(self, peer: AmqpPeer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.broker: Broker = peer.broker
        self.reader = reader
        self.writer = writer
        self.sessions: dict[int, AmqpSession] = {}
        self.remote_max_frame: int | None = None
        self.container_id: str | None = None
        self.hostname: str | None = None
        self.closed = False
        self.frames_in = 0

    # -- output --------------------------------------------------------------------------------

    def send(self, channel: int, frame: Any, frame_type: bytes = b"\x00") -> None:
        if self.closed:
            return
        header, body = encode_frame(frame, frame_type=frame_type)
        data = header if body is None else header + struct.pack(">H", channel) + bytes(body)
        self.writer.write(data)
        self.peer.record("out", frame)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._handshake()
            while not self.closed:
                channel, frame = await self._read_frame()
                if frame is None:
                    continue
                self.frames_in += 1
                self._dispatch(channel, frame)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a peer bug must be loud, not a hung test
            log.exception("test peer connection failed")
            raise
        finally:
            self._lost()

    def abort(self) -> None:
        """Drop the TCP connection without any AMQP goodbye (a network failure)."""
        self._lost(abrupt=True)
        self.writer.transport.abort()

    def _lost(self, *, abrupt: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for session in list(self.sessions.values()):
            session.end(abrupt=abrupt)
        self.sessions.clear()
        self.peer.connections.discard(self)
        with contextlib.suppress(Exception):  # already gone
            self.writer.close()

    async def _read_exact(self, size: int) -> bytes:
        return await self.reader.readexactly(size)

    async def _read_frame(self) -> tuple[int, Any]:
        header = await self._read_exact(8)
        if header[:4] == b"AMQP":
            return 0, ("header", header)
        size = struct.unpack(">I", header[:4])[0]
        doff = header[4]
        channel = struct.unpack(">H", header[6:8])[0]
        body = await self._read_exact(size - 8)
        body = body[(doff - 2) * 4 :]
        if not body:
            return channel, None  # empty (heartbeat) frame
        return channel, decode_frame(memoryview(body))

    async def _handshake(self) -> None:
        header = await self._read_exact(8)
        if header == SASL_HEADER:
            self.writer.write(SASL_HEADER)
            self.send(0, pf.SASLMechanism(sasl_server_mechanisms=[b"MSSBCBS", b"ANONYMOUS", b"PLAIN"]), b"\x01")
            _, (code, fields) = await self._read_frame()
            if code != 0x41:
                raise ConnectionError(f"expected sasl-init, got {code:#x}")
            self.peer.sasl_mechanisms.append(_text(fields[0]))
            self.send(0, pf.SASLOutcome(code=0, additional_data=None), b"\x01")
            header = await self._read_exact(8)
        if header != AMQP_HEADER:
            self.writer.write(AMQP_HEADER)
            raise ConnectionError(f"unsupported protocol header {header!r}")
        self.writer.write(AMQP_HEADER)

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, channel: int, frame: Any) -> None:
        code, fields = frame
        if code == "header":
            return
        self.peer.record("in", (code, fields))
        if code == 0x10:  # open
            self.container_id = _text(fields[0])
            self.hostname = _text(fields[1])
            self.remote_max_frame = fields[2]
            self.send(
                0,
                pf.OpenFrame(
                    container_id="ecom-test-peer",
                    hostname=None,
                    max_frame_size=MAX_FRAME,
                    channel_max=4999,
                    idle_timeout=None,
                    outgoing_locales=None,
                    incoming_locales=None,
                    offered_capabilities=None,
                    desired_capabilities=None,
                    properties=None,
                ),
            )
        elif code == 0x11:  # begin
            session = self.sessions[channel] = AmqpSession(self, channel, fields)
            self.send(
                channel,
                pf.BeginFrame(
                    remote_channel=channel,
                    next_outgoing_id=0,
                    incoming_window=65536,
                    outgoing_window=65536,
                    handle_max=262143,
                    offered_capabilities=None,
                    desired_capabilities=None,
                    properties=None,
                ),
            )
            del session
        elif 0x12 <= code <= 0x16:
            session = self.sessions.get(channel)
            if session is None:
                return  # frames for a session the client already ended (it detaches links after end)
            handler = {
                0x12: session.on_attach,
                0x13: session.on_flow,
                0x14: session.on_transfer,
                0x15: session.on_disposition,
                0x16: session.on_detach,
            }[code]
            handler(fields)
        elif code == 0x17:  # end
            session = self.sessions.pop(channel, None)
            if session is not None:
                session.end()
                self.send(channel, pf.EndFrame(error=None))
        elif code == 0x18:  # close
            for session in list(self.sessions.values()):
                session.end()
            self.sessions.clear()
            self.send(0, pf.CloseFrame(error=None))
            self._lost(abrupt=False)

    # -- links ---------------------------------------------------------------------------------

    def attach(self, link: Link) -> None:
        if isinstance(link, InLink):
            address = link.address
            if address == "$cbs" or address.endswith("$management"):
                if address.endswith("$management") and address != "$management":
                    self.broker.source(address[: -len("/$management")])  # the entity must exist
                link.reply_attach(role=True)
                link.grant()
                return
            self.broker.check_target(address)
            link.reply_attach(role=True)
            link.grant()
            return
        assert isinstance(link, OutLink)
        address = entity_path(link.source[0]) if link.source else ""
        if address == "$cbs" or address.endswith("$management"):
            link.reply_attach(role=False)
            return
        entity = self.broker.source(address)
        filters = link.source[7] or {}
        link.entity = entity
        if SESSION_FILTER in filters:
            session_id = _text(filters[SESSION_FILTER])
            timeout_ms = (link.properties or {}).get(LINK_TIMEOUT)
            timeout = (timeout_ms / 1000.0) if timeout_ms else 60.0
            entity.accept_session(link, session_id, timeout)
        else:
            entity.attach_receiver(link)
            link.reply_attach(role=False)
            link.attached = True

    # -- requests ------------------------------------------------------------------------------

    def handle_request(self, link: InLink, payload: bytes, message_format: int) -> None:
        address = link.address
        if address == "$cbs":
            self._cbs(link, payload)
        elif address.endswith("$management"):
            self._management(link, payload)
        elif message_format == BATCH_FORMAT:
            for section in decode_payload(memoryview(payload)).data or []:
                self._store(address, bytes(section))
        else:
            self._store(address, payload)

    def _store(self, address: str, payload: bytes) -> None:
        message = parse_message(payload)
        self.peer.sent_messages.append((address, message))
        self.broker.send(address, message)

    def _response_link(self, link: InLink, reply_to: Any) -> OutLink:
        wanted = {entity_path(reply_to), link.address} if reply_to else {link.address}
        for candidate in link.session.links.values():
            if isinstance(candidate, OutLink) and candidate.source and entity_path(candidate.source[0]) in wanted:
                return candidate
        raise BrokerError(NOT_FOUND, f"no response link for {link.address}")

    def _cbs(self, link: InLink, payload: bytes) -> None:
        request = decode_payload(memoryview(payload))
        app = _plain(request.application_properties or {})
        self.peer.cbs_requests.append(app)
        reply = self._response_link(link, request.properties.reply_to)
        if app.get("operation") != "put-token":
            reply.respond(request.properties.message_id, 400, "unknown operation", cbs=True)
            return
        token = _text(request.value)
        if self.peer.check_tokens and str(token).startswith("SharedAccessSignature"):
            from tests.amqp_peer.atom import check_sas

            try:
                check_sas(str(token), self.peer.key_name, self.peer.key)
            except PermissionError as exc:
                reply.respond(request.properties.message_id, 401, f"Unauthorized: {exc}", cbs=True)
                return
        reply.respond(request.properties.message_id, 202, "Accepted", cbs=True)

    def _management(self, link: InLink, payload: bytes) -> None:
        request = decode_payload(memoryview(payload))
        app = _plain(request.application_properties or {})
        operation = app.get("operation")
        body = request.value if isinstance(request.value, dict) else {}
        reply = self._response_link(link, request.properties.reply_to)
        request_id = request.properties.message_id
        entity_address = link.address[: -len("$management")].rstrip("/")
        self.peer.management_requests.append((entity_address, operation, _plain(body)))
        try:
            status, description, response = self._operation(entity_address, operation, body, app)
        except BrokerError as exc:
            reply.respond(request_id, exc.status, exc.description, condition=exc.condition)
            return
        reply.respond(request_id, status, description, response)

    def _operation(
        self, address: str, operation: str | None, body: dict[Any, Any], app: dict[str, Any]
    ) -> tuple[int, str, Any]:
        entity = self.broker.source(address)
        associated = app.get("associated-link-name")
        if operation == "com.microsoft:renew-session-lock":
            until = entity.renew_session(_text(body[b"session-id"]), associated)
            return 200, "OK", {"expiration": _typed(AMQPTypes.timestamp, int(until * 1000))}
        if operation == "com.microsoft:get-session-state":
            session = entity.session_of(_text(body[b"session-id"]), associated)
            return 200, "OK", {"session-state": session.state}
        if operation == "com.microsoft:set-session-state":
            session = entity.session_of(_text(body[b"session-id"]), associated)
            state = body.get(b"session-state")
            session.state = None if state is None else bytes(state)
            return 200, "OK", None
        if operation == "com.microsoft:peek-message":
            from_seq = int(body.get(b"from-sequence-number") or 1)
            count = int(body.get(b"message-count") or 1)
            session_id = _text(body.get(b"session-id"))
            found = entity.peek(from_seq, count, session_id)
            if not found:
                return 204, "No Content", None
            return 200, "OK", {"messages": [{"message": encode_peeked(m)} for m in found]}
        if operation == "com.microsoft:update-disposition":
            return self._update_disposition(entity, body, associated)
        raise BrokerError(NOT_ALLOWED, f"the test peer does not implement {operation!r}", 501)

    def _update_disposition(self, entity: Entity, body: dict[Any, Any], associated: str | None) -> tuple[int, str, Any]:
        status = _text(body.get(b"disposition-status"))
        tokens = body.get(b"lock-tokens") or []
        outcome = {"completed": "accepted", "abandoned": "modified", "suspended": "rejected"}.get(status or "")
        if outcome is None:
            raise BrokerError(NOT_ALLOWED, f"disposition {status!r} is not modelled", 501)
        for token in tokens:
            message = entity.find_locked(token if isinstance(token, uuid.UUID) else uuid.UUID(bytes=bytes(token)))
            if message is None or (
                associated is not None and message.locked_by is not None and message.locked_by.name != associated
            ):
                condition = (
                    b"com.microsoft:session-lock-lost"
                    if entity.requires_session
                    else b"com.microsoft:message-lock-lost"
                )
                raise BrokerError(condition, "The lock supplied is invalid.", 410)
            details: dict[str, Any] = {}
            if outcome == "rejected":
                details = {
                    "reason": _text(body.get(b"deadletter-reason")),
                    "description": _text(body.get(b"deadletter-description")),
                }
            elif outcome == "modified":
                details = {"delivery_failed": True}
            assert message.locked_by is not None
            entity.settle(message, message.locked_by, outcome, **details)
        return 200, "OK", None
