"""Quiet hours and days of rest on the customer's wall clock, across DST changes."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.messenger.quiet import (
    QuietHours,
    RestWindow,
    Weekday,
    customer_zone,
    is_quiet,
    next_send_time,
    next_send_time_everywhere,
    region_zones,
    start_of_day,
    wall_to_instant,
)

JLM = ZoneInfo("Asia/Jerusalem")
NY = ZoneInfo("America/New_York")
DEFAULT = QuietHours()
NO_REST = QuietHours(rest_by_locale={})


def at(
    tz: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_outside_quiet_hours_it_is_now() -> None:
    now = at(JLM, 2026, 6, 2, 12, 0)  # a Tuesday
    assert next_send_time(now, JLM, "he-IL", DEFAULT) is now


def test_the_night_is_held_until_nine() -> None:
    assert next_send_time(at(JLM, 2026, 6, 2, 22, 0), JLM, "he-IL", DEFAULT) == at(JLM, 2026, 6, 3, 9, 0)
    assert next_send_time(at(JLM, 2026, 6, 3, 8, 59), JLM, "he-IL", DEFAULT) == at(JLM, 2026, 6, 3, 9, 0)


def test_the_boundaries_start_closed_and_end_open() -> None:
    assert is_quiet(at(JLM, 2026, 6, 2, 21, 0), JLM, "en", DEFAULT)
    assert not is_quiet(at(JLM, 2026, 6, 2, 20, 59, 59), JLM, "en", DEFAULT)
    assert not is_quiet(at(JLM, 2026, 6, 3, 9, 0), JLM, "en", DEFAULT)


def test_the_customers_own_zone_counts_not_the_servers() -> None:
    now = utc(2026, 6, 2, 23, 0)  # 02:00 in Jerusalem, 19:00 in New York
    assert next_send_time(now, NY, "en-US", DEFAULT) is now
    assert next_send_time(now, JLM, "he-IL", DEFAULT) == at(JLM, 2026, 6, 3, 9, 0)


def test_friday_afternoon_in_israel_waits_for_saturday_evening() -> None:
    friday = at(JLM, 2026, 6, 5, 15, 0)
    assert friday.weekday() == Weekday.FRIDAY
    assert next_send_time(friday, JLM, "he-IL", DEFAULT) == at(JLM, 2026, 6, 6, 20, 30)
    assert next_send_time(at(JLM, 2026, 6, 6, 20, 29), JLM, "he-IL", DEFAULT) == at(JLM, 2026, 6, 6, 20, 30)
    saturday_evening = at(JLM, 2026, 6, 6, 20, 30)
    assert next_send_time(saturday_evening, JLM, "he-IL", DEFAULT) is saturday_evening


def test_friday_night_runs_into_shabbat_and_saturday_night_into_sunday_morning() -> None:
    # Friday 22:00 is both night and Shabbat: the longer of the two decides.
    assert next_send_time(at(JLM, 2026, 6, 5, 22, 0), JLM, "he", DEFAULT) == at(JLM, 2026, 6, 6, 20, 30)
    assert next_send_time(at(JLM, 2026, 6, 6, 21, 0), JLM, "he", DEFAULT) == at(JLM, 2026, 6, 7, 9, 0)
    # Friday morning is open until 14:00.
    friday_noon = at(JLM, 2026, 6, 5, 12, 0)
    assert next_send_time(friday_noon, JLM, "he-IL", DEFAULT) is friday_noon


def test_the_day_of_rest_follows_the_locale_not_the_zone() -> None:
    friday = at(JLM, 2026, 6, 5, 15, 0)
    assert next_send_time(friday, JLM, "en-US", DEFAULT) is friday
    assert next_send_time(friday, JLM, None, DEFAULT) is friday
    assert next_send_time(at(NY, 2026, 6, 5, 15, 0), NY, "he-IL", DEFAULT) == at(NY, 2026, 6, 6, 20, 30)
    assert next_send_time(at(JLM, 2026, 6, 5, 12, 0), JLM, "ar", DEFAULT) == at(JLM, 2026, 6, 5, 14, 0)


@pytest.mark.parametrize("locale", ["he", "he-IL", "HE_il", "iw-IL", "iw"])
def test_locale_tags_are_matched_loosely(locale: str) -> None:
    assert is_quiet(at(JLM, 2026, 6, 5, 15, 0), JLM, locale, DEFAULT)


def test_a_whole_tag_wins_over_its_language() -> None:
    config = QuietHours(
        rest_by_locale={
            "he": [RestWindow.of(Weekday.FRIDAY, time(14), Weekday.SATURDAY, time(20, 30))],
            "he-US": [RestWindow.of(Weekday.FRIDAY, time(16), Weekday.SATURDAY, time(20))],
        }
    )
    assert not is_quiet(at(NY, 2026, 6, 5, 15, 0), NY, "he-US", config)
    assert is_quiet(at(NY, 2026, 6, 5, 15, 0), NY, "he-IL", config)


def test_rest_for_everyone_and_windows_that_wrap_over_the_week() -> None:
    config = QuietHours(
        start=time(0), end=time(0), rest=[RestWindow.of(Weekday.SUNDAY, time(20), Weekday.MONDAY, time(6))]
    )
    sunday_night = at(NY, 2026, 6, 7, 23, 0)
    assert next_send_time(sunday_night, NY, "en-US", config) == at(NY, 2026, 6, 8, 6, 0)
    monday = at(NY, 2026, 6, 8, 7, 0)
    assert next_send_time(monday, NY, "en-US", config) is monday


def test_nightly_hours_within_one_day() -> None:
    config = QuietHours(start=time(12), end=time(14), rest_by_locale={})
    assert next_send_time(at(NY, 2026, 6, 2, 13, 0), NY, "en", config) == at(NY, 2026, 6, 2, 14, 0)
    assert not is_quiet(at(NY, 2026, 6, 2, 23, 0), NY, "en", config)


# --- DST ------------------------------------------------------------------------------------


def test_israel_dst_start_on_a_friday() -> None:
    # 2026-03-27, Friday: 02:00 IST → 03:00 IDT. Thursday 23:00 IST until 09:00 IDT is 9 hours.
    now = at(JLM, 2026, 3, 26, 23, 0)
    opens = next_send_time(now, JLM, "he-IL", DEFAULT)
    assert opens == utc(2026, 3, 27, 6, 0)
    assert opens - now == timedelta(hours=9)
    # Friday afternoon: Shabbat ends on Saturday 20:30 IDT.
    assert next_send_time(at(JLM, 2026, 3, 27, 15, 0), JLM, "he-IL", DEFAULT) == utc(2026, 3, 28, 17, 30)


def test_a_window_that_opens_in_the_skipped_hour_opens_at_the_transition() -> None:
    config = QuietHours(start=time(21), end=time(2, 30), rest_by_locale={})
    assert next_send_time(at(JLM, 2026, 3, 27, 0, 30), JLM, "he", config) == utc(2026, 3, 27, 0, 0)
    assert next_send_time(at(NY, 2026, 3, 8, 1, 0), NY, "en", config) == utc(2026, 3, 8, 7, 0)


def test_israel_dst_end_on_a_saturday_night() -> None:
    # 2026-10-25, Sunday: 02:00 IDT → 01:00 IST. Saturday 22:00 IDT until 09:00 IST is 12 hours.
    now = at(JLM, 2026, 10, 24, 22, 0)
    opens = next_send_time(now, JLM, "he-IL", DEFAULT)
    assert opens == utc(2026, 10, 25, 7, 0)
    assert opens - now == timedelta(hours=12)


def test_a_window_that_opens_in_the_repeated_hour_opens_at_its_next_occurrence() -> None:
    config = QuietHours(start=time(21), end=time(1, 30), rest_by_locale={})
    # From the evening: the first 01:30 (IDT).
    assert next_send_time(at(JLM, 2026, 10, 24, 23, 0), JLM, "he", config) == utc(2026, 10, 24, 22, 30)
    # Quiet 01:00–01:30 again in the second pass of the hour: from the second 01:10, the second 01:30.
    short = QuietHours(start=time(1), end=time(1, 30), rest_by_locale={})
    second = at(JLM, 2026, 10, 25, 1, 10, fold=1)
    assert second.astimezone(UTC) == utc(2026, 10, 24, 23, 10)  # fold=1 compares unequal across zones
    assert next_send_time(second, JLM, "he", short) == utc(2026, 10, 24, 23, 30)


def test_us_dst_start() -> None:
    # 2026-03-08: 02:00 EST → 03:00 EDT. Saturday 22:00 until Sunday 09:00 is 10 real hours.
    now = at(NY, 2026, 3, 7, 22, 0)
    opens = next_send_time(now, NY, "en-US", DEFAULT)
    assert opens == utc(2026, 3, 8, 13, 0)
    assert opens - now == timedelta(hours=10)


def test_us_dst_end() -> None:
    # 2026-11-01: 02:00 EDT → 01:00 EST. Saturday 22:00 until Sunday 09:00 is 12 real hours.
    now = at(NY, 2026, 10, 31, 22, 0)
    opens = next_send_time(now, NY, "en-US", DEFAULT)
    assert opens == utc(2026, 11, 1, 14, 0)
    assert opens - now == timedelta(hours=12)
    config = QuietHours(start=time(21), end=time(1, 30), rest_by_locale={})
    assert next_send_time(now, NY, "en", config) == utc(2026, 11, 1, 5, 30)


def wall(day: date, hour: int, minute: int = 0) -> datetime:
    """A naive local date and time, on purpose."""
    return datetime.combine(day, time(hour, minute))


def test_wall_to_instant() -> None:
    assert wall_to_instant(wall(date(2026, 3, 8), 2, 30), NY) == utc(2026, 3, 8, 7, 0)  # skipped
    assert wall_to_instant(wall(date(2026, 11, 1), 1, 30), NY) == utc(2026, 11, 1, 5, 30)  # first
    after_first = utc(2026, 11, 1, 5, 45)
    assert wall_to_instant(wall(date(2026, 11, 1), 1, 30), NY, after_first) == utc(2026, 11, 1, 6, 30)
    assert wall_to_instant(wall(date(2026, 6, 1), 12), NY) == utc(2026, 6, 1, 16, 0)
    with pytest.raises(ValueError, match="naive"):
        wall_to_instant(utc(2026, 6, 1, 12, 0), NY)


def test_start_of_day_when_the_clock_skips_midnight() -> None:
    # Chile moves its clocks at midnight: 2026-09-06 begins at 01:00.
    santiago = ZoneInfo("America/Santiago")
    day = date(2026, 9, 6)
    first = start_of_day(day, santiago)
    assert first.astimezone(santiago).date() == day
    assert (first - timedelta(seconds=1)).astimezone(santiago).date() < day
    assert start_of_day(day, JLM) == utc(2026, 9, 5, 21, 0)


# --- configuration --------------------------------------------------------------------------


def test_the_configuration_round_trips_through_json() -> None:
    text = DEFAULT.model_dump_json()
    assert QuietHours.model_validate_json(text) == DEFAULT
    custom = QuietHours.model_validate(
        {
            "start": "22:00",
            "end": "08:00",
            "rest": [],
            "rest_by_locale": {
                "he-IL": [{"start_weekday": 4, "start_time": "13:00", "end_weekday": 5, "end_time": "21:00"}]
            },
        }
    )
    assert custom.windows_for("he-il")[0].start_time == time(13)
    assert custom.windows_for("he") == []


def rest(start_weekday: int, start_time: str, end_weekday: int, end_time: str) -> dict[str, object]:
    return {
        "start_weekday": start_weekday,
        "start_time": start_time,
        "end_weekday": end_weekday,
        "end_time": end_time,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"start": "21:00+02:00"}, "without a time zone"),
        ({"rest": [rest(4, "14:00", 4, "14:00")]}, "same moment"),
        ({"rest": [rest(7, "14:00", 4, "15:00")]}, "start_weekday"),
        (
            {
                "start": "09:00",
                "end": "09:00",
                "rest": [rest(0, "00:00", 6, "23:59:59.999999"), rest(6, "23:00", 0, "01:00")],
            },
            "no time to send",
        ),
        ({"rest_by_locale": {"x": [rest(0, "07:00", 0, "06:00")]}}, "no time to send"),
        ({"rest_by_locale": {"he": [], "HE": []}}, "same locale"),
    ],
)
def test_invalid_configurations_are_refused_with_a_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QuietHours.model_validate(data)


def test_customer_zone() -> None:
    assert customer_zone("America/New_York", "he-IL") == NY
    assert customer_zone(None, "he-IL") == JLM
    assert customer_zone(None, "en-US", "Europe/London") == ZoneInfo("Europe/London")  # many zones
    assert customer_zone("No/Such_Zone", None) == ZoneInfo("UTC")
    assert customer_zone(None, None, "Asia/Jerusalem") == JLM


def _seasons(zone: ZoneInfo) -> tuple[timedelta | None, timedelta | None]:
    """The zone's offsets in January and July: how it keeps time."""
    return utc(2026, 1, 15, 12).astimezone(zone).utcoffset(), utc(2026, 7, 15, 12).astimezone(
        zone
    ).utcoffset()


