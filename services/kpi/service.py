"""The kpi service's use cases: apply event batches to the fact tables, keep the Grafana tables
and the CLV predictions up to date between batches, and answer the KPI API. Transactions begin
and end here; SQL lives in the repository; the definitions live in the pure modules
(response_time, churn, conversion, clv/predictions)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession

from services.kpi import churn as churn_kpi
from services.kpi import conversion as conversion_kpi
from services.kpi import csat as csat_kpi
from services.kpi import response_time as response_kpi
from services.kpi.clv import ClvFitError, summarize
from services.kpi.config import KpiSettings
from services.kpi.facts import fold
from services.kpi.periods import (
    Granularity,
    Period,
    add_months,
    bucket_start,
    buckets,
    local_day,
    local_midnight,
    period,
)
from services.kpi.predictions import ABSOLUTE_FLOOR, FittedModel, fit, moved, params_from, predict
from services.kpi.repository import (
    CancellationRow,
    CustomerAttributes,
    KpiRepository,
    Prediction,
    PurchaseRow,
)
from services.kpi.response_time import TicketKey
from services.kpi.stats import group_by
from services.kpi.tables import (
    applied_events,
    cancellations,
    kpi_churn_monthly,
    kpi_conversion_daily,
    kpi_csat_daily,
    kpi_response_time_daily,
    message_events,
    outbox,
    purchases,
    support_events,
    survey_answers,
    tickets,
)
from shared.codec import encode, encode_key
from shared.db import Database, claim_events
from shared.events import ClvPrediction, Event, MessageEvent
from shared.kafka.consumer import BatchResult, Delivered
from shared.kafka.producer import OutboundRecord, Producer
from shared.logs import get_logger
from shared.outbox import OutboxRelay, enqueue
from shared.topics import CLV

log = get_logger(__name__)
T = TypeVar("T")

Clock = Callable[[], datetime]
UNKNOWN = "unknown"
MAX_LABELS = 20  # per label of a KPI gauge; the rest are summed up as "other"

# The KPI values: computed by the API process when /metrics is scraped (refresh_gauges), and
# registered there only (``shared.metrics.expose`` in its create_app). The consumer imports this
# module too, and would export a copy of every one of them at 0 that a sum() or min() counts.
FIRST_RESPONSE = Gauge(
    "retain_kpi_first_response_seconds",
    "First response time of the tickets opened in the metrics window.",
    ["category", "quantile"],
    registry=None,
)
RESOLUTION = Gauge(
    "retain_kpi_resolution_seconds",
    "Resolution time of the tickets opened in the metrics window (resolved ones).",
    ["category", "quantile"],
    registry=None,
)
FIRST_RESPONSE_TARGET = Gauge(
    "retain_kpi_first_response_target_seconds",
    "First-response target of each category charted (a complaint-flagged ticket may have the "
    "stricter complaint target).",
    ["category"],
    registry=None,
)
BREACH_RATE = Gauge(
    "retain_kpi_first_response_breach_ratio",
    "Share of tickets past their first-response target.",
    ["category"],
    registry=None,
)
TICKETS = Gauge(
    "retain_kpi_tickets",
    "Tickets opened in the metrics window: the breach ratio's denominator (a ratio of three tickets "
    "is no trend).",
    ["category"],
    registry=None,
)
OPEN_IN_BREACH = Gauge(
    "retain_kpi_open_tickets_in_breach",
    "Unresolved tickets already past their first-response target.",
    ["category"],
    registry=None,
)
CHURN_RATE = Gauge(
    "retain_kpi_churn_rate",
    "Churned in the month / active at its start (kpi_churn_monthly, as the consumer's last rollup wrote it).",
    ["kind", "month"],
    registry=None,
)
CONVERSION_RATE = Gauge(
    "retain_kpi_conversion_rate",
    "Messages followed by a purchase within the window.",
    ["journey", "arm"],
    registry=None,
)
UPLIFT = Gauge(
    "retain_kpi_conversion_uplift",
    "Assigned minus held-out conversion rate (intent to treat), with its 95 % Newcombe interval.",
    ["journey", "bound"],
    registry=None,
)
REVENUE_PER_MESSAGE = Gauge(
    "retain_kpi_revenue_per_message",
    "Revenue within the window per sent message.",
    ["journey"],
    registry=None,
)
DELIVERY_RATE = Gauge(
    "retain_kpi_delivery_ratio", "Delivered / attempted messages.", ["channel"], registry=None
)
FAILURE_RATE = Gauge(
    "retain_kpi_failure_ratio", "Failed or undelivered / attempted messages.", ["channel"], registry=None
)
ACTIONS_PER_ENGAGEMENT = Gauge(
    "retain_kpi_actions_per_engagement",
    "Replies, clicks and purchases per delivered message.",
    ["channel"],
    registry=None,
)
CSAT = Gauge(
    "retain_kpi_csat_ratio",
    "Survey answers of 4 or 5 out of 5 / answers, in the metrics window.",
    ["journey"],
    registry=None,
)
CSAT_ANSWERS = Gauge(
    "retain_kpi_csat_answers", "Survey answers in the metrics window.", ["journey"], registry=None
)
CLV_CUSTOMERS = Gauge("retain_kpi_clv_customers", "Customers with a CLV prediction.", registry=None)
CLV_PREDICTED_TOTAL = Gauge(
    "retain_kpi_clv_predicted_total", "Sum of predicted CLV (reporting currency).", registry=None
)
CLV_HISTORIC_TOTAL = Gauge(
    "retain_kpi_clv_historic_total", "Sum of historic value (reporting currency).", registry=None
)
CLV_P_ALIVE_MEAN = Gauge(
    "retain_kpi_clv_p_alive_mean", "Mean P(alive) of customers with a prediction.", registry=None
)
CLV_AT_RISK = Gauge(
    "retain_kpi_clv_at_risk_customers", "Customers with P(alive) below the threshold.", registry=None
)
CLV_PARAM = Gauge(
    "retain_kpi_clv_model_param", "Parameters of the latest CLV model.", ["param"], registry=None
)
# Registered at import, by both processes: the API fits too, when GET /v1/clv/model or
# /v1/customers/{id}/clv finds no current fit.
CLV_FIT_SECONDS = Gauge("retain_kpi_clv_fit_seconds", "Duration of the latest CLV fit.")
LABELLED_GAUGES = (
    FIRST_RESPONSE,
    FIRST_RESPONSE_TARGET,
    RESOLUTION,
    BREACH_RATE,
    TICKETS,
    OPEN_IN_BREACH,
    CHURN_RATE,
    CONVERSION_RATE,
    UPLIFT,
    REVENUE_PER_MESSAGE,
    DELIVERY_RATE,
    FAILURE_RATE,
    ACTIONS_PER_ENGAGEMENT,
    CSAT,
    CSAT_ANSWERS,
    CLV_PARAM,
)
KPI_GAUGES = (
    *LABELLED_GAUGES,
    CLV_CUSTOMERS,
    CLV_PREDICTED_TOTAL,
    CLV_HISTORIC_TOTAL,
    CLV_P_ALIVE_MEAN,
    CLV_AT_RISK,
)


# The consumer's scheduled refit is what publishes, so the consumer process alone registers it
# (``shared.metrics.expose``).
PREDICTIONS_PUBLISHED = Counter(
    "retain_kpi_clv_predictions_published_total", "ClvPrediction events written to retain.clv.", registry=None
)
CONSUMER_METRICS = (PREDICTIONS_PUBLISHED,)
ROLLUPS = Counter("retain_kpi_rollups_total", "Grafana-table recomputations, by table.", ["table"])


# Bumped when a KPI's definition changes, so that the Grafana tables of a running installation
# are recomputed with it (2: the uplift compares only the journeys that have both arms; 3: it
# is intent to treat, with the assigned arm in kpi_conversion_daily; 4: a category "Complaint" in
# any case is a complaint, and the targets' categories are read in any case).
DEFINITIONS_VERSION = 4
# Bumped when what a CLV fit is made of changes, so that a cached fit of the same purchases is
# not served (2: purchases without an exchange rate count for BG/NBD).
CLV_MODEL_VERSION = 2


def utcnow() -> datetime:
    return datetime.now(UTC)


class InsufficientDataError(Exception):
    """Nothing (or too little) to compute the model from as of the date asked."""


@dataclass(frozen=True, slots=True)
class KpiQuery:
    first: date
    last: date
    granularity: Granularity
    by: str | None = None


def _converted_purchases(
    rows: Iterable[PurchaseRow], settings: KpiSettings
) -> dict[str, list[tuple[datetime, Decimal | None]]]:
    fx = settings.fx
    out: dict[str, list[tuple[datetime, Decimal | None]]] = {}
    for r in rows:
        out.setdefault(r.customer_id, []).append((r.occurred_at, fx.convert(r.amount, r.currency)))
    for values in out.values():
        values.sort(key=lambda v: v[0])
    return out


def _histories(
    bought: Mapping[str, Sequence[datetime]],
    cancellation_rows: Iterable[CancellationRow],
    attrs: Mapping[str, CustomerAttributes] | None = None,
) -> list[churn_kpi.CustomerHistory]:
    """``bought``: each customer's order times (``KpiRepository.purchase_times``)."""
    cancelled = group_by(cancellation_rows, lambda r: r.customer_id)
    attrs = attrs or {}
    return [
        churn_kpi.history(
            cid,
            bought.get(cid, ()),
            ((r.occurred_at, r.reason) for r in cancelled.get(cid, [])),
            tier=attrs[cid].tier if cid in attrs else None,
        )
        for cid in sorted(set(bought) | set(cancelled))
    ]


