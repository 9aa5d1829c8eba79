"""The KPI API over a real database (SQLite and PostgreSQL): the hand-computed scenarios applied
as events, in shuffled batches with duplicates, read back through HTTP; late events correcting
past periods; the Grafana tables; CLV publication; and every bad parameter as a 422."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select, text

from services.kpi import predictions
from services.kpi import predictions as predictions_module
from services.kpi import service as kpi_service
from services.kpi.app import create_app
from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS
from services.kpi.repository import Prediction
from services.kpi.service import KPI_GAUGES, KpiService
from services.kpi.tables import (
    clv_models,
    clv_predictions,
    kpi_churn_monthly,
    kpi_conversion_daily,
    kpi_csat_daily,
    kpi_response_time_daily,
    outbox,
    stale_tickets,
    tickets,
)
from shared.auth import create_key
from shared.codec import decode_with
from shared.db import Database, migrate
from shared.events import CLV_ADAPTER, Event, MessageEvent, PurchaseEvent
from shared.metrics import expose
from tests.kpi.factories import (
    apply,
    cancellation,
    churn_events,
    conversion_events,
    march_lapse_events,
    message,
    profile,
    purchase,
    support,
    survey_answer,
    ticket_events,
    utc,
)

pytestmark = pytest.mark.integration

CDNOW = Path(__file__).parent / "data" / "CDNOW_sample.txt"
TICKETS_NOW = utc(2026, 1, 12, 12)
CHURN_NOW = utc(2026, 4, 15, 12)


@dataclass
class Kpi:
    http: httpx.AsyncClient
    service: KpiService
    db: Database
    key: str
    other_key: str

    def at(self, now: datetime) -> None:
        clock: Callable[[], datetime] = lambda: now  # noqa: E731
        self.service.clock = clock

    async def get(self, url: str, **params: Any) -> Any:
        response = await self.http.get(url, params=params, headers={"Authorization": f"Bearer {self.key}"})
        assert response.status_code == 200, response.text
        return response.json()

    async def apply(self, events: list[Event | MessageEvent], seed: int = 0) -> None:
        """Shuffled, in batches of 7, with a fifth of them delivered twice."""
        rng = random.Random(seed)
        replayed = events + rng.sample(events, len(events) // 5)
        rng.shuffle(replayed)
        result = await apply(self.service, replayed)
        assert (result.applied, result.duplicates) == (len(events), len(replayed) - len(events))


@pytest.fixture
async def kpi(database_url: str, tmp_path: Path) -> AsyncIterator[Kpi]:
    url = database_url
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, ["kpi:read"], "analyst")
    _, other = create_key(keys, ["rules:read"], "someone else")
    settings = KpiSettings(kpi_database_url=url, api_keys_file=keys, var_dir=tmp_path, kpi_metrics_ttl_s=0)
    app = create_app(settings)
    service: KpiService = app.state.service
    await migrate(service.db, MIGRATIONS)  # ASGITransport does not run the lifespan
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kpi") as http:
        yield Kpi(http, service, service.db, key, other)
    await service.db.dispose()


# --- response time ---------------------------------------------------------------------------------


async def test_response_time_by_local_day(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    await kpi.apply(ticket_events())
    body = await kpi.get("/v1/kpis/response-time", **{"from": "2026-01-10", "to": "2026-01-12"})
    total = body["total"]["stats"]
    assert total["tickets"] == 5
    assert total["first_response"] == {
        "count": 3,
        "p50_s": 3600.0,
        "p90_s": pytest.approx(15120.0),
        "mean_s": pytest.approx(7800.0),
    }
    assert total["resolution"]["p50_s"] == pytest.approx(68400.0)
    assert (total["breached"], total["pending"], total["breach_rate"]) == (2, 1, 0.4)
    days = {b["start"]: b["stats"] for b in body["buckets"]}
    assert [days[d]["tickets"] for d in ("2026-01-10", "2026-01-11", "2026-01-12")] == [1, 3, 1]
    eleventh = days["2026-01-11"]
    assert eleventh["first_response"]["p50_s"] == pytest.approx(9900.0)
    assert eleventh["resolution"]["p50_s"] == 122400.0  # the reopened ticket, 34 h
    assert eleventh["breach_rate"] == pytest.approx(2 / 3)
    assert body["open_in_breach"]["count"] == 1
    assert body["open_in_breach"]["groups"] == {"account": 1}
    high = body["high_value_complaints"]
    assert high["stats"]["tickets"] == 1  # T2: 'vip' spent 1000 USD + 2000 ILS before it
    assert high["stats"]["first_response"]["p50_s"] == 18000.0
    assert high["with_unconverted_purchases"] == 0
    assert body["first_response_targets_h"] == {"billing": 24.0, "complaint": 4.0, "default": 24.0}


async def test_response_time_breakdowns(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    await kpi.apply(ticket_events())
    span = {"from": "2026-01-10", "to": "2026-01-12", "granularity": "month"}
    by_category = await kpi.get("/v1/kpis/response-time", **span, by="category")
    assert by_category["buckets"][0]["start"] == "2026-01-10"  # clipped to the range
    groups = by_category["total"]["groups"]
    assert {k: v["tickets"] for k, v in groups.items()} == {
        "account": 1,
        "billing": 2,
        "complaint": 1,
        "delivery": 1,
    }
    assert groups["billing"]["first_response"]["p50_s"] == 2700.0  # 3600 and 1800
    by_channel = await kpi.get("/v1/kpis/response-time", **span, by="channel")
    assert {k: v["tickets"] for k, v in by_channel["total"]["groups"].items()} == {
        "unknown": 4,
        "whatsapp": 1,
    }
    by_priority = await kpi.get("/v1/kpis/response-time", **span, by="priority")
    assert set(by_priority["total"]["groups"]) == {"high", "low", "normal", "urgent"}


async def test_a_late_reply_corrects_a_past_day(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    events = ticket_events()
    late = next(e for e in events if e.event_id == "s-T4-agent_replied-202601111030")
    await kpi.apply([e for e in events if e is not late])
    day = {"from": "2026-01-11", "to": "2026-01-11"}
    before = (await kpi.get("/v1/kpis/response-time", **day))["total"]["stats"]
    # T4 unanswered after 26 h: one more breach, until the late reply (30 min) arrives.
    assert (before["first_response"]["count"], before["unanswered"], before["breached"]) == (1, 2, 3)
    await kpi.apply([late])
    after = (await kpi.get("/v1/kpis/response-time", **day))["total"]["stats"]
    assert (after["first_response"]["count"], after["unanswered"], after["breached"]) == (2, 1, 2)
    assert after["first_response"]["p50_s"] == pytest.approx(9900.0)


async def test_an_empty_period(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    body = await kpi.get("/v1/kpis/response-time", **{"from": "2025-01-01", "to": "2025-01-03"})
    assert body["total"]["stats"]["tickets"] == 0
    assert body["total"]["stats"]["breach_rate"] is None
    assert len(body["buckets"]) == 3
    churned = await kpi.get("/v1/kpis/churn", **{"from": "2025-01-01", "to": "2025-03-31"})
    assert churned["total"]["contractual"] == {"active_at_start": 0, "churned": 0, "rate": None}
    conversion = await kpi.get("/v1/kpis/conversion", **{"from": "2025-01-01", "to": "2025-01-31"})
    assert conversion["total"]["stats"]["conversion_rate"] is None
    summary = await kpi.get("/v1/kpis/clv/summary")
    assert summary["model"] is None
    assert summary["total"]["predictions"]["customers"] == 0


# --- churn and cohorts ---------------------------------------------------------------------------------


async def test_churn_by_month_and_reason(kpi: Kpi) -> None:
    kpi.at(CHURN_NOW)
    await kpi.apply(churn_events())
    body = await kpi.get("/v1/kpis/churn", **{"from": "2026-01-01", "to": "2026-03-31", "by": "reason"})
    months = {b["start"]: b for b in body["buckets"]}
    jan, feb, mar = months["2026-01-01"], months["2026-02-01"], months["2026-03-01"]
    assert jan["contractual"] == {"active_at_start": 4, "churned": 2, "rate": 0.5}
    assert jan["groups"]["contractual"]["price"] == {"active_at_start": 4, "churned": 1, "rate": 0.25}
    assert jan["lapsed"] == {"active_at_start": 3, "churned": 0, "rate": 0.0}
    assert feb["contractual"]["rate"] == 0.5
    assert feb["lapsed"]["churned"] == 1
    assert mar["lapsed"] == {"active_at_start": 3, "churned": 1, "rate": pytest.approx(1 / 3)}
    # No CLV model fitted yet: P(alive) is unknown, and so is non-contractual churn.
    assert body["p_alive_model"] is None
    assert body["p_alive_threshold"] == 0.3
    assert all(b["non_contractual"] is None for b in body["buckets"])
    assert body["total"]["win_back"]["all"] == {
        "episodes": 3,
        "won_back": 1,
        "pending": 2,
        "rate": pytest.approx(1 / 3),
    }
    assert body["total"]["win_back"]["service"]["rate"] == 1.0


async def test_cohorts(kpi: Kpi) -> None:
    kpi.at(CHURN_NOW)
    await kpi.apply(churn_events())
    body = await kpi.get("/v1/kpis/cohorts", **{"from": "2025-10-01", "to": "2026-03-31"})
    november = next(c for c in body["cohorts"] if c["start"] == "2025-11-01")
    assert november == {
        "start": "2025-11-01",
        "size": 2,
        "active": [2, 0, 1, 0, 1, 0],
        "retention": [1.0, 0.0, 0.5, 0.0, 0.5, 0.0],
    }


async def test_a_batch_applied_while_a_rollup_runs_keeps_it_marked(
    kpi: Kpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two kpi workers: one computes the churn table from its dirty day, the other applies a
    purchase on a later day meanwhile (which lowers nothing). The rollup cleared the mark by the
    day alone, and the table went without that purchase until something marked its day again.
    A run takes its day when it starts: the purchase's day is marked after it, for the next run,
    which takes it (not the day the first run redid, which under steady traffic would be redone
    every time)."""
    kpi.at(utc(2024, 6, 1))
    await kpi.apply([purchase("a", utc(2024, 1, 10), "100", order="o-a")])
    real_rows = kpi.service._churn_rows
    late = [purchase("b", utc(2024, 3, 5), "70", order="o-b")]

    async def rows_while_another_worker_applies(*args: Any) -> Any:
        found = await real_rows(*args)  # read before the other worker's batch commits
        if late:
            await kpi.apply([late.pop()])
        return found

    monkeypatch.setattr(kpi.service, "_churn_rows", rows_while_another_worker_applies)
    await kpi.service.run_rollups()
    async with kpi.db.sessions() as session:
        assert (await kpi.service.repo.rollup_status(session, "churn")).dirty_from == date(2024, 3, 5)
    assert late == []
    await kpi.service.run_rollups()
    async with kpi.db.sessions() as session:
        assert (await kpi.service.repo.rollup_status(session, "churn")).dirty_from is None


