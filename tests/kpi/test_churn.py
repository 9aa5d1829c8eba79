"""Churn, cohort retention and win-back against answers computed by hand (docs/kpis.md, "Churn").

Months are local to Asia/Jerusalem: March 2026 starts at 2026-02-28 22:00 UTC.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.kpi.churn import (
    CustomerHistory,
    active_contractual,
    active_non_contractual,
    churn,
    cohorts,
    episodes,
    first_lapse_after,
    history,
    win_back,
)
from services.kpi.periods import Granularity, buckets, period

JERUSALEM = ZoneInfo("Asia/Jerusalem")
WINDOW = timedelta(days=90)
WIN_BACK = timedelta(days=180)
NOW = datetime(2026, 4, 15, 12, 0, tzinfo=UTC)


def d(year: int, month: int, day: int, hour: int = 10) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def customers() -> list[CustomerHistory]:
    return [
        # Active all along; cancels for price in February. Lapses 90 days after 15 January.
        history("A", [d(2025, 11, 1), d(2026, 1, 15)], [(d(2026, 2, 10), "price")], tier="gold"),
        # Bought once in October: non-contractually gone by January, but never cancelled.
        history("B", [d(2025, 10, 1)], tier="bronze"),
        # Cancels for service in January, lapses 18 February, comes back 10 March.
        history("C", [d(2025, 11, 20), d(2026, 3, 10)], [(d(2026, 1, 5), "service")], tier="gold"),
        # First purchase in February.
        history("D", [d(2026, 2, 15)], tier="bronze"),
        # Cancels twice in January (one departure); lapses 1 March 10:00 UTC, a March lapse.
        history("E", [d(2025, 12, 1)], [(d(2026, 1, 20), "price"), (d(2026, 1, 25), "both")]),
    ]


MONTHS = buckets(date(2026, 1, 1), date(2026, 3, 31), Granularity.MONTH, JERUSALEM)


def test_active_definitions_at_local_month_starts() -> None:
    by_id = {h.customer_id: h for h in customers()}
    january, february, march = (m.start for m in MONTHS)
    assert march == datetime(2026, 2, 28, 22, tzinfo=UTC)
    assert [c for c, h in by_id.items() if active_contractual(h, january)] == ["A", "B", "C", "E"]
    assert [c for c, h in by_id.items() if active_contractual(h, february)] == ["A", "B"]
    assert [c for c, h in by_id.items() if active_contractual(h, march)] == ["B", "D"]
    # B's last purchase is 91.5 days before 1 January (local): no longer active.
    assert [c for c, h in by_id.items() if active_non_contractual(h, january, WINDOW)] == ["A", "C", "E"]
    assert [c for c, h in by_id.items() if active_non_contractual(h, february, WINDOW)] == ["A", "C", "E"]
    # E: 89.5 days since 1 December at the start of March, still active.
    assert [c for c, h in by_id.items() if active_non_contractual(h, march, WINDOW)] == ["A", "D", "E"]


def test_first_lapse_skips_purchases_that_renew_in_time() -> None:
    a = customers()[0]
    # 1 Nov → 15 Jan is 75 days, a renewal; then nothing: lapse 90 days after 15 January.
    assert first_lapse_after(a, MONTHS[0].start, WINDOW) == d(2026, 1, 15) + WINDOW
    c = customers()[2]
    # 20 Nov → 10 Mar is 110 days: the lapse is 18 February, before the return.
    assert first_lapse_after(c, MONTHS[0].start, WINDOW) == d(2026, 2, 18)


def test_monthly_churn() -> None:
    jan, feb, mar = churn(customers(), MONTHS, WINDOW, NOW)
    # January: contractual C (service) and E (price) of A, B, C, E; nobody lapses.
    assert (jan.contractual.active_at_start, jan.contractual.churned) == (4, 2)
    assert jan.contractual.rate == 0.5
    assert {r: (c.churned, c.rate) for r, c in jan.contractual_by_reason.items()} == {
        "price": (1, 0.25),
        "service": (1, 0.25),
    }
    assert (jan.non_contractual.active_at_start, jan.non_contractual.churned, jan.non_contractual.rate) == (
        3,
        0,
        0.0,
    )
    # February: A cancels (of A, B); C lapses on the 18th (of A, C, E).
    assert (feb.contractual.active_at_start, feb.contractual.churned, feb.contractual.rate) == (2, 1, 0.5)
    assert list(feb.contractual_by_reason) == ["price"]
    assert (feb.non_contractual.active_at_start, feb.non_contractual.churned) == (3, 1)
    assert feb.non_contractual.rate == pytest.approx(1 / 3)
    # March: nobody cancels (of B, D); E lapses on 1 March 12:00 local (of A, D, E).
    assert (mar.contractual.active_at_start, mar.contractual.churned, mar.contractual.rate) == (2, 0, 0.0)
    assert (mar.non_contractual.active_at_start, mar.non_contractual.churned) == (3, 1)


def test_churn_by_tier() -> None:
    jan, _, _ = churn(customers(), MONTHS, WINDOW, NOW)
    # Contractual in January: gold A, C (C churned); bronze B; E has no tier.
    assert {t: (c.active_at_start, c.churned) for t, c in jan.contractual_by_tier.items()} == {
        "bronze": (1, 0),
        "gold": (2, 1),
        "unknown": (1, 1),
    }
    assert jan.contractual_by_tier["gold"].rate == 0.5


def test_a_lapse_after_now_has_not_happened_yet() -> None:
    april = period(date(2026, 4, 1), date(2026, 4, 30), JERUSALEM)
    a = customers()[0]  # lapses 15 April 10:00 UTC
    before = churn([a], [april], WINDOW, d(2026, 4, 15, 9))[0]
    after = churn([a], [april], WINDOW, d(2026, 4, 15, 11))[0]
    assert before.non_contractual.churned == 0
    assert after.non_contractual.churned == 1


def test_late_events_give_the_same_answer() -> None:
    # Histories are built from facts in any order: arrival order cannot change a month.
    expected = churn(customers(), MONTHS, WINDOW, NOW)
    shuffled = [
        history(
            h.customer_id,
            random.Random(1).sample(h.purchases, len(h.purchases)),
            random.Random(2).sample(h.cancellations, len(h.cancellations)),
            tier=h.tier,
        )
        for h in customers()
    ]
    assert churn(shuffled, MONTHS, WINDOW, NOW) == expected


def test_a_late_purchase_corrects_a_past_month() -> None:
    # A purchase of C on 1 February (arriving late) renews C: no February lapse any more.
    c = customers()[2]
    corrected = history("C", [*c.purchases, d(2026, 2, 1)], c.cancellations, tier="gold")
    feb = churn([corrected], MONTHS, WINDOW, NOW)[1]
    assert feb.non_contractual.churned == 0


def test_empty_periods() -> None:
    results = churn([], MONTHS, WINDOW, NOW)
    assert all(r.contractual.rate is None and r.non_contractual.rate is None for r in results)
    assert all(r.contractual.active_at_start == 0 for r in results)
    # A month before anyone bought: nobody active, no rate.
    early = period(date(2025, 1, 1), date(2025, 1, 31), JERUSALEM)
    assert churn(customers(), [early], WINDOW, NOW)[0].contractual.rate is None


def test_cohort_retention_by_first_purchase_month() -> None:
    table = cohorts(
        customers(), date(2025, 10, 1), date(2026, 3, 31), Granularity.MONTH, JERUSALEM, NOW.date()
    )
    by_start = {c.start: c for c in table}
    assert sorted(by_start) == [date(2025, 10, 1), date(2025, 11, 1), date(2025, 12, 1), date(2026, 2, 1)]
    november = by_start[date(2025, 11, 1)]  # A (Nov, Jan) and C (Nov, Mar), through April
    assert november.size == 2
    assert november.active == (2, 0, 1, 0, 1, 0)
    assert november.retention == (1.0, 0.0, 0.5, 0.0, 0.5, 0.0)
    assert by_start[date(2026, 2, 1)].active == (1, 0, 0)
    # Only cohorts starting in the range.
    only = cohorts(
        customers(), date(2025, 12, 1), date(2025, 12, 31), Granularity.MONTH, JERUSALEM, NOW.date()
    )
    assert [c.start for c in only] == [date(2025, 12, 1)]
    assert cohorts([], date(2025, 1, 1), date(2026, 1, 1), Granularity.MONTH, JERUSALEM, NOW.date()) == []


def test_weekly_cohorts_use_local_days() -> None:
    # Sunday 4 January 23:30 UTC is Monday 5 January 01:30 in Jerusalem: the week of the 5th.
    h = history("X", [datetime(2026, 1, 4, 23, 30, tzinfo=UTC), d(2026, 1, 13)])
    (cohort,) = cohorts(
        [h], date(2026, 1, 1), date(2026, 1, 31), Granularity.WEEK, JERUSALEM, date(2026, 1, 20)
    )
    assert cohort.start == date(2026, 1, 5)
    assert cohort.active == (1, 1, 0)


def test_win_back_by_reason() -> None:
    q1 = period(date(2026, 1, 1), date(2026, 3, 31), JERUSALEM)
    result = win_back(customers(), q1, WIN_BACK, NOW)
    # Episodes: C 5 Jan service (back 10 Mar), E 20 Jan price (the 25 Jan one is the same
    # departure), A 10 Feb price. Neither A nor E is back, and both windows are still open.
    assert {r: (w.episodes, w.won_back, w.pending) for r, w in result.items()} == {
        "all": (3, 1, 2),
        "price": (2, 0, 2),
        "service": (1, 1, 0),
    }
    assert result["all"].rate == pytest.approx(1 / 3)
    assert result["price"].rate == 0.0
    assert result["service"].rate == 1.0
    assert win_back([], q1, WIN_BACK, NOW) == {"all": win_back([], q1, WIN_BACK, NOW)["all"]}
    assert win_back([], q1, WIN_BACK, NOW)["all"].rate is None


def test_a_purchase_after_the_window_is_not_a_win_back() -> None:
    h = history("Z", [d(2025, 1, 1), d(2025, 9, 1)], [(d(2025, 2, 1), "price")])
    (episode,) = episodes(h, WIN_BACK, NOW)
    assert episode.won_back_at is None  # 212 days later
    assert not episode.pending
    (episode,) = episodes(h, timedelta(days=212), NOW)
    assert episode.won_back_at == d(2025, 9, 1)


def test_a_second_departure_after_a_return_is_a_new_episode() -> None:
    h = history(
        "Y",
        [d(2025, 1, 1), d(2025, 3, 1)],
        [(d(2025, 2, 1), "price"), (d(2025, 2, 10), "price"), (d(2025, 4, 1), "service")],
    )
    assert [(e.cancelled_at, e.won_back_at) for e in episodes(h, WIN_BACK, NOW)] == [
        (d(2025, 2, 1), d(2025, 3, 1)),
        (d(2025, 4, 1), None),
    ]
