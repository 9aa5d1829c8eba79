"""The segmenter's use cases: apply event batches, sweep time-based changes, run rule
publishes, and serve the rules API. Transactions begin and end here; SQL lives in the
repository; decisions live in the pure modules (profile, rules, updates)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import jsonpatch
from prometheus_client import Counter, Gauge

from services.segmenter.config import SegmenterSettings
from services.segmenter.profile import ProfileState, consent_states, facts_from_json, load_state
from services.segmenter.profile import facts as derive_facts
from services.segmenter.repository import CustomerRow, JobRow, SegmenterRepository
from services.segmenter.rules import (
    NO_TIER,
    CompiledRules,
    RuleChanges,
    RuleSet,
    compile_rules,
    default_rules,
    ruleset_etag,
    validate_rules,
)
from services.segmenter.tables import applied_events, outbox
from services.segmenter.updates import (
    Decision,
    RuleChange,
    decide,
    decide_events,
    facts_read,
    read_whole,
    reevaluate,
    rule_change,
    unchanged,
)
from shared.codec import encode, encode_key
from shared.conditions import ConditionError
from shared.db import Database, claim_events
from shared.events import ClvPrediction, CustomerUpdate, Event, PurchaseEvent, UpdateCause
from shared.kafka.consumer import BatchResult, Delivered
from shared.kafka.producer import BrokerUnavailableError, OutboundRecord, Producer
from shared.logs import get_logger
from shared.outbox import OutboxRelay, Staged, stage_or_enqueue
from shared.topics import SEGMENTS

log = get_logger(__name__)

SYSTEM = "system"

CUSTOMERS_PER_TIER = Gauge("retain_segmenter_customers_per_tier", "Customers in each tier.", ["tier"])
CUSTOMERS_PER_SEGMENT = Gauge(
    "retain_segmenter_customers_per_segment", "Customers in each segment.", ["segment"]
)
UPDATES_PUBLISHED = Counter(
    "retain_segmenter_updates_total", "customer_update events written, by cause.", ["cause"]
)
PUBLISH_JOBS = Counter(
    "retain_segmenter_publish_jobs_total", "Rule-publish jobs, by final status.", ["status"]
)
# Updated by the consumer's tick only (publish steps, the sweep), so registered by the consumer
# process only (``shared.metrics.expose``): the API would export a progress stuck at 0.
PUBLISH_JOB_PROGRESS = Gauge(
    "retain_segmenter_publish_job_progress_ratio", "Share of customers re-evaluated.", registry=None
)
SWEPT = Counter("retain_segmenter_swept_total", "Customers re-evaluated because time passed.", registry=None)
UNCONVERTED = Counter(
    "retain_segmenter_unconverted_purchases_total",
    "Purchase events applied in a currency RETAIN_SEGMENTER_FX_RATES has no rate for, by currency: "
    "left out of the customer's total_value and avg_order_value, so out of the tiers and segments "
    "written over them.",
    ["currency"],
    registry=None,
)
CONSUMER_METRICS = (PUBLISH_JOB_PROGRESS, SWEPT, UNCONVERTED)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class RulesConflictError(Exception):
    """The draft changed since the caller read it (stale ETag)."""


class InvalidRulesError(Exception):
    def __init__(self, errors: list[ConditionError]) -> None:
        super().__init__(f"{len(errors)} problem(s) in the rule set")
        self.errors = errors


class UnknownVersionError(Exception):
    pass


class NothingToPublishError(Exception):
    """The draft is the published version's rules: a new version would re-evaluate everyone
    (superseding a publish still running) to change nothing."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the draft is version {version} as published")
        self.version = version


@dataclass(frozen=True, slots=True)
class Preview:
    customers: int
    tiers: dict[str, int]
    segments: dict[str, int]
    tier_moves: dict[str, dict[str, int]]
    segments_entered: dict[str, int]
    segments_left: dict[str, int]
    sample: list[dict[str, Any]]
    published_version: int | None