def _attribute(attrs: Mapping[str, CustomerAttributes], name: str) -> Callable[[str], str]:
    def of(customer_id: str) -> str:
        a = attrs.get(customer_id)
        value = None if a is None else getattr(a, name)
        return value or UNKNOWN

    return of


def _overlay(
    stored: Iterable[response_kpi.Ticket],
    fresh: Mapping[TicketKey, response_kpi.Ticket],
    keep: Callable[[response_kpi.Ticket], bool],
) -> list[response_kpi.Ticket]:
    """The stored tickets, with the stale ones replaced by their fresh derivation."""
    return [t for t in stored if t.key not in fresh] + [t for t in fresh.values() if keep(t)]


# What conversion and CSAT are broken down by: what the messenger stamped on the message.
STAMPED = ("journey", "channel", "tier", "locale")


def _stamped(name: str) -> Callable[[Any], str]:
    """A message's (or an answer's) stamped attribute ``name``, 'unknown' when it has none."""

    def of(item: Any) -> str:
        value: str | None = getattr(item, name)
        return value or UNKNOWN

    return of


def _block(
    items: Sequence[T],
    summarize: Callable[[Sequence[T]], Any],
    key: Callable[[T], str] | None,
    summarize_group: Callable[[Sequence[T]], Any] | None = None,
) -> dict[str, Any]:
    """A block of a KPI answer: the statistics of ``items`` and, with ``by``, of each value of
    its ``key`` (with ``summarize_group`` when a group is summed up otherwise)."""
    each = summarize_group or summarize
    groups = {} if key is None else {k: each(g) for k, g in sorted(group_by(items, key).items())}
    return {"stats": summarize(items), "groups": groups}


def _daily_cells(
    items: Iterable[T], day_of: Callable[[T], date], dims: Mapping[str, Callable[[T], str]]
) -> Iterator[tuple[date, str, str, list[T]]]:
    """The cells of a daily Grafana table: per day, per dimension, per value, its items."""
    for day, day_items in sorted(group_by(items, day_of).items()):
        for dimension, key in dims.items():
            for value, group in sorted(group_by(day_items, key).items()):
                yield day, dimension, value, group


def _top(values: Iterable[str]) -> Callable[[str], str]:
    """Bounded gauge labels: the most frequent values keep their name, the rest become 'other'."""
    kept = {v for v, _ in Tally(values).most_common(MAX_LABELS)}
    return lambda v: v if v in kept else "other"


