"""Support response times: what a ticket's steps say, and the KPIs over many tickets. Pure.

Definitions (docs/kpis.md, "Response time"):

* a ticket's steps are ordered by (occurred_at, desk order of the action, event id);
* opened_at: the first ``opened`` step (or the first step of any kind, flagged as inferred,
  while the ``opened`` event has not arrived);
* first response: the first ``agent_replied`` at or after opened_at;
* the ticket is resolved when the last of its ``resolved``/``reopened`` steps is ``resolved``;
  resolution time runs from opened_at to that last ``resolved``: a reopen does not start a new
  clock, it continues the ticket's one, so the time the ticket spent resolved before the reopen
  is included;
* the first-response target of a ticket is its category's, or the complaint target if that is
  stricter and the ticket is a complaint; it is breached when the first response came later
  than the target, or has not come and the target has passed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol, TypeVar

from services.kpi.stats import Durations, durations, ratio
from shared.events import SupportEvent, complaint_category, support_step_order, ticket_resolved

COMPLAINT = "complaint"

# A ticket is known by its customer and its id, as the segmenter keeps them: two help desks
# (or brands) may number their tickets alike.
TicketKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class SupportStep:
    event_id: str
    ticket_id: str
    customer_id: str
    at: datetime
    action: str
    category: str
    priority: str | None
    is_complaint: bool

    @classmethod
    def of(cls, e: SupportEvent) -> SupportStep:
        return cls(
            e.event_id,
            e.ticket_id,
            e.customer_id,
            e.occurred_at,
            e.action.value,
            e.category,
            e.priority,
            e.is_complaint,
        )


@dataclass(frozen=True, slots=True)
class Ticket:
    ticket_id: str
    customer_id: str
    category: str
    priority: str | None
    is_complaint: bool
    opened_at: datetime
    opened_inferred: bool
    first_response_at: datetime | None
    resolved_at: datetime | None  # the final resolution; None while the ticket is open
    reopened: int

    @property
    def key(self) -> TicketKey:
        return self.customer_id, self.ticket_id

    @property
    def first_response_s(self) -> float | None:
        if self.first_response_at is None:
            return None
        return (self.first_response_at - self.opened_at).total_seconds()

    @property
    def resolution_s(self) -> float | None:
        if self.resolved_at is None:
            return None
        return (self.resolved_at - self.opened_at).total_seconds()


def ticket_from_steps(steps: Iterable[SupportStep]) -> Ticket:
    # Steps at the same instant are ordered as a help desk records them, as in the segmenter.
    ordered = sorted(steps, key=lambda s: support_step_order(s.at, s.action, s.event_id))
    if not ordered:
        raise ValueError("a ticket needs at least one step")
    opened = next((s for s in ordered if s.action == "opened"), None)
    opened_at = (opened or ordered[0]).at
    first_reply = next((s.at for s in ordered if s.action == "agent_replied" and s.at >= opened_at), None)
    # Resolved (shared.events.ticket_resolved): then its last 'resolved' is its last status step.
    resolved = ticket_resolved(s.action for s in ordered)
    resolved_at = next(s.at for s in reversed(ordered) if s.action == "resolved") if resolved else None
    # Category and priority can be corrected: the newest step that says one wins, in the steps'
    # order (at the same instant the desk's order of actions decides, as for everything else).
    newest = ordered[-1]
    priority = next((s.priority for s in reversed(ordered) if s.priority is not None), None)
    return Ticket(
        ticket_id=ordered[0].ticket_id,
        customer_id=ordered[0].customer_id,
        category=newest.category,
        priority=priority,
        is_complaint=any(s.is_complaint for s in ordered) or complaint_category(newest.category),
        opened_at=opened_at,
        opened_inferred=opened is None,
        first_response_at=first_reply,
        resolved_at=resolved_at,
        reopened=sum(1 for s in ordered if s.action == "reopened"),
    )


@dataclass(frozen=True, slots=True)
class Targets:
    """First-response targets in seconds."""

    default_s: float
    per_category: Mapping[str, float]  # by category casefolded: "Billing" is billing's

    def for_ticket(self, ticket: Ticket) -> float:
        """The category's target; for a complaint, the complaint target when stricter, which
        is the default target when the map has none (docs/kpis.md): a complaint about billing
        with billing at 48 h is answered within the default 24 h, not 48."""
        target = self.per_category.get(ticket.category.casefold(), self.default_s)
        if ticket.is_complaint:
            target = min(target, self.per_category.get(COMPLAINT, self.default_s))
        return target


class TargetStatus(StrEnum):
    MET = "met"
    BREACHED = "breached"
    PENDING = "pending"  # no first response yet, target not passed yet


def target_status(ticket: Ticket, targets: Targets, now: datetime) -> TargetStatus:
    target = targets.for_ticket(ticket)
    answered = ticket.first_response_s
    if answered is not None:
        return TargetStatus.MET if answered <= target else TargetStatus.BREACHED
    waited = (now - ticket.opened_at).total_seconds()
    return TargetStatus.BREACHED if waited > target else TargetStatus.PENDING


@dataclass(frozen=True, slots=True)
class ResponseStats:
    tickets: int
    first_response: Durations  # over the tickets answered
    resolution: Durations  # over the tickets resolved (now)
    unanswered: int
    open: int
    reopened_tickets: int
    breached: int
    pending: int
    breach_rate: float | None  # breached / tickets


def summarize(tickets: Sequence[Ticket], targets: Targets, now: datetime) -> ResponseStats:
    statuses = [target_status(t, targets, now) for t in tickets]
    breached = sum(1 for s in statuses if s is TargetStatus.BREACHED)
    first = [t.first_response_s for t in tickets if t.first_response_s is not None]
    resolution = [t.resolution_s for t in tickets if t.resolution_s is not None]
    return ResponseStats(
        tickets=len(tickets),
        first_response=durations(first),
        resolution=durations(resolution),
        unanswered=len(tickets) - len(first),
        open=sum(1 for t in tickets if t.resolved_at is None),
        reopened_tickets=sum(1 for t in tickets if t.reopened),
        breached=breached,
        pending=sum(1 for s in statuses if s is TargetStatus.PENDING),
        breach_rate=ratio(breached, len(tickets)),
    )


def open_in_breach(tickets: Iterable[Ticket], targets: Targets, now: datetime) -> list[Ticket]:
    """Tickets not resolved now whose first-response target is already breached."""
    return [
        t
        for t in tickets
        if t.resolved_at is None and target_status(t, targets, now) is TargetStatus.BREACHED
    ]


def value_before(purchases: Iterable[tuple[datetime, Decimal | None]], at: datetime) -> Decimal:
    """Revenue (reporting currency) of the purchases strictly before ``at``; unconvertible
    amounts (None) are left out."""
    return sum((amount for when, amount in purchases if when < at and amount is not None), Decimal(0))


def unconverted_before(purchases: Iterable[tuple[datetime, Decimal | None]], at: datetime) -> bool:
    """Whether any purchase strictly before ``at`` has no exchange rate (its value is not
    known, so the customer's revenue before ``at`` may be more than ``value_before`` says)."""
    return any(amount is None for when, amount in purchases if when < at)


class _OfCustomer(Protocol):
    @property
    def customer_id(self) -> str: ...


Item = TypeVar("Item", bound=_OfCustomer)
Purchases = Mapping[str, Sequence[tuple[datetime, Decimal | None]]]


def high_value(
    items: Iterable[Item], purchases: Purchases, threshold: Decimal, at: Callable[[Item], datetime]
) -> tuple[list[Item], int]:
    """Those of ``items`` (complaints, survey answers) whose customer's revenue strictly before
    ``at(item)`` reached ``threshold``; and how many of the others had a purchase before it
    without an exchange rate (their revenue is not known: they may belong among them)."""
    chosen: list[Item] = []
    unjudged = 0
    for item in items:
        bought, when = purchases.get(item.customer_id, ()), at(item)
        if value_before(bought, when) >= threshold:
            chosen.append(item)
        elif unconverted_before(bought, when):
            unjudged += 1
    return chosen, unjudged


def high_value_complaints(
    tickets: Iterable[Ticket], purchases: Purchases, threshold: Decimal
) -> tuple[list[Ticket], int]:
    """``high_value`` of the complaints, as of their opening."""
    return high_value((t for t in tickets if t.is_complaint), purchases, threshold, lambda t: t.opened_at)