async def test_a_rollup_that_fails_leaves_its_day_for_the_next(
    kpi: Kpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run takes its dirty day when it starts; one that fails (or dies) before it is done
    leaves what it took, and the next run redoes from it."""
    kpi.at(utc(2024, 6, 1))
    await kpi.service.run_rollups()  # computed once: from here on, runs redo from the dirty day
    await kpi.apply([purchase("a", utc(2024, 1, 10), "100", order="o-a")])

    async def broken(*args: Any) -> Any:
        raise RuntimeError("the database went away")

    real_rows = kpi.service._churn_rows
    monkeypatch.setattr(kpi.service, "_churn_rows", broken)
    with pytest.raises(RuntimeError):
        await kpi.service.run_rollups()
    async with kpi.db.sessions() as session:
        assert (await kpi.service.repo.rollup_status(session, "churn")).dirty_from == date(2024, 1, 10)
    monkeypatch.setattr(kpi.service, "_churn_rows", real_rows)
    await kpi.service.run_rollups()
    async with kpi.db.sessions() as session:
        assert (await kpi.service.repo.rollup_status(session, "churn")).dirty_from is None
    async with kpi.db.sessions() as session:
        months = set((await session.execute(select(kpi_churn_monthly.c.month))).scalars())
    assert date(2024, 1, 1) in months  # redone from the purchase's month


# PostgreSQL only: SQLite compares text by code point whatever the setup.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_ties_between_event_ids_go_by_code_point_under_a_locale_collation(kpi: Kpi) -> None:
    """Two events of one order at one instant: the greater event id gives the amount, as the
    fold decides within a batch (code points: "p-b-B" < "p-b-a"). Under a locale collation
    (the postgres image's en_US.UTF-8; here ICU's on the column) the database decided the other
    way across batches, so the amount depended on how the events were batched."""
    async with kpi.db.transaction() as session:
        await session.execute(
            text('ALTER TABLE purchases ALTER COLUMN event_id TYPE varchar(128) COLLATE "en-US-x-icu"')
        )
    at = utc(2024, 3, 1)
    upper = purchase("b", at, "80", order="o-b").model_copy(update={"event_id": "p-b-B"})
    lower = purchase("b", at, "100", order="o-b").model_copy(update={"event_id": "p-b-a"})
    await kpi.apply([lower])
    await kpi.apply([upper])
    async with kpi.db.sessions() as session:
        [row] = await kpi.service.repo.purchases(session)
        ranked_first = await session.scalar(
            text("""SELECT min(id COLLATE "en-US-x-icu") FROM (VALUES ('p-b-B'), ('p-b-a')) AS ids (id)""")
        )
    assert ranked_first == "p-b-a"  # the column's collation ranks it first (bytes: "p-b-B"): the setup holds
    assert (row.event_id, row.amount) == ("p-b-a", Decimal("100"))


async def test_a_correction_changes_what_an_order_paid_not_when_and_redoes_its_periods(kpi: Kpi) -> None:
    """As in the segmenter: a correction months later is not a purchase then (no win-back of the
    cancellation between, no conversion of a message before it); the order's own periods are
    redone, from its date, whichever event of it comes first."""
    kpi.at(utc(2024, 6, 1))
    original = {c: purchase(c, utc(2024, 1, 10), "100", order=f"o-{c}") for c in ("a", "b")}
    corrected = {c: purchase(c, utc(2024, 5, 20), "80", order=f"o-{c}") for c in ("a", "b")}
    await kpi.apply([original["a"], corrected["b"], cancellation("a", utc(2024, 3, 1), "price")])
    await kpi.service.run_rollups()
    await kpi.apply([corrected["a"], original["b"]])
    async with kpi.db.sessions() as session:
        rows = {r.customer_id: r for r in await kpi.service.repo.purchases(session)}
        dirty = (await kpi.service.repo.rollup_status(session, "churn")).dirty_from
    for c in ("a", "b"):
        assert (rows[c].occurred_at, rows[c].amount, rows[c].event_id) == (
            utc(2024, 1, 10),
            Decimal("80"),
            corrected[c].event_id,
        )
    assert dirty == date(2024, 1, 10)  # the order's day, not the correction's
    churn = await kpi.get(
        "/v1/kpis/churn", **{"from": "2024-03-01", "to": "2024-05-31", "granularity": "month"}
    )
    assert churn["total"]["win_back"]["all"]["won_back"] == 0


async def test_cohorts_by_list_only_the_groups_with_a_cohort_in_the_range(kpi: Kpi) -> None:
    kpi.at(utc(2026, 3, 15))
    await kpi.apply(
        [
            profile("old", utc(2024, 1, 1), locale="ar"),
            purchase("old", utc(2024, 2, 1)),  # its cohort (Feb 2024) is before the range
            purchase("old", utc(2026, 2, 1)),
            profile("new", utc(2026, 1, 1), locale="he"),
            purchase("new", utc(2026, 1, 10)),
        ]
    )
    body = await kpi.get("/v1/kpis/cohorts", **{"from": "2026-01-01", "to": "2026-03-31", "by": "locale"})
    assert list(body["groups"]) == ["he"]
    assert [c["start"] for c in body["groups"]["he"]] == ["2026-01-01"]
    assert [c["start"] for c in body["cohorts"]] == ["2026-01-01"]


# --- conversion ----------------------------------------------------------------------------------------


async def test_conversion_with_uplift(kpi: Kpi) -> None:
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(conversion_events())
    body = await kpi.get("/v1/kpis/conversion", **{"from": "2026-01-10", "to": "2026-01-12", "by": "channel"})
    total = body["total"]["stats"]
    assert (total["sent"], total["conversions"], total["conversion_rate"]) == (4, 3, 0.75)
    assert total["revenue"] == 282.5
    assert total["revenue_per_message"] == 70.625
    assert (total["holdout"], total["holdout_rate"]) == (2, 0.5)
    # Intent to treat: the five messages not held out (M6 capped among them), three converted.
    assert (total["assigned"], total["assigned_conversions"], total["assigned_rate"]) == (5, 3, 0.6)
    assert total["uplift"] == pytest.approx(0.1)
    assert total["uplift_ci_low"] < 0.1 < total["uplift_ci_high"]
    assert (total["delivery_rate"], total["failure_rate"], total["actions_per_engagement"]) == (
        0.5,
        0.25,
        2.0,
    )
    assert total["unconverted_purchases"] == 1
    assert body["total"]["groups"]["sms"]["sent"] == 2
    assert body["total"]["groups"]["email"]["actions_per_engagement"] == 2.0
    assert body["uplift_interval"].startswith("Newcombe")


async def test_a_message_belongs_to_the_day_of_its_decision(kpi: Kpi) -> None:
    """Held overnight: decided on the 9th (local) beside a held-out twin, bought that evening,
    sent on the 10th. It stays with its twin on the 9th, converted for the uplift (from the
    decision) but not as a sent message (the purchase came before the sending)."""
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(
        [
            message("Q1", "c8", "held_quiet_hours", utc(2026, 1, 9, 12)),
            purchase("c8", utc(2026, 1, 9, 20), "40", "ILS"),  # 22:00 in Jerusalem, on the 9th
            message("Q1", "c8", "sent", utc(2026, 1, 10, 8)),
            message("H1", "c9", "holdout", utc(2026, 1, 9, 12), channel=None, holdout=True),
            # Assigned too, but nothing could go: no address, so no channel either.
            message("N1", "c10", "no_address", utc(2026, 1, 9, 12), channel=None),
        ]
    )
    body = await kpi.get("/v1/kpis/conversion", **{"from": "2026-01-09", "to": "2026-01-10"})
    ninth, tenth = (b["stats"] for b in body["buckets"])
    assert (ninth["sent"], ninth["conversions"]) == (1, 0)
    assert (ninth["assigned"], ninth["assigned_conversions"], ninth["holdout"]) == (2, 1, 1)
    assert ninth["uplift"] == 0.5
    assert (tenth["sent"], tenth["assigned"], tenth["holdout"], tenth["uplift"]) == (0, 0, 0, None)
    # By channel: the held-out message has none, so no uplift anywhere; "unknown" would set it
    # against the unreachable N1 alone.
    by_channel = await kpi.get(
        "/v1/kpis/conversion", **{"from": "2026-01-09", "to": "2026-01-10", "by": "channel"}
    )
    assert {k: g["uplift"] for k, g in by_channel["total"]["groups"].items()} == {
        "sms": None,
        "unknown": None,
    }


async def test_a_journeys_daily_rows_add_up_to_its_uplift_over_the_range(kpi: Kpi) -> None:
    """welcome holds one message back on the 9th and sends on the 9th and the 10th. Over the
    two days it has both arms, so both sends count for the uplift, as the Grafana panel finds
    by adding up the journey's rows of kpi_conversion_daily: the 10th's row brings its lone
    assigned message (its own uplift is null), while the 10th's overall row compares only the
    journeys with both arms that day."""
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(
        [
            message("H9", "c9", "holdout", utc(2026, 1, 9, 12), channel=None, holdout=True),
            message("S9", "c10", "sent", utc(2026, 1, 9, 12)),
            message("S10", "c11", "sent", utc(2026, 1, 10, 12)),
            purchase("c10", utc(2026, 1, 11, 12), "40", "ILS"),
            purchase("c11", utc(2026, 1, 11, 12), "40", "ILS"),
        ]
    )
    body = await kpi.get("/v1/kpis/conversion", **{"from": "2026-01-09", "to": "2026-01-10", "by": "journey"})
    api = body["total"]["groups"]["welcome"]
    arms = ("assigned", "assigned_conversions", "holdout", "holdout_conversions")
    assert tuple(api[name] for name in arms) == (2, 2, 1, 0)
    assert api["uplift"] == 1.0
    await kpi.service.run_rollups()
    c = kpi_conversion_daily.c
    async with kpi.db.sessions() as s:
        rows = {
            (r.day, r.dimension): r
            for r in await s.execute(
                select(kpi_conversion_daily).where(
                    c.day.between(date(2026, 1, 9), date(2026, 1, 10)), c.value.in_(["welcome", "all"])
                )
            )
        }
    days = [rows[date(2026, 1, 9), "journey"], rows[date(2026, 1, 10), "journey"]]
    assert days[1].uplift is None
    for name in ("sent", "conversions", *arms):
        assert sum(getattr(d, name) for d in days) == api[name], name
    assert (rows[date(2026, 1, 10), "all"].assigned, rows[date(2026, 1, 10), "all"].holdout) == (0, 0)


async def test_a_message_sent_after_the_range_converts_within_its_own_window(kpi: Kpi) -> None:
    """Decided on the 9th, the range's last day, and sent the next morning: its window runs from
    the sending, so a purchase seven days after the range (but within the window) converts it."""
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(
        [
            message("Q2", "c8", "held_quiet_hours", utc(2026, 1, 9, 12)),
            message("Q2", "c8", "sent", utc(2026, 1, 10, 8)),
            # After the range's end (Jan 9, 22:00 UTC) + 7 days, before the sending + 7 days.
            purchase("c8", utc(2026, 1, 17, 6), "40", "ILS"),
        ]
    )
    body = await kpi.get("/v1/kpis/conversion", **{"from": "2026-01-09", "to": "2026-01-09"})
    total = body["total"]["stats"]
    assert (total["sent"], total["conversions"], total["revenue"]) == (1, 1, 40.0)


# --- customer satisfaction -------------------------------------------------------------------------------

CSAT_NOW = utc(2026, 2, 10)


def csat_events() -> list[Event | MessageEvent]:
    """Five first answers over 1–3 February (Asia/Jerusalem, UTC+2), a second answer to M1 on
    the 5th, an SMS reply that is no score, and 'vip', whose 6,000 ILS before answering make
    them high-value (threshold 5,000)."""
    ack: dict[str, Any] = {"journey": "complaint_ack", "channel": "sms"}
    return [
        # 23:30 local on the 1st, and 00:30 local on the 2nd: the day is the local one.
        survey_answer("M1", "c1", 5, utc(2026, 2, 1, 21, 30), locale="he-IL"),
        survey_answer("M2", "c2", 4, utc(2026, 2, 1, 22, 30), locale="ar"),
        survey_answer("M3", "c3", 2, utc(2026, 2, 2), locale="en", **ack),
        survey_answer("M4", "c4", 3, utc(2026, 2, 3), tier=None, **ack),
        purchase("vip", utc(2026, 1, 5), "6000"),
        survey_answer("M5", "vip", 1, utc(2026, 2, 3, 12), **ack),
        survey_answer("M1", "c1", 1, utc(2026, 2, 5), seq="again"),  # not its first: left out
        message("M6", "c6", "replied", utc(2026, 2, 2), journey="complaint_ack"),  # a reply, not a score
    ]


async def test_csat_by_local_day_journey_and_high_value(kpi: Kpi) -> None:
    kpi.at(CSAT_NOW)
    await kpi.apply(csat_events())
    body = await kpi.get("/v1/kpis/csat", **{"from": "2026-02-01", "to": "2026-02-03", "by": "journey"})
    total = body["total"]["stats"]
    assert (total["answers"], total["satisfied"], total["neutral"], total["dissatisfied"]) == (5, 2, 1, 2)
    assert (total["csat"], total["mean_score"]) == (0.4, 3.0)
    assert total["scores"] == {"1": 1, "2": 1, "3": 1, "4": 1, "5": 1}
    assert total["csat_ci_low"] < 0.4 < total["csat_ci_high"]
    groups = body["total"]["groups"]
    assert (groups["thank_you"]["answers"], groups["thank_you"]["csat"]) == (2, 1.0)
    assert (groups["complaint_ack"]["answers"], groups["complaint_ack"]["csat"]) == (3, 0.0)
    assert groups["complaint_ack"]["mean_score"] == 2.0
    days = {b["start"]: (b["stats"]["answers"], b["stats"]["csat"]) for b in body["buckets"]}
    assert days == {"2026-02-01": (1, 1.0), "2026-02-02": (2, 0.5), "2026-02-03": (2, 0.0)}
    high = body["high_value"]
    assert (high["stats"]["answers"], high["stats"]["dissatisfied"], high["threshold"]) == (1, 1, 5000.0)
    assert high["with_unconverted_purchases"] == 0
    assert body["satisfied_scores"] == [4, 5]

    by_tier = await kpi.get("/v1/kpis/csat", **{"from": "2026-02-01", "to": "2026-02-03", "by": "tier"})
    assert {k: v["answers"] for k, v in by_tier["total"]["groups"].items()} == {"gold": 4, "unknown": 1}
    # M1's second answer is on the 5th, but M1 was answered on the 1st: nothing on the 5th.
    fifth = await kpi.get("/v1/kpis/csat", **{"from": "2026-02-05", "to": "2026-02-05"})
    assert fifth["total"]["stats"]["answers"] == 0
    assert fifth["total"]["stats"]["csat"] is None


async def test_csat_table_for_grafana_follows_late_answers(kpi: Kpi) -> None:
    kpi.at(CSAT_NOW)
    await kpi.apply(csat_events())
    await kpi.service.run_rollups()

    async def rows(day: date) -> dict[tuple[str, str], Any]:
        async with kpi.db.sessions() as s:
            c = kpi_csat_daily.c
            found = await s.execute(select(kpi_csat_daily).where(c.day == day))
            return {(r.dimension, r.value): r for r in found}

    second = await rows(date(2026, 2, 2))
    everyone = second["all", "all"]
    assert (everyone.answers, everyone.satisfied, everyone.dissatisfied, everyone.score_sum) == (2, 1, 1, 6)
    assert (everyone.csat, everyone.mean_score) == (0.5, 3.0)
    assert second["locale", "ar"].answers == 1
    assert second["channel", "sms"].answers == 1
    # A late answer (a week after the day it was given on) redoes that day.
    await kpi.apply([survey_answer("M7", "c7", 5, utc(2026, 2, 2, 8))])
    await kpi.service.run_rollups()
    everyone = (await rows(date(2026, 2, 2)))["all", "all"]
    assert (everyone.answers, everyone.satisfied, everyone.score_sum) == (3, 2, 11)
    assert everyone.csat == pytest.approx(2 / 3)


async def test_csat_on_metrics_by_journey(kpi: Kpi) -> None:
    kpi.at(utc(2026, 2, 4))
    await kpi.apply(csat_events())
    response = await kpi.http.get("/metrics")
    lines = response.text.splitlines()
    assert 'retain_kpi_csat_ratio{journey="thank_you"} 1.0' in lines
    assert 'retain_kpi_csat_ratio{journey="complaint_ack"} 0.0' in lines
    assert 'retain_kpi_csat_answers{journey="complaint_ack"} 3.0' in lines


# --- the Grafana tables --------------------------------------------------------------------------------


async def test_a_ticket_a_late_opened_moves_leaves_its_old_day(kpi: Kpi) -> None:
    """A reply stamped 1 June 20:00 UTC (23:00 in Jerusalem) comes first: the ticket is
    inferred open that day. Its 'opened' (2 June 06:00) arrives two weeks later, past the
    always-redone days: the ticket moves to 2 June, and 1 June no longer counts it."""
    kpi.at(utc(2026, 6, 2, 12))
    await kpi.apply([support("TM", "customer_replied", utc(2026, 6, 1, 20))])
    await kpi.service.run_rollups()

    async def tickets_on(day: date) -> int:
        async with kpi.db.sessions() as s:
            t = kpi_response_time_daily.c
            stmt = select(t.tickets).where(t.day == day, t.dimension == "all")
            return int((await s.execute(stmt)).scalar() or 0)

    assert (await tickets_on(date(2026, 6, 1)), await tickets_on(date(2026, 6, 2))) == (1, 0)
    kpi.at(utc(2026, 6, 15, 12))
    await kpi.apply([support("TM", "opened", utc(2026, 6, 2, 6))])
    await kpi.service.run_rollups()
    assert (await tickets_on(date(2026, 6, 1)), await tickets_on(date(2026, 6, 2))) == (0, 1)
    response_time = await kpi.get("/v1/kpis/response-time", **{"from": "2026-06-01", "to": "2026-06-02"})
    assert response_time["total"]["stats"]["tickets"] == 1


async def test_grafana_tables_follow_late_events(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    events = ticket_events()
    late = next(e for e in events if e.event_id == "s-T4-agent_replied-202601111030")
    await kpi.apply([e for e in events if e is not late])
    await kpi.apply(conversion_events())
    await kpi.service.run_rollups()

    async def row(day: date) -> Any:
        async with kpi.db.sessions() as s:
            t = kpi_response_time_daily.c
            stmt = select(kpi_response_time_daily).where(t.day == day, t.dimension == "all")
            return (await s.execute(stmt)).one()

    before = await row(date(2026, 1, 11))
    assert (before.tickets, before.answered, before.breached) == (3, 1, 3)
    await kpi.apply([late])
    await kpi.service.run_rollups()
    after = await row(date(2026, 1, 11))
    assert (after.tickets, after.answered) == (3, 2)
    assert after.first_response_p50_s == pytest.approx(9900.0)
    assert after.breach_rate == pytest.approx(2 / 3)
    async with kpi.db.sessions() as s:
        c = kpi_conversion_daily.c
        sms = (
            await s.execute(
                select(kpi_conversion_daily).where(
                    c.day == date(2026, 1, 10), c.dimension == "channel", c.value == "sms"
                )
            )
        ).one()
        assert (sms.sent, sms.conversions, sms.delivered, sms.failed) == (2, 2, 1, 1)
        # The uplift's arms of the 10th: M1, M2 and the capped M6 assigned (M1, M2 bought),
        # M4 and M5 held out (M4 bought).
        day = (
            await s.execute(
                select(kpi_conversion_daily).where(c.day == date(2026, 1, 10), c.dimension == "all")
            )
        ).one()
        assert (day.assigned, day.assigned_conversions, day.holdout, day.holdout_conversions) == (3, 2, 2, 1)
        assert day.uplift == pytest.approx(2 / 3 - 1 / 2)
        months = await s.scalar(select(func.count()).select_from(kpi_churn_monthly))
        assert months  # the purchases of the scenario give churn months too


async def test_tickets_read_right_after_a_batch_equal_the_rebuilt_ones(kpi: Kpi) -> None:
    """The consumer marks tickets stale and the periodic rollup rebuilds them: the API derives
    the stale ones from their steps meanwhile, so its answers never wait for the rollup."""
    kpi.at(TICKETS_NOW)
    events = ticket_events()
    late = next(e for e in events if e.event_id == "s-T4-agent_replied-202601111030")
    await kpi.apply([e for e in events if e is not late])
    span = {"from": "2026-01-10", "to": "2026-01-12"}

    async def answer() -> Any:
        return await kpi.get("/v1/kpis/response-time", **span, by="category")

    async def stale() -> int:
        async with kpi.db.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(stale_tickets)) or 0)

    async def stored() -> int:
        async with kpi.db.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(tickets)) or 0)

    assert (await stale(), await stored()) == (5, 0)
    before = await answer()
    assert (before["total"]["stats"]["tickets"], before["total"]["stats"]["breached"]) == (5, 3)
    assert await kpi.service.rebuild_tickets() == 5
    assert (await stale(), await stored()) == (0, 5)
    assert await answer() == before
    await kpi.apply([late])  # T4's late first reply: only T4 is stale, the rest come from the table
    assert await stale() == 1
    after = await answer()
    assert (after["total"]["stats"]["tickets"], after["total"]["stats"]["breached"]) == (5, 2)
    assert (before["open_in_breach"]["count"], after["open_in_breach"]["count"]) == (2, 1)  # T4 answered
    assert await kpi.service.rebuild_tickets() == 1
    assert await stale() == 0
    assert await answer() == after
    assert await kpi.service.rebuild_tickets() == 0


async def test_two_customers_tickets_with_one_id_are_two_tickets(kpi: Kpi) -> None:
    """Two help desks (or brands) number tickets alike: the reply to one customer's T1 used to
    answer the other's too, one ticket of both. Each is its customer's, before the rebuild (the
    API derives stale tickets) and after it (the stored rows)."""
    kpi.at(TICKETS_NOW)
    await kpi.apply(
        [
            support("T1", "opened", utc(2026, 1, 11, 9), customer="ann"),
            support("T1", "agent_replied", utc(2026, 1, 11, 10), customer="ann"),
            support("T1", "opened", utc(2026, 1, 11, 9, 30), customer="ben"),
        ]
    )

    async def stats() -> Any:
        answer = await kpi.get("/v1/kpis/response-time", **{"from": "2026-01-11", "to": "2026-01-11"})
        return answer["total"]["stats"], answer["open_in_breach"]["count"]

    derived = await stats()
    assert await kpi.service.rebuild_tickets() == 2
    assert await stats() == derived
    totals, open_in_breach = derived
    # Ben's T1 is unanswered 27 h on, past billing's 24 h target: one ticket of both, it was not.
    assert (totals["tickets"], totals["unanswered"], totals["breached"], open_in_breach) == (2, 1, 1, 1)
    async with kpi.db.sessions() as s:
        rows = (
            await s.execute(select(tickets.c.customer_id, tickets.c.ticket_id, tickets.c.first_response_s))
        ).all()
    assert sorted(rows) == [("ann", "T1", 3600.0), ("ben", "T1", None)]


async def test_a_late_status_redoes_the_day_its_message_began_on(kpi: Kpi) -> None:
    """The batch marks only its statuses' day; the rollup widens that to the day the message
    began on (the day its Grafana row is under)."""
    kpi.at(utc(2026, 1, 25))
    first = message("L1", "c9", "sent", utc(2026, 1, 8), channel="email")
    late = message("L1", "c9", "delivered", utc(2026, 1, 14), channel="email")
    await kpi.apply([first])
    await kpi.service.run_rollups()

    async def delivered(day: date) -> tuple[int, int]:
        async with kpi.db.sessions() as s:
            c = kpi_conversion_daily.c
            row = (
                await s.execute(select(kpi_conversion_daily).where(c.day == day, c.dimension == "all"))
            ).one()
            return row.sent, row.delivered

    assert await delivered(date(2026, 1, 8)) == (1, 0)
    await kpi.apply([late])
    await kpi.service.run_rollups()
    assert await delivered(date(2026, 1, 8)) == (1, 1)


async def test_churn_table_by_month(kpi: Kpi) -> None:
    kpi.at(CHURN_NOW)
    await kpi.apply(churn_events())
    await kpi.service.run_rollups()
    async with kpi.db.sessions() as s:
        c = kpi_churn_monthly.c
        rows = (
            await s.execute(select(kpi_churn_monthly).where(c.dimension == "all").order_by(c.month, c.kind))
        ).all()
    table = {(r.month, r.kind): (r.active_at_start, r.churned) for r in rows}
    assert table[(date(2026, 1, 1), "contractual")] == (4, 2)
    assert table[(date(2026, 2, 1), "lapsed")] == (3, 1)
    assert table[(date(2026, 3, 1), "lapsed")] == (3, 1)
    # Without a CLV model there is no non-contractual figure, rather than a made-up one.
    assert not [k for k in table if k[1] == "non_contractual"]


def churn_gauges(page: str) -> dict[tuple[str, str], float]:
    """(kind, month) → value of the retain_kpi_churn_rate series on a /metrics page."""
    out: dict[tuple[str, str], float] = {}
    for line in page.splitlines():
        if line.startswith("retain_kpi_churn_rate{"):
            labels, value = line.removeprefix("retain_kpi_churn_rate{").split("} ")
            named = dict(pair.split("=") for pair in labels.split(","))
            out[(named["kind"].strip('"'), named["month"].strip('"'))] = float(value)
    return out


async def test_the_churn_gauges_are_the_rollups_rates_of_this_month_and_the_last(kpi: Kpi) -> None:
    """/metrics reads the churn rates from kpi_churn_monthly rather than every customer's history
    on the API's loop: nothing before the consumer's first rollup, then the API's own figures."""
    kpi.at(CHURN_NOW)
    await kpi.apply(churn_events())
    assert churn_gauges((await kpi.http.get("/metrics")).text) == {}

    await kpi.service.run_rollups()
    gauges = churn_gauges((await kpi.http.get("/metrics")).text)
    body = await kpi.get(
        "/v1/kpis/churn", **{"from": "2026-03-01", "to": "2026-04-15", "granularity": "month"}
    )
    march, april = body["buckets"]
    assert gauges[("lapsed", "previous")] == pytest.approx(1 / 3)  # by hand: test_churn_by_month_and_reason
    assert gauges == {
        (kind, label): pytest.approx(bucket[kind]["rate"])
        for label, bucket in (("previous", march), ("current", april))
        for kind in ("contractual", "lapsed")
        if bucket[kind]["rate"] is not None
    }
    # E, who lapsed on 1 March, had bought in late February after all (a late event): March's
    # lapses drop to 0 of 3 in the gauge once the rollup has redone the month, not before.
    await kpi.apply([purchase("E", utc(2026, 2, 25), "10", order="late-february")])
    assert churn_gauges((await kpi.http.get("/metrics")).text) == gauges
    await kpi.service.run_rollups()
    after = await kpi.get("/v1/kpis/churn", **{"from": "2026-03-01", "to": "2026-03-31"})
    redone = churn_gauges((await kpi.http.get("/metrics")).text)
    assert redone[("lapsed", "previous")] == after["total"]["lapsed"]["rate"] == 0.0


def unit_model(as_of: date, a: float = 1.0) -> dict[str, Any]:
    """A stored CLV model with r = alpha = b = 1 (test_churn's hand-computed P(alive) when a = 1)."""
    return {
        "as_of": as_of.isoformat(),
        "params": {"r": 1.0, "alpha": 1.0, "a": a, "b": 1.0, "p": 6.0, "q": 4.0, "gamma": 15.0},
    }


async def test_non_contractual_churn_uses_the_latest_model(kpi: Kpi) -> None:
    kpi.at(CHURN_NOW)
    await kpi.apply(march_lapse_events())
    async with kpi.db.transaction() as s:
        await kpi.service.repo.save_clv_model(
            s, date(2026, 4, 1), "test", utc(2026, 4, 1), unit_model(date(2026, 4, 1))
        )
        # A model as of a day after today is not the latest one for today.
        await kpi.service.repo.save_clv_model(
            s, date(2026, 4, 20), "test", utc(2026, 4, 20), unit_model(date(2026, 4, 20), a=1e-9)
        )
    params = {"from": "2026-03-01", "to": "2026-03-31", "by": "tier"}
    body = await kpi.get("/v1/kpis/churn", **params)
    assert body["p_alive_model"] | {"fitted_at": None} == {
        "as_of": "2026-04-01",
        "fitted_at": None,
        "r": 1.0,
        "alpha": 1.0,
        "a": 1.0,
        "b": 1.0,
    }
    (march,) = body["buckets"]
    # R (P(alive) 49/2753) churned; L (0.758) and O (one purchase: 1) only lapsed.
    assert march["non_contractual"] == {"active_at_start": 3, "churned": 1, "rate": pytest.approx(1 / 3)}
    assert march["lapsed"] == {"active_at_start": 3, "churned": 3, "rate": 1.0}
    assert march["groups"]["non_contractual"] == {
        "bronze": {"active_at_start": 1, "churned": 0, "rate": 0.0},
        "gold": {"active_at_start": 2, "churned": 1, "rate": 0.5},
    }
    await kpi.service.run_rollups()

    async def march_table() -> dict[str, tuple[int, int]]:
        async with kpi.db.sessions() as s:
            c = kpi_churn_monthly.c
            rows = (
                await s.execute(
                    select(kpi_churn_monthly).where(c.dimension == "all", c.month == date(2026, 3, 1))
                )
            ).all()
        return {r.kind: (r.active_at_start, r.churned) for r in rows}

    assert await march_table() == {"contractual": (3, 0), "lapsed": (3, 3), "non_contractual": (3, 1)}

    # A newer model where dropping out is all but impossible (a → 0): P(alive) ≈ 1 for everyone,
    # so nobody churned; the Grafana table follows the new model without any new event.
    async with kpi.db.transaction() as s:
        await kpi.service.repo.save_clv_model(
            s, date(2026, 4, 14), "test", utc(2026, 4, 14), unit_model(date(2026, 4, 14), a=1e-9)
        )
    body = await kpi.get("/v1/kpis/churn", **params)
    assert body["p_alive_model"]["as_of"] == "2026-04-14"
    assert body["buckets"][0]["non_contractual"] == {"active_at_start": 3, "churned": 0, "rate": 0.0}
    await kpi.service.run_rollups()
    assert (await march_table())["non_contractual"] == (3, 0)


# --- CLV --------------------------------------------------------------------------------------------------


def cdnow_events(customers: int) -> list[Event | MessageEvent]:
    """The first ``customers`` customers of the CDNOW sample as purchase events (USD, noon UTC)."""
    events: list[Event | MessageEvent] = []
    for n, line in enumerate(CDNOW.read_text().splitlines()):
        _, customer, day, _, amount = line.split()
        if int(customer) > customers:
            break
        when = datetime(int(day[:4]), int(day[4:6]), int(day[6:]), 12, tzinfo=UTC)
        events.append(purchase(f"cd{customer}", when, amount, "USD", order=f"cd-{n}"))
    return events


def no_dropout_buyers(n: int = 60) -> list[Event | MessageEvent]:
    """Customers who all keep buying: the BG/NBD dropout parameters run off to infinity."""
    rng = random.Random(8)
    events: list[Event | MessageEvent] = []
    for i in range(n):
        day = datetime(2025, 1, 1, 12, tzinfo=UTC).toordinal() + rng.randrange(60)
        for _ in range(1 + rng.randrange(6)):
            when = datetime.fromordinal(day).replace(hour=12, tzinfo=UTC)
            events.append(purchase(f"k{i:03d}", when, f"{rng.randrange(50, 400)}"))
            day += rng.randrange(5, 80)
    return events


async def test_a_corrected_order_is_a_new_fit_not_the_cached_one(kpi: Kpi) -> None:
    """A correction of an order's amount is another history: the cache key saw the count, the
    sum and the extreme event ids only, and served the old fit as current. One that repeats the
    amount later changes nothing (the order keeps its date): the cached fit stands."""
    kpi.at(utc(1997, 10, 1, 12))
    events = cdnow_events(60)
    await kpi.apply(events)
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is False
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is True
    ids = sorted(e.event_id for e in events)
    middle = next(e for e in events if isinstance(e, PurchaseEvent) and e.event_id == ids[len(ids) // 2])
    later = middle.occurred_at + timedelta(days=40)
    same = middle.model_copy(update={"event_id": middle.event_id + "-fix", "occurred_at": later})
    assert ids[0] < same.event_id < ids[-1]  # neither the first nor the last id
    await kpi.apply([same])
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is True
    fixed = same.model_copy(
        update={"event_id": middle.event_id + "-fix2", "occurred_at": later, "amount": middle.amount + 7}
    )
    await kpi.apply([fixed])
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is False
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is True


async def test_a_new_clv_model_version_is_a_new_fit(kpi: Kpi, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fit is made of changed (CLV_MODEL_VERSION): the same purchases are fitted again."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(60))
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is False
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is True
    monkeypatch.setattr(kpi_service, "CLV_MODEL_VERSION", kpi_service.CLV_MODEL_VERSION + 1)
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is False


async def test_a_customer_whose_only_purchase_is_tomorrow_here_has_no_value_yet(kpi: Kpi) -> None:
    """22:30 UTC is 01:30 the next day in Jerusalem (ingest takes events up to a day ahead): the
    customer has no purchase to date. It answered 500 (an empty summary indexed)."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply([*cdnow_events(60), purchase("early", utc(1997, 10, 1, 22, 30), "80", "USD")])
    await kpi.service.refit_and_publish()
    early = await kpi.get("/v1/customers/early/clv")
    assert early["orders"] == 1
    assert early["historic_value"] == 0.0
    assert (early["p_alive"], early["predicted_clv"], early["expected_purchases_90d"]) == (None, None, None)


async def test_a_customer_id_with_a_slash_has_its_clv(kpi: Kpi) -> None:
    """acme/42 is a valid id; the route took one path segment, so it answered 404."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply([*cdnow_events(60), purchase("acme/42", utc(1997, 9, 1, 12), "80", "USD")])
    await kpi.service.refit_and_publish()
    for url in ("/v1/customers/acme%2F42/clv", "/v1/customers/acme/42/clv"):
        found = await kpi.get(url)
        assert (found["customer_id"], found["orders"]) == ("acme/42", 1), url


async def test_a_complainer_whose_purchases_have_no_rate_is_counted_as_not_judged(kpi: Kpi) -> None:
    """900,000 yen without a rate add nothing to the revenue that makes a complaint high-value:
    the complaint and the survey answer are not high-value, and the answers say how many such
    customers were left unjudged (they went unseen)."""
    kpi.at(utc(2026, 2, 10, 12))
    complaint: dict[str, Any] = {"customer": "yen", "complaint": True, "category": "complaint"}
    await kpi.apply(
        [
            purchase("yen", utc(2026, 1, 5), "900000", "JPY"),
            purchase("yen", utc(2026, 1, 6), "100", "ILS"),
            support("Y1", "opened", utc(2026, 2, 2, 9), **complaint),
            support("Y1", "agent_replied", utc(2026, 2, 2, 10), **complaint),
            support("Y2", "opened", utc(2026, 2, 2, 11), customer="nobody"),
            # High-value on its shekels alone: judged, and not counted as unjudged.
            purchase("rich", utc(2026, 1, 5), "6000", "ILS"),
            purchase("rich", utc(2026, 1, 6), "5", "JPY"),
            support(
                "R1", "opened", utc(2026, 2, 2, 12), customer="rich", complaint=True, category="complaint"
            ),
            survey_answer("MY", "yen", 1, utc(2026, 2, 3), journey="complaint_ack"),
        ]
    )
    span = {"from": "2026-02-01", "to": "2026-02-05"}
    high = (await kpi.get("/v1/kpis/response-time", **span))["high_value_complaints"]
    assert (high["stats"]["tickets"], high["with_unconverted_purchases"]) == (1, 1)
    csat = (await kpi.get("/v1/kpis/csat", **span))["high_value"]
    assert (csat["stats"]["answers"], csat["with_unconverted_purchases"]) == (0, 1)


async def test_a_purchase_in_a_currency_without_a_rate_still_counts_as_a_purchase(kpi: Kpi) -> None:
    """As churn's P(alive) counts it: one more repeat day for BG/NBD, no spend, no value."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(300))
    before = await kpi.get("/v1/customers/cd0001/clv")
    await kpi.apply([purchase("cd0001", utc(1997, 9, 20, 9), "100", "JPY")])
    after = await kpi.get("/v1/customers/cd0001/clv")
    assert (before["frequency"], after["frequency"]) == (2, 3)
    assert after["recency_weeks"] > before["recency_weeks"]
    assert (after["orders"], after["unconverted_orders"]) == (before["orders"] + 1, 1)
    assert after["historic_value"] == before["historic_value"]
    model = await kpi.get("/v1/clv/model", as_of="1997-10-01")
    assert model["unconverted_purchases"] == 1


async def test_an_event_id_reused_for_another_purchase_is_refused_not_counted(kpi: Kpi) -> None:
    """Straight onto Kafka, a second order sent under the first one's event id: the first
    stands, the second is handed back for a dead letter (it used to vanish as a duplicate), and
    the first sent again is still a duplicate."""
    kpi.at(utc(1997, 10, 1, 12))
    first = purchase("r1", utc(1997, 9, 1, 9), "100", "ILS", order="o-1")
    second = purchase("r1", utc(1997, 9, 2, 9), "900", "ILS", order="o-2").model_copy(
        update={"event_id": first.event_id}
    )
    await kpi.apply([*cdnow_events(60), first])  # others, for the CLV model to be fitted
    result = await apply(kpi.service, [second, first])
    assert (result.applied, result.duplicates) == (0, 1)
    [(refused, why)] = result.reused
    assert refused.value == second
    assert why.startswith(f"event_id {first.event_id!r} was applied for another event (first read from t")
    customer = await kpi.get("/v1/customers/r1/clv")
    assert (customer["orders"], customer["historic_value"]) == (1, 100.0)


async def test_a_customer_a_refit_cannot_predict_keeps_no_earlier_prediction(
    kpi: Kpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A degenerate fit can overflow for some customers: they are not published, and their
    prediction of the earlier fit no longer stands in the summary and the customer's CLV, which
    are of the latest fit."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(300))
    await kpi.service.refit_and_publish()
    assert (await kpi.get("/v1/customers/cd0001/clv"))["p_alive"] is not None
    real = predictions_module.predict

    def overflowing(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        result.p_alive[result.customer_ids.index("cd0001")] = float("nan")
        return result

    monkeypatch.setattr(kpi_service, "predict", overflowing)
    await kpi.apply([purchase("cd0002", utc(1997, 10, 1, 9), "500", "USD")])  # a new fit
    await kpi.service.refit_and_publish()
    customer = await kpi.get("/v1/customers/cd0001/clv")
    assert (customer["p_alive"], customer["predicted_clv"]) == (None, None)
    summary = await kpi.get("/v1/kpis/clv/summary")
    assert summary["total"]["predictions"]["customers"] == 299


async def test_two_workers_refitting_at_once_publish_each_prediction_once(
    kpi: Kpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kpi process refits on its own clock. The second read the published predictions
    before the first committed, and published every moved customer again, under another event
    id (consumers applied both). It checks what is published now, under the publication lock,
    and keeps what the first published."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(120))
    other = KpiService(kpi.db, kpi.service.settings, None, clock=kpi.service.clock)
    async with kpi.db.sessions() as session:
        before = await kpi.service.repo.predictions(session)  # what both read: nothing published yet
    assert before == {}
    assert await kpi.service.refit_and_publish() == 120

    async def as_read_before_the_first_committed(session: Any) -> Any:
        return before

    monkeypatch.setattr(other.repo, "predictions", as_read_before_the_first_committed)
    assert await other.refit_and_publish() == 0
    async with kpi.db.sessions() as session:
        values = (await session.execute(select(outbox.c.value))).scalars().all()
        published = (
            await session.execute(select(func.count()).where(clv_predictions.c.published_clv.is_not(None)))
        ).scalar()
    assert len(values) == 120
    assert published == 120


async def test_clv_model_customer_and_publication(kpi: Kpi) -> None:
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(300))
    model = await kpi.get("/v1/clv/model", as_of="1997-09-30")
    assert model["cached"] is False
    assert set(model["params"]) == {"r", "alpha", "a", "b", "p", "q", "gamma"}
    assert model["customers"] == 300
    assert model["time_unit"] == "week"
    assert model["currency"] == "ILS"
    assert (await kpi.get("/v1/clv/model", as_of="1997-09-30"))["cached"] is True

    published = await kpi.service.refit_and_publish()
    assert published == 300
    customer = await kpi.get("/v1/customers/cd0001/clv")
    # Customer 1 bought 29.33 + 29.73 + 14.96 USD by 1 October 1997: 270.5 ILS at 3.65.
    assert customer["historic_value"] == pytest.approx((29.33 + 29.73 + 14.96) * 3.65)
    assert customer["frequency"] == 2
    assert 0 <= customer["p_alive"] <= 1
    async with kpi.db.sessions() as s:
        values = (await s.execute(select(outbox.c.value))).scalars().all()
        stored = (
            await s.execute(select(clv_predictions).where(clv_predictions.c.customer_id == "cd0001"))
        ).one()
    predictions = [decode_with(CLV_ADAPTER, v) for v in values]
    first = next(p for p in predictions if p.customer_id == "cd0001")
    assert float(first.predicted_clv) == pytest.approx(customer["predicted_clv"], abs=0.01)
    assert first.p_alive == pytest.approx(stored.p_alive)
    assert first.currency == "ILS"
    assert first.model_as_of == datetime(1997, 10, 1, 22, tzinfo=UTC)  # end of 1 Oct in Jerusalem

    # Nothing changed: nothing is published again. A big new purchase moves its buyer.
    assert await kpi.service.refit_and_publish() == 0
    await kpi.apply([purchase("cd0001", utc(1997, 10, 1, 9), "500", "USD")])
    again = await kpi.service.refit_and_publish()
    assert 1 <= again < 300
    async with kpi.db.sessions() as s:
        latest = (
            (await s.execute(select(outbox.c.value).order_by(outbox.c.id.desc()).limit(again)))
            .scalars()
            .all()
        )
    assert "cd0001" in {decode_with(CLV_ADAPTER, v).customer_id for v in latest}
    summary = await kpi.get("/v1/kpis/clv/summary", by="channel")
    assert summary["total"]["predictions"]["customers"] == 300
    assert summary["model"]["params"]["r"] > 0


async def test_a_backlog_defers_the_scheduled_fit_at_most_the_refit_interval(kpi: Kpi) -> None:
    """While the consumer works through a backlog the tick does not fit (test_consumer has the
    loop's side); a consumer that never catches up still refits once the interval is up."""
    kpi.at(utc(1997, 10, 1, 12))
    await kpi.apply(cdnow_events(50))
    kpi.service.catching_up = lambda: True
    await kpi.service.tick()
    async with kpi.db.sessions() as s:
        assert await kpi.service.repo.predictions(s) == {}
    kpi.service.settings = kpi.service.settings.model_copy(update={"kpi_clv_refit_interval_s": 0})
    await kpi.service.tick()
    async with kpi.db.sessions() as s:
        assert len(await kpi.service.repo.predictions(s)) == 50


async def test_a_degenerate_fit_publishes_no_nonsense(kpi: Kpi) -> None:
    kpi.at(utc(2026, 1, 1, 12))
    await kpi.apply(no_dropout_buyers())
    assert (await kpi.get("/v1/clv/model", as_of="2025-12-31"))["customers"] == 60
    await kpi.service.refit_and_publish()  # must not raise on non-finite predictions
    async with kpi.db.sessions() as s:
        values = (await s.execute(select(outbox.c.value))).scalars().all()
    for v in values:
        p = decode_with(CLV_ADAPTER, v)
        assert math.isfinite(float(p.predicted_clv))
    customer = await kpi.get("/v1/customers/k000/clv")
    assert customer["historic_value"] > 0


async def test_clv_model_needs_data(kpi: Kpi) -> None:
    kpi.at(utc(2026, 1, 1, 12))
    response = await kpi.http.get(
        "/v1/clv/model", params={"as_of": "2025-12-31"}, headers={"Authorization": f"Bearer {kpi.key}"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "query.as_of"
    missing = await kpi.http.get("/v1/customers/nobody/clv", headers={"Authorization": f"Bearer {kpi.key}"})
    assert missing.status_code == 404
    # Purchases there are, in a currency without a rate: the answer says which is missing.
    await kpi.apply(
        [purchase("yen", utc(2025, 6, 1), "5000", "JPY"), purchase("yen", utc(2025, 9, 1), "800", "JPY")]
    )
    response = await kpi.http.get("/v1/customers/yen/clv", headers={"Authorization": f"Bearer {kpi.key}"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "insufficient_data"
    assert "no purchases with an exchange rate" in response.json()["error"]["message"]
    assert "RETAIN_KPI_FX_RATES" in response.json()["error"]["message"]


async def test_a_spend_model_without_an_expected_value_is_not_stored_nor_a_500(
    kpi: Kpi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heavy-tailed spend fits a Gamma-Gamma with q < 1, from which no expected spend follows:
    nothing is stored (the predictions, their summary and churn's P(alive) stay on one fit),
    and the model and customer answers are a 422 saying why, not a server error."""
    kpi.at(utc(2026, 1, 1, 12))
    rng = np.random.default_rng(3)
    events: list[Event | MessageEvent] = [
        purchase(
            f"h{c}",
            utc(2025, 1, 1) + timedelta(days=int(rng.integers(0, 300)), minutes=k),
            f"{rng.lognormal(3, 2.5):.2f}",
        )
        for c in range(300)
        for k in range(int(rng.integers(1, 5)))
    ]
    await kpi.apply(events)
    assert await kpi.service.refit_and_publish() == 0
    async with kpi.service.db.sessions() as s:
        assert (await s.execute(select(func.count()).select_from(clv_models))).scalar() == 0
    headers = {"Authorization": f"Bearer {kpi.key}"}
    fits = 0
    real_fit = predictions.fit

    def counted(*args: Any) -> Any:
        nonlocal fits
        fits += 1
        return real_fit(*args)

    monkeypatch.setattr("services.kpi.service.fit", counted)
    for url in ("/v1/clv/model?as_of=2025-12-31", "/v1/customers/h0/clv", "/v1/customers/h1/clv"):
        response = await kpi.http.get(url, headers=headers)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["code"] == "insufficient_data"
        assert "too heavy-tailed" in response.json()["error"]["message"]
    # The second customer's answer (as of today, the same purchases) reuses the first's refusal.
    assert fits == 2


# --- metrics ----------------------------------------------------------------------------------------------


async def test_metrics_expose_kpis_without_customer_ids(kpi: Kpi) -> None:
    kpi.at(TICKETS_NOW)
    ack = message("A1", "c8", "sent", utc(2026, 1, 11), journey="complaint_ack")  # no holdout group
    await kpi.apply(
        [*ticket_events(), *conversion_events(), ack, profile("c1", utc(2026, 1, 1), locale="ar")]
    )
    response = await kpi.http.get("/metrics")
    assert response.status_code == 200
    lines = [line for line in response.text.splitlines() if line.startswith("retain_kpi_")]
    assert 'retain_kpi_open_tickets_in_breach{category="account"} 1.0' in lines
    # Beside each breach ratio, its denominator: RetainResponseTimeBreachRate wants 20 tickets.
    ratios = {
        line.split('"')[1] for line in lines if line.startswith("retain_kpi_first_response_breach_ratio{")
    }
    counted = {line.split('"')[1] for line in lines if line.startswith("retain_kpi_tickets{")}
    assert ratios == counted
    assert ratios
    assert any(
        line.startswith('retain_kpi_first_response_seconds{category="billing",quantile="0.5"}')
        for line in lines
    )
    assert any(line.startswith('retain_kpi_delivery_ratio{channel="sms"}') for line in lines)
    # What the API gives as null has no series (not a 0): the uplift of a journey without a
    # holdout group, the delivery ratio of messages never attempted (held out, capped: no channel).
    uplifts = [line for line in lines if line.startswith("retain_kpi_conversion_uplift{")]
    assert {line.split('journey="')[1].split('"')[0] for line in uplifts} == {"welcome"}
    assert not [line for line in lines if line.startswith('retain_kpi_delivery_ratio{channel="unknown"}')]
    # No CLV fit yet: no customer has a prediction, and their mean P(alive) is not a number (not 0).
    assert "retain_kpi_clv_customers 0.0" in lines
    assert "retain_kpi_clv_p_alive_mean NaN" in lines
    # As a label value of the KPI series. Not a substring of the whole page: the registry is
    # the test process's, and other tests' labels (random topic and group names, segments) are on it.
    leaked = [line for line in lines if any(f'"{cid}"' in line for cid in ("vip", "cust-T1", "c1", "c7"))]
    assert not leaked, leaked


# --- bad requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "params", "field"),
    [
        ("/v1/kpis/churn", {"from": "2026-05-01", "to": "2026-01-01"}, "query.to"),
        ("/v1/kpis/response-time", {"by": "customer"}, "query.by"),
        ("/v1/kpis/conversion", {"by": "tier,channel"}, "query.by"),
        ("/v1/kpis/csat", {"by": "customer"}, "query.by"),
        ("/v1/kpis/csat", {"from": "2026-02-30"}, "query.from"),
        ("/v1/kpis/cohorts", {"granularity": "year"}, "query.granularity"),
        ("/v1/kpis/clv/summary", {"from": "yesterday"}, "query.from"),
        ("/v1/kpis/response-time", {"from": "2026-02-30"}, "query.from"),
        ("/v1/kpis/churn", {"from": "1990-01-01", "to": "2026-01-01"}, "query.from"),
        (
            "/v1/kpis/response-time",
            {"from": "2023-01-01", "to": "2026-01-01", "granularity": "day"},
            "query.granularity",
        ),
        ("/v1/clv/model", {"as_of": "2999-01-01"}, "query.as_of"),
        ("/v1/clv/model", {"as_of": "1997-13-01"}, "query.as_of"),
        # Near date.min/max the period arithmetic would overflow: refused by range instead.
        ("/v1/kpis/churn", {"to": "0001-01-01"}, "query.to"),
        ("/v1/kpis/cohorts", {"from": "9999-12-31", "to": "9999-12-31"}, "query.from"),
        # A cohort's row runs to today: a daily table from years back is refused, not 20 MB.
        (
            "/v1/kpis/cohorts",
            {"from": "2016-01-01", "to": "2016-02-01", "granularity": "day"},
            "query.granularity",
        ),
        ("/v1/clv/model", {"as_of": "0001-01-01"}, "query.as_of"),
        # Only YYYY-MM-DD: not a Unix time (2026-01-01 00:00 UTC), nor a datetime, nor digits alone.
        ("/v1/kpis/churn", {"from": "1767225600"}, "query.from"),
        ("/v1/kpis/conversion", {"to": "2026-01-31T00:00:00Z"}, "query.to"),
        ("/v1/clv/model", {"as_of": "20260101"}, "query.as_of"),
        # A parameter the operation does not take was ignored: the last 30 days, as if asked.
        ("/v1/kpis/churn", {"start": "2020-01-01", "end": "2020-12-31"}, "query.start"),
        ("/v1/kpis/conversion", {"group_by": "tier"}, "query.group_by"),
        ("/v1/customers/c1/clv", {"as_of": "2026-01-01"}, "query.as_of"),
    ],
)
async def test_bad_parameters_are_named(kpi: Kpi, url: str, params: dict[str, str], field: str) -> None:
    response = await kpi.http.get(url, params=params, headers={"Authorization": f"Bearer {kpi.key}"})
    assert response.status_code == 422, response.text
    assert field in [d["field"] for d in response.json()["error"]["details"]]


async def test_a_parameter_given_twice_is_named_not_the_last_one_taken(kpi: Kpi) -> None:
    response = await kpi.http.get(
        "/v1/kpis/churn?from=2026-01-01&from=2025-01-01&to=2026-02-01",
        headers={"Authorization": f"Bearer {kpi.key}"},
    )
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail == {"field": "query.from", "message": "given 2 times; give it once"}


async def test_a_day_not_written_yyyy_mm_dd_is_named_with_the_form_expected(kpi: Kpi) -> None:
    response = await kpi.http.get(
        "/v1/kpis/churn", params={"from": "1767225600"}, headers={"Authorization": f"Bearer {kpi.key}"}
    )
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == "query.from"
    assert "expected a day as YYYY-MM-DD, got '1767225600'" in detail["message"]


async def test_cohorts_from_years_back_by_week_are_answered(kpi: Kpi) -> None:
    """The limit counts to today in the granularity asked: weeks since 2016 are well under it."""
    kpi.at(utc(2026, 6, 1))
    await kpi.apply([purchase("w", utc(2016, 1, 4)), purchase("w", utc(2016, 1, 20))])
    body = await kpi.get(
        "/v1/kpis/cohorts", **{"from": "2016-01-01", "to": "2016-02-01", "granularity": "week"}
    )
    [cohort] = body["cohorts"]
    assert (cohort["start"], cohort["size"]) == ("2016-01-04", 1)
    weeks = (date(2026, 6, 1) - date(2016, 1, 4)).days // 7  # to this week: 544 buckets
    assert len(cohort["active"]) == weeks + 1
    assert cohort["active"][:3] == [1, 0, 1]  # bought in its first and third week


async def test_scope_kpi_read_is_required(kpi: Kpi) -> None:
    assert (await kpi.http.get("/v1/kpis/churn")).status_code == 401
    other = await kpi.http.get("/v1/kpis/churn", headers={"Authorization": f"Bearer {kpi.other_key}"})
    assert other.status_code == 403
    assert (await kpi.http.get("/healthz")).status_code == 200
    assert (await kpi.http.get("/readyz")).status_code == 200


async def test_ticket_facts_survive_duplicates_with_other_ids(kpi: Kpi) -> None:
    # The same order sent twice under two event ids is one order; the newer event wins.
    kpi.at(utc(2026, 2, 1))
    first = purchase("z", utc(2026, 1, 5), "100", order="o-1")
    corrected = purchase("z", utc(2026, 1, 5, 11), "120", order="o-1")
    await kpi.apply([corrected, first])
    await kpi.apply([support("TT", "opened", utc(2026, 1, 5), customer="z")])
    summary = await kpi.get("/v1/kpis/clv/summary", **{"from": "2026-01-01", "to": "2026-01-31"})
    assert (summary["total"]["orders"], summary["total"]["revenue"]) == (1, 120.0)


async def test_messenger_ids_longer_than_backend_ids_fit(kpi: Kpi) -> None:
    # The messenger derives event ids from customer ids ("optout:<customer>:<channel>:<time>",
    # claimed in the ledger though no fact is kept): up to about 180 characters.
    customer = "c" * 128
    kpi.at(utc(2026, 1, 25))
    optout = message(f"optout:{customer}", customer, "unsubscribed", utc(2026, 1, 10), journey="-")
    long_id = optout.model_copy(update={"event_id": f"optout:{customer}:whatsapp:2026-01-10T00:00:00+00:00"})
    await kpi.apply([long_id, message(f"m-{customer}", customer, "sent", utc(2026, 1, 10), tier="t" * 100)])
    body = await kpi.get("/v1/kpis/conversion", **{"from": "2026-01-10", "to": "2026-01-10"})
    assert body["total"]["stats"]["sent"] == 1


async def test_an_opt_out_the_messenger_publishes_is_no_message(kpi: Kpi) -> None:
    """The messenger publishes each opt-out on retain.messages (message_id optout:<customer>,
    journey "-", status unsubscribed): no message, so no journey "-" assigned its opt-outs and
    credited with the purchases after them."""
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(
        [
            message("optout:c1", "c1", "unsubscribed", utc(2026, 1, 10), journey="-"),
            purchase("c1", utc(2026, 1, 11), "80"),
            message("m-c2", "c2", "sent", utc(2026, 1, 10)),
        ]
    )
    span = {"from": "2026-01-10", "to": "2026-01-10", "by": "journey"}
    body = await kpi.get("/v1/kpis/conversion", **span)
    assert set(body["total"]["groups"]) == {"welcome"}
    assert body["total"]["stats"]["sent"] == 1
    # Grafana's daily table: the journeys of that day are the one message's.
    await kpi.service.run_rollups()
    c = kpi_conversion_daily.c
    async with kpi.db.sessions() as s:
        journeys = await s.execute(select(c.value, c.assigned).where(c.dimension == "journey"))
        assert sorted(journeys) == [("welcome", 1)]


async def test_the_clv_gauges_sum_the_predictions(kpi: Kpi) -> None:
    """Summed in the database (one row), not read customer by customer at each refresh: three
    predictions, two of them below the P(alive) threshold (0.3), by hand."""
    rows = [
        Prediction("g1", date(2026, 1, 31), 100.0, 250.5, 0.9, 1.5),
        Prediction("g2", date(2026, 1, 31), 40.0, 10.0, 0.2, 0.1),
        Prediction("g3", date(2026, 1, 31), 0.0, 0.0, 0.05, 0.0),
    ]
    async with kpi.db.transaction() as session:
        await kpi.service.repo.save_predictions(session, rows, set(), utc(2026, 2, 1))
    response = await kpi.http.get("/metrics")
    lines = set(response.text.splitlines())
    assert {
        "retain_kpi_clv_customers 3.0",
        "retain_kpi_clv_predicted_total 260.5",
        "retain_kpi_clv_historic_total 140.0",
        "retain_kpi_clv_at_risk_customers 2.0",
    } <= lines, sorted(line for line in lines if line.startswith("retain_kpi_clv"))
    [mean] = [line.split()[1] for line in lines if line.startswith("retain_kpi_clv_p_alive_mean ")]
    assert float(mean) == pytest.approx((0.9 + 0.2 + 0.05) / 3)


def test_the_kpi_values_are_on_the_apis_metrics_only() -> None:
    """The consumer process imports the gauges too; exported there they would be a copy at 0
    (retain_kpi_clv_customers 0.0 on :8104 against 2749.0 on :8004) that sum() or min() counts."""
    script = (
        "import services.kpi.consumer\n"
        "from prometheus_client import generate_latest\n"
        "print(generate_latest().decode())\n"
    )
    consumer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    names = {
        line.split("{")[0].split(" ")[0] for line in consumer.stdout.splitlines() if not line.startswith("#")
    }
    assert "retain_kpi_clv_fit_seconds" in names  # the consumer fits: its own figure
    assert not {n for n in names if n.startswith(("retain_kpi_clv_customers", "retain_kpi_churn_rate"))}
    expose(KPI_GAUGES)
    expose(KPI_GAUGES)  # idempotent: a second app in one process
    exported = generate_latest().decode()
    assert "# TYPE retain_kpi_clv_customers gauge" in exported


async def test_lookups_of_many_customers_stay_within_the_drivers_limits(kpi: Kpi) -> None:
    """A year's conversion can concern tens of thousands of customers: one bind parameter per
    id would pass asyncpg's 32,767."""
    kpi.at(utc(2026, 1, 25))
    await kpi.apply(
        [purchase("c1", utc(2026, 1, 10), "40", "ILS"), profile("c1", utc(2026, 1, 1), locale="ar")]
    )
    many = ["c1", *(f"x{i:05d}" for i in range(40_000))]
    async with kpi.db.sessions() as s:
        bought = await kpi.service.repo.purchases(s, customer_ids=many, since=utc(2026, 1, 1))
        attributes = await kpi.service.repo.customer_attributes(s, many)
    assert [(r.customer_id, r.amount) for r in bought] == [("c1", Decimal(40))]
    assert attributes["c1"].locale == "ar"
