"""A customer's profile as a set of facts, and what those facts say at a given moment. Pure.

The state is built so that applying the same set of events in any order, any number of
times, gives the same state: every field is a last-writer-wins register ordered by
(occurred_at, event_id), and everything countable is a set keyed by its own id (orders by
order id, ticket steps and cancellations by event id). Aggregates are never stored as running
totals; they are derived from the sets when asked, so a late event simply lands in its place.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from shared.events import (
    PROFILE_FIELDS,
    CancellationEvent,
    ClvPrediction,
    Event,
    LifecycleStage,
    ProfileEvent,
    PurchaseEvent,
    SupportAction,
    SupportEvent,
    canonical_locale,
    complaint_category,
    support_step_order,
    ticket_resolved,
)

CONTACT_FIELDS = tuple(f for f in PROFILE_FIELDS if f not in ("consents", "attributes"))
CHANNELS = ("email", "sms", "whatsapp")


@dataclass(frozen=True, slots=True)
class Stamp:
    """The version of a register: later occurred_at wins; the event id breaks ties."""

    at: datetime
    event_id: str

    def newer_than(self, other: Stamp | None) -> bool:
        return other is None or (self.at, self.event_id) > (other.at, other.event_id)


@dataclass(slots=True)
class Register:
    value: Any
    stamp: Stamp


# The observations of a consent's current value kept (see Consent): the first ones, which say
# since when it holds, and the newest.
CONSENT_RUN_KEPT = 64


@dataclass(slots=True)
class Consent:
    """A channel's consent: the newest profile event's value, and *since* when it holds it — the
    first observation of the final run of that value. A CRM repeating ``sms: true`` on every
    profile update does not move ``since``: a grant dated after a STOP means a new grant, not a
    repeat (the messenger lifts a STOP only for that).

    A function of the set of observations, whatever their order: ``boundary`` is the newest
    observation of the other value, ``run`` the observations of ``value`` after it (sorted).
    A late observation of the other value inside the run splits it. ``run`` keeps its first
    ``CONSENT_RUN_KEPT - 1`` and its newest; ``dropped_after`` is the last kept before the
    ones dropped. A late split among dropped ones dates ``since`` at the split itself: earlier
    than the truth, never later (a later one could lift a STOP the customer never undid)."""

    value: bool
    run: list[Stamp]
    boundary: Stamp | None = None
    dropped_after: Stamp | None = None

    @property
    def since(self) -> Stamp:
        return self.run[0]

    @property
    def newest(self) -> Stamp:
        return self.run[-1]

    def observe(self, value: bool, stamp: Stamp) -> None:
        if stamp in self.run or stamp == self.boundary:
            return
        if value == self.value:
            if self.boundary is None or stamp.newer_than(self.boundary):
                self.run = sorted([*self.run, stamp], key=lambda s: (s.at, s.event_id))
                if len(self.run) > CONSENT_RUN_KEPT:
                    if self.dropped_after is None:
                        self.dropped_after = self.run[CONSENT_RUN_KEPT - 2]
                    self.run = [*self.run[: CONSENT_RUN_KEPT - 1], self.run[-1]]
        elif stamp.newer_than(self.newest):  # the value changes
            self.value, self.boundary, self.run, self.dropped_after = value, self.newest, [stamp], None
        elif self.boundary is None or stamp.newer_than(self.boundary):  # a late change inside the run
            after = [s for s in self.run if s.newer_than(stamp)]
            if self.dropped_after is not None and stamp.newer_than(self.dropped_after):
                # The first observation after it may be one of those dropped: since is dated at
                # the split, a lower bound.
                after = [stamp, *after]
            self.boundary, self.run, self.dropped_after = stamp, after, None


@dataclass(frozen=True, slots=True)
class Order:
    at: datetime  # when it was placed (the earliest event of the order, UTC)
    local_day: date  # the calendar day where it was placed (the event's own offset)
    amount: Decimal  # amount and currency: from the newest event of the order
    currency: str
    stamp: Stamp


@dataclass(frozen=True, slots=True)
class TicketStep:
    at: datetime
    action: SupportAction
    event_id: str

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.at, self.event_id)

    def order(self) -> tuple[datetime, int, str]:
        return support_step_order(self.at, self.action, self.event_id)


@dataclass(slots=True)
class Ticket:
    category: Register
    priority: Register | None = None
    complaint: bool = False  # once any step says it is a complaint, it is one
    steps: dict[str, TicketStep] = field(default_factory=dict)

    def ordered_steps(self) -> list[TicketStep]:
        return sorted(self.steps.values(), key=TicketStep.order)

    def newer_than(self, step: TicketStep, register: Register | None) -> bool:
        """Whether the step says a newer category or priority than the register's, in the steps'
        order (the kpi's too): at one instant an agent's reply that corrects the category wins
        over the opening, whichever event id sorts first. The register's own step gives its
        action; a register whose step is unknown compares by its stamp alone."""
        if register is None:
            return True
        mine = self.steps.get(register.stamp.event_id)
        if mine is None:
            return step.stamp.newer_than(register.stamp)
        return step.order() > mine.order()


@dataclass(frozen=True, slots=True)
class Cancellation:
    at: datetime
    reason: str
    event_id: str


@dataclass(slots=True)
class ProfileState:
    customer_id: str
    fields: dict[str, Register] = field(default_factory=dict)
    consents: dict[str, Consent] = field(default_factory=dict)
    attributes: dict[str, Register] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    tickets: dict[str, Ticket] = field(default_factory=dict)
    cancellations: dict[str, Cancellation] = field(default_factory=dict)
    clv: Register | None = None
    first_seen_at: datetime | None = None
    # The newest occurred_at of any event applied, CLV predictions included: the instant an
    # event-driven update is evaluated as of (``updates.as_of_events``).
    last_event_at: datetime | None = None


# --- applying events --------------------------------------------------------------------------


def _set(registers: dict[str, Register], name: str, value: Any, stamp: Stamp) -> None:
    current = registers.get(name)
    if current is None or stamp.newer_than(current.stamp):
        registers[name] = Register(value, stamp)


def apply_event(state: ProfileState, event: Event | ClvPrediction) -> None:
    """Merge one event into the state. Commutative and idempotent, see the module docstring.

    Times are kept in UTC: the same instant written with two offsets must compare (and be
    stored) the same whatever order the events came in.
    """
    local = event.occurred_at
    event = event.model_copy(update={"occurred_at": local.astimezone(UTC)})
    stamp = Stamp(event.occurred_at, event.event_id)
    if state.last_event_at is None or event.occurred_at > state.last_event_at:
        state.last_event_at = event.occurred_at
    if isinstance(event, ClvPrediction):
        value = {
            "predicted_clv": str(event.predicted_clv),
            "p_alive": event.p_alive,
            "expected_purchases_90d": event.expected_purchases_90d,
            "currency": event.currency,
        }
        if state.clv is None or stamp.newer_than(state.clv.stamp):
            state.clv = Register(value, stamp)
        return
    if state.first_seen_at is None or event.occurred_at < state.first_seen_at:
        state.first_seen_at = event.occurred_at
    if isinstance(event, ProfileEvent):
        for name in CONTACT_FIELDS:
            value = getattr(event, name)
            if value is not None:
                _set(state.fields, name, str(value), stamp)
        if event.consents is not None:
            for channel in CHANNELS:
                granted = getattr(event.consents, channel)
                if granted is not None:
                    consent = state.consents.get(channel)
                    if consent is None:
                        state.consents[channel] = Consent(granted, [stamp])
                    else:
                        consent.observe(granted, stamp)
        for key, attr in (event.attributes or {}).items():
            _set(state.attributes, key, attr, stamp)
    elif isinstance(event, PurchaseEvent):
        existing = state.orders.get(event.order_id)
        # A second event for the same order id corrects its amount; it keeps its date (a
        # refund months later does not make the customer a recent buyer).
        placed = (event.occurred_at, local.date())
        if existing is not None and (existing.at, existing.local_day) < placed:
            placed = (existing.at, existing.local_day)
        if existing is None or stamp.newer_than(existing.stamp):
            state.orders[event.order_id] = Order(placed[0], placed[1], event.amount, event.currency, stamp)
        else:
            state.orders[event.order_id] = Order(
                placed[0], placed[1], existing.amount, existing.currency, existing.stamp
            )
    elif isinstance(event, SupportEvent):
        step = TicketStep(event.occurred_at, event.action, event.event_id)
        ticket = state.tickets.get(event.ticket_id)
        if ticket is None:
            ticket = state.tickets[event.ticket_id] = Ticket(category=Register(event.category, stamp))
        elif ticket.newer_than(step, ticket.category):
            ticket.category = Register(event.category, stamp)
        if event.priority is not None and ticket.newer_than(step, ticket.priority):
            ticket.priority = Register(event.priority, stamp)
        ticket.complaint = ticket.complaint or event.is_complaint
        ticket.steps[event.event_id] = step
    elif isinstance(event, CancellationEvent):
        state.cancellations[event.event_id] = Cancellation(event.occurred_at, event.reason, event.event_id)


def build(customer_id: str, events: Iterable[Event | ClvPrediction]) -> ProfileState:
    state = ProfileState(customer_id)
    for event in events:
        apply_event(state, event)
    return state


# --- what the facts say now -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    new_days: int = 30
    at_risk_after_days: int = 60
    lapsed_after_days: int = 180
    won_back_days: int = 90
    reporting_currency: str = "ILS"
    # Units of the reporting currency per unit of another; a currency missing here is still
    # totalled on its own, but left out of the reporting total (and listed as unconverted).
    fx_rates: tuple[tuple[str, Decimal], ...] = (
        ("USD", Decimal("3.65")),
        ("EUR", Decimal("3.95")),
        ("GBP", Decimal("4.60")),
        ("EGP", Decimal("0.075")),
    )

    def rate(self, currency: str) -> Decimal | None:
        if currency == self.reporting_currency:
            return Decimal(1)
        return dict(self.fx_rates).get(currency)


@dataclass(frozen=True, slots=True)
class TicketView:
    ticket_id: str
    category: str
    priority: str | None
    complaint: bool
    opened_at: datetime
    resolved: bool
    first_response_minutes: float | None


def _ticket_view(ticket_id: str, ticket: Ticket) -> TicketView:
    steps = ticket.ordered_steps()
    opened_at = next((s.at for s in steps if s.action == SupportAction.OPENED), steps[0].at)
    first_reply = next(
        (s.at for s in steps if s.action == SupportAction.AGENT_REPLIED and s.at >= opened_at), None
    )
    return TicketView(
        ticket_id=ticket_id,
        category=str(ticket.category.value),
        priority=None if ticket.priority is None else str(ticket.priority.value),
        complaint=ticket.complaint or complaint_category(str(ticket.category.value)),
        opened_at=opened_at,
        resolved=ticket_resolved(s.action for s in steps),
        first_response_minutes=None
        if first_reply is None
        else round((first_reply - opened_at).total_seconds() / 60, 2),
    )


def _days(n: int) -> timedelta:
    return timedelta(days=n)


def lifecycle(
    state: ProfileState, now: datetime, config: LifecycleConfig
) -> tuple[LifecycleStage, datetime | None]:
    """The stage and the next instant at which time alone would change it."""
    purchases = sorted(o.at for o in state.orders.values())
    last_cancel = max(state.cancellations.values(), key=lambda c: (c.at, c.event_id), default=None)
    last_purchase = purchases[-1] if purchases else None
    if last_cancel is not None and (last_purchase is None or last_purchase <= last_cancel.at):
        return "churned", None
    if last_purchase is None:
        return "new", None
    since_last = now - last_purchase
    # Recency first: a customer won back who then stops buying for 60 days is at risk again,
    # not 'won back' until the 90 days of the win-back are over.
    if since_last >= _days(config.lapsed_after_days):
        return "lapsed", None
    if since_last >= _days(config.at_risk_after_days):
        return "at_risk", last_purchase + _days(config.lapsed_after_days)
    at_risk_from = last_purchase + _days(config.at_risk_after_days)
    if last_cancel is not None:
        came_back = next(p for p in purchases if p > last_cancel.at)
        if now - came_back < _days(config.won_back_days):
            return "won_back", min(came_back + _days(config.won_back_days), at_risk_from)
    first = purchases[0]
    if now - first < _days(config.new_days):
        return "new", min(first + _days(config.new_days), at_risk_from)
    return "active", at_risk_from


WINDOWS = (30, 90, 365)
COMPLAINT_WINDOW_DAYS = 90


def facts(
    state: ProfileState, now: datetime, config: LifecycleConfig
) -> tuple[dict[str, Any], list[datetime]]:
    """The flat facts rules are written over, and the future instants at which the
    time-dependent ones (windowed counts, lifecycle stage) change without any new event."""
    boundaries: list[datetime] = []
    orders = list(state.orders.values())
    purchase_days = sorted({o.local_day for o in orders})
    per_currency: dict[str, Decimal] = {}
    for order in orders:
        per_currency[order.currency] = per_currency.get(order.currency, Decimal(0)) + order.amount
    total = Decimal(0)
    unconverted: list[str] = []
    for currency, amount in per_currency.items():
        rate = config.rate(currency)
        if rate is None:
            unconverted.append(currency)
        else:
            total += amount * rate
    converted_orders = sum(1 for o in orders if config.rate(o.currency) is not None)
    f: dict[str, Any] = {
        "orders_count": len(orders),
        "distinct_purchase_days": len(purchase_days),
        "first_purchase_at": min((o.at for o in orders), default=None),
        "last_purchase_at": max((o.at for o in orders), default=None),
        "total_value": float(round(total, 2)),
        "avg_order_value": float(round(total / converted_orders, 2)) if converted_orders else None,
        "total_by_currency": {c: str(v) for c, v in sorted(per_currency.items())},
        "unconverted_currencies": sorted(unconverted),
    }
    for window in WINDOWS:
        inside = [o.at for o in orders if now - _days(window) < o.at <= now]
        f[f"purchases_{window}d"] = len(inside)
        boundaries += [at + _days(window) for at in inside]
    # An order stamped ahead of our clock (a backend's clock a little fast; ingest takes events
    # up to a day ahead) enters the windows when its time comes: a check then, else the counts
    # missed it until some later boundary.
    boundaries += [o.at for o in orders if o.at > now]

    tickets = [_ticket_view(tid, t) for tid, t in state.tickets.items() if t.steps]
    complaints = sorted((t for t in tickets if t.complaint), key=lambda t: (t.opened_at, t.ticket_id))
    recent_complaints = [t for t in complaints if now - _days(COMPLAINT_WINDOW_DAYS) < t.opened_at <= now]
    boundaries += [t.opened_at + _days(COMPLAINT_WINDOW_DAYS) for t in recent_complaints]
    boundaries += [t.opened_at for t in complaints if t.opened_at > now]  # as the orders ahead
    responses = [t.first_response_minutes for t in tickets if t.first_response_minutes is not None]
    f |= {
        "open_tickets": sum(1 for t in tickets if not t.resolved),
        "complaints_90d": len(recent_complaints),
        "last_complaint_at": complaints[-1].opened_at if complaints else None,
        "last_complaint_resolved": complaints[-1].resolved if complaints else None,
        "last_ticket_at": max((t.opened_at for t in tickets), default=None),
        "median_first_response_minutes": statistics.median(responses) if responses else None,
    }

    stage, stage_changes = lifecycle(state, now, config)
    if stage_changes is not None:
        boundaries.append(stage_changes)
    last_cancel = max(state.cancellations.values(), key=lambda c: (c.at, c.event_id), default=None)
    f |= {
        "lifecycle_stage": stage,
        "churn_reason": last_cancel.reason if last_cancel else None,
        "churned_at": last_cancel.at if last_cancel else None,
        "first_seen_at": state.first_seen_at,
    }

    for name in CONTACT_FIELDS:
        register = state.fields.get(name)
        f[name] = None if register is None else register.value
    f["language"] = None
    _read_locale(f)
    for channel in CHANNELS:
        consent = state.consents.get(channel)
        f[f"consent_{channel}"] = None if consent is None else bool(consent.value)
    f["has_email"] = f.get("email") is not None
    f["has_phone"] = f.get("phone") is not None
    f["has_whatsapp"] = f.get("whatsapp") is not None

    clv = state.clv.value if state.clv else {}
    # In the reporting currency, as total_value and the rules' thresholds: the kpi's prediction
    # is in its own (RETAIN_KPI_REPORTING_CURRENCY); one without a rate here is unknown, not
    # compared as if it were in this one.
    clv_rate = config.rate(clv.get("currency") or config.reporting_currency)
    f["predicted_clv"] = (
        float(Decimal(clv["predicted_clv"]) * clv_rate)
        if "predicted_clv" in clv and clv_rate is not None
        else None
    )
    f["p_alive"] = clv.get("p_alive")
    f["expected_purchases_90d"] = clv.get("expected_purchases_90d")
    return f, sorted(b for b in boundaries if b > now)


# The catalogue rules may use: name → type, for the shared condition language.
FACT_TYPES: dict[str, str] = {
    "orders_count": "number",
    "distinct_purchase_days": "number",
    "first_purchase_at": "datetime",
    "last_purchase_at": "datetime",
    "total_value": "number",
    "avg_order_value": "number",
    "purchases_30d": "number",
    "purchases_90d": "number",
    "purchases_365d": "number",
    "open_tickets": "number",
    "complaints_90d": "number",
    "last_complaint_at": "datetime",
    "last_complaint_resolved": "bool",
    "last_ticket_at": "datetime",
    "median_first_response_minutes": "number",
    "lifecycle_stage": "string",
    "churn_reason": "string",
    "churned_at": "datetime",
    "first_seen_at": "datetime",
    "name": "string",
    "email": "string",
    "phone": "string",
    "whatsapp": "string",
    "locale": "string",
    "language": "string",
    "timezone": "string",
    "preferred_channel": "string",
    "consent_email": "bool",
    "consent_sms": "bool",
    "consent_whatsapp": "bool",
    "has_email": "bool",
    "has_phone": "bool",
    "has_whatsapp": "bool",
    "predicted_clv": "number",
    "p_alive": "number",
    "expected_purchases_90d": "number",
}
# Segment rules may also use the tier just assigned.
SEGMENT_FACT_TYPES: dict[str, str] = {**FACT_TYPES, "tier": "string"}


# --- storage form -----------------------------------------------------------------------------


def _stamp_out(s: Stamp) -> list[str]:
    return [s.at.isoformat(), s.event_id]


def _stamp_in(raw: list[str]) -> Stamp:
    return Stamp(datetime.fromisoformat(raw[0]), raw[1])


def _reg_out(r: Register) -> list[Any]:
    return [r.value, *_stamp_out(r.stamp)]


def _reg_in(raw: list[Any]) -> Register:
    return Register(raw[0], _stamp_in(raw[1:]))


def _consent_out(c: Consent) -> list[Any]:
    def out(s: Stamp | None) -> list[str] | None:
        return None if s is None else _stamp_out(s)

    extra = {
        "run": [_stamp_out(s) for s in c.run],
        "boundary": out(c.boundary),
        "dropped_after": out(c.dropped_after),
    }
    return [c.value, *_stamp_out(c.since), extra]


def _consent_in(raw: list[Any]) -> Consent:
    if len(raw) == 3:
        # Stored as a register, before since was kept: its newest stands for since, and the
        # older observations it forgot stay forgotten (a boundary just before it), so that a
        # redelivered old one does not move since back.
        newest = _stamp_in(raw[1:])
        return Consent(bool(raw[0]), [newest], Stamp(newest.at, ""))
    extra = raw[3]

    def stamp(s: list[str] | None) -> Stamp | None:
        return None if s is None else _stamp_in(s)

    run = [_stamp_in(s) for s in extra["run"]]
    return Consent(bool(raw[0]), run, stamp(extra["boundary"]), stamp(extra.get("dropped_after")))


def dump_state(state: ProfileState) -> dict[str, Any]:
    """The state as plain JSON types (stored in one column; read back by ``load_state``)."""
    return {
        "v": 1,
        "fields": {k: _reg_out(r) for k, r in state.fields.items()},
        # [value, since…, {run, boundary, dropped_after}]: readers of the stored JSON take [0]
        # and [1] (the value and since when), as from a register (``consent_states_from_json``).
        "consents": {k: _consent_out(c) for k, c in state.consents.items()},
        "attributes": {k: _reg_out(r) for k, r in state.attributes.items()},
        "orders": {
            k: [o.at.isoformat(), o.local_day.isoformat(), str(o.amount), o.currency, *_stamp_out(o.stamp)]
            for k, o in state.orders.items()
        },
        "tickets": {
            k: {
                "category": _reg_out(t.category),
                "priority": None if t.priority is None else _reg_out(t.priority),
                "complaint": t.complaint,
                "steps": {e: [s.at.isoformat(), s.action.value] for e, s in t.steps.items()},
            }
            for k, t in state.tickets.items()
        },
        "cancellations": {k: [c.at.isoformat(), c.reason] for k, c in state.cancellations.items()},
        "clv": None if state.clv is None else _reg_out(state.clv),
        "first_seen_at": None if state.first_seen_at is None else state.first_seen_at.isoformat(),
        "last_event_at": None if state.last_event_at is None else state.last_event_at.isoformat(),
    }


def load_state(customer_id: str, raw: dict[str, Any]) -> ProfileState:
    def when(s: str) -> datetime:
        return datetime.fromisoformat(s)

    state = ProfileState(
        customer_id=customer_id,
        fields={k: _reg_in(v) for k, v in raw["fields"].items()},
        consents={k: _consent_in(v) for k, v in raw["consents"].items()},
        attributes={k: _reg_in(v) for k, v in raw["attributes"].items()},
        orders={
            k: Order(when(v[0]), date.fromisoformat(v[1]), Decimal(v[2]), v[3], _stamp_in(v[4:]))
            for k, v in raw["orders"].items()
        },
        tickets={
            k: Ticket(
                category=_reg_in(t["category"]),
                priority=None if t["priority"] is None else _reg_in(t["priority"]),
                complaint=t["complaint"],
                steps={e: TicketStep(when(s[0]), SupportAction(s[1]), e) for e, s in t["steps"].items()},
            )
            for k, t in raw["tickets"].items()
        },
        cancellations={k: Cancellation(when(v[0]), v[1], k) for k, v in raw["cancellations"].items()},
        clv=None if raw["clv"] is None else _reg_in(raw["clv"]),
        first_seen_at=None if raw["first_seen_at"] is None else when(raw["first_seen_at"]),
    )
    if "last_event_at" not in raw:  # stored before the state kept it
        state.last_event_at = _latest_recorded(state)
    elif raw["last_event_at"] is not None:
        state.last_event_at = when(raw["last_event_at"])
    return state


def _latest_recorded(state: ProfileState) -> datetime | None:
    """The newest instant the state records. Every event leaves its occurred_at somewhere (a
    register it won, its order's stamp, its ticket step or its cancellation) except a profile
    event that set nothing (empty consents or attributes), which changed nothing either."""
    registers = [*state.fields.values(), *state.attributes.values()]
    instants = [
        *(r.stamp.at for r in registers),
        *(c.newest.at for c in state.consents.values()),
        *([] if state.clv is None else [state.clv.stamp.at]),
        *(o.stamp.at for o in state.orders.values()),
        *(step.at for t in state.tickets.values() for step in t.steps.values()),
        *(c.at for c in state.cancellations.values()),
    ]
    return max(instants, default=None)


def facts_to_json(f: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in f.items()}


_DATETIME_FACTS = frozenset(k for k, t in FACT_TYPES.items() if t == "datetime")


def facts_from_json(raw: dict[str, Any], only: Iterable[str] | None = None) -> dict[str, Any]:
    """Stored facts with their datetimes parsed again: all of them, or only those in ``only``
    (the facts some rule reads: re-evaluating everyone needs no more)."""
    out = dict(raw)
    for k in _DATETIME_FACTS if only is None else _DATETIME_FACTS.intersection(only):
        v = out.get(k)
        if isinstance(v, str):
            out[k] = datetime.fromisoformat(v)
    _read_locale(out)
    return out


def _read_locale(f: dict[str, Any]) -> None:
    """``locale`` in its conventional case, and ``language`` from it, when there is one. Events
    keep a locale so; a profile, or its facts, stored before they did has it as it was sent
    ("he-il"), and rules compare text."""
    locale = f.get("locale")
    if isinstance(locale, str):
        f["locale"] = locale = canonical_locale(locale)
        f["language"] = locale.split("-")[0]


def consent_states(consents: dict[str, Consent]) -> dict[str, dict[str, Any]]:
    """Each channel's consent as a ``ConsentState`` has it: granted or not, and since when."""
    return {k: {"granted": bool(c.value), "at": c.since.at} for k, c in consents.items()}


def consent_states_from_json(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``consent_states`` of a stored state's ``consents``, without loading the rest of it
    (``at`` stays in its ISO form; the snapshot's validation parses it)."""
    return {k: {"granted": bool(v[0]), "at": v[1]} for k, v in raw.items()}


def attribute_values_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    """The attributes' values of a stored state (its ``attributes``), without their stamps."""
    return {k: v[0] for k, v in raw.items()}
