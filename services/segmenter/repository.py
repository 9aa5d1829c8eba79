"""All of the segmenter's SQL. Callers own the transaction (``Database.transaction``)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.segmenter.tables import (
    customers,
    memberships,
    publish_jobs,
    rule_audit,
    rule_draft,
    rule_versions,
)
from shared.db import (
    RowsWrite,
    in_list,
    insert_ignoring_conflicts,
    json_values,
    rows_ignoring_conflicts,
    rows_insert,
    rows_update,
)


@dataclass(slots=True)
class CustomerRow:
    customer_id: str
    state: dict[str, Any]
    facts: dict[str, Any]
    tier: str
    segments: list[str]
    lifecycle_stage: str
    rule_version: int
    next_check_at: datetime | None
    updated_at: datetime

    def values(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "state": self.state,
            "facts": self.facts,
            "tier": self.tier,
            "segments": self.segments,
            "lifecycle_stage": self.lifecycle_stage,
            "rule_version": self.rule_version,
            "next_check_at": self.next_check_at,
            "updated_at": self.updated_at,
        }


def _row(r: Any) -> CustomerRow:
    return CustomerRow(
        customer_id=r.customer_id,
        state=r._mapping.get("state") or {},
        facts=r._mapping.get("facts") or {},
        tier=r.tier,
        segments=list(r.segments),
        lifecycle_stage=r.lifecycle_stage,
        rule_version=r.rule_version,
        next_check_at=r.next_check_at,
        updated_at=r.updated_at,
    )


@dataclass(slots=True)  # not frozen: a publish builds 20,000 a second, and frozen init costs
class Standing:
    """What re-evaluating a customer under other rules needs: the stored facts (as JSON; all
    of them, or only those the re-evaluation reads) and what the stored tier, segments and
    next check are."""

    customer_id: str
    facts: dict[str, Any]
    tier: str
    segments: list[str]
    next_check_at: datetime | None
    rule_version: int  # of the rules that assigned the tier and segments


@dataclass(slots=True)
class Mover:
    """What announcing a customer's move under other rules reads of them, once they are
    locked: the stored facts in full, tier, segments and next check, and of the state only the
    consents and attributes (as JSON). The rest of the state, kilobytes of orders and tickets,
    is not needed to announce a move and parsing it was most of the cost of reading a mover."""

    customer_id: str
    facts: dict[str, Any]
    tier: str
    segments: list[str]
    next_check_at: datetime | None
    consents: dict[str, Any]
    attributes: dict[str, Any]

    @classmethod
    def of(cls, row: CustomerRow) -> Mover:
        """What ``load_movers`` reads of a stored ``row`` (the bench's and tests' copies)."""
        consents, attributes = row.state["consents"], row.state["attributes"]
        return cls(
            row.customer_id, row.facts, row.tier, row.segments, row.next_check_at, consents, attributes
        )


@dataclass(frozen=True, slots=True)
class Reassignment:
    """A customer's new tier, segments and next check under a rule set; state and facts stay.
    ``tier_changed`` / ``check_changed``: whether they differ from the stored ones."""

    customer_id: str
    tier: str
    segments: list[str]
    rule_version: int
    next_check_at: datetime | None
    updated_at: datetime
    tier_changed: bool = True
    check_changed: bool = True


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    version: int
    status: str
    total: int
    done: int
    changed: int
    cursor: str | None
    created_at: datetime
    created_by: str
    started_at: datetime | None
    finished_at: datetime | None


@functools.cache
def _upsert_customers(dialect: str) -> RowsWrite:
    # Built once: ``excluded`` makes a new column collection on every access, a twentieth of
    # the consumer's time when the statement was built per batch. On PostgreSQL it is one
    # statement per batch (``rows_insert``), so a batch holds each customer once.
    return rows_insert(
        dialect,
        customers,
        lambda ins: ins.on_conflict_do_update(
            index_elements=[customers.c.customer_id],
            set_={c: ins.excluded[c] for c in CustomerRow.__slots__ if c != "customer_id"},
        ),
    )


# The statements of a consumer batch and of a publish step, built once per dialect with the
# ids as one parameter (``in_list``) instead of per call: building a statement and its cache
# key took longer than SQLite took to run it.
@functools.cache
def _customers_in(dialect: str, with_facts: bool) -> Any:
    columns = (c for c in customers.c if with_facts or c.name != "facts")
    return select(*columns).where(in_list(dialect, customers.c.customer_id))


@functools.cache
def _movers_in(dialect: str) -> Any:
    c = customers.c
    consents_and_attributes = json_values(dialect, c.state, ["consents", "attributes"])
    return select(c.customer_id, c.facts, c.tier, c.segments, c.next_check_at, consents_and_attributes).where(
        in_list(dialect, c.customer_id)
    )


@functools.cache
def _facts_in(dialect: str) -> Any:
    return select(customers.c.customer_id, customers.c.facts).where(in_list(dialect, customers.c.customer_id))


@functools.cache
def _standings(dialect: str, fields: frozenset[str] | None, after: bool) -> Any:
    """A page of standings in id order (``after``: after ``:cursor``), with the stored facts
    whole or only ``fields`` (sorted) picked out of them in the database."""
    c = customers.c
    if fields is None:
        facts: list[Any] = [c.facts]
    elif fields:
        facts = [json_values(dialect, c.facts, sorted(fields))]
    else:
        facts = []
    stmt = select(c.customer_id, c.tier, c.segments, c.next_check_at, c.rule_version, *facts)
    if after:
        stmt = stmt.where(c.customer_id > bindparam("cursor"))
    return stmt.order_by(c.customer_id).limit(bindparam("limit"))


@functools.cache
def _reassign(dialect: str, tier: bool, check: bool) -> RowsWrite:
    columns = ["segments", "rule_version", "updated_at"]
    if tier:
        columns.append("tier")
    if check:
        columns.append("next_check_at")
    return rows_update(dialect, customers, "customer_id", columns)


_LEAVE = delete(memberships).where(
    memberships.c.segment == bindparam("s"), memberships.c.customer_id == bindparam("c")
)


# Every batch asks for the rule set in force, and every tick for a publish job to step.
_PUBLISHED_VERSION = select(func.max(rule_versions.c.version))
_ACTIVE_JOB = (
    select(publish_jobs)
    .where(publish_jobs.c.status.in_(["pending", "running"]))
    .order_by(publish_jobs.c.version.desc())
    .limit(1)
)


class SegmenterRepository:
    # --- customers ----------------------------------------------------------------------------

    async def load_customers(
        self,
        session: AsyncSession,
        ids: Sequence[str],
        *,
        for_update: bool = False,
        with_facts: bool = True,
    ) -> dict[str, CustomerRow]:
        """Full rows; without the stored facts (``facts`` left empty) for a caller that derives
        them again from the state anyway."""
        if not ids:
            return {}
        stmt = _customers_in(session.get_bind().dialect.name, with_facts)
        if for_update and await self._lock(session, ids):
            stmt = stmt.with_for_update()
        return {r.customer_id: _row(r) for r in await session.execute(stmt, {"ids": list(ids)})}

    async def load_movers(self, session: AsyncSession, ids: Sequence[str]) -> dict[str, Mover]:
        """The customers a rule publish moves, locked (``load_customers(for_update=True)``)."""
        if not ids:
            return {}
        stmt = _movers_in(session.get_bind().dialect.name)
        if await self._lock(session, ids):
            stmt = stmt.with_for_update()
        return {
            cid: Mover(cid, facts, tier, list(segments), next_check_at, consents or {}, attributes or {})
            for cid, facts, tier, segments, next_check_at, (consents, attributes) in await session.execute(
                stmt, {"ids": list(ids)}
            )
        }

    async def _lock(self, session: AsyncSession, ids: Sequence[str]) -> bool:
        """Lock ``ids`` against the other writers of customers until the transaction ends;
        True when the caller should also select the rows FOR UPDATE (PostgreSQL). On SQLite
        the transaction holds the database's write lock from its start (BEGIN IMMEDIATE)."""
        if session.get_bind().dialect.name != "postgresql":
            return False
        # Two consumers never own one customer at once (partitioned by key), except around a
        # rebalance: the row lock keeps that window safe too. A customer seen for the first
        # time has no row to lock, and two transactions could each build it from nothing, the
        # second overwriting the first (the chaos suite saw it once): a transaction-scoped
        # advisory lock per customer covers them, taken in one order (the sorted array, which
        # unnest keeps) so two batches cannot deadlock.
        await session.execute(
            text(
                "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest(CAST(:ids AS text[])) AS k"
            ),
            {"ids": sorted(set(ids))},
        )
        return True

    async def stored_facts(self, session: AsyncSession, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored facts, whole, of ``ids``."""
        if not ids:
            return {}
        rows = await session.execute(_facts_in(session.get_bind().dialect.name), {"ids": list(ids)})
        return {cid: facts for cid, facts in rows}  # noqa: C416 - a Result is no mapping source

    async def save_customers(self, session: AsyncSession, rows: Sequence[CustomerRow]) -> None:
        if not rows:
            return
        await _upsert_customers(session.get_bind().dialect.name).execute(session, [r.values() for r in rows])

    async def change_memberships(
        self,
        session: AsyncSession,
        entered: Sequence[tuple[str, str]],
        left: Sequence[tuple[str, str]],
        at: datetime,
    ) -> None:
        """``entered`` / ``left``: (segment, customer_id) pairs."""
        if entered:
            await rows_ignoring_conflicts(session, memberships).execute(
                session, [{"segment": s, "customer_id": c, "entered_at": at} for s, c in entered]
            )
        if left:
            await session.execute(_LEAVE, [{"s": s, "c": c} for s, c in left])

    async def standings_after(
        self, session: AsyncSession, cursor: str | None, limit: int, fields: Collection[str] | None = None
    ) -> list[Standing]:
        """A page of customers in id order, with only what rule evaluation reads: the stored
        facts whole, or only ``fields`` of them (a key the facts lack reads as None)."""
        picked = None if fields is None else frozenset(fields)
        stmt = _standings(session.get_bind().dialect.name, picked, cursor is not None)
        rows = await session.execute(stmt, {"cursor": cursor, "limit": limit})
        if picked is None:
            return [Standing(cid, f, tier, segs, at, version) for cid, tier, segs, at, version, f in rows]
        if not picked:
            return [Standing(cid, {}, tier, segs, at, version) for cid, tier, segs, at, version in rows]
        names = sorted(picked)
        return [
            Standing(cid, dict(zip(names, values, strict=True)), tier, segs, at, version)
            for cid, tier, segs, at, version, values in rows
        ]

    async def reassign(self, session: AsyncSession, changes: Sequence[Reassignment]) -> None:
        """Write new tiers, segments and next checks, leaving state and facts as they are.

        The tier and the next check are set only where they change: SQLite rewrites the index
        entries of every column an UPDATE sets, changed or not, and most moves of a publish
        are into or out of a segment alone (the rewrites were half the cost of its writes).
        On PostgreSQL each group is one statement (``rows_update``), not one per customer."""
        groups: dict[tuple[bool, bool], list[Reassignment]] = {}
        for ch in changes:
            groups.setdefault((ch.tier_changed, ch.check_changed), []).append(ch)
        dialect = session.get_bind().dialect.name
        for (tier, check), group in groups.items():
            await _reassign(dialect, tier, check).execute(
                session,
                [
                    {
                        "new_customer_id": ch.customer_id,
                        "new_tier": ch.tier,
                        "new_segments": ch.segments,
                        "new_rule_version": ch.rule_version,
                        "new_next_check_at": ch.next_check_at,
                        "new_updated_at": ch.updated_at,
                    }
                    for ch in group
                ],
            )

    async def move_next_checks(self, session: AsyncSession, changes: Sequence[tuple[str, datetime]]) -> None:
        """Bring the next check of (customer id, instant) pairs forward."""
        if changes:
            c = customers.c
            stmt = (
                update(customers)
                .where(c.customer_id == bindparam("customer"))
                .values(next_check_at=bindparam("at"))
            )
            await session.execute(stmt, [{"customer": cid, "at": at} for cid, at in changes])

    async def due_for_check(self, session: AsyncSession, now: datetime, limit: int) -> list[str]:
        stmt = (
            select(customers.c.customer_id)
            .where(customers.c.next_check_at <= now)
            .order_by(customers.c.next_check_at)
            .limit(limit)
        )
        return list((await session.scalars(stmt)).all())

    async def customers_after(
        self, session: AsyncSession, cursor: str | None, limit: int, *, with_state: bool = True
    ) -> list[CustomerRow]:
        """A page of customers in id order; without the (large) state column if not needed."""
        columns = list(customers.c) if with_state else [c for c in customers.c if c.name != "state"]
        stmt = select(*columns).order_by(customers.c.customer_id).limit(limit)
        if cursor is not None:
            stmt = stmt.where(customers.c.customer_id > cursor)
        return [_row(r) for r in await session.execute(stmt)]

    async def count_customers(self, session: AsyncSession) -> int:
        return int(await session.scalar(select(func.count()).select_from(customers)) or 0)

    async def tier_counts(self, session: AsyncSession) -> dict[str, int]:
        rows = await session.execute(select(customers.c.tier, func.count()).group_by(customers.c.tier))
        return {tier: int(n) for tier, n in rows.all()}

    async def segment_counts(self, session: AsyncSession) -> dict[str, int]:
        rows = await session.execute(
            select(memberships.c.segment, func.count()).group_by(memberships.c.segment)
        )
        return {segment: int(n) for segment, n in rows.all()}

    async def segment_members(
        self, session: AsyncSession, segment: str, cursor: str | None, limit: int
    ) -> list[tuple[str, datetime]]:
        stmt = (
            select(memberships.c.customer_id, memberships.c.entered_at)
            .where(memberships.c.segment == segment)
            .order_by(memberships.c.customer_id)
            .limit(limit)
        )
        if cursor is not None:
            stmt = stmt.where(memberships.c.customer_id > cursor)
        return [(r.customer_id, r.entered_at) for r in await session.execute(stmt)]

    # --- rules ---------------------------------------------------------------------------------

    async def published(self, session: AsyncSession) -> tuple[int, dict[str, Any]] | None:
        row = (
            await session.execute(
                select(rule_versions.c.version, rule_versions.c.rules)
                .order_by(rule_versions.c.version.desc())
                .limit(1)
            )
        ).first()
        return None if row is None else (row.version, row.rules)

    async def published_version(self, session: AsyncSession) -> int | None:
        value = await session.scalar(_PUBLISHED_VERSION)
        return None if value is None else int(value)

    async def version(self, session: AsyncSession, n: int) -> Any:
        return (await session.execute(select(rule_versions).where(rule_versions.c.version == n))).first()

    async def version_numbers(self, session: AsyncSession) -> list[int]:
        return list((await session.scalars(select(rule_versions.c.version))).all())

    async def versions(self, session: AsyncSession) -> list[Any]:
        stmt = select(
            rule_versions.c.version,
            rule_versions.c.created_at,
            rule_versions.c.created_by,
            rule_versions.c.note,
        ).order_by(rule_versions.c.version.desc())
        return list((await session.execute(stmt)).all())

    async def add_version(
        self,
        session: AsyncSession,
        version: int,
        rules: dict[str, Any],
        actor: str,
        note: str | None,
        at: datetime,
    ) -> bool:
        """Insert version ``version``; False if it exists already (another publish won)."""
        result = await session.execute(
            insert_ignoring_conflicts(session, rule_versions).values(
                version=version, rules=rules, created_at=at, created_by=actor, note=note
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]  # CursorResult at run time

    async def draft(self, session: AsyncSession) -> Any:
        return (await session.execute(select(rule_draft).where(rule_draft.c.id == 1))).first()

    async def create_draft(
        self, session: AsyncSession, rules: dict[str, Any], etag: str, actor: str, at: datetime
    ) -> None:
        await session.execute(
            insert_ignoring_conflicts(session, rule_draft).values(
                id=1, rules=rules, etag=etag, updated_at=at, updated_by=actor
            )
        )

    async def replace_draft(
        self,
        session: AsyncSession,
        rules: dict[str, Any],
        etag: str,
        actor: str,
        at: datetime,
        expected_etag: str | None,
    ) -> bool:
        """Compare-and-set on the draft's ETag; False when someone else changed it first."""
        stmt = update(rule_draft).where(rule_draft.c.id == 1)
        if expected_etag is not None:
            stmt = stmt.where(rule_draft.c.etag == expected_etag)
        result = await session.execute(stmt.values(rules=rules, etag=etag, updated_at=at, updated_by=actor))
        return bool(result.rowcount)  # type: ignore[attr-defined]  # CursorResult at run time

    async def swap_draft_etag(self, session: AsyncSession, expected: str, new: str) -> bool:
        result = await session.execute(
            update(rule_draft).where(rule_draft.c.id == 1, rule_draft.c.etag == expected).values(etag=new)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]  # CursorResult at run time

    async def audit(
        self, session: AsyncSession, actor: str, action: str, version: int | None, diff: Any, at: datetime
    ) -> None:
        await session.execute(
            insert(rule_audit).values(at=at, actor=actor, action=action, version=version, diff=diff)
        )

    async def audit_log(self, session: AsyncSession, limit: int) -> list[Any]:
        stmt = select(rule_audit).order_by(rule_audit.c.id.desc()).limit(limit)
        return list((await session.execute(stmt)).all())

    # --- publish jobs ----------------------------------------------------------------------------

    async def create_job(
        self, session: AsyncSession, version: int, total: int, actor: str, at: datetime
    ) -> str:
        # A newer publish re-evaluates everyone anyway: an unfinished older job is superseded.
        await session.execute(
            update(publish_jobs)
            .where(publish_jobs.c.status.in_(["pending", "running"]))
            .values(status="superseded", finished_at=at)
        )
        job_id = str(uuid.uuid4())
        await session.execute(
            insert(publish_jobs).values(
                id=job_id,
                version=version,
                status="pending",
                total=total,
                done=0,
                changed=0,
                cursor=None,
                created_at=at,
                created_by=actor,
            )
        )
        return job_id

    async def active_job(self, session: AsyncSession) -> JobRow | None:
        row = (await session.execute(_ACTIVE_JOB)).first()
        return None if row is None else JobRow(**row._mapping)

    async def job(self, session: AsyncSession, job_id: str) -> JobRow | None:
        row = (await session.execute(select(publish_jobs).where(publish_jobs.c.id == job_id))).first()
        return None if row is None else JobRow(**row._mapping)

    async def advance_job(self, session: AsyncSession, job_id: str, **values: Any) -> None:
        await session.execute(update(publish_jobs).where(publish_jobs.c.id == job_id).values(**values))
