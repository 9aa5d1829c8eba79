"""Churn, cohort retention and win-back, from purchase and cancellation facts. Pure.

Definitions (docs/kpis.md, "Churn"), for a period [s, e) and a churn window of W days:

* contractual: active at s = bought before s, and no cancellation since the last purchase
  before s (at or after it, before s). Churned in the period = active at s and cancelled in
  [s, e). A purchase after a cancellation makes the customer active again (won back);
* lapsed (the non-contractual window alone): active at s = the last purchase before s is less
  than W before s. The customer lapses W after a purchase not followed by another within W;
  lapsed in the period = active at s and the first lapse after s falls in [s, e) and has
  already happened (<= now);
* non-contractual: active at s as for lapsed; churned in the period = lapsed in it, and the
  customer's BG/NBD P(alive) at that lapse is below the threshold (``AliveTest``);
* churn rate = churned in the period / active at its start (None when nobody was active).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from services.kpi.clv import BgNbdParams, p_alive
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


def lapse_in(h: CustomerHistory, p: Period, window: timedelta, now: datetime) -> datetime | None:
    """The lapse of a customer active at the period's start, if it falls in the period and has
    already happened."""
    if not active_non_contractual(h, p.start, window):
        return None
    lapse = first_lapse_after(h, p.start, window)
    return lapse if lapse is not None and lapse < p.end and lapse <= now else None


@dataclass(frozen=True, slots=True)
class AliveTest:
    """The second condition of non-contractual churn: P(alive) at the lapse below ``threshold``.

    P(alive) is the BG/NBD's ([FHL05] eq. 13) with ``params``, on the customer's purchases before
    the lapse instant, by local day as the CLV model sees them: x = purchase days − 1, t_x =
    weeks from the first to the last purchase day, T = weeks from the first purchase day to the
    lapse's local day.
    """

    params: BgNbdParams
    threshold: float
    tz: ZoneInfo

    def p_alive_at(self, h: CustomerHistory, at: datetime) -> float:
        days = sorted(
            {local_day(t, self.tz).toordinal() for t in h.purchases[: bisect_left(h.purchases, at)]}
        )
        if not days:
            return 1.0
        first = days[0]
        value = p_alive(
            self.params,
            len(days) - 1,
            (days[-1] - first) / 7.0,
            (local_day(at, self.tz).toordinal() - first) / 7.0,
        )
        return float(value)

    def gone(self, h: CustomerHistory, at: datetime) -> bool:
        """Below the threshold; a P(alive) that is not a number (a degenerate fit) is not."""
        value = self.p_alive_at(h, at)
        return math.isfinite(value) and value < self.threshold


def non_contractual_churn(
    h: CustomerHistory, p: Period, window: timedelta, now: datetime, alive: AliveTest
) -> bool:
    lapse = lapse_in(h, p, window, now)
    return lapse is not None and alive.gone(h, lapse)


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
    # The non-contractual window alone (no purchase for W).
    lapsed: ChurnCount
    # Lapsed and P(alive) at the lapse below the threshold; None without a fitted model.
    non_contractual: ChurnCount | None
    # Contractual churn split by cancellation reason; each rate is over all active at start,
    # so the reasons' rates add up to the contractual rate.
    contractual_by_reason: dict[str, ChurnCount] = field(default_factory=dict)
    # Per tier (the customer's latest known tier): each kind over that tier's active.
    contractual_by_tier: dict[str, ChurnCount] = field(default_factory=dict)
    lapsed_by_tier: dict[str, ChurnCount] = field(default_factory=dict)
    non_contractual_by_tier: dict[str, ChurnCount] = field(default_factory=dict)


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class _Spell:
    """A stretch of one kind of activity: active at s exactly when ``begin < s`` and ``s``
    is before ``end`` (contractual: ``s <= end``, the cancellation; non-contractual: ``s < end``,
    the lapse); ``end`` None: still active."""

    history: CustomerHistory
    begin: datetime
    end: datetime | None
    reason: str = ""  # contractual: the cancellation's


def contractual_spells(h: CustomerHistory) -> list[_Spell]:
    """Active from a purchase (after it) through the first cancellation at or after it; again
    from the first purchase after that cancellation. The same instants as ``active_contractual``:
    at s the last purchase before s has no cancellation in [it, s)."""
    out: list[_Spell] = []
    i = 0
    while i < len(h.purchases):
        begin = h.purchases[i]
        j = bisect_left(h.cancellations, (begin,))  # the first cancellation at or after it
        if j == len(h.cancellations):
            out.append(_Spell(h, begin, None))
            break
        end, reason = h.cancellations[j]
        out.append(_Spell(h, begin, end, reason))
        i = bisect_right(h.purchases, end)  # a purchase at the cancellation's instant is in it
    return out


def lapse_spells(h: CustomerHistory, window: timedelta) -> list[_Spell]:
    """Purchases each less than ``window`` after the one before: active after the first until
    ``window`` after the last, its lapse (``first_lapse_after`` of any instant inside)."""
    if not h.purchases:
        return []
    out: list[_Spell] = []
    begin = last = h.purchases[0]
    for at in h.purchases[1:]:
        if at - last >= window:
            out.append(_Spell(h, begin, last + window))
            begin = at
        last = at
    out.append(_Spell(h, begin, last + window))
    return out


class _Spells:
    """One tier's spells, sorted for counting those active at an instant and those ending in a
    period: O(log n) and O(ending) per period, where asking each customer cost O(customers)
    per period (a daily table over three years of 20,000 customers: 76 s on the event loop)."""

    def __init__(self, spells: Sequence[_Spell]) -> None:
        self.begins = sorted(s.begin for s in spells)
        ended = [(s.end, s) for s in spells if s.end is not None]
        ended.sort(key=lambda pair: pair[0])
        self.ends = [end for end, _ in ended]
        self.by_end = [s for _, s in ended]

    def active(self, at: datetime, *, through_end: bool) -> int:
        # Begun before ``at``, less those over by then (every spell over by then began before).
        over = bisect_left(self.ends, at) if through_end else bisect_right(self.ends, at)
        return bisect_left(self.begins, at) - over

    def ending(self, p: Period, *, through_end: bool) -> list[_Spell]:
        """Spells active at the period's start that end in it."""
        lo = bisect_left(self.ends, p.start) if through_end else bisect_right(self.ends, p.start)
        hi = bisect_left(self.ends, p.end)
        return [s for s in self.by_end[lo:hi] if s.begin < p.start]


