"""consent_for(): profile consent, durable opt-outs, explicit later opt-ins, transactional."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.messenger.consent import ConsentFact, FactSource, active_opt_outs, consent_for
from shared.events import Channel, ConsentState, MessageKind

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
MKT = MessageKind.MARKETING
TRX = MessageKind.TRANSACTIONAL
EMAIL, SMS, WA = Channel.EMAIL, Channel.SMS, Channel.WHATSAPP


def granted(at: datetime = T0, *, yes: bool = True) -> ConsentState:
    return ConsentState(granted=yes, at=at)


def fact(source: FactSource, at: datetime, channel: Channel = SMS, address: str | None = None) -> ConsentFact:
    return ConsentFact(channel=channel, at=at, source=source, address=address)


def test_marketing_needs_an_explicit_grant() -> None:
    assert consent_for(SMS, MKT, {SMS: granted()}, []).allowed
    absent = consent_for(SMS, MKT, {EMAIL: granted()}, [])
    assert not absent.allowed
    assert not absent.suppressed
    assert "never given" in absent.reason
    refused = consent_for(SMS, MKT, {SMS: granted(yes=False)}, [])
    assert not refused.allowed
    assert not refused.suppressed
    assert "refused" in refused.reason


def test_a_soft_opt_in_default_covers_only_silence() -> None:
    assert consent_for(EMAIL, MKT, {}, [], granted_by_default={EMAIL}).allowed
    assert not consent_for(EMAIL, MKT, {EMAIL: granted(yes=False)}, [], granted_by_default={EMAIL}).allowed
    assert not consent_for(SMS, MKT, {}, [], granted_by_default={EMAIL}).allowed


def test_transactional_needs_no_marketing_consent() -> None:
    verdict = consent_for(SMS, TRX, {SMS: granted(yes=False)}, [])
    assert verdict.allowed
    assert "legitimate interest" in verdict.reason
    assert consent_for(WA, TRX, {}, []).allowed


@pytest.mark.parametrize("source", [FactSource.STOP, FactSource.PROVIDER_21610])
def test_stop_blocks_everything_on_that_channel_only(source: FactSource) -> None:
    facts = [fact(source, T0 + H)]
    consents = {SMS: granted(), EMAIL: granted()}
    for kind in (MKT, TRX):
        verdict = consent_for(SMS, kind, consents, facts)
        assert not verdict.allowed
        assert verdict.suppressed
        assert source.value in verdict.reason
    assert consent_for(EMAIL, MKT, consents, facts).allowed


def test_an_unsubscribe_link_blocks_marketing_only() -> None:
    facts = [fact(FactSource.UNSUBSCRIBE_LINK, T0 + H, EMAIL)]
    consents = {EMAIL: granted()}
    assert consent_for(EMAIL, MKT, consents, facts).suppressed
    assert consent_for(EMAIL, TRX, consents, facts).allowed


@pytest.mark.parametrize("source", [FactSource.BOUNCE, FactSource.SPAM_REPORT])
def test_bounces_and_spam_reports_block_all_email(source: FactSource) -> None:
    facts = [fact(source, T0 + H, EMAIL)]
    assert not consent_for(EMAIL, MKT, {EMAIL: granted()}, facts).allowed
    assert not consent_for(EMAIL, TRX, {EMAIL: granted()}, facts).allowed


def test_a_stale_profile_event_never_lifts_a_stop() -> None:
    # The profile's grant is dated before the STOP, however late it arrived.
    facts = [fact(FactSource.STOP, T0 + 2 * H)]
    assert consent_for(SMS, MKT, {SMS: granted(T0 + H)}, facts).suppressed
    # At the same instant the opt-out wins.
    assert consent_for(SMS, MKT, {SMS: granted(T0 + 2 * H)}, facts).suppressed


def test_a_later_profile_grant_lifts_a_stop() -> None:
    facts = [fact(FactSource.STOP, T0 + H)]
    assert consent_for(SMS, MKT, {SMS: granted(T0 + 2 * H)}, facts).allowed
    assert consent_for(SMS, TRX, {SMS: granted(T0 + 2 * H)}, facts).allowed


def test_a_later_refusal_in_the_profile_does_not_lift_anything() -> None:
    facts = [fact(FactSource.STOP, T0 + H)]
    verdict = consent_for(SMS, TRX, {SMS: granted(T0 + 2 * H, yes=False)}, facts)
    assert verdict.suppressed


def test_start_lifts_an_earlier_stop_but_not_a_later_one() -> None:
    consents = {SMS: granted()}
    lifted = [fact(FactSource.STOP, T0 + H), fact(FactSource.START, T0 + 2 * H)]
    assert consent_for(SMS, MKT, consents, lifted).allowed
    again = [*lifted, fact(FactSource.STOP, T0 + 3 * H)]
    assert consent_for(SMS, MKT, consents, again).suppressed
    # Order in the list does not matter, only the instants.
    assert consent_for(SMS, MKT, consents, list(reversed(lifted))).allowed


def test_start_does_not_create_marketing_consent() -> None:
    facts = [fact(FactSource.STOP, T0 + H), fact(FactSource.START, T0 + 2 * H)]
    verdict = consent_for(SMS, MKT, {}, facts)
    assert not verdict.allowed
    assert not verdict.suppressed
    assert consent_for(SMS, TRX, {}, facts).allowed


def test_a_start_on_another_channel_lifts_nothing_here() -> None:
    facts = [fact(FactSource.STOP, T0 + H, SMS), fact(FactSource.START, T0 + 2 * H, WA)]
    assert consent_for(SMS, MKT, {SMS: granted()}, facts).suppressed


def test_only_the_profile_lifts_a_bounce() -> None:
    bounce = fact(FactSource.BOUNCE, T0 + H, EMAIL)
    resubscribed = [bounce, fact(FactSource.RESUBSCRIBE, T0 + 2 * H, EMAIL)]
    assert consent_for(EMAIL, TRX, {EMAIL: granted()}, resubscribed).suppressed
    assert consent_for(EMAIL, TRX, {EMAIL: granted(T0 + 3 * H)}, [bounce]).allowed


def test_a_resubscribe_lifts_an_unsubscribe() -> None:
    facts = [
        fact(FactSource.UNSUBSCRIBE_LINK, T0 + H, EMAIL),
        fact(FactSource.RESUBSCRIBE, T0 + 2 * H, EMAIL),
    ]
    assert consent_for(EMAIL, MKT, {EMAIL: granted()}, facts).allowed


def test_facts_about_an_old_address_do_not_follow_the_customer() -> None:
    facts = [fact(FactSource.BOUNCE, T0 + H, EMAIL, address="old@example.com")]
    consents = {EMAIL: granted()}
    assert consent_for(EMAIL, MKT, consents, facts, address="new@example.com").allowed
    assert consent_for(EMAIL, MKT, consents, facts, address="old@example.com").suppressed
    # Not knowing the address is no reason to ignore the fact.
    assert consent_for(EMAIL, MKT, consents, facts).suppressed
    # An email's case is not another address: a CRM that capitalises it lifts nothing.
    assert consent_for(EMAIL, MKT, consents, facts, address="Old@Example.com").suppressed


def test_an_opt_in_lifts_the_opt_outs_of_its_address_and_those_of_none() -> None:
    stop_old = fact(FactSource.STOP, T0 + H, address="+972500000001")
    start_new = fact(FactSource.START, T0 + 2 * H, address="+972500000002")
    consents = {SMS: granted()}
    # START from the new number says nothing of the old one.
    assert consent_for(SMS, TRX, consents, [stop_old, start_new], address="+972500000001").suppressed
    # A STOP recorded before addresses were kept (none): any later START on the channel lifts it.
    stop_before = fact(FactSource.STOP, T0 + H)
    assert consent_for(SMS, TRX, consents, [stop_before, start_new], address="+972500000003").allowed
    assert consent_for(SMS, TRX, consents, [stop_before], address="+972500000003").suppressed


def test_an_email_resubscribe_lifts_an_unsubscribe_not_a_spam_report() -> None:
    consents = {EMAIL: granted()}
    resubscribed = fact(FactSource.RESUBSCRIBE, T0 + 2 * H, EMAIL)
    unsubscribed = fact(FactSource.UNSUBSCRIBE_LINK, T0 + H, EMAIL)
    assert consent_for(EMAIL, MKT, consents, [unsubscribed, resubscribed]).allowed
    reported = fact(FactSource.SPAM_REPORT, T0 + H, EMAIL, address="noa@example.com")
    assert consent_for(EMAIL, MKT, consents, [reported, resubscribed], address="noa@example.com").suppressed


def test_instants_compare_as_instants_across_a_dst_change() -> None:
    # Israel, 2026-10-25: 01:00–02:00 happens twice. The STOP at the first 01:45 (22:45 UTC)
    # precedes the grant at the second 01:30 (23:30 UTC), though its wall clock reads later.
    jerusalem = ZoneInfo("Asia/Jerusalem")
    stop = fact(FactSource.STOP, datetime(2026, 10, 25, 1, 45, tzinfo=jerusalem))
    grant = ConsentState(granted=True, at=datetime(2026, 10, 25, 1, 30, fold=1, tzinfo=jerusalem))
    assert consent_for(SMS, MKT, {SMS: grant}, [stop]).allowed


def test_active_opt_outs_lists_what_still_blocks() -> None:
    facts = [
        fact(FactSource.STOP, T0 + H),
        fact(FactSource.START, T0 + 2 * H),
        fact(FactSource.PROVIDER_21610, T0 + 3 * H),
    ]
    active = active_opt_outs(SMS, MKT, {SMS: granted()}, facts)
    assert [f.source for f in active] == [FactSource.PROVIDER_21610]


def test_fact_kinds_follow_from_their_source() -> None:
    assert fact(FactSource.START, T0).opt_in
    assert fact(FactSource.RESUBSCRIBE, T0).opt_in
    assert not fact(FactSource.STOP, T0).opt_in
    assert fact(FactSource.UNSUBSCRIBE_LINK, T0).marketing_only
    assert not fact(FactSource.BOUNCE, T0).marketing_only
