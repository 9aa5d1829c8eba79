"""When a marketing message may reach the customer: quiet hours and days of rest. Pure.

Everything is judged on the customer's own wall clock (their IANA time zone):

- Nightly quiet hours, by default 21:00 to 09:00 local. ``start == end`` means no nightly quiet
  hours; ``start > end`` wraps over midnight.
- Days of rest, as weekly windows (weekday + time to weekday + time, wrapping over the week):
  ``rest`` applies to everyone, ``rest_by_locale`` adds windows by the customer's locale,
  matched on the whole tag first (``he-IL``), then on its language (``he``). Defaults:

  - ``he``: Friday 14:00 to Saturday 20:30, Shabbat. It starts well before the earliest candle
    lighting of the year (about 16:00 in December) so nothing lands during Friday's
    preparations, and ends after the latest end of Shabbat (about 20:30 in late June).
  - ``ar``: Friday 11:00 to 14:00, the Friday prayer.

A window that opens at a wall time the clock skips (the spring-forward gap) opens at the
transition itself, the first instant whose wall time is past it; a wall time that happens twice
(fall back) opens at its first occurrence after ``now``.

Instants are returned in UTC: two datetimes that share a ``ZoneInfo`` compare and subtract as
wall clocks, which is wrong across a DST change; format them in the customer's zone for display.

That only marketing is held (transactional goes at once) is decided in ``decision.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from enum import IntEnum
from functools import lru_cache
from typing import Annotated, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.core import get_global
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.events import current_language

DAY = timedelta(days=1)
WEEK = timedelta(days=7)


class Weekday(IntEnum):
    """As ``datetime.weekday()``; JSON carries the number."""

    MONDAY = 0
    TUESDAY = 1
    WEDNESDAY = 2
    THURSDAY = 3
    FRIDAY = 4
    SATURDAY = 5
    SUNDAY = 6


def _as_delta(t: time) -> timedelta:
    return timedelta(hours=t.hour, minutes=t.minute, seconds=t.second, microseconds=t.microsecond)


def _week_position(weekday: Weekday, t: time) -> timedelta:
    return weekday * DAY + _as_delta(t)


def _naive(value: time) -> time:
    if value.tzinfo is not None:
        raise ValueError("a local wall time, without a time zone (the customer's zone applies)")
    return value


WallTime = Annotated[time, AfterValidator(_naive)]


class RestWindow(BaseModel):
    """A weekly window on the customer's wall clock, e.g. Friday 14:00 → Saturday 20:30."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_weekday: Weekday
    start_time: WallTime
    end_weekday: Weekday
    end_time: WallTime

    @classmethod
    def of(cls, start_weekday: Weekday, start_time: time, end_weekday: Weekday, end_time: time) -> Self:
        return cls(
            start_weekday=start_weekday, start_time=start_time, end_weekday=end_weekday, end_time=end_time
        )

    @property
    def start(self) -> timedelta:
        return _week_position(self.start_weekday, self.start_time)

    @property
    def end(self) -> timedelta:
        return _week_position(self.end_weekday, self.end_time)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("a rest window must not start and end at the same moment of the week")
        return self

    def until(self, position: timedelta) -> timedelta | None:
        """How long from ``position`` (in the week) until the window ends; None when outside."""
        start, end = self.start, self.end
        inside = start <= position < end if start < end else position >= start or position < end
        return (end - position) % WEEK if inside else None


DEFAULT_REST_BY_LOCALE: dict[str, list[RestWindow]] = {
    "he": [RestWindow.of(Weekday.FRIDAY, time(14), Weekday.SATURDAY, time(20, 30))],
    "ar": [RestWindow.of(Weekday.FRIDAY, time(11), Weekday.FRIDAY, time(14))],
}


def _normalise_locale(tag: str) -> str:
    language, sep, rest = tag.strip().replace("_", "-").lower().partition("-")
    return current_language(language) + sep + rest


