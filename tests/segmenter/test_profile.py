"""The profile state: order-insensitive and idempotent merging, and the facts it says at a moment."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kpi.response_time import SupportStep, ticket_from_steps
from services.segmenter.profile import (
    CONSENT_RUN_KEPT,
    Consent,
    LifecycleConfig,
    ProfileState,
    Stamp,
    _ticket_view,
    apply_event,
    build,
    consent_states,
    dump_state,
    facts,
    facts_from_json,
    facts_to_json,
    lifecycle,
    load_state,
)
from services.segmenter.rules import ALWAYS_SET
from services.segmenter.updates import triggering
from shared.conditions import Range
from shared.demo.generator import generate
from shared.events import EVENT_ADAPTER, FACT_DOMAINS, ClvPrediction, Event
from tests.segmenter.factories import (
    CUSTOMER,
    NOW,
    cancellation,
    clv,
    profile,
    purchase,
    support,
)

CONFIG = LifecycleConfig()
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
TICK = timedelta(microseconds=1)
AnyEvent = Event | ClvPrediction


def observed(state: ProfileState, now: datetime = NOW) -> tuple[dict[str, Any], Any, list[datetime]]:
    """Everything order-insensitivity must keep equal: the stored state, the facts (as values
    and as stored JSON) and the boundaries."""
    f, boundaries = facts(state, now, CONFIG)
    return dump_state(state), facts_to_json(f), boundaries


def in_chunks(customer_id: str, stream: Sequence[AnyEvent], cuts: Sequence[int]) -> ProfileState:
    """What the consumer does: per batch, load the stored state, skip ids already applied,
    apply the rest, store the state again (as JSON)."""
    stored: dict[str, Any] | None = None
    seen: set[str] = set()
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        state = ProfileState(customer_id) if stored is None else load_state(customer_id, stored)
        for event in stream[start:end]:
            if event.event_id not in seen:
                seen.add(event.event_id)
                apply_event(state, event)
        stored = json.loads(json.dumps(dump_state(state)))
    return ProfileState(customer_id) if stored is None else load_state(customer_id, stored)


# --- strategies ---------------------------------------------------------------------------------

# A few instants, so that ties (equal occurred_at) are common, each written with one of a few
# offsets, so that the same instant also arrives spelled differently.
INSTANTS = [NOW - timedelta(days=d, hours=h) for d in (400, 200, 95, 89, 61, 30, 29, 3, 0) for h in (0, 5)]
OFFSETS = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=3)), timezone(timedelta(hours=-5))]
when = st.builds(lambda at, tz: at.astimezone(tz), st.sampled_from(INSTANTS), st.sampled_from(OFFSETS))

maybe_bool = st.one_of(st.none(), st.booleans())
profiles = st.builds(
    lambda at, name, email, locale, channel, consents: (
        lambda eid: profile(
            eid,
            at,
            consents=consents,
            name=name,
            email=email,
            locale=locale,
            preferred_channel=channel,
            # A profile event must say something.
            timezone=None if any((name, email, locale, channel, consents)) else "Asia/Jerusalem",
        )
    ),
    when,
    st.sampled_from([None, "Noa", "Dana"]),
    st.sampled_from([None, "a@example.com", "b@example.com"]),
    st.sampled_from([None, "he-IL", "ar", "en-US"]),
    st.sampled_from([None, "email", "sms", "whatsapp"]),
    st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {}, optional={"email": st.booleans(), "sms": st.booleans(), "whatsapp": st.booleans()}
        ),
    ),
)
purchases = st.builds(
    lambda at, order, amount, currency: lambda eid: purchase(eid, at, order, amount, currency),
    when,
    st.sampled_from(["o1", "o2", "o3", "o4"]),  # few order ids: the same order arrives twice
    st.sampled_from(["0", "10.50", "99.90", "1200"]),
    st.sampled_from(["ILS", "USD", "JPY"]),
)
support_steps = st.builds(
    lambda at, ticket, action, category, complaint, priority: (
        lambda eid: support(eid, at, ticket, action, category, complaint=complaint, priority=priority)
    ),
    when,
    st.sampled_from(["T1", "T2", "T3"]),
    st.sampled_from(["opened", "agent_replied", "customer_replied", "resolved", "reopened"]),
    st.sampled_from(["delivery", "complaint", "billing"]),
    st.booleans(),
    st.sampled_from([None, "low", "high"]),
)
cancellations = st.builds(
    lambda at, reason: lambda eid: cancellation(eid, at, reason),
    when,
    st.sampled_from(["price", "service", "both", "other"]),
)
predictions = st.builds(
    lambda at, value, p: lambda eid: clv(eid, at, value, p),
    when,
    st.sampled_from(["0", "150.5", "2500"]),
    st.sampled_from([0.1, 0.9]),
)


@st.composite
def histories(draw: st.DrawFn) -> list[AnyEvent]:
    makers = draw(
        st.lists(
            st.one_of(profiles, purchases, support_steps, cancellations, predictions), min_size=1, max_size=30
        )
    )
    # Ids are not in time order, so "ties broken by event id" is exercised in both directions.
    ids = draw(st.permutations([f"e{i:02d}" for i in range(len(makers))]))
    return [make(eid) for make, eid in zip(makers, ids, strict=True)]


@st.composite
def redeliveries(draw: st.DrawFn, events: list[AnyEvent]) -> list[AnyEvent]:
    """The same set of events in any order, some of them any number of times."""
    copies = draw(st.lists(st.sampled_from(events), max_size=len(events) * 2))
    return draw(st.permutations([*events, *copies]))


# --- order-insensitivity -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(events=histories(), data=st.data())
def test_any_permutation_and_duplication_gives_the_same_profile(
    events: list[AnyEvent], data: st.DataObject
) -> None:
    expected = observed(build(CUSTOMER, events))
    stream = data.draw(redeliveries(events))
    assert observed(build(CUSTOMER, stream)) == expected


@settings(max_examples=200, deadline=None)
@given(events=histories(), data=st.data())
def test_batches_with_a_ledger_of_applied_ids_give_the_same_profile(
    events: list[AnyEvent], data: st.DataObject
) -> None:
    expected = observed(build(CUSTOMER, events))
    stream = data.draw(redeliveries(events))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    assert observed(in_chunks(CUSTOMER, stream, cuts)) == expected


@settings(max_examples=200, deadline=None)
@given(events=histories())
def test_stored_form_round_trips(events: list[AnyEvent]) -> None:
    state = build(CUSTOMER, events)
    stored = json.loads(json.dumps(dump_state(state)))  # as it travels through the JSON column
    again = load_state(CUSTOMER, stored)
    assert dump_state(again) == dump_state(state)
    assert facts(again, NOW, CONFIG) == facts(state, NOW, CONFIG)


@settings(max_examples=200, deadline=None)
@given(events=histories())
def test_a_state_stored_before_it_kept_its_latest_event_finds_it_again(events: list[AnyEvent]) -> None:
    state = build(CUSTOMER, events)
    assert state.last_event_at == max(e.occurred_at for e in events)
    stored = json.loads(json.dumps(dump_state(state)))
    del stored["last_event_at"]
    assert load_state(CUSTOMER, stored).last_event_at == state.last_event_at


@cache
def demo_history() -> tuple[datetime, dict[str, list[AnyEvent]]]:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    per_customer: dict[str, list[AnyEvent]] = defaultdict(list)
    for raw in generate(seed=13, customers=8, start=start, days=420):
        event = EVENT_ADAPTER.validate_python(raw)
        per_customer[event.customer_id].append(event)
    end = start + timedelta(days=420)
    for n, customer_id in enumerate(sorted(per_customer)):
        per_customer[customer_id] += [
            clv(f"clv-{customer_id}-1", end - 30 * DAY, "100", customer_id=customer_id),
            clv(f"clv-{customer_id}-2", end - 2 * DAY, str(500 * n), 0.5, customer_id=customer_id),
        ]
    return end, dict(per_customer)


def test_a_locale_stored_as_it_was_sent_is_read_in_its_conventional_case() -> None:
    # Profiles stored before events kept a locale's case: rules compare text (locale eq "he-IL").
    old = profile("p-old", NOW - DAY, locale="he-IL").model_copy(update={"locale": "HE-il"})
    state = ProfileState(CUSTOMER)
    apply_event(state, old)
    f, _ = facts(state, NOW, CONFIG)
    assert (f["locale"], f["language"]) == ("he-IL", "he")
    # Facts stored then, as a rules publish re-reads them without deriving them again.
    stored = {**facts_to_json(f), "locale": "HE-il", "language": "HE"}
    assert {k: facts_from_json(stored)[k] for k in ("locale", "language")} == {
        "locale": "he-IL",
        "language": "he",
    }


def test_the_demo_history_has_every_kind_of_event() -> None:
    _, per_customer = demo_history()
    kinds = {e.type for events in per_customer.values() for e in events}
    assert kinds == {"profile", "purchase", "support", "cancellation", "clv"}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_demo_customers_in_any_order_and_any_batching(data: st.DataObject) -> None:
    end, per_customer = demo_history()
    for customer_id, events in per_customer.items():
        expected = observed(build(customer_id, events), end)
        stream = data.draw(redeliveries(events))
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=5))
        assert observed(build(customer_id, stream), end) == expected, customer_id
        assert observed(in_chunks(customer_id, stream, cuts), end) == expected, customer_id


def test_the_same_instant_in_two_offsets_is_stored_the_same_whichever_comes_first() -> None:
    # 09:00+02:00 and 07:00Z are one instant (the demo's desk writes Z, the shop local time);
    # which of the two events is applied first must not show in the stored state or facts.
    local = purchase("p-local", datetime(2026, 5, 1, 9, tzinfo=timezone(timedelta(hours=2))), "o1")
    utc = purchase("p-utc", datetime(2026, 5, 1, 7, tzinfo=UTC), "o2")
    forwards = build(CUSTOMER, [local, utc])
    backwards = build(CUSTOMER, [utc, local])
    assert dump_state(forwards)["first_seen_at"] == dump_state(backwards)["first_seen_at"]
    assert observed(forwards) == observed(backwards)


# --- facts, computed by hand ---------------------------------------------------------------------


def scenario() -> list[AnyEvent]:
    minute = timedelta(minutes=1)
    return [
        # Purchases: windows are (now - N days, now], so a purchase exactly N days old is out.
        purchase("b-1", NOW - 365 * DAY, "o1", "100.00"),
        purchase("b-2", NOW - 365 * DAY + timedelta(seconds=1), "o2", "200.00"),
        purchase("b-3", NOW - 90 * DAY, "o3", "10.00", "USD"),
        purchase("b-4a", NOW - 40 * DAY, "o4", "50.00", "EUR"),
        purchase("b-4b", NOW - 40 * DAY, "o4", "60.00", "EUR"),  # the same order again: one order
        purchase("b-5", NOW - 10 * DAY, "o5", "300.00"),
        purchase("b-6", NOW - 10 * DAY + 2 * 60 * minute, "o6", "400.00"),  # the same day as o5
        purchase("b-7", NOW - 5 * DAY, "o7", "1000", "JPY"),  # no rate: totalled on its own
        # T1: a complaint, answered in 30 minutes, resolved, reopened, answered again, resolved.
        support("t1-1", NOW - 20 * DAY, "T1", "opened", complaint=True, priority="high"),
        support("t1-2", NOW - 20 * DAY + 30 * minute, "T1", "agent_replied"),
        support("t1-3", NOW - 20 * DAY + 40 * minute, "T1", "customer_replied"),
        support("t1-4", NOW - 19 * DAY, "T1", "resolved"),
        support("t1-5", NOW - 18 * DAY, "T1", "reopened"),
        support("t1-6", NOW - 18 * DAY + 10 * minute, "T1", "agent_replied"),
        support("t1-7", NOW - 17 * DAY, "T1", "resolved"),
        # T2: open; the customer wrote before the agent did (that is not a first response).
        support("t2-1", NOW - 3 * DAY, "T2", "opened", "billing"),
        support("t2-2", NOW - 3 * DAY + 5 * minute, "T2", "customer_replied", "billing"),
        support("t2-3", NOW - 3 * DAY + 90 * minute, "T2", "agent_replied", "billing"),
        # T3: a complaint by its category, older than 90 days.
        support("t3-1", NOW - 100 * DAY, "T3", "opened", "complaint"),
        support("t3-2", NOW - 100 * DAY + 120 * minute, "T3", "agent_replied", "complaint"),
        support("t3-3", NOW - 99 * DAY, "T3", "resolved", "complaint"),
        # T4: open, not answered yet.
        support("t4-1", NOW - 2 * DAY, "T4", "opened"),
        # Contact fields: last writer by occurred_at wins, per field; equal times: larger id.
        profile("p-b", NOW - 50 * DAY, {"email": True, "sms": False}, name="Noa", email="a@example.com"),
        profile("p-c", NOW - 30 * DAY, {"email": False}, email="b@example.com", timezone="Asia/Jerusalem"),
        profile("p-z", NOW - 30 * DAY, locale="he-IL", email="z@example.com"),
        profile(
            "p-x",  # stale: older than everything it says, applied last in the list
            NOW - 60 * DAY,
            {"email": True, "whatsapp": True},
            name="Old",
            email="old@example.com",
            timezone="Africa/Cairo",
            preferred_channel="sms",
        ),
        clv("clv-2", NOW - DAY, "2400.50", 0.7),
        clv("clv-1", NOW - 8 * DAY, "900", 0.2),
    ]


def test_facts_of_a_small_history_computed_by_hand() -> None:
    f, boundaries = facts(build(CUSTOMER, scenario()), NOW, CONFIG)

    assert f["orders_count"] == 7
    assert f["distinct_purchase_days"] == 5
    assert f["first_purchase_at"] == NOW - 365 * DAY
    assert f["last_purchase_at"] == NOW - 5 * DAY
    assert f["total_by_currency"] == {"EUR": "60.00", "ILS": "1000.00", "JPY": "1000", "USD": "10.00"}
    assert f["unconverted_currencies"] == ["JPY"]
    assert f["total_value"] == 1273.5  # 1000 + 10 x 3.65 + 60 x 3.95
    assert f["avg_order_value"] == 212.25  # over the six converted orders
    assert (f["purchases_30d"], f["purchases_90d"], f["purchases_365d"]) == (3, 4, 6)

    assert f["open_tickets"] == 2
    assert f["complaints_90d"] == 1
    assert f["last_complaint_at"] == NOW - 20 * DAY
    assert f["last_complaint_resolved"] is True
    assert f["last_ticket_at"] == NOW - 2 * DAY
    assert f["median_first_response_minutes"] == 90  # of 30 (T1), 90 (T2), 120 (T3)

    assert f["lifecycle_stage"] == "active"
    assert f["churn_reason"] is None
    assert f["churned_at"] is None
    assert f["first_seen_at"] == NOW - 365 * DAY

    assert f["name"] == "Noa"
    assert f["email"] == "z@example.com"
    assert f["locale"] == "he-IL"
    assert f["language"] == "he"
    assert f["timezone"] == "Asia/Jerusalem"
    assert f["preferred_channel"] == "sms"  # only the stale event said it: nothing newer did
    assert (f["consent_email"], f["consent_sms"], f["consent_whatsapp"]) == (False, False, True)
    assert (f["has_email"], f["has_phone"], f["has_whatsapp"]) == (True, False, False)

    assert f["predicted_clv"] == 2400.5
    assert f["p_alive"] == 0.7

    assert boundaries == sorted(boundaries)
    assert all(b > NOW for b in boundaries)
    assert boundaries[0] == NOW + timedelta(seconds=1)  # o2 leaves the 365-day window
    assert boundaries[1] == NOW + 20 * DAY  # o5 leaves the 30-day window
    assert NOW + 55 * DAY in boundaries  # 60 days after the last purchase: at_risk
    assert NOW + 70 * DAY in boundaries  # T1 leaves the 90-day complaint window


def test_a_customer_won_back_who_stops_buying_is_at_risk_after_60_days_not_90() -> None:
    """Recency first: 'won back' lasts 90 days from the return only while they keep buying."""
    start = NOW - 200 * DAY
    state = build(
        CUSTOMER,
        [
            purchase("p1", start, "o1"),
            cancellation("x1", start + 10 * DAY),
            purchase("p2", start + 20 * DAY, "o2"),
        ],
    )
    assert lifecycle(state, start + 50 * DAY, CONFIG) == ("won_back", start + 80 * DAY)
    assert lifecycle(state, start + 80 * DAY, CONFIG) == ("at_risk", start + 200 * DAY)
    assert lifecycle(state, start + 200 * DAY, CONFIG) == ("lapsed", None)


def test_windows_flip_exactly_at_their_boundaries() -> None:
    state = build(CUSTOMER, scenario())
    before, _ = facts(state, NOW + 20 * DAY - TICK, CONFIG)
    at, _ = facts(state, NOW + 20 * DAY, CONFIG)
    assert (before["purchases_30d"], at["purchases_30d"]) == (3, 2)  # o5 is out, o6 two hours later
    assert facts(state, NOW + 20 * DAY + timedelta(hours=2), CONFIG)[0]["purchases_30d"] == 1
    complaint_gone, _ = facts(state, NOW + 70 * DAY, CONFIG)
    assert complaint_gone["complaints_90d"] == 0
    assert facts(state, NOW + 70 * DAY - TICK, CONFIG)[0]["complaints_90d"] == 1


def test_an_event_stamped_ahead_of_the_clock_is_counted_when_its_time_comes() -> None:
    """A backend whose clock runs a little fast stamps an order and a complaint seconds ahead of
    ours: judged now they are not in the windows yet, and the facts name their instants as
    boundaries, so that the customer is judged again then (they were missed until some later
    boundary: a one-order customer's purchases_30d stayed 0 for good)."""
    ahead = NOW + timedelta(seconds=2)
    events: list[Event] = [
        purchase("p1", ahead, "o1"),
        support("t-1", ahead + TICK, "T", "opened", complaint=True),
    ]
    state = build(CUSTOMER, events)
    now, boundaries = facts(state, NOW, CONFIG)
    assert (now["orders_count"], now["purchases_30d"], now["complaints_90d"]) == (1, 0, 0)
    assert min(boundaries) == ahead
    assert ahead + TICK in boundaries
    then, _ = facts(state, ahead + TICK, CONFIG)
    assert (then["purchases_30d"], then["purchases_365d"], then["complaints_90d"]) == (1, 1, 1)


def test_a_complaint_category_is_read_in_any_case() -> None:
    """A help desk writing "Complaint": a complaint for the facts and for the messenger's
    acknowledgement (the triggering event says so), as "complaint" is."""
    opened = support("k-1", NOW - DAY, "K", "opened", "Complaint")
    f, _ = facts(build(CUSTOMER, [opened]), NOW, CONFIG)
    assert (f["complaints_90d"], f["last_complaint_at"]) == (1, NOW - DAY)
    assert triggering(opened).is_complaint is True


def test_the_latest_complaint_decides_resolved_and_a_reopened_ticket_is_open() -> None:
    events = [
        support("a-1", NOW - 5 * DAY, "A", "opened", complaint=True),
        support("a-2", NOW - 4 * DAY, "A", "resolved"),
        support("b-1", NOW - 3 * DAY, "B", "opened", "complaint"),
        support("b-2", NOW - 2 * DAY, "B", "resolved", "complaint"),
        support("b-3", NOW - DAY, "B", "reopened", "complaint"),
    ]
    f, _ = facts(build(CUSTOMER, events), NOW, CONFIG)
    assert f["last_complaint_resolved"] is False
    assert f["open_tickets"] == 1
    assert f["complaints_90d"] == 2
    assert f["median_first_response_minutes"] is None


def test_a_reply_after_the_resolution_does_not_reopen_the_ticket() -> None:
    """The customer's thanks, or an agent's follow-up, after 'resolved': still resolved, as the
    kpi counts it (shared.events.ticket_resolved); only 'reopened' reopens. It was open for good,
    which blocked the win-back and kept the customer in an unresolved-complaint segment."""
    for late in ("customer_replied", "agent_replied"):
        events = [
            support("c-1", NOW - 3 * DAY, "C", "opened", complaint=True),
            support("c-2", NOW - 3 * DAY + HOUR, "C", "agent_replied"),
            support("c-3", NOW - 2 * DAY, "C", "resolved"),
            support("c-4", NOW - DAY, "C", late),
        ]
        f, _ = facts(build(CUSTOMER, events), NOW, CONFIG)
        assert (f["open_tickets"], f["last_complaint_resolved"]) == (0, True), late


def test_an_unknown_customer_has_empty_facts() -> None:
    f, boundaries = facts(ProfileState(CUSTOMER), NOW, CONFIG)
    assert f["orders_count"] == 0
    assert f["total_value"] == 0
    assert f["avg_order_value"] is None
    assert f["lifecycle_stage"] == "new"
    assert f["last_complaint_resolved"] is None
    assert f["predicted_clv"] is None
    assert boundaries == []


# --- last writer wins ---------------------------------------------------------------------------


def test_a_stale_profile_event_never_overwrites_a_newer_one() -> None:
    newer = profile("p-1", NOW - DAY, {"sms": True}, email="new@example.com")
    stale = profile("p-2", NOW - 9 * DAY, {"sms": False, "email": True}, email="old@example.com", name="Dana")
    for order in ([newer, stale], [stale, newer]):
        f, _ = facts(build(CUSTOMER, order), NOW, CONFIG)
        assert f["email"] == "new@example.com"
        assert f["consent_sms"] is True
        assert f["consent_email"] is True  # the newer event did not say: the older value stands
        assert f["name"] == "Dana"


def test_equal_times_are_broken_by_the_larger_event_id() -> None:
    a = profile("evt-a", NOW - DAY, {"email": False}, email="a@example.com")
    b = profile("evt-b", NOW - DAY, {"email": True}, email="b@example.com")
    for order in ([a, b], [b, a]):
        f, _ = facts(build(CUSTOMER, order), NOW, CONFIG)
        assert (f["email"], f["consent_email"]) == ("b@example.com", True)
        state = build(CUSTOMER, order)
        assert state.consents["email"].newest.event_id == "evt-b"


def test_at_one_instant_a_ticket_says_the_category_of_its_later_action() -> None:
    """An agent's reply at the instant of the opening that corrects the category wins, as the
    desk records the two (opening first), whichever event id sorts first: the kpi reads it so."""
    opened = support("z-open", NOW - DAY, "T", "opened", "delivery", priority="low")
    replied = support("a-reply", NOW - DAY, "T", "agent_replied", "complaint", priority="high")
    for order in ([opened, replied], [replied, opened]):
        ticket = build(CUSTOMER, order).tickets["T"]
        assert ticket.category.value == "complaint"
        assert ticket.priority is not None
        assert ticket.priority.value == "high"
        f, _ = facts(build(CUSTOMER, order), NOW, CONFIG)
        assert f["complaints_90d"] == 1


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(support_steps, min_size=1, max_size=12), data=st.data())
def test_a_ticket_has_the_category_and_priority_the_kpi_gives_it(
    steps: list[Any], data: st.DataObject
) -> None:
    """The segmenter's rules and the kpi's response-time breakdowns read one ticket the same
    way: its newest step in the one order of steps (shared.events.support_step_order)."""
    ids = data.draw(st.permutations([f"e{i:02d}" for i in range(len(steps))]))
    events = [make(eid) for make, eid in zip(steps, ids, strict=True)]
    state = build(CUSTOMER, data.draw(st.permutations(events)))
    for ticket_id, ticket in state.tickets.items():
        mine = [e for e in events if e.ticket_id == ticket_id]
        kpi = ticket_from_steps(SupportStep.of(e) for e in mine)
        assert ticket.category.value == kpi.category
        assert (None if ticket.priority is None else ticket.priority.value) == kpi.priority
        assert _ticket_view(ticket_id, ticket).resolved is (kpi.resolved_at is not None)


