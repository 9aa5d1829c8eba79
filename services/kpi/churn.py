"""Churn, cohort retention and win-back, from purchase and cancellation facts. Pure.

Definitions (docs/kpis.md, "Churn"), for a period [s, e) and a churn window of W days:

* contractual: active at s = bought before s, and no cancellation since the last purchase
  before s (at or after it, before s). Churned in the period = active at s and cancelled in
  [s, e). A purchase after a cancellation makes the customer active again (won back);
* non-contractual: active at s = the last purchase before s is less than W before s. The
  customer lapses W after a purchase not followed by another within W; churned in the period
  = active at s and the first lapse after s falls in [s, e) and has already happened (<= now);
* churn rate = churned in the period / active at its start (None when nobody was active).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from services.kpi.periods import Granularity, Period, bucket_start, local_day
from services.kpi.stats import ratio

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CustomerHistory:
    customer_id: str
    purchases: tuple[datetime, ...]  # sorted
    cancellations: tuple[tuple[datetime, str], ...] = ()  # (at, reason), sorted
    tier: str | None = None


def history(
    customer_id: str,
    purchases: Iterable[datetime],
    cancellations: Iterable[tuple[datetime, str]] = (),
    tier: str | None = None,
) -> CustomerHistory:
    return CustomerHistory(customer_id, tuple(sorted(purchases)), tuple(sorted(cancellations)), tier)


def _last_purchase_before(h: CustomerHistory, at: datetime) -> datetime | None:
    i = bisect_left(h.purchases, at)
    return h.purchases[i - 1] if i else None


def active_contractual(h: CustomerHistory, at: datetime) -> bool:
    last = _last_purchase_before(h, at)
    if last is None:
        return False
    return not any(last <= c_at < at for c_at, _ in h.cancellations)


def contractual_churn(h: CustomerHistory, p: Period) -> str | None:
    """The reason of the first cancellation in the period if the customer churned in it."""
    if not active_contractual(h, p.start):
        return None
    return next((reason for c_at, reason in h.cancellations if p.start <= c_at < p.end), None)


def active_non_contractual(h: CustomerHistory, at: datetime, window: timedelta) -> bool:
    last = _last_purchase_before(h, at)
    return last is not None and at - last < window


def first_lapse_after(h: CustomerHistory, at: datetime, window: timedelta) -> datetime | None:
    """When a customer active at ``at`` next goes ``window`` without a purchase."""
    i = bisect_left(h.purchases, at)
    if not i:
        return None
    current = h.purchases[i - 1]
    for following in h.purchases[i:]:
        if following - current >= window:
            break
        current = following
    return current + window


def non_contractual_churn(h: CustomerHistory, p: Period, window: timedelta, now: datetime) -> bool:
    if not active_non_contractual(h, p.start, window):
        return False
    lapse = first_lapse_after(h, p.start, window)
    return lapse is not None and lapse < p.end and lapse <= now


@dataclass(frozen=True, slots=True)
class ChurnCount:
    active_at_start: int
    churned: int
    rate: float | None


def _count(active: int, churned: int) -> ChurnCount:
    return ChurnCount(active, churned, ratio(churned, active))


@dataclass(frozen=True, slots=True)
class PeriodChurn:
    period: Period
    contractual: ChurnCount
    non_contractual: ChurnCount
    # Contractual churn split by cancellation reason; each rate is over all active at start,
    # so the reasons' rates add up to the contractual rate.
    contractual_by_reason: dict[str, ChurnCount] = field(default_factory=dict)
    # Per tier (the customer's latest known tier): both kinds, over that tier's active.
    contractual_by_tier: dict[str, ChurnCount] = field(default_factory=dict)
    non_contractual_by_tier: dict[str, ChurnCount] = field(default_factory=dict)


def churn(
    histories: Sequence[CustomerHistory], periods: Sequence[Period], window: timedelta, now: datetime
) -> list[PeriodChurn]:
    out: list[PeriodChurn] = []
    for p in periods:
        c_active: dict[str, int] = {}
        c_churned: dict[str, int] = {}
        n_active: dict[str, int] = {}
        n_churned: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for h in histories:
            tier = h.tier or UNKNOWN
            if active_contractual(h, p.start):
                c_active[tier] = c_active.get(tier, 0) + 1
                reason = contractual_churn(h, p)
                if reason is not None:
                    c_churned[tier] = c_churned.get(tier, 0) + 1
                    reasons[reason] = reasons.get(reason, 0) + 1
            if active_non_contractual(h, p.start, window):
                n_active[tier] = n_active.get(tier, 0) + 1
                if non_contractual_churn(h, p, window, now):
                    n_churned[tier] = n_churned.get(tier, 0) + 1
        c_total = sum(c_active.values())
        out.append(
            PeriodChurn(
                period=p,
                contractual=_count(c_total, sum(c_churned.values())),
                non_contractual=_count(sum(n_active.values()), sum(n_churned.values())),
                contractual_by_reason={r: _count(c_total, n) for r, n in sorted(reasons.items())},
                contractual_by_tier={t: _count(n, c_churned.get(t, 0)) for t, n in sorted(c_active.items())},
                non_contractual_by_tier={
                    t: _count(n, n_churned.get(t, 0)) for t, n in sorted(n_active.items())
                },
            )
        )
    return out


# --------------------------------------------------------------------------- cohorts


@dataclass(frozen=True, slots=True)
class Cohort:
    start: date  # the bucket of the first purchase (local day)
    size: int
    active: tuple[int, ...]  # customers with a purchase in bucket start + k, k = 0, 1, ...
    retention: tuple[float, ...]  # active[k] / size


def _bucket_index(cohort: date, day: date, granularity: Granularity) -> int:
    if granularity is Granularity.MONTH:
        return (day.year - cohort.year) * 12 + day.month - cohort.month
    days = (day - cohort).days
    return days if granularity is Granularity.DAY else days // 7


def cohorts(
    histories: Iterable[CustomerHistory],
    first: date,
    last: date,
    granularity: Granularity,
    tz: ZoneInfo,
    today: date,
) -> list[Cohort]:
    """Retention by cohort of first purchase (bucket of the first purchase's local day) for the
    cohorts starting in ``first`` .. ``last``, through the bucket containing ``today``."""
    lowest = bucket_start(first, granularity)
    members: dict[date, list[set[int]]] = {}
    sizes: dict[date, int] = {}
    current = bucket_start(today, granularity)
    for h in histories:
        if not h.purchases:
            continue
        start = bucket_start(local_day(h.purchases[0], tz), granularity)
        if not lowest <= start <= last:
            continue
        sizes[start] = sizes.get(start, 0) + 1
        seen = {_bucket_index(start, local_day(at, tz), granularity) for at in h.purchases}
        members.setdefault(start, []).append(seen)
    out: list[Cohort] = []
    for start in sorted(sizes):
        horizon = _bucket_index(start, current, granularity)
        active = tuple(sum(1 for seen in members[start] if k in seen) for k in range(horizon + 1))
        out.append(Cohort(start, sizes[start], active, tuple(n / sizes[start] for n in active)))
    return out


# --------------------------------------------------------------------------- win-back


@dataclass(frozen=True, slots=True)
class ChurnEpisode:
    customer_id: str
    cancelled_at: datetime
    reason: str
    won_back_at: datetime | None  # first purchase within the win-back window, if any
    pending: bool  # not back yet, window still open


def episodes(h: CustomerHistory, window: timedelta, now: datetime) -> list[ChurnEpisode]:
    """A cancellation starts a churn episode unless the customer had already cancelled and not
    bought since (a second cancellation of a gone customer is the same departure)."""
    out: list[ChurnEpisode] = []
    previous: datetime | None = None
    for at, reason in h.cancellations:
        if previous is not None and bisect_right(h.purchases, at) == bisect_right(h.purchases, previous):
            continue  # no purchase in (previous, at]
        previous = at
        i = bisect_right(h.purchases, at)
        back = h.purchases[i] if i < len(h.purchases) and h.purchases[i] <= at + window else None
        out.append(ChurnEpisode(h.customer_id, at, reason, back, back is None and at + window > now))
    return out


@dataclass(frozen=True, slots=True)
class WinBack:
    episodes: int
    won_back: int
    pending: int
    rate: float | None  # won_back / episodes


def win_back(
    histories: Iterable[CustomerHistory], p: Period, window: timedelta, now: datetime
) -> dict[str, WinBack]:
    """Per cancellation reason (and ``all``): episodes that began in the period, and how many
    came back (a purchase within ``window`` after the cancellation)."""
    found = [e for h in histories for e in episodes(h, window, now) if p.contains(e.cancelled_at)]
    out: dict[str, WinBack] = {}
    for reason in ["all", *sorted({e.reason for e in found})]:
        chosen = [e for e in found if reason in ("all", e.reason)]
        won = sum(1 for e in chosen if e.won_back_at is not None)
        out[reason] = WinBack(len(chosen), won, sum(1 for e in chosen if e.pending), ratio(won, len(chosen)))
    return out
