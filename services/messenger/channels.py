"""Which channel a message goes out on, and in which WhatsApp mode. Pure.

Rules:

1. Channels are tried in order: the preferred channel (the candidate's override, else the
   profile's preference), then the configured fallback order; a channel is tried once. The
   deployment's last-resort channels (no provider while others have one: the sandbox outbox)
   keep that order among themselves after all the others: a customer is reached for real on
   another channel they can be reached on rather than recorded as sent on one nobody receives.
2. A channel is skipped when the customer has no address on it (``no_address``), when consent
   blocks it (``suppressed`` for an active opt-out, ``no_consent`` otherwise), when the message
   has no template on it (``no_template``: a marketer's campaign written for email only goes by
   email to a customer who prefers SMS, rather than failing) or, for WhatsApp outside the
   24-hour customer-service window, when the message has no approved template (``no_template``):
   business-initiated WhatsApp outside the window must use an approved template (a content
   SID); inside it, free-form text is allowed.
3. When nothing is left, the outcome names why, judged over the channels that have an address
   (a customer we cannot reach at all is ``no_address``): ``no_consent`` if any of them merely
   lacks consent, ``suppressed`` if every one of them is opted out, else ``no_template``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from services.messenger.consent import ConsentVerdict
from shared.events import Channel

WHATSAPP_SESSION = timedelta(hours=24)
NO_TEMPLATE = "whatsapp: outside the 24-hour window and no approved template"

SkipReason = Literal["no_address", "no_consent", "suppressed", "no_template"]
WhatsAppMode = Literal["template", "freeform"]


class Skipped(NamedTuple):
    channel: Channel
    reason: SkipReason
    detail: str


@dataclass(frozen=True, slots=True)
class ChannelChoice:
    channel: Channel | None
    # Why no channel was chosen (None when one was).
    outcome: SkipReason | None
    tried: tuple[Skipped, ...]
    whatsapp_mode: WhatsAppMode | None = None


def whatsapp_window_open(last_inbound_at: datetime | None, now: datetime) -> bool:
    """Whether the 24-hour customer-service window, opened by the customer's last WhatsApp
    message, is still open at ``now`` (it closes exactly 24 hours after that message)."""
    if last_inbound_at is None:
        return False
    # In UTC: two datetimes sharing a ZoneInfo subtract as wall clocks, wrong across DST.
    return now.astimezone(UTC) - last_inbound_at.astimezone(UTC) < WHATSAPP_SESSION


def channel_order(
    preferred: Channel | None, fallback_order: Iterable[Channel], last_resort: Collection[Channel] = ()
) -> list[Channel]:
    order = [] if preferred is None else [preferred]
    for channel in fallback_order:
        if channel not in order:
            order.append(channel)
    if not last_resort:
        return order
    return [c for c in order if c not in last_resort] + [c for c in order if c in last_resort]


def _outcome(tried: Iterable[Skipped]) -> SkipReason:
    reachable = [s.reason for s in tried if s.reason != "no_address"]
    if not reachable:
        return "no_address"
    if "no_consent" in reachable:
        return "no_consent"
    if all(r == "suppressed" for r in reachable):
        return "suppressed"
    return "no_template"


def choose_channel(
    preferred: Channel | None,
    fallback_order: Iterable[Channel],
    last_resort: Collection[Channel],
    addresses: Mapping[Channel, str | None],
    consent: Callable[[Channel], ConsentVerdict],
    whatsapp_window_open: bool,
    has_whatsapp_template: bool,
    templated: Collection[Channel] = frozenset(Channel),
) -> ChannelChoice:
    """The first usable channel in order, or why there is none (rules: module doc);
    ``templated``: the channels the message has a template on."""
    tried: list[Skipped] = []
    for channel in channel_order(preferred, fallback_order, last_resort):
        if not addresses.get(channel):
            tried.append(Skipped(channel, "no_address", f"{channel.value}: no address"))
            continue
        verdict = consent(channel)
        if not verdict.allowed:
            reason: SkipReason = "suppressed" if verdict.suppressed else "no_consent"
            tried.append(Skipped(channel, reason, verdict.reason))
            continue
        if channel not in templated:
            detail = f"{channel.value}: the message has no template on it"
            tried.append(Skipped(channel, "no_template", detail))
            continue
        mode: WhatsAppMode | None = None
        if channel is Channel.WHATSAPP:
            if whatsapp_window_open:
                mode = "freeform"
            elif has_whatsapp_template:
                mode = "template"
            else:
                detail = NO_TEMPLATE
                tried.append(Skipped(channel, "no_template", detail))
                continue
        return ChannelChoice(channel, None, tuple(tried), mode)
    return ChannelChoice(None, _outcome(tried), tuple(tried))
