"""decide(): a customer's new row and the customer_update that announces it."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.segmenter.profile import (
    LifecycleConfig,
    ProfileState,
    apply_event,
    build,
    dump_state,
    facts,
    facts_from_json,
    load_state,
)
from services.segmenter.repository import CustomerRow, Mover, Standing
from services.segmenter.rules import CompiledRules, compile_rules, default_rules
from services.segmenter.updates import (
    LATE_EVENT_WINDOW,
    Decision,
    decide,
    decide_events,
    facts_read,
    news,
    read_whole,
    reevaluate,
    rule_change,
    unchanged,
    update_id,
)
from shared.codec import decode_with, encode
from shared.events import CUSTOMER_UPDATE_ADAPTER, ClvPrediction, Event, UpdateCause
from tests.segmenter.factories import CUSTOMER, NOW, cancellation, clv, profile, purchase, support
from tests.segmenter.test_profile import histories, redeliveries

CONFIG = LifecycleConfig()
DAY = timedelta(days=1)
DEFAULT = compile_rules(default_rules(), 1)


def contact() -> Event:
    return profile(
        "crm-1",
        NOW - 100 * DAY,
        {"email": True, "whatsapp": False},
        name="נועה לוי",
        email="noa@example.co.il",
        phone="+972521234567",
        whatsapp="+972521234567",
        locale="he-IL",
        timezone="Asia/Jerusalem",
        preferred_channel="whatsapp",
        attributes={"city": "חיפה"},
    )


def first_order() -> Event:
    return purchase("shop-1", NOW - 40 * DAY, "88412", "349.90")


def run(
    events: Sequence[Event | ClvPrediction],
    old: CustomerRow | None = None,
    *,
    now: datetime = NOW,
    as_of: datetime | None = None,
    key: str = "k",
    rules: CompiledRules = DEFAULT,
    state: ProfileState | None = None,
) -> Decision:
    """What the service decides when ``events`` arrive at ``now`` (``decide_events``), or with
    ``as_of``, judged as of that instant instead (as the sweep and a publish judge: now)."""
    state = state or ProfileState(CUSTOMER)
    if as_of is None:
        return decide_events(state, old, events, rules, CONFIG, now, key)
    announced = news(state, [e for e in events if not isinstance(e, ClvPrediction)])
    for event in events:
        apply_event(state, event)
    return decide(state, old, rules, CONFIG, as_of, UpdateCause.EVENTS, key, announced)


def test_the_first_update_carries_everything_the_messenger_needs() -> None:
    ticket = support("desk-1", NOW - 2 * DAY, "T-9", "opened", "delivery", complaint=True, priority="high")
    events = [contact(), first_order(), ticket]
    decision = run(events, key="crm-1,desk-1,shop-1")
    update = decision.update
    assert update is not None

    assert update.customer_id == CUSTOMER
    assert update.cause == UpdateCause.EVENTS
    assert update.event_id == update_id(CUSTOMER, UpdateCause.EVENTS, "crm-1,desk-1,shop-1")
    assert update.occurred_at == NOW - 2 * DAY  # as of the latest event
    assert update.rule_version == 1
    assert (update.tier_old, update.tier_new) == (None, "bronze")
    assert update.segments_entered == ["recent_unresolved_complaint"]
    assert update.segments_left == []

    by_id = {t.event_id: t for t in update.triggering_events}
    assert [t.event_id for t in update.triggering_events] == ["crm-1", "shop-1", "desk-1"]  # by time
    order = by_id["shop-1"]
    assert (order.type, order.order_id, order.amount, order.currency) == (
        "purchase",
        "88412",
        Decimal("349.90"),
        "ILS",
    )
    desk = by_id["desk-1"]
    assert (desk.type, desk.ticket_id, desk.action, desk.category, desk.priority, desk.is_complaint) == (
        "support",
        "T-9",
        "opened",
        "delivery",
        "high",
        True,
    )
    assert by_id["crm-1"].type == "profile"

    p = update.profile
    assert (p.name, p.email, p.phone, p.whatsapp) == (
        "נועה לוי",
        "noa@example.co.il",
        "+972521234567",
        "+972521234567",
    )
    assert (p.locale, p.timezone, p.preferred_channel) == ("he-IL", "Asia/Jerusalem", "whatsapp")
    assert {c: (s.granted, s.at) for c, s in p.consents.items()} == {
        "email": (True, NOW - 100 * DAY),
        "whatsapp": (False, NOW - 100 * DAY),
    }
    assert p.lifecycle_stage == "active"
    assert (p.tier, p.segments) == ("bronze", ["recent_unresolved_complaint"])
    assert (p.orders_count, p.total_value, p.reporting_currency) == (1, Decimal("349.9"), "ILS")
    assert p.last_purchase_at == NOW - 40 * DAY
    assert (p.open_tickets, p.last_complaint_resolved) == (1, False)
    assert p.attributes == {"city": "חיפה"}
    assert (p.predicted_clv, p.p_alive, p.churn_reason) == (None, None, None)

    # The contract survives the topic.
    assert decode_with(CUSTOMER_UPDATE_ADAPTER, encode(update)) == update


def test_the_row_is_what_was_decided() -> None:
    state = build(CUSTOMER, [contact(), first_order()])
    decision = decide(state, None, DEFAULT, CONFIG, NOW, UpdateCause.EVENTS, "k", [first_order()])
    row = decision.row
    f, _ = facts(state, NOW, CONFIG)
    assert row.customer_id == CUSTOMER
    assert row.state == dump_state(state)
    assert row.facts["total_value"] == f["total_value"] == 349.9
    assert row.facts["last_purchase_at"] == (NOW - 40 * DAY).isoformat()
    assert (row.tier, row.segments, row.lifecycle_stage, row.rule_version) == ("bronze", [], "active", 1)
    assert row.updated_at == NOW


def test_next_check_is_the_earliest_boundary_of_facts_and_rules() -> None:
    # Evaluated as of NOW, as the sweep does, so that the boundaries lie ahead.
    # Lifecycle: at_risk 60 days after the last purchase (now + 20 d); windows: the order leaves
    # the 90-day count at now + 50 d. Nothing in the rules is earlier here.
    decision = run([first_order()], as_of=NOW)
    assert decision.row.next_check_at == NOW + 20 * DAY

    # A first purchase 5 days ago: the new_customers segment (within_days 30) flips at +25 d and
    # one microsecond, the purchases_30d window at +25 d exactly: the window is first.
    recent = run([purchase("shop-2", NOW - 5 * DAY, "o2")], as_of=NOW)
    assert recent.row.next_check_at == NOW + 25 * DAY

    # A complaint 29 days ago: recent_unresolved_complaint (within_days 30) ends one microsecond
    # after +1 d, before any fact's own boundary.
    complaint = support("desk-2", NOW - 29 * DAY, "T-1", "opened", complaint=True)
    decision = run([purchase("shop-3", NOW - 50 * DAY, "o3"), complaint], as_of=NOW)
    assert decision.row.next_check_at == NOW + DAY + timedelta(microseconds=1)

    assert run([contact()], as_of=NOW).row.next_check_at is None  # nothing changes with time alone


def test_the_same_cause_gives_the_same_id_and_another_cause_another() -> None:
    first = run([first_order()], key="shop-1").update
    again = run([first_order()], key="shop-1").update
    assert first is not None
    assert again is not None
    assert first.event_id == again.event_id
    assert first == again
    other_key = run([first_order()], key="shop-1,shop-2").update
    assert other_key is not None
    assert other_key.event_id != first.event_id
    assert update_id(CUSTOMER, UpdateCause.TIME, "x") != update_id(CUSTOMER, UpdateCause.RULES, "x")
    assert update_id(CUSTOMER, UpdateCause.TIME, "x") != update_id("c-2", UpdateCause.TIME, "x")


def test_events_always_announce_even_when_nothing_moved() -> None:
    first = run([contact(), first_order()])
    state = build(CUSTOMER, [contact(), first_order()])
    second = run([purchase("shop-1b", NOW - 40 * DAY, "88412", "349.90")], first.row, state=state)
    assert second.update is not None  # a purchase is news for the messenger by itself
    assert (second.update.tier_old, second.update.tier_new) == ("bronze", "bronze")
    assert second.update.segments_entered == second.update.segments_left == []


def test_time_passing_announces_only_a_change() -> None:
    state = build(CUSTOMER, [contact(), first_order()])
    first = decide(state, None, DEFAULT, CONFIG, NOW, UpdateCause.EVENTS, "k", [first_order()])

    quiet = decide(state, first.row, DEFAULT, CONFIG, NOW + 10 * DAY, UpdateCause.TIME, "t1")
    assert quiet.update is None
    assert quiet.row.next_check_at == NOW + 20 * DAY

    at_risk = decide(state, first.row, DEFAULT, CONFIG, NOW + 20 * DAY, UpdateCause.TIME, "t2")
    assert at_risk.update is not None
    assert at_risk.update.cause == UpdateCause.TIME
    assert at_risk.update.triggering_events == []
    assert at_risk.update.occurred_at == NOW + 20 * DAY
    assert at_risk.update.segments_entered == ["at_risk"]
    assert at_risk.update.profile.lifecycle_stage == "at_risk"
    assert at_risk.row.next_check_at == NOW + 50 * DAY  # leaves the 90-day window
    assert at_risk.entered == ("at_risk",)

    lapsed = decide(state, at_risk.row, DEFAULT, CONFIG, NOW + 140 * DAY, UpdateCause.TIME, "t3")
    assert lapsed.update is not None
    assert (lapsed.update.segments_entered, lapsed.update.segments_left) == (["lapsed"], ["at_risk"])
    assert lapsed.left == ("at_risk",)


def test_a_clv_prediction_announces_only_a_change() -> None:
    base = [contact(), first_order()]
    state = build(CUSTOMER, base)
    first = decide(state, None, DEFAULT, CONFIG, NOW, UpdateCause.EVENTS, "k", base)

    rich = run([clv("clv-1", NOW, "2500", 0.9)], first.row, state=state)
    assert rich.update is not None
    assert rich.update.segments_entered == ["high_value"]
    assert (rich.update.profile.predicted_clv, rich.update.profile.p_alive) == (Decimal("2500.0"), 0.9)

    richer = run([clv("clv-2", NOW + DAY, "2600", 0.9)], rich.row, state=state)
    assert richer.update is None
    assert richer.row.facts["predicted_clv"] == 2600.0  # stored all the same


def test_a_new_rule_version_announces_only_a_change() -> None:
    state = build(CUSTOMER, [contact(), first_order()])
    first = decide(state, None, DEFAULT, CONFIG, NOW, UpdateCause.EVENTS, "k", [first_order()])
    raw = default_rules()
    raw["tiers"][-1]["name"] = "member"  # bronze renamed
    renamed = compile_rules(raw, 2)

    moved = decide(state, first.row, renamed, CONFIG, NOW, UpdateCause.RULES, "2")
    assert moved.update is not None
    assert (moved.update.tier_old, moved.update.tier_new, moved.update.rule_version) == (
        "bronze",
        "member",
        2,
    )
    assert moved.update.event_id == update_id(CUSTOMER, UpdateCause.RULES, "2")
    assert moved.row.rule_version == 2

    unchanged = decide(state, moved.row, compile_rules(raw, 3), CONFIG, NOW, UpdateCause.RULES, "3")
    assert unchanged.update is None
    assert unchanged.row.rule_version == 3


def test_an_upgrade_is_up_the_ladder_of_the_rules_that_assigned_it() -> None:
    """Marketing names and orders the tiers; the messenger's tier_upgrade journey learns from the
    update whether a move was up, on the ladder of the version that made it."""
    state = build(CUSTOMER, [contact(), first_order()])
    everyone: dict[str, Any] = {"all": []}
    no_one: dict[str, Any] = {"any": []}

    def ladder(version: int, vip: dict[str, Any]) -> CompiledRules:
        tiers = [{"name": "vip", "when": vip}, {"name": "regular", "when": everyone}]
        return compile_rules({"tiers": tiers, "segments": []}, version)

    def moved(decision: Any) -> tuple[str | None, str, bool | None]:
        assert decision.update is not None
        return decision.update.tier_old, decision.update.tier_new, decision.update.tier_upgrade

    first = decide(state, None, ladder(1, no_one), CONFIG, NOW, UpdateCause.EVENTS, "k", [first_order()])
    assert moved(first) == (None, "regular", False)
    up = decide(state, first.row, ladder(2, everyone), CONFIG, NOW, UpdateCause.RULES, "2")
    assert moved(up) == ("regular", "vip", True)
    down = decide(state, up.row, ladder(3, no_one), CONFIG, NOW, UpdateCause.RULES, "3")
    assert moved(down) == ("vip", "regular", False)
    # From a tier the new set does not have, nothing is ranked: no upgrade, whatever the names.
    other = decide(state, down.row, DEFAULT, CONFIG, NOW, UpdateCause.RULES, "4")
    assert moved(other) == ("regular", "bronze", False)
    assert DEFAULT.upgrade("bronze", "gold")
    assert DEFAULT.upgrade("none", "bronze")
    assert not DEFAULT.upgrade("gold", "gold")
    assert not DEFAULT.upgrade("platinum", "gold")


def test_a_cancellation_carries_its_reason_into_the_update_and_the_snapshot() -> None:
    base = [contact(), first_order()]
    first = run(base)
    state = build(CUSTOMER, base)
    gone = run([cancellation("bill-1", NOW - DAY, "service")], first.row, state=state)
    assert gone.update is not None
    [trigger] = gone.update.triggering_events
    assert (trigger.type, trigger.reason) == ("cancellation", "service")
    assert (gone.update.profile.lifecycle_stage, gone.update.profile.churn_reason) == ("churned", "service")
    assert gone.update.profile.churned_at == NOW - DAY
    assert gone.update.segments_entered == ["churned_service"]
    assert gone.row.next_check_at == NOW + 50 * DAY  # the 90-day window still runs out


# --- rule publish: the stored facts, evaluated once ------------------------------------------


def stored(decision: Decision) -> CustomerRow:
    """The row as the database gives it back: JSON types, as the repository reads them."""
    row = decision.row
    return CustomerRow(
        customer_id=row.customer_id,
        state=json.loads(json.dumps(row.state)),
        facts=json.loads(json.dumps(row.facts)),
        tier=row.tier,
        segments=list(row.segments),
        lifecycle_stage=row.lifecycle_stage,
        rule_version=row.rule_version,
        next_check_at=row.next_check_at,
        updated_at=row.updated_at,
    )


def standing(row: CustomerRow, fields: frozenset[str] | None = None) -> Standing:
    """As ``standings_after`` reads it: the facts whole, or only ``fields`` (None if absent)."""
    f = row.facts if fields is None else {k: row.facts.get(k) for k in fields}
    return Standing(row.customer_id, f, row.tier, row.segments, row.next_check_at, row.rule_version)


def with_segment(name: str, when: dict[str, Any], version: int = 2) -> CompiledRules:
    rules = default_rules()
    rules["segments"].append({"name": name, "when": when})
    return compile_rules(rules, version)


BIG = with_segment("big", {"field": "total_value", "op": "gte", "value": 300})


def test_a_rule_change_announces_what_deriving_everything_again_would() -> None:
    events = [contact(), first_order(), support("desk-1", NOW - 2 * DAY, "T-9", "opened", complaint=True)]
    old = stored(run(events))
    later = NOW + 3 * DAY  # before the row's next check: the stored facts still hold
    assert old.next_check_at is not None
    assert later < old.next_check_at

    step = reevaluate([standing(old)], BIG, later)
    assert (step.stale, step.earlier_checks) == ([], [])
    [(_, assignment)] = step.moves
    change = rule_change(Mover.of(old), assignment, BIG, CONFIG, later)
    full = decide(load_state(CUSTOMER, old.state), old, BIG, CONFIG, later, UpdateCause.RULES, "2")

    assert full.update is not None
    assert change.update == full.update
    assert change.update.event_id == update_id(CUSTOMER, UpdateCause.RULES, "2")
    assert change.update.profile.consents == full.update.profile.consents
    assert (change.entered, change.left) == (full.entered, full.left) == (("big",), ())
    r = change.reassignment
    assert (r.tier, r.segments, r.rule_version, r.updated_at) == (
        full.row.tier,
        full.row.segments,
        2,
        later,
    )
    # Never later than deriving it all again would say, so no change with time is missed.
    assert full.row.next_check_at is not None
    assert r.next_check_at is not None
    assert later < r.next_check_at <= full.row.next_check_at
    # Only what changes is written (a segment alone here: the tier and next check stay).
    assert (r.tier_changed, r.check_changed) == (r.tier != old.tier, r.next_check_at != old.next_check_at)
    assert (r.tier_changed, r.check_changed) == (False, False)


def test_the_new_rules_own_time_boundaries_bring_a_next_check_forward() -> None:
    # Someone who bought 5 days ago is not a veteran yet; the new segment takes them in at
    # 10 days, before anything else about them changes with time.
    veteran = with_segment("veteran", {"field": "first_purchase_at", "op": "older_than_days", "value": 10})
    old = stored(run([purchase("shop-2", NOW - 5 * DAY, "o2")]))
    assert old.next_check_at == NOW + 25 * DAY
    step = reevaluate([standing(old)], veteran, NOW)
    assert step.moves == []
    assert step.earlier_checks == [(CUSTOMER, NOW + 5 * DAY + timedelta(microseconds=1))]

    nothing_sooner = reevaluate([standing(old)], BIG, NOW)  # no time condition in the change
    assert (nothing_sooner.moves, nothing_sooner.earlier_checks) == ([], [])


def test_facts_past_their_next_check_are_derived_again() -> None:
    old = stored(run([first_order()], as_of=NOW))  # as the sweep left it
    assert old.next_check_at == NOW + 20 * DAY  # at_risk then
    step = reevaluate([standing(old)], BIG, NOW + 21 * DAY)
    assert step.stale == [CUSTOMER]
    assert step.moves == []

    # As the events left it, before the sweep came: its facts hold as of the order (a new
    # customer then), not now, so a publish derives them again too.
    fresh = stored(run([first_order()]))
    assert fresh.next_check_at == NOW - 10 * DAY
    assert reevaluate([standing(fresh)], BIG, NOW).stale == [CUSTOMER]


def test_stored_facts_parse_only_the_datetimes_asked_for() -> None:
    raw = stored(run([first_order()])).facts
    some = facts_from_json(raw, {"first_purchase_at", "orders_count"})
    assert some["first_purchase_at"] == NOW - 40 * DAY
    assert some["last_purchase_at"] == raw["last_purchase_at"]  # left as stored
    assert facts_from_json(raw)["last_purchase_at"] == NOW - 40 * DAY


# --- events are judged as of the customer's latest event; the sweep judges as of now ---------


def replayed_history() -> list[Event]:
    """Bought twice, the last time 100 days before the replay (at NOW): at risk today."""
    return [
        contact(),
        purchase("shop-a", NOW - 200 * DAY, "o-a"),
        purchase("shop-b", NOW - 100 * DAY, "o-b"),
    ]


def test_events_are_evaluated_as_of_the_customers_latest_event() -> None:
    decision = run(replayed_history(), key="replay")
    update = decision.update
    assert update is not None
    # As of the last purchase they were an active customer, and the update says so, stamped
    # then: judged now, it would announce at_risk stamped 100 days ago.
    assert decision.row.updated_at == update.occurred_at == NOW - 100 * DAY
    assert (decision.row.lifecycle_stage, update.profile.lifecycle_stage) == ("active", "active")
    assert "at_risk" not in decision.row.segments
    assert decision.row.facts["purchases_30d"] == 1  # the window as of then
    # What time alone changed since (the purchase left the 30-day window, then 60 days made
    # them at_risk) is already past: the sweep's to announce.
    assert decision.row.next_check_at == NOW - 70 * DAY

    # A late event, alone in its batch, is judged as of what was already known, not before it.
    state = build(CUSTOMER, replayed_history())
    late = run([profile("crm-old", NOW - 120 * DAY, name="Noa")], decision.row, state=state)
    assert late.update is not None
    assert late.row.updated_at == late.update.occurred_at == NOW - 100 * DAY
    assert late.row.lifecycle_stage == "active"

    # An event from a clock ahead of ours is judged now, never in the future.
    ahead = run([profile("crm-ahead", NOW + DAY, name="Noa")], late.row, state=state)
    assert ahead.row.updated_at == NOW
    assert ahead.row.lifecycle_stage == "at_risk"

    # A CLV prediction is an event too: judged as of when the model said it.
    state = build(CUSTOMER, replayed_history())
    prediction = run([clv("clv-1", NOW - DAY, "40", 0.3)], decision.row, state=state)
    assert prediction.update is not None
    assert prediction.update.occurred_at == NOW - DAY
    assert prediction.update.segments_entered == ["at_risk"]


def test_the_sweep_announces_the_change_stamped_when_it_notices_it() -> None:
    state = build(CUSTOMER, replayed_history())
    replayed = run(replayed_history(), key="r")
    assert replayed.row.next_check_at is not None
    noticed = NOW + timedelta(minutes=1)  # the sweep comes by within its interval
    assert replayed.row.next_check_at <= noticed  # due (the index: next_check_at <= now)

    swept = decide(state, replayed.row, DEFAULT, CONFIG, noticed, UpdateCause.TIME, "t")
    update = swept.update
    assert update is not None
    assert (update.cause, update.occurred_at, update.triggering_events) == (UpdateCause.TIME, noticed, [])
    assert update.segments_entered == ["at_risk"]
    assert update.profile.lifecycle_stage == swept.row.lifecycle_stage == "at_risk"
    assert swept.row.updated_at == noticed
    assert swept.row.next_check_at == NOW + 80 * DAY  # lapsed, 180 days after the last purchase

    # A late event after that is judged as of the customer's latest event, as any order of the
    # same events would be: back before the sweep's instant, and due again at once.
    late = run([profile("crm-late", NOW - 120 * DAY, name="Noa")], swept.row, state=state, now=noticed)
    assert late.update is not None
    assert late.row.updated_at == late.update.occurred_at == NOW - 100 * DAY
    assert late.update.segments_left == ["at_risk"]
    assert late.row.next_check_at == NOW - 70 * DAY


def test_a_correction_or_a_resend_is_not_news_for_the_journeys() -> None:
    """A second event of an order the customer has (a refund, a corrected amount, a purchase
    resent under another id) is applied but announces no purchase: the thank-you went with the
    first. Likewise a second 'opened' of a ticket: one complaint, one acknowledgement."""
    before = build(
        CUSTOMER,
        [purchase("shop-1", NOW - 9 * DAY, "o-1"), support("desk-1", NOW - 8 * DAY, "T-1", "opened")],
    )
    refund = purchase("shop-1b", NOW - DAY, "o-1", "0.00")
    new_order = purchase("shop-2", NOW - 2 * DAY, "o-2")
    new_order_again = purchase("shop-2-resent", NOW - 2 * DAY, "o-2")
    reopened = support("desk-1-resent", NOW - 8 * DAY, "T-1", "opened")
    replied = support("desk-2", NOW - DAY, "T-1", "customer_replied")
    complaint = support("desk-3", NOW - DAY, "T-2", "opened", complaint=True)
    batch: list[Event] = [refund, new_order_again, replied, reopened, new_order, complaint]
    assert news(before, batch) == [new_order, replied, complaint]
    assert news(ProfileState(CUSTOMER), [refund]) == [refund]  # the first event of an order

    # As the service runs it: every event applied, the news announced.
    decision = run(batch, state=before, key="b")
    assert decision.update is not None
    assert [t.event_id for t in decision.update.triggering_events] == ["shop-2", "desk-2", "desk-3"]
    assert decision.row.facts["orders_count"] == 2  # the resend is still one order


def test_an_event_merely_late_after_a_sweep_does_not_undo_it() -> None:
    """A platinum customer lapses; the sweep demotes them. A support ticket they opened two
    hours before the lapse reaches us three hours later: judged as of itself it would make them
    platinum again (a tier upgrade a journey would announce) until the next sweep demoted them
    again. Judged as of the sweep's instant, nothing moves: the ticket does not bring the
    purchases back."""
    history: list[Event] = [contact()]
    history += [purchase(f"shop-{i}", NOW - (209 - i) * DAY, f"o-{i}", "1200.00") for i in range(10)]
    state = build(CUSTOMER, history)
    bought = run(history, key="history")
    assert bought.row.tier == "platinum"
    lapse = NOW - 200 * DAY + CONFIG.lapsed_after_days * DAY
    swept = decide(state, stored(bought), DEFAULT, CONFIG, lapse + timedelta(hours=1), UpdateCause.TIME, "t")
    assert (swept.row.tier, swept.row.lifecycle_stage) == ("gold", "lapsed")

    ticket = support("desk-late", lapse - timedelta(hours=2), "T-1", "opened")
    late = run([ticket], stored(swept), state=state, now=lapse + timedelta(hours=3), key="late")
    assert late.update is not None  # the ticket itself, for the journeys that react to it
    assert late.row.updated_at == late.update.occurred_at == lapse + timedelta(hours=1)
    assert (late.row.tier, late.row.lifecycle_stage) == ("gold", "lapsed")
    assert (late.update.tier_old, late.update.tier_new, late.update.tier_upgrade) == ("gold", "gold", False)
    assert (late.update.segments_entered, late.update.segments_left) == ([], [])
    again = decide(state, stored(late), DEFAULT, CONFIG, lapse + DAY, UpdateCause.TIME, "t2")
    assert again.update is None  # nothing for the next sweep to announce

    # The customer's latest event further behind the sweep than LATE_EVENT_WINDOW: a replayed
    # history, judged as of itself.
    replayed = support("desk-old", lapse - LATE_EVENT_WINDOW - DAY, "T-2", "opened")
    old = run([replayed], stored(swept), state=build(CUSTOMER, history), now=lapse + 2 * DAY, key="old")
    assert old.row.updated_at == lapse - LATE_EVENT_WINDOW - DAY
    assert old.row.lifecycle_stage == "at_risk"


@settings(max_examples=150, deadline=None)
@given(events=histories(), data=st.data())
def test_the_row_events_leave_is_the_same_whatever_their_order_and_batching(
    events: list[Event | ClvPrediction], data: st.DataObject
) -> None:
    """Each batch is judged as of the customer's latest event so far, so the last batch's row
    does not depend on which events it happened to carry (as the batch's latest would)."""
    whole = run(events)
    stream = data.draw(redeliveries(events))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=5))))
    state = ProfileState(CUSTOMER)
    row: CustomerRow | None = None
    seen: set[str] = set()
    for start, end in itertools.pairwise([0, *cuts, len(stream)]):
        fresh = [e for e in stream[start:end] if e.event_id not in seen]
        seen.update(e.event_id for e in fresh)
        if fresh:
            row = run(fresh, row, state=state).row
    assert row is not None
    assert row == whole.row


