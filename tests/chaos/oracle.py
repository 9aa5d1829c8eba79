"""What the pipeline should hold after the stream, computed in one process by the services' own
pure functions, and the comparison with what it does hold. No I/O here: the caller reads the
topics, the databases and the provider call log, and hands in plain values."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.kpi.facts import fold
from services.messenger.caps import DEFAULT_CAPS, CapCandidate, CapsConfig, SentRecord, check_caps
from services.messenger.quiet import QuietHours, customer_zone, is_quiet
from services.segmenter.profile import LifecycleConfig, ProfileState, apply_event, dump_state
from services.segmenter.repository import CustomerRow
from services.segmenter.rules import CompiledRules
from services.segmenter.updates import decide
from shared.events import (
    Channel,
    ClvPrediction,
    CustomerUpdate,
    Event,
    MessageEvent,
    MessageKind,
    ProfileEvent,
    UpdateCause,
)


@dataclass
class Comparison:
    """One kind of thing compared: how many, and what was missing, extra or different."""

    name: str
    compared: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.compared} compared, {len(self.missing)} missing, "
            f"{len(self.extra)} extra, {len(self.different)} different"
        )

    def examples(self, n: int = 5) -> list[str]:
        return [
            *(f"missing {x}" for x in self.missing[:n]),
            *(f"extra {x}" for x in self.extra[:n]),
            *(f"different {x}" for x in self.different[:n]),
        ]


def _canonical(value: Any) -> Any:
    """The same value whatever the round trip (JSON column, Numeric column, time zone)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, str | int | float | bool):
        return value.value  # an enum
    return value


def _json(value: Any) -> Any:
    return json.loads(json.dumps(_canonical(value), sort_keys=True))


# --- the segmenter ----------------------------------------------------------------------------


def profiles(events: Iterable[Event | ClvPrediction]) -> dict[str, ProfileState]:
    """Every customer's state from the whole stream, applied in stream order."""
    states: dict[str, ProfileState] = {}
    for event in events:
        state = states.get(event.customer_id)
        if state is None:
            state = states[event.customer_id] = ProfileState(event.customer_id)
        apply_event(state, event)
    return states


def compare_segmenter(
    expected: Mapping[str, ProfileState],
    rows: Mapping[str, CustomerRow],
    rules: CompiledRules,
    config: LifecycleConfig,
    settled_at: datetime | None = None,
) -> tuple[Comparison, Comparison, Comparison]:
    """Profiles (the stored state); the tier, segments and lifecycle stage derived from them,
    which the oracle derives again as of the instant the row was evaluated (``updated_at``);
    and that instant itself.

    Events are judged as of the customer's latest event (capped at now, and none of the
    stream's lies ahead), the sweep and a publish as of now: so no row is judged as of a moment
    before the customer's latest event. Once the pipeline has settled (``settled_at``), the
    sweep has made every change time alone brought until then, so no row's next check is due."""
    states = Comparison("segmenter profiles")
    tiers = Comparison("segmenter tiers, segments and lifecycle stages")
    instants = Comparison("segmenter evaluation instants and next checks")
    states.missing = sorted(set(expected) - set(rows))
    states.extra = sorted(set(rows) - set(expected))
    for customer_id in sorted(set(expected) & set(rows)):
        row, state = rows[customer_id], expected[customer_id]
        states.compared += 1
        if _json(row.state) != _json(dump_state(state)):
            states.different.append(customer_id)
        derived = decide(state, None, rules, config, row.updated_at, UpdateCause.EVENTS, "oracle").row
        tiers.compared += 1
        got = (row.tier, sorted(row.segments), row.lifecycle_stage)
        want = (derived.tier, sorted(derived.segments), derived.lifecycle_stage)
        if got != want:
            tiers.different.append(f"{customer_id}: stored {got}, oracle {want}")
        instants.compared += 1
        latest = state.last_event_at
        if latest is not None and row.updated_at < latest:
            instants.different.append(
                f"{customer_id}: judged as of {row.updated_at}, before its event at {latest}"
            )
        if settled_at is not None and row.next_check_at is not None and row.next_check_at <= settled_at:
            instants.different.append(
                f"{customer_id}: next check {row.next_check_at} still due when settled at {settled_at}"
            )
    return states, tiers, instants


