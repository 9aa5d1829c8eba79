"""Deciding a customer's new row and the ``customer_update`` that announces it. Pure."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.segmenter.profile import (
    LifecycleConfig,
    ProfileState,
    dump_state,
    facts,
    facts_to_json,
)
from services.segmenter.repository import CustomerRow
from services.segmenter.rules import CompiledRules
from shared.events import (
    CancellationEvent,
    ConsentState,
    CustomerUpdate,
    Event,
    ProfileSnapshot,
    PurchaseEvent,
    SupportEvent,
    TriggeringEvent,
    UpdateCause,
)

_NAMESPACE = uuid.UUID("0b8f3c4e-5d2a-4f71-9c3e-7a1d2b6e9f10")


def update_id(customer_id: str, cause: UpdateCause, key: str) -> str:
    """The same cause gives the same id, so a re-published update is dropped downstream."""
    return str(uuid.uuid5(_NAMESPACE, f"{customer_id}|{cause.value}|{key}"))


def triggering(event: Event) -> TriggeringEvent:
    fields: dict[str, Any] = {
        "event_id": event.event_id,
        "type": event.type,
        "occurred_at": event.occurred_at,
    }
    if isinstance(event, PurchaseEvent):
        fields |= {"order_id": event.order_id, "amount": event.amount, "currency": event.currency}
    elif isinstance(event, SupportEvent):
        fields |= {
            "ticket_id": event.ticket_id,
            "action": event.action,
            "category": event.category,
            "priority": event.priority,
            "is_complaint": event.is_complaint or event.category == "complaint",
        }
    elif isinstance(event, CancellationEvent):
        fields["reason"] = event.reason
    return TriggeringEvent(**fields)


def snapshot(state: ProfileState, f: dict[str, Any], tier: str, segments: Sequence[str]) -> ProfileSnapshot:
    clv = f.get("predicted_clv")
    return ProfileSnapshot(
        name=f.get("name"),
        email=f.get("email"),
        phone=f.get("phone"),
        whatsapp=f.get("whatsapp"),
        locale=f.get("locale"),
        timezone=f.get("timezone"),
        preferred_channel=f.get("preferred_channel"),
        consents={
            channel: ConsentState(granted=bool(reg.value), at=reg.stamp.at)
            for channel, reg in state.consents.items()
        },
        lifecycle_stage=f["lifecycle_stage"],
        churn_reason=f.get("churn_reason"),
        churned_at=f.get("churned_at"),
        tier=tier,
        segments=list(segments),
        orders_count=f["orders_count"],
        total_value=Decimal(str(f["total_value"])),
        reporting_currency="",  # filled by the caller, which knows the configuration
        last_purchase_at=f.get("last_purchase_at"),
        open_tickets=f["open_tickets"],
        last_complaint_resolved=f.get("last_complaint_resolved"),
        predicted_clv=None if clv is None else Decimal(str(clv)),
        p_alive=f.get("p_alive"),
        expected_purchases_90d=f.get("expected_purchases_90d"),
        attributes={k: r.value for k, r in state.attributes.items()},
    )


@dataclass(frozen=True, slots=True)
class Decision:
    row: CustomerRow
    update: CustomerUpdate | None
    entered: tuple[str, ...]
    left: tuple[str, ...]


def decide(
    state: ProfileState,
    old: CustomerRow | None,
    rules: CompiledRules,
    config: LifecycleConfig,
    now: datetime,
    cause: UpdateCause,
    cause_key: str,
    events: Sequence[Event] = (),
) -> Decision:
    """The customer's row after ``state``, and the update to publish (None when a time, rule
    or CLV change altered nothing a message could react to)."""
    f, boundaries = facts(state, now, config)
    assignment = rules.assign(f, now)
    next_check = min([*boundaries, *assignment.boundaries], default=None)
    old_segments = set(old.segments) if old else set()
    entered = tuple(s for s in assignment.segments if s not in old_segments)
    left = tuple(sorted(old_segments - set(assignment.segments)))
    row = CustomerRow(
        customer_id=state.customer_id,
        state=dump_state(state),
        facts=facts_to_json(f),
        tier=assignment.tier,
        segments=list(assignment.segments),
        lifecycle_stage=f["lifecycle_stage"],
        rule_version=rules.version,
        next_check_at=next_check,
        updated_at=now,
    )
    changed = (
        old is None
        or entered
        or left
        or old.tier != assignment.tier
        or old.lifecycle_stage != f["lifecycle_stage"]
    )
    if cause != UpdateCause.EVENTS and not changed:
        return Decision(row, None, entered, left)
    snap = snapshot(state, f, assignment.tier, assignment.segments).model_copy(
        update={"reporting_currency": config.reporting_currency}
    )
    occurred_at = max((e.occurred_at for e in events), default=now)
    update = CustomerUpdate(
        event_id=update_id(state.customer_id, cause, cause_key),
        customer_id=state.customer_id,
        occurred_at=occurred_at,
        cause=cause,
        triggering_events=[triggering(e) for e in sorted(events, key=lambda e: (e.occurred_at, e.event_id))],
        tier_old=old.tier if old else None,
        tier_new=assignment.tier,
        segments_entered=list(entered),
        segments_left=list(left),
        rule_version=rules.version,
        profile=snap,
    )
    return Decision(row, update, entered, left)
