"""Conversion of outreach: what a message's status events say, whether a purchase followed it,
and the rates over many messages, with the uplift against the journey's holdout group. Pure.

Definitions (docs/kpis.md, "Conversion of outreach"):

* a message is *treatment* when it reached ``sent``, *holdout* when the messenger held it back
  for the journey's holdout group (status ``holdout``); its exposure time is its first ``sent``
  (or ``holdout``) event;
* it converted when the customer made a purchase in (exposure, exposure + window];
* revenue of a message: the purchases in that window (reporting currency); a purchase that
  follows two messages counts for both (a per-message view, not an attribution model);
* uplift, intent to treat: the conversion rate of the messages *assigned* to the journey
  (every one not held out, sent or not) minus that of the *held-out* ones, each from its
  decision (first event), over the journeys with both arms among the messages compared, with
  Newcombe's hybrid score 95 % interval (``stats.newcombe_difference``); the holdout figures
  are that arm's;
* a message belongs to the period (day) of its decision, its first event;
* delivery rate = delivered / attempted, failure rate = failed-or-undelivered (never delivered)
  / attempted, where attempted = reached any of sent, delivered, undelivered, failed;
* actions per engagement = (replies + clicks + purchases in the window) of delivered messages
  / delivered messages.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from services.kpi.stats import group_by, newcombe_difference, ratio

ATTEMPTED = frozenset({"sent", "delivered", "undelivered", "failed"})
FAILED = frozenset({"undelivered", "failed"})


class Arm(StrEnum):
    TREATMENT = "treatment"
    HOLDOUT = "holdout"


@dataclass(frozen=True, slots=True)
class MessageFact:
    """One status event of a message, as stored."""

    event_id: str
    message_id: str
    customer_id: str
    status: str
    at: datetime
    journey: str
    channel: str | None = None
    tier: str | None = None
    locale: str | None = None
    holdout: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    customer_id: str
    journey: str
    channel: str | None
    tier: str | None
    locale: str | None
    arm: Arm | None  # None: never sent nor held out (capped, no consent, failed at once …)
    at: datetime  # exposure (first sent / holdout), else the first attempt, else the first event
    decided_at: datetime  # the first event: the decision, when the holdout was assigned
    attempted: bool
    delivered: bool
    failed: bool
    replies: int
    clicks: int


def build_message(facts: Sequence[MessageFact]) -> Message:
    ordered = sorted(facts, key=lambda f: (f.at, f.event_id))
    if not ordered:
        raise ValueError("a message needs at least one event")
    sent = next((f for f in ordered if f.status == "sent"), None)
    held = next((f for f in ordered if f.status == "holdout"), None)
    attempt = next((f for f in ordered if f.status in ATTEMPTED), None)
    arm = Arm.TREATMENT if sent else Arm.HOLDOUT if held else None
    anchor = sent or held or attempt or ordered[0]

    def attribute(name: str) -> str | None:
        # The exposure event says what was sent; any other event fills a gap it leaves.
        value: str | None = getattr(anchor, name)
        if value is None:
            value = next((getattr(f, name) for f in ordered if getattr(f, name) is not None), None)
        return value

    statuses = {f.status for f in ordered}
    delivered = "delivered" in statuses
    return Message(
        message_id=anchor.message_id,
        customer_id=anchor.customer_id,
        journey=anchor.journey,
        channel=attribute("channel"),
        tier=attribute("tier"),
        locale=attribute("locale"),
        arm=arm,
        at=anchor.at,
        decided_at=ordered[0].at,
        attempted=bool(statuses & ATTEMPTED),
        delivered=delivered,
        failed=not delivered and bool(statuses & FAILED),
        replies=sum(1 for f in ordered if f.status == "replied"),
        clicks=sum(1 for f in ordered if f.status == "clicked"),
    )


def build_messages(facts: Iterable[MessageFact]) -> list[Message]:
    return [build_message(group) for group in group_by(facts, lambda f: f.message_id).values()]


@dataclass(frozen=True, slots=True)
class Outcome:
    purchases: int
    revenue: Decimal  # reporting currency, convertible purchases only
    unconverted: int  # purchases in the window without an exchange rate

    @property
    def converted(self) -> bool:
        return self.purchases > 0


Purchases = Sequence[tuple[datetime, Decimal | None]]  # sorted by time; amount in reporting currency


def outcome(
    message: Message, purchases: Purchases, window: timedelta, *, since: datetime | None = None
) -> Outcome:
    """The customer's purchases in (start, start + window]: start is the exposure unless
    ``since`` says otherwise."""
    start = message.at if since is None else since
    times = [at for at, _ in purchases]
    low = bisect_right(times, start)
    high = bisect_right(times, start + window)
    inside = purchases[low:high]
    revenue = sum((amount for _, amount in inside if amount is not None), Decimal(0))
    return Outcome(len(inside), revenue, sum(1 for _, amount in inside if amount is None))


@dataclass(frozen=True, slots=True)
class ConversionStats:
    sent: int
    conversions: int
    conversion_rate: float | None
    revenue: Decimal
    revenue_per_message: Decimal | None
    holdout: int
    holdout_conversions: int
    holdout_rate: float | None
    assigned: int
    assigned_conversions: int
    assigned_rate: float | None
    uplift: float | None
    uplift_ci_low: float | None
    uplift_ci_high: float | None
    attempted: int
    delivered: int
    failed: int
    delivery_rate: float | None
    failure_rate: float | None
    actions: int
    actions_per_engagement: float | None
    unconverted_purchases: int


def summarize(
    messages: Iterable[Message],
    purchases: Mapping[str, Purchases],
    window: timedelta,
    *,
    compare: bool = True,
    lone_arms: bool = False,
) -> ConversionStats:
    """``compare=False`` for a breakdown whose values split the arms apart (the channel: a
    held-out message was never given one): no uplift there, whatever the arms hold.
    ``lone_arms=True`` counts each journey's arms even when the other one is not among these
    messages (the uplift still needs both): for one journey's day in kpi_conversion_daily, whose
    days a range adds up, and which has both arms if any of its days has each."""
    messages = list(messages)
    # The uplift is intent to treat, as the messenger assigns its holdout: before consent,
    # channel, caps and quiet hours, so a held-out message stands for one that might not have
    # gone either. Against it stand all the journey's messages not held out (sent or not),
    # from their decisions: "sent" alone would be the consenting, reachable customers, who buy
    # more anyway. And like with like: only journeys with both arms among these messages (a
    # complaint acknowledgement, sent to everyone, has no holdout to be measured against).
    held_back = {m.journey for m in messages if m.arm is Arm.HOLDOUT}
    assigned_to = {m.journey for m in messages if m.arm is not Arm.HOLDOUT}
    compared = held_back | assigned_to if lone_arms else held_back & assigned_to
    sent = conversions = attempted = delivered = failed = actions = 0
    assigned = assigned_won = held = held_won = 0
    unconverted = 0
    revenue = Decimal(0)
    for m in messages:
        bought = purchases.get(m.customer_id, ())
        result = outcome(m, bought, window)
        if m.arm is Arm.TREATMENT:
            sent += 1
            conversions += result.converted
            revenue += result.revenue
            unconverted += result.unconverted
        if m.journey in compared:
            # Most messages are exposed at their decision (held out, capped, sent at once).
            same = m.decided_at == m.at
            won = result.converted if same else outcome(m, bought, window, since=m.decided_at).converted
            if m.arm is Arm.HOLDOUT:
                held += 1
                held_won += won
            else:
                assigned += 1
                assigned_won += won
        attempted += m.attempted
        delivered += m.delivered
        failed += m.failed
        if m.delivered:
            actions += m.replies + m.clicks + result.purchases
    uplift = newcombe_difference(assigned_won, assigned, held_won, held) if compare else None
    return ConversionStats(
        sent=sent,
        conversions=conversions,
        conversion_rate=ratio(conversions, sent),
        revenue=revenue,
        revenue_per_message=revenue / sent if sent else None,
        holdout=held,
        holdout_conversions=held_won,
        holdout_rate=ratio(held_won, held),
        assigned=assigned,
        assigned_conversions=assigned_won,
        assigned_rate=ratio(assigned_won, assigned),
        uplift=None if uplift is None else uplift[0],
        uplift_ci_low=None if uplift is None else uplift[1],
        uplift_ci_high=None if uplift is None else uplift[2],
        attempted=attempted,
        delivered=delivered,
        failed=failed,
        delivery_rate=ratio(delivered, attempted),
        failure_rate=ratio(failed, attempted),
        actions=actions,
        actions_per_engagement=ratio(actions, delivered),
        unconverted_purchases=unconverted,
    )
