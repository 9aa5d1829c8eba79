"""Reporting periods: local calendar days in the reporting time zone, grouped by day, ISO week
or month. Pure: no I/O, no clock.

Every KPI is attributed to the *local* day (in ``kpi_timezone``) of the moment that defines it
(a ticket's opening, a message's sending, a cancellation), so a ticket opened at 00:30 in
Jerusalem belongs to that day even though it is still the previous day in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo


class Granularity(StrEnum):
    DAY = "day"
    WEEK = "week"  # ISO weeks, Monday to Sunday
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Period:
    """Local days ``first`` .. ``last`` (both included) and the UTC instants bounding them."""

    first: date
    last: date
    start: datetime  # first's local midnight, as an aware UTC instant
    end: datetime  # the local midnight after ``last`` (exclusive)

    def contains(self, at: datetime) -> bool:
        return self.start <= at < self.end


def local_day(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The instant a local day begins (DST-safe: the wall clock reading 00:00, or the first
    instant after it when 00:00 does not exist)."""
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def bucket_start(day: date, granularity: Granularity) -> date:
    if granularity is Granularity.DAY:
        return day
    if granularity is Granularity.WEEK:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_bucket(start: date, granularity: Granularity) -> date:
    if granularity is Granularity.DAY:
        return start + timedelta(days=1)
    if granularity is Granularity.WEEK:
        return start + timedelta(days=7)
    return add_months(start, 1)


def add_months(day: date, months: int) -> date:
    """The first of the month ``months`` after ``day``'s month."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def months_between(first: date, second: date) -> int:
    """Whole calendar months from ``first``'s month to ``second``'s month."""
    return (second.year - first.year) * 12 + second.month - first.month


def period(first: date, last: date, tz: ZoneInfo) -> Period:
    return Period(first, last, local_midnight(first, tz), local_midnight(last + timedelta(days=1), tz))


def buckets(first: date, last: date, granularity: Granularity, tz: ZoneInfo) -> list[Period]:
    """The buckets covering ``first`` .. ``last``; the first and last are clipped to the range."""
    if last < first:
        raise ValueError("last must not be before first")
    out: list[Period] = []
    start = bucket_start(first, granularity)
    while start <= last:
        following = next_bucket(start, granularity)
        out.append(period(max(start, first), min(following - timedelta(days=1), last), tz))
        start = following
    return out
