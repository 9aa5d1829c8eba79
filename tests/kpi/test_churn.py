"""Churn, cohort retention and win-back against answers computed by hand (docs/kpis.md, "Churn").

Months are local to Asia/Jerusalem: March 2026 starts at 2026-02-28 22:00 UTC.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kpi.churn import (
    UNKNOWN,
    AliveTest,
    ChurnCount,
    CustomerHistory,
    PeriodChurn,
    active_contractual,
    active_non_contractual,
    churn,
    cohorts,
    contractual_churn,
    episodes,
    first_lapse_after,
    history,
    lapse_in,
    non_contractual_churn,
    win_back,
)
from services.kpi.clv import BgNbdParams
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
    assert (jan.lapsed.active_at_start, jan.lapsed.churned, jan.lapsed.rate) == (3, 0, 0.0)
    # February: A cancels (of A, B); C lapses on the 18th (of A, C, E).
    assert (feb.contractual.active_at_start, feb.contractual.churned, feb.contractual.rate) == (2, 1, 0.5)
    assert list(feb.contractual_by_reason) == ["price"]
    assert (feb.lapsed.active_at_start, feb.lapsed.churned) == (3, 1)
    assert feb.lapsed.rate == pytest.approx(1 / 3)
    # March: nobody cancels (of B, D); E lapses on 1 March 12:00 local (of A, D, E).
    assert (mar.contractual.active_at_start, mar.contractual.churned, mar.contractual.rate) == (2, 0, 0.0)
    assert (mar.lapsed.active_at_start, mar.lapsed.churned) == (3, 1)
    # Without a fitted model P(alive) is unknown: no non-contractual churn figure at all.
    assert [m.non_contractual for m in (jan, feb, mar)] == [None, None, None]


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
    assert before.lapsed.churned == 0
    assert after.lapsed.churned == 1


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
    assert feb.lapsed.churned == 0


def test_empty_periods() -> None:
    results = churn([], MONTHS, WINDOW, NOW)
    assert all(r.contractual.rate is None and r.lapsed.rate is None for r in results)
    with_model = churn([], MONTHS, WINDOW, NOW, AliveTest(UNIT, 0.3, JERUSALEM))
    assert all(r.non_contractual is not None and r.non_contractual.rate is None for r in with_model)
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


# --- non-contractual churn: lapsed and P(alive) at the lapse below the threshold -------------------
#
# BG/NBD with r = alpha = a = b = 1, so P(alive) = 1 / (1 + [x > 0] / x * ((1 + T) / (1 + t_x))^(1 + x))
# (a / (b + x - 1) = 1 / x). Purchases at 12:00 UTC (14:00 local): local days are UTC days.

UNIT = BgNbdParams(r=1.0, alpha=1.0, a=1.0, b=1.0)


def noon(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, 12, tzinfo=UTC)


def lapsing_in_march() -> list[CustomerHistory]:
    loyal_last = noon(2025, 12, 10)
    return [
        # Weekly pair, then silence: lapses 8 March 12:00 UTC. x = 1, t_x = 1 week,
        # T = 1 Dec → 8 Mar = 97 days: P = 1 / (1 + ((1 + 97/7) / 2)^2) = 1 / (1 + (52/7)^2) = 49/2753.
        history("R", [noon(2025, 12, 1), noon(2025, 12, 8)], tier="gold"),
        # Eleven purchases 80 days apart (never a 90-day gap), the last on 10 December: lapses
        # 10 March. x = 10, t_x = 800/7, T = 890/7: P = 1 / (1 + 0.1 * (897/807)^11) = 0.757594.
        history("L", [loyal_last - timedelta(days=80 * k) for k in range(11)], tier="gold"),
        # One purchase: lapses 5 March with x = 0, and P(alive) = 1 in the BG/NBD.
        history("O", [noon(2025, 12, 5)], tier="bronze"),
    ]


MARCH = MONTHS[2]


def test_p_alive_at_the_lapse_by_hand() -> None:
    alive = AliveTest(UNIT, 0.3, JERUSALEM)
    r, loyal, once = lapsing_in_march()
    assert lapse_in(r, MARCH, WINDOW, NOW) == noon(2026, 3, 8)
    assert lapse_in(loyal, MARCH, WINDOW, NOW) == noon(2026, 3, 10)
    assert lapse_in(once, MARCH, WINDOW, NOW) == noon(2026, 3, 5)
    assert alive.p_alive_at(r, noon(2026, 3, 8)) == pytest.approx(49 / 2753, rel=1e-12)
    assert alive.p_alive_at(loyal, noon(2026, 3, 10)) == pytest.approx(1 / (1 + 0.1 * (897 / 807) ** 11))
    assert alive.p_alive_at(once, noon(2026, 3, 5)) == 1.0
    assert [non_contractual_churn(h, MARCH, WINDOW, NOW, alive) for h in (r, loyal, once)] == [
        True,
        False,
        False,
    ]


def test_p_alive_counts_only_purchases_before_the_lapse() -> None:
    # R comes back on 20 March: the 8 March lapse still happened, judged on what came before it.
    r = lapsing_in_march()[0]
    back = history("R", [*r.purchases, noon(2026, 3, 20)])
    alive = AliveTest(UNIT, 0.3, JERUSALEM)
    assert lapse_in(back, MARCH, WINDOW, NOW) == noon(2026, 3, 8)
    assert alive.p_alive_at(back, noon(2026, 3, 8)) == pytest.approx(49 / 2753, rel=1e-12)


def test_non_contractual_churn_needs_both_conditions() -> None:
    histories = lapsing_in_march()
    (march,) = churn(histories, [MARCH], WINDOW, NOW, AliveTest(UNIT, 0.3, JERUSALEM))
    # All three bought within 90 days before 1 March (local) and lapse in March, before NOW.
    assert (march.lapsed.active_at_start, march.lapsed.churned, march.lapsed.rate) == (3, 3, 1.0)
    # Only R's P(alive) (0.0178) is below 0.3; L (0.7576) and O (1) are probably still customers.
    assert march.non_contractual is not None
    assert (march.non_contractual.active_at_start, march.non_contractual.churned) == (3, 1)
    assert march.non_contractual.rate == pytest.approx(1 / 3)
    assert {t: (c.active_at_start, c.churned) for t, c in march.non_contractual_by_tier.items()} == {
        "bronze": (1, 0),
        "gold": (2, 1),
    }
    assert {t: (c.active_at_start, c.churned) for t, c in march.lapsed_by_tier.items()} == {
        "bronze": (1, 1),
        "gold": (2, 2),
    }
    # Contractual churn does not depend on P(alive).
    assert march.contractual == churn(histories, [MARCH], WINDOW, NOW)[0].contractual


@pytest.mark.parametrize(
    ("threshold", "churned"),
    [(0.0, 0), (0.0177, 0), (0.0179, 1), (0.3, 1), (0.757, 1), (0.758, 2), (1.0, 2)],
)
def test_the_threshold_is_strict_and_configurable(threshold: float, churned: int) -> None:
    (march,) = churn(lapsing_in_march(), [MARCH], WINDOW, NOW, AliveTest(UNIT, threshold, JERUSALEM))
    assert march.non_contractual is not None
    # O (P(alive) = 1) never falls below a threshold of at most 1.
    assert march.non_contractual.churned == churned


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_not_a_number_p_alive_is_not_churn() -> None:
    # A degenerate fit (a, b run off to infinity) gives P(alive) = nan: not below any threshold.
    runaway = AliveTest(BgNbdParams(r=1.0, alpha=1.0, a=math.inf, b=math.inf), 0.3, JERUSALEM)
    r = lapsing_in_march()[0]
    assert math.isnan(runaway.p_alive_at(r, noon(2026, 3, 8)))
    assert not runaway.gone(r, noon(2026, 3, 8))


def test_lapse_days_are_local() -> None:
    # A purchase at 23:30 UTC on 1 December is on 2 December in Jerusalem: t_x = 6 days after
    # 26 November, and its lapse at 23:30 UTC on 1 March is on local 2 March.
    h = history("N", [datetime(2025, 12, 1, 23, 30, tzinfo=UTC), noon(2025, 11, 26)])
    lapse = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    assert lapse_in(h, MARCH, WINDOW, NOW) == lapse
    # x = 1, t_x = 6/7, T = (26 Nov → 2 Mar local = 96 days)/7: P = 1 / (1 + ((103/7) / (13/7))^2).
    assert AliveTest(UNIT, 0.3, JERUSALEM).p_alive_at(h, lapse) == pytest.approx(1 / (1 + (103 / 13) ** 2))


# --- the counts by spells equal the definitions, customer by customer -------------------------------


def _count_of(active: int, churned: int) -> ChurnCount:
    return ChurnCount(active, churned, churned / active if active else None)


def churn_by_definition(
    histories: list[CustomerHistory],
    periods: list[Any],
    window: timedelta,
    now: datetime,
    alive: AliveTest | None,
) -> list[PeriodChurn]:
    """Each customer asked, period by period, with the definitions of docs/kpis.md as written
    (``active_contractual``, ``contractual_churn``, ``active_non_contractual``, ``lapse_in``):
    what ``churn`` counted before it counted spells, and what it must still count."""
    out: list[PeriodChurn] = []
    for p in periods:
        c_active: Counter[str] = Counter()
        c_churned: Counter[str] = Counter()
        n_active: Counter[str] = Counter()
        lapsed: Counter[str] = Counter()
        n_churned: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for h in histories:
            tier = h.tier or UNKNOWN
            if active_contractual(h, p.start):
                c_active[tier] += 1
                reason = contractual_churn(h, p)
                if reason is not None:
                    c_churned[tier] += 1
                    reasons[reason] += 1
            if active_non_contractual(h, p.start, window):
                n_active[tier] += 1
                lapse = lapse_in(h, p, window, now)
                if lapse is not None:
                    lapsed[tier] += 1
                    if alive is not None and alive.gone(h, lapse):
                        n_churned[tier] += 1
        c_total, n_total = sum(c_active.values()), sum(n_active.values())
        out.append(
            PeriodChurn(
                period=p,
                contractual=_count_of(c_total, sum(c_churned.values())),
                lapsed=_count_of(n_total, sum(lapsed.values())),
                non_contractual=None if alive is None else _count_of(n_total, sum(n_churned.values())),
                contractual_by_reason={r: _count_of(c_total, n) for r, n in sorted(reasons.items())},
                contractual_by_tier={t: _count_of(n, c_churned[t]) for t, n in sorted(c_active.items())},
                lapsed_by_tier={t: _count_of(n, lapsed[t]) for t, n in sorted(n_active.items())},
                non_contractual_by_tier=(
                    {}
                    if alive is None
                    else {t: _count_of(n, n_churned[t]) for t, n in sorted(n_active.items())}
                ),
            )
        )
    return out


def _renamed(h: CustomerHistory, customer_id: str) -> CustomerHistory:
    return CustomerHistory(customer_id, h.purchases, h.cancellations, h.tier)


# Instants on a coarse grid (whole days at 22:00 UTC are Jerusalem's midnights in winter), so
# that purchases, cancellations, lapses and period bounds often coincide: the edges.
START = datetime(2025, 12, 31, 22, tzinfo=UTC)
instants = st.integers(min_value=0, max_value=8 * 24).map(lambda h: START + timedelta(hours=12 * h))
histories_st = st.lists(
    st.builds(
        history,
        st.sampled_from(["a", "b", "c", "d"]),
        st.lists(instants, max_size=6),
        st.lists(st.tuples(instants, st.sampled_from(["price", "service", "both"])), max_size=3),
        st.sampled_from([None, "gold", "silver"]),
    ),
    max_size=6,
).map(lambda hs: [_renamed(h, f"{h.customer_id}{i}") for i, h in enumerate(hs)])


@settings(max_examples=300, deadline=None)
@given(
    histories_st,
    st.sampled_from([Granularity.DAY, Granularity.WEEK, Granularity.MONTH]),
    st.integers(min_value=1, max_value=40),
    instants,
    st.booleans(),
)
def test_churn_counts_what_the_definitions_say(
    hs: list[CustomerHistory], granularity: Granularity, window_days: int, now: datetime, model: bool
) -> None:
    first, last = date(2026, 1, 1), date(2026, 4, 30)
    periods = [period(first, last, JERUSALEM), *buckets(first, last, granularity, JERUSALEM)]
    window = timedelta(days=window_days)
    alive = AliveTest(UNIT, 0.5, JERUSALEM) if model else None
    assert churn(hs, periods, window, now, alive) == churn_by_definition(hs, periods, window, now, alive)