class KpiService:
    def __init__(
        self, db: Database, settings: KpiSettings, producer: Producer | None = None, clock: Clock = utcnow
    ) -> None:
        self.db = db
        self.settings = settings
        self.repo = KpiRepository()
        self.clock = clock
        self.tz = settings.tz
        self.clv_topic = settings.topic(CLV)
        self.relay = OutboxRelay(db, outbox, producer) if producer is not None else None
        self._last_rollup = -float("inf")
        # The outbox is read at the first tick (what an earlier process left), right after each
        # refit's enqueue, and after a failed send: not after every batch.
        self._outbox_clean = False
        self._last_fit: float | None = None
        self._started = time.monotonic()
        # Whether the consumer is still working through a backlog; its loop says (build_loop).
        self.catching_up: Callable[[], bool] = lambda: False
        self._gauges_at = -float("inf")
        self._fit_lock = asyncio.Lock()
        # The last fit refused, as ((as of, purchases' fingerprint), why): not fitted again for
        # every request until the purchases change.
        self._refused: tuple[tuple[date, str], str] | None = None

    def today(self) -> date:
        return local_day(self.clock(), self.tz)

    # --- the consumer's handler -----------------------------------------------------------------

    async def apply_batch(self, batch: Sequence[Delivered[Event | MessageEvent]]) -> BatchResult:
        async with self.db.transaction() as session:
            claimed = await claim_events(session, applied_events, batch)
            rows = fold([d.value for d in claimed.fresh])
            # The earliest date of the orders written, as stored (an order keeps its first date).
            ordered_from = await self.repo.upsert_purchases(session, list(rows.purchases.values()))
            await self.repo.insert_facts(session, support_events, rows.support)
            await self.repo.insert_facts(session, cancellations, rows.cancellations)
            await self.repo.insert_facts(session, message_events, rows.messages)
            await self.repo.insert_facts(session, survey_answers, rows.surveys)
            await self.repo.upsert_customers(session, list(rows.customers.values()))
            # The tickets are rebuilt from their steps by the periodic rollup (which marks the
            # response-time days they open on); readers derive the stale ones meanwhile.
            await self.repo.mark_tickets_stale(session, rows.ticket_keys)
            # The earliest time each rollup must redo from. One min() per kind of fact: each
            # comparison of two event times calls their tzinfo's utcoffset twice.
            dirty: dict[str, datetime] = {}

            def redo_from(name: str, at: datetime) -> None:
                if name not in dirty or at < dirty[name]:
                    dirty[name] = at

            if ordered_from is not None:
                redo_from("churn", ordered_from)
                redo_from("clv", ordered_from)
                redo_from("conversion", ordered_from - self.settings.conversion_window)
            if rows.cancellations:
                redo_from("churn", min(rows.cancellation_times()))
            if rows.messages:
                # A new status of a message redoes the day the message began on: the rollup
                # widens this day to the first status of every message with a status since.
                redo_from("conversion", min(r["occurred_at"] for r in rows.messages))
            if rows.surveys:
                redo_from("csat", min(r["occurred_at"] for r in rows.surveys))
            await self.repo.mark_dirty(session, {name: local_day(at, self.tz) for name, at in dirty.items()})
        return BatchResult(len(claimed.fresh), claimed.duplicates, claimed.reused)

    # --- between batches -----------------------------------------------------------------------

    async def tick(self) -> None:
        """Work between consumer batches: the Grafana tables and the scheduled CLV refit."""
        if time.monotonic() - self._last_rollup >= self.settings.kpi_rollup_interval_s:
            self._last_rollup = time.monotonic()
            await self.run_rollups()
        if await self._refit_due():
            await self.refit_and_publish()
        await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        if self.relay is None:
            return
        if not self._outbox_clean:
            await self.relay.flush()  # raises on failure: still not clean, the next tick retries
            self._outbox_clean = True

    async def _refit_due(self) -> bool:
        """The scheduled fit waits for a backlog to be applied: a fit on the first minutes of a
        replayed history would be published and served until the next one. The hourly interval
        (since the last fit, or the start) bounds the wait, so that a consumer that never catches
        up still refits."""
        since = time.monotonic() - (self._started if self._last_fit is None else self._last_fit)
        if since >= self.settings.kpi_clv_refit_interval_s:
            return True
        if self.catching_up():
            return False
        if self._last_fit is None:
            return True
        if since < self.settings.kpi_clv_refit_after_change_s:
            return False
        async with self.db.sessions() as session:
            status = await self.repo.rollup_status(session, "clv")
        return status.dirty_from is not None

    # --- Grafana tables --------------------------------------------------------------------------

    def _rollup_settings(self) -> str:
        """What the Grafana tables depend on besides the facts; a change recomputes them all."""
        s = self.settings
        parts = (
            str(DEFINITIONS_VERSION),
            s.kpi_timezone,
            s.fx.fingerprint(),
            repr(sorted(s.kpi_first_response_targets_h.items())),
            repr(s.kpi_default_first_response_target_h),
            repr(s.kpi_churn_window_days),
            repr(s.kpi_churn_p_alive_threshold),
            repr(s.kpi_conversion_window_days),
        )
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    async def rebuild_tickets(self) -> int:
        """Derive the stale tickets from all of their steps; mark the days they open on."""
        async with self.db.transaction() as session:
            await self.repo.lock_ticket_rebuild(session)
            seen = await self.repo.stale_tickets(session)
            if not seen:
                return 0
            # The days the tickets leave are redone too: a late 'opened' moves one forward.
            was = await self.repo.earliest_stale_opening(session)
            derived = list((await self._fresh_tickets(session)).values())
            await self.repo.save_tickets(session, derived)
            await self.repo.clear_stale_tickets(session, seen)
            openings = [t.opened_at for t in derived] + ([was] if was is not None else [])
            if openings:
                first = min(openings)
                await self.repo.mark_dirty(session, {"response_time": local_day(first, self.tz)})
        return len(derived)

    async def _fresh_tickets(self, session: AsyncSession) -> dict[TicketKey, response_kpi.Ticket]:
        """The stale tickets, derived from their steps."""
        steps = await self.repo.stale_ticket_steps(session)
        return {
            key: response_kpi.ticket_from_steps(group)
            for key, group in group_by(steps, lambda s: (s.customer_id, s.ticket_id)).items()
        }

    async def _tickets_opened(
        self,
        session: AsyncSession,
        start: datetime,
        end: datetime,
        fresh: Mapping[TicketKey, response_kpi.Ticket],
    ) -> list[response_kpi.Ticket]:
        stored = await self.repo.tickets_opened(session, start, end)
        return _overlay(stored, fresh, lambda t: start <= t.opened_at < end)

    async def _tickets_and_open(
        self, session: AsyncSession, start: datetime, end: datetime
    ) -> tuple[list[response_kpi.Ticket], list[response_kpi.Ticket]]:
        """The tickets opened in [start, end), and every ticket still open."""
        fresh = await self._fresh_tickets(session)
        found = await self._tickets_opened(session, start, end, fresh)
        still_open = _overlay(await self.repo.open_tickets(session), fresh, lambda t: t.resolved_at is None)
        return found, still_open

    async def _first_conversion_day(self, dirty: date) -> date:
        """The day of the first status of every message with a status on or after ``dirty``."""
        async with self.db.sessions() as session:
            first = await self.repo.first_time_of_messages_since(session, local_midnight(dirty, self.tz))
        return dirty if first is None else min(dirty, local_day(first, self.tz))

    async def run_rollups(self) -> None:
        await self.rebuild_tickets()
        today = self.today()
        targets_days = max(
            [
                self.settings.kpi_default_first_response_target_h,
                *self.settings.kpi_first_response_targets_h.values(),
            ]
        )
        # Unanswered tickets breach as time passes: the days within the longest target are redone.
        response_from = today - timedelta(days=int(targets_days // 24) + 2)
        await self._rollup(
            "response_time", kpi_response_time_daily, response_from, self._response_rows, tickets.c.opened_at
        )
        await self._rollup(
            "conversion",
            kpi_conversion_daily,
            today - timedelta(days=1),
            self._conversion_rows,
            message_events.c.occurred_at,
            widen=self._first_conversion_day,
        )
        await self._rollup(
            "csat", kpi_csat_daily, today - timedelta(days=1), self._csat_rows, survey_answers.c.occurred_at
        )
        # Non-contractual lapses happen as time passes: this month and the last are redone; a
        # new CLV model changes P(alive) at every lapse, so it redoes every month.
        previous_month = add_months(bucket_start(today, Granularity.MONTH), -1)
        async with self.db.sessions() as session:
            alive, model = await self._alive_test(session)
        model_key = "" if model is None else f"{model.as_of}|{model.fitted_at.isoformat()}"

        async def churn_rows(first: date, last: date) -> list[dict[str, Any]]:
            return await self._churn_rows(first, last, alive)

        await self._rollup(
            "churn", kpi_churn_monthly, previous_month, churn_rows, purchases.c.occurred_at, model_key
        )

    async def _rollup(
        self,
        name: str,
        table: Any,
        always_from: date,
        compute: Callable[[date, date], Any],
        earliest_column: Any,
        inputs: str = "",
        widen: Callable[[date], Awaitable[date]] | None = None,
    ) -> None:
        """``inputs``: what else the rows depend on (a change recomputes them all); ``widen``:
        the earliest day a change on the dirty day reaches back to."""
        today = self.today()
        settings = self._rollup_settings()
        if inputs:
            settings = hashlib.sha256(f"{settings}|{inputs}".encode()).hexdigest()
        async with self.db.transaction() as session:
            seen = await self.repo.take_dirty(session, name)
            dirty = seen.dirty_from
            if not seen.computed or seen.settings != settings:
                earliest = await self.repo.earliest(session, earliest_column)
                since = local_day(earliest, self.tz) if earliest is not None else today
            else:
                since = min(dirty or today, always_from)
        if widen is not None and dirty is not None:
            since = min(since, await widen(dirty))
        if name == "churn":
            since = bucket_start(since, Granularity.MONTH)
        since = min(since, today)
        rows = await compute(since, today)
        now = self.clock()
        for row in rows:
            row["computed_at"] = now
        async with self.db.transaction() as session:
            await self.repo.replace_rows(session, table, since, rows)
            await self.repo.finish_rollup(session, name, seen, settings, now)
        ROLLUPS.labels(table.name).inc()

    async def _response_rows(self, first: date, last: date) -> list[dict[str, Any]]:
        whole = period(first, last, self.tz)
        async with self.db.sessions() as session:
            fresh = await self._fresh_tickets(session)
            found = await self._tickets_opened(session, whole.start, whole.end, fresh)
        now = self.clock()
        dims: dict[str, Callable[[response_kpi.Ticket], str]] = {
            "all": lambda _t: "all",
            "category": lambda t: t.category,
            "priority": lambda t: t.priority or "none",
            "complaint": lambda t: "true" if t.is_complaint else "false",
        }
        out: list[dict[str, Any]] = []
        for day, dimension, value, group in _daily_cells(
            found, lambda t: local_day(t.opened_at, self.tz), dims
        ):
            s = response_kpi.summarize(group, self.settings.targets, now)
            out.append(
                {
                    "day": day,
                    "dimension": dimension,
                    "value": value[:64],
                    "tickets": s.tickets,
                    "answered": s.first_response.count,
                    "first_response_p50_s": s.first_response.p50_s,
                    "first_response_p90_s": s.first_response.p90_s,
                    "first_response_mean_s": s.first_response.mean_s,
                    "resolved": s.resolution.count,
                    "resolution_p50_s": s.resolution.p50_s,
                    "resolution_p90_s": s.resolution.p90_s,
                    "resolution_mean_s": s.resolution.mean_s,
                    "breached": s.breached,
                    "breach_rate": s.breach_rate,
                    "reopened_tickets": s.reopened_tickets,
                }
            )
        return out

    async def _conversion_rows(self, first: date, last: date) -> list[dict[str, Any]]:
        messages, bought = await self._messages(period(first, last, self.tz))
        window = self.settings.conversion_window
        dims: dict[str, Callable[[conversion_kpi.Message], str]] = {
            "all": lambda _m: "all",
            **{name: _stamped(name) for name in STAMPED},
        }
        out: list[dict[str, Any]] = []
        for day, dimension, value, group in _daily_cells(
            messages, lambda m: local_day(m.decided_at, self.tz), dims
        ):
            s = conversion_kpi.summarize(
                group,
                bought,
                window,
                compare=dimension != "channel",
                # One journey per row: the panel adds a journey's days up, like with like
                # over its range; a day with one arm must still bring that arm.
                lone_arms=dimension == "journey",
            )
            out.append(
                {
                    "day": day,
                    "dimension": dimension,
                    "value": value[:128],
                    "sent": s.sent,
                    "conversions": s.conversions,
                    "conversion_rate": s.conversion_rate,
                    "revenue": float(s.revenue),
                    "revenue_per_message": None
                    if s.revenue_per_message is None
                    else float(s.revenue_per_message),
                    "holdout": s.holdout,
                    "holdout_conversions": s.holdout_conversions,
                    "holdout_rate": s.holdout_rate,
                    "assigned": s.assigned,
                    "assigned_conversions": s.assigned_conversions,
                    "assigned_rate": s.assigned_rate,
                    "uplift": s.uplift,
                    "uplift_ci_low": s.uplift_ci_low,
                    "uplift_ci_high": s.uplift_ci_high,
                    "attempted": s.attempted,
                    "delivered": s.delivered,
                    "failed": s.failed,
                    "delivery_rate": s.delivery_rate,
                    "failure_rate": s.failure_rate,
                    "actions": s.actions,
                    "actions_per_engagement": s.actions_per_engagement,
                }
            )
        return out

    async def _answers(self, whole: Period) -> list[csat_kpi.Answer]:
        """The first answer of each message answered in the period."""
        async with self.db.sessions() as session:
            stored = await self.repo.survey_answers(session, whole.start, whole.end)
        return [a for a in csat_kpi.first_answers(stored) if whole.contains(a.at)]

    async def _csat_rows(self, first: date, last: date) -> list[dict[str, Any]]:
        answers = await self._answers(period(first, last, self.tz))
        dims: dict[str, Callable[[csat_kpi.Answer], str]] = {
            "all": lambda _a: "all",
            **{name: _stamped(name) for name in STAMPED},
        }
        out: list[dict[str, Any]] = []
        for day, dimension, value, group in _daily_cells(answers, lambda a: local_day(a.at, self.tz), dims):
            s = csat_kpi.summarize(group)
            out.append(
                {
                    "day": day,
                    "dimension": dimension,
                    "value": value[:128],
                    "answers": s.answers,
                    "satisfied": s.satisfied,
                    "neutral": s.neutral,
                    "dissatisfied": s.dissatisfied,
                    "score_sum": s.score_sum,
                    "csat": s.csat,
                    "mean_score": s.mean_score,
                }
            )
        return out

    async def _alive_test(self, session: AsyncSession) -> tuple[churn_kpi.AliveTest | None, Any]:
        """Non-contractual churn's P(alive) condition, with the latest fitted model (None before
        the first fit)."""
        model = await self.repo.latest_clv_model(session, self.today())
        if model is None:
            return None, None
        bg, _ = params_from(model.model)
        return churn_kpi.AliveTest(bg, self.settings.kpi_churn_p_alive_threshold, self.tz), model

    async def _churn_rows(
        self, first: date, last: date, alive: churn_kpi.AliveTest | None
    ) -> list[dict[str, Any]]:
        async with self.db.sessions() as session:
            bought = await self.repo.purchase_times(session)
            cancelled = await self.repo.cancellations(session)
            attrs = await self.repo.customer_attributes(session)
        months = buckets(first, last, Granularity.MONTH, self.tz)
        # Whole months: the last one runs to its end (non-contractual lapses count up to now).
        months = [period(m.first, add_months(m.first, 1) - timedelta(days=1), self.tz) for m in months]
        results = churn_kpi.churn(
            _histories(bought, cancelled, attrs), months, self.settings.churn_window, self.clock(), alive
        )
        out: list[dict[str, Any]] = []
        for r in results:
            groups: list[tuple[str, str, str, churn_kpi.ChurnCount]] = [
                ("contractual", "all", "all", r.contractual),
                ("lapsed", "all", "all", r.lapsed),
            ]
            if r.non_contractual is not None:  # no model yet: no rows rather than made-up ones
                groups.append(("non_contractual", "all", "all", r.non_contractual))
            groups += [("contractual", "reason", k, v) for k, v in r.contractual_by_reason.items()]
            groups += [("contractual", "tier", k, v) for k, v in r.contractual_by_tier.items()]
            groups += [("lapsed", "tier", k, v) for k, v in r.lapsed_by_tier.items()]
            groups += [("non_contractual", "tier", k, v) for k, v in r.non_contractual_by_tier.items()]
            out += [
                {
                    "month": r.period.first,
                    "kind": kind,
                    "dimension": dimension,
                    "value": value[:64],
                    "active_at_start": c.active_at_start,
                    "churned": c.churned,
                    "churn_rate": c.rate,
                }
                for kind, dimension, value, c in groups
            ]
        return out

    # --- KPI API ---------------------------------------------------------------------------------

    async def response_time(self, q: KpiQuery) -> dict[str, Any]:
        whole = period(q.first, q.last, self.tz)
        async with self.db.sessions() as session:
            found, still_open = await self._tickets_and_open(session, whole.start, whole.end)
            attrs: dict[str, CustomerAttributes] = {}
            if q.by in ("tier", "channel"):
                attrs = await self.repo.customer_attributes(
                    session, {t.customer_id for t in [*found, *still_open]}
                )
            complainers = {t.customer_id for t in found if t.is_complaint}
            values = _converted_purchases(
                await self.repo.purchases(session, customer_ids=complainers, until=whole.end), self.settings
            )
        now = self.clock()
        targets = self.settings.targets
        key = self._ticket_key(q.by, attrs)

        def block(group: Sequence[response_kpi.Ticket]) -> dict[str, Any]:
            return _block(group, lambda g: response_kpi.summarize(g, targets, now), key)

        threshold = self.settings.kpi_high_value_threshold
        high_value, unjudged = response_kpi.high_value_complaints(found, values, threshold)
        breaching = response_kpi.open_in_breach(still_open, targets, now)
        return {
            **self._header(q),
            "first_response_targets_h": {
                **{c: s / 3600 for c, s in sorted(targets.per_category.items())},
                "default": targets.default_s / 3600,
            },
            "total": block(found),
            "buckets": [
                {"start": b.first, "end": b.last, **block([t for t in found if b.contains(t.opened_at)])}
                for b in buckets(q.first, q.last, q.granularity, self.tz)
            ],
            "high_value_complaints": {
                "threshold": threshold,
                "with_unconverted_purchases": unjudged,
                **block(high_value),
            },
            "open_in_breach": {
                "count": len(breaching),
                "groups": {
                    k: len(g) for k, g in sorted(group_by(breaching, key or (lambda t: t.category)).items())
                },
                "oldest_opened_at": min((t.opened_at for t in breaching), default=None),
            },
        }

    def _ticket_key(
        self, by: str | None, attrs: Mapping[str, CustomerAttributes]
    ) -> Callable[[response_kpi.Ticket], str] | None:
        if by is None:
            return None
        if by in ("tier", "channel"):
            of = _attribute(attrs, by)
            return lambda t: of(t.customer_id)
        if by == "priority":
            return lambda t: t.priority or "none"
        if by == "complaint":
            return lambda t: "true" if t.is_complaint else "false"
        return lambda t: t.category

    def _header(self, q: KpiQuery) -> dict[str, Any]:
        return {
            "from": q.first,
            "to": q.last,
            "granularity": q.granularity.value,
            "by": q.by,
            "timezone": self.settings.kpi_timezone,
        }

    async def churn(self, q: KpiQuery) -> dict[str, Any]:
        async with self.db.sessions() as session:
            bought = await self.repo.purchase_times(session)
            cancelled = await self.repo.cancellations(session)
            attrs = await self.repo.customer_attributes(session) if q.by == "tier" else {}
            alive, model = await self._alive_test(session)
        now = self.clock()
        histories = _histories(bought, cancelled, attrs)
        window = self.settings.churn_window
        whole = period(q.first, q.last, self.tz)
        periods = [whole, *buckets(q.first, q.last, q.granularity, self.tz)]
        results = churn_kpi.churn(histories, periods, window, now, alive)
        win_backs = churn_kpi.win_backs(histories, periods, self.settings.win_back_window, now)

        def block(r: churn_kpi.PeriodChurn, win_back: dict[str, churn_kpi.WinBack]) -> dict[str, Any]:
            out: dict[str, Any] = {
                "contractual": r.contractual,
                "non_contractual": r.non_contractual,
                "lapsed": r.lapsed,
            }
            if q.by == "reason":
                out["groups"] = {"contractual": r.contractual_by_reason}
            elif q.by == "tier":
                out["groups"] = {
                    "contractual": r.contractual_by_tier,
                    "lapsed": r.lapsed_by_tier,
                    **({} if r.non_contractual is None else {"non_contractual": r.non_contractual_by_tier}),
                }
            out["win_back"] = win_back
            return out

        return {
            **self._header(q),
            "churn_window_days": self.settings.kpi_churn_window_days,
            "p_alive_threshold": self.settings.kpi_churn_p_alive_threshold,
            "p_alive_model": None
            if model is None
            else {
                "as_of": model.as_of,
                "fitted_at": model.fitted_at,
                **{k: model.model["params"][k] for k in ("r", "alpha", "a", "b")},
            },
            "win_back_days": self.settings.kpi_win_back_days,
            "total": block(results[0], win_backs[0]),
            "buckets": [
                {"start": r.period.first, "end": r.period.last, **block(r, w)}
                for r, w in zip(results[1:], win_backs[1:], strict=True)
            ],
        }

    async def cohorts(self, q: KpiQuery) -> dict[str, Any]:
        async with self.db.sessions() as session:
            bought = await self.repo.purchase_times(session)
            attrs = await self.repo.customer_attributes(session) if q.by else {}
        histories = _histories(bought, [], attrs)
        today = self.today()

        def table(group: Iterable[churn_kpi.CustomerHistory]) -> list[churn_kpi.Cohort]:
            return churn_kpi.cohorts(group, q.first, q.last, q.granularity, self.tz, today)

        out: dict[str, Any] = {**self._header(q), "cohorts": table(histories)}
        if q.by:
            of = _attribute(attrs, q.by)
            grouped = group_by(histories, lambda h: of(h.customer_id))
            groups = {k: table(g) for k, g in sorted(grouped.items())}
            # A group none of whose customers began in the range has no row to show.
            out["groups"] = {k: rows for k, rows in groups.items() if rows}
        return out

    async def _messages(
        self, whole: Period
    ) -> tuple[list[conversion_kpi.Message], dict[str, list[tuple[datetime, Decimal | None]]]]:
        window = self.settings.conversion_window
        async with self.db.sessions() as session:
            facts = await self.repo.message_facts(session, whole.start, whole.end)
            messages = [m for m in conversion_kpi.build_messages(facts) if whole.contains(m.decided_at)]
            # A message held by quiet hours is exposed after its decision, maybe after the
            # period: its window runs from then.
            exposed = max((m.at for m in messages), default=whole.end)
            bought = await self.repo.purchases(
                session,
                customer_ids={m.customer_id for m in messages},
                since=whole.start,  # every message here was decided in the period
                until=max(whole.end, exposed) + window + timedelta(microseconds=1),
            )
        return messages, _converted_purchases(bought, self.settings)

    async def conversion(self, q: KpiQuery) -> dict[str, Any]:
        messages, bought = await self._messages(period(q.first, q.last, self.tz))
        window = self.settings.conversion_window
        key = None if q.by is None else _stamped(q.by)

        def block(group: Sequence[conversion_kpi.Message]) -> dict[str, Any]:
            return _block(
                group,
                lambda g: conversion_kpi.summarize(g, bought, window),
                key,
                lambda g: conversion_kpi.summarize(g, bought, window, compare=q.by != "channel"),
            )

        return {
            **self._header(q),
            "window_days": self.settings.kpi_conversion_window_days,
            "currency": self.settings.kpi_reporting_currency,
            "uplift_interval": "Newcombe hybrid score (method 10), 95 %",
            "total": block(messages),
            "buckets": [
                {"start": b.first, "end": b.last, **block([m for m in messages if b.contains(m.decided_at)])}
                for b in buckets(q.first, q.last, q.granularity, self.tz)
            ],
        }

    async def csat(self, q: KpiQuery) -> dict[str, Any]:
        whole = period(q.first, q.last, self.tz)
        answers = await self._answers(whole)
        async with self.db.sessions() as session:
            bought = await self.repo.purchases(
                session, customer_ids={a.customer_id for a in answers}, until=whole.end
            )
        values = _converted_purchases(bought, self.settings)
        threshold = self.settings.kpi_high_value_threshold
        key = None if q.by is None else _stamped(q.by)

        def block(group: Sequence[csat_kpi.Answer]) -> dict[str, Any]:
            return _block(group, csat_kpi.summarize, key)

        # As the response time's high-value complaints: revenue before the answer.
        high_value, unjudged = response_kpi.high_value(answers, values, threshold, lambda a: a.at)
        return {
            **self._header(q),
            "scale": "1 (not at all) … 5 (very)",
            "satisfied_scores": sorted(csat_kpi.SATISFIED),
            "interval": "Wilson score, 95 %",
            "total": block(answers),
            "buckets": [
                {"start": b.first, "end": b.last, **block([a for a in answers if b.contains(a.at)])}
                for b in buckets(q.first, q.last, q.granularity, self.tz)
            ],
            "high_value": {
                "threshold": threshold,
                "with_unconverted_purchases": unjudged,
                **block(high_value),
            },
        }

    async def clv_summary(self, q: KpiQuery) -> dict[str, Any]:
        whole = period(q.first, q.last, self.tz)
        fx = self.settings.fx
        async with self.db.sessions() as session:
            bought = await self.repo.purchases(session, until=whole.end)
            stored = await self.repo.predictions(session)
            attrs = await self.repo.customer_attributes(session) if q.by else {}
            model = await self.repo.latest_clv_model(session, self.today())
        # Oldest first (the repository's order): a period's orders and new customers are a
        # slice, found by bisection, where scanning them all for each of a daily table's
        # thousand buckets took seconds.
        bought = sorted(bought, key=lambda r: r.occurred_at)
        times = [r.occurred_at for r in bought]
        first_purchase: dict[str, datetime] = {}
        for r in bought:
            first_purchase.setdefault(r.customer_id, r.occurred_at)
        firsts = sorted(first_purchase.values())

        def revenue(p: Period) -> dict[str, Any]:
            inside = bought[bisect_left(times, p.start) : bisect_left(times, p.end)]
            converted = [fx.convert(r.amount, r.currency) for r in inside]
            return {
                "start": p.first,
                "end": p.last,
                "revenue": sum((v for v in converted if v is not None), Decimal(0)),
                "orders": len(inside),
                "customers": len({r.customer_id for r in inside}),
                "new_customers": bisect_left(firsts, p.end) - bisect_left(firsts, p.start),
                "unconverted_orders": sum(1 for v in converted if v is None),
            }

        def predicted(rows: Iterable[Prediction]) -> dict[str, Any]:
            chosen = list(rows)
            n = len(chosen)
            return {
                "customers": n,
                "historic_value": sum(r.historic_value for r in chosen),
                "predicted_clv": sum(r.predicted_clv for r in chosen),
                "mean_predicted_clv": sum(r.predicted_clv for r in chosen) / n if n else None,
                "mean_p_alive": sum(r.p_alive for r in chosen) / n if n else None,
                "at_risk": sum(1 for r in chosen if r.p_alive < self.settings.kpi_p_alive_threshold),
                "expected_purchases_90d": sum(r.expected_purchases_90d for r in chosen),
            }

        out: dict[str, Any] = {
            **self._header(q),
            "currency": self.settings.kpi_reporting_currency,
            "p_alive_threshold": self.settings.kpi_p_alive_threshold,
            "horizon_weeks": self.settings.kpi_clv_horizon_weeks,
            "annual_discount_rate": self.settings.kpi_clv_discount_rate,
            "model": None if model is None else {**model.model, "fitted_at": model.fitted_at, "cached": True},
            "total": {**revenue(whole), "predictions": predicted(stored.values())},
            "buckets": [revenue(b) for b in buckets(q.first, q.last, q.granularity, self.tz)],
        }
        if q.by:
            of = _attribute(attrs, q.by)
            out["groups"] = {
                k: predicted(g)
                for k, g in sorted(group_by(stored.values(), lambda r: of(r.customer_id)).items())
            }
        return out

    # --- CLV ----------------------------------------------------------------------------------

    def _clv_key(self, purchases_fingerprint: str) -> str:
        """The cache key of a CLV fit: its purchases and the settings it depends on, hashed to
        the 64 characters clv_models keeps whatever the number of currencies."""
        settings = f"{CLV_MODEL_VERSION}|{self.settings.kpi_timezone}|{self.settings.fx.fingerprint()}"
        return hashlib.sha256(f"{purchases_fingerprint}|{settings}".encode()).hexdigest()

    async def clv_inputs(self, as_of: date) -> tuple[list[tuple[str, date, float | None]], int, str]:
        """(customer, local day, value in the reporting currency) of every purchase up to and
        including ``as_of``; the value is None for a currency without a rate (the purchase
        still counts for BG/NBD, as for churn's P(alive)); how many have none; the cache key."""
        until = local_midnight(as_of + timedelta(days=1), self.tz)
        async with self.db.sessions() as session:
            fingerprint = await self.repo.purchase_fingerprint(session, until)
            rows = await self.repo.purchases(session, until=until)
        inputs = self._valued(rows)
        unconverted = sum(1 for _, _, value in inputs if value is None)
        return inputs, unconverted, self._clv_key(fingerprint)

    def _valued(self, rows: Iterable[PurchaseRow]) -> list[tuple[str, date, float | None]]:
        fx = self.settings.fx
        out: list[tuple[str, date, float | None]] = []
        for r in rows:
            value = fx.convert(r.amount, r.currency)
            out.append(
                (r.customer_id, local_day(r.occurred_at, self.tz), None if value is None else float(value))
            )
        return out

    async def clv_model(self, as_of: date) -> dict[str, Any]:
        """The model fitted on the purchases up to and including ``as_of`` (local day), from the
        cache when neither those purchases nor the settings changed since it was fitted."""
        until = local_midnight(as_of + timedelta(days=1), self.tz)
        async with self.db.sessions() as session:
            fingerprint = self._clv_key(await self.repo.purchase_fingerprint(session, until))
            cached = await self.repo.clv_model(session, as_of)
        if cached is not None and cached.fingerprint == fingerprint:
            return {**cached.model, "fitted_at": cached.fitted_at, "cached": True}
        if self._refused is not None and self._refused[0] == (as_of, fingerprint):
            # The same purchases again: the same refusal, without a refit.
            raise InsufficientDataError(self._refused[1])
        _, model = await self._fit(as_of)
        return {**model, "cached": False}

    async def _fit(self, as_of: date) -> tuple[FittedModel, dict[str, Any]]:
        async with self._fit_lock:  # one fit at a time per process: they are CPU-bound anyway
            inputs, unconverted, fingerprint = await self.clv_inputs(as_of)
            if len(inputs) == unconverted:
                raise InsufficientDataError(
                    f"no purchases up to {as_of}"
                    if not unconverted
                    else f"no purchases with an exchange rate up to {as_of} ({unconverted} in currencies "
                    f"without one: RETAIN_KPI_FX_RATES)"
                )
            try:
                fitted = await asyncio.to_thread(fit, inputs, as_of)
            except ClvFitError as exc:
                refusal = f"cannot fit the CLV model as of {as_of}: {exc}"
                self._refused = ((as_of, fingerprint), refusal)
                raise InsufficientDataError(refusal) from exc
            model = fitted.describe(self.settings.kpi_reporting_currency, unconverted)
            now = self.clock()
            async with self.db.transaction() as session:
                await self.repo.save_clv_model(session, as_of, fingerprint, now, model)
        CLV_FIT_SECONDS.set(fitted.fit_seconds)
        log.info(
            "clv model fitted", as_of=str(as_of), customers=model["customers"], seconds=model["fit_seconds"]
        )
        return fitted, {**model, "fitted_at": now}

    async def refit_and_publish(self) -> int:
        """Fit as of today, store every customer's prediction, and publish the ones that moved
        beyond the tolerance on retain.clv (through the outbox, after the commit)."""
        self._last_fit = time.monotonic()
        today = self.today()
        async with self.db.transaction() as session:
            # Purchases arriving from here on are newer than this fit: they mark it dirty again.
            await self.repo.clear_dirty(session, "clv")
        try:
            fitted, model = await self._fit(today)
            s = self.settings
            result = await asyncio.to_thread(
                predict,
                fitted.bg,
                fitted.gg,
                fitted.rfm,
                horizon_weeks=s.kpi_clv_horizon_weeks,
                annual_discount_rate=s.kpi_clv_discount_rate,
            )
        except (InsufficientDataError, ClvFitError) as exc:
            log.info("no CLV model yet", reason=str(exc))
            return 0
        now = model["fitted_at"]
        tol = s.kpi_clv_relative_tolerance
        usable = result.usable
        if not usable.all():
            log.warning(
                "clv predictions not finite for some customers; not published",
                customers=int((~usable).sum()),
                params=model["params"],
            )
        model_as_of = local_midnight(today + timedelta(days=1), self.tz)
        # A customer this fit cannot predict keeps no prediction of an earlier fit: the summary
        # and the customer's CLV are of the latest fit (docs/kpis.md), not a mix.
        unpredicted = [cid for i, cid in enumerate(result.customer_ids) if not usable[i]]
        async with self.db.transaction() as session:
            # What moved is judged against what is published now, read under the publication
            # lock: each kpi process refits on its own clock, and against a read made before
            # another's refit committed, every moved customer went twice (and one that moved
            # only against the other's publication not at all).
            published = await self.repo.published_values(session)
            rows: list[Prediction] = []
            changed: set[str] = set()
            for i, cid in enumerate(result.customer_ids):
                if not usable[i]:
                    continue
                before = published.get(cid)
                row = Prediction(
                    cid,
                    today,
                    float(result.historic_value[i]),
                    float(result.predicted_clv[i]),
                    float(result.p_alive[i]),
                    float(result.expected_purchases_90d[i]),
                    *(before or (None, None, None)),
                )
                rows.append(row)
                if _moved(row, before, tol):
                    changed.add(cid)
            records = [self._record(r, now, model_as_of) for r in rows if r.customer_id in changed]
            await self.repo.save_predictions(session, rows, changed, now)
            await self.repo.delete_predictions(session, unpredicted)
            await enqueue(session, outbox, records)
        PREDICTIONS_PUBLISHED.inc(len(records))
        log.info("clv predictions refreshed", customers=len(rows), published=len(records))
        self._outbox_clean = False
        await self._flush_outbox()
        return len(records)

    def _record(self, r: Prediction, fitted_at: datetime, model_as_of: datetime) -> OutboundRecord:
        event = ClvPrediction(
            event_id=f"clv:{r.customer_id}:{fitted_at.isoformat()}",
            customer_id=r.customer_id,
            occurred_at=fitted_at,
            model_as_of=model_as_of,
            predicted_clv=Decimal(repr(r.predicted_clv)).quantize(Decimal("0.01")),
            p_alive=min(max(r.p_alive, 0.0), 1.0),
            expected_purchases_90d=max(r.expected_purchases_90d, 0.0),
            currency=self.settings.kpi_reporting_currency,
        )
        return OutboundRecord(self.clv_topic, encode_key(r.customer_id), encode(event))

    async def customer_clv(self, customer_id: str) -> dict[str, Any] | None:
        today = self.today()
        async with self.db.sessions() as session:
            rows = await self.repo.purchases(session, customer_ids=[customer_id])
            latest = await self.repo.latest_clv_model(session, today)
        if not rows:
            return None
        fresh_enough = latest is not None and (
            latest.as_of >= today - timedelta(days=1)
            and (self.clock() - latest.fitted_at).total_seconds() < self.settings.kpi_clv_refit_interval_s
        )
        model = latest.model if fresh_enough and latest is not None else await self.clv_model(today)
        bg, gg = params_from(model)
        inputs = self._valued(rows)
        s = self.settings
        out: dict[str, Any] = {
            "customer_id": customer_id,
            "currency": s.kpi_reporting_currency,
            "as_of": today,
            "model_as_of": model["as_of"],
            "orders": len(rows),
            "unconverted_orders": sum(1 for _, _, value in inputs if value is None),
            "historic_value": 0.0,
            "expected_purchases_90d": None,
            "p_alive": None,
            "predicted_clv": None,
            "horizon_weeks": s.kpi_clv_horizon_weeks,
            "annual_discount_rate": s.kpi_clv_discount_rate,
        }
        rfm = summarize(inputs, today) if inputs else None
        # summarize leaves out a customer whose purchases all fall on a local day after today
        # (ingest takes events up to a day ahead): historic value 0, nothing predicted yet.
        if rfm is not None and len(rfm.customer_ids):
            try:
                p = predict(
                    bg,
                    gg,
                    rfm,
                    horizon_weeks=s.kpi_clv_horizon_weeks,
                    annual_discount_rate=s.kpi_clv_discount_rate,
                )
            except ClvFitError as exc:  # a model stored before fit() refused such fits
                raise InsufficientDataError(
                    f"cannot predict with the model as of {model['as_of']}: {exc}"
                ) from exc
            usable = bool(p.usable[0])
            out |= {
                "historic_value": float(p.historic_value[0]),
                "expected_purchases_90d": float(p.expected_purchases_90d[0]) if usable else None,
                "p_alive": float(p.p_alive[0]) if usable else None,
                "predicted_clv": float(p.predicted_clv[0]) if usable else None,
                "frequency": int(rfm.x[0]),
                "recency_weeks": float(rfm.t_x[0]),
                "age_weeks": float(rfm.T[0]),
            }
        return out

    # --- /metrics -------------------------------------------------------------------------------

    async def refresh_gauges(self, force: bool = False) -> None:
        """Recompute the KPI gauges, at most every kpi_metrics_ttl_s."""
        if not force and time.monotonic() - self._gauges_at < self.settings.kpi_metrics_ttl_s:
            return
        self._gauges_at = time.monotonic()
        today = self.today()
        recent = KpiQuery(
            today - timedelta(days=self.settings.kpi_metrics_window_days - 1), today, Granularity.DAY
        )
        this_month = bucket_start(today, Granularity.MONTH)
        previous_month = add_months(this_month, -1)
        async with self.db.sessions() as session:
            found, still_open = await self._tickets_and_open(
                session, *_bounds(period(recent.first, recent.last, self.tz))
            )
            clv = await self.repo.prediction_totals(session, self.settings.kpi_p_alive_threshold)
            model = await self.repo.latest_clv_model(session, today)
            # Churn reads every customer's history (2 s for 25k customers, blocking the API
            # meanwhile): the gauges take the rates the consumer's rollup wrote, at most
            # kpi_rollup_interval_s old, which redoes this month and the last on every run.
            churn_rates = await self.repo.churn_rates(session, [previous_month, this_month])
        messages, bought = await self._messages(period(recent.first, recent.last, self.tz))
        satisfied = _csat_by_journey(await self._answers(period(recent.first, recent.last, self.tz)))
        now = self.clock()
        targets = self.settings.targets
        window = self.settings.conversion_window

        # Everything is computed first, then swapped in without an await in between, so a
        # scrape never sees half-cleared gauges.
        category = _top(t.category for t in [*found, *still_open])
        tickets_by = group_by(found, lambda t: category(t.category))
        response = {k: response_kpi.summarize(g, targets, now) for k, g in tickets_by.items()}
        breaching = Tally(category(t.category) for t in response_kpi.open_in_breach(still_open, targets, now))
        journey = _top(m.journey for m in messages)
        channel = _top(m.channel or UNKNOWN for m in messages)
        per_journey = {
            k: conversion_kpi.summarize(g, bought, window)
            for k, g in group_by(messages, lambda m: journey(m.journey)).items()
        }
        per_channel = {
            k: conversion_kpi.summarize(g, bought, window, compare=False)
            for k, g in group_by(messages, lambda m: channel(m.channel or UNKNOWN)).items()
        }

        for gauge in LABELLED_GAUGES:
            gauge.clear()
        for cat, st in response.items():
            for q, v in (
                ("0.5", st.first_response.p50_s),
                ("0.9", st.first_response.p90_s),
                ("mean", st.first_response.mean_s),
            ):
                _set(FIRST_RESPONSE, (cat, q), v)
            for q, v in (
                ("0.5", st.resolution.p50_s),
                ("0.9", st.resolution.p90_s),
                ("mean", st.resolution.mean_s),
            ):
                _set(RESOLUTION, (cat, q), v)
            _set(BREACH_RATE, (cat,), st.breach_rate)
            TICKETS.labels(cat).set(st.tickets)
            FIRST_RESPONSE_TARGET.labels(cat).set(targets.per_category.get(cat, targets.default_s))
        for cat in {*response, *breaching}:
            OPEN_IN_BREACH.labels(cat).set(breaching.get(cat, 0))
        for (month, kind), rate in churn_rates.items():
            # non_contractual has no rows before the first CLV model
            CHURN_RATE.labels(kind, "current" if month == this_month else "previous").set(rate)
        _set_conversion_gauges(per_journey, per_channel)
        for j, satisfaction in satisfied.items():
            _set(CSAT, (j,), satisfaction.csat)
            CSAT_ANSWERS.labels(j).set(satisfaction.answers)
        CLV_CUSTOMERS.set(clv.customers)
        CLV_PREDICTED_TOTAL.set(clv.predicted_clv)
        CLV_HISTORIC_TOTAL.set(clv.historic_value)
        CLV_P_ALIVE_MEAN.set(clv.mean_p_alive)
        CLV_AT_RISK.set(clv.at_risk)
        if model is not None:
            for name, value in model.model["params"].items():
                CLV_PARAM.labels(name).set(value)


def _set_conversion_gauges(
    per_journey: Mapping[str, conversion_kpi.ConversionStats],
    per_channel: Mapping[str, conversion_kpi.ConversionStats],
) -> None:
    for j, conv in per_journey.items():
        _set(CONVERSION_RATE, (j, "treatment"), conv.conversion_rate)
        _set(CONVERSION_RATE, (j, "holdout"), conv.holdout_rate)
        _set(CONVERSION_RATE, (j, "assigned"), conv.assigned_rate)
        _set(UPLIFT, (j, "estimate"), conv.uplift)
        _set(UPLIFT, (j, "ci_low"), conv.uplift_ci_low)
        _set(UPLIFT, (j, "ci_high"), conv.uplift_ci_high)
        _set(
            REVENUE_PER_MESSAGE,
            (j,),
            None if conv.revenue_per_message is None else float(conv.revenue_per_message),
        )
    for c, conv in per_channel.items():
        _set(DELIVERY_RATE, (c,), conv.delivery_rate)
        _set(FAILURE_RATE, (c,), conv.failure_rate)
        _set(ACTIONS_PER_ENGAGEMENT, (c,), conv.actions_per_engagement)


def _csat_by_journey(answers: Sequence[csat_kpi.Answer]) -> dict[str, csat_kpi.CsatStats]:
    journey = _top(a.journey for a in answers)
    return {j: csat_kpi.summarize(g) for j, g in group_by(answers, lambda a: journey(a.journey)).items()}


def _set(gauge: Any, labels: tuple[str, ...], value: float | None) -> None:
    """A series only for a value: asking for a labelled child already exports it, at 0, where
    the API says null (no message, no ticket)."""
    if value is not None:
        gauge.labels(*labels).set(value)


def _bounds(p: Period) -> tuple[datetime, datetime]:
    return p.start, p.end


def _moved(
    row: Prediction, published: tuple[float | None, float | None, float | None] | None, tol: float
) -> bool:
    """Whether ``row``'s prediction moved beyond the tolerance from what was last published of
    the customer (None: nothing yet)."""
    clv, p_alive, expected = published or (None, None, None)
    return (
        moved(clv, row.predicted_clv, tol, ABSOLUTE_FLOOR["predicted_clv"])
        or moved(p_alive, row.p_alive, tol, ABSOLUTE_FLOOR["p_alive"])
        or moved(expected, row.expected_purchases_90d, tol, ABSOLUTE_FLOOR["expected_purchases_90d"])
    )
