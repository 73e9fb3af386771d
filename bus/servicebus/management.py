"""Management: queues, the topic, subscriptions and their rules, made idempotently with the ATOM API."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable, Collection
from datetime import timedelta
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.management import CorrelationRuleFilter

log = logging.getLogger(__name__)

_RULE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,50}$")

# A replayed dead letter of a subscription goes to that subscription alone (bus.deadletters): it is
# published with subject REPLAY_SUBJECT, which no event-type rule matches, and the application property
# REPLAY_TO = <subscription>, which only that subscription's REPLAY_RULE matches.
REPLAY_RULE = "ecom-replay"
REPLAY_SUBJECT = "ecom-replay"
REPLAY_TO = "ecom-replay-to"


def _is_replay_rule(rule: Any, subscription: str) -> bool:
    rule_filter = rule.filter
    return (
        rule.name == REPLAY_RULE
        and isinstance(rule_filter, CorrelationRuleFilter)
        and not rule_filter.label
        and dict(rule_filter.properties or {}) == {REPLAY_TO: subscription}
    )


def rule_name(event_type: str) -> str:
    """The subscription rule for one event type: its own name when Service Bus allows it."""
    if _RULE_NAME.match(event_type) and not event_type.startswith("$"):
        return event_type
    return "t-" + hashlib.sha256(event_type.encode()).hexdigest()[:40]


def _label_only(rule_filter: Any) -> str | None:
    """The subject a rule matches when it is exactly one of ours (correlation filter on subject only)."""
    if not isinstance(rule_filter, CorrelationRuleFilter) or not rule_filter.label:
        return None
    others = ("correlation_id", "message_id", "to", "reply_to", "session_id", "reply_to_session_id", "content_type")
    if any(getattr(rule_filter, name, None) for name in others) or rule_filter.properties:
        return None
    return rule_filter.label


class _Provisioner:
    """Creates queues, the topic, subscriptions and rules with the ATOM management API, idempotently."""

    def __init__(
        self,
        admin: ServiceBusAdministrationClient,
        *,
        topic: str,
        max_delivery_count: int,
        lock_duration: timedelta,
        duplicate_window: timedelta | None,
    ) -> None:
        self.admin = admin
        self.topic = topic
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.duplicate_window = duplicate_window

    async def _create(self, what: str, create: Awaitable[Any]) -> bool:
        """True when created, False when it was already there."""
        try:
            await create
        except HttpResponseError as exc:
            if exc.status_code == 409:
                return False
            raise
        log.info("created %s", what)
        return True

    async def queue(self, name: str) -> bool:
        dedup = self.duplicate_window is not None
        return await self._create(
            f"queue {name}",
            self.admin.create_queue(
                name,
                requires_session=True,
                max_delivery_count=self.max_delivery_count,
                lock_duration=self.lock_duration,
                requires_duplicate_detection=dedup,
                duplicate_detection_history_time_window=self.duplicate_window if dedup else None,
                dead_lettering_on_message_expiration=True,
            ),
        )

    async def ensure_topic(self) -> bool:
        dedup = self.duplicate_window is not None
        return await self._create(
            f"topic {self.topic}",
            self.admin.create_topic(
                self.topic,
                requires_duplicate_detection=dedup,
                duplicate_detection_history_time_window=self.duplicate_window if dedup else None,
            ),
        )

    async def subscription(self, name: str, event_types: Collection[str]) -> list[str]:
        """Create the subscription if needed and make its rules exactly one per event type, plus the replay
        rule (REPLAY_RULE) that lets a replayed dead letter reach this subscription alone."""
        done: list[str] = []
        if await self._create(
            f"subscription {self.topic}/{name}",
            self.admin.create_subscription(
                self.topic,
                name,
                requires_session=True,
                max_delivery_count=self.max_delivery_count,
                lock_duration=self.lock_duration,
                dead_lettering_on_message_expiration=True,
                dead_lettering_on_filter_evaluation_exceptions=True,
            ),
        ):
            done.append(f"created subscription {self.topic}/{name}")
        wanted = {rule_name(t): t for t in sorted(event_types)}
        existing = [rule async for rule in self.admin.list_rules(self.topic, name)]
        satisfied: set[str] = set()
        stale: list[str] = []
        replay_rule = False
        for rule in existing:
            if _is_replay_rule(rule, name):
                replay_rule = True
                continue
            label = _label_only(rule.filter)
            if label is not None and label in event_types and label not in satisfied:
                satisfied.add(label)
            else:
                stale.append(rule.name)
        # A stale rule squatting on a name we need goes first; the other stale ones (the $Default rule
        # that matches everything, types no longer subscribed) only after ours exist, so there is no
        # moment without a rule in which events for this service would be dropped.
        for name_ in [n for n in stale if n in wanted]:
            await self._delete_rule(name, name_)
            done.append(f"deleted rule {name_}")
        for rule_name_, event_type in wanted.items():
            if event_type in satisfied:
                continue
            if await self._create(
                f"rule {self.topic}/{name}/{rule_name_}",
                self.admin.create_rule(self.topic, name, rule_name_, filter=CorrelationRuleFilter(label=event_type)),
            ):
                done.append(f"created rule {rule_name_} (subject = {event_type!r})")
        if not replay_rule:
            if REPLAY_RULE in stale:
                await self._delete_rule(name, REPLAY_RULE)
                stale.remove(REPLAY_RULE)
            if await self._create(
                f"rule {self.topic}/{name}/{REPLAY_RULE}",
                self.admin.create_rule(
                    self.topic, name, REPLAY_RULE, filter=CorrelationRuleFilter(properties={REPLAY_TO: name})
                ),
            ):
                done.append(f"created rule {REPLAY_RULE} ({REPLAY_TO} = {name!r}: replayed dead letters)")
        for name_ in [n for n in stale if n not in wanted]:
            await self._delete_rule(name, name_)
            done.append(f"deleted rule {name_}")
        return done

    async def broadcast_subscription(
        self, name: str, event_types: Collection[str], auto_delete_on_idle: timedelta
    ) -> None:
        """A new per-process subscription that gets exactly these event types and deletes itself once
        unused for ``auto_delete_on_idle`` (the process died without stop())."""
        await self.admin.create_subscription(
            self.topic,
            name,
            requires_session=True,
            max_delivery_count=self.max_delivery_count,
            lock_duration=self.lock_duration,
            auto_delete_on_idle=auto_delete_on_idle,
        )
        # Nobody receives from it yet, so the order is free: the $Default rule (everything) goes first,
        # and the handler never sees an event of another type.
        await self._delete_rule(name, "$Default")
        for event_type in sorted(event_types):
            await self.admin.create_rule(
                self.topic, name, rule_name(event_type), filter=CorrelationRuleFilter(label=event_type)
            )
        log.info("created broadcast subscription %s/%s for %s", self.topic, name, ", ".join(sorted(event_types)))

    async def delete_subscription(self, name: str) -> None:
        try:
            await self.admin.delete_subscription(self.topic, name)
        except ResourceNotFoundError:
            pass  # gone already (AutoDeleteOnIdle, or a half-made one)
        except HttpResponseError as exc:
            if exc.status_code != 404:
                raise

    async def _delete_rule(self, subscription: str, name: str) -> None:
        try:
            await self.admin.delete_rule(self.topic, subscription, name)
        except ResourceNotFoundError:
            pass  # someone else removed it first
        except HttpResponseError as exc:
            if exc.status_code != 404:
                raise