# --- the kpi service --------------------------------------------------------------------------


def compare_kpi(
    events: Iterable[Event | MessageEvent], tables: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[Comparison]:
    """The fact tables (the KPIs' and CLV's inputs) against ``fold`` over the whole stream.

    ``tables``: rows of purchases, support_events, cancellations, message_events, customers."""
    rows = fold(events)
    wanted: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]] = {
        "purchases": (("customer_id", "order_id"), list(rows.purchases.values())),
        "support_events": (("event_id",), rows.support),
        "cancellations": (("event_id",), rows.cancellations),
        "message_events": (("event_id",), rows.messages),
        "customers": (("customer_id",), list(rows.customers.values())),
    }
    out: list[Comparison] = []
    for table, (key, want_rows) in wanted.items():
        c = Comparison(f"kpi {table}")
        want = {tuple(str(r[k]) for k in key): r for r in want_rows}
        got = {tuple(str(r[k]) for k in key): r for r in tables[table]}
        c.missing = ["/".join(k) for k in sorted(set(want) - set(got))]
        c.extra = ["/".join(k) for k in sorted(set(got) - set(want))]
        for k in sorted(set(want) & set(got)):
            c.compared += 1
            w = _canonical(dict(want[k]))
            g = _canonical({name: got[k][name] for name in want[k]})
            if w != g:
                diff = sorted(name for name in w if w[name] != g[name])
                c.different.append(f"{'/'.join(k)} ({', '.join(diff)})")
        out.append(c)
    return out


def compare_ledger(name: str, expected_ids: Iterable[str], applied_ids: Iterable[str]) -> Comparison:
    """A service's applied-events ledger against the event ids on the topics it consumes."""
    want, got = set(expected_ids), set(applied_ids)
    c = Comparison(name, compared=len(want))
    c.missing = sorted(want - got)
    c.extra = sorted(got - want)
    return c


# --- what was sent -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One line of the provider call log."""

    message_id: str
    channel: Channel
    called_at: datetime


@dataclass(frozen=True, slots=True)
class Ledger:
    """One row of the messenger's messages table (the fields the checks read)."""

    message_id: str
    customer_id: str
    journey: str
    kind: MessageKind
    channel: Channel | None
    status: str
    trigger_event_id: str | None
    created_at: datetime  # when the messenger decided it


@dataclass
class Delivery:
    messages: int = 0  # rows in the ledger
    sent: int = 0  # rows the ledger says were sent
    calls: int = 0  # successful provider calls
    duplicated: list[str] = field(default_factory=list)  # message ids handed over more than once
    unlogged: list[str] = field(default_factory=list)  # 'sent' in the ledger, no call, no file
    unrecorded: list[str] = field(default_factory=list)  # handed over, not 'sent' in the ledger
    outbox_files: int = 0
    cap_violations: list[str] = field(default_factory=list)
    consent_violations: list[str] = field(default_factory=list)
    quiet_violations: list[str] = field(default_factory=list)
    consent_checked: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.duplicated
            or self.unlogged
            or self.unrecorded
            or self.cap_violations
            or self.consent_violations
            or self.quiet_violations
        )


def _consent_as_of(events: Sequence[Event], channel: Channel, until: tuple[datetime, str]) -> bool | None:
    """The profile consent for ``channel`` after every profile event up to ``until`` (newest
    (occurred_at, event id) wins, as in the segmenter); None when no event said anything."""
    best: tuple[tuple[datetime, str], bool] | None = None
    for e in events:
        if not isinstance(e, ProfileEvent) or e.consents is None:
            continue
        given: bool | None = getattr(e.consents, channel.value)
        stamp = (e.occurred_at, e.event_id)
        if given is not None and stamp <= until and (best is None or stamp > best[0]):
            best = (stamp, given)
    return None if best is None else best[1]


