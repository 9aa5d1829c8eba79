"""Conversion of outreach against answers computed by hand (docs/kpis.md, "Conversion")."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.kpi.conversion import (
    Arm,
    MessageFact,
    Purchases,
    build_message,
    build_messages,
    outcome,
    summarize,
)
from services.kpi.fx import Fx
from services.kpi.stats import newcombe_difference, wilson

WINDOW = timedelta(days=7)
FX = Fx("ILS", {"USD": Decimal("3.65")})


def at(day: int, hour: int = 10, minute: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, tzinfo=UTC)


def fact(message: str, customer: str, status: str, when: datetime, **kw: object) -> MessageFact:
    fields: dict[str, object] = {"journey": "welcome", "channel": "sms", "tier": "gold", "locale": "he-IL"}
    fields.update(kw)
    return MessageFact(
        event_id=f"{message}:{status}:{when.isoformat()}",
        message_id=message,
        customer_id=customer,
        status=status,
        at=when,
        **fields,  # type: ignore[arg-type]
    )


def facts() -> list[MessageFact]:
    return [
        # Sent, delivered, answered; a purchase 2 days later converts it.
        fact("M1", "c1", "queued", at(10, 9, 59)),
        fact("M1", "c1", "sent", at(10)),
        fact("M1", "c1", "delivered", at(10, 10, 1)),
        fact("M1", "c1", "replied", at(10, 12)),
        # Sent but failed at the provider; the customer bought anyway (it still counts).
        fact("M2", "c2", "sent", at(10, 11)),
        fact("M2", "c2", "failed", at(10, 11, 1)),
        # An e-mail, delivered, clicked twice, no purchase.
        fact("M3", "c3", "sent", at(11), channel="email"),
        fact("M3", "c3", "delivered", at(11, 10, 5), channel="email"),
        fact("M3", "c3", "clicked", at(11, 12), channel="email"),
        fact("M3", "c3", "clicked", at(11, 13), channel="email"),
        # Holdout: held back for the journey's control group.
        fact("M4", "c4", "holdout", at(10), channel=None, holdout=True),
        fact("M5", "c5", "holdout", at(10), channel=None, holdout=True),
        # Capped: never sent, never attempted.
        fact("M6", "c6", "capped", at(10)),
        # Sent on WhatsApp; the purchase that follows is in a currency without a rate.
        fact("M7", "c7", "sent", at(12), channel="whatsapp", tier=None),
    ]


def purchases() -> dict[str, Purchases]:
    def bought(*rows: tuple[datetime, str, str]) -> Purchases:
        return [(when, FX.convert(Decimal(amount), currency)) for when, amount, currency in rows]

    return {
        "c1": bought((at(12), "100", "ILS"), (at(20), "500", "ILS")),  # the 20th is outside
        "c2": bought((at(11), "50", "USD")),  # 182.50 ILS
        "c4": bought((at(15), "80", "ILS")),
        "c7": bought((at(13), "1000", "JPY")),
    }


def test_a_message_from_its_events() -> None:
    m1 = build_message([f for f in facts() if f.message_id == "M1"])
    assert (m1.arm, m1.at, m1.attempted, m1.delivered, m1.failed, m1.replies) == (
        Arm.TREATMENT,
        at(10),
        True,
        True,
        False,
        1,
    )
    m6 = build_message([f for f in facts() if f.message_id == "M6"])
    assert (m6.arm, m6.attempted) == (None, False)
    m4 = build_message([f for f in facts() if f.message_id == "M4"])
    assert (m4.arm, m4.channel, m4.at) == (Arm.HOLDOUT, None, at(10))


def test_events_in_any_order_give_the_same_messages() -> None:
    expected = sorted(build_messages(facts()), key=lambda m: m.message_id)
    shuffled = random.Random(4).sample(facts(), len(facts()))
    assert sorted(build_messages(shuffled), key=lambda m: m.message_id) == expected


def test_the_window_is_open_at_the_start_and_closed_at_the_end() -> None:
    m = build_message([fact("M", "c", "sent", at(10))])
    assert outcome(m, [(at(10), Decimal(5))], WINDOW).purchases == 0  # at the sending: not after it
    assert outcome(m, [(at(17), Decimal(5))], WINDOW).purchases == 1  # exactly 7 days: inside
    assert outcome(m, [(at(17) + timedelta(seconds=1), Decimal(5))], WINDOW).purchases == 0


def test_conversion_uplift_revenue_and_delivery() -> None:
    s = summarize(build_messages(facts()), purchases(), WINDOW)
    # Treatment: M1, M2, M3, M7 sent; M1, M2, M7 followed by a purchase.
    assert (s.sent, s.conversions, s.conversion_rate) == (4, 3, 0.75)
    # Revenue: 100 ILS (M1) + 50 USD = 182.50 ILS (M2); M7's yen are not converted.
    assert s.revenue == Decimal("282.50")
    assert s.revenue_per_message == Decimal("70.625")
    assert s.unconverted_purchases == 1
    # Holdout: M4 (bought on the 15th) and M5.
    assert (s.holdout, s.holdout_conversions, s.holdout_rate) == (2, 1, 0.5)
    # The uplift is intent to treat: every message of the journey not held out, sent or not
    # (M6 was capped), from its decision. M1, M2 and M7 were followed by a purchase; M3, M6 not.
    assert (s.assigned, s.assigned_conversions, s.assigned_rate) == (5, 3, 0.6)
    assert s.uplift == pytest.approx(0.6 - 0.5)
    expected = newcombe_difference(3, 5, 1, 2)
    assert expected is not None
    assert (s.uplift_ci_low, s.uplift_ci_high) == pytest.approx(expected[1:])
    # Delivery: 4 attempted, M1 and M3 delivered, M2 failed.
    assert (s.attempted, s.delivered, s.failed) == (4, 2, 1)
    assert (s.delivery_rate, s.failure_rate) == (0.5, 0.25)
    # Actions of delivered messages: M1 a reply and a purchase, M3 two clicks.
    assert s.actions == 4
    assert s.actions_per_engagement == 2.0


def test_the_uplift_leaves_out_journeys_without_both_arms() -> None:
    """A journey without a holdout group (complaint acknowledgements) converts at its own rate:
    it is in the conversion rate, not in the uplift; nor is a holdout with nothing sent."""
    extra = [
        # complaint_ack, sent to everyone: c1 and c2 buy within 7 days of the 10th.
        fact("A1", "c1", "sent", at(10), journey="complaint_ack"),
        fact("A2", "c2", "sent", at(10), journey="complaint_ack"),
        # win_back held back but sent to no one in the period: c4 bought on the 15th.
        fact("W1", "c4", "holdout", at(10), journey="win_back", holdout=True),
    ]
    s = summarize(build_messages([*facts(), *extra]), purchases(), WINDOW)
    assert (s.sent, s.conversions) == (6, 5)  # M1, M2, M3, M7 and A1, A2; all but M3 converted
    # The uplift's arms are welcome's alone: 3/5 assigned against 1/2 held back (M4, M5; not
    # W1, whose journey sent nothing), as without the others.
    assert (s.assigned, s.assigned_conversions, s.holdout, s.holdout_conversions) == (5, 3, 2, 1)
    assert s.uplift == pytest.approx(0.6 - 0.5)
    expected = newcombe_difference(3, 5, 1, 2)
    assert expected is not None
    assert (s.uplift_ci_low, s.uplift_ci_high) == pytest.approx(expected[1:])
    ack_only = summarize(build_messages(extra[:2]), purchases(), WINDOW)
    assert (ack_only.conversion_rate, ack_only.uplift) == (1.0, None)


def test_the_uplift_counts_from_the_decision() -> None:
    """A message held for quiet hours and sent two days later: a purchase in between follows
    the decision (the holdout is measured from its decision too), not the sending."""
    held_then_sent = [
        fact("Q1", "c8", "held_quiet_hours", at(10)),
        fact("Q1", "c8", "sent", at(12)),
        fact("H1", "c9", "holdout", at(10), channel=None, holdout=True),
    ]
    bought = {"c8": [(at(11), Decimal(40))]}
    s = summarize(build_messages(held_then_sent), bought, WINDOW)
    assert (s.sent, s.conversions) == (1, 0)  # bought before it was sent
    assert (s.assigned, s.assigned_conversions, s.holdout, s.holdout_conversions) == (1, 1, 1, 0)
    assert s.uplift == 1.0


def test_breakdown_by_channel() -> None:
    messages = build_messages(facts())
    sms = summarize([m for m in messages if m.channel == "sms"], purchases(), WINDOW)
    assert (sms.sent, sms.conversions, sms.delivered, sms.failed) == (2, 2, 1, 1)
    assert sms.delivery_rate == 0.5
    email = summarize([m for m in messages if m.channel == "email"], purchases(), WINDOW)
    assert (email.sent, email.conversions, email.actions_per_engagement) == (1, 0, 2.0)


def test_an_empty_period() -> None:
    s = summarize([], {}, WINDOW)
    assert (s.sent, s.holdout) == (0, 0)
    assert s.conversion_rate is None
    assert s.uplift is None
    assert s.revenue == 0
    assert s.revenue_per_message is None
    assert s.delivery_rate is None
    assert s.actions_per_engagement is None


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873-890, table II, example (a):
    # 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    result = newcombe_difference(56, 70, 48, 80)
    assert result is not None
    d, low, high = result
    assert d == pytest.approx(0.2)
    assert low == pytest.approx(0.0524, abs=5e-5)
    assert high == pytest.approx(0.3339, abs=5e-5)
    # Example (f): 0/10 - 0/20, method 10: -0.1611 to 0.2775.
    result = newcombe_difference(0, 10, 0, 20)
    assert result is not None
    assert result[1:] == pytest.approx((-0.1611, 0.2775), abs=5e-5)
    assert newcombe_difference(1, 0, 1, 2) is None


def test_wilson_interval() -> None:
    # Newcombe (1998b) single proportions: 81/263 → 0.2553 to 0.3662 (method 3).
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson(0, 0) == (0.0, 1.0)
