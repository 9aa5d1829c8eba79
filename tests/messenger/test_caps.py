"""Frequency caps: configuration, check_caps(), and a property over any burst of messages."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.messenger.caps import (
    DEFAULT_CAPS,
    Cap,
    CapCandidate,
    CapsConfig,
    CapScope,
    SentRecord,
    check_caps,
)
from shared.events import Channel, MessageKind

JLM = ZoneInfo("Asia/Jerusalem")
NY = ZoneInfo("America/New_York")
EMAIL, SMS, WA = Channel.EMAIL, Channel.SMS, Channel.WHATSAPP
MKT, TRX = MessageKind.MARKETING, MessageKind.TRANSACTIONAL
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
CAPS = DEFAULT_CAPS.caps


def sent(
    at: datetime, channel: Channel = SMS, journey: str = "welcome", kind: MessageKind = MKT
) -> SentRecord:
    return SentRecord(at=at, channel=channel, journey=journey, kind=kind)


def want(channel: Channel = SMS, journey: str = "welcome", kind: MessageKind = MKT) -> CapCandidate:
    return CapCandidate(channel=channel, journey=journey, kind=kind)


# --- configuration --------------------------------------------------------------------------


def test_the_defaults_are_the_issues() -> None:
    caps = {c.name: (c.scope, c.channel, c.journey, c.limit, c.window) for c in CAPS}
    assert caps == {
        "sms_7d": (CapScope.CHANNEL, SMS, None, 2, 7),
        "marketing_day": (CapScope.GLOBAL, None, None, 1, "day"),
        "marketing_7d": (CapScope.GLOBAL, None, None, 4, 7),
        "win_back_30d": (CapScope.JOURNEY, None, "win_back", 1, 30),
    }
    assert all(c.kinds == [MKT] and set(c.counted_kinds) == {MKT, TRX} for c in CAPS)


def test_the_configuration_round_trips_through_json() -> None:
    text = DEFAULT_CAPS.model_dump_json()
    assert '"window":"day"' in text
    assert CapsConfig.model_validate_json(text) == DEFAULT_CAPS


def cap(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "scope": "global", "limit": 1, "window": 7} | fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (cap(scope="channel", channel="fax"), "channel"),
        (cap(limit=-1), "greater than or equal to 0"),
        (cap(scope="channel"), "scope 'channel' needs a channel"),
        (cap(scope="channel", channel="sms", journey="welcome"), "takes no journey"),
        (cap(channel="sms"), "scope 'global' takes neither"),
        (cap(scope="journey"), "scope 'journey' needs a journey"),
        (cap(scope="planet"), "scope"),
        (cap(window=0), "window"),
        (cap(window="week"), "window"),
        (cap(window="7"), "window"),
        (cap(kinds=[]), "kinds"),
        (cap(kinds=["marketing", "marketing"]), "listed twice"),
        (cap(kinds=["newsletter"]), "kinds"),
        (cap(name="has space"), "name"),
        (cap(colour="red"), "colour"),
    ],
)
def test_invalid_caps_are_refused_with_a_reason(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CapsConfig.model_validate({"caps": [fields]})


def test_cap_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="unique: c"):
        CapsConfig.model_validate({"caps": [cap(), cap(limit=3)]})


def test_a_journey_cap_may_name_a_channel() -> None:
    c = Cap.model_validate(cap(scope="journey", journey="win_back", channel="sms"))
    assert c.matches(SMS, "win_back")
    assert not c.matches(EMAIL, "win_back")
    assert not c.matches(SMS, "welcome")


# --- check_caps -----------------------------------------------------------------------------


def test_no_history_no_cap() -> None:
    verdict = check_caps(CAPS, [], want(), JLM, NOW)
    assert verdict.allowed
    assert verdict.cap_name is None


def test_two_sms_in_seven_days_and_no_third() -> None:
    history = [sent(NOW - 6 * DAY), sent(NOW - 3 * DAY)]
    verdict = check_caps(CAPS, history, want(SMS), JLM, NOW)
    assert not verdict.allowed
    assert verdict.cap_name == "sms_7d"
    assert verdict.reason == "cap 'sms_7d': 2 SMS in 7 days (limit 2)"
    assert verdict.next_allowed_at == NOW + DAY  # the oldest leaves the window
    assert check_caps(CAPS, history, want(SMS), JLM, NOW + DAY).allowed
    assert check_caps(CAPS, history, want(EMAIL), JLM, NOW).allowed


def test_transactional_messages_are_exempt_but_counted() -> None:
    tickets = [sent(NOW - 2 * DAY, kind=TRX), sent(NOW - DAY, kind=TRX), sent(NOW - DAY, kind=TRX)]
    assert check_caps(CAPS, tickets, want(SMS, "ticket", TRX), JLM, NOW).allowed
    assert check_caps(CAPS, tickets, want(SMS), JLM, NOW).cap_name == "sms_7d"


def test_counted_kinds_can_leave_transactional_out() -> None:
    only_marketing = Cap(
        name="sms", scope=CapScope.CHANNEL, channel=SMS, limit=1, window=7, counted_kinds=[MKT]
    )
    tickets = [sent(NOW - DAY, kind=TRX)]
    assert check_caps([only_marketing], tickets, want(SMS), JLM, NOW).allowed


def test_a_cap_for_both_kinds_holds_transactional_too() -> None:
    both = Cap(name="sms", scope=CapScope.CHANNEL, channel=SMS, limit=1, window=1, kinds=[MKT, TRX])
    assert not check_caps([both], [sent(NOW - timedelta(hours=1))], want(SMS, "t", TRX), JLM, NOW).allowed


def test_one_marketing_message_per_local_calendar_day() -> None:
    # 23:30 in Jerusalem yesterday, 00:10 today: different local days though 40 minutes apart.
    yesterday = datetime(2026, 6, 9, 23, 30, tzinfo=JLM)
    today = datetime(2026, 6, 10, 0, 10, tzinfo=JLM)
    assert check_caps(CAPS, [sent(yesterday, EMAIL)], want(EMAIL), JLM, today).allowed
    verdict = check_caps(CAPS, [sent(today, EMAIL)], want(EMAIL), JLM, today + timedelta(hours=20))
    assert verdict.cap_name == "marketing_day"
    assert verdict.reason == "cap 'marketing_day': 1 message on the local calendar day (limit 1)"
    assert verdict.next_allowed_at == datetime(2026, 6, 10, 21, 0, tzinfo=UTC)  # local midnight
    # The same instants in New York are one local day (16:30 and 17:10 on 2026-06-09).
    assert not check_caps(CAPS, [sent(yesterday, EMAIL)], want(EMAIL), NY, today).allowed


@pytest.mark.parametrize(
    ("tz", "day", "hours"),
    [
        (JLM, date(2026, 3, 27), 23),
        (JLM, date(2026, 10, 25), 25),
        (NY, date(2026, 3, 8), 23),
        (NY, date(2026, 11, 1), 25),
    ],
)
def test_calendar_days_follow_dst(tz: ZoneInfo, day: date, hours: int) -> None:
    morning = datetime.combine(day, datetime.min.time(), tz) + timedelta(hours=10)
    verdict = check_caps(CAPS, [sent(morning, EMAIL)], want(EMAIL), tz, morning + timedelta(hours=1))
    assert verdict.next_allowed_at is not None
    start = datetime.combine(day, datetime.min.time(), tz).astimezone(UTC)
    assert verdict.next_allowed_at - start == timedelta(hours=hours)
    assert verdict.next_allowed_at.astimezone(tz).time() == datetime.min.time()


def test_win_back_once_in_thirty_days() -> None:
    history = [sent(NOW - 20 * DAY, EMAIL, "win_back")]
    verdict = check_caps(CAPS, history, want(EMAIL, "win_back"), JLM, NOW)
    assert verdict.cap_name == "win_back_30d"
    assert verdict.reason == "cap 'win_back_30d': 1 win_back message in 30 days (limit 1)"
    assert verdict.next_allowed_at == NOW + 10 * DAY
    assert check_caps(CAPS, history, want(EMAIL, "welcome"), JLM, NOW).allowed


def test_four_marketing_messages_in_seven_days() -> None:
    history = [sent(NOW - d * DAY, EMAIL) for d in (6, 4, 3, 1)]
    verdict = check_caps(CAPS, history, want(WA), JLM, NOW)
    assert verdict.cap_name == "marketing_7d"
    assert verdict.next_allowed_at == NOW + DAY


def test_every_violated_cap_is_named_and_the_latest_release_wins() -> None:
    history = [sent(NOW - 5 * DAY), sent(NOW - 2 * DAY), sent(NOW - timedelta(hours=1))]
    verdict = check_caps(CAPS, history, want(SMS), JLM, NOW)
    assert verdict.violated == ("sms_7d", "marketing_day")
    assert verdict.cap_name == "sms_7d"
    assert "also 'marketing_day'" in verdict.reason
    # sms_7d frees a slot in 2 days, marketing_day at the next local midnight (21:00 UTC).
    assert verdict.next_allowed_at == NOW - 2 * DAY + 7 * DAY


def test_a_zero_limit_never_allows_and_names_no_time() -> None:
    never = Cap(name="no_sms", scope=CapScope.CHANNEL, channel=SMS, limit=0, window=1)
    verdict = check_caps([never], [], want(SMS), JLM, NOW)
    assert not verdict.allowed
    assert verdict.next_allowed_at is None


def test_sends_dated_in_the_future_count() -> None:
    # Another consumer's clock runs ahead: its send must not let ours through.
    assert not check_caps(CAPS, [sent(NOW + timedelta(minutes=5), EMAIL)], want(EMAIL), JLM, NOW).allowed


def test_the_window_is_rolling_to_the_instant() -> None:
    cap1 = Cap(name="w", scope=CapScope.GLOBAL, limit=1, window=7)
    history = [sent(NOW - 7 * DAY + timedelta(seconds=1))]
    assert not check_caps([cap1], history, want(), JLM, NOW).allowed
    assert check_caps([cap1], history, want(), JLM, NOW + timedelta(seconds=1)).allowed


# --- property: whatever arrives, what is sent never exceeds any cap in any window ------------

JOURNEYS = ["welcome", "win_back", "ticket"]


@st.composite
def caps_configs(draw: st.DrawFn) -> list[Cap]:
    caps: list[Cap] = []
    for i in range(draw(st.integers(1, 5))):
        scope = draw(st.sampled_from(list(CapScope)))
        channel = draw(st.sampled_from(list(Channel))) if scope is CapScope.CHANNEL else None
        journey = None
        if scope is CapScope.JOURNEY:
            journey = draw(st.sampled_from(JOURNEYS))
            channel = draw(st.none() | st.sampled_from(list(Channel)))
        kinds = draw(st.sampled_from([[MKT], [TRX], [MKT, TRX]]))
        counted = draw(st.sampled_from([[MKT], [TRX], [MKT, TRX]]))
        caps.append(
            Cap(
                name=f"cap{i}",
                scope=scope,
                channel=channel,
                journey=journey,
                kinds=kinds,
                counted_kinds=counted,
                limit=draw(st.integers(0, 3)),
                window=draw(st.sampled_from([1, 2, 7, "day"])),
            )
        )
    return caps


starts = st.one_of(
    st.sampled_from([datetime(2026, 3, 26, 18, tzinfo=UTC), datetime(2026, 10, 24, 18, tzinfo=UTC)]),
    st.sampled_from([datetime(2026, 3, 7, 20, tzinfo=UTC), datetime(2026, 10, 31, 20, tzinfo=UTC)]),
    st.integers(0, 365 * 24 * 60).map(lambda m: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m)),
)
candidates = st.tuples(
    st.sampled_from([0, 0, 1, 30, 60 * 3, 60 * 11, 60 * 24, 60 * 24 * 3]).flatmap(
        lambda m: st.integers(0, m)
    ),  # minutes since the previous candidate: bursts and lulls
    st.sampled_from(list(Channel)),
    st.sampled_from(JOURNEYS),
    st.sampled_from([MKT, MKT, TRX]),
)


def _matches(c: Cap, s: SentRecord) -> bool:
    return (c.channel is None or c.channel == s.channel) and (c.journey is None or c.journey == s.journey)


def _assert_within(c: Cap, sends: list[SentRecord], tz: ZoneInfo) -> None:
    """Brute force: for every window and every send the cap governs in it, the sends it counts
    in that window up to and including that one are within the limit."""
    for i, m in enumerate(sends):
        if not (m.kind in c.kinds and _matches(c, m)):
            continue
        counted = [s for s in sends[: i + 1] if s.kind in c.counted_kinds and _matches(c, s)]
        if c.window == "day":
            day = m.at.astimezone(tz).date()
            n = sum(1 for s in counted if s.at.astimezone(tz).date() == day)
            assert n <= c.limit, f"{c.name}: {n} on {day}"
            continue
        width = timedelta(days=c.window)
        # Every window [a, a + width) holding m: a from m.at - width (exclusive) to m.at.
        for a in {m.at - width + timedelta(microseconds=1), *(s.at for s in sends)}:
            if a <= m.at < a + width:
                n = sum(1 for s in counted if a <= s.at < a + width)
                assert n <= c.limit, f"{c.name}: {n} in [{a}, {a + width})"


@settings(max_examples=300, deadline=None)
@given(
    caps=st.one_of(st.just(list(CAPS)), caps_configs()),
    tz=st.sampled_from([JLM, NY]),
    start=starts,
    burst=st.lists(candidates, max_size=40),
)
def test_no_burst_ever_exceeds_a_cap(
    caps: list[Cap],
    tz: ZoneInfo,
    start: datetime,
    burst: list[tuple[int, Channel, str, MessageKind]],
) -> None:
    sends: list[SentRecord] = []
    now = start
    for minutes, channel, journey, kind in burst:
        now += timedelta(minutes=minutes)
        candidate = want(channel, journey, kind)
        verdict = check_caps(caps, sends, candidate, tz, now)
        if verdict.allowed:
            sends.append(sent(now, channel, journey, kind))
            continue
        # The release time is exact: blocked a moment before, allowed at it.
        if verdict.next_allowed_at is not None:
            assert verdict.next_allowed_at > now
            assert check_caps(caps, sends, candidate, tz, verdict.next_allowed_at).allowed
            before = verdict.next_allowed_at - timedelta(microseconds=1)
            assert not check_caps(caps, sends, candidate, tz, before).allowed
    for c in caps:
        _assert_within(c, sends, tz)
