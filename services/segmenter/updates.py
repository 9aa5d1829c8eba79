"""Deciding a customer's new row and the ``customer_update`` that announces it. Pure."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.segmenter.profile import (
    LifecycleConfig,
    ProfileState,
    apply_event,
    attribute_values_from_json,
    consent_states,
    consent_states_from_json,
    dump_state,
    facts,
    facts_from_json,
    facts_to_json,
)
from services.segmenter.repository import CustomerRow, Mover, Reassignment, Standing
from services.segmenter.rules import Assignment, CompiledRules, RuleChanges
from shared.events import (
    CancellationEvent,
    ClvPrediction,
    CustomerUpdate,
    Event,
    ProfileSnapshot,
    PurchaseEvent,
    SupportAction,
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
            "is_complaint": event.complaint,
        }
    elif isinstance(event, CancellationEvent):
        fields["reason"] = event.reason
    return TriggeringEvent(**fields)


def snapshot(
    consents: dict[str, dict[str, Any]],
    attributes: dict[str, Any],
    f: dict[str, Any],
    tier: str,
    segments: Sequence[str],
    reporting_currency: str,
) -> ProfileSnapshot:
    """What the messenger knows of the customer: ``f`` are the facts; the consents (each
    ``{"granted", "at"}``) and the attributes' values come from the state (``consent_states``
    of a ``ProfileState``, or ``consent_states_from_json`` and ``attribute_values_from_json``
    of the stored one)."""
    clv = f.get("predicted_clv")
    return ProfileSnapshot(
        name=f.get("name"),
        email=f.get("email"),
        phone=f.get("phone"),
        whatsapp=f.get("whatsapp"),
        locale=f.get("locale"),
        timezone=f.get("timezone"),
        preferred_channel=f.get("preferred_channel"),
        consents=consents,  # validated into ConsentState
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
        attributes=attributes,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    row: CustomerRow
    update: CustomerUpdate | None
    entered: tuple[str, ...]
    left: tuple[str, ...]


def news(before: ProfileState, events: Sequence[Event]) -> list[Event]:
    """The events of a batch that journeys may answer (an update's ``triggering_events``), given
    the customer's state ``before`` the batch: all of them but a second event of an order the
    customer already has (a correction or a refund, not a purchase to thank for) and a second
    'opened' of a ticket (a resend: not a second complaint to acknowledge). Of one new order or
    ticket in the batch, the first (occurred_at, then event id) is the news."""
    orders = set(before.orders)
    opened = {
        ticket_id
        for ticket_id, ticket in before.tickets.items()
        if any(step.action is SupportAction.OPENED for step in ticket.steps.values())
    }
    out: list[Event] = []
    for event in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
        if isinstance(event, PurchaseEvent):
            if event.order_id in orders:
                continue
            orders.add(event.order_id)
        elif isinstance(event, SupportEvent) and event.action is SupportAction.OPENED:
            if event.ticket_id in opened:
                continue
            opened.add(event.ticket_id)
        out.append(event)
    return out


# How far behind the row's instant an event may be and still be late rather than replayed
# (``as_of_events``). Longer than a backend's usual delay (a nightly export, a day's outage);
# shorter than a replayed history, and beyond what a journey acts on (72 h by default).
LATE_EVENT_WINDOW = timedelta(days=7)


def as_of_events(state: ProfileState, now: datetime, row_at: datetime | None = None) -> datetime:
    """The instant an update caused by events (backend ones or a CLV prediction) is evaluated
    as of: the customer's latest event, or now when that lies ahead (a clock ahead of ours).

    Not now: a history replayed months after it happened would be judged as if nothing had
    happened since, and a stage that time alone brings (at_risk after 60 days) would go out
    stamped with a months-old event, stale before any message about it could go. Judged as of
    the event, the row's next check lies in the past, and the sweep announces the change when
    it notices it, stamped then.

    The customer's latest event, not the batch's: the state holds every event applied so far,
    so the same events in any order or batching are judged as of the same instant.

    ``row_at``, the instant the stored row was judged at (``updated_at``), when a sweep or a
    publish has brought it past the customer's latest event: an event up to
    ``LATE_EVENT_WINDOW`` before it is late, and judged as of the row's instant. Judged as of
    itself, it would undo what time alone had brought (a lapse, a demotion) and announce the
    reverse, a tier upgrade to a customer being demoted, stamped recently enough for a journey
    to act on; the next sweep would then announce the demotion again. An event further behind
    is a replayed history, judged as of itself: had a sweep judged a customer as of now halfway
    through a replay, the rest of their history would otherwise be stamped as of then, and
    every tier upgrade in it would look new. A row so far ahead goes back to the event until
    the next sweep brings it forward again, with nothing a journey still acts on."""
    latest = state.last_event_at
    at = now if latest is None else min(latest, now)
    if row_at is not None and at < row_at <= min(now, at + LATE_EVENT_WINDOW):
        return row_at
    return at


def decide_events(
    state: ProfileState,
    old: CustomerRow | None,
    events: Sequence[Event | ClvPrediction],
    rules: CompiledRules,
    config: LifecycleConfig,
    now: datetime,
    cause_key: str,
) -> Decision:
    """The consumer's handler, for one customer: ``events`` (new, in the order delivered)
    applied to ``state`` (their state before them, changed in place), judged as of
    ``as_of_events``, announcing the ``news`` among them."""
    backend = [e for e in events if not isinstance(e, ClvPrediction)]
    announced = news(state, backend)  # judged against the state before them
    for event in events:
        apply_event(state, event)
    cause = UpdateCause.EVENTS if backend else UpdateCause.CLV
    # As of the customer's latest event, not now: what time alone changed since is the sweep's
    # to announce, stamped when it notices it. Never back before a sweep for an event merely late.
    as_of = as_of_events(state, now, old.updated_at if old else None)
    return decide(state, old, rules, config, as_of, cause, cause_key, announced)


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
    attributes = {k: r.value for k, r in state.attributes.items()}
    snap = snapshot(
        consent_states(state.consents),
        attributes,
        f,
        assignment.tier,
        assignment.segments,
        config.reporting_currency,
    )
    update = CustomerUpdate(
        event_id=update_id(state.customer_id, cause, cause_key),
        customer_id=state.customer_id,
        occurred_at=as_of,
        cause=cause,
        triggering_events=[triggering(e) for e in sorted(events, key=lambda e: (e.occurred_at, e.event_id))],
        tier_old=old.tier if old else None,
        tier_new=assignment.tier,
        tier_upgrade=old is not None and rules.upgrade(old.tier, assignment.tier),
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


def unchanged(standing: Standing, mover: Mover) -> bool:
    """Whether a mover, read and locked after their standing was, still holds what their new
    assignment was decided from: the tier, the segments and the facts the standing read (the
    other facts no changed rule reads, and the snapshot takes them from the mover)."""
    return (
        mover.tier == standing.tier
        and mover.segments == standing.segments
        and all(mover.facts.get(k) == v for k, v in standing.facts.items())
    )


def rule_change(
    old: Mover,
    assignment: Assignment,
    rules: CompiledRules,
    config: LifecycleConfig,
    now: datetime,
) -> RuleChange:
    """Announce ``rules``' ``assignment`` of a customer whose stored facts are current
    (``facts_current``), without deriving them again from the state: the stored consents and
    attributes lend the rest of the snapshot."""
    f = facts_from_json(old.facts)
    old_segments = set(old.segments)
    entered = tuple(s for s in assignment.segments if s not in old_segments)
    left = tuple(sorted(old_segments - set(assignment.segments)))
    snap = snapshot(
        consent_states_from_json(old.consents),
        attribute_values_from_json(old.attributes),
        f,
        assignment.tier,
        assignment.segments,
        config.reporting_currency,
    )
    update = CustomerUpdate(
        event_id=update_id(old.customer_id, UpdateCause.RULES, str(rules.version)),
        customer_id=old.customer_id,
        occurred_at=now,
        cause=UpdateCause.RULES,
        triggering_events=[],
        tier_old=old.tier,
        tier_new=assignment.tier,
        tier_upgrade=rules.upgrade(old.tier, assignment.tier),
        segments_entered=list(entered),
        segments_left=list(left),
        rule_version=rules.version,
        profile=snap,
    )
    next_check = next_check_under(rules, f, old.next_check_at, now)
    reassignment = Reassignment(
        customer_id=old.customer_id,
        tier=assignment.tier,
        segments=list(assignment.segments),
        rule_version=rules.version,
        next_check_at=next_check,
        updated_at=now,
        tier_changed=assignment.tier != old.tier,
        check_changed=next_check != old.next_check_at,
    )
    return RuleChange(reassignment, update, entered, left)


@dataclass(slots=True)
class Reevaluation:
    """A page of customers under a new rule set, evaluated once each."""

    # Customers whose tier or segments change, and their new assignment.
    moves: list[tuple[Standing, Assignment]] = field(default_factory=list)
    # Customers whose stored facts are out of date (the sweep is behind): derive them again.
    stale: list[str] = field(default_factory=list)
    # Customers who stay, but whom the new rules must look at again sooner.
    earlier_checks: list[tuple[str, datetime]] = field(default_factory=list)


def reevaluate(
    standings: Sequence[Standing],
    rules: CompiledRules,
    now: datetime,
    changes: Mapping[int, RuleChanges] | None = None,
) -> Reevaluation:
    """Who ``rules`` move, from the stored facts, which hold until the row's next check.

    ``changes``: by the version of older rules, what ``rules`` change of them
    (``CompiledRules.changes_from``); a customer those rules assigned is evaluated only
    under the changed rules, with the same outcome as evaluating them all. A standing holds
    the facts ``facts_read`` names for its version, or all of them. A customer ``rules``
    assigned themselves (a write since the publish) stays as they are."""
    out = Reevaluation()
    needed = rules.fields
    for standing in standings:
        if not facts_current(standing.next_check_at, now):
            out.stale.append(standing.customer_id)
            continue
        if standing.rule_version == rules.version:
            continue
        change = changes.get(standing.rule_version) if changes else None
        if change is None:
            f = facts_from_json(standing.facts, needed)
            assignment = rules.assign(f, now, boundaries=False)
        else:
            f = facts_from_json(standing.facts, change.fields)
            assignment = change.assign(f, standing.tier, standing.segments, now)
        if assignment.tier != standing.tier or set(assignment.segments) != set(standing.segments):
            out.moves.append((standing, assignment))
            continue
        check = next_check_under(change or rules, f, standing.next_check_at, now)
        if check is not None and check != standing.next_check_at:
            out.earlier_checks.append((standing.customer_id, check))
    return out


def facts_read(changes: Mapping[int, RuleChanges]) -> frozenset[str] | None:
    """The stored facts to read a page of standings with, given what the new rules change of
    each older version (``changes``): those the changed rules read, or all of them (None)
    when no older version has the new rules' tier ladder. Customers of a version that
    ``changes`` lacks are evaluated under every rule: read theirs whole (``read_whole``)."""
    if not changes:
        return None
    return frozenset().union(*(c.fields for c in changes.values()))


def read_whole(
    standings: Sequence[Standing], rules: CompiledRules, changes: Mapping[int, RuleChanges]
) -> list[str]:
    """The customers in ``standings`` (read with ``facts_read``) whose facts ``reevaluate``
    needs whole: those an older version with another tier ladder assigned."""
    return [
        s.customer_id for s in standings if s.rule_version != rules.version and s.rule_version not in changes
    ]