def test_a_predicted_clv_is_converted_to_the_reporting_currency() -> None:
    """The kpi predicts in its own reporting currency: a rule's "predicted_clv > 500" is in
    the segmenter's. A prediction in a currency without a rate is unknown, not taken as is."""
    in_dollars = clv("clv-usd", NOW - DAY, "100").model_copy(update={"currency": "USD"})
    f, _ = facts(build(CUSTOMER, [in_dollars]), NOW, CONFIG)
    assert f["predicted_clv"] == pytest.approx(365.0)  # 3.65 ILS per USD (the default rates)
    in_yen = clv("clv-jpy", NOW - DAY, "100").model_copy(update={"currency": "JPY"})
    f, _ = facts(build(CUSTOMER, [in_yen]), NOW, CONFIG)
    assert f["predicted_clv"] is None
    in_shekels = clv("clv-ils", NOW - DAY, "2400.5")
    assert facts(build(CUSTOMER, [in_shekels]), NOW, CONFIG)[0]["predicted_clv"] == 2400.5


def test_a_consent_repeated_keeps_the_instant_it_was_given() -> None:
    """A CRM that repeats sms: true on every profile update does not re-date the consent: the
    messenger lifts a STOP only for a grant given after it, not for a repeat of an old one."""
    granted = profile("crm-1", NOW - 30 * DAY, {"sms": True})
    repeat = profile("crm-2", NOW - DAY, {"sms": True})
    for order in ([granted, repeat], [repeat, granted]):
        sms = consent_states(build(CUSTOMER, order).consents)["sms"]
        assert sms == {"granted": True, "at": NOW - 30 * DAY}
    # Withdrawn, then given again: since the new grant, whatever order the events came in.
    withdrawn = profile("crm-3", NOW - 10 * DAY, {"sms": False})
    again = profile("crm-4", NOW - 5 * DAY, {"sms": True})
    for permutation in itertools.permutations([granted, repeat, withdrawn, again]):
        state = build(CUSTOMER, list(permutation))
        assert consent_states(state.consents)["sms"] == {"granted": True, "at": NOW - 5 * DAY}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=1, max_size=30, unique_by=lambda t: t[0]),
    st.data(),
)
def test_a_consent_holds_since_the_first_of_its_final_run(
    seen: list[tuple[int, bool]], data: st.DataObject
) -> None:
    """By brute force over the observations: the value is the newest one's, and since is the
    first observation after the newest one of the other value; in any order, with repeats."""
    stamps = [(Stamp(NOW + i * TICK, f"e{i:02d}"), value) for i, value in seen]
    ordered = sorted(stamps, key=lambda sv: sv[0].at)
    value = ordered[-1][1]
    other = [s for s, v in ordered if v != value]
    since = next(s for s, v in ordered if v == value and (not other or s.newer_than(other[-1])))
    stream = data.draw(st.permutations([*stamps, *data.draw(st.lists(st.sampled_from(stamps), max_size=10))]))
    consent = Consent(stream[0][1], [stream[0][0]])
    for stamp, granted in stream[1:]:
        consent.observe(granted, stamp)
    assert (consent.value, consent.since, consent.newest) == (value, since, ordered[-1][0])
    assert len(consent.run) <= CONSENT_RUN_KEPT


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        # Mostly one value: long runs, past what is kept, then a stale opposite one late.
        st.tuples(st.integers(0, 400), st.sampled_from([True] * 39 + [False])),
        min_size=1,
        max_size=200,
        unique_by=lambda t: t[0],
    ),
    st.data(),
)
def test_a_long_consent_history_never_dates_since_too_late(
    seen: list[tuple[int, bool]], data: st.DataObject
) -> None:
    """Past CONSENT_RUN_KEPT observations of one value some are dropped: since may then be
    dated earlier than the truth (a STOP stays in force), never later (it would be lifted)."""
    stamps = [(Stamp(NOW + i * TICK, f"e{i:03d}"), value) for i, value in seen]
    ordered = sorted(stamps, key=lambda sv: sv[0].at)
    value = ordered[-1][1]
    other = [s for s, v in ordered if v != value]
    since = next(s for s, v in ordered if v == value and (not other or s.newer_than(other[-1])))
    stream = data.draw(st.permutations(stamps))
    consent = Consent(stream[0][1], [stream[0][0]])
    for stamp, granted in stream[1:]:
        consent.observe(granted, stamp)
    assert (consent.value, consent.newest) == (value, ordered[-1][0])
    assert not consent.since.newer_than(since)


