"""Journeys: which customer_update starts which message. Pure.

A journey = a trigger (an event type among the update's triggering events, a segment entered
or left, a tier upgrade) + entry conditions (the segmenter's condition language over the
profile snapshot, shared code) + an optional wait (a delay, cancelled by exit conditions
such as "the customer bought") + the message (kind, channel preference, template) +
a re-entry policy + a holdout share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from services.messenger.templates import required_variables
from shared.conditions import (
    Condition,
    ConditionError,
    compile_condition,
    key_path,
    number_text,
    unknown_hint,
    validate,
)
from shared.events import (
    FACT_DOMAINS,
    FACT_FORMS,
    CancellationReason,
    Channel,
    CustomerUpdate,
    EventType,
    MessageKind,
    SupportAction,
    TriggeringEvent,
)

JourneyName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]

# What journeys' entry and exit conditions may look at: the profile snapshot, flattened.
SNAPSHOT_FIELDS: dict[str, str] = {
    "tier": "string",
    "segments": "string_list",
    "lifecycle_stage": "string",
    "churn_reason": "string",
    "churned_at": "datetime",
    "orders_count": "number",
    "total_value": "number",
    "last_purchase_at": "datetime",
    "open_tickets": "number",
    "last_complaint_resolved": "bool",
    "predicted_clv": "number",
    "p_alive": "number",
    "locale": "string",
    "preferred_channel": "string",
    "has_email": "bool",
    "has_phone": "bool",
    "has_whatsapp": "bool",
}


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: EventType | None = Field(default=None, description="A triggering event of this type.")
    support_action: SupportAction | None = Field(default=None, description="With event=support: this action.")
    complaint: bool | None = Field(default=None, description="With event=support: only complaints (or not).")
    first_purchase: bool = Field(default=False, description="With event=purchase: only the customer's first.")
    new_customer: bool = Field(default=False, description="The customer's first update (new profile).")
    segment_entered: str | None = None
    segment_left: str | None = None
    tier_upgrade: bool = Field(default=False, description="The tier moved up the ladder.")

    @property
    def event_alone(self) -> EventType | None:
        """The event type, when an event of it is all that fires this trigger."""
        others = self.new_customer or self.segment_entered or self.segment_left or self.tier_upgrade
        return None if others else self.event


class Wait(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hours: float = Field(ge=0, le=24 * 365, description="Decide the message this long after the trigger…")
    by_churn_reason_days: dict[str, float] | None = Field(
        default=None, description="…or, per churn reason, this many days (win-back cool-off)."
    )
    unless: dict[str, Any] | None = Field(
        default=None, description="…unless this condition holds by then (checked on every update)."
    )
    unless_event: EventType | None = Field(default=None, description="…unless such an event happens first.")


class Journey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: JourneyName
    description: str = ""
    enabled: bool = True
    kind: MessageKind = MessageKind.MARKETING
    trigger: Trigger
    entry: dict[str, Any] | None = Field(default=None, description="Condition over the profile snapshot.")
    exit: dict[str, Any] | None = Field(default=None, description="Cancels a waiting message when it holds.")
    wait: Wait | None = None
    channel: Channel | None = Field(default=None, description="Force a channel; default: the customer's.")
    template: str = Field(min_length=1, max_length=128)
    reentry: Literal["once", "every_time", "once_per_days"] = "every_time"
    reentry_days: float = Field(default=0, ge=0)
    holdout_percent: float = Field(default=0, ge=0, le=50)
    ttl_hours: float = Field(
        default=72, gt=0, description="A held or waiting message older than this expires."
    )
    max_attempts: int = Field(
        default=1, ge=1, le=10, description="Messages per customer per entry (win-back)."
    )
    attempt_spacing_days: float = Field(default=0, ge=0)
    escalate_if: dict[str, Any] | None = Field(
        default=None, description="complaint_ack: also publish an escalation when this holds."
    )
    offer_if: dict[str, Any] | None = Field(
        default=None, description="win_back: include the offer when this holds."
    )

    def exited(self, facts: dict[str, Any], now: datetime) -> bool:
        """Its exit condition holds: a waiting or held message of it goes no further."""
        return self.exit is not None and holds(self.exit, facts, now)


def snapshot_facts(update: CustomerUpdate) -> dict[str, Any]:
    p = update.profile
    return {
        "tier": p.tier,
        "segments": list(p.segments),
        "lifecycle_stage": p.lifecycle_stage,
        "churn_reason": p.churn_reason.value if p.churn_reason else None,
        "churned_at": p.churned_at,
        "orders_count": p.orders_count,
        "total_value": float(p.total_value),
        "last_purchase_at": p.last_purchase_at,
        "open_tickets": p.open_tickets,
        "last_complaint_resolved": p.last_complaint_resolved,
        "predicted_clv": None if p.predicted_clv is None else float(p.predicted_clv),
        "p_alive": p.p_alive,
        "locale": p.locale,
        "preferred_channel": p.preferred_channel.value if p.preferred_channel else None,
        "has_email": p.email is not None,
        "has_phone": p.phone is not None,
        "has_whatsapp": p.whatsapp is not None,
    }


def validate_journey(raw: object, templates: set[str] | None = None) -> list[ConditionError]:
    try:
        journey = Journey.model_validate(raw)
    except ValidationError as exc:
        return [
            ConditionError(
                "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]), e["msg"]
            )
            for e in exc.errors(include_url=False)
        ]
    errors: list[ConditionError] = []
    trees = {f"$.{name}": getattr(journey, name) for name in ("entry", "exit", "escalate_if", "offer_if")}
    trees["$.wait.unless"] = journey.wait.unless if journey.wait else None
    for path, tree in trees.items():
        if tree is not None:
            errors += validate(tree, SNAPSHOT_FIELDS, path=path, domains=FACT_DOMAINS, forms=FACT_FORMS)  # type: ignore[arg-type]
    trigger_problems = _trigger_problems(journey.trigger)
    errors += [ConditionError("$.trigger", message) for message in trigger_problems]
    errors += _duration_problems(journey)
    if journey.wait is not None:
        errors += _cool_off_problems(journey.wait)
    if templates is not None and journey.template not in templates:
        errors.append(ConditionError("$.template", f"unknown template {journey.template!r}"))
    if not trigger_problems:  # what a trigger gives is only judged of one that can fire
        errors += [ConditionError("$.template", m) for m in _unsupplied(journey)]
        errors += [ConditionError("$.kind", m) for m in _not_transactional(journey)]
    return errors


# The longest a transactional message may wait after the customer's action it answers.
TRANSACTIONAL_WAIT_HOURS = 24
CUSTOMER_ACTIONS = frozenset({EventType.PURCHASE, EventType.SUPPORT, EventType.CANCELLATION})


def _not_transactional(journey: Journey) -> list[str]:
    """A transactional message goes past caps, quiet hours and marketing opt-outs, which the law
    allows for an answer to the customer's own action (their order, their ticket), not for a
    campaign: a journey on a segment or a tier, or sent days later, is marketing, whatever it
    is called. Refused at write, so opt-outs cannot be switched off by naming a kind."""
    if journey.kind is not MessageKind.TRANSACTIONAL:
        return []
    problems: list[str] = []
    # A profile event is a CRM's sync as often as the customer's own doing: not an action of theirs.
    if journey.trigger.event_alone not in CUSTOMER_ACTIONS:
        problems.append(
            "a transactional journey answers the customer's own action: its trigger is an event "
            "purchase, support or cancellation, and nothing else; use kind 'marketing'"
        )
    w = journey.wait
    if w is not None and (w.by_churn_reason_days or w.hours > TRANSACTIONAL_WAIT_HOURS):
        problems.append(
            f"a transactional message goes within {TRANSACTIONAL_WAIT_HOURS} hours of the action it "
            "answers; one sent later is marketing: use kind 'marketing'"
        )
    return problems


# What a packaged template needs that only its trigger's event gives (the entry's details: a
# purchase's order, a ticket's id), by the event type that gives it.
SUPPLIED_BY = {"last_order": EventType.PURCHASE, "ticket_id": EventType.SUPPORT}


def _unsupplied(journey: Journey) -> list[str]:
    """A template that needs its trigger's data on a trigger without it: every message of the
    journey failed ("journey 'thank_you' needs last_order"), where the journey looked saved."""
    problems: list[str] = []
    for variable in sorted(required_variables(journey.template) & SUPPLIED_BY.keys()):
        event = SUPPLIED_BY[variable]
        if journey.trigger.event_alone is not event:
            problems.append(
                f"template {journey.template!r} needs {variable}, which only a trigger on event "
                f"{event.value!r} (and nothing else) gives: every message of this trigger would fail"
            )
    return problems


def _trigger_problems(t: Trigger) -> list[str]:
    """A trigger that can never fire: an enabled journey that silently sends nothing. Checked
    when a journey is written, not in the model, so a journey stored before still loads."""
    problems: list[str] = []
    if not (t.event or t.new_customer or t.segment_entered or t.segment_left or t.tier_upgrade):
        problems.append(
            "a trigger needs one of event, new_customer, segment_entered, segment_left or tier_upgrade"
        )
    if (t.support_action is not None or t.complaint is not None) and t.event != "support":
        problems.append("support_action and complaint apply only with event 'support'")
    if t.first_purchase and t.event != "purchase":
        problems.append("first_purchase applies only with event 'purchase'")
    return problems


# The journey's durations with no upper bound in the model (a journey stored before still
# loads), and the most each may be: longer is surely a unit slip, and an infinite or huge one
# (1e400 is infinity to a JSON reader) overflows a datetime, so that every update the journey
# matched would fail, to the dead-letter topic, instead of sending.
MAX_DURATIONS = {
    "ttl_hours": (24 * 365, "hours"),
    "reentry_days": (3650, "days"),
    "attempt_spacing_days": (365, "days"),
}


def _duration_problems(journey: Journey) -> list[ConditionError]:
    errors: list[ConditionError] = []
    for name, (most, unit) in MAX_DURATIONS.items():
        value = getattr(journey, name)
        if not value <= most:  # NaN too
            errors.append(ConditionError(f"$.{name}", f"{number_text(value)} {unit}: at most {most} {unit}"))
    return errors


# A win-back cool-off longer than this is surely a unit slip (hours written as days).
MAX_COOL_OFF_DAYS = 365


def _cool_off_problems(wait: Wait) -> list[ConditionError]:
    """A cool-off keyed by a churn reason no cancellation carries never applies: the customer
    gets the default wait, and nobody is told. Checked on write, like the trigger."""
    reasons = [r.value for r in CancellationReason]
    errors: list[ConditionError] = []
    for reason, days in (wait.by_churn_reason_days or {}).items():
        path = key_path("$.wait.by_churn_reason_days", reason)
        if reason not in reasons:
            hint = unknown_hint(reason, reasons, "churn reasons")
            errors.append(ConditionError(path, f"unknown churn reason {reason!r}{hint}"))
        elif not 0 <= days <= MAX_COOL_OFF_DAYS:
            errors.append(
                ConditionError(path, f"{number_text(days)} days: a cool-off is 0 to {MAX_COOL_OFF_DAYS} days")
            )
    return errors


_COMPILED: dict[int, tuple[dict[str, Any], Condition]] = {}


def holds(tree: dict[str, Any] | None, facts: dict[str, Any], now: datetime) -> bool:
    if tree is None:
        return True
    # Journeys are long-lived objects: compile each condition once (keyed by identity,
    # keeping the tree alive so the id cannot be reused).
    cached = _COMPILED.get(id(tree))
    if cached is None or cached[0] is not tree:
        compiled = compile_condition(tree, SNAPSHOT_FIELDS, forms=FACT_FORMS)  # type: ignore[arg-type]
        cached = _COMPILED[id(tree)] = (tree, compiled)
    return cached[1].evaluate(facts, now)


# The default rule set's ladder, lowest first: for updates from before the segmenter said
# whether a tier change was an upgrade (CustomerUpdate.tier_upgrade None).
TIER_ORDER = ("none", "bronze", "silver", "gold", "platinum")


@dataclass(frozen=True, slots=True)
class Entry:
    journey: Journey
    key: str  # what makes this entry unique: the triggering event id, or the change
    event_id: str | None
    at: datetime  # the trigger, or for a message that waited, the end of its wait (its TTL starts there)
    details: dict[str, Any]
    attempt: int = 1  # win-back: the n-th message of this entry (up to the journey's max_attempts)


def triggered(
    journey: Journey, update: CustomerUpdate, tier_order: tuple[str, ...] = TIER_ORDER
) -> list[Entry]:
    """The entries this update makes into the journey (before entry conditions)."""
    t = journey.trigger
    out: list[Entry] = []
    if t.event is not None:
        for e in update.triggering_events:
            if e.type != t.event:
                continue
            if t.support_action is not None and e.action != t.support_action:
                continue
            if t.complaint is not None and bool(e.is_complaint) != t.complaint:
                continue
            if t.first_purchase and update.profile.orders_count != 1:
                continue
            details = {k: v for k, v in e.model_dump(mode="json").items() if v is not None}
            out.append(Entry(journey, e.event_id, e.event_id, e.occurred_at, details))
    if t.new_customer and update.tier_old is None:
        out.append(Entry(journey, f"new:{update.customer_id}", None, update.occurred_at, {}))
    if t.segment_entered and t.segment_entered in update.segments_entered:
        out.append(
            Entry(journey, f"enter:{t.segment_entered}:{update.event_id}", None, update.occurred_at, {})
        )
    if t.segment_left and t.segment_left in update.segments_left:
        out.append(Entry(journey, f"left:{t.segment_left}:{update.event_id}", None, update.occurred_at, {}))
    if t.tier_upgrade and update.tier_old is not None:
        up = update.tier_upgrade
        if up is None:
            old = tier_order.index(update.tier_old) if update.tier_old in tier_order else -1
            new = tier_order.index(update.tier_new) if update.tier_new in tier_order else -1
            up = new > old >= 0
        if up:
            out.append(
                Entry(
                    journey,
                    f"tier:{update.tier_old}->{update.tier_new}:{update.event_id}",
                    None,
                    update.occurred_at,
                    {"tier_old": update.tier_old, "tier_new": update.tier_new},
                )
            )
    return out[:1] if t.event is None else out


def reentry_allowed(journey: Journey, last_entered_at: datetime | None, now: datetime) -> bool:
    if last_entered_at is None or journey.reentry == "every_time":
        return True
    if journey.reentry == "once":
        return False
    return now - last_entered_at >= timedelta(days=journey.reentry_days)


def wait_until(journey: Journey, trigger_at: datetime, churn_reason: str | None) -> datetime | None:
    if journey.wait is None:
        return None
    if journey.wait.by_churn_reason_days and churn_reason in journey.wait.by_churn_reason_days:
        return trigger_at + timedelta(days=journey.wait.by_churn_reason_days[churn_reason])
    return trigger_at + timedelta(hours=journey.wait.hours)


@dataclass(frozen=True, slots=True)
class Schedule:
    """What to do with an entry when its update arrives."""

    entry: Entry  # decide now: its ``at`` is when the message became due (its TTL starts there)
    wait_until: datetime | None = None  # not yet: store a wait until then (entry unchanged)
    ended: str | None = None  # its wait was over before the update arrived, and ended first


def schedule(
    journey: Journey,
    entry: Entry,
    facts: dict[str, Any],
    events: Sequence[TriggeringEvent],
    now: datetime,
) -> Schedule:
    """Whether an entry waits, is decided now, or already ended.

    A wait is measured from the trigger (the event's occurred_at), so an update that arrives
    after the wait is over (a replayed history, a consumer that was down for a day) is due at
    once. It is then decided as ``fire_waits`` would have decided it at the end of the wait:
    its exit and 'unless' conditions are checked first (``events`` are the update's triggering
    events: a purchase after the cancellation and before the end of the cool-off ends a
    win-back), and its TTL counts from the end of the wait, not from the trigger: a 14-day
    cool-off is longer than the week a win-back may be late, and a survey due yesterday is due.
    """
    wait = journey.wait
    due = wait_until(journey, entry.at, facts.get("churn_reason"))
    if wait is None or due is None:
        return Schedule(entry)
    if due > now:
        return Schedule(entry, wait_until=due)
    if journey.exited(facts, now):
        return Schedule(entry, ended="exit condition met")
    if wait.unless is not None and holds(wait.unless, facts, now):
        return Schedule(entry, ended="'unless' condition met")
    if wait.unless_event is not None and any(
        e.type == wait.unless_event and entry.at <= e.occurred_at <= due and e.event_id != entry.event_id
        for e in events
    ):
        return Schedule(entry, ended=f"a {wait.unless_event.value} happened first")
    return Schedule(replace(entry, at=due))


def message_key(customer_id: str, entry: Entry) -> str:
    """The ledger's idempotency key: one message per journey, customer, entry and attempt (the
    first attempt keeps the plain key, so ledgers written before attempts existed still match)."""
    key = f"{entry.journey.name}:{customer_id}:{entry.key}"
    return key if entry.attempt == 1 else f"{key}#{entry.attempt}"


def next_attempt_at(journey: Journey, attempt: int, decided_for: datetime) -> datetime | None:
    """When the attempt after ``attempt`` is due, spaced from the moment the previous one was
    to go (``decided_for``); None once the journey's max_attempts are used up."""
    if attempt >= journey.max_attempts:
        return None
    return decided_for + timedelta(days=journey.attempt_spacing_days)


def default_journeys() -> list[Journey]:
    text = resources.files("services.messenger").joinpath("default_journeys.json").read_text(encoding="utf-8")
    return [Journey.model_validate(j) for j in json.loads(text)]
