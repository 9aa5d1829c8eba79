"""The chaos suite's delivery oracle on hand-made ledgers: what it counts as a cap violation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.events import Channel, MessageKind
from tests.chaos.oracle import Call, Ledger, check_delivery

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)  # noon in Jerusalem: no quiet hours


def sent(
    message_id: str, customer: str, kind: MessageKind, decided_s: float, called_s: float
) -> tuple[Ledger, Call]:
    row = Ledger(
        message_id,
        customer,
        "welcome" if kind is MessageKind.MARKETING else "complaint_ack",
        kind,
        Channel.EMAIL,
        "sent",
        None,
        T0 + timedelta(seconds=decided_s),
    )
    return row, Call(message_id, Channel.EMAIL, T0 + timedelta(seconds=called_s))


def violations(*messages: tuple[Ledger, Call], decided_order: dict[str, int] | None = None) -> list[str]:
    ledger, calls = [m[0] for m in messages], [m[1] for m in messages]
    return check_delivery(ledger, calls, [], [], {}, {}, decided_order=decided_order).cap_violations


def test_a_transactional_send_decided_after_a_marketing_one_is_no_violation_whichever_goes_first() -> None:
    """The daily marketing cap counts transactional sends too, but holds back a marketing
    message by what was decided before it: an acknowledgement decided after the welcome and
    handed to the provider a moment before it breaks nothing."""
    welcome = sent("welcome", "c1", MessageKind.MARKETING, decided_s=0, called_s=2)
    ack = sent("ack", "c1", MessageKind.TRANSACTIONAL, decided_s=1, called_s=1.5)
    assert violations(welcome, ack) == []


def test_a_marketing_send_decided_after_another_send_that_day_is_a_violation() -> None:
    ack = sent("ack", "c1", MessageKind.TRANSACTIONAL, decided_s=0, called_s=3)
    welcome = sent("welcome", "c1", MessageKind.MARKETING, decided_s=1, called_s=2)
    first = sent("first", "c2", MessageKind.MARKETING, decided_s=0, called_s=1)
    second = sent("second", "c2", MessageKind.MARKETING, decided_s=5, called_s=6)
    found = violations(ack, welcome, first, second)
    assert [v.split(":")[0] for v in found] == ["welcome", "second"]
    assert all("marketing_day" in v for v in found)


def test_messages_decided_in_one_batch_are_judged_in_the_order_they_were_published() -> None:
    """One batch decides a tier upgrade, then the acknowledgement of a complaint: both carry the
    batch's instant. Ordered by message id the acknowledgement would come first and the upgrade
    look over the daily cap; their first events on retain.messages give the real order."""
    upgrade = sent("b-upgrade", "c1", MessageKind.MARKETING, decided_s=0, called_s=5)
    ack = sent("a-ack", "c1", MessageKind.TRANSACTIONAL, decided_s=0, called_s=4)
    assert violations(upgrade, ack, decided_order={"b-upgrade": 10, "a-ack": 11}) == []
    # Published the other way round, the upgrade was decided after the acknowledgement.
    found = violations(upgrade, ack, decided_order={"b-upgrade": 11, "a-ack": 10})
    assert [v.split(":")[0] for v in found] == ["b-upgrade"]