def test_a_late_change_among_dropped_repeats_dates_since_at_the_change() -> None:
    """100 repeats of a grant (more than are kept), then a stale withdrawal between the 80th
    and the 81st arrives: since is the 81st's instant or earlier, never the newest repeat's."""
    consent = Consent(True, [Stamp(NOW + TICK, "e001")])
    for i in range(2, 101):
        consent.observe(True, Stamp(NOW + i * TICK, f"e{i:03d}"))
    assert len(consent.run) == CONSENT_RUN_KEPT
    consent.observe(False, Stamp(NOW + 80 * TICK, "e080x"))
    assert consent.value is True
    assert not consent.since.newer_than(Stamp(NOW + 81 * TICK, "e081"))
    assert consent.newest == Stamp(NOW + 100 * TICK, "e100")


def test_a_consent_stored_before_since_was_kept_keeps_its_instant() -> None:
    """Stored as [value, at, event id]: a redelivered older observation of the same value does
    not move since back before the instant the stored register had."""
    stored = json.loads(json.dumps(dump_state(build(CUSTOMER, [profile("crm-9", NOW - DAY, {"sms": True})]))))
    stored["consents"]["sms"] = stored["consents"]["sms"][:3]  # the old form
    state = load_state(CUSTOMER, stored)
    apply_event(state, profile("crm-1", NOW - 30 * DAY, {"sms": True}))
    assert consent_states(state.consents)["sms"] == {"granted": True, "at": NOW - DAY}
    apply_event(state, profile("crm-10", NOW, {"sms": False}))
    assert consent_states(state.consents)["sms"] == {"granted": False, "at": NOW}