# --- rule publish: only the changed rules, the same outcome ----------------------------------


def edited(edit: str, index: int, amount: int) -> CompiledRules:
    """The default rule set after one kind of edit marketing makes, as version 2."""
    rules = default_rules()
    segments = rules["segments"]
    i = index % len(segments)
    if edit == "add":
        segments.append({"name": "big", "when": {"field": "total_value", "op": "gte", "value": amount}})
    elif edit == "add_timed":  # joined by time alone: brings next checks forward
        when = {"field": "first_purchase_at", "op": "older_than_days", "value": amount % 30 + 1}
        segments.insert(i, {"name": "veteran", "when": when})
    elif edit == "retarget":
        segments[i]["when"] = {"field": "orders_count", "op": "gte", "value": amount % 6}
    elif edit == "remove":
        del segments[i]
    elif edit == "reword":
        segments[i]["description"] = "reworded"
    else:  # "ladder": the tiers change, so everything is evaluated again
        rules["tiers"][index % len(rules["tiers"])]["when"] = {
            "field": "orders_count",
            "op": "gte",
            "value": amount % 6,
        }
    return compile_rules(rules, 2)


def test_rule_changes_keep_the_ladder_and_the_unchanged_segments() -> None:
    new = edited("add", 0, 500)
    change = new.changes_from(DEFAULT)
    assert change is not None
    assert change.old_version == 1
    assert change.kept == frozenset(DEFAULT.segment_names)
    assert [name for name, _ in change.evaluated] == ["big"]
    assert change.fields == {"total_value"}
    assert change.timed == ()
    reworded = edited("reword", 3, 0).changes_from(DEFAULT)
    assert reworded is not None
    assert reworded.evaluated == ()  # a description moves nobody
    assert edited("ladder", 1, 2).changes_from(DEFAULT) is None


