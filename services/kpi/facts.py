"""What a batch of new events adds to the fact tables, as rows. Pure.

Within one batch two events can address the same row (two events of one order, two profile
updates of one customer); they are folded here with the same newest-wins rule the database
applies across batches, so that one INSERT … ON CONFLICT never touches a row twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.events import (
    CancellationEvent,
    Event,
    MessageEvent,
    ProfileEvent,
    PurchaseEvent,
    SupportEvent,
)


def stamp(at: datetime, event_id: str) -> str:
    """A register version that sorts like (occurred_at, event id) as text, on every backend."""
    return f"{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}|{event_id}"


@dataclass(slots=True)
class FactRows:
    purchases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    support: list[dict[str, Any]] = field(default_factory=list)
    cancellations: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ticket_ids(self) -> set[str]:
        return {r["ticket_id"] for r in self.support}

    @property
    def message_ids(self) -> set[str]:
        return {r["message_id"] for r in self.messages}

    def purchase_times(self) -> list[datetime]:
        return [r["occurred_at"] for r in self.purchases.values()]

    def cancellation_times(self) -> list[datetime]:
        return [r["occurred_at"] for r in self.cancellations]


REGISTER_COLUMNS = ("locale", "locale_at", "channel", "channel_at", "tier", "tier_at")


REGISTER_COLUMNS = ("locale", "locale_at", "channel", "channel_at", "tier", "tier_at")


def _set_register(
    rows: dict[str, dict[str, Any]], customer_id: str, name: str, value: str, version: str
) -> None:
    row = rows.setdefault(
        customer_id,
        {"customer_id": customer_id, **dict.fromkeys(REGISTER_COLUMNS)},
    )
    if row[f"{name}_at"] is None or version > row[f"{name}_at"]:
        row[name] = value
        row[f"{name}_at"] = version


def fold(events: Iterable[Event | MessageEvent]) -> FactRows:
    out = FactRows()
    for e in events:
        if isinstance(e, PurchaseEvent):
            key = (e.customer_id, e.order_id)
            current = out.purchases.get(key)
            if current is None or (e.occurred_at, e.event_id) > (current["occurred_at"], current["event_id"]):
                out.purchases[key] = {
                    "customer_id": e.customer_id,
                    "order_id": e.order_id,
                    "event_id": e.event_id,
                    "occurred_at": e.occurred_at,
                    "amount": e.amount,
                    "currency": e.currency,
                }
        elif isinstance(e, SupportEvent):
            out.support.append(
                {
                    "event_id": e.event_id,
                    "ticket_id": e.ticket_id,
                    "customer_id": e.customer_id,
                    "action": e.action.value,
                    "category": e.category,
                    "priority": e.priority,
                    "is_complaint": e.is_complaint,
                    "occurred_at": e.occurred_at,
                }
            )
        elif isinstance(e, CancellationEvent):
            out.cancellations.append(
                {
                    "event_id": e.event_id,
                    "customer_id": e.customer_id,
                    "occurred_at": e.occurred_at,
                    "reason": e.reason.value,
                    "subscription_id": e.subscription_id,
                }
            )
        elif isinstance(e, ProfileEvent):
            version = stamp(e.occurred_at, e.event_id)
            if e.locale is not None:
                _set_register(out.customers, e.customer_id, "locale", e.locale, version)
            if e.preferred_channel is not None:
                _set_register(out.customers, e.customer_id, "channel", e.preferred_channel.value, version)
        elif isinstance(e, MessageEvent):
            out.messages.append(
                {
                    "event_id": e.event_id,
                    "message_id": e.message_id,
                    "customer_id": e.customer_id,
                    "status": e.status.value,
                    "occurred_at": e.occurred_at,
                    "journey": e.journey,
                    "kind": e.kind.value,
                    "channel": None if e.channel is None else e.channel.value,
                    "tier": e.tier,
                    "locale": e.locale,
                    "holdout": e.holdout,
                }
            )
            if e.tier is not None:
                _set_register(out.customers, e.customer_id, "tier", e.tier, stamp(e.occurred_at, e.event_id))
    return out