def test_a_later_event_for_the_same_order_corrects_it() -> None:
    first = purchase("o-1", NOW - 3 * DAY, "o", "100.00")
    fix = purchase("o-2", NOW - 3 * DAY + timedelta(minutes=5), "o", "80.00")
    for order in ([first, fix], [fix, first]):
        f, _ = facts(build(CUSTOMER, order), NOW, CONFIG)
        assert f["orders_count"] == 1
        assert f["total_by_currency"] == {"ILS": "80.00"}


# --- lifecycle -----------------------------------------------------------------------------------

SHORT = LifecycleConfig(new_days=10, at_risk_after_days=20, lapsed_after_days=50, won_back_days=15)


def bought(*days_ago: float) -> list[AnyEvent]:
    return [purchase(f"b{i}", NOW - d * DAY, f"o{i}") for i, d in enumerate(days_ago)]


def cancelled(days_ago: float, reason: str = "price", n: int = 0) -> AnyEvent:
    return cancellation(f"x{n}", NOW - days_ago * DAY, reason)


@pytest.mark.parametrize(
    ("events", "stage", "next_change"),
    [
        pytest.param([profile("p", NOW - 99 * DAY, name="Noa")], "new", None, id="never-bought"),
        pytest.param(bought(3), "new", NOW + 7 * DAY, id="new-until-first+10d"),
        pytest.param(bought(9, 1), "new", NOW + DAY, id="new-ends-before-at-risk"),
        pytest.param(bought(10), "active", NOW + 10 * DAY, id="new-ends-at-exactly-10d"),
        pytest.param(bought(15, 5), "active", NOW + 15 * DAY, id="active-until-last+20d"),
        pytest.param(bought(40, 20), "at_risk", NOW + 30 * DAY, id="at-risk-at-exactly-20d"),
        pytest.param(
            [*bought(40), purchase("b9", NOW - 20 * DAY + TICK, "o9")],
            "active",
            NOW + TICK,
            id="active-one-tick-before-at-risk",
        ),
        pytest.param(bought(70, 49), "at_risk", NOW + DAY, id="at-risk-until-last+50d"),
        pytest.param(bought(70, 50), "lapsed", None, id="lapsed-at-exactly-50d"),
        pytest.param([*bought(30, 2), cancelled(1)], "churned", None, id="churned"),
        pytest.param([cancelled(1)], "churned", None, id="churned-without-buying"),
        pytest.param([*bought(30, 1), cancelled(1)], "churned", None, id="cancel-at-the-same-instant"),
        pytest.param([*bought(30, 5), cancelled(8)], "won_back", NOW + 10 * DAY, id="won-back"),
        pytest.param(
            [*bought(60, 16, 12), cancelled(20)], "active", NOW + 8 * DAY, id="won-back-over-after-15d"
        ),
        pytest.param([*bought(90, 30), cancelled(40)], "at_risk", NOW + 20 * DAY, id="won-back-then-at-risk"),
    ],
)
def test_lifecycle_stage_and_when_time_alone_changes_it(
    events: list[AnyEvent], stage: str, next_change: datetime | None
) -> None:
    state = build(CUSTOMER, events)
    assert lifecycle(state, NOW, SHORT) == (stage, next_change)
    assert facts(state, NOW, SHORT)[0]["lifecycle_stage"] == stage
    if next_change is not None:
        assert lifecycle(state, next_change - TICK, SHORT)[0] == stage
        assert lifecycle(state, next_change, SHORT)[0] != stage
        assert next_change in facts(state, NOW, SHORT)[1]


