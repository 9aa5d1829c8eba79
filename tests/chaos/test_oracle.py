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


def violations(*messages: tuple[Ledger, Call]) -> list[str]:
    delivery = check_delivery([m[0] for m in messages], [m[1] for m in messages], [], [], {}, {})
    return delivery.cap_violations


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
