"""Event factories for the kpi service's tests, and the hand-computed scenarios as events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.kpi.service import KpiService
from shared.codec import event_digest
from shared.events import (
    CancellationEvent,
    CancellationReason,
    Channel,
    Event,
    MessageEvent,
    MessageKind,
    MessageStatus,
    ProfileEvent,
    PurchaseEvent,
    SupportAction,
    SupportEvent,
)
from shared.kafka.consumer import BatchResult, Delivered


def utc(year: int, month: int, day: int, hour: int = 10, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def purchase(
    customer: str, when: datetime, amount: str = "100", currency: str = "ILS", order: str | None = None
) -> PurchaseEvent:
    order_id = order or f"o-{customer}-{when.strftime('%Y%m%d%H%M')}"
    return PurchaseEvent(
        event_id=f"p-{order_id}-{amount}-{currency}",
        customer_id=customer,
        occurred_at=when,
        order_id=order_id,
        amount=Decimal(amount),
        currency=currency,
    )


def support(
    ticket: str,
    action: str,
    when: datetime,
    category: str = "billing",
    *,
    customer: str | None = None,
    complaint: bool = False,
    priority: str | None = "normal",
) -> SupportEvent:
    return SupportEvent(
        event_id=f"s-{ticket}-{action}-{when.strftime('%Y%m%d%H%M')}",
        customer_id=customer or f"cust-{ticket}",
        occurred_at=when,
        ticket_id=ticket,
        action=SupportAction(action),
        category=category,
        priority=priority,
        is_complaint=complaint,
    )


def cancellation(customer: str, when: datetime, reason: str) -> CancellationEvent:
    return CancellationEvent(
        event_id=f"x-{customer}-{when.strftime('%Y%m%d%H%M')}",
        customer_id=customer,
        occurred_at=when,
        reason=CancellationReason(reason),
    )


def profile(customer: str, when: datetime, **fields: Any) -> ProfileEvent:
    return ProfileEvent(
        event_id=f"pr-{customer}-{when.strftime('%Y%m%d%H%M')}",
        customer_id=customer,
        occurred_at=when,
        **fields,
    )


def message(
    message_id: str,
    customer: str,
    status: str,
    when: datetime,
    *,
    journey: str = "welcome",
    channel: str | None = "sms",
    tier: str | None = "gold",
    locale: str | None = "he-IL",
    holdout: bool = False,
    seq: int = 0,
    decided_at: datetime | None = None,
) -> MessageEvent:
    return MessageEvent(
        event_id=f"{message_id}:{status}" + (f":{seq}" if seq else ""),
        decided_at=decided_at,
        customer_id=customer,
        occurred_at=when,
        message_id=message_id,
        journey=journey,
        kind=MessageKind.MARKETING,
        status=MessageStatus(status),
        channel=None if channel is None else Channel(channel),
        tier=tier,
        locale=locale,
        holdout=holdout,
    )


def survey_answer(
    message_id: str,
    customer: str,
    score: Any,
    when: datetime,
    *,
    journey: str = "thank_you",
    channel: str | None = "email",
    tier: str | None = "gold",
    locale: str | None = "he-IL",
    seq: str = "survey",
) -> MessageEvent:
    """The 'replied' event the messenger's survey page publishes (``answer_survey``)."""
    return MessageEvent(
        event_id=f"{message_id}:replied:{seq}",
        customer_id=customer,
        occurred_at=when,
        message_id=message_id,
        journey=journey,
        kind=MessageKind.TRANSACTIONAL if journey == "complaint_ack" else MessageKind.MARKETING,
        status=MessageStatus.REPLIED,
        reason=f"survey answer: {score} of 5",
        channel=None if channel is None else Channel(channel),
        tier=tier,
        locale=locale,
        details={"survey_score": score, "survey_comment": "thanks"},
    )


async def apply(service: KpiService, events: Sequence[Event | MessageEvent], batch: int = 7) -> BatchResult:
    """Apply ``events`` in batches, as the consumer would (offsets are made up; digests as its
    loop makes them)."""
    total = BatchResult()
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        result = await service.apply_batch(
            [
                Delivered("t", 0, start + i, e.customer_id.encode(), e, 0, event_digest(e))
                for i, e in enumerate(chunk)
            ]
        )
        total.applied += result.applied
        total.duplicates += result.duplicates
        total.reused = [*total.reused, *result.reused]
    return total


# --- the hand-computed scenarios of test_response_time / test_churn / test_conversion, as events ---