def churn(
    histories: Sequence[CustomerHistory],
    periods: Sequence[Period],
    window: timedelta,
    now: datetime,
    alive: AliveTest | None = None,
) -> list[PeriodChurn]:
    """Churn per period; without ``alive`` (no fitted model yet) non-contractual churn is None.
    Counted from each customer's spells of activity, which ``active_contractual``,
    ``contractual_churn`` and ``lapse_in`` define instant by instant (a test holds them equal)."""
    by_tier_c: dict[str, list[_Spell]] = {}
    by_tier_n: dict[str, list[_Spell]] = {}
    for h in histories:
        tier = h.tier or UNKNOWN
        by_tier_c.setdefault(tier, []).extend(contractual_spells(h))
        by_tier_n.setdefault(tier, []).extend(lapse_spells(h, window))
    contractual = {t: _Spells(spells) for t, spells in by_tier_c.items()}
    lapsing = {t: _Spells(spells) for t, spells in by_tier_n.items()}
    gone: dict[tuple[str, datetime], bool] = {}  # the periods overlap (a total and its buckets)
    out: list[PeriodChurn] = []
    for p in periods:
        c_active: dict[str, int] = {}
        c_churned: dict[str, int] = {}
        n_active: dict[str, int] = {}
        lapsed: dict[str, int] = {}
        n_churned: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for tier, spells in contractual.items():
            if n := spells.active(p.start, through_end=True):
                c_active[tier] = n
            for spell in spells.ending(p, through_end=True):
                _bump(c_churned, tier)
                _bump(reasons, spell.reason)
        for tier, spells in lapsing.items():
            if n := spells.active(p.start, through_end=False):
                n_active[tier] = n
            for spell in spells.ending(p, through_end=False):
                lapse = spell.end
                if lapse is None or lapse > now:
                    continue
                _bump(lapsed, tier)
                if alive is not None:
                    key = (spell.history.customer_id, lapse)
                    if key not in gone:
                        gone[key] = alive.gone(spell.history, lapse)
                    if gone[key]:
                        _bump(n_churned, tier)
        c_total = sum(c_active.values())
        n_total = sum(n_active.values())
        out.append(
            PeriodChurn(
                period=p,
                contractual=_count(c_total, sum(c_churned.values())),
                lapsed=_count(n_total, sum(lapsed.values())),
                non_contractual=None if alive is None else _count(n_total, sum(n_churned.values())),
                contractual_by_reason={r: _count(c_total, n) for r, n in sorted(reasons.items())},
                contractual_by_tier={t: _count(n, c_churned.get(t, 0)) for t, n in sorted(c_active.items())},
                lapsed_by_tier={t: _count(n, lapsed.get(t, 0)) for t, n in sorted(n_active.items())},
                non_contractual_by_tier=(
                    {}
                    if alive is None
                    else {t: _count(n, n_churned.get(t, 0)) for t, n in sorted(n_active.items())}
                ),
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
    [found] = win_backs(histories, [p], window, now)
    return found


def win_backs(
    histories: Iterable[CustomerHistory], periods: Sequence[Period], window: timedelta, now: datetime
) -> list[dict[str, WinBack]]:
    """``win_back`` of each period, the customers' episodes found once."""
    found = sorted((e for h in histories for e in episodes(h, window, now)), key=lambda e: e.cancelled_at)
    starts = [e.cancelled_at for e in found]
    return [_won_back(found[bisect_left(starts, p.start) : bisect_left(starts, p.end)]) for p in periods]


def _won_back(found: Sequence[ChurnEpisode]) -> dict[str, WinBack]:
    out: dict[str, WinBack] = {}
    for reason in ["all", *sorted({e.reason for e in found})]:
        chosen = [e for e in found if reason in ("all", e.reason)]
        won = sum(1 for e in chosen if e.won_back_at is not None)
        out[reason] = WinBack(len(chosen), won, sum(1 for e in chosen if e.pending), ratio(won, len(chosen)))
    return out
