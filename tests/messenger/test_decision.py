"""decide() and recheck_at_send(): the order of the checks and every outcome."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.messenger.caps import SentRecord
from services.messenger.consent import ConsentFact, FactSource
from services.messenger.decision import (
    Candidate,
    Decision,
    DecisionContext,
    decide,
    holdout_point,
    in_holdout,
    recheck_at_send,
)
from shared.events import Channel, ConsentState, MessageKind, MessageStatus, ProfileSnapshot

JLM = ZoneInfo("Asia/Jerusalem")
EMAIL, SMS, WA = Channel.EMAIL, Channel.SMS, Channel.WHATSAPP
MKT, TRX = MessageKind.MARKETING, MessageKind.TRANSACTIONAL
S = MessageStatus
TUESDAY_NOON = datetime(2026, 6, 2, 12, 0, tzinfo=JLM)
TUESDAY_NIGHT = datetime(2026, 6, 2, 22, 0, tzinfo=JLM)
WEDNESDAY_NINE = datetime(2026, 6, 3, 9, 0, tzinfo=JLM)
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)
ADDRESSES = {EMAIL: "noa@example.co.il", SMS: "+972521234567", WA: "+972521234567"}
H = timedelta(hours=1)


def candidate(**fields: Any) -> Candidate:
    base: dict[str, Any] = {
        "message_key": "welcome:c-1:crm-1",
        "customer_id": "c-1",
        "journey": "welcome",
        "kind": MKT,
        "template": "welcome",
        "triggered_at": TUESDAY_NOON - H,
    }
    return Candidate(**(base | fields))


def context(**fields: Any) -> DecisionContext:
    base: dict[str, Any] = {
        "addresses": ADDRESSES,
        "consents": {c: ConsentState(granted=True, at=LONG_AGO) for c in Channel},
        "timezone": JLM,
        "locale": "he-IL",
        "preferred_channel": SMS,
    }
    return DecisionContext(**(base | fields))


def stop(channel: Channel, at: datetime = TUESDAY_NOON - 2 * H) -> ConsentFact:
    return ConsentFact(channel=channel, at=at, source=FactSource.STOP)


def sms_sent(at: datetime, kind: MessageKind = MKT) -> SentRecord:
    return SentRecord(at=at, channel=SMS, journey="welcome", kind=kind)


def test_go_now() -> None:
    d = decide(candidate(), context(), TUESDAY_NOON)
    assert d.status is S.QUEUED
    assert d.channel is SMS
    assert d.send_at == TUESDAY_NOON
    assert d.reason == "send now by sms"


def test_duplicate_comes_first() -> None:
    d = decide(candidate(holdout_percent=100), context(duplicate=True, addresses={}), TUESDAY_NOON)
    assert d.status is S.DUPLICATE
    assert "welcome:c-1:crm-1" in d.reason


def test_holdout_comes_before_consent_and_address() -> None:
    d = decide(candidate(holdout_percent=100), context(addresses={}, consents={}), TUESDAY_NOON)
    assert d.status is S.HOLDOUT
    assert d.reason == "in the 100% holdout of journey 'welcome'"


def test_transactional_messages_are_never_held_out() -> None:
    d = decide(candidate(kind=TRX, holdout_percent=100), context(), TUESDAY_NOON)
    assert d.status is S.QUEUED


def test_no_address() -> None:
    d = decide(candidate(), context(addresses={EMAIL: None, SMS: ""}), TUESDAY_NOON)
    assert d.status is S.NO_ADDRESS
    assert {s.reason for s in d.skipped} == {"no_address"}


def test_no_consent() -> None:
    d = decide(candidate(), context(consents={}), TUESDAY_NOON)
    assert d.status is S.NO_CONSENT
    assert "never given" in d.reason


def test_suppressed_when_every_usable_channel_opted_out() -> None:
    facts = [
        stop(SMS),
        ConsentFact(channel=EMAIL, at=TUESDAY_NOON - H, source=FactSource.UNSUBSCRIBE_LINK),
    ]
    ctx = context(facts=facts, addresses={EMAIL: ADDRESSES[EMAIL], SMS: ADDRESSES[SMS]})
    d = decide(candidate(), ctx, TUESDAY_NOON)
    assert d.status is S.SUPPRESSED
    assert "sms: stop" in d.reason
    assert "email: unsubscribe_link" in d.reason
    # The unsubscribe link does not stop a ticket update by email; the STOP stops it by SMS.
    ticket = decide(candidate(kind=TRX), ctx, TUESDAY_NOON)
    assert (ticket.status, ticket.channel) == (S.QUEUED, EMAIL)


def test_a_stop_on_one_channel_falls_back_to_the_next() -> None:
    d = decide(candidate(), context(facts=[stop(SMS)]), TUESDAY_NOON)
    assert (d.status, d.channel) == (S.QUEUED, EMAIL)
    assert [(s.channel, s.reason) for s in d.skipped] == [(SMS, "suppressed")]


def test_the_candidate_may_override_the_preferred_channel() -> None:
    assert decide(candidate(channel=EMAIL), context(), TUESDAY_NOON).channel is EMAIL


def test_whatsapp_modes() -> None:
    inside = context(preferred_channel=WA, whatsapp_last_inbound_at=TUESDAY_NOON - 2 * H)
    d = decide(candidate(), inside, TUESDAY_NOON)
    assert (d.channel, d.whatsapp_mode, d.reason) == (WA, "freeform", "send now by whatsapp (freeform)")
    outside = context(preferred_channel=WA, has_whatsapp_template=True)
    assert decide(candidate(), outside, TUESDAY_NOON).whatsapp_mode == "template"


def test_whatsapp_only_without_a_template_fails_with_the_reason() -> None:
    d = decide(candidate(), context(preferred_channel=WA, addresses={WA: ADDRESSES[WA]}), TUESDAY_NOON)
    assert d.status is S.FAILED
    assert "no approved template" in d.reason


def test_capped() -> None:
    history = [sms_sent(TUESDAY_NOON - 3 * 24 * H), sms_sent(TUESDAY_NOON - 2 * 24 * H)]
    d = decide(candidate(), context(history=history), TUESDAY_NOON)
    assert d.status is S.CAPPED
    assert d.cap_name == "sms_7d"
    assert d.channel is SMS
    assert d.next_allowed_at == TUESDAY_NOON + 4 * 24 * H
    assert d.reason.startswith(
        "cap 'sms_7d': 2 SMS in 7 days (limit 2); next allowed at 2026-06-06T12:00:00+03:00"
    )


def test_consent_is_checked_before_caps() -> None:
    history = [sms_sent(TUESDAY_NOON - 2 * H), sms_sent(TUESDAY_NOON - H)]
    assert decide(candidate(), context(history=history, consents={}), TUESDAY_NOON).status is S.NO_CONSENT


def test_caps_are_checked_before_quiet_hours() -> None:
    history = [sms_sent(TUESDAY_NOON - 2 * H), sms_sent(TUESDAY_NOON - H)]
    assert decide(candidate(), context(history=history), TUESDAY_NIGHT).status is S.CAPPED


def test_caps_are_judged_when_the_message_would_go() -> None:
    # One marketing message today already: at 22:00 the daily cap is used up, but the message
    # waits for tomorrow 09:00 anyway, when it is not.
    history = [SentRecord(at=TUESDAY_NOON, channel=EMAIL, journey="welcome", kind=MKT)]
    d = decide(candidate(), context(history=history), TUESDAY_NIGHT)
    assert d.status is S.HELD_QUIET_HOURS
    assert d.send_at == WEDNESDAY_NINE


def test_transactional_messages_are_exempt_from_marketing_caps() -> None:
    history = [sms_sent(TUESDAY_NOON - 2 * H), sms_sent(TUESDAY_NOON - H)]
    assert decide(candidate(kind=TRX), context(history=history), TUESDAY_NOON).status is S.QUEUED


def test_marketing_waits_for_the_morning_transactional_goes_now() -> None:
    d = decide(candidate(), context(), TUESDAY_NIGHT)
    assert d.status is S.HELD_QUIET_HOURS
    assert d.send_at == WEDNESDAY_NINE
    assert d.channel is SMS
    assert d.reason == "quiet hours for Asia/Jerusalem (Tue 22:00 local) until 2026-06-03T09:00:00+03:00"
    ticket = decide(candidate(kind=TRX), context(), TUESDAY_NIGHT)
    assert (ticket.status, ticket.send_at) == (S.QUEUED, TUESDAY_NIGHT)


def test_shabbat_holds_marketing_until_saturday_evening() -> None:
    friday = datetime(2026, 6, 5, 16, 0, tzinfo=JLM)
    d = decide(candidate(), context(), friday)
    assert d.send_at == datetime(2026, 6, 6, 20, 30, tzinfo=JLM)
    assert decide(candidate(), context(locale="en-US"), friday).status is S.QUEUED


def test_expired_when_it_could_only_go_after_its_ttl() -> None:
    late = candidate(triggered_at=TUESDAY_NIGHT - H, ttl=6 * H)
    d = decide(late, context(), TUESDAY_NIGHT)
    assert d.status is S.EXPIRED
    assert d.expires_at == TUESDAY_NIGHT + 5 * H
    assert "could go at" in d.reason
    assert "(TTL 6 h)" in d.reason  # not "6:00:00"
    assert d.send_at is None  # it never goes: no time to send it in the ledger
    # Already past its TTL when decided.
    stale = candidate(kind=TRX, triggered_at=TUESDAY_NOON - 3 * H, ttl=2 * H)
    assert decide(stale, context(), TUESDAY_NOON).status is S.EXPIRED


def test_quiet_hours_are_checked_before_expiry() -> None:
    # A message that will be held but not past its TTL is held, with its expiry attached.
    d = decide(candidate(triggered_at=TUESDAY_NIGHT, ttl=48 * H), context(), TUESDAY_NIGHT)
    assert d.status is S.HELD_QUIET_HOURS
    assert d.expires_at == TUESDAY_NIGHT + 48 * H


def scenarios() -> dict[MessageStatus, Decision]:
    full = [sms_sent(TUESDAY_NOON - 2 * H), sms_sent(TUESDAY_NOON - H)]
    wa_only = context(preferred_channel=WA, addresses={WA: ADDRESSES[WA]})
    return {
        S.QUEUED: decide(candidate(), context(), TUESDAY_NOON),
        S.DUPLICATE: decide(candidate(), context(duplicate=True), TUESDAY_NOON),
        S.HOLDOUT: decide(candidate(holdout_percent=100), context(), TUESDAY_NOON),
        S.NO_ADDRESS: decide(candidate(), context(addresses={}), TUESDAY_NOON),
        S.NO_CONSENT: decide(candidate(), context(consents={}), TUESDAY_NOON),
        S.SUPPRESSED: decide(candidate(), context(facts=[stop(c) for c in Channel]), TUESDAY_NOON),
        S.FAILED: decide(candidate(), wa_only, TUESDAY_NOON),
        S.CAPPED: decide(candidate(), context(history=full), TUESDAY_NOON),
        S.HELD_QUIET_HOURS: decide(candidate(), context(), TUESDAY_NIGHT),
        S.EXPIRED: decide(candidate(ttl=H), context(), TUESDAY_NOON),
    }


def test_every_outcome_is_reachable() -> None:
    for status, d in scenarios().items():
        assert d.status is status, (status, d)
        assert d.reason


# --- holdout --------------------------------------------------------------------------------


def test_the_holdout_share_is_the_percentage() -> None:
    customers = [f"c-{i:06d}" for i in range(10_000)]
    for percent in (5, 10, 50):
        share = sum(in_holdout(c, "win_back", percent) for c in customers) / len(customers)
        sigma = (percent / 100 * (1 - percent / 100) / len(customers)) ** 0.5
        assert abs(share - percent / 100) < 4 * sigma, (percent, share)


def test_holdout_is_stable_per_customer_and_independent_per_journey() -> None:
    assert holdout_point("c-1", "welcome") == pytest.approx(0.7363231824728779)
    customers = [f"c-{i:06d}" for i in range(10_000)]
    welcome = {c for c in customers if in_holdout(c, "welcome", 10)}
    assert welcome == {c for c in customers if in_holdout(c, "welcome", 10)}
    win_back = {c for c in customers if in_holdout(c, "win_back", 10)}
    # Independent assignments overlap on about 1% of customers, not 10%.
    assert 0.005 < len(welcome & win_back) / len(customers) < 0.015
    # Raising the share only adds customers.
    assert welcome <= {c for c in customers if in_holdout(c, "welcome", 20)}


def test_holdout_bounds() -> None:
    assert not any(in_holdout(f"c-{i}", "j", 0) for i in range(1000))
    assert all(in_holdout(f"c-{i}", "j", 100) for i in range(1000))
    with pytest.raises(ValueError, match="0–100"):
        in_holdout("c-1", "j", 101)
    with pytest.raises(ValueError, match="0–100"):
        candidate(holdout_percent=-1)
    with pytest.raises(ValueError, match="ttl"):
        candidate(ttl=timedelta(0))


# --- recheck at send ------------------------------------------------------------------------


def test_a_held_message_goes_when_the_window_opens() -> None:
    held = decide(candidate(), context(), TUESDAY_NIGHT)
    assert held.send_at is not None
    d = recheck_at_send(candidate(), context(), held.send_at)
    assert (d.status, d.channel, d.send_at) == (S.QUEUED, SMS, WEDNESDAY_NINE)


def test_a_stop_during_the_night_suppresses_the_held_message() -> None:
    facts = [stop(c, TUESDAY_NIGHT + H) for c in Channel]
    assert recheck_at_send(candidate(), context(facts=facts), WEDNESDAY_NINE).status is S.SUPPRESSED


def test_caps_used_up_during_the_night_cap_the_held_message() -> None:
    history = [sms_sent(WEDNESDAY_NINE - 5 * H, TRX), sms_sent(WEDNESDAY_NINE - 4 * H, TRX)]
    d = recheck_at_send(candidate(), context(history=history), WEDNESDAY_NINE)
    assert (d.status, d.cap_name) == (S.CAPPED, "sms_7d")


def test_woken_early_it_is_held_again() -> None:
    d = recheck_at_send(candidate(), context(), WEDNESDAY_NINE - timedelta(minutes=1))
    assert (d.status, d.send_at) == (S.HELD_QUIET_HOURS, WEDNESDAY_NINE)


def test_the_recheck_does_not_redo_holdout_or_duplicate() -> None:
    d = recheck_at_send(candidate(holdout_percent=100), context(duplicate=True), WEDNESDAY_NINE)
    assert d.status is S.QUEUED


def test_a_held_message_past_its_ttl_expires() -> None:
    late = candidate(triggered_at=TUESDAY_NIGHT, ttl=12 * H)
    assert decide(late, context(), TUESDAY_NIGHT).status is S.HELD_QUIET_HOURS
    assert recheck_at_send(late, context(), TUESDAY_NIGHT + 12 * H).status is S.EXPIRED


def test_the_whatsapp_window_is_judged_again_at_send_time() -> None:
    ctx = context(
        preferred_channel=WA, whatsapp_last_inbound_at=TUESDAY_NIGHT - H, has_whatsapp_template=True
    )
    assert decide(candidate(), ctx, TUESDAY_NIGHT).whatsapp_mode == "freeform"
    assert recheck_at_send(candidate(), ctx, WEDNESDAY_NINE).whatsapp_mode == "freeform"
    later = datetime(2026, 6, 4, 9, 30, tzinfo=JLM)  # more than 24 hours after the last inbound
    assert recheck_at_send(candidate(), ctx, later).whatsapp_mode == "template"


def test_the_whatsapp_window_is_judged_when_a_held_message_will_go() -> None:
    """Free text decided at 22:00 in a window closing at 08:00 the next morning was held to
    09:00 and failed there (a held message keeps its channel); email reaches the customer."""
    ctx = context(preferred_channel=WA, addresses=ADDRESSES, whatsapp_last_inbound_at=TUESDAY_NOON - 4 * H)
    held = decide(candidate(), ctx, TUESDAY_NIGHT)
    assert (held.status, held.send_at) == (S.HELD_QUIET_HOURS, WEDNESDAY_NINE)
    assert held.channel is not WA
    assert recheck_at_send(candidate(), ctx, WEDNESDAY_NINE).channel is held.channel
    # Going at once, inside the window, it is free text on WhatsApp as before.
    assert decide(candidate(), ctx, TUESDAY_NOON).whatsapp_mode == "freeform"


# --- from a profile -------------------------------------------------------------------------


def snapshot(**fields: Any) -> ProfileSnapshot:
    base: dict[str, Any] = {
        "email": "noa@example.co.il",
        "phone": "+972521234567",
        "whatsapp": None,
        "locale": "he-IL",
        "timezone": None,
        "preferred_channel": "sms",
        "consents": {"sms": {"granted": True, "at": LONG_AGO}},
        "lifecycle_stage": "active",
        "tier": "gold",
        "reporting_currency": "ILS",
        "total_value": Decimal(0),
    }
    return ProfileSnapshot.model_validate(base | fields)


def test_the_context_comes_from_the_profile_snapshot() -> None:
    ctx = DecisionContext.from_profile(snapshot(), default_timezone="Europe/London")
    assert ctx.timezone == JLM  # guessed from he-IL, the region has one zone
    assert ctx.addresses == {EMAIL: "noa@example.co.il", SMS: "+972521234567", WA: None}
    assert ctx.preferred_channel is SMS
    d = decide(candidate(), ctx, TUESDAY_NIGHT)
    assert (d.status, d.send_at) == (S.HELD_QUIET_HOURS, WEDNESDAY_NINE)
    # Email was never consented to for marketing, WhatsApp has no address.
    assert decide(candidate(channel=EMAIL), ctx, TUESDAY_NOON).channel is SMS
    ny = DecisionContext.from_profile(snapshot(timezone="America/New_York", locale="en-US"))
    assert ny.timezone == ZoneInfo("America/New_York")
    assert ny.quiet_zones == ()  # its own zone


def test_a_customer_of_a_region_of_several_zones_is_not_messaged_at_night_in_any() -> None:
    """en-US and no zone: the business's zone (Jerusalem) stood in, and at 09:30 there, 02:30 in
    New York, the SMS went. Now it waits for the daytime the region shares."""
    ctx = DecisionContext.from_profile(snapshot(locale="en-US"), default_timezone="Asia/Jerusalem")
    assert ctx.timezone == JLM  # still the caps' calendar day
    assert len(ctx.quiet_zones) > 1
    new_york = ZoneInfo("America/New_York")
    at = datetime(2026, 6, 3, 9, 30, tzinfo=JLM)  # 02:30 in New York
    d = decide(candidate(), ctx, at)
    assert d.status is S.HELD_QUIET_HOURS
    assert d.send_at is not None
    assert d.send_at.astimezone(new_york).hour == 15
    assert "zones of the customer's region" in d.reason


def test_the_daily_cap_of_a_customer_anywhere_in_a_region_counts_the_region_s_day() -> None:
    """The daytime the US shares, 15:00-21:00 in New York, is 22:00-04:00 in Jerusalem: counted
    on Jerusalem's calendar, a message at 15:30 and another at 17:30 New York time fell on two
    days, and a cap of one marketing message a day let both through."""
    new_york = ZoneInfo("America/New_York")
    first = datetime(2026, 6, 3, 15, 30, tzinfo=new_york)
    ctx = replace(
        DecisionContext.from_profile(snapshot(locale="en-US"), default_timezone="Asia/Jerusalem"),
        history=[sms_sent(first)],
    )
    later = decide(candidate(triggered_at=first), ctx, datetime(2026, 6, 3, 17, 30, tzinfo=new_york))
    assert (later.status, later.cap_name) == (S.CAPPED, "marketing_day")
