"""One chaos run: replay a seeded stream through ingest while faults strike in turns, let the
pipeline settle, stop it, and compare what it holds with the oracle."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from services.kpi import tables as kpi_tables
from services.messenger import tables as messenger_tables
from services.messenger.providers.outbox import safe_name
from services.segmenter import tables as segmenter_tables
from services.segmenter.config import SegmenterSettings
from services.segmenter.repository import SegmenterRepository
from services.segmenter.rules import compile_rules, default_rules
from shared.codec import decode_with
from shared.db import Database
from shared.demo.generator import generate
from shared.demo.sender import send
from shared.events import (
    CLV_ADAPTER,
    CUSTOMER_UPDATE_ADAPTER,
    EVENT_ADAPTER,
    MESSAGE_EVENT_ADAPTER,
    Channel,
    ClvPrediction,
    CustomerUpdate,
    Event,
    MessageEvent,
    MessageKind,
)
from shared.topics import CLV, MESSAGES, SEGMENTS
from tests.chaos import poison
from tests.chaos.cluster import BACKEND_TOPICS, CHAOS_VAR, GROUPS, Cluster, say
from tests.chaos.oracle import (
    Call,
    Comparison,
    Delivery,
    Ledger,
    check_delivery,
    compare_kpi,
    compare_ledger,
    compare_segmenter,
    profiles,
)
from tests.support.kafka import read_all

KILLED = ("segmenter", "messenger", "kpi", "sender")


@dataclass(frozen=True)
class Options:
    events: int = 20_000
    rounds: int = 3  # each worker is SIGKILLed this many times; the broker, PostgreSQL and a
    # second consumer instance get one turn per round
    seed: int = 7
    days: int = 30  # the history ends now: its last days are recent enough to message about
    gap_s: tuple[float, float] = (2.0, 6.0)  # pause after each fault: the pipeline works a while
    replay_s: float | None = None  # spread the replay over this long (default: the faults' span)
    settle_timeout_s: float = 900.0
    root: Path | None = None
    keep: bool = False
    poison: bool = True  # poison records mid-stream, and a dead letter replayed with the CLI


@dataclass
class Fault:
    kind: str  # kill, broker, postgres, rebalance
    target: str
    at_s: float = 0.0  # since the replay began
    replayed: int = 0  # events accepted by ingest when it struck
    seconds: float = 0.0  # how long the target was away


@dataclass
class Figures:
    events: int = 0
    customers: int = 0
    replay_s: float = 0.0
    ingest_retries: int = 0
    faults: list[Fault] = field(default_factory=list)
    settle_s: float = 0.0
    settled_at: datetime | None = None  # the last look that found nothing left to do
    lag: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # accepted by ingest, absent from the topics
    duplicates_on_topics: int = 0  # records with an event id seen before (dropped downstream)
    comparisons: list[Comparison] = field(default_factory=list)
    delivery: Delivery = field(default_factory=Delivery)
    statuses: dict[str, int] = field(default_factory=dict)  # the messenger's ledger, by status
    crashed: list[str] = field(default_factory=list)  # processes that died unasked
    dlq: poison.DlqFigures | None = None
    total_s: float = 0.0

    def count(self, kind: str, target: str | None = None) -> int:
        return sum(1 for f in self.faults if f.kind == kind and (target is None or f.target == target))

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and bool(self.comparisons)  # a run that never got to compare proves nothing
            and all(c.ok for c in self.comparisons)
            and self.delivery.ok
            and not any(self.lag.values())
            and not any(self.pending.values())
            and not self.crashed
            and (self.dlq is None or not self.dlq.problems())
        )


def plan(options: Options) -> list[Fault]:
    """The faults in turns: each round kills every worker once, restarts the broker and
    PostgreSQL, and has a second instance of one consumer join and leave; shuffled per round."""
    rng = random.Random(options.seed)
    faults: list[Fault] = []
    joiners = ("segmenter", "kpi", "messenger")
    for n in range(options.rounds):
        turn = [Fault("kill", w) for w in KILLED]
        turn += [Fault("broker", "kafka"), Fault("postgres", "postgresql")]
        turn.append(Fault("rebalance", joiners[n % len(joiners)]))
        rng.shuffle(turn)
        faults += turn
    return faults


def _expected_s(fault: Fault, options: Options) -> float:
    """Roughly how long a fault and the pause after it take (to pace the replay over them)."""
    away = {"kill": 1.5, "broker": 22.0, "postgres": 3.0, "rebalance": 6.0}[fault.kind]
    return away + sum(options.gap_s) / 2


def stream(options: Options, now: datetime) -> list[dict[str, Any]]:
    """At least ``options.events`` events: whole customer stories (never cut short, so every
    customer starts with a profile and the recent days, which trigger messages, stay)."""
    start = now - timedelta(days=options.days)
    sample = 200
    per_customer = len(generate(options.seed, sample, start, options.days)) / sample
    customers = max(1, math.ceil(options.events / per_customer))
    while True:
        events = generate(options.seed, customers, start, options.days)
        if len(events) >= options.events:
            return [dict(e) for e in events]
        customers = math.ceil(customers * 1.05) + 1


class Run:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed + 1)
        root = options.root or CHAOS_VAR / f"run-{os.getpid()}"
        self.cluster = Cluster(root)
        self.figures = Figures()
        self.accepted = 0
        self._began = 0.0
        self.placed: list[poison.Placed] = []
        self.replays: list[tuple[int, str]] = []
        self._poison_since = datetime.now(UTC)

    # --- the run ---------------------------------------------------------------------------

    def execute(self) -> Figures:
        started = time.monotonic()
        finished = False
        try:
            self.cluster.start_infra()
            self.cluster.start_services()
            asyncio.run(self._chaos())
            self._settle_and_stop()
            asyncio.run(self._compare())
            finished = True
        finally:
            self.figures.total_s = time.monotonic() - started
            keep = self.options.keep or not finished or not self.figures.ok
            self.cluster.close(keep=keep)
            if keep:
                say(f"kept {self.cluster.root} for a look (logs/ has every process's output)")
        return self.figures

    async def _chaos(self) -> None:
        now = datetime.now(UTC)
        events = stream(self.options, now)
        self.events = events
        dead_letter: dict[str, Any] | None = None
        if self.options.poison:
            profile, dead_letter = poison.customer_events(now)
            events = [profile, *events]
            # The oracle's stream has the purchase; ingest never sees it (it goes to the DLQ).
            self.events = [*events, dead_letter]
        self.figures.events = len(events)
        self.figures.customers = len({e["customer_id"] for e in events})
        faults = plan(self.options)
        # Each fault strikes at a random point of the stream: the replay does not pass a fault's
        # point before the fault has begun (it goes on while the broker is away, as a real
        # backend would, and gets 503s), so none strikes after the stream is in.
        points = sorted(self.rng.randrange(len(events) // 20, len(events) * 19 // 20) for _ in faults)
        struck = [asyncio.Event() for _ in faults]
        span = self.options.replay_s or sum(_expected_s(f, self.options) for f in faults)
        rate = max(1.0, len(events) / span)
        say(
            f"replaying {len(events)} events ({self.figures.customers} customers) at up to {rate:.0f}/s "
            f"while {len(faults)} faults strike"
        )
        self._began = time.monotonic()
        replay = asyncio.create_task(self._replay(events, rate, list(zip(points, struck, strict=True))))
        try:
            for n, (fault, point, begun) in enumerate(zip(faults, points, struck, strict=True)):
                while self.accepted < point and not replay.done():
                    await asyncio.sleep(0.05)
                if replay.done():
                    await replay  # it failed: say why
                begun.set()
                await self._strike(fault)
                self.figures.faults.append(fault)
                self._check_crashes()
                if dead_letter is not None and n == len(faults) // 2:
                    await self._poison(dead_letter)
                await asyncio.sleep(self.rng.uniform(*self.options.gap_s))  # let the pipeline work
            await replay
            if dead_letter is not None:
                await self._dlq_replay()  # again, once the first has long been applied
        finally:
            if not replay.done():
                replay.cancel()
        self.figures.replay_s = time.monotonic() - self._began

    async def _replay(
        self, events: Sequence[dict[str, Any]], rate: float, gates: Sequence[tuple[int, asyncio.Event]]
    ) -> None:
        batch = 50
        for i in range(0, len(events), batch):
            for point, begun in gates:
                if point <= i:
                    await begun.wait()
            chunk = events[i : i + batch]
            report = await send(
                chunk, self.cluster.ingest_url, self.cluster.api_key, batch_size=batch, max_attempts=60
            )
            self.accepted += report.events
            self.figures.ingest_retries += report.retries
            due = self._began + (i + len(chunk)) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def _strike(self, fault: Fault) -> None:
        fault.at_s = time.monotonic() - self._began
        fault.replayed = self.accepted
        began = time.monotonic()
        if fault.kind == "kill":
            proc = self.cluster.procs[fault.target]
            proc.kill()
            await asyncio.sleep(self.rng.uniform(0.2, 2.0))
            proc.start()
        elif fault.kind == "broker":
            await asyncio.to_thread(self.cluster.restart_broker)
        elif fault.kind == "postgres":
            await asyncio.to_thread(self.cluster.crash_postgres)
        elif fault.kind == "rebalance":
            second = self.cluster.second_instance(fault.target)
            try:
                await asyncio.sleep(self.rng.uniform(4.0, 8.0))  # joins, takes partitions mid-batch
            finally:
                await asyncio.to_thread(second.close)  # leaves: its partitions move back
        fault.seconds = time.monotonic() - began
        say(f"{fault.kind} {fault.target} after {fault.replayed} events ({fault.seconds:.1f}s)")

    async def _poison(self, dead_letter: dict[str, Any]) -> None:
        """Mid-stream, between faults: the poisons onto their topics, the purchase onto the
        DLQ, and the first ``retain dlq replay``."""
        self._poison_since = datetime.now(UTC)
        c = self.cluster
        self.placed = await poison.place(c.bootstrap, c.prefix, datetime.now(UTC), dead_letter)
        say(f"placed {len(self.placed)} poison records and a dead letter after {self.accepted} events")
        await self._dlq_replay()

    async def _dlq_replay(self) -> None:
        c = self.cluster
        code, out = await asyncio.to_thread(poison.replay_cli, c.bootstrap, c.prefix, self._poison_since)
        self.replays.append((code, out))
        say(f"retain dlq replay: exit {code}: {out}")

    def _check_crashes(self) -> None:
        for name in self.cluster.check_alive():
            say(f"{name} died on its own:\n{self.cluster.procs[name].tail()}")
            self.figures.crashed.append(name)
            self.cluster.procs[name].start()

    # --- settling --------------------------------------------------------------------------

    def _settle_and_stop(self) -> None:
        """Wait until every group has committed everything and no work is left; stop kpi first
        (its CLV refits feed the segmenter), settle again, then stop the rest cleanly."""
        began = time.monotonic()
        deadline = began + self.options.settle_timeout_s
        # Messages about to fall due count as work left, so kpi is not stopped a moment before
        # they go out: a run that settled at 06:59:59 UTC stopped it while messages held until
        # 09:00 in Israel went out a second later, and their outcomes never reached kpi. The
        # second look's horizon is shorter, so nothing can come due between the two.
        self._wait_quiet(deadline, due_within_s=60.0)
        self.cluster.stop_services(["kpi"])
        self._wait_quiet(deadline, without=("kpi",), due_within_s=30.0)
        self.cluster.stop_services()
        self.figures.settle_s = time.monotonic() - began
        self.figures.lag = asyncio.run(self.cluster.lag())
        self.figures.pending = asyncio.run(self.cluster.pending_work())

    def _wait_quiet(self, deadline: float, without: Sequence[str] = (), due_within_s: float = 0.0) -> None:
        calm = 0
        while True:
            self._check_crashes_except(without)
            looked_at = datetime.now(UTC)
            lag = asyncio.run(self.cluster.lag())
            pending = asyncio.run(self.cluster.pending_work(due_within_s))
            pending["segmenter checks due"] = asyncio.run(self.cluster.due_checks(looked_at))
            busy = {k: v for k, v in {**lag, **pending}.items() if v and k not in without}
            calm = 0 if busy else calm + 1
            # The oracle holds every next check to be later than the last look (one on the
            # deadline too: what is still due then is reported, not skipped).
            self.figures.settled_at = looked_at
            if calm >= 2:  # two quiet looks in a row: nothing is still on its way
                return
            if time.monotonic() > deadline:
                say(f"not settled before the deadline: {busy}")
                return
            time.sleep(1.0)

    def _check_crashes_except(self, without: Sequence[str]) -> None:
        for name in self.cluster.check_alive():
            if name not in without:
                self.figures.crashed.append(name)
                say(f"{name} died on its own:\n{self.cluster.procs[name].tail()}")
                self.cluster.procs[name].start()

    # --- the comparison ---------------------------------------------------------------------

    async def _compare(self) -> None:
        c = self.cluster
        records = await read_all(
            c.bootstrap, [c.topic(t) for t in (*BACKEND_TOPICS, CLV, SEGMENTS, MESSAGES)], timeout_s=120
        )
        backend: dict[str, Event] = {}
        clv: dict[str, ClvPrediction] = {}
        updates: dict[str, CustomerUpdate] = {}
        message_events: dict[str, MessageEvent] = {}
        # A message's first event on retain.messages: its decision, in the order its batch made
        # them (one customer, one partition), which created_at alone cannot tell apart.
        decided_order: dict[str, int] = {}
        ordered: list[Event | ClvPrediction] = []
        duplicates = 0
        poison_values = {p.value for p in self.placed}
        for r in sorted(records, key=lambda r: (r.timestamp, r.topic, r.partition, r.offset)):
            topic = r.topic.removeprefix(c.prefix)
            value = r.value or b""
            if topic == CLV:
                p = decode_with(CLV_ADAPTER, value)
                duplicates += p.event_id in clv
                clv.setdefault(p.event_id, p)
            elif topic == SEGMENTS:
                u = decode_with(CUSTOMER_UPDATE_ADAPTER, value)
                duplicates += u.event_id in updates
                updates.setdefault(u.event_id, u)
            elif topic == MESSAGES:
                m = decode_with(MESSAGE_EVENT_ADAPTER, value)
                decided_order[m.message_id] = min(decided_order.get(m.message_id, r.offset), r.offset)
                duplicates += m.event_id in message_events
                message_events.setdefault(m.event_id, m)
            elif value in poison_values:
                continue  # placed by the run past ingest; its dead letters are checked below
            else:
                e = decode_with(EVENT_ADAPTER, value)
                duplicates += e.event_id in backend
                backend.setdefault(e.event_id, e)
        self.figures.duplicates_on_topics = duplicates
        replayed = [EVENT_ADAPTER.validate_python(e) for e in self.events]
        self.figures.lost = sum(1 for e in replayed if e.event_id not in backend)
        # The oracle's input: the stream as sent (per customer in order) and the CLV predictions
        # in the order they were published.
        ordered = [*replayed, *sorted(clv.values(), key=lambda p: (p.occurred_at, p.event_id))]
        states = profiles(ordered)

        seg, msg, kpi = (Database(c.database_urls[s]) for s in ("segmenter", "messenger", "kpi"))
        try:
            comparisons: list[Comparison] = []
            async with seg.sessions() as session:
                rows = await SegmenterRepository().load_customers(session, list(states), for_update=False)
                every = (await session.execute(select(segmenter_tables.customers.c.customer_id))).scalars()
                extra = sorted(set(every) - set(states))
                applied = await _ids(session, segmenter_tables.applied_events)
            settings = SegmenterSettings()
            states_cmp, tiers_cmp, instants_cmp = compare_segmenter(
                states, rows, compile_rules(default_rules(), 1), settings.lifecycle, self.figures.settled_at
            )
            states_cmp.extra += extra
            # Where the replayed dead-lettered purchase shows as applied (poison.APPLIED_IN).
            found = {
                "profile": poison.CUSTOMER in rows and poison.CUSTOMER not in states_cmp.different,
                "segmenter ledger": poison.PURCHASE_ID in applied,
            }
            comparisons += [
                compare_ledger("segmenter applied events", [*backend, *clv], applied),
                states_cmp,
                tiers_cmp,
                instants_cmp,
            ]
            async with kpi.sessions() as session:
                tables = {
                    name: [dict(r._mapping) for r in await session.execute(select(getattr(kpi_tables, name)))]
                    for name in (
                        "purchases",
                        "support_events",
                        "cancellations",
                        "message_events",
                        "customers",
                    )
                }
                applied = await _ids(session, kpi_tables.applied_events)
            found["kpi purchases"] = any(r["event_id"] == poison.PURCHASE_ID for r in tables["purchases"])
            found["kpi ledger"] = poison.PURCHASE_ID in applied
            comparisons.append(compare_ledger("kpi applied events", [*backend, *message_events], applied))
            comparisons += compare_kpi([*replayed, *message_events.values()], tables)
            async with msg.sessions() as session:
                applied = await _ids(session, messenger_tables.applied_events)
                table = messenger_tables.messages
                ledger = [
                    Ledger(
                        r.id,
                        r.customer_id,
                        r.journey,
                        MessageKind(r.kind),
                        None if r.channel is None else Channel(r.channel),
                        r.status,
                        r.trigger_event_id,
                        r.created_at,
                    )
                    for r in await session.execute(select(table))
                ]
            comparisons.append(compare_ledger("messenger applied updates", updates, applied))
            self.figures.statuses = dict(Counter(r.status for r in ledger).most_common())
            self.figures.comparisons = comparisons
        finally:
            for db in (seg, msg, kpi):
                await db.dispose()

        by_event: dict[str, CustomerUpdate] = {}
        for u in updates.values():
            by_event[u.event_id] = u
            for t in u.triggering_events:
                by_event[t.event_id] = u
        if self.options.poison:
            groups: dict[str, list[str]] = {}
            for group, topics in GROUPS.values():
                for name in topics:
                    groups.setdefault(c.topic(name), []).append(group)
            dlq = await poison.check(c.bootstrap, self.placed, groups)
            dlq.replays = [out for code, out in self.replays if code == 0]
            dlq.replay_failures = [f"dlq replay exit {code}: {out}" for code, out in self.replays if code]
            dlq.applied_in = [w for w in poison.APPLIED_IN if found.get(w)]
            self.figures.dlq = dlq
        self.figures.delivery = check_delivery(
            ledger,
            _calls(c.call_log),
            _outbox_ids(c.outbox_dir, ledger),
            list(replayed),
            by_event,
            states,
            decided_order=decided_order,
        )


async def _ids(session: Any, table: Any) -> list[str]:
    return list((await session.execute(select(table.c.event_id))).scalars())


def _calls(path: Path) -> list[Call]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text("utf-8").splitlines():
        raw = json.loads(line)
        out.append(Call(raw["message_id"], Channel(raw["channel"]), datetime.fromisoformat(raw["called_at"])))
    return out


def _outbox_ids(directory: Path, ledger: Sequence[Ledger]) -> list[str]:
    """Ledger ids that have a file in the sandbox outbox (names end in ``_<safe id>``)."""
    if not directory.is_dir():
        return []
    stems = {p.stem for p in directory.iterdir() if p.suffix in {".eml", ".json"}}
    suffixes = {s.rsplit("_", 1)[-1] for s in stems}
    return [m.message_id for m in ledger if safe_name(m.message_id) in suffixes]
