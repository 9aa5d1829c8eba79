"""May this customer be messaged on this channel, for this kind of message? Pure.

Consent is judged from two sources that never overwrite each other:

- the profile's consents (``ConsentState(granted, at)`` per channel: the latest value, ``at``
  the ``occurred_at`` of the first profile event of the run that has said it since; a CRM
  repeating an old grant does not move it, see the segmenter's ``Consent``), and
- consent facts the messenger itself observed: inbound STOP / START, unsubscribe links,
  bounces, spam reports and Twilio's 21610 ("the recipient replied STOP"). They form a
  time-ordered log per channel; nothing is ever deleted from it, a later opt-in simply makes an
  earlier opt-out inactive.

The rules, all applied per channel:

1. Marketing needs an explicit ``granted=True`` from the profile. A channel the profile says
   nothing about is not consented (``no_consent``), unless the caller lists it in
   ``granted_by_default`` (a soft opt-in where the law allows one); an explicit ``False`` always
   wins over that default.
2. Transactional messages (complaint acknowledgements, ticket updates) need no marketing consent:
   they are sent on legitimate interest, so the profile's ``False`` and marketing-only opt-outs
   do not stop them.
3. An opt-out fact is durable. It stays active until an explicit opt-in that happened strictly
   after it: a profile event granting the channel with ``occurred_at`` after the fact, or an
   opt-in fact after it (inbound START / UNSTOP / YES; an email re-subscribe, which lifts an
   unsubscribe only, not a spam report: rule 6). A profile event
   that is older than the opt-out never lifts it, however late it arrives. At equal instants
   the opt-out wins.
4. A bounce is about the address, not the customer's wish, so a keyword cannot lift it: only a
   later profile grant (the CRM confirming or changing the address) does.
5. What each opt-out blocks:
   - ``stop`` (inbound STOP and its equivalents) and ``provider_21610``: everything on that
     channel, transactional included;
   - ``unsubscribe_link`` (List-Unsubscribe, SendGrid unsubscribe / group unsubscribe):
     marketing on that channel only;
   - ``bounce`` and ``spam_report``: everything on that channel (email).
6. A fact tied to an address (``address`` set: a STOP from a number, a bounce, a spam report or
   a 21610 of an address) only counts while that is still the customer's address on the
   channel (an email's case aside); a fact without one (an unsubscribe: the customer's wish,
   wherever they are reached; and facts recorded before addresses were kept) counts for the
   channel whatever the address. An opt-in lifts the opt-outs about its address and those about
   none. An email re-subscribe lifts unsubscribes only.
7. An active opt-out makes the verdict ``suppressed``; it takes precedence over ``no_consent``
   because it is the stronger statement (and the one an operator must not override).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from shared.events import Channel, ConsentState, MessageKind


class FactSource(StrEnum):
    STOP = "stop"  # inbound STOP, STOPALL, UNSUBSCRIBE, הסר, إلغاء …
    UNSUBSCRIBE_LINK = "unsubscribe_link"  # List-Unsubscribe / SendGrid (group) unsubscribe
    BOUNCE = "bounce"
    SPAM_REPORT = "spam_report"
    PROVIDER_21610 = "provider_21610"  # Twilio refused: the recipient replied STOP
    START = "start"  # inbound START, UNSTOP, YES …
    RESUBSCRIBE = "resubscribe"  # email: SendGrid group_resubscribe, preference centre


OPT_IN_SOURCES = frozenset({FactSource.START, FactSource.RESUBSCRIBE})
MARKETING_ONLY_SOURCES = frozenset({FactSource.UNSUBSCRIBE_LINK})
# Only the CRM (a profile event) can vouch for an address again.
LIFTED_BY_PROFILE_ONLY = frozenset({FactSource.BOUNCE})


@dataclass(frozen=True, slots=True)
class ConsentFact:
    """One observed opt-out or opt-in; what it means follows from its source."""

    channel: Channel
    at: datetime
    source: FactSource
    address: str | None = None

    @property
    def opt_in(self) -> bool:
        return self.source in OPT_IN_SOURCES

    @property
    def marketing_only(self) -> bool:
        return self.source in MARKETING_ONLY_SOURCES

    def blocks(self, kind: MessageKind) -> bool:
        return not self.opt_in and (kind is MessageKind.MARKETING or not self.marketing_only)

    def lifts(self, opt_out: ConsentFact) -> bool:
        """Whether this opt-in undoes ``opt_out`` (when later): START any STOP; an email
        re-subscribe an unsubscribe only, not a spam report (as SendGrid's own lists)."""
        return self.source is not FactSource.RESUBSCRIBE or opt_out.marketing_only


@dataclass(frozen=True, slots=True)
class ConsentVerdict:
    allowed: bool
    reason: str
    # True when an opt-out fact (STOP, unsubscribe, bounce, spam report) is what blocks it.
    suppressed: bool = False


def _lifted(fact: ConsentFact, profile: ConsentState | None, opt_ins: Iterable[ConsentFact]) -> bool:
    at = fact.at.astimezone(UTC)
    if profile is not None and profile.granted and profile.at.astimezone(UTC) > at:
        return True
    if fact.source in LIFTED_BY_PROFILE_ONLY:
        return False
    return any(o.at.astimezone(UTC) > at and o.lifts(fact) for o in opt_ins)


def same_address(a: str | None, b: str | None) -> bool:
    """Whether two addresses of a channel are one: an email's case does not matter (mailbox
    providers ignore it, and CRMs change it)."""
    return a is None or b is None or a.casefold() == b.casefold()


def active_opt_outs(
    channel: Channel,
    kind: MessageKind,
    profile_consents: Mapping[Channel, ConsentState],
    facts: Iterable[ConsentFact],
    address: str | None = None,
) -> list[ConsentFact]:
    """The opt-outs on ``channel`` that still block a ``kind`` message to ``address``, oldest
    first. An opt-out about an address is lifted by an opt-in about the same address (or about
    none); one about no address (the channel's) by any opt-in on the channel."""
    on_channel = [f for f in facts if f.channel is channel]
    opt_ins = [f for f in on_channel if f.opt_in]
    profile = profile_consents.get(channel)
    active = [
        f
        for f in on_channel
        if f.blocks(kind)
        and same_address(f.address, address)
        and not _lifted(
            f, profile, [o for o in opt_ins if f.address is None or same_address(o.address, f.address)]
        )
    ]
    return sorted(active, key=lambda f: f.at.astimezone(UTC))


def consent_for(
    channel: Channel,
    kind: MessageKind,
    profile_consents: Mapping[Channel, ConsentState],
    facts: Iterable[ConsentFact],
    *,
    address: str | None = None,
    granted_by_default: Collection[Channel] = (),
) -> ConsentVerdict:
    """Whether a ``kind`` message may go to the customer on ``channel`` (rules: module doc)."""
    blocking = active_opt_outs(channel, kind, profile_consents, facts, address)
    if blocking:
        last = blocking[-1]
        return ConsentVerdict(
            allowed=False,
            reason=f"{channel.value}: {last.source.value} at {last.at.isoformat()}",
            suppressed=True,
        )
    if kind is MessageKind.TRANSACTIONAL:
        return ConsentVerdict(allowed=True, reason=f"{channel.value}: transactional (legitimate interest)")
    state = profile_consents.get(channel)
    if state is None:
        if channel in granted_by_default:
            return ConsentVerdict(allowed=True, reason=f"{channel.value}: granted by default (soft opt-in)")
        return ConsentVerdict(allowed=False, reason=f"{channel.value}: consent never given")
    if not state.granted:
        return ConsentVerdict(
            allowed=False, reason=f"{channel.value}: consent refused at {state.at.isoformat()}"
        )
    return ConsentVerdict(allowed=True, reason=f"{channel.value}: granted at {state.at.isoformat()}")
