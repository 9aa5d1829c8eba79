"""The batch fold (services/kpi/facts.py): register stamps and rows, without a database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from services.kpi.facts import fold, stamp
from shared.events import Event, MessageEvent
from tests.kpi.factories import message, profile, purchase, support, survey_answer, utc


def test_a_stamp_is_utc_time_to_the_microsecond_then_the_event_id() -> None:
    jerusalem_summer = timezone(timedelta(hours=3))
    assert (
        stamp(datetime(2026, 7, 1, 2, 30, tzinfo=jerusalem_summer), "e1") == "2026-06-30T23:30:00.000000|e1"
    )
    assert stamp(datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC), "e2") == "2026-01-02T03:04:05.000007|e2"


def test_stamps_sort_like_time_then_event_id() -> None:
    rng = random.Random(3)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    pairs = [
        (
            base + timedelta(seconds=rng.randrange(3) * 3600, microseconds=rng.randrange(3)),
            f"e{rng.randrange(5)}",
        )
        for _ in range(200)
    ]
    assert sorted(pairs, key=lambda p: stamp(*p)) == sorted(pairs)


def test_an_order_keeps_its_first_date_and_takes_its_newest_amount_whatever_the_order() -> None:
    first = purchase("c", utc(2026, 1, 1), "100", order="o1")
    correction = purchase("c", utc(2026, 5, 20), "90", order="o1")
    for events in ([first, correction], [correction, first]):
        (row,) = fold(events).purchases.values()
        assert (row["event_id"], row["amount"], row["amount_at"]) == (
            correction.event_id,
            correction.amount,
            correction.occurred_at,
        )
        assert row["occurred_at"] == first.occurred_at  # a correction is not a new purchase


def test_support_steps_are_the_batch_rows() -> None:
    rows = fold(
        [
            support("T1", "opened", utc(2026, 1, 1)),
            support("T1", "agent_replied", utc(2026, 1, 1, 11)),
            support("T1", "opened", utc(2026, 1, 1, 12), customer="another"),  # their desk's T1
        ]
    )
    steps = rows.support_steps()
    assert [(s.event_id, s.ticket_id, s.customer_id, s.at, s.action) for s in steps] == [
        (r["event_id"], r["ticket_id"], r["customer_id"], r["occurred_at"], r["action"]) for r in rows.support
    ]
    assert rows.ticket_keys == {("cust-T1", "T1"), ("another", "T1")}


def test_each_register_keeps_its_newest_value_whatever_the_order() -> None:
    """Locale and channel from profiles, tier from messages: each register independently, the
    newest (time, then event id) wins, with the winner's stamp; a time in another zone counts
    as the same instant."""
    jerusalem = timezone(timedelta(hours=2))
    events: list[Event | MessageEvent] = [
        profile("c", utc(2026, 1, 1), locale="en-US", preferred_channel="sms"),
        profile("c", utc(2026, 1, 2), locale="he-IL"),
        message("m1", "c", "sent", datetime(2026, 1, 3, 12, tzinfo=jerusalem), tier="gold"),
        message("m2", "c", "sent", utc(2026, 1, 3, 9), tier="silver"),
        message("m3", "d", "sent", utc(2026, 1, 3, 9), tier=None),
    ]
    for seed in range(5):
        shuffled = random.Random(seed).sample(events, len(events))
        assert fold(shuffled).customers == {
            "c": {
                "customer_id": "c",
                "locale": "he-IL",
                "locale_at": stamp(utc(2026, 1, 2), events[1].event_id),
                "channel": "sms",
                "channel_at": stamp(utc(2026, 1, 1), events[0].event_id),
                "tier": "gold",  # 10:00 UTC, after silver's 09:00
                "tier_at": stamp(utc(2026, 1, 3, 10), "m1:sent"),
            }
        }


def test_a_survey_answer_is_a_fact_of_its_own_and_other_replies_are_not() -> None:
    when = utc(2026, 2, 1)
    answered = survey_answer("m1", "c1", 4, when, channel="whatsapp", tier=None, locale="ar")
    not_scores = [survey_answer(f"m-{i}", "c1", bad, when) for i, bad in enumerate((0, 6, True, "5", 4.5))]
    sms_reply = message("m2", "c1", "replied", when)
    score_on_another_status = message("m3", "c1", "clicked", when).model_copy(
        update={"details": {"survey_score": 5}}
    )
    rows = fold([answered, *not_scores, sms_reply, score_on_another_status])
    assert rows.surveys == [
        {
            "event_id": "m1:replied:survey",
            "message_id": "m1",
            "customer_id": "c1",
            "occurred_at": when,
            "score": 4,
            "journey": "thank_you",
            "channel": "whatsapp",
            "tier": None,
            "locale": "ar",
        }
    ]
    # Every one of them is still a status of its message.
    assert len(rows.messages) == 8


def test_a_later_status_of_a_message_does_not_put_its_older_tier_back() -> None:
    """M1 was decided silver, M2 gold four days later; M1's survey answer (and its delivery
    report) come after M2 with M1's silver: the customer's tier stays gold."""
    events = [
        message("M1", "c", "sent", utc(2026, 3, 1), tier="silver"),
        message("M2", "c", "sent", utc(2026, 3, 5), tier="gold"),
        message("M1", "c", "delivered", utc(2026, 3, 5, 11), tier="silver"),
        survey_answer("M1", "c", 5, utc(2026, 3, 6), tier="silver"),
    ]
    for ordered in (events, events[::-1]):
        assert fold(ordered).customers["c"]["tier"] == "gold"
    # Held overnight, then sent: the held status says the tier (the sending repeats it).
    held = [message("M3", "d", "held_quiet_hours", utc(2026, 3, 1, 21), tier="bronze")]
    assert fold(held).customers["d"]["tier"] == "bronze"


def test_a_message_offers_its_tier_as_of_its_decision() -> None:
    """A marketing SMS decided at 19:00 (silver) is held for quiet hours; a complaint
    acknowledgement at 20:00 finds the customer gold; the SMS goes at 06:00, still saying
    silver: decided earlier, it does not put silver back. With decided_at every status counts."""
    evening = utc(2026, 3, 1, 17)
    events = [
        message("A", "c", "held_quiet_hours", evening, tier="silver", decided_at=evening),
        message("B", "c", "sent", utc(2026, 3, 1, 18), tier="gold", decided_at=utc(2026, 3, 1, 18)),
        message("A", "c", "sent", utc(2026, 3, 2, 4), tier="silver", decided_at=evening),
        message("A", "c", "delivered", utc(2026, 3, 2, 4, 1), tier="silver", decided_at=evening),
    ]
    for ordered in (events, events[::-1]):
        assert fold(ordered).customers["c"]["tier"] == "gold"
    # A message alone: its later statuses say its tier too, as of its decision.
    later = message("D", "e", "clicked", utc(2026, 3, 9), tier="bronze", decided_at=utc(2026, 3, 1))
    assert fold([later]).customers["e"]["tier_at"].startswith("2026-03-01T10:00:00")