def check_delivery(
    ledger: Sequence[Ledger],
    calls: Sequence[Call],
    outbox_ids: Iterable[str],
    backend: Sequence[Event],
    updates: Mapping[str, CustomerUpdate],  # by the id of each backend event it carried
    states: Mapping[str, ProfileState],
    caps: CapsConfig = DEFAULT_CAPS,
    quiet: QuietHours | None = None,
    decided_order: Mapping[str, int] | None = None,
) -> Delivery:
    """Each message handed to a provider once; no cap exceeded; nothing sent without consent or
    in quiet hours.

    Caps are judged in the order the messenger decided the messages, each at the time it was
    handed to the provider: a cap holds back a marketing candidate by what was decided before
    it. Judged in the order of the calls instead, a complaint's acknowledgement decided after a
    welcome and sent a moment before it (two sends of one pass) made the welcome look over the
    daily cap, which counts transactional sends too. The messages one batch decides share their
    ``created_at``; ``decided_order`` (message id → offset of its first event on
    retain.messages, where a customer's events keep the order they were decided in) orders
    those, where the message id alone could put a tier upgrade after the acknowledgement the
    same batch decided after it.

    Consent is judged by the oracle, not by the messenger's copy: a marketing message is a
    violation when the stream's consent for its channel, as of the last event the triggering
    update carried, was not granted (each customer's events reach the segmenter in order, so
    that is exactly what the messenger was told)."""
    quiet = quiet or QuietHours()
    out = Delivery(messages=len(ledger), calls=len(calls))
    rows = {m.message_id: m for m in ledger}
    per_message = Counter(c.message_id for c in calls)
    out.duplicated = sorted(m for m, n in per_message.items() if n > 1)
    files = set(outbox_ids)
    out.outbox_files = len(files)
    sent = {m.message_id for m in ledger if m.status in ("sent", "delivered", "read", "clicked")}
    out.sent = len(sent)
    out.unlogged = sorted(m for m in sent if m not in per_message and m not in files)
    out.unrecorded = sorted(m for m in (set(per_message) | files) if m not in sent)
    first_call: dict[str, Call] = {}
    for c in sorted(calls, key=lambda c: c.called_at):
        first_call.setdefault(c.message_id, c)
    by_customer: dict[str, list[Event]] = defaultdict(list)
    for e in backend:
        by_customer[e.customer_id].append(e)
    history: dict[str, list[SentRecord]] = defaultdict(list)
    decided = [(rows[c.message_id], c) for c in first_call.values() if c.message_id in rows]
    order = decided_order or {}

    def decision(rc: tuple[Ledger, Call]) -> tuple[datetime, int, str]:
        return rc[0].created_at, order.get(rc[0].message_id, -1), rc[0].message_id

    for row, call in sorted(decided, key=decision):
        if row.channel is None:
            continue
        state = states.get(row.customer_id)
        fields = state.fields if state is not None else {}
        tz_reg, locale_reg = fields.get("timezone"), fields.get("locale")
        locale = None if locale_reg is None else locale_reg.value
        tz = customer_zone(None if tz_reg is None else tz_reg.value, locale)
        candidate = CapCandidate(row.channel, row.journey, row.kind)
        verdict = check_caps(caps.caps, history[row.customer_id], candidate, tz, call.called_at)
        if not verdict.allowed:
            out.cap_violations.append(f"{row.message_id}: {verdict.reason}")
        history[row.customer_id].append(SentRecord(call.called_at, row.channel, row.journey, row.kind))
        if row.kind is not MessageKind.MARKETING:
            continue
        if is_quiet(call.called_at, tz, locale, quiet):
            local = call.called_at.astimezone(tz)
            out.quiet_violations.append(f"{row.message_id}: sent {local:%a %H:%M} {tz.key}")
        update = updates.get(row.trigger_event_id or "")
        if update is None or not update.triggering_events:
            # Triggered by time or a rule change: no stream position to judge consent at.
            continue
        last = max((t.occurred_at, t.event_id) for t in update.triggering_events)
        out.consent_checked += 1
        if _consent_as_of(by_customer[row.customer_id], row.channel, last) is not True:
            out.consent_violations.append(f"{row.message_id}: {row.channel.value} not granted")
    return out
