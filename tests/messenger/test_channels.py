"""choose_channel() and the WhatsApp 24-hour window."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.messenger.channels import ChannelChoice, channel_order, choose_channel, whatsapp_window_open
from services.messenger.consent import ConsentVerdict
from shared.events import Channel

EMAIL, SMS, WA = Channel.EMAIL, Channel.SMS, Channel.WHATSAPP
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ALL = {EMAIL: "noa@example.co.il", SMS: "+972521234567", WA: "+972521234567"}
ORDER = (EMAIL, WA, SMS)


def consenting(
    refused: Mapping[Channel, str] | None = None,
) -> Callable[[Channel], ConsentVerdict]:
    """Every channel consented except those in ``refused`` ("no" or "stop")."""
    refused = refused or {}

    def verdict(channel: Channel) -> ConsentVerdict:
        how = refused.get(channel)
        if how is None:
            return ConsentVerdict(allowed=True, reason="ok")
        return ConsentVerdict(allowed=False, reason=f"{channel.value}: {how}", suppressed=how == "stop")

    return verdict


def choose(
    preferred: Channel | None = None,
    addresses: Mapping[Channel, str | None] = ALL,
    consent: Callable[[Channel], ConsentVerdict] | None = None,
    *,
    window: bool = False,
    template: bool = True,
    order: tuple[Channel, ...] = ORDER,
    last_resort: frozenset[Channel] = frozenset(),
    templated: frozenset[Channel] = frozenset(Channel),
) -> ChannelChoice:
    return choose_channel(
        preferred, order, last_resort, addresses, consent or consenting(), window, template, templated
    )


def test_the_preferred_channel_comes_first() -> None:
    choice = choose(SMS)
    assert choice.channel is SMS
    assert choice.outcome is None
    assert choice.tried == ()


def test_without_a_preference_the_fallback_order_decides() -> None:
    assert choose(None).channel is EMAIL
    assert choose(None, order=(SMS, EMAIL)).channel is SMS


def test_channels_without_address_or_consent_are_skipped_in_order() -> None:
    choice = choose(WA, {EMAIL: "a@example.com", SMS: "+972521234567", WA: None}, consenting({EMAIL: "no"}))
    assert choice.channel is SMS
    assert [(s.channel, s.reason) for s in choice.tried] == [(WA, "no_address"), (EMAIL, "no_consent")]


def test_a_channel_the_message_has_no_template_on_is_passed_over() -> None:
    """A campaign written for email only, to a customer who prefers SMS: it goes by email rather
    than failing to render; with no channel it has a template on, the outcome says so."""
    choice = choose(SMS, templated=frozenset({EMAIL}))
    assert choice.channel is EMAIL
    assert [(s.channel, s.reason) for s in choice.tried] == [(SMS, "no_template")]
    assert "no template" in choice.tried[0].detail
    nowhere = choose(SMS, {EMAIL: None, SMS: "+972521234567", WA: None}, templated=frozenset({EMAIL}))
    assert (nowhere.channel, nowhere.outcome) == (None, "no_template")
    # No address and no consent still say so first: they are the customer's, not the template's.
    refused = choose(SMS, {EMAIL: None, SMS: "+972521234567", WA: None}, consenting({SMS: "no"}))
    assert refused.outcome == "no_consent"


def test_each_channel_is_tried_once() -> None:
    choice = choose(WA, order=(EMAIL, WA, EMAIL), consent=consenting({WA: "no", EMAIL: "no"}))
    assert choice.channel is None
    assert [s.channel for s in choice.tried] == [WA, EMAIL]


def test_a_channel_without_a_provider_is_tried_after_every_other() -> None:
    # Only email really goes: the customer who prefers SMS is written to by email.
    choice = choose(SMS, last_resort=frozenset({SMS, WA}))
    assert choice.channel is EMAIL
    assert choice.tried == ()
    assert channel_order(SMS, ORDER, {SMS, WA}) == [EMAIL, SMS, WA]  # their own order kept
    assert channel_order(WA, ORDER, {EMAIL}) == [WA, SMS, EMAIL]


def test_the_last_resort_still_takes_a_customer_reachable_nowhere_else() -> None:
    choice = choose(SMS, {EMAIL: None, SMS: "+972521234567", WA: None}, last_resort=frozenset({SMS, WA}))
    assert choice.channel is SMS
    assert [(s.channel, s.reason) for s in choice.tried] == [(EMAIL, "no_address")]
    refused = choose(SMS, consent=consenting({EMAIL: "stop"}), last_resort=frozenset({SMS, WA}))
    assert refused.channel is SMS  # email opted out: SMS, the sandbox, as before
    assert [(s.channel, s.reason) for s in refused.tried] == [(EMAIL, "suppressed")]


def test_empty_addresses_count_as_none() -> None:
    choice = choose(EMAIL, {EMAIL: "", SMS: None, WA: None})
    assert choice.channel is None
    assert choice.outcome == "no_address"


@pytest.mark.parametrize(
    ("refused", "outcome"),
    [
        ({EMAIL: "stop", SMS: "stop", WA: "stop"}, "suppressed"),
        ({EMAIL: "stop", SMS: "no", WA: "stop"}, "no_consent"),
        ({EMAIL: "no", SMS: "no", WA: "no"}, "no_consent"),
    ],
)
def test_the_outcome_says_why_nothing_is_left(refused: dict[Channel, str], outcome: str) -> None:
    choice = choose(None, consent=consenting(refused))
    assert choice.channel is None
    assert choice.outcome == outcome
    assert len(choice.tried) == 3


def test_suppressed_needs_every_reachable_channel_opted_out() -> None:
    # No address on SMS and WhatsApp: the one reachable channel decides.
    choice = choose(None, {EMAIL: "a@example.com"}, consenting({EMAIL: "stop"}))
    assert choice.outcome == "suppressed"


def test_whatsapp_inside_the_window_is_free_form() -> None:
    choice = choose(WA, window=True, template=False)
    assert (choice.channel, choice.whatsapp_mode) == (WA, "freeform")


def test_whatsapp_outside_the_window_needs_a_template() -> None:
    assert choose(WA, window=False, template=True).whatsapp_mode == "template"
    choice = choose(WA, window=False, template=False)
    assert choice.channel is EMAIL
    assert choice.whatsapp_mode is None
    assert choice.tried[0].reason == "no_template"


def test_only_whatsapp_reachable_without_a_template() -> None:
    choice = choose(WA, {WA: "+972521234567"}, template=False)
    assert choice.channel is None
    assert choice.outcome == "no_template"


def test_other_channels_have_no_whatsapp_mode() -> None:
    assert choose(SMS, window=True).whatsapp_mode is None


def test_the_window_lasts_24_hours_from_the_last_inbound_message() -> None:
    assert not whatsapp_window_open(None, NOW)
    assert whatsapp_window_open(NOW - timedelta(hours=23, minutes=59), NOW)
    assert not whatsapp_window_open(NOW - timedelta(hours=24), NOW)
    assert whatsapp_window_open(NOW, NOW)


def test_the_window_is_24_real_hours_across_a_dst_change() -> None:
    # New York, 2026-03-08 skips an hour: 24 real hours after 08:00 EST is 09:00 EDT, so at
    # 08:30 (24.5 hours by the wall clock, 23.5 in fact) the window is still open.
    ny = ZoneInfo("America/New_York")
    last = datetime(2026, 3, 7, 8, 0, tzinfo=ny)
    assert whatsapp_window_open(last, datetime(2026, 3, 8, 8, 30, tzinfo=ny))
    assert not whatsapp_window_open(last, datetime(2026, 3, 8, 9, 0, tzinfo=ny))
