"""The Service Bus management API (ATOM feeds over HTTPS) of the test peer, for
``azure.servicebus.aio.management.ServiceBusAdministrationClient``.

The admin client always talks ``https://<namespace>``, so this is served with TLS on the same port as
AMQP (see server.py) with a throw-away certificate made here; clients pass ``connection_verify=`` the
certificate file. Requests carry a SharedAccessSignature that is checked like the real service does
(HMAC-SHA256 over the URL-encoded resource and expiry), so a client that signs wrongly fails here too.

Implemented: create/get/delete queues and topics, subscriptions, rules (list, create, delete), with
the descriptions echoed back in the shapes the SDK parses; what the broker does with them is in
broker.py. Anything else answers 501 so a test cannot pass on an operation that was never modelled.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree as ET

from aiohttp import web

from tests.amqp_peer.broker import BrokerError, Queue, Rule, Subscription, Topic

if TYPE_CHECKING:
    from tests.amqp_peer.server import AmqpPeer

ATOM = "http://www.w3.org/2005/Atom"
SB = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


def parse_duration(text: str | None, default: float) -> float:
    if not text:
        return default
    match = _DURATION.match(text.strip())
    if match is None:
        raise BrokerError(b"amqp:invalid-field", f"bad ISO 8601 duration {text!r}", 400)
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    whole = int(seconds)
    frac = seconds - whole
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    text = "PT"
    if h:
        text += f"{h}H"
    if m:
        text += f"{m}M"
    if s or frac or text == "PT":
        text += f"{s + frac:g}S"
    return text


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is also its own CA for ``connection_verify``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecom-test-peer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "peer-cert.pem", directory / "peer-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def check_sas(token: str, key_name: str, key: str, now: float | None = None) -> str:
    """Verify a ``SharedAccessSignature sr=..&sig=..&se=..&skn=..`` token; returns its resource."""
    token = token.removeprefix("SharedAccessSignature ")
    fields = dict(urllib.parse.parse_qsl(token, keep_blank_values=True))
    try:
        resource, signature, expiry, name = fields["sr"], fields["sig"], fields["se"], fields["skn"]
    except KeyError as exc:
        raise PermissionError(f"SAS token is missing {exc.args[0]}") from None
    if name != key_name:
        raise PermissionError(f"unknown key name {name!r}")
    if int(expiry) < (now or time.time()):
        raise PermissionError("SAS token expired")
    to_sign = f"{urllib.parse.quote_plus(resource)}\n{expiry}".encode()
    expected = base64.b64encode(hmac.new(key.encode(), to_sign, hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, signature):
        raise PermissionError("SAS signature does not match")
    return resource


def _text(parent: ET.Element | None, tag: str) -> str | None:
    if parent is None:
        return None
    child = parent.find(f"{{{SB}}}{tag}")
    return None if child is None or child.text is None else child.text


def _bool(parent: ET.Element | None, tag: str, default: bool = False) -> bool:
    value = _text(parent, tag)
    return default if value is None else value.strip().lower() == "true"


class AtomEndpoint:
    def __init__(self, peer: AmqpPeer, directory: Path) -> None:
        self.peer = peer
        self.directory = directory
        self.requests: list[tuple[str, str, str]] = []  # method, path, body (for assertions)
        self._runner: web.AppRunner | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.cert_file: Path | None = None

    async def start(self) -> None:
        self.cert_file, key_file = make_certificate(self.directory)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, key_file)
        self.ssl_context = context
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def serve_socket(self, sock: socket.socket) -> None:
        import asyncio

        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(self._runner.server, sock=sock, ssl=self.ssl_context)
        except (OSError, ssl.SSLError):
            sock.close()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        path = urllib.parse.unquote(request.path).strip("/")
        self.requests.append((request.method, path, body))
        try:
            check_sas(request.headers.get("Authorization", ""), self.peer.key_name, self.peer.key)
        except PermissionError as exc:
            return self._error(401, f"Unauthorized: {exc}")
        try:
            return self._route(request.method, path, body, request)
        except BrokerError as exc:
            return self._error(exc.status, exc.description)

    def _route(self, method: str, path: str, body: str, request: web.Request) -> web.Response:
        parts = path.split("/")
        broker = self.peer.broker
        lowered = [p.lower() for p in parts]
        if len(parts) == 1 and parts[0] and not parts[0].startswith("$"):
            name = parts[0]
            if method == "PUT":
                description = self._content(body)
                if request.headers.get("If-Match"):
                    raise BrokerError(b"amqp:not-implemented", "updating entities is not modelled", 501)
                if description.tag == f"{{{SB}}}QueueDescription":
                    queue = broker.create_queue(
                        name,
                        requires_session=_bool(description, "RequiresSession"),
                        max_delivery_count=int(_text(description, "MaxDeliveryCount") or 10),
                        lock_duration=parse_duration(_text(description, "LockDuration"), 60.0),
                        requires_duplicate_detection=_bool(description, "RequiresDuplicateDetection"),
                        duplicate_window=parse_duration(
                            _text(description, "DuplicateDetectionHistoryTimeWindow"), 600.0
                        ),
                    )
                    queue.properties = {"description": description}
                    return self._entry(201, name, self._queue_xml(queue))
                if description.tag == f"{{{SB}}}TopicDescription":
                    topic = broker.create_topic(
                        name,
                        requires_duplicate_detection=_bool(description, "RequiresDuplicateDetection"),
                        duplicate_window=parse_duration(
                            _text(description, "DuplicateDetectionHistoryTimeWindow"), 600.0
                        ),
                    )
                    return self._entry(201, name, self._topic_xml(topic))
                raise BrokerError(b"amqp:not-implemented", f"cannot create a {description.tag}", 400)
            if method == "GET":
                key = name.lower()
                if key in broker.queues:
                    return self._entry(200, name, self._queue_xml(broker.queues[key]))
                if key in broker.topics:
                    return self._entry(200, name, self._topic_xml(broker.topics[key]))
                return self._empty_feed()  # what Service Bus answers for an unknown entity
            if method == "DELETE":
                key = name.lower()
                if broker.queues.pop(key, None) is None and broker.topics.pop(key, None) is None:
                    raise BrokerError(b"amqp:not-found", f"The messaging entity '{name}' could not be found.", 404)
                return web.Response(status=200)
        if len(parts) == 3 and lowered[1] == "subscriptions":
            topic_name, name = parts[0], parts[2]
            if method == "PUT":
                if request.headers.get("If-Match"):
                    raise BrokerError(b"amqp:not-implemented", "updating subscriptions is not modelled", 501)
                description = self._content(body)
                sub = broker.create_subscription(
                    topic_name,
                    name,
                    requires_session=_bool(description, "RequiresSession"),
                    max_delivery_count=int(_text(description, "MaxDeliveryCount") or 10),
                    lock_duration=parse_duration(_text(description, "LockDuration"), 60.0),
                    auto_delete_on_idle=(
                        parse_duration(idle, 0.0) if (idle := _text(description, "AutoDeleteOnIdle")) else None
                    ),
                )
                return self._entry(201, name, self._subscription_xml(sub))
            if method == "GET":
                return self._entry(200, name, self._subscription_xml(broker.subscription(topic_name, name)))
            if method == "DELETE":
                broker.delete_subscription(topic_name, name)
                return web.Response(status=200)
        if len(parts) == 4 and lowered[1] == "subscriptions" and lowered[3] == "rules" and method == "GET":
            sub = broker.subscription(parts[0], parts[2])
            skip = int(request.query.get("$skip", "0"))
            top = int(request.query.get("$top", "100"))
            rules = list(sub.rules.values())[skip : skip + top]
            return self._feed([(rule.name, self._rule_xml(rule)) for rule in rules])
        if len(parts) == 5 and lowered[1] == "subscriptions" and lowered[3] == "rules":
            topic_name, sub_name, rule_name = parts[0], parts[2], parts[4]
            if method == "PUT":
                if request.headers.get("If-Match"):
                    raise BrokerError(b"amqp:not-implemented", "updating rules is not modelled", 501)
                rule = self._parse_rule(rule_name, self._content(body))
                broker.create_rule(topic_name, sub_name, rule)
                return self._entry(201, rule_name, self._rule_xml(rule))
            if method == "GET":
                sub = broker.subscription(topic_name, sub_name)
                if rule_name not in sub.rules:
                    raise BrokerError(b"amqp:not-found", f"The rule '{rule_name}' could not be found.", 404)
                return self._entry(200, rule_name, self._rule_xml(sub.rules[rule_name]))
            if method == "DELETE":
                broker.delete_rule(topic_name, sub_name, rule_name)
                return web.Response(status=200)
        raise BrokerError(b"amqp:not-implemented", f"{method} /{path} is not modelled by the test peer", 501)

    # -- XML -----------------------------------------------------------------------------------

    @staticmethod
    def _content(body: str) -> ET.Element:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            raise BrokerError(b"amqp:decode-error", f"request body is not XML: {exc}", 400) from None
        content = root.find(f"{{{ATOM}}}content")
        if content is None or len(content) != 1:
            raise BrokerError(b"amqp:decode-error", "expected an ATOM entry with one description", 400)
        return content[0]

    def _parse_rule(self, name: str, description: ET.Element) -> Rule:
        element = description.find(f"{{{SB}}}Filter")
        kind = "true" if element is None else (element.get(f"{{{XSI}}}type") or "")
        if kind in ("true", "TrueFilter"):
            return Rule(name, "true")
        if kind == "FalseFilter":
            return Rule(name, "false")
        if kind == "SqlFilter":
            return Rule(name, "sql", sql=_text(element, "SqlExpression") or "")
        if kind == "CorrelationFilter":
            fields = {
                "subject": _text(element, "Label"),
                "message_id": _text(element, "MessageId"),
                "session_id": _text(element, "SessionId"),
                "correlation_id": _text(element, "CorrelationId"),
                "to": _text(element, "To"),
                "reply_to": _text(element, "ReplyTo"),
                "content_type": _text(element, "ContentType"),
            }
            properties: dict[str, Any] = {}
            props = element.find(f"{{{SB}}}Properties") if element is not None else None
            for kv in [] if props is None else props.findall(f"{{{SB}}}KeyValueOfstringanyType"):
                key = kv.find(f"{{{SB}}}Key")
                value = kv.find(f"{{{SB}}}Value")
                if key is not None and value is not None:
                    properties[key.text or ""] = value.text
            return Rule(
                name,
                "correlation",
                correlation={**{k: v for k, v in fields.items() if v is not None}, "properties": properties},
            )
        raise BrokerError(b"amqp:not-implemented", f"filter type {kind!r} is not modelled", 400)

    def _queue_xml(self, queue: Queue) -> ET.Element:
        d = ET.Element(f"{{{SB}}}QueueDescription")
        for tag, value in (
            ("LockDuration", format_duration(queue.lock_duration)),
            ("MaxSizeInMegabytes", "1024"),
            ("RequiresDuplicateDetection", str(queue.dedup is not None).lower()),
            ("RequiresSession", str(queue.requires_session).lower()),
            ("DefaultMessageTimeToLive", "P10675199DT2H48M5.4775807S"),
            ("DeadLetteringOnMessageExpiration", "false"),
            ("DuplicateDetectionHistoryTimeWindow", format_duration(queue.dedup.window if queue.dedup else 600)),
            ("MaxDeliveryCount", str(queue.max_delivery_count)),
            ("EnableBatchedOperations", "true"),
            ("SizeInBytes", "0"),
            ("MessageCount", str(len(queue.all_messages()))),
            ("Status", "Active"),
            ("CreatedAt", _now_iso()),
            ("UpdatedAt", _now_iso()),
            ("AccessedAt", _now_iso()),
            ("EnablePartitioning", "false"),
            ("EnableExpress", "false"),
        ):
            ET.SubElement(d, f"{{{SB}}}{tag}").text = value
        return d

    def _topic_xml(self, topic: Topic) -> ET.Element:
        d = ET.Element(f"{{{SB}}}TopicDescription")
        for tag, value in (
            ("DefaultMessageTimeToLive", "P10675199DT2H48M5.4775807S"),
            ("MaxSizeInMegabytes", "1024"),
            ("RequiresDuplicateDetection", str(topic.dedup is not None).lower()),
            ("DuplicateDetectionHistoryTimeWindow", format_duration(topic.dedup.window if topic.dedup else 600)),
            ("EnableBatchedOperations", "true"),
            ("SizeInBytes", "0"),
            ("Status", "Active"),
            ("CreatedAt", _now_iso()),
            ("UpdatedAt", _now_iso()),
            ("AccessedAt", _now_iso()),
            ("SubscriptionCount", str(len(topic.subscriptions))),
            ("EnablePartitioning", "false"),
            ("EnableExpress", "false"),
        ):
            ET.SubElement(d, f"{{{SB}}}{tag}").text = value
        return d

    def _subscription_xml(self, sub: Subscription) -> ET.Element:
        d = ET.Element(f"{{{SB}}}SubscriptionDescription")
        for tag, value in (
            ("LockDuration", format_duration(sub.lock_duration)),
            ("RequiresSession", str(sub.requires_session).lower()),
            ("DefaultMessageTimeToLive", "P10675199DT2H48M5.4775807S"),
            ("DeadLetteringOnMessageExpiration", "false"),
            ("DeadLetteringOnFilterEvaluationExceptions", "true"),
            ("MessageCount", str(len(sub.all_messages()))),
            ("MaxDeliveryCount", str(sub.max_delivery_count)),
            ("EnableBatchedOperations", "true"),
            ("Status", "Active"),
            ("CreatedAt", _now_iso()),
            ("UpdatedAt", _now_iso()),
            ("AccessedAt", _now_iso()),
            *(
                [("AutoDeleteOnIdle", format_duration(sub.auto_delete_on_idle))]
                if sub.auto_delete_on_idle is not None
                else []
            ),
        ):
            ET.SubElement(d, f"{{{SB}}}{tag}").text = value
        return d

    def _rule_xml(self, rule: Rule) -> ET.Element:
        d = ET.Element(f"{{{SB}}}RuleDescription")
        f = ET.SubElement(d, f"{{{SB}}}Filter")
        if rule.kind == "true":
            f.set(f"{{{XSI}}}type", "TrueFilter")
            ET.SubElement(f, f"{{{SB}}}SqlExpression").text = "1=1"
            ET.SubElement(f, f"{{{SB}}}CompatibilityLevel").text = "20"
        elif rule.kind == "false":
            f.set(f"{{{XSI}}}type", "FalseFilter")
            ET.SubElement(f, f"{{{SB}}}SqlExpression").text = "1=0"
            ET.SubElement(f, f"{{{SB}}}CompatibilityLevel").text = "20"
        elif rule.kind == "sql":
            f.set(f"{{{XSI}}}type", "SqlFilter")
            ET.SubElement(f, f"{{{SB}}}SqlExpression").text = rule.sql
            ET.SubElement(f, f"{{{SB}}}CompatibilityLevel").text = "20"
        else:
            f.set(f"{{{XSI}}}type", "CorrelationFilter")
            c = rule.correlation
            for tag, attr in (
                ("CorrelationId", "correlation_id"),
                ("MessageId", "message_id"),
                ("To", "to"),
                ("ReplyTo", "reply_to"),
                ("Label", "subject"),
                ("SessionId", "session_id"),
                ("ContentType", "content_type"),
            ):
                if c.get(attr) is not None:
                    ET.SubElement(f, f"{{{SB}}}{tag}").text = c[attr]
            properties = c.get("properties") or {}
            if properties:  # string values only (what the adapter's replay rule uses)
                props = ET.SubElement(f, f"{{{SB}}}Properties")
                for key, value in properties.items():
                    kv = ET.SubElement(props, f"{{{SB}}}KeyValueOfstringanyType")
                    ET.SubElement(kv, f"{{{SB}}}Key").text = key
                    typed = {f"{{{XSI}}}type": "d6p1:string", "xmlns:d6p1": "http://www.w3.org/2001/XMLSchema"}
                    ET.SubElement(kv, f"{{{SB}}}Value", typed).text = str(value)
        action = ET.SubElement(d, f"{{{SB}}}Action")
        action.set(f"{{{XSI}}}type", "EmptyRuleAction")
        ET.SubElement(d, f"{{{SB}}}CreatedAt").text = _now_iso()
        ET.SubElement(d, f"{{{SB}}}Name").text = rule.name
        return d

    def _entry_element(self, title: str, description: ET.Element) -> ET.Element:
        entry = ET.Element(f"{{{ATOM}}}entry")
        ET.SubElement(entry, f"{{{ATOM}}}id").text = f"https://{self.peer.namespace}/{title}"
        t = ET.SubElement(entry, f"{{{ATOM}}}title")
        t.set("type", "text")
        t.text = title
        ET.SubElement(entry, f"{{{ATOM}}}published").text = _now_iso()
        ET.SubElement(entry, f"{{{ATOM}}}updated").text = _now_iso()
        author = ET.SubElement(entry, f"{{{ATOM}}}author")
        ET.SubElement(author, f"{{{ATOM}}}name").text = "ecom-test-peer"
        content = ET.SubElement(entry, f"{{{ATOM}}}content")
        content.set("type", "application/xml")
        content.append(description)
        return entry

    def _entry(self, status: int, title: str, description: ET.Element) -> web.Response:
        xml = ET.tostring(self._entry_element(title, description), encoding="unicode")
        return web.Response(status=status, text=xml, content_type="application/atom+xml")

    def _feed(self, items: list[tuple[str, ET.Element]]) -> web.Response:
        feed = ET.Element(f"{{{ATOM}}}feed")
        t = ET.SubElement(feed, f"{{{ATOM}}}title")
        t.set("type", "text")
        t.text = "feed"
        ET.SubElement(feed, f"{{{ATOM}}}id").text = f"uuid:{uuid.uuid4()}"
        ET.SubElement(feed, f"{{{ATOM}}}updated").text = _now_iso()
        link = ET.SubElement(feed, f"{{{ATOM}}}link")
        link.set("rel", "self")
        link.set("href", f"https://{self.peer.namespace}/")
        for title, description in items:
            feed.append(self._entry_element(title, description))
        return web.Response(status=200, text=ET.tostring(feed, encoding="unicode"), content_type="application/atom+xml")

    def _empty_feed(self) -> web.Response:
        return self._feed([])

    @staticmethod
    def _error(status: int, detail: str) -> web.Response:
        error = ET.Element("Error")
        ET.SubElement(error, "Code").text = str(status)
        ET.SubElement(error, "Detail").text = detail
        return web.Response(status=status, text=ET.tostring(error, encoding="unicode"), content_type="application/xml")
