"""Which provider status may replace which: a replayed or late callback never moves a message
backwards (queued → sent → delivered / undelivered / failed → read); and what an email event
says of its message and its address. Pure."""

from __future__ import annotations

from typing import NamedTuple

from services.messenger.consent import FactSource

# Twilio's message statuses, by how far along they are.
_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 0,
    "sending": 1,
    "sent": 2,
    "delivered": 3,
    "undelivered": 3,
    "failed": 3,
    "read": 4,  # WhatsApp: after delivered
}
TERMINAL = frozenset({"delivered", "undelivered", "failed", "read"})


def ours(provider_status: str) -> str | None:
    """Our ledger status for a provider status (None for statuses we do not track)."""
    return {
        "sent": "sent",
        "delivered": "delivered",
        "read": "delivered",
        "undelivered": "undelivered",
        "failed": "failed",
    }.get(provider_status)


def advances(current: str, incoming: str) -> bool:
    """Whether ``incoming`` (a provider status) may replace ``current`` (ours or provider's)."""
    if incoming not in _RANK:
        return False
    if current in ("undelivered", "failed"):
        return False  # a failure is final; a later 'delivered' would be a provider bug
    if current == "delivered":
        return incoming == "read"
    return _RANK[incoming] > _RANK.get(current, -1)


class EmailEvent(NamedTuple):
    """One event of SendGrid's event webhook, as far as Retain reads it."""

    address: str
    event: str  # delivered, bounce, dropped, spamreport, unsubscribe, click, …
    message_id: str | None = None  # our id, echoed from the send's custom_args
    type: str | None = None  # bounce: "bounce" (permanent) or "blocked" (temporary)
    reason: str | None = None  # bounce and dropped: why
    event_id: str | None = None  # sg_event_id: the same in every delivery of the event


class EmailOutcome(NamedTuple):
    opt_out: FactSource | None  # the consent fact about the address, if any
    status: str | None  # what became of the message (a provider status), if anything
    opt_in: FactSource | None = None  # the customer subscribed again


# Why SendGrid dropped a message without trying, and what that says of the address. Any
# other reason ("Spam Content …", "Invalid SMTPAPI header": our request) is about the message.
_DROPPED = {
    "Unsubscribed Address": FactSource.UNSUBSCRIBE_LINK,
    "Spam Reporting Address": FactSource.SPAM_REPORT,
    "Bounced Address": FactSource.BOUNCE,
    "Invalid": FactSource.BOUNCE,  # the address is not one
}


def email_outcome(e: EmailEvent) -> EmailOutcome:
    """A bounce is the message undelivered and, unless the receiving server only blocked it for
    now (``type`` blocked: our IP, a full mailbox), the address dead; a drop is the message
    failed, and the address suppressed when SendGrid dropped it for what the address is; a spam
    report or an unsubscribe is about the address (the message was delivered)."""
    if e.event == "delivered":
        return EmailOutcome(None, "delivered")
    if e.event == "bounce":
        return EmailOutcome(None if e.type == "blocked" else FactSource.BOUNCE, "undelivered")
    if e.event == "dropped":
        return EmailOutcome(_DROPPED.get((e.reason or "").strip()), "failed")
    if e.event == "spamreport":
        return EmailOutcome(FactSource.SPAM_REPORT, None)
    if e.event in ("unsubscribe", "group_unsubscribe"):
        return EmailOutcome(FactSource.UNSUBSCRIBE_LINK, None)
    if e.event == "group_resubscribe":
        # On SendGrid's preference page: lifts their unsubscribes, not a spam report (consent.py).
        return EmailOutcome(None, None, FactSource.RESUBSCRIBE)
    return EmailOutcome(None, None)