def test_a_region_of_several_zones_is_all_of_them_when_the_profile_names_none() -> None:
    """en-US with no zone of its own: one zone per way of keeping time, east to Hawaii; none
    for a region of one zone, a bare language, or a profile that names its zone."""
    us = region_zones(None, "en-US")
    winter = sorted(_seasons(z)[0] or timedelta(0) for z in us)
    assert (winter[0], winter[-1]) == (timedelta(hours=-10), timedelta(hours=-5))
    assert len(us) == len({_seasons(z) for z in us})
    assert region_zones(None, "he-IL") == region_zones(None, "en") == ()
    assert region_zones("America/Chicago", "en-US") == ()
    assert region_zones("No/Such_Zone", "en-US") == us  # a zone that is none names nothing


def test_a_customer_who_may_be_anywhere_in_a_region_gets_its_shared_daytime() -> None:
    """02:30 in New York is 09:30 in Jerusalem, the business's zone, which stood in for en-US:
    an SMS went out at 02:30. Now the first instant that is open from New York to Honolulu:
    15:00 in New York, 09:00 in Honolulu."""
    us = region_zones(None, "en-US")
    night_in_new_york = at(NY, 2026, 6, 3, 2, 30)
    opens = next_send_time_everywhere(night_in_new_york, us, "en-US", DEFAULT)
    assert opens == at(NY, 2026, 6, 3, 15)
    assert opens.astimezone(ZoneInfo("Pacific/Honolulu")).hour == 9
    assert all(not is_quiet(opens, z, "en-US", DEFAULT) for z in us)
    afternoon = at(NY, 2026, 6, 3, 16)
    assert next_send_time_everywhere(afternoon, us, "en-US", DEFAULT) == afternoon
    alone = next_send_time_everywhere(night_in_new_york, (NY,), "en-US", DEFAULT)
    assert alone == next_send_time(night_in_new_york, NY, "en-US", DEFAULT)