class QuietHours(BaseModel):
    """When marketing is held (rules: module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: WallTime = time(21)
    end: WallTime = time(9)
    rest: list[RestWindow] = Field(default_factory=list)
    rest_by_locale: dict[str, list[RestWindow]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_REST_BY_LOCALE.items()}
    )

    @field_validator("rest_by_locale")
    @classmethod
    def _locale_keys(cls, value: dict[str, list[RestWindow]]) -> dict[str, list[RestWindow]]:
        normalised = {_normalise_locale(k): v for k, v in value.items()}
        if len(normalised) != len(value):
            raise ValueError("two keys name the same locale")
        if any(not k for k in normalised):
            raise ValueError("a locale key must not be empty")
        return normalised

    @model_validator(mode="after")
    def _leaves_time_to_send(self) -> Self:
        for key, extra in [("every locale", []), *self.rest_by_locale.items()]:
            windows = [*self.rest, *extra]
            # Every stretch of open time begins where some window ends, so checking the ends
            # is enough to know whether any open time is left.
            ends = [w.end for w in windows]
            if self.start != self.end:
                ends += [_week_position(Weekday(d), self.end) for d in range(7)]
            if ends and all(self.quiet_span(p, windows) is not None for p in ends):
                raise ValueError(f"quiet hours and rest windows leave no time to send ({key})")
        return self

    def windows_for(self, locale: str | None) -> list[RestWindow]:
        if not locale:
            return list(self.rest)
        tag = _normalise_locale(locale)
        extra = self.rest_by_locale.get(tag)
        if extra is None:
            extra = self.rest_by_locale.get(tag.split("-", 1)[0], [])
        return [*self.rest, *extra]

    def quiet_span(self, position: timedelta, windows: Iterable[RestWindow]) -> timedelta | None:
        """How long the quiet time holding ``position`` (in the week) lasts; None when open."""
        spans = [d for w in windows if (d := w.until(position)) is not None]
        if self.start != self.end:
            t = position % DAY
            start, end = _as_delta(self.start), _as_delta(self.end)
            if start < end and start <= t < end:
                spans.append(end - t)
            elif start > end and (t >= start or t < end):
                spans.append((end - t) % DAY)
        # Windows holding the same moment overlap, so the quiet time lasts as long as the longest.
        return max(spans, default=None)


def _offset(posix: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(posix, tz).utcoffset()


def wall_to_instant(wall: datetime, tz: ZoneInfo, not_before: datetime | None = None) -> datetime:
    """The first instant (at or after ``not_before``) at which the clock in ``tz`` shows
    ``wall`` (naive) or, when the clock skips ``wall``, the transition that skips it. In UTC."""
    if wall.tzinfo is not None:
        raise ValueError("wall must be a naive local date and time")
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) != wall:
        # In a gap fold=1 reads the wall time with the later offset (an instant before the
        # transition) and fold=0 with the earlier one (after it); the transition lies between.
        # Transitions fall on whole seconds, so a search over POSIX seconds finds it exactly.
        lo, hi = sorted((int(first.timestamp()), int(second.timestamp())))
        after = _offset(hi, tz)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _offset(mid, tz) == after:
                hi = mid
            else:
                lo = mid
        return datetime.fromtimestamp(hi, UTC)
    floor = None if not_before is None else not_before.astimezone(UTC)
    for instant in sorted({first, second}):
        if floor is None or instant >= floor:
            return instant
    return max(first, second)


def start_of_day(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of the local date ``day`` in ``tz`` (midnight, or the transition when
    the clock skips midnight). In UTC."""
    return wall_to_instant(datetime.combine(day, time()), tz)


def quiet_until(at: datetime, tz: ZoneInfo, locale: str | None, config: QuietHours) -> datetime | None:
    """The naive local wall time at which the quiet time holding ``at`` ends, None when open."""
    wall = at.astimezone(tz).replace(tzinfo=None)
    position = _week_position(Weekday(wall.weekday()), wall.time())
    span = config.quiet_span(position, config.windows_for(locale))
    return None if span is None else wall + span


def is_quiet(at: datetime, tz: ZoneInfo, locale: str | None, config: QuietHours) -> bool:
    return quiet_until(at, tz, locale, config) is not None


def next_send_time(now: datetime, tz: ZoneInfo, locale: str | None, config: QuietHours) -> datetime:
    """``now`` when a marketing message may go now, else the first instant the window opens
    (a rest window that begins as the night ends, or the night that follows a rest window, is
    skipped too), in UTC."""
    at = now
    # The validator guarantees open time every week; each step ends at least one window.
    for _ in range(64):
        until = quiet_until(at, tz, locale, config)
        if until is None:
            return at
        at = wall_to_instant(until, tz, not_before=at)
    raise AssertionError("quiet hours never end")  # pragma: no cover - excluded by validation


