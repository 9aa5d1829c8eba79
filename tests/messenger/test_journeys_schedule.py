"""``schedule``: a wait is measured from the trigger's occurred_at, so an update that arrives
after the wait is over (a replayed history, a consumer back after a day) is due at once, decided
as the end of the wait would have decided it. Pure: no database, no broker."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from services.messenger.decision import Candidate
from services.messenger.journeys import (
    Entry,
    default_journeys,
    holds,
    schedule,
    snapshot_facts,
    triggered,
    validate_journey,
)
from shared.events import CancellationReason, CustomerUpdate, SupportAction
from tests.messenger.test_journeys import DAY, JOURNEYS, cancellation, churned, purchase, ticket, update
from tests.messenger.test_service import NOON

SURVEY = JOURNEYS["feedback_survey"]
WIN_BACK = JOURNEYS["win_back"]
THANKS = JOURNEYS["thank_you"]


def entry_of(journey_name: str, u: CustomerUpdate) -> Entry:
    [entry] = triggered(JOURNEYS[journey_name], u)
    return entry


def expired_at_send(entry: Entry, ttl_hours: float, now: datetime) -> bool:
    candidate = Candidate(
        message_key="k",
        customer_id="c",
        journey=entry.journey.name,
        kind=entry.journey.kind,
        template=entry.journey.template,
        triggered_at=entry.at,
        ttl=timedelta(hours=ttl_hours),
    )
    assert candidate.expires_at is not None
    return candidate.expires_at <= now


def test_a_journey_without_a_wait_is_decided_at_its_trigger() -> None:
    u = update("c1", "he", NOON, purchase(NOON - timedelta(hours=1)))
    entry = entry_of("thank_you", u)
    plan = schedule(THANKS, entry, snapshot_facts(u), u.triggering_events, NOON)
    assert plan.entry == entry
    assert plan.wait_until is None
    assert plan.ended is None


def test_a_wait_still_running_is_stored_until_its_end() -> None:
    resolved_at = NOON - timedelta(hours=3)
    u = update("c1", "ar", NOON, ticket(resolved_at, SupportAction.RESOLVED))
    entry = entry_of("feedback_survey", u)
    plan = schedule(SURVEY, entry, snapshot_facts(u), u.triggering_events, NOON)
    assert plan.wait_until == resolved_at + DAY  # from the resolution, not from its arrival
    assert plan.entry.at == resolved_at
    assert plan.ended is None


def test_a_survey_whose_day_passed_before_it_arrived_is_due_at_once_and_not_late() -> None:
    resolved_at = NOON - 3 * DAY  # replayed: resolved three days ago, survey due two days ago
    u = update("c1", "en", NOON, ticket(resolved_at, SupportAction.RESOLVED))
    entry = entry_of("feedback_survey", u)
    assert expired_at_send(entry, SURVEY.ttl_hours, NOON)  # a TTL from the trigger: lost

    plan = schedule(SURVEY, entry, snapshot_facts(u), u.triggering_events, NOON)
    assert plan.wait_until is None
    assert plan.ended is None
    assert plan.entry.at == resolved_at + DAY  # its TTL counts from the end of the wait
    assert plan.entry.key == entry.key  # the same message (idempotency key), only due now
    assert not expired_at_send(plan.entry, SURVEY.ttl_hours, NOON)


def test_a_survey_resolved_long_ago_is_still_too_late() -> None:
    resolved_at = NOON - 30 * DAY
    u = update("c1", "he", NOON, ticket(resolved_at, SupportAction.RESOLVED))
    plan = schedule(SURVEY, entry_of("feedback_survey", u), snapshot_facts(u), u.triggering_events, NOON)
    assert expired_at_send(plan.entry, SURVEY.ttl_hours, NOON)


@pytest.mark.parametrize(
    ("reason", "days"),
    [(CancellationReason.PRICE, 14), (CancellationReason.SERVICE, 30), (CancellationReason.BOTH, 30)],
)
def test_the_win_back_cool_off_is_measured_from_the_cancellation(
    reason: CancellationReason, days: int
) -> None:
    def cancelled(ago: timedelta) -> tuple[Entry, CustomerUpdate]:
        at = NOON - ago
        u = update("c1", "he", NOON, cancellation(at, reason), **churned(churn_reason=reason, churned_at=at))
        return entry_of("win_back", u), u

    cooling, u = cancelled(days * DAY - timedelta(hours=1))
    plan = schedule(WIN_BACK, cooling, snapshot_facts(u), u.triggering_events, NOON)
    assert plan.wait_until == NOON + timedelta(hours=1)

    cooled, u = cancelled(days * DAY + timedelta(hours=1))
    plan = schedule(WIN_BACK, cooled, snapshot_facts(u), u.triggering_events, NOON)
    assert plan.wait_until is None
    assert plan.ended is None
    assert plan.entry.at == NOON - timedelta(hours=1)
    assert not expired_at_send(plan.entry, WIN_BACK.ttl_hours, NOON)


def test_a_cooled_off_win_back_ends_when_the_customer_is_back_already() -> None:
    cancelled_at = NOON - 20 * DAY
    u = update(
        "c1",
        "he",
        NOON,
        cancellation(cancelled_at, CancellationReason.PRICE),
        purchase(NOON - 2 * DAY),
        **churned(lifecycle_stage="won_back", churned_at=cancelled_at),
    )
    plan = schedule(WIN_BACK, entry_of("win_back", u), snapshot_facts(u), u.triggering_events, NOON)
    assert plan.ended == "exit condition met"


def test_a_cooled_off_win_back_ends_on_a_purchase_within_the_cool_off() -> None:
    """The purchase is in the same update, and the profile does not show it yet."""
    cancelled_at = NOON - 20 * DAY
    u = update(
        "c1",
        "ar",
        NOON,
        cancellation(cancelled_at, CancellationReason.PRICE),
        purchase(cancelled_at + 3 * DAY),
        **churned(churned_at=cancelled_at),
    )
    plan = schedule(WIN_BACK, entry_of("win_back", u), snapshot_facts(u), u.triggering_events, NOON)
    assert plan.ended == "a purchase happened first"


@pytest.mark.parametrize("bought", [-DAY, 15 * DAY], ids=["before-the-cancellation", "after-the-cool-off"])
def test_a_purchase_outside_the_cool_off_does_not_end_it(bought: timedelta) -> None:
    cancelled_at = NOON - 20 * DAY
    u = update(
        "c1",
        "en",
        NOON,
        purchase(cancelled_at + bought),
        cancellation(cancelled_at, CancellationReason.PRICE),
        **churned(churned_at=cancelled_at),
    )
    plan = schedule(WIN_BACK, entry_of("win_back", u), snapshot_facts(u), u.triggering_events, NOON)
    assert plan.ended is None
    assert plan.entry.at == cancelled_at + 14 * DAY


def test_a_cooled_off_win_back_ends_over_an_unresolved_complaint() -> None:
    cancelled_at = NOON - 20 * DAY
    u = update(
        "c1",
        "he",
        NOON,
        cancellation(cancelled_at, CancellationReason.PRICE),
        last_complaint_resolved=False,
        **churned(churned_at=cancelled_at),
    )
    plan = schedule(WIN_BACK, entry_of("win_back", u), snapshot_facts(u), u.triggering_events, NOON)
    assert plan.ended == "exit condition met"


def test_a_journey_condition_naming_a_locale_by_another_code_holds_for_its_customers() -> None:
    """A snapshot's locale is in BCP 47's case with the language's current code (he-IL for an
    event's iw-IL): an entry saying iw-IL, or he-il, held for nobody."""
    facts = snapshot_facts(update("c-he", "he", NOON))
    assert facts["locale"] == "he-IL"
    assert holds({"field": "locale", "op": "in", "value": ["iw-IL", "ar-IL"]}, facts, NOON)
    assert holds({"field": "locale", "op": "eq", "value": "he-il"}, facts, NOON)
    assert not holds({"field": "locale", "op": "ne", "value": "iw-IL"}, facts, NOON)
    welcome = default_journeys()[0].model_dump(mode="json")
    welcome["entry"] = {"field": "locale", "op": "eq", "value": "he_IL"}
    assert [(e.path, e.message) for e in validate_journey(welcome)] == [
        ("$.entry.value", 'locale "he_IL": not a BCP 47 language tag, e.g. he-IL, ar, en-US')
    ]
