"""Provider statuses never move a message backwards; what an email event says. Pure."""

from __future__ import annotations

import pytest

from services.messenger.consent import FactSource
from services.messenger.status import EmailEvent, EmailOutcome, advances, email_outcome, ours


def test_a_late_or_replayed_status_never_moves_a_message_back() -> None:
    assert advances("sent", "delivered")
    assert advances("delivered", "read")
    assert not advances("delivered", "sent")
    assert not advances("delivered", "undelivered")  # delivered is as far as a failure goes
    assert not advances("failed", "delivered")  # a failure is final
    assert not advances("sent", "sent")
    assert not advances("sent", "receiving")  # not a status we rank
    assert (ours("read"), ours("undelivered"), ours("accepted")) == ("delivered", "undelivered", None)


@pytest.mark.parametrize(
    ("event", "outcome"),
    [
        (EmailEvent("a@x.com", "delivered"), EmailOutcome(None, "delivered")),
        # A hard bounce: the address is dead; a block is the receiving server refusing for now.
        (
            EmailEvent("a@x.com", "bounce", type="bounce", reason="550 5.1.1 user unknown"),
            EmailOutcome(FactSource.BOUNCE, "undelivered"),
        ),
        (
            EmailEvent("a@x.com", "bounce", type="blocked", reason="421 try later"),
            EmailOutcome(None, "undelivered"),
        ),
        (EmailEvent("a@x.com", "bounce"), EmailOutcome(FactSource.BOUNCE, "undelivered")),
        # Dropped without trying: for what the address is, or for the message itself.
        (
            EmailEvent("a@x.com", "dropped", reason="Unsubscribed Address"),
            EmailOutcome(FactSource.UNSUBSCRIBE_LINK, "failed"),
        ),
        (
            EmailEvent("a@x.com", "dropped", reason="Spam Reporting Address"),
            EmailOutcome(FactSource.SPAM_REPORT, "failed"),
        ),
        (
            EmailEvent("a@x.com", "dropped", reason="Bounced Address"),
            EmailOutcome(FactSource.BOUNCE, "failed"),
        ),
        (EmailEvent("a@x.com", "dropped", reason="Invalid"), EmailOutcome(FactSource.BOUNCE, "failed")),
        # Our request was at fault, not the address.
        (EmailEvent("a@x.com", "dropped", reason="Invalid SMTPAPI header"), EmailOutcome(None, "failed")),
        (
            EmailEvent("a@x.com", "dropped", reason="Spam Content (if Spam Checker app is enabled)"),
            EmailOutcome(None, "failed"),
        ),
        (EmailEvent("a@x.com", "dropped"), EmailOutcome(None, "failed")),
        # About the address; the message was delivered.
        (EmailEvent("a@x.com", "spamreport"), EmailOutcome(FactSource.SPAM_REPORT, None)),
        (EmailEvent("a@x.com", "group_unsubscribe"), EmailOutcome(FactSource.UNSUBSCRIBE_LINK, None)),
        (EmailEvent("a@x.com", "group_resubscribe"), EmailOutcome(None, None, FactSource.RESUBSCRIBE)),
        (EmailEvent("a@x.com", "deferred", reason="try again"), EmailOutcome(None, None)),
        (EmailEvent("a@x.com", "click"), EmailOutcome(None, None)),
    ],
    ids=lambda v: f"{v.event}:{v.type or v.reason or ''}" if isinstance(v, EmailEvent) else "",
)
def test_what_an_email_event_says_of_its_message_and_address(
    event: EmailEvent, outcome: EmailOutcome
) -> None:
    assert email_outcome(event) == outcome