def test_only_the_changed_rules_bring_a_next_check_forward_as_all_of_them_would() -> None:
    veteran = with_segment("veteran", {"field": "first_purchase_at", "op": "older_than_days", "value": 10})
    change = veteran.changes_from(DEFAULT)
    assert change is not None
    assert change.fields == {"first_purchase_at"}
    assert len(change.timed) == 1
    old = stored(run([purchase("shop-2", NOW - 5 * DAY, "o2")]))
    step = reevaluate([standing(old)], veteran, NOW, {1: change})
    assert step.moves == []
    assert step.earlier_checks == reevaluate([standing(old)], veteran, NOW).earlier_checks
    assert step.earlier_checks == [(CUSTOMER, NOW + 5 * DAY + timedelta(microseconds=1))]
    # A row another version assigned (here: none known) is evaluated under every rule.
    other = reevaluate([standing(old)], veteran, NOW, {7: change})
    assert other.earlier_checks == step.earlier_checks


@settings(max_examples=200, deadline=None)
@given(
    events=histories(),
    edit=st.sampled_from(["add", "add_timed", "retarget", "remove", "reword", "ladder"]),
    index=st.integers(0, 20),
    amount=st.integers(0, 3000),
    days=st.integers(0, 30),  # mostly before the row's next check: facts current
)
def test_evaluating_only_the_changed_rules_decides_as_evaluating_them_all(
    events: list[Any], edit: str, index: int, amount: int, days: int
) -> None:
    old = stored(run(events, as_of=NOW))  # as the sweep leaves a row: facts as of now
    new = edited(edit, index, amount)
    changes = {1: c} if (c := new.changes_from(DEFAULT)) is not None else {}
    later = NOW + days * DAY
    full = reevaluate([standing(old)], new, later)
    # As a publish step reads the page: only the facts the changed rules read.
    read = standing(old, facts_read(changes))
    assert read_whole([read], new, changes) == ([] if changes else [CUSTOMER])
    partial = reevaluate([read if changes else standing(old)], new, later, changes)
    assert partial.stale == full.stale
    assert [(s.customer_id, a.tier, a.segments) for s, a in partial.moves] == [
        (s.customer_id, a.tier, a.segments) for s, a in full.moves
    ]
    assert partial.earlier_checks == full.earlier_checks
    for (s, _), (_whole, assignment) in zip(partial.moves, full.moves, strict=True):
        assert unchanged(s, Mover.of(old))
        # The move announced from the mover's row is the one deriving it all again announces.
        announced = rule_change(Mover.of(old), assignment, new, CONFIG, later).update
        derived = decide(load_state(CUSTOMER, old.state), old, new, CONFIG, later, UpdateCause.RULES, "2")
        assert derived.update is not None
        assert announced == derived.update
        assert encode(announced) == encode(derived.update)  # the same bytes on retain.segments