class SegmenterService:
    def __init__(
        self,
        db: Database,
        settings: SegmenterSettings,
        producer: Producer | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.repo = SegmenterRepository()
        self.clock = clock
        self.config = settings.lifecycle
        self.topic = settings.topic(SEGMENTS)
        self.relay = OutboxRelay(db, outbox, producer) if producer is not None else None
        self._versions: dict[int, CompiledRules] = {}  # every version asked for, compiled
        self._last_sweep = time.monotonic() - settings.segmenter_sweep_interval_s  # the first tick sweeps
        # Whether the consumer is still working through a backlog; its loop says (build_loop).
        self.catching_up: Callable[[], bool] = lambda: False

    # --- rules in force ---------------------------------------------------------------------------

    async def ensure_default_rules(self) -> None:
        """Version 1 is the shipped default; every process may race to create it, one wins."""
        now = self.clock()
        rules = default_rules()
        async with self.db.transaction() as session:
            first = await self.repo.published_version(session) is None
            if first and await self.repo.add_version(session, 1, rules, SYSTEM, "default rule set", now):
                await self.repo.audit(
                    session, SYSTEM, "publish", 1, jsonpatch.make_patch({}, rules).patch, now
                )
            await self.repo.create_draft(session, rules, ruleset_etag(rules), SYSTEM, now)
            live = await self.repo.published(session)
            draft = await self.repo.draft(session)
        # Saved under an earlier release's checks: the live rules still run as they are, but a
        # publish of the draft (or a rollback to them) is refused until they are corrected.
        for which, saved in (
            ("published", live[1] if live else None),
            ("draft", draft.rules if draft else None),
        ):
            problems = validate_rules(saved) if saved is not None else []
            if problems:
                log.warning(
                    "saved rules fail today's checks: correct them before the next publish",
                    rules=which,
                    problems=[f"{e.path}: {e.message}" for e in problems][:20],
                )

    async def rules(self, session: Any) -> CompiledRules:
        version = await self.repo.published_version(session)
        if version is None:
            raise RuntimeError("no published rule set: call ensure_default_rules() at start")
        rules = await self._compiled(session, version)
        if rules is None:
            raise RuntimeError(f"published rule set version {version} is missing")
        return rules

    async def _compiled(self, session: Any, version: int) -> CompiledRules | None:
        """A stored version, compiled once (versions are immutable); None if there is none."""
        compiled = self._versions.get(version)
        if compiled is None:
            stored = await self.repo.version(session, version)
            if stored is None:
                return None
            compiled = self._versions[version] = compile_rules(stored.rules, version)
        return compiled

    # --- the consumer's handler -----------------------------------------------------------------

    async def apply_batch(self, batch: Sequence[Delivered[Event | ClvPrediction]]) -> BatchResult:
        now = self.clock()
        staged = Staged([], [])
        async with self.db.transaction() as session:
            claimed = await claim_events(session, applied_events, batch)
            fresh: dict[str, list[Event | ClvPrediction]] = defaultdict(list)
            for d in claimed.fresh:
                fresh[d.value.customer_id].append(d.value)
            if fresh:
                rules = await self.rules(session)
                # The facts are derived again from the state: the stored ones are not read.
                rows = await self.repo.load_customers(session, list(fresh), for_update=True, with_facts=False)
                decisions: list[Decision] = []
                for customer_id, events in fresh.items():
                    old = rows.get(customer_id)
                    state = load_state(customer_id, old.state) if old else ProfileState(customer_id)
                    key = ",".join(sorted(e.event_id for e in events))
                    decisions.append(decide_events(state, old, events, rules, self.config, now, key))
                staged = await self._enqueue(session, await self._write(session, decisions, now))
        for events in fresh.values():  # committed: counted once
            for event in events:
                if isinstance(event, PurchaseEvent) and self.config.rate(event.currency) is None:
                    UNCONVERTED.labels(event.currency).inc()
        await self._relay(staged)  # publish after commit
        return BatchResult(len(claimed.fresh), claimed.duplicates, claimed.reused)

    async def _write(
        self, session: Any, decisions: Sequence[Decision], now: datetime
    ) -> list[CustomerUpdate]:
        """Write the decided rows and memberships; return the updates to announce them."""
        await self.repo.save_customers(session, [d.row for d in decisions])
        await self.repo.change_memberships(
            session,
            [(s, d.row.customer_id) for d in decisions for s in d.entered],
            [(s, d.row.customer_id) for d in decisions for s in d.left],
            now,
        )
        return [d.update for d in decisions if d.update is not None]

    async def _enqueue(self, session: Any, updates: Sequence[CustomerUpdate]) -> Staged:
        """Put the updates in the outbox, in the caller's transaction."""
        records = [self._record(u) for u in updates]
        for cause, n in Tally(u.cause.value for u in updates).items():
            UPDATES_PUBLISHED.labels(cause).inc(n)
        # The API process has no relay: the consumer process relays its updates.
        return await stage_or_enqueue(self.relay, session, outbox, records)

    async def _relay(self, staged: Staged) -> None:
        """Hand what a transaction staged to the relay once it has committed: the relay sends
        it in the background while the next batch is applied."""
        if self.relay is not None:
            await self.relay.after_commit(staged)

    async def close(self) -> None:
        """Wait until every update committed so far has gone out (for a clean stop)."""
        if self.relay is None:
            return
        try:
            await self.relay.drain()
        except BrokerUnavailableError as exc:
            # Nothing is lost: the rows stay in the outbox and go out at the next start.
            log.warning("updates wait in the outbox: Kafka unreachable", error=str(exc)[:200])

    def _record(self, update: CustomerUpdate) -> OutboundRecord:
        return OutboundRecord(self.topic, encode_key(update.customer_id), encode(update))

    # --- time passing ------------------------------------------------------------------------

    async def sweep(self, limit: int = 1000) -> int:
        """Re-evaluate the customers whose next_check_at has come (found by index)."""
        now = self.clock()
        total = 0
        while True:
            async with self.db.transaction() as session:
                due = await self.repo.due_for_check(session, now, limit)
                if not due:
                    break
                rules = await self.rules(session)
                rows = await self.repo.load_customers(session, due, for_update=True, with_facts=False)
                # Keyed by the instants judged between, not by the change alone: a late event
                # takes a row back to its latest event, and the sweep that brings it forward
                # again announces a change of its own (the same id would be dropped downstream).
                decisions = [
                    decide(
                        load_state(cid, row.state),
                        row,
                        rules,
                        self.config,
                        now,
                        UpdateCause.TIME,
                        f"{row.updated_at.isoformat()}|{now.isoformat()}",
                    )
                    for cid, row in rows.items()
                ]
                staged = await self._enqueue(session, await self._write(session, decisions, now))
            await self._relay(staged)
            total += len(due)
            SWEPT.inc(len(due))
            if len(due) < limit:
                break
        return total

    # --- rule publishing -------------------------------------------------------------------------

    async def run_publish_step(self) -> JobRow | None:
        """Re-evaluate the next chunk of customers for the newest unfinished publish job."""
        now = self.clock()
        chunk = self.settings.segmenter_publish_chunk
        async with self.db.transaction() as session:
            job = await self.repo.active_job(session)
            if job is None:
                return None
            rules = await self.rules(session)
            if rules.version != job.version:
                # A rollback or a newer publish is in force; its own job covers everyone.
                await self.repo.advance_job(session, job.id, status="superseded", finished_at=now)
                PUBLISH_JOBS.labels("superseded").inc()
                return job
            # The page is read with only the facts the changed rules read, picked out of the
            # stored JSON by the database; customers some rule set with another tier ladder
            # assigned are evaluated under every rule, and read whole.
            rule_changes = await self.rule_changes(session, rules)
            fields = facts_read(rule_changes)
            standings = await self.repo.standings_after(session, job.cursor, chunk, fields)
            if fields is not None and (whole := read_whole(standings, rules, rule_changes)):
                stored = await self.repo.stored_facts(session, whole)
                standings = [
                    replace(s, facts=stored[s.customer_id]) if s.customer_id in stored else s
                    for s in standings
                ]
            step = reevaluate(standings, rules, now, rule_changes)
            # Only the customers who move are read again, locked, and with only what announcing
            # the move needs; those written since the page was read (or whose stored facts are
            # out of date) are read in full and derived again.
            movers = await self.repo.load_movers(session, [s.customer_id for s, _ in step.moves])
            changes: list[RuleChange] = []
            again = list(step.stale)
            for standing, assignment in step.moves:
                mover = movers.get(standing.customer_id)
                if mover is not None and unchanged(standing, mover):
                    changes.append(rule_change(mover, assignment, rules, self.config, now))
                elif mover is not None:
                    again.append(standing.customer_id)
            rows = await self.repo.load_customers(session, again, for_update=True)
            decisions = [self._reassign(rows[cid], rules, now) for cid in again if cid in rows]
            await self.repo.reassign(session, [c.reassignment for c in changes])
            await self.repo.move_next_checks(session, step.earlier_checks)
            await self.repo.change_memberships(
                session,
                [(s, c.reassignment.customer_id) for c in changes for s in c.entered],
                [(s, c.reassignment.customer_id) for c in changes for s in c.left],
                now,
            )
            updates = await self._write(session, decisions, now) + [c.update for c in changes]
            staged = await self._enqueue(session, updates)
            changed = len(updates)
            done = job.done + len(standings)
            finished = len(standings) < chunk
            await self.repo.advance_job(
                session,
                job.id,
                status="done" if finished else "running",
                done=done,
                changed=job.changed + changed,
                cursor=standings[-1].customer_id if standings else job.cursor,
                started_at=job.started_at or now,
                finished_at=now if finished else None,
                total=max(job.total, done),
            )
        await self._relay(staged)
        PUBLISH_JOB_PROGRESS.set(1.0 if finished else done / max(job.total, 1))
        if finished:
            PUBLISH_JOBS.labels("done").inc()
            log.info(
                "rule publish applied", version=job.version, customers=done, changed=job.changed + changed
            )
        return job

    async def rule_changes(self, session: Any, rules: CompiledRules) -> dict[int, RuleChanges]:
        """What ``rules`` change of each older version with the same tier ladder: customers
        those versions assigned need only the new or changed segment rules evaluated."""
        changes: dict[int, RuleChanges] = {}
        for version in await self.repo.version_numbers(session):
            old = await self._compiled(session, version) if version != rules.version else None
            change = rules.changes_from(old) if old is not None else None
            if change is not None:
                changes[version] = change
        return changes

    def _reassign(self, row: CustomerRow, rules: CompiledRules, now: datetime) -> Decision:
        # As of now, like the sweep: a publish is news when it happens, and a row whose facts
        # are out of date would otherwise stay so, its move stamped in the past.
        return decide(
            load_state(row.customer_id, row.state),
            row,
            rules,
            self.config,
            now,
            UpdateCause.RULES,
            str(rules.version),
        )

    async def tick(self) -> None:
        """Work between consumer batches (a few times a second: build_loop): a publish step,
        and the sweep when it is due."""
        await self.run_publish_step()  # one chunk per tick, so events keep flowing meanwhile
        if self._sweep_due():
            self._last_sweep = time.monotonic()
            if self.relay is not None:
                # Rows committed and never sent by a process that died (this one's predecessor,
                # at start-up, or another instance since): rare, so looked for now and then.
                await self.relay.flush()
            swept = await self.sweep()
            if swept:
                log.info("time-based re-evaluation", customers=swept)
        if self.relay is not None:
            await self.relay.delete_sent()

    def _sweep_due(self) -> bool:
        """Every sweep interval, but not while the consumer catches up on a backlog (a replay,
        a restart after downtime), up to a limit: a customer whose later events are still
        on the topic would be swept as lapsed or at risk, and messaged, only to come back a
        moment later."""
        since = time.monotonic() - self._last_sweep
        interval = self.settings.segmenter_sweep_interval_s
        if since < interval:
            return False
        return not (self.catching_up() and since < interval + self.settings.segmenter_sweep_max_defer_s)

    async def refresh_gauges(self) -> None:
        async with self.db.sessions() as session:
            for tier, n in (await self.repo.tier_counts(session)).items():
                CUSTOMERS_PER_TIER.labels(tier).set(n)
            for segment, n in (await self.repo.segment_counts(session)).items():
                CUSTOMERS_PER_SEGMENT.labels(segment).set(n)

    # --- the rules API -------------------------------------------------------------------------------

    async def draft(self) -> tuple[dict[str, Any], str, datetime, str]:
        async with self.db.sessions() as session:
            row = await self.repo.draft(session)
        return row.rules, row.etag, row.updated_at, row.updated_by

    async def put_draft(self, rules: dict[str, Any], actor: str, if_match: str | None) -> str:
        errors = validate_rules(rules)
        if errors:
            raise InvalidRulesError(errors)
        etag = ruleset_etag(rules)
        now = self.clock()
        async with self.db.transaction() as session:
            current = await self.repo.draft(session)
            if not await self.repo.replace_draft(session, rules, etag, actor, now, if_match):
                raise RulesConflictError
            await self.repo.audit(
                session, actor, "draft", None, jsonpatch.make_patch(current.rules, rules).patch, now
            )
        return etag

    async def publish(self, actor: str, if_match: str, note: str | None) -> tuple[int, str]:
        """Make the draft a new immutable version, if the caller saw the current draft."""
        now = self.clock()
        async with self.db.transaction() as session:
            draft = await self.repo.draft(session)
            if draft.etag != if_match:
                raise RulesConflictError
            errors = validate_rules(draft.rules)
            if errors:
                raise InvalidRulesError(errors)
            current = await self.repo.published(session)
            if current is not None and current[1] == draft.rules:
                raise NothingToPublishError(current[0])
            # One ETag publishes once: swap it (compare-and-set) so a second publish with the
            # same ETag — concurrent or later — finds it stale.
            fresh = ruleset_etag({"rules": draft.rules, "published_as": (current[0] if current else 0) + 1})
            if not await self.repo.swap_draft_etag(session, if_match, fresh):
                raise RulesConflictError
            return await self._new_version(
                session, current, draft.rules, actor, note or "publish", "publish", now
            )

    async def rollback(self, version: int, actor: str) -> tuple[int, str]:
        now = self.clock()
        async with self.db.transaction() as session:
            old = await self.repo.version(session, version)
            if old is None:
                raise UnknownVersionError(version)
            # Validated again, as a publish is: a version published before this release's
            # validation refused what it holds would not compile in the consumers.
            errors = validate_rules(old.rules)
            if errors:
                raise InvalidRulesError(errors)
            live = await self.repo.published(session)
            draft = await self.repo.draft(session)
            new = await self._new_version(
                session, live, old.rules, actor, f"rollback to {version}", "rollback", now
            )
            # The draft follows the rollback, unless it holds edits not published yet: those are
            # someone's work in progress, kept (with its ETag) for its editor to publish or drop.
            # Compare-and-set on the ETag read: an edit saved since (PostgreSQL lets it commit
            # meanwhile) is such work too, and was overwritten, its 200 and ETag a lie.
            if draft is None or live is None or draft.rules == live[1]:
                await self.repo.replace_draft(
                    session, old.rules, ruleset_etag(old.rules), actor, now, draft.etag if draft else None
                )
            return new

    async def _new_version(
        self,
        session: Any,
        current: tuple[int, dict[str, Any]] | None,
        rules: dict[str, Any],
        actor: str,
        note: str,
        action: str,
        now: datetime,
    ) -> tuple[int, str]:
        """Publish ``rules`` over ``current`` (the published version and its rules, as the caller
        read them in this transaction)."""
        # The version row's primary key serialises publishes: of two racing, one inserts n+1
        # and the other finds it taken and fails as a conflict rather than interleaving.
        version = (current[0] if current else 0) + 1
        if not await self.repo.add_version(session, version, rules, actor, note, now):
            raise RulesConflictError
        diff = jsonpatch.make_patch(current[1] if current else {}, rules).patch
        await self.repo.audit(session, actor, action, version, diff, now)
        total = await self.repo.count_customers(session)
        job_id = await self.repo.create_job(session, version, total, actor, now)
        return version, job_id

    async def job(self, job_id: str) -> JobRow | None:
        async with self.db.sessions() as session:
            return await self.repo.job(session, job_id)

    async def versions(self) -> list[Any]:
        async with self.db.sessions() as session:
            return await self.repo.versions(session)

    async def version(self, n: int) -> Any:
        async with self.db.sessions() as session:
            return await self.repo.version(session, n)

    async def audit_log(self, limit: int = 100) -> list[Any]:
        async with self.db.sessions() as session:
            return await self.repo.audit_log(session, limit)

    async def preview(self, rules_json: dict[str, Any], sample_size: int = 20, chunk: int = 5000) -> Preview:
        """Evaluate a rule set against every current profile, next to what is published."""
        errors = validate_rules(rules_json)
        if errors:
            raise InvalidRulesError(errors)
        candidate = compile_rules(rules_json, 0)
        now = self.clock()
        tiers: dict[str, int] = defaultdict(int)
        segments: dict[str, int] = defaultdict(int)
        moves: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        entered: dict[str, int] = defaultdict(int)
        left: dict[str, int] = defaultdict(int)
        sample: list[dict[str, Any]] = []
        count = 0
        cursor: str | None = None
        async with self.db.sessions() as session:
            published = await self.repo.published_version(session)
            while True:
                rows = await self.repo.customers_after(session, cursor, chunk)
                if not rows:
                    break
                cursor = rows[-1].customer_id
                for row in rows:
                    count += 1
                    a = candidate.assign(facts_from_json(row.facts), now)
                    tiers[a.tier] += 1
                    for s in a.segments:
                        segments[s] += 1
                    gained = sorted(set(a.segments) - set(row.segments))
                    lost = sorted(set(row.segments) - set(a.segments))
                    for s in gained:
                        entered[s] += 1
                    for s in lost:
                        left[s] += 1
                    if a.tier != row.tier:
                        moves[row.tier][a.tier] += 1
                    if (a.tier != row.tier or gained or lost) and len(sample) < sample_size:
                        sample.append(
                            {
                                "customer_id": row.customer_id,
                                "tier": {"from": row.tier, "to": a.tier},
                                "segments_entered": gained,
                                "segments_left": lost,
                            }
                        )
        return Preview(
            customers=count,
            tiers=dict(tiers),
            segments=dict(segments),
            tier_moves={k: dict(v) for k, v in moves.items()},
            segments_entered=dict(entered),
            segments_left=dict(left),
            sample=sample,
            published_version=published,
        )

    # --- customers ------------------------------------------------------------------------------------

    async def customer(self, customer_id: str) -> dict[str, Any] | None:
        async with self.db.sessions() as session:
            rows = await self.repo.load_customers(session, [customer_id])
            row = rows.get(customer_id)
            if row is None:
                return None
            rules = await self.rules(session)
        now = self.clock()
        state = load_state(customer_id, row.state)
        current, _ = derive_facts(state, now, self.config)
        return {
            "customer_id": customer_id,
            "tier": row.tier,
            "segments": row.segments,
            "lifecycle_stage": row.lifecycle_stage,
            "rule_version": row.rule_version,
            "updated_at": row.updated_at,
            "next_check_at": row.next_check_at,
            "profile": current,
            "consents": consent_states(state.consents),
            "why": rules.explain(current, now),
        }

    async def segment_members(
        self, segment: str, cursor: str | None, limit: int
    ) -> list[tuple[str, datetime]]:
        async with self.db.sessions() as session:
            return await self.repo.segment_members(session, segment, cursor, limit)

    async def groups(self, kind: Literal["tiers", "segments"]) -> tuple[int, list[tuple[str, str, int]]]:
        """The published version and its tiers (ladder order, then "none") or segments (rule
        order), each as (name, description, customers in it now)."""
        async with self.db.sessions() as session:
            rules = await self.rules(session)
            row = await self.repo.version(session, rules.version)
            count = self.repo.tier_counts if kind == "tiers" else self.repo.segment_counts
            counts = await count(session)
        ruleset = RuleSet.model_validate(row.rules)
        described = {r.name: r.description for r in getattr(ruleset, kind)}
        described.setdefault(NO_TIER, "no tier's rule matched")
        names = rules.tier_names if kind == "tiers" else rules.segment_names
        return rules.version, [(n, described.get(n, ""), counts.get(n, 0)) for n in names]

    async def known_segment(self, segment: str) -> bool:
        async with self.db.sessions() as session:
            rules = await self.rules(session)
        return segment in rules.segment_names