def test_zones_with_no_shared_open_time_fall_back_to_the_first() -> None:
    """Open 09:00-12:00 local in Jerusalem and in Honolulu never meet (13 hours apart): the
    given fallback's window (else the first zone's), not a loop for ever."""
    short = QuietHours(start=time(12), end=time(9), rest_by_locale={})
    both = (JLM, ZoneInfo("Pacific/Honolulu"))
    now = utc(2026, 6, 3, 12)
    assert next_send_time_everywhere(now, both, None, short) == next_send_time(now, JLM, None, short)
    assert next_send_time_everywhere(now, both, None, short, fallback=NY) == next_send_time(
        now, NY, None, short
    )


def test_a_region_of_several_names_keeping_one_time_is_that_time() -> None:
    """Argentina and Malaysia list several zones that keep one time: each is its region's zone,
    not the business's (04:30 in Buenos Aires was 09:30 in Jerusalem)."""
    for locale, hours in (("es-AR", -3), ("ms-MY", 8), ("de-DE", 1)):
        zone = customer_zone(None, locale, "Asia/Jerusalem")
        assert utc(2026, 1, 15, 12).astimezone(zone).utcoffset() == timedelta(hours=hours), locale
        assert region_zones(None, locale) == ()


def test_a_bare_language_is_placed_in_its_likely_region_unless_the_business_says_otherwise() -> None:
    """A profile that says only "he" is not in UTC, where 21:00-09:00 quiet hours would let a
    message out at 22:00 in Israel: CLDR's likely region of the language, when it has one zone;
    a configured default zone (the business's market) comes first."""
    assert customer_zone(None, "he") == JLM
    assert customer_zone(None, "ar") == ZoneInfo("Africa/Cairo")
    assert customer_zone(None, "en") == ZoneInfo("UTC")  # the US: many zones, no guess
    assert customer_zone(None, "ar", "Asia/Jerusalem") == JLM
    assert customer_zone(None, "he", "Europe/London") == ZoneInfo("Europe/London")
    assert customer_zone(None, "ar-EG", "Asia/Jerusalem") == ZoneInfo("Africa/Cairo")  # its own region first