def complained() -> list[Event]:
    return [contact(), first_order(), support("desk-1", NOW - 2 * DAY, "T-9", "opened", complaint=True)]


def test_a_page_is_read_with_the_facts_the_changed_rules_read() -> None:
    add, timed = edited("add", 0, 500).changes_from(DEFAULT), edited("add_timed", 0, 5).changes_from(DEFAULT)
    assert add is not None
    assert timed is not None
    assert facts_read({1: add}) == frozenset({"total_value"})
    assert facts_read({1: add, 3: timed}) == frozenset({"total_value", "first_purchase_at"})
    assert facts_read({}) is None  # no older version shares the ladder: every fact
    reworded = edited("reword", 0, 0).changes_from(DEFAULT)
    assert reworded is not None
    assert facts_read({1: reworded}) == frozenset()  # a description edit reads nothing


def test_customers_of_a_version_with_another_ladder_are_read_whole() -> None:
    new = edited("add", 0, 500)
    change = new.changes_from(DEFAULT)
    assert change is not None
    row = stored(run([first_order()], as_of=NOW))
    pages = [
        Standing("a", {}, row.tier, row.segments, row.next_check_at, 1),  # a change is known
        Standing("b", {}, row.tier, row.segments, row.next_check_at, 0),  # another ladder
        Standing("c", {}, row.tier, row.segments, row.next_check_at, new.version),  # new rules
    ]
    assert read_whole(pages, new, {1: change}) == ["b"]