def test_churn_reason_and_time_come_from_the_latest_cancellation() -> None:
    state = build(CUSTOMER, [*bought(30), cancelled(9, "service", 1), cancelled(4, "price", 2)])
    f, _ = facts(state, NOW, SHORT)
    assert (f["lifecycle_stage"], f["churn_reason"], f["churned_at"]) == ("churned", "price", NOW - 4 * DAY)


@settings(max_examples=300, deadline=None)
@given(
    purchase_days=st.lists(st.integers(0, 120), max_size=6),
    cancel_days=st.lists(st.integers(0, 120), max_size=2),
    probes=st.lists(st.floats(0, 1), min_size=1, max_size=5),
)
def test_the_stage_holds_until_the_announced_instant_and_changes_there(
    purchase_days: list[int], cancel_days: list[int], probes: list[float]
) -> None:
    state = build(
        CUSTOMER, [*bought(*purchase_days), *(cancelled(d, n=i) for i, d in enumerate(cancel_days))]
    )
    stage, next_change = lifecycle(state, NOW, SHORT)
    if next_change is None:
        # Nothing but a new event changes it: check far ahead.
        for p in probes:
            assert lifecycle(state, NOW + p * 1000 * DAY, SHORT)[0] == stage
        return
    assert next_change > NOW
    for p in probes:
        assert lifecycle(state, NOW + (next_change - NOW - TICK) * p, SHORT)[0] == stage
    assert lifecycle(state, next_change, SHORT)[0] != stage


def test_the_facts_the_tier_proof_takes_as_always_set_are_set_for_a_customer_with_nothing() -> None:
    """The unreachable-tier check counts `orders_count gte 0` as a catch-all (rules.ALWAYS_SET):
    true only while a customer with no order, ticket or window has each of them, at its least."""
    f, _ = facts(ProfileState("nobody-yet"), NOW, CONFIG)
    for name in ALWAYS_SET:
        domain = FACT_DOMAINS[name]
        assert isinstance(domain, Range)
        assert f[name] == domain.low, name
