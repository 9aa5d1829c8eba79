"""All of the kpi service's SQL. Callers own the transaction (``Database.transaction``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import Select, Table, and_, case, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.kpi.conversion import MessageFact
from services.kpi.csat import Answer
from services.kpi.response_time import SupportStep, Ticket, TicketKey
from services.kpi.tables import (
    cancellations,
    clv_models,
    clv_predictions,
    customers,
    kpi_churn_monthly,
    message_events,
    purchases,
    rollup_state,
    stale_tickets,
    support_events,
    survey_answers,
    tickets,
)
from shared.db import RowsWrite, copy_new_rows, dialect_insert, in_chunks, rows_insert


@dataclass(frozen=True, slots=True)
class PurchaseRow:
    customer_id: str
    order_id: str
    event_id: str
    occurred_at: datetime
    amount: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class CancellationRow:
    customer_id: str
    occurred_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class CustomerAttributes:
    customer_id: str
    locale: str | None = None
    channel: str | None = None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class Prediction:
    customer_id: str
    model_as_of: date
    historic_value: float
    predicted_clv: float
    p_alive: float
    expected_purchases_90d: float
    published_clv: float | None = None
    published_p_alive: float | None = None
    published_expected_90d: float | None = None


def _insert(session: AsyncSession, table: Table) -> Any:
    return dialect_insert(_dialect(session), table)


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


# The consumer's upserts are built once per dialect: ``excluded`` makes a new column collection
# on every access, and building them per batch was a measurable share of the consumer's time.
# On PostgreSQL an upsert of a batch is one statement (``rows_insert``), and ON CONFLICT DO
# UPDATE may not touch a row twice in one statement: the callers give one row per key.


def _bytewise(dialect: str) -> Callable[[Any], Any]:
    """Text compared by code point, as the fold compares within a batch (Python's str order):
    PostgreSQL compares by the database's collation, which under a locale (en_US.UTF-8, the
    postgres image's) ranks "evt-a" before "evt-B", so which event gave an order its amount, or a
    customer their tier, depended on whether the two came in one batch."""
    return (lambda e: e.collate("C")) if dialect == "postgresql" else (lambda e: e)


@functools.cache
def _upsert_purchases(dialect: str) -> RowsWrite:
    c = purchases.c
    bytewise = _bytewise(dialect)

    def finish(ins: Any) -> Any:
        new = ins.excluded
        newer = or_(
            new.amount_at > c.amount_at,
            and_(new.amount_at == c.amount_at, bytewise(new.event_id) > bytewise(c.event_id)),
        )
        # No WHERE: an older event can still be the order's first (a late original after its
        # correction) and lower its date while its amount stays. Every SET reads the old row.
        set_ = {k: case((newer, new[k]), else_=c[k]) for k in ("event_id", "amount_at", "amount", "currency")}
        set_["occurred_at"] = case((new.occurred_at < c.occurred_at, new.occurred_at), else_=c.occurred_at)
        # The order's date as stored after the write: where the periods must be redone from.
        return ins.on_conflict_do_update(index_elements=[c.customer_id, c.order_id], set_=set_).returning(
            c.occurred_at
        )

    return rows_insert(dialect, purchases, finish)


@functools.cache
def _upsert_customers(dialect: str) -> RowsWrite:
    c = customers.c
    bytewise = _bytewise(dialect)

    def finish(ins: Any) -> Any:
        set_: dict[str, Any] = {}
        for name in ("locale", "channel", "tier"):
            new_at, current_at = ins.excluded[f"{name}_at"], c[f"{name}_at"]
            newer = and_(
                new_at.is_not(None), or_(current_at.is_(None), bytewise(new_at) > bytewise(current_at))
            )
            set_[name] = case((newer, ins.excluded[name]), else_=c[name])
            set_[f"{name}_at"] = case((newer, new_at), else_=current_at)
        return ins.on_conflict_do_update(index_elements=[c.customer_id], set_=set_)

    return rows_insert(dialect, customers, finish)


@functools.cache
def _upsert_tickets(dialect: str) -> Any:
    ins = dialect_insert(dialect, tickets)
    key = ("customer_id", "ticket_id")
    set_ = {c.name: ins.excluded[c.name] for c in tickets.c if c.name not in key}
    return ins.on_conflict_do_update(index_elements=[tickets.c[k] for k in key], set_=set_)


@functools.cache
def _mark_stale(dialect: str) -> RowsWrite:
    return rows_insert(
        dialect,
        stale_tickets,
        lambda ins: ins.on_conflict_do_update(
            index_elements=[stale_tickets.c.customer_id, stale_tickets.c.ticket_id],
            set_={"marks": stale_tickets.c.marks + 1},
        ),
    )


class PredictionTotals(NamedTuple):
    customers: int
    predicted_clv: float
    historic_value: float
    # NaN without predictions, not 0 (everyone dead): what a summary with no observations
    # exports, which no comparison holds for (an unlabelled gauge cannot be left out).
    mean_p_alive: float
    at_risk: int  # P(alive) below the threshold asked for


class RollupStatus(NamedTuple):
    dirty_from: date | None  # the earliest day to redo (marked, or taken by a run not done)
    settings: str | None  # the fingerprint of what the rows were computed with
    computed: bool  # ever


def _rollup_status(row: Any) -> RollupStatus:
    """A rollup_state row (or none yet) as its status: the day to redo is the earlier of what
    batches marked and what a run not done took."""
    if row is None:
        return RollupStatus(None, None, computed=False)
    days = [d for d in (row.dirty_from, row.taken_from) if d is not None]
    return RollupStatus(min(days, default=None), row.settings, computed=row.computed_at is not None)


@functools.cache
def _lower_dirty_from(dialect: str) -> Any:
    ins = dialect_insert(dialect, rollup_state)
    current = rollup_state.c.dirty_from
    lowered = case(
        (or_(current.is_(None), ins.excluded.dirty_from < current), ins.excluded.dirty_from),
        else_=current,
    )
    return ins.on_conflict_do_update(index_elements=[rollup_state.c.name], set_={"dirty_from": lowered})


def _ticket(r: Any) -> Ticket:
    return Ticket(
        ticket_id=r.ticket_id,
        customer_id=r.customer_id,
        category=r.category,
        priority=r.priority,
        is_complaint=r.is_complaint,
        opened_at=r.opened_at,
        opened_inferred=r.opened_inferred,
        first_response_at=r.first_response_at,
        resolved_at=r.resolved_at,
        reopened=r.reopened,
    )


MANY_IDS = 5000  # beyond this many customer ids, a lookup reads its other filters' rows whole


def _among(stmt: Select[Any], column: Any, ids: list[str]) -> Select[Any]:
    """``stmt`` narrowed to ``ids``, unless they are many: one bind parameter per id, and asyncpg
    takes at most 32,767 in a statement; beyond a few thousand ids the statement's other filters
    (a time window) are the narrower anyway, and the caller looks its customers up."""
    return stmt.where(column.in_(ids)) if len(ids) <= MANY_IDS else stmt


TICKET_REBUILD_LOCK = 0x6B70695F7469636B  # "kpi_tick": the advisory lock of the ticket rebuild
CLV_PUBLISH_LOCK = 0x6B70695F636C7670  # "kpi_clvp": the advisory lock of a refit's publication


def _by_value(marks: Mapping[TicketKey, int]) -> dict[int, list[TicketKey]]:
    out: dict[int, list[TicketKey]] = {}
    for key, value in marks.items():
        out.setdefault(value, []).append(key)
    return out


class KpiRepository:
    # --- facts written by the consumer ------------------------------------------------------------

    async def upsert_purchases(
        self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]
    ) -> datetime | None:
        """One row per (customer, order): the earliest event's date, the newest event's amount
        and currency (amount_at, event id), so the result does not depend on arrival order.
        ``rows`` must have one row per key (``fold``). Returns the earliest date of the orders
        written, as stored: a correction of an old order changes that order's periods."""
        if not rows:
            return None
        result = await _upsert_purchases(_dialect(session)).execute(session, rows)
        earliest: datetime = min(at for (at,) in result)
        return earliest

    async def insert_facts(
        self, session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Facts keyed by event id (ticket steps, cancellations, message statuses), of the
        events the batch's ledger claim returned as new: none of them can be in the table."""
        await copy_new_rows(session, table, rows)

    async def upsert_customers(self, session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
        """Each attribute is a last-writer-wins register stamped "<UTC time>|<event id>"."""
        if not rows:
            return
        await _upsert_customers(_dialect(session)).execute(session, rows)

    async def stale_ticket_steps(self, session: AsyncSession) -> list[SupportStep]:
        """Every step of the tickets marked stale."""
        s, st = support_events.c, stale_tickets.c
        marked = and_(s.customer_id == st.customer_id, s.ticket_id == st.ticket_id)
        result = await session.execute(select(support_events).join(stale_tickets, marked))
        return [
            SupportStep(
                r.event_id,
                r.ticket_id,
                r.customer_id,
                r.occurred_at,
                r.action,
                r.category,
                r.priority,
                r.is_complaint,
            )
            for r in result
        ]

    async def save_tickets(self, session: AsyncSession, rows: Sequence[Ticket]) -> None:
        if not rows:
            return
        values = [
            {
                "ticket_id": t.ticket_id,
                "customer_id": t.customer_id,
                "category": t.category,
                "priority": t.priority,
                "is_complaint": t.is_complaint,
                "opened_at": t.opened_at,
                "opened_inferred": t.opened_inferred,
                "first_response_at": t.first_response_at,
                "first_response_s": t.first_response_s,
                "resolved_at": t.resolved_at,
                "resolution_s": t.resolution_s,
                "reopened": t.reopened,
            }
            for t in rows
        ]
        await session.execute(_upsert_tickets(_dialect(session)), values)

    async def mark_tickets_stale(self, session: AsyncSession, keys: Iterable[TicketKey]) -> None:
        """Mark (customer, ticket) keys, in key order (two consumers' batches lock alike)."""
        rows = [{"customer_id": c, "ticket_id": t, "marks": 1} for c, t in sorted(set(keys))]
        if rows:
            await _mark_stale(_dialect(session)).execute(session, rows)

    async def lock_ticket_rebuild(self, session: AsyncSession) -> None:
        """Serialise the rebuilds of two consumer processes (PostgreSQL; SQLite's one writer
        already does): one with older steps must not overwrite a newer one's tickets."""
        if session.get_bind().dialect.name == "postgresql":
            await session.execute(select(func.pg_advisory_xact_lock(TICKET_REBUILD_LOCK)))

    async def earliest_stale_opening(self, session: AsyncSession) -> datetime | None:
        """The earliest opening the stale tickets have as stored: the day a rebuild may move
        one of them away from (a late 'opened' after a step stamped before it)."""
        t, st = tickets.c, stale_tickets.c
        marked = and_(t.customer_id == st.customer_id, t.ticket_id == st.ticket_id)
        stmt = select(func.min(t.opened_at)).select_from(tickets.join(stale_tickets, marked))
        found: datetime | None = (await session.execute(stmt)).scalar()
        return found

    async def stale_tickets(self, session: AsyncSession) -> dict[TicketKey, int]:
        """(customer, ticket) → the marks it has."""
        s = stale_tickets.c
        rows = await session.execute(select(s.customer_id, s.ticket_id, s.marks))
        return {(r.customer_id, r.ticket_id): r.marks for r in rows}

    async def clear_stale_tickets(self, session: AsyncSession, seen: Mapping[TicketKey, int]) -> None:
        """Unmark the tickets rebuilt, unless a batch marked one again since it was read."""
        s = stale_tickets.c
        for marks, keys in _by_value(seen).items():
            for chunk in in_chunks(keys):
                where = (s.marks == marks, tuple_(s.customer_id, s.ticket_id).in_(chunk))
                await session.execute(delete(stale_tickets).where(*where))

    async def first_time_of_messages_since(self, session: AsyncSession, since: datetime) -> datetime | None:
        """The earliest status event of the messages with a status event at or after ``since``."""
        m = message_events.c
        # No DISTINCT (IN needs none): with it SQLite read the whole table in message order
        # for the distinct ids instead of the recent rows by ix_message_events_occurred_at.
        touched = select(m.message_id).where(m.occurred_at >= since)
        first: datetime | None = await session.scalar(
            select(func.min(m.occurred_at)).where(m.message_id.in_(touched))
        )
        return first

    # --- Grafana-table bookkeeping ----------------------------------------------------------------

    async def mark_dirty(self, session: AsyncSession, days: Mapping[str, date]) -> None:
        """Lower each rollup's dirty_from to ``days[name]`` (never raise it)."""
        if not days:
            return
        rows = [{"name": n, "dirty_from": d} for n, d in sorted(days.items())]
        await session.execute(_lower_dirty_from(_dialect(session)), rows)

    async def rollup_status(self, session: AsyncSession, name: str) -> RollupStatus:
        row = (await session.execute(select(rollup_state).where(rollup_state.c.name == name))).first()
        return _rollup_status(row)

    async def take_dirty(self, session: AsyncSession, name: str) -> RollupStatus:
        """The rollup's status as a run starts it: the day to redo from (what batches marked,
        and what a run that did not finish took) is taken, dirty_from left to the batches that
        come while it runs."""
        stmt = select(rollup_state).where(rollup_state.c.name == name)
        if _dialect(session) == "postgresql":
            stmt = stmt.with_for_update()
        row = (await session.execute(stmt)).first()
        status = _rollup_status(row)
        if row is not None and row.dirty_from is not None:
            await session.execute(
                update(rollup_state)
                .where(rollup_state.c.name == name)
                .values(dirty_from=None, taken_from=status.dirty_from)
            )
        return status

    async def finish_rollup(
        self, session: AsyncSession, name: str, seen: RollupStatus, settings: str, at: datetime
    ) -> None:
        """Done with what the run took (``seen``, from ``take_dirty``), unless another run took an
        earlier day since (its own finish clears that). What batches marked meanwhile stays."""
        ins = _insert(session, rollup_state)
        await session.execute(
            ins.on_conflict_do_nothing(), [{"name": name, "dirty_from": None, "settings": settings}]
        )
        c = rollup_state.c
        if seen.dirty_from is not None:
            await session.execute(
                update(rollup_state)
                .where(c.name == name, c.taken_from == seen.dirty_from)
                .values(taken_from=None)
            )
        await session.execute(
            update(rollup_state).where(c.name == name).values(computed_at=at, settings=settings)
        )

    async def clear_dirty(self, session: AsyncSession, name: str) -> None:
        await session.execute(update(rollup_state).where(rollup_state.c.name == name).values(dirty_from=None))

    async def earliest(self, session: AsyncSession, column: Any) -> datetime | None:
        value: datetime | None = await session.scalar(select(func.min(column)))
        return value

    async def replace_rows(
        self,
        session: AsyncSession,
        table: Table,
        since: date,
        rows: Sequence[Mapping[str, Any]],
    ) -> None:
        """Replace a Grafana table's rows from local day ``since`` (its first column) on."""
        day = next(iter(table.primary_key.columns))
        await session.execute(delete(table).where(day >= since))
        if rows:
            await session.execute(table.insert(), list(rows))

    # --- reads -------------------------------------------------------------------------------------

    async def tickets_opened(self, session: AsyncSession, start: datetime, end: datetime) -> list[Ticket]:
        t = tickets.c
        stmt = select(tickets).where(t.opened_at >= start, t.opened_at < end)
        return [_ticket(r) for r in await session.execute(stmt)]

    async def open_tickets(self, session: AsyncSession) -> list[Ticket]:
        return [
            _ticket(r) for r in await session.execute(select(tickets).where(tickets.c.resolved_at.is_(None)))
        ]

    async def customer_attributes(
        self, session: AsyncSession, ids: Iterable[str] | None = None
    ) -> dict[str, CustomerAttributes]:
        """Of ``ids`` when given (perhaps of others too, for many: see ``purchases``)."""
        stmt = select(customers.c.customer_id, customers.c.locale, customers.c.channel, customers.c.tier)
        if ids is not None:
            wanted = list(ids)
            if not wanted:
                return {}
            stmt = _among(stmt, customers.c.customer_id, wanted)
        return {r.customer_id: CustomerAttributes(*r) for r in await session.execute(stmt)}

    async def purchases(
        self,
        session: AsyncSession,
        *,
        customer_ids: Iterable[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[PurchaseRow]:
        """Orders with ``since <= occurred_at < until``, oldest first; of ``customer_ids`` when
        given (perhaps of others too, for many ids: the caller looks its customers up)."""
        p = purchases.c
        stmt = select(p.customer_id, p.order_id, p.event_id, p.occurred_at, p.amount, p.currency)
        if customer_ids is not None:
            wanted = list(customer_ids)
            if not wanted:
                return []
            stmt = _among(stmt, p.customer_id, wanted)
        if since is not None:
            stmt = stmt.where(p.occurred_at >= since)
        if until is not None:
            stmt = stmt.where(p.occurred_at < until)
        rows = await session.execute(stmt.order_by(p.occurred_at, p.customer_id, p.order_id))
        return [PurchaseRow(*r) for r in rows]

    async def purchase_fingerprint(self, session: AsyncSession, until: datetime) -> str:
        """Changes when any order before ``until`` is added or corrected (a cache key of the CLV
        model): per currency, the count, the amounts' sum, and the sums of each order's time and
        of its time times its amount, so that an order moved to another day, or its amount moved
        to another order, changes it too (the first and last event ids did not: a correction's
        id is neither, as a rule)."""
        p = purchases.c
        at = (
            func.julianday(p.occurred_at)
            if _dialect(session) == "sqlite"
            else func.extract("epoch", p.occurred_at)
        )
        stmt = (
            select(p.currency, func.count(), func.sum(p.amount), func.sum(at), func.sum(at * p.amount))
            .where(p.occurred_at < until)
            .group_by(p.currency)
            .order_by(p.currency)
        )
        return ";".join(
            # Exact sums on PostgreSQL (numeric); on SQLite floats summed in one scan order, to
            # a few seconds of resolution: an order moved across a day always shows.
            f"{currency}|{count}|{Decimal(total or 0).normalize()}|{times}|{weighted}"
            for currency, count, total, times, weighted in await session.execute(stmt)
        )

    async def purchase_times(self, session: AsyncSession) -> dict[str, list[datetime]]:
        """Each customer's order times, in no order: all that churn and the cohorts read of the
        orders, for every customer. Neither amounts (whose decimals cost more to read than the
        times) nor a sort, which on SQLite took three times the read itself (25k customers,
        68k orders: 0.12 s, where ``purchases`` takes 0.94 s); the histories sort their own."""
        p = purchases.c
        out: dict[str, list[datetime]] = {}
        for customer_id, at in await session.execute(select(p.customer_id, p.occurred_at)):
            out.setdefault(customer_id, []).append(at)
        return out

    async def churn_rates(
        self, session: AsyncSession, months: Sequence[date]
    ) -> dict[tuple[date, str], float]:
        """The whole-customer-base churn rate of ``months`` by (month, kind), as the rollup last
        wrote them in kpi_churn_monthly; none where the rate is null (no one active at start)."""
        m = kpi_churn_monthly.c
        stmt = select(m.month, m.kind, m.churn_rate).where(
            m.month.in_(list(months)), m.dimension == "all", m.churn_rate.is_not(None)
        )
        return {(month, kind): rate for month, kind, rate in await session.execute(stmt)}

    async def cancellations(
        self, session: AsyncSession, until: datetime | None = None
    ) -> list[CancellationRow]:
        c = cancellations.c
        stmt = select(c.customer_id, c.occurred_at, c.reason)
        if until is not None:
            stmt = stmt.where(c.occurred_at < until)
        return [CancellationRow(*r) for r in await session.execute(stmt.order_by(c.occurred_at))]

    async def message_facts(self, session: AsyncSession, start: datetime, end: datetime) -> list[MessageFact]:
        """Every status event of the messages with an event in [start, end): a superset of those
        decided in it (the caller keeps those). Not only the sent, held-out or attempted ones:
        the uplift's assigned arm counts the capped, unconsented and expired too."""
        m = message_events.c
        anchored = select(m.message_id).where(m.occurred_at >= start, m.occurred_at < end).distinct()
        stmt = select(message_events).where(m.message_id.in_(anchored))
        return [
            MessageFact(
                r.event_id,
                r.message_id,
                r.customer_id,
                r.status,
                r.occurred_at,
                r.journey,
                r.channel,
                r.tier,
                r.locale,
                r.holdout,
            )
            for r in await session.execute(stmt)
        ]

    async def survey_answers(self, session: AsyncSession, start: datetime, end: datetime) -> list[Answer]:
        """Every answer of the messages answered in [start, end): whether one is its message's
        first depends on the others (``csat.first_answers``)."""
        a = survey_answers.c
        answered = select(a.message_id).where(a.occurred_at >= start, a.occurred_at < end)
        stmt = select(survey_answers).where(a.message_id.in_(answered))
        return [
            Answer(
                r.event_id,
                r.message_id,
                r.customer_id,
                r.occurred_at,
                r.score,
                r.journey,
                r.channel,
                r.tier,
                r.locale,
            )
            for r in await session.execute(stmt)
        ]

    # --- CLV ---------------------------------------------------------------------------------------

    async def clv_model(self, session: AsyncSession, as_of: date) -> Any:
        return (await session.execute(select(clv_models).where(clv_models.c.as_of == as_of))).first()

    async def latest_clv_model(self, session: AsyncSession, not_after: date) -> Any:
        stmt = select(clv_models).where(clv_models.c.as_of <= not_after).order_by(clv_models.c.as_of.desc())
        return (await session.execute(stmt.limit(1))).first()

    async def save_clv_model(
        self, session: AsyncSession, as_of: date, fingerprint: str, fitted_at: datetime, model: dict[str, Any]
    ) -> None:
        ins = _insert(session, clv_models)
        stmt = ins.on_conflict_do_update(
            index_elements=[clv_models.c.as_of],
            set_={
                "fingerprint": ins.excluded.fingerprint,
                "fitted_at": ins.excluded.fitted_at,
                "model": ins.excluded.model,
            },
        )
        await session.execute(
            stmt, [{"as_of": as_of, "fingerprint": fingerprint, "fitted_at": fitted_at, "model": model}]
        )

    async def published_values(
        self, session: AsyncSession
    ) -> dict[str, tuple[float | None, float | None, float | None]]:
        """What was last published of each customer (clv, p_alive, expected 90 days), as stored
        now; the publication lock first on PostgreSQL, so that two workers' refits take turns
        from here to their commit (SQLite's write lock already does)."""
        if _dialect(session) == "postgresql":
            await session.execute(select(func.pg_advisory_xact_lock(CLV_PUBLISH_LOCK)))
        p = clv_predictions.c
        stmt = select(p.customer_id, p.published_clv, p.published_p_alive, p.published_expected_90d)
        return {r[0]: (r[1], r[2], r[3]) for r in await session.execute(stmt)}

    async def predictions(self, session: AsyncSession) -> dict[str, Prediction]:
        p = clv_predictions.c
        stmt = select(
            p.customer_id,
            p.model_as_of,
            p.historic_value,
            p.predicted_clv,
            p.p_alive,
            p.expected_purchases_90d,
            p.published_clv,
            p.published_p_alive,
            p.published_expected_90d,
        )
        return {r.customer_id: Prediction(*r) for r in await session.execute(stmt)}

    async def prediction_totals(self, session: AsyncSession, p_alive_below: float) -> PredictionTotals:
        """The predictions summed in the database, for /metrics: one row, where reading every
        customer's (2 million at a large shop) at each refresh of the gauges cost seconds."""
        p = clv_predictions.c
        stmt = select(
            func.count(),
            func.coalesce(func.sum(p.predicted_clv), 0.0),
            func.coalesce(func.sum(p.historic_value), 0.0),
            func.avg(p.p_alive),
            func.coalesce(func.sum(case((p.p_alive < p_alive_below, 1), else_=0)), 0),
        )
        customers, predicted, historic, mean_p_alive, at_risk = (await session.execute(stmt)).one()
        return PredictionTotals(
            customers,
            float(predicted),
            float(historic),
            math.nan if mean_p_alive is None else float(mean_p_alive),
            int(at_risk),
        )

    async def delete_predictions(self, session: AsyncSession, customer_ids: Sequence[str]) -> None:
        c = clv_predictions.c
        for ids in in_chunks(customer_ids):
            await session.execute(delete(clv_predictions).where(c.customer_id.in_(ids)))

    async def save_predictions(
        self, session: AsyncSession, rows: Sequence[Prediction], published: set[str], at: datetime
    ) -> None:
        if not rows:
            return
        ins = _insert(session, clv_predictions)
        values = [
            {
                "customer_id": r.customer_id,
                "model_as_of": r.model_as_of,
                "computed_at": at,
                "historic_value": r.historic_value,
                "predicted_clv": r.predicted_clv,
                "p_alive": r.p_alive,
                "expected_purchases_90d": r.expected_purchases_90d,
                "published_clv": r.predicted_clv if r.customer_id in published else r.published_clv,
                "published_p_alive": r.p_alive if r.customer_id in published else r.published_p_alive,
                "published_expected_90d": (
                    r.expected_purchases_90d if r.customer_id in published else r.published_expected_90d
                ),
                "published_at": at if r.customer_id in published else None,
            }
            for r in rows
        ]
        c = clv_predictions.c
        set_ = {col.name: ins.excluded[col.name] for col in clv_predictions.c if col.name != "customer_id"}
        # Keep the previous publication (time and values) for customers not published this time,
        # as stored, not as read before the fit: another worker's refit may have published since.
        set_["published_at"] = func.coalesce(ins.excluded.published_at, c.published_at)
        for name in ("published_clv", "published_p_alive", "published_expected_90d"):
            set_[name] = case((ins.excluded.published_at.is_(None), c[name]), else_=ins.excluded[name])
        await session.execute(ins.on_conflict_do_update(index_elements=[c.customer_id], set_=set_), values)
