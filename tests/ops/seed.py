"""A kpi database with something in every Grafana table: events relative to now, applied
through the kpi service's own code path (apply_batch, the rollups, the scheduled CLV fit).

Deterministic for a given ``now``: a seeded RNG draws a year of purchases for 80 customers
(repeat buyers, some dropping out, so the BG/NBD fit has something to fit), and the last weeks
hold tickets (some past their target), cancellations in this month and the last, and message
outcomes of two journeys with a holdout arm, most delivered ones answered on the survey page.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS
from services.kpi.service import KpiService
from shared.db import Database, migrate
from shared.events import Event, MessageEvent
from tests.kpi.factories import apply, cancellation, message, profile, purchase, support, survey_answer

CUSTOMERS = 80
TIERS = ("bronze", "silver", "gold")
REASONS = ("price", "service", "both", "other")


def kpi_events(now: datetime, seed: int = 11) -> list[Event | MessageEvent]:
    rng = random.Random(seed)
    events: list[Event | MessageEvent] = []
    for n in range(CUSTOMERS):
        cid = f"ops-{n:03d}"
        first = now - timedelta(days=rng.uniform(40, 360))
        events.append(profile(cid, first - timedelta(hours=1), locale="he-IL", preferred_channel="sms"))
        at, rate = first, rng.uniform(1 / 60, 1 / 12)  # purchases a day
        while at < now - timedelta(hours=1):
            events.append(purchase(cid, at, f"{rng.randint(40, 900)}.00"))
            if rng.random() < 0.15:  # drops out for good
                break
            at += timedelta(days=rng.expovariate(rate))
        # Cancellations this month and the last, so both months of the churn gauge have some.
        if n % 7 == 0:
            back = rng.uniform(1, 45)
            events.append(cancellation(cid, now - timedelta(days=back), REASONS[n % len(REASONS)]))
        # Message outcomes in the last three weeks: the tier is stamped on each.
        if n % 2 == 0:
            sent = now - timedelta(days=rng.uniform(2, 20))
            journey = ("welcome", "thank_you")[n % 4 // 2]
            channel = ("sms", "email")[n % 3 % 2]
            tier = TIERS[n % len(TIERS)]
            mid = f"m-{cid}"
            if n % 10 == 0:
                events.append(message(mid, cid, "holdout", sent, journey=journey, channel=None, tier=tier))
            else:
                events.append(message(mid, cid, "sent", sent, journey=journey, channel=channel, tier=tier))
                outcome = "failed" if n % 8 == 0 else "delivered"
                events.append(
                    message(
                        mid,
                        cid,
                        outcome,
                        sent + timedelta(minutes=1),
                        journey=journey,
                        channel=channel,
                        tier=tier,
                    )
                )
                if outcome == "delivered" and n % 6 != 2:  # most answer the survey, 1 to 5
                    answered = sent + timedelta(hours=rng.uniform(1, 30))
                    score = rng.choice((1, 2, 3, 4, 4, 5, 5, 5))
                    events.append(
                        survey_answer(mid, cid, score, answered, journey=journey, channel=channel, tier=tier)
                    )
            if n % 3 == 0:  # converts
                events.append(purchase(cid, sent + timedelta(days=1), "120.00", order=f"conv-{cid}"))
    for t in range(72):  # 24 a category: RetainResponseTimeBreachRate wants 20
        opened = now - timedelta(days=rng.uniform(0.5, 25))
        category = ("billing", "complaint", "delivery")[t % 3]
        ticket = f"T-{t:03d}"
        customer = f"ops-{t:03d}"
        events.append(
            support(ticket, "opened", opened, category, customer=customer, complaint=category == "complaint")
        )
        if t % 4 != 3:  # the rest stay unanswered: past their target after a day
            answer_h = rng.choice([0.5, 2, 6, 30])
            events.append(
                support(
                    ticket, "agent_replied", opened + timedelta(hours=answer_h), category, customer=customer
                )
            )
            if t % 2 == 0:
                events.append(
                    support(
                        ticket,
                        "resolved",
                        opened + timedelta(hours=answer_h + 3),
                        category,
                        customer=customer,
                    )
                )
    return events


async def seed_kpi_database(url: str, settings: KpiSettings, now: datetime) -> dict[str, int]:
    """Migrate, apply the events, compute the Grafana tables and fit the CLV model."""
    db = Database(url)
    try:
        await migrate(db, MIGRATIONS)
        service = KpiService(db, settings, clock=lambda: now)
        events = kpi_events(now)
        result = await apply(service, events, batch=200)
        await service.run_rollups()
        await service.refit_and_publish()
        return {"events": len(events), "applied": result.applied}
    finally:
        await db.dispose()