# --- property -------------------------------------------------------------------------------

instants = st.integers(0, 2 * 365 * 24 * 3600).map(lambda s: utc(2026, 1, 1) + timedelta(seconds=s))
# DST weeks in both zones are over-represented so the property meets them.
dst_instants = st.sampled_from(
    [utc(2026, 3, 26), utc(2026, 10, 24), utc(2026, 3, 7), utc(2026, 10, 31)]
).flatmap(lambda d: st.integers(0, 72 * 60).map(lambda m: d + timedelta(minutes=m)))


def oracle(t: datetime, tz: ZoneInfo, locale: str | None) -> bool:
    """The default rules, written out plainly on the local wall clock."""
    local = t.astimezone(tz)
    hhmm = (local.hour, local.minute)
    night = hhmm >= (21, 0) or hhmm < (9, 0)
    if locale == "he-IL":
        shabbat = (local.weekday() == 4 and hhmm >= (14, 0)) or (local.weekday() == 5 and hhmm < (20, 30))
        return night or shabbat
    if locale == "ar":
        return night or (local.weekday() == 4 and (11, 0) <= hhmm < (14, 0))
    return night


@settings(max_examples=300, deadline=None)
@given(
    now=st.one_of(instants, dst_instants),
    tz=st.sampled_from([JLM, NY]),
    locale=st.sampled_from(["he-IL", "en-US", "ar", None]),
)
def test_the_window_opens_at_the_first_open_instant(now: datetime, tz: ZoneInfo, locale: str | None) -> None:
    opens = next_send_time(now, tz, locale, DEFAULT)
    assert opens >= now
    assert is_quiet(now, tz, locale, DEFAULT) == oracle(now, tz, locale)
    assert not oracle(opens, tz, locale)
    if opens != now:
        # Quiet all the way: just before it opens, and every five minutes between.
        assert oracle(opens - timedelta(seconds=1), tz, locale)
        t = now
        while t < opens:
            assert oracle(t, tz, locale), t
            t += timedelta(minutes=5)
        assert opens - now < timedelta(hours=36)
