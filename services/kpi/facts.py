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

from services.kpi.csat import survey_score
from services.kpi.response_time import SupportStep, TicketKey
from shared.events import (
    CancellationEvent,
    Event,
    MessageEvent,
    MessageStatus,
    ProfileEvent,
    PurchaseEvent,
    SupportEvent,
)


def stamp(at: datetime, event_id: str) -> str:
    """A register version that sorts like (occurred_at, event id) as text, on every backend."""
    # isoformat is strftime('%Y-%m-%dT%H:%M:%S.%f') (four-digit years) at a fraction of the cost.
    return f"{at.astimezone(UTC).isoformat(timespec='microseconds')[:26]}|{event_id}"


@dataclass(slots=True)
class FactRows:
    purchases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    support: list[dict[str, Any]] = field(default_factory=list)
    cancellations: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    surveys: list[dict[str, Any]] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ticket_keys(self) -> set[TicketKey]:
        return {(r["customer_id"], r["ticket_id"]) for r in self.support}

    @property
    def message_ids(self) -> set[str]:
        return {r["message_id"] for r in self.messages}

    def support_steps(self) -> list[SupportStep]:
        return [
            SupportStep(
                r["event_id"],
                r["ticket_id"],
                r["customer_id"],
                r["occurred_at"],
                r["action"],
                r["category"],
                r["priority"],
                r["is_complaint"],
            )
            for r in self.support
        ]

    def cancellation_times(self) -> list[datetime]:
        return [r["occurred_at"] for r in self.cancellations]


REGISTER_COLUMNS = ("locale", "locale_at", "channel", "channel_at", "tier", "tier_at")

# A message's tier is the customer's at its decision (decided_at): every status of the message
# offers it as of then. Events from before decided_at existed have only their own time: of
# those, the statuses of the decision or the sending say the tier then; the later ones (delivered,
# a reply, a click, a survey answer days after) would put an older tier back over a newer one.
TIER_STATUSES = frozenset(
    {
        MessageStatus.QUEUED,
        MessageStatus.SENT,
        MessageStatus.HELD_QUIET_HOURS,
        MessageStatus.CAPPED,
        MessageStatus.NO_CONSENT,
        MessageStatus.SUPPRESSED,
        MessageStatus.NO_ADDRESS,
        MessageStatus.HOLDOUT,
        MessageStatus.DUPLICATE,
    }
)

# Per customer, per register: the winning (occurred_at, event id, value) of the batch. Aware
# datetimes compare as instants, so the tuple orders like the stamp, which is built only for
# the winners.
Registers = dict[str, dict[str, tuple[datetime, str, str]]]


def _offer(
    registers: Registers, customer_id: str, name: str, value: str, at: datetime, event_id: str
) -> None:
    mine = registers.get(customer_id)
    if mine is None:
        registers[customer_id] = {name: (at, event_id, value)}
        return
    current = mine.get(name)
    if current is None or (at, event_id) > (current[0], current[1]):
        mine[name] = (at, event_id, value)


def _register_rows(registers: Registers) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for customer_id, mine in registers.items():
        row: dict[str, Any] = {"customer_id": customer_id, **dict.fromkeys(REGISTER_COLUMNS)}
        for name, (at, event_id, value) in mine.items():
            row[name] = value
            row[f"{name}_at"] = stamp(at, event_id)
        rows[customer_id] = row
    return rows


def fold(events: Iterable[Event | MessageEvent]) -> FactRows:
    out = FactRows()
    registers: Registers = {}
    for e in events:
        if isinstance(e, PurchaseEvent):
            # An order keeps the date of its first event and takes the amount and currency of its
            # newest (amount_at, then event id): a correction months later changes what was paid,
            # not when, as in the segmenter (KpiRepository.upsert_purchases across batches).
            key = (e.customer_id, e.order_id)
            current = out.purchases.get(key)
            if current is None:
                out.purchases[key] = {
                    "customer_id": e.customer_id,
                    "order_id": e.order_id,
                    "event_id": e.event_id,
                    "occurred_at": e.occurred_at,
                    "amount_at": e.occurred_at,
                    "amount": e.amount,
                    "currency": e.currency,
                }
                continue
            current["occurred_at"] = min(current["occurred_at"], e.occurred_at)
            if (e.occurred_at, e.event_id) > (current["amount_at"], current["event_id"]):
                current.update(
                    event_id=e.event_id, amount_at=e.occurred_at, amount=e.amount, currency=e.currency
                )
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
            if e.locale is not None:
                _offer(registers, e.customer_id, "locale", e.locale, e.occurred_at, e.event_id)
            if e.preferred_channel is not None:
                channel = e.preferred_channel.value
                _offer(registers, e.customer_id, "channel", channel, e.occurred_at, e.event_id)
        elif isinstance(e, MessageEvent):
            if e.status is MessageStatus.UNSUBSCRIBED:
                # The messenger's record of an opt-out (message_id optout:<customer>, journey
                # "-"): about the customer, no message; counted it would be a journey "-".
                continue
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
                if e.decided_at is not None:
                    _offer(registers, e.customer_id, "tier", e.tier, e.decided_at, e.event_id)
                elif e.status in TIER_STATUSES:
                    _offer(registers, e.customer_id, "tier", e.tier, e.occurred_at, e.event_id)
            if e.details and e.status is MessageStatus.REPLIED:
                score = survey_score(e.details.get("survey_score"))
                if score is not None:
                    out.surveys.append(
                        {
                            "event_id": e.event_id,
                            "message_id": e.message_id,
                            "customer_id": e.customer_id,
                            "occurred_at": e.occurred_at,
                            "score": score,
                            "journey": e.journey,
                            "channel": None if e.channel is None else e.channel.value,
                            "tier": e.tier,
                            "locale": e.locale,
                        }
                    )
    out.customers = _register_rows(registers)
    return out