def test_customers_the_new_rules_assigned_themselves_stay() -> None:
    # Written by a batch after the publish, under the new rules: nothing to re-evaluate,
    # though an empty page of facts would move them out of every segment if evaluated.
    old = stored(run(complained(), as_of=NOW))
    assert old.segments
    written = Standing(old.customer_id, {}, old.tier, old.segments, old.next_check_at, BIG.version)
    step = reevaluate([written], BIG, NOW)
    assert (step.moves, step.stale, step.earlier_checks) == ([], [], [])


def test_a_mover_rewritten_since_the_page_was_read_is_told_apart() -> None:
    old = stored(run(complained(), as_of=NOW))
    read = standing(old, frozenset({"total_value", "orders_count"}))
    assert unchanged(read, Mover.of(old))
    other_tier = dataclasses.replace(old, tier="since_rewritten")
    assert not unchanged(read, Mover.of(other_tier))
    assert not unchanged(read, Mover.of(dataclasses.replace(old, segments=[*old.segments, "new"])))
    more = dataclasses.replace(old, facts={**old.facts, "total_value": 10_000})
    assert not unchanged(read, Mover.of(more))
    # A fact the page did not read changes nothing the new assignment was decided from.
    renamed = dataclasses.replace(old, facts={**old.facts, "name": "someone else"})
    assert unchanged(read, Mover.of(renamed))
