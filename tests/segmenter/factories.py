"""Event factories for the segmenter's tests: short to call, valid by construction."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from shared.events import (
    CancellationEvent,
    CancellationReason,
    ClvPrediction,
    Consents,
    ProfileEvent,
    PurchaseEvent,
    SupportAction,
    SupportEvent,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CUSTOMER = "c-1"


def profile(
    event_id: str, at: datetime, consents: dict[str, bool] | None = None, **fields: Any
) -> ProfileEvent:
    return ProfileEvent(
        event_id=event_id,
        customer_id=fields.pop("customer_id", CUSTOMER),
        occurred_at=at,
        consents=None if consents is None else Consents(**consents),
        **fields,
    )


def purchase(
    event_id: str,
    at: datetime,
    order_id: str,
    amount: str = "100.00",
    currency: str = "ILS",
    customer_id: str = CUSTOMER,
) -> PurchaseEvent:
    return PurchaseEvent(
        event_id=event_id,
        customer_id=customer_id,
        occurred_at=at,
        order_id=order_id,
        amount=Decimal(amount),
        currency=currency,
    )


def support(
    event_id: str,
    at: datetime,
    ticket_id: str,
    action: str,
    category: str = "delivery",
    *,
    complaint: bool = False,
    priority: str | None = None,
    customer_id: str = CUSTOMER,
) -> SupportEvent:
    return SupportEvent(
        event_id=event_id,
        customer_id=customer_id,
        occurred_at=at,
        ticket_id=ticket_id,
        action=SupportAction(action),
        category=category,
        is_complaint=complaint,
        priority=priority,
    )


def cancellation(
    event_id: str, at: datetime, reason: str = "price", customer_id: str = CUSTOMER
) -> CancellationEvent:
    return CancellationEvent(
        event_id=event_id, customer_id=customer_id, occurred_at=at, reason=CancellationReason(reason)
    )


def clv(
    event_id: str, at: datetime, predicted: str, p_alive: float = 0.8, customer_id: str = CUSTOMER
) -> ClvPrediction:
    return ClvPrediction(
        event_id=event_id,
        customer_id=customer_id,
        occurred_at=at,
        model_as_of=at,
        predicted_clv=Decimal(predicted),
        p_alive=p_alive,
        expected_purchases_90d=1.5,
        currency="ILS",
    )