def next_send_time_everywhere(
    now: datetime,
    zones: Sequence[ZoneInfo],
    locale: str | None,
    config: QuietHours,
    fallback: ZoneInfo | None = None,
) -> datetime:
    """``next_send_time`` in every one of ``zones`` at once: the first instant from ``now`` that
    is open on each of their wall clocks (a customer who may be in any of them). In UTC. If the
    zones share no open time within a week and a day (a country spanning more hours than the
    day leaves open, as Antarctica's), ``fallback``'s (else the first zone's) ``next_send_time``."""
    if len(zones) == 1:
        return next_send_time(now, zones[0], locale, config)
    at = now
    # Each step moves to the end of a quiet time in some zone; shared open time stops it, and
    # every weekly pattern has shown itself within eight days.
    while at - now <= WEEK + DAY:
        later = max(next_send_time(at, zone, locale, config) for zone in zones)
        if later == at:
            return at
        at = later
    return next_send_time(now, fallback or zones[0], locale, config)


def region_zones(timezone: str | None, locale: str | None) -> tuple[ZoneInfo, ...]:
    """The zones a customer may be in when their profile names no zone of its own and their
    locale's region has several (en-US: New York to Honolulu), one per way of keeping time;
    empty otherwise. Quiet hours hold in each of them: the business's zone, which stands in
    for a region of one zone, put 02:30 in New York in Jerusalem's open day."""
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            pass
        else:
            return ()
    if not locale:
        return ()
    for part in _normalise_locale(locale).split("-")[1:]:
        if len(part) == 2 and part.isalpha():
            return _zones_of_region(part.upper())
    return ()


# Two instants that tell a zone's standard time from its summer time, north and south.
_SEASONS = (datetime(2026, 1, 15, 12, tzinfo=UTC), datetime(2026, 7, 15, 12, tzinfo=UTC))


def _zones_of_region(region: str) -> tuple[ZoneInfo, ...]:
    zones = _ways_of_keeping_time(region)
    return zones if len(zones) > 1 else ()


@lru_cache(maxsize=256)
def _ways_of_keeping_time(region: str) -> tuple[ZoneInfo, ...]:
    """One of CLDR's zones of ``region`` per way of keeping time (offsets in January and July)."""
    names: Sequence[str] = get_global("territory_zones").get(region, ())
    kept: dict[tuple[timedelta | None, ...], ZoneInfo] = {}
    for name in names:
        try:
            zone = ZoneInfo(str(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue
        kept.setdefault(tuple(at.astimezone(zone).utcoffset() for at in _SEASONS), zone)
    return tuple(kept.values())


@lru_cache(maxsize=256)
def _zone_of_region(region: str) -> str | None:
    """The region's zone, if it keeps one time (Argentina's several names, Germany's two)."""
    zones = _ways_of_keeping_time(region.upper())
    return zones[0].key if len(zones) == 1 else None


@lru_cache(maxsize=256)
def _likely_region(language: str) -> str | None:
    """CLDR's likely region of a bare language: he → IL, ar → EG, en → US."""
    likely: str | None = get_global("likely_subtags").get(language.lower())
    region = likely.split("_")[-1] if likely else ""
    return region if len(region) == 2 and region.isalpha() else None


def customer_zone(timezone: str | None, locale: str | None, default: str | None = None) -> ZoneInfo:
    """The customer's zone: the profile's, else the only zone of the locale's region (he-IL →
    Asia/Jerusalem; en-US has several, so no guess), else ``default`` (the business's, when
    configured), else the only zone of the language's likely region (he → Asia/Jerusalem, ar
    → Africa/Cairo), else UTC. Quiet hours in UTC would wake an Israeli customer whose profile
    says only "he" at 22:00."""
    names = [timezone]
    likely: list[str | None] = []
    if locale:
        parts = _normalise_locale(locale).split("-")
        names += [_zone_of_region(p) for p in parts[1:] if len(p) == 2 and p.isalpha()]
        region = _likely_region(parts[0])
        likely.append(None if region is None else _zone_of_region(region))
    for name in [*names, default, *likely]:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")
