"""Deciding a customer's new row and the ``customer_update`` that announces it. Pure."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.segmenter.profile import (
    LifecycleConfig,
    ProfileState,
    Register,
    dump_state,
    facts,
    facts_from_json,
    facts_to_json,
    registers_from_json,
)
from services.segmenter.repository import CustomerRow, Reassignment, Standing
from services.segmenter.rules import Assignment, CompiledRules, RuleChanges
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


def snapshot(
    consents: Mapping[str, Register],
    attributes: Mapping[str, Register],
    f: dict[str, Any],
    tier: str,
    segments: Sequence[str],
    reporting_currency: str,
) -> ProfileSnapshot:
    """What the messenger knows of the customer: ``f`` are the facts, the registers come from
    the state (``ProfileState`` or ``registers_from_json`` of the stored one)."""
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
            for channel, reg in consents.items()
        },
        lifecycle_stage=f["lifecycle_stage"],
        churn_reason=f.get("churn_reason"),
        churned_at=f.get("churned_at"),
        tier=tier,
        segments=list(segments),
        orders_count=f["orders_count"],
        total_value=Decimal(str(f["total_value"])),
        reporting_currency=reporting_currency,
        last_purchase_at=f.get("last_purchase_at"),
        open_tickets=f["open_tickets"],
        last_complaint_resolved=f.get("last_complaint_resolved"),
        predicted_clv=None if clv is None else Decimal(str(clv)),
        p_alive=f.get("p_alive"),
        expected_purchases_90d=f.get("expected_purchases_90d"),
        attributes={k: r.value for k, r in attributes.items()},
    )


@dataclass(frozen=True, slots=True)
class Decision:
    row: CustomerRow
    update: CustomerUpdate | None
    entered: tuple[str, ...]
    left: tuple[str, ...]


def as_of_events(state: ProfileState, now: datetime) -> datetime:
    """The instant an update caused by events (backend ones or a CLV prediction) is evaluated
    as of: the customer's latest event, or now when that lies ahead (a clock ahead of ours).

    Not now: a history replayed months after it happened would be judged as if nothing had
    happened since, and a stage that time alone brings (at_risk after 60 days) would go out
    stamped with a months-old event, stale before any message about it could go. Judged as of
    the event, the row's next check lies in the past, and the sweep announces the change when
    it notices it, stamped then.

    The customer's latest event, not the batch's: the state holds every event applied so far,
    so the same events in any order or batching are judged as of the same instant. Not the
    later of that and the row's last instant either: once a sweep had judged a customer as of
    now halfway through a replay, the rest of their history would be judged and stamped as of
    then, and every tier upgrade in it would look new. The price: a late event after a sweep
    takes the row back to its latest event, until the next sweep brings it forward again."""
    latest = state.last_event_at
    return now if latest is None else min(latest, now)


def decide(
    state: ProfileState,
    old: CustomerRow | None,
    rules: CompiledRules,
    config: LifecycleConfig,
    as_of: datetime,
    cause: UpdateCause,
    cause_key: str,
    events: Sequence[Event] = (),
) -> Decision:
    """The customer's row after ``state`` evaluated as of ``as_of``, and the update to publish
    (None when a time, rule or CLV change altered nothing a message could react to).

    ``as_of`` is now for the sweep and a rule publish, ``as_of_events`` for events. The update
    is stamped with it, and the row keeps it as ``updated_at``: the instant its facts hold at,
    and from which its next check is counted (a next check already past is the sweep's)."""
    f, boundaries = facts(state, as_of, config)
    assignment = rules.assign(f, as_of)
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
        updated_at=as_of,
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
    snap = snapshot(
        state.consents, state.attributes, f, assignment.tier, assignment.segments, config.reporting_currency
    )
    update = CustomerUpdate(
        event_id=update_id(state.customer_id, cause, cause_key),
        customer_id=state.customer_id,
        occurred_at=as_of,
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


def facts_current(row_next_check_at: datetime | None, now: datetime) -> bool:
    """Whether facts stored with a row still hold at ``now``: time alone changes them only at
    the boundaries ``facts`` reports, and the row's next check is never later than the first."""
    return row_next_check_at is None or row_next_check_at > now


@dataclass(frozen=True, slots=True)
class RuleChange:
    """A customer whose tier or segments another rule set changes, their facts unchanged."""

    reassignment: Reassignment
    update: CustomerUpdate
    entered: tuple[str, ...]
    left: tuple[str, ...]


def next_check_under(
    rules: CompiledRules | RuleChanges, f: dict[str, Any], previous: datetime | None, now: datetime
) -> datetime | None:
    """The next check of a customer whose facts are current, under ``rules``.

    The earliest of the stored next check and the rules' own boundaries: the stored one may
    be an old rule's boundary and come early, which costs one sweep that changes nothing,
    but it is never later than the facts' own next change (which this does not recompute)."""
    found = rules.time_boundaries(f, now)
    if previous is not None:
        return min(previous, found[0]) if found else previous
    return found[0] if found else None


def rule_change(
    old: CustomerRow,
    f: dict[str, Any],
    assignment: Assignment,
    rules: CompiledRules,
    config: LifecycleConfig,
    now: datetime,
) -> RuleChange:
    """Announce ``rules``' ``assignment`` of a customer whose stored facts ``f`` are current
    (``facts_current``), without deriving them again from the state: the stored state only
    lends the consents and attributes of the snapshot."""
    old_segments = set(old.segments)
    entered = tuple(s for s in assignment.segments if s not in old_segments)
    left = tuple(sorted(old_segments - set(assignment.segments)))
    consents, attributes = registers_from_json(old.state)
    snap = snapshot(consents, attributes, f, assignment.tier, assignment.segments, config.reporting_currency)
    update = CustomerUpdate(
        event_id=update_id(old.customer_id, UpdateCause.RULES, str(rules.version)),
        customer_id=old.customer_id,
        occurred_at=now,
        cause=UpdateCause.RULES,
        triggering_events=[],
        tier_old=old.tier,
        tier_new=assignment.tier,
        segments_entered=list(entered),
        segments_left=list(left),
        rule_version=rules.version,
        profile=snap,
    )
    reassignment = Reassignment(
        customer_id=old.customer_id,
        tier=assignment.tier,
        segments=list(assignment.segments),
        rule_version=rules.version,
        next_check_at=next_check_under(rules, f, old.next_check_at, now),
        updated_at=now,
    )
    return RuleChange(reassignment, update, entered, left)


@dataclass(slots=True)
class Reevaluation:
    """A page of customers under a new rule set, evaluated once each."""

    # Customers whose tier or segments change: their facts (parsed) and new assignment.
    moves: list[tuple[Standing, dict[str, Any], Assignment]] = field(default_factory=list)
    # Customers whose stored facts are out of date (the sweep is behind): derive them again.
    stale: list[str] = field(default_factory=list)
    # Customers who stay, but whom the new rules must look at again sooner.
    earlier_checks: list[tuple[str, datetime]] = field(default_factory=list)

    @property
    def to_read(self) -> list[str]:
        return [s.customer_id for s, _, _ in self.moves] + self.stale


def reevaluate(
    standings: Sequence[Standing],
    rules: CompiledRules,
    now: datetime,
    changes: Mapping[int, RuleChanges] | None = None,
) -> Reevaluation:
    """Who ``rules`` move, from the stored facts, which hold until the row's next check.

    ``changes``: by the version of older rules, what ``rules`` change of them
    (``CompiledRules.changes_from``); a customer those rules assigned is evaluated only
    under the changed rules, with the same outcome as evaluating them all."""
    out = Reevaluation()
    needed = rules.fields
    for standing in standings:
        if not facts_current(standing.next_check_at, now):
            out.stale.append(standing.customer_id)
            continue
        change = changes.get(standing.rule_version) if changes else None
        if change is None:
            f = facts_from_json(standing.facts, needed)
            assignment = rules.assign(f, now, boundaries=False)
        else:
            f = facts_from_json(standing.facts, change.fields)
            assignment = change.assign(f, standing.tier, standing.segments, now)
        if assignment.tier != standing.tier or set(assignment.segments) != set(standing.segments):
            out.moves.append((standing, facts_from_json(standing.facts), assignment))
            continue
        check = next_check_under(change or rules, f, standing.next_check_at, now)
        if check is not None and check != standing.next_check_at:
            out.earlier_checks.append((standing.customer_id, check))
    return out
