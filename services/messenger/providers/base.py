"""What every provider takes, returns and raises.

A provider hands one decided message to the outside world (Twilio, an SMTP server, SendGrid,
or the sandbox outbox) and says what came back. It never decides whether to send, and it never
retries on its own: pacing and retries live in ``ratelimit`` and ``retry`` so every provider
gets the same behaviour and the tests can drive it with a fake clock.

"Never twice" is shared between the caller and the provider: the caller commits a ledger row
(``pending``) before calling ``send``; after a crash between the provider call and the commit
that records ``sent``, the reconciler calls ``lookup`` to find the message at the provider and
settles the row instead of sending again. Providers that cannot look a message up return None
from ``lookup`` and say in their docstring what makes a resend safe instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

from shared.events import Channel

DeliveryStatus = Literal["sent", "queued"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message, fully decided and rendered, ready for a provider."""

    # Our ledger id: the idempotency / correlation key at every provider that has one.
    message_id: str
    channel: Channel
    # Email address, or E.164 number for SMS and WhatsApp (a "whatsapp:" prefix is optional).
    to: str
    # The sender: an email address (display name allowed) or a Twilio number / sender id.
    from_: str
    text: str
    created_at: datetime
    subject: str | None = None
    html: str | None = None
    locale: str = "en"
    # Extra email headers, e.g. List-Unsubscribe (List-Unsubscribe-Post is added for http(s) URIs).
    headers: Mapping[str, str] = field(default_factory=dict)
    # WhatsApp templates (required outside the 24-hour window): Twilio content SID + variables.
    content_sid: str | None = None
    content_variables: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.created_at.tzinfo is None:
            raise ValueError("OutgoingMessage.created_at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class ProviderResult:
    provider: str
    provider_message_id: str
    # "sent": handed over for delivery (SMTP accepted it, file written, Twilio reports sent);
    # "queued": accepted by the provider's queue, delivery reported later (Twilio, SendGrid).
    status: DeliveryStatus
    raw_status: str


class ProviderError(Exception):
    """A provider said no, or could not be reached.

    ``code`` is the provider's own error code where it has one (Twilio "21610", SMTP "550",
    HTTP "429"), else a short word ("timeout", "network"). ``permanent`` errors are failed at
    once; the others may be retried after ``retry_after`` seconds (the provider's hint) or our
    own backoff. ``suppress_address`` means the address itself is dead on this channel (invalid
    number, unsubscribed recipient, unknown mailbox). ``maybe_delivered`` means the request may
    have reached the provider before the failure (a timeout after sending, a 5xx): look the
    message up before sending it again.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        permanent: bool,
        retry_after: float | None = None,
        suppress_address: bool = False,
        maybe_delivered: bool = False,
        provider: str = "",
    ) -> None:
        super().__init__(f"{provider or 'provider'} error {code}: {message}")
        self.code = code
        self.message = message
        self.permanent = permanent
        self.retry_after = retry_after
        self.suppress_address = suppress_address
        self.maybe_delivered = maybe_delivered
        self.provider = provider

    @property
    def retryable(self) -> bool:
        return not self.permanent


class Provider(Protocol):
    # Stable name recorded in the ledger ("twilio", "smtp", "sendgrid", "outbox").
    @property
    def name(self) -> str: ...

    # Whether sends are paced per sender (Twilio's per-number throughput); see ratelimit.
    @property
    def paced(self) -> bool: ...

    # Whether ``lookup`` can find a sent message (the outbox, Twilio): then a result need not
    # be committed before the sender's slot takes the next message, since after a crash the
    # reconciler finds it instead of sending it again.
    @property
    def can_look_up(self) -> bool: ...

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        """Hand ``msg`` over; raise ``ProviderError`` when the provider refuses or fails."""
        ...

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        """Find ``msg`` at the provider after a crash between ``send`` and the commit."""
        ...

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