def ticket_events() -> list[Event | MessageEvent]:
    """test_response_time.scenario(); T2's customer is 'vip', T3's 'plain' (high-value check)."""
    cx: dict[str, Any] = {"complaint": True, "priority": "high", "customer": "vip"}
    return [
        support("T1", "opened", utc(2026, 1, 10, 21, 30)),
        support("T1", "agent_replied", utc(2026, 1, 10, 22, 30)),
        support("T1", "resolved", utc(2026, 1, 11, 1, 30)),
        support("T2", "opened", utc(2026, 1, 10, 22, 30), "delivery", **cx),
        support("T2", "agent_replied", utc(2026, 1, 11, 3, 30), "delivery", **cx),
        support("T2", "resolved", utc(2026, 1, 11, 6, 30), "delivery", **cx),
        support("T2", "reopened", utc(2026, 1, 12, 6, 30), "delivery", **cx),
        support("T2", "agent_replied", utc(2026, 1, 12, 7, 0), "delivery", **cx),
        support("T2", "resolved", utc(2026, 1, 12, 8, 30), "delivery", **cx),
        support("T3", "opened", utc(2026, 1, 11, 8, 0), "account", priority="low", customer="plain"),
        support("T4", "opened", utc(2026, 1, 11, 10, 0)),
        support("T4", "agent_replied", utc(2026, 1, 11, 10, 30)),
        support("T5", "opened", utc(2026, 1, 12, 10, 0), "complaint", priority="urgent"),
        # 'vip' spent 1000 USD + 2000 ILS = 5650 ILS before T2: a high-value complaint.
        purchase("vip", utc(2026, 1, 1, 9), "1000", "USD"),
        purchase("vip", utc(2026, 1, 5, 9), "2000", "ILS"),
        profile("vip", utc(2025, 12, 1), locale="he-IL", preferred_channel="whatsapp"),
    ]


def churn_events() -> list[Event | MessageEvent]:
    """test_churn.customers() as events."""
    return [
        purchase("A", utc(2025, 11, 1)),
        purchase("A", utc(2026, 1, 15)),
        cancellation("A", utc(2026, 2, 10), "price"),
        purchase("B", utc(2025, 10, 1)),
        purchase("C", utc(2025, 11, 20)),
        purchase("C", utc(2026, 3, 10)),
        cancellation("C", utc(2026, 1, 5), "service"),
        purchase("D", utc(2026, 2, 15)),
        purchase("E", utc(2025, 12, 1)),
        cancellation("E", utc(2026, 1, 20), "price"),
        cancellation("E", utc(2026, 1, 25), "both"),
    ]


def march_lapse_events() -> list[Event | MessageEvent]:
    """test_churn.lapsing_in_march() as events (noon UTC), tiers from messages."""
    loyal_last = utc(2025, 12, 10, 12)
    return [
        purchase("R", utc(2025, 12, 1, 12)),
        purchase("R", utc(2025, 12, 8, 12)),
        *[purchase("L", loyal_last - timedelta(days=80 * k)) for k in range(11)],
        purchase("O", utc(2025, 12, 5, 12)),
        message("MR", "R", "sent", utc(2025, 11, 1), tier="gold"),
        message("ML", "L", "sent", utc(2025, 11, 1), tier="gold"),
        message("MO", "O", "sent", utc(2025, 11, 1), tier="bronze"),
    ]


def conversion_events() -> list[Event | MessageEvent]:
    """test_conversion.facts() and purchases() as events."""
    return [
        message("M1", "c1", "queued", utc(2026, 1, 10, 9, 59)),
        message("M1", "c1", "sent", utc(2026, 1, 10)),
        message("M1", "c1", "delivered", utc(2026, 1, 10, 10, 1)),
        message("M1", "c1", "replied", utc(2026, 1, 10, 12), seq=1),
        message("M2", "c2", "sent", utc(2026, 1, 10, 11)),
        message("M2", "c2", "failed", utc(2026, 1, 10, 11, 1)),
        message("M3", "c3", "sent", utc(2026, 1, 11), channel="email"),
        message("M3", "c3", "delivered", utc(2026, 1, 11, 10, 5), channel="email"),
        message("M3", "c3", "clicked", utc(2026, 1, 11, 12), channel="email", seq=1),
        message("M3", "c3", "clicked", utc(2026, 1, 11, 13), channel="email", seq=2),
        message("M4", "c4", "holdout", utc(2026, 1, 10), channel=None, holdout=True),
        message("M5", "c5", "holdout", utc(2026, 1, 10), channel=None, holdout=True),
        message("M6", "c6", "capped", utc(2026, 1, 10)),
        message("M7", "c7", "sent", utc(2026, 1, 12), channel="whatsapp", tier=None),
        purchase("c1", utc(2026, 1, 12), "100", "ILS"),
        purchase("c1", utc(2026, 1, 20), "500", "ILS"),
        purchase("c2", utc(2026, 1, 11), "50", "USD"),
        purchase("c4", utc(2026, 1, 15), "80", "ILS"),
        purchase("c7", utc(2026, 1, 13), "1000", "JPY"),
    ]
