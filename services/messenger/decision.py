"""THE decision for one candidate message: whether, when and how it reaches the customer. Pure.

The checks run in this order and the first that says no is the outcome, with its reason:

1. ``duplicate``: the candidate's idempotency key is already in the ledger (the caller looked).
   It comes first because a replayed trigger is not a new candidate: it must not be assigned,
   counted or recorded a second time.
2. ``holdout``: the customer is in the journey's holdout group, a deterministic share of
   customers per journey (``in_holdout``), so the KPI service can measure what the journey
   adds. Assignment does not depend on consent or address (intent to treat); transactional
   messages are never held out.
3. consent and channel (``choose_channel`` with ``consent_for``): ``no_address``,
   ``no_consent``, ``suppressed`` (every channel we could use is opted out), or ``failed``
   when only WhatsApp was usable and it needed a template the message does not have.
4. ``capped``: frequency caps, judged at the moment the message would go, so a message held
   overnight is not capped by yesterday's daily cap.
5. ``held_quiet_hours``: marketing inside the customer's quiet hours or day of rest waits until
   they end (``send_at``); transactional goes at once.
6. ``expired``: the message would go at or after its trigger time plus the journey's TTL.

Otherwise ``queued``: go now, on ``channel`` (and ``whatsapp_mode``).

``recheck_at_send`` runs checks 3–6 again for a held message when its window opens: consent may
have been withdrawn, caps used up, the WhatsApp window closed, the configuration changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from services.messenger.caps import DEFAULT_CAPS, Cap, CapCandidate, SentRecord, check_caps
from services.messenger.channels import (
    ChannelChoice,
    Skipped,
    SkipReason,
    WhatsAppMode,
    choose_channel,
    whatsapp_window_open,
)
from services.messenger.consent import ConsentFact, ConsentVerdict, consent_for
from services.messenger.quiet import (
    QuietHours,
    customer_zone,
    is_quiet,
    next_send_time_everywhere,
    region_zones,
)
from shared.events import Channel, ConsentState, MessageKind, MessageStatus, ProfileSnapshot

# Cheapest and least intrusive first; SMS last (the seeds: don't bombard customers by SMS).
DEFAULT_FALLBACK_ORDER: tuple[Channel, ...] = (Channel.EMAIL, Channel.WHATSAPP, Channel.SMS)

NO_CHANNEL_STATUS: dict[SkipReason, MessageStatus] = {
    "no_address": MessageStatus.NO_ADDRESS,
    "no_consent": MessageStatus.NO_CONSENT,
    "suppressed": MessageStatus.SUPPRESSED,
    "no_template": MessageStatus.FAILED,
}


def holdout_point(customer_id: str, journey: str) -> float:
    """A stable, uniform point in [0, 1) for the pair, the same in every process and release."""
    digest = hashlib.sha256(f"retain-holdout\x1f{journey}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(customer_id: str, journey: str, percent: float) -> bool:
    """Whether the customer is in the journey's ``percent`` % holdout. Raising the percentage
    only adds customers to the holdout; nobody already in it leaves."""
    if not 0 <= percent <= 100:
        raise ValueError(f"holdout percent must be within 0–100, not {percent}")
    return holdout_point(customer_id, journey) < percent / 100


@dataclass(frozen=True, slots=True)
class Candidate:
    message_key: str  # the idempotency key: journey + customer + triggering event
    customer_id: str
    journey: str
    kind: MessageKind
    template: str
    triggered_at: datetime
    channel: Channel | None = None  # overrides the customer's preferred channel
    ttl: timedelta | None = None  # None: never expires
    holdout_percent: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_percent <= 100:
            raise ValueError(f"holdout percent must be within 0–100, not {self.holdout_percent}")
        if self.ttl is not None and self.ttl <= timedelta(0):
            raise ValueError("ttl must be positive")

    @property
    def expires_at(self) -> datetime | None:
        return None if self.ttl is None else self.triggered_at.astimezone(UTC) + self.ttl


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """What the decision needs to know about the customer and the configuration."""

    addresses: Mapping[Channel, str | None]
    consents: Mapping[Channel, ConsentState]
    timezone: ZoneInfo
    locale: str | None = None
    preferred_channel: Channel | None = None
    facts: Sequence[ConsentFact] = ()
    history: Sequence[SentRecord] = ()
    caps: Sequence[Cap] = tuple(DEFAULT_CAPS.caps)
    quiet: QuietHours = field(default_factory=QuietHours)
    fallback_order: Sequence[Channel] = DEFAULT_FALLBACK_ORDER
    whatsapp_last_inbound_at: datetime | None = None
    has_whatsapp_template: bool = False  # the template has an approved WhatsApp content SID
    # The channels the message's template exists on (in the customer's locale chain).
    templated: Collection[Channel] = frozenset(Channel)
    duplicate: bool = False  # the idempotency key is already in the ledger
    granted_by_default: Collection[Channel] = frozenset()  # soft opt-in channels, see consent.py
    # Channels without a provider while others have one (the sandbox): tried after the others.
    last_resort: Collection[Channel] = frozenset()
    # A customer of a region of several zones whose profile names none (en-US): quiet hours
    # hold in each of them (quiet.region_zones), not in ``timezone``, the business's stand-in.
    quiet_zones: tuple[ZoneInfo, ...] = ()

    @classmethod
    def from_profile(
        cls,
        profile: ProfileSnapshot,
        *,
        default_timezone: str | None = None,
        facts: Sequence[ConsentFact] = (),
        history: Sequence[SentRecord] = (),
        caps: Sequence[Cap] = tuple(DEFAULT_CAPS.caps),
        quiet: QuietHours | None = None,
        fallback_order: Sequence[Channel] = DEFAULT_FALLBACK_ORDER,
        whatsapp_last_inbound_at: datetime | None = None,
        has_whatsapp_template: bool = False,
        duplicate: bool = False,
        granted_by_default: Collection[Channel] = frozenset(),
        last_resort: Collection[Channel] = frozenset(),
    ) -> DecisionContext:
        return cls(
            addresses={channel: profile.address(channel) for channel in Channel},
            consents=profile.consents,
            timezone=customer_zone(profile.timezone, profile.locale, default_timezone),
            locale=profile.locale,
            preferred_channel=profile.preferred_channel,
            facts=facts,
            history=history,
            caps=caps,
            quiet=quiet or QuietHours(),
            fallback_order=fallback_order,
            whatsapp_last_inbound_at=whatsapp_last_inbound_at,
            has_whatsapp_template=has_whatsapp_template,
            duplicate=duplicate,
            granted_by_default=granted_by_default,
            last_resort=last_resort,
            quiet_zones=region_zones(profile.timezone, profile.locale),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    status: MessageStatus  # QUEUED means: go now
    reason: str
    channel: Channel | None = None
    send_at: datetime | None = None  # QUEUED: now; HELD_QUIET_HOURS: when the window opens
    whatsapp_mode: WhatsAppMode | None = None
    expires_at: datetime | None = None
    cap_name: str | None = None
    next_allowed_at: datetime | None = None  # CAPPED: when the violated caps would allow it
    skipped: tuple[Skipped, ...] = ()  # channels passed over, with why


def _choose(candidate: Candidate, context: DecisionContext, goes_at: datetime) -> ChannelChoice:
    def consent(channel: Channel) -> ConsentVerdict:
        return consent_for(
            channel,
            candidate.kind,
            context.consents,
            context.facts,
            address=context.addresses.get(channel),
            granted_by_default=context.granted_by_default,
        )

    return choose_channel(
        candidate.channel or context.preferred_channel,
        context.fallback_order,
        context.last_resort,
        context.addresses,
        consent,
        whatsapp_window_open(context.whatsapp_last_inbound_at, goes_at),
        context.has_whatsapp_template,
        context.templated,
    )


def _deliver(candidate: Candidate, context: DecisionContext, now: datetime) -> Decision:
    """Checks 3–6 (module doc)."""
    tz = context.timezone
    expires_at = candidate.expires_at
    marketing = candidate.kind is MessageKind.MARKETING
    zones = context.quiet_zones or (tz,)
    quiet, locale = context.quiet, context.locale
    send_at = next_send_time_everywhere(now, zones, locale, quiet, fallback=tz) if marketing else now
    # The WhatsApp window as it will be when the message goes: free text decided at 22:00 in a
    # window closing at 08:00 was held to 09:00, then failed there (a held message keeps its
    # channel), where email would have reached the customer.
    choice = _choose(candidate, context, send_at)
    if choice.channel is None:
        return Decision(
            NO_CHANNEL_STATUS[choice.outcome or "no_address"],
            "; ".join(s.detail for s in choice.tried),
            expires_at=expires_at,
            skipped=choice.tried,
        )
    channel, mode, skipped = choice.channel, choice.whatsapp_mode, choice.tried

    # A cap's calendar day is the customer's: for one who may be anywhere in a region, a zone of
    # it (the daytime the region shares is one day in each of its zones; in the business's
    # zone, 15:00-21:00 in New York crosses midnight, and a cap of one a day let two through).
    day_zone = zones[0]
    caps = check_caps(
        context.caps,
        context.history,
        CapCandidate(channel, candidate.journey, candidate.kind),
        day_zone,
        send_at,
    )
    if not caps.allowed:
        reason = caps.reason
        if caps.next_allowed_at is not None:
            reason += f"; next allowed at {caps.next_allowed_at.astimezone(day_zone).isoformat()}"
        return Decision(
            MessageStatus.CAPPED,
            reason,
            channel=channel,
            whatsapp_mode=mode,
            skipped=skipped,
            expires_at=expires_at,
            cap_name=caps.cap_name,
            next_allowed_at=caps.next_allowed_at,
        )

    if expires_at is not None and send_at.astimezone(UTC) >= expires_at:
        when = "was due" if send_at is now else f"could go at {send_at.astimezone(tz).isoformat()}"
        ttl = "" if candidate.ttl is None else f" (TTL {candidate.ttl.total_seconds() / 3600:g} h)"
        reason = f"expired at {expires_at.astimezone(tz).isoformat()}{ttl}; {when}"
        # No send_at: it never goes (when it could have is in the reason).
        return Decision(
            MessageStatus.EXPIRED,
            reason,
            channel=channel,
            whatsapp_mode=mode,
            skipped=skipped,
            expires_at=expires_at,
        )

    if send_at.astimezone(UTC) != now.astimezone(UTC):
        # The zone where it is quiet now (of the region's, the first), on its own wall clock.
        quiet_in = next((z for z in zones if is_quiet(now, z, locale, quiet)), zones[0])
        local = now.astimezone(quiet_in)
        somewhere = f" (one of {len(zones)} zones of the customer's region)" if len(zones) > 1 else ""
        reason = (
            f"quiet hours for {quiet_in.key}{somewhere} ({local:%a %H:%M} local) "
            f"until {send_at.astimezone(quiet_in).isoformat()}"
        )
        return Decision(
            MessageStatus.HELD_QUIET_HOURS,
            reason,
            channel=channel,
            whatsapp_mode=mode,
            skipped=skipped,
            send_at=send_at,
            expires_at=expires_at,
        )

    how = f" ({mode})" if mode else ""
    return Decision(
        MessageStatus.QUEUED,
        f"send now by {channel.value}{how}",
        channel=channel,
        whatsapp_mode=mode,
        skipped=skipped,
        send_at=now,
        expires_at=expires_at,
    )


def decide(candidate: Candidate, context: DecisionContext, now: datetime) -> Decision:
    """The outcome for a new candidate (order and rules: module doc)."""
    if context.duplicate:
        return Decision(MessageStatus.DUPLICATE, f"message {candidate.message_key!r} was already decided")
    if candidate.kind is MessageKind.MARKETING and in_holdout(
        candidate.customer_id, candidate.journey, candidate.holdout_percent
    ):
        return Decision(
            MessageStatus.HOLDOUT,
            f"in the {candidate.holdout_percent:g}% holdout of journey {candidate.journey!r}",
            expires_at=candidate.expires_at,
        )
    return _deliver(candidate, context, now)


def recheck_at_send(candidate: Candidate, context: DecisionContext, now: datetime) -> Decision:
    """For a held message when its window opens: consent, channel, caps, quiet hours and expiry
    again (QUEUED to go now, HELD_QUIET_HOURS again if it is still quiet, or why not)."""
    return _deliver(candidate, context, now)
