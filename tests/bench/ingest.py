"""Ingest throughput: single events and batches of 100, against two baselines of the same run.

Baselines: a bare FastAPI endpoint that only validates the same bodies with ingest's own
``validate_body`` (``tests/bench/bare_app.py``), and aiokafka ``send_batch`` alone
(``tests/bench/kafka_baseline.py``). Targets (from the issue): single-event ingest ≥ 0.65× the
bare endpoint; batched ingest ≥ 10× single-event ingest.

Ingest and the bare endpoint run as separate uvicorn processes with the same flags; the load
comes from ``tests/bench/loadgen.py`` in a process of its own. Ingest's rate limiter is off
(``RETAIN_INGEST_RATE_LIMIT_PER_S=0``): this measures throughput, not the limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx

from shared.auth import create_key
from shared.topics import all_topic_names, ensure_topics
from tests.bench.context import BenchContext, Options
from tests.bench.infra import BENCH_VAR, HOST, Server, free_port, running, say, uvicorn_argv
from tests.bench.kafka_baseline import SendBatchResult, run_send_batch
from tests.bench.loadgen import LoadResult, LoadSpec, run_load
from tests.bench.payloads import event
from tests.bench.profiling import summarize
from tests.bench.report import Row, Section, table

BATCH = 100
SINGLE_TARGET = 0.65  # single-event ingest / bare endpoint
BATCH_TARGET = 10.0  # batched ingest / single-event ingest

INGEST_APP = "services.ingest.app:create_app"
BARE_APP = "tests.bench.bare_app:create_app"


@dataclass
class Measured:
    """One measurement repeated over the rounds; the median round represents it."""

    name: str
    rounds: list[LoadResult] = field(default_factory=list)

    @property
    def median(self) -> LoadResult:
        ordered = sorted(self.rounds, key=lambda r: r.events_per_s)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def events_per_s(self) -> float:
        return statistics.median(r.events_per_s for r in self.rounds)

    @property
    def spread(self) -> str:
        values = [r.events_per_s for r in self.rounds]
        return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else ""

    @property
    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.rounds:
            total.update(r.errors)
        return dict(total)


def _pool(options: Options, batch_size: int) -> int:
    """Distinct requests to pre-build: enough that ids never repeat within a measurement (a
    batch of 100 reached 73,000 events/s, and 7 s of it ran through 5,000 bodies)."""
    scale = max(1.0, (options.warmup + options.seconds) / 7.0)
    return int((200_000 if batch_size == 1 else 8_000) * scale)


def _check(server: Server, key: str | None) -> None:
    """One single event and one small batch must get 202 before anything is timed."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    probe = uuid.uuid4().hex[:8]
    bodies: list[object] = [event(f"check-{probe}", 0), [event(f"check-{probe}", n) for n in range(1, 4)]]
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        for body in bodies:
            response = client.post("/v1/events", json=body, headers=headers)
            if response.status_code != 202:
                raise RuntimeError(
                    f"{server.name} answered {response.status_code} to a valid request: {response.text}\n"
                    f"{server.log_tail()}"
                )


def _load(
    ctx: BenchContext,
    label: str,
    server: Server,
    key: str | None,
    batch_size: int,
    *,
    profile_pid: int | None = None,
) -> LoadResult:
    options = ctx.options
    watch = {"server": server.pid}
    kafka = ctx.kafka()
    if kafka.pid is not None:
        watch["kafka"] = kafka.pid
    spec = LoadSpec(
        host=HOST,
        port=server.port,
        path="/v1/events",
        api_key=key,
        batch_size=batch_size,
        pool=_pool(options, batch_size),
        concurrency=options.concurrency,
        warmup_s=options.warmup,
        seconds=options.seconds,
        watch_pids=watch,
        profile_pid=profile_pid,
    )
    say(f"measuring {label}")
    result = run_load(spec)
    say(
        f"  {result.events_per_s:,.0f} events/s ({result.requests_per_s:,.0f} req/s), "
        f"{result.error_count} errors, loadgen CPU {result.loadgen_cpu:.0%}, "
        f"server CPU {result.watched_cpu.get('server', 0):.0%}"
    )
    return result


def _cpu(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _per_event(cpu: float | None, events_per_s: float) -> str:
    """CPU microseconds per event: steadier than events/s when the machine is shared."""
    return "" if cpu is None or events_per_s <= 0 else f"{cpu / events_per_s * 1e6:,.0f}"


def _details(measured: list[Measured], sends: list[SendBatchResult], rounds: int) -> list[str]:
    rows = []
    for m in measured:
        r = m.median
        rows.append(
            [
                m.name,
                f"{m.events_per_s:,.0f}",
                m.spread,
                f"{r.requests_per_s:,.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(m.errors.items())) or "0",
                _cpu(r.loadgen_cpu),
                _cpu(r.watched_cpu.get("server")),
                _per_event(r.watched_cpu.get("server"), r.events_per_s),
                _cpu(r.watched_cpu.get("kafka")),
            ]
        )
    send = sorted(sends, key=lambda s: s.events_per_s)[(len(sends) - 1) // 2]
    values = [s.events_per_s for s in sends]
    rows.append(
        [
            f"aiokafka send_batch alone ({BATCH}/batch)",
            f"{statistics.median(values):,.0f}",
            f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else "",
            "",
            "",
            "",
            # Not counted: a send that fails raises in its task and aborts the bench.
            "n/a (a failed send aborts the run)",
            "",
            _cpu(send.own_cpu) + " (producer)",
            _per_event(send.own_cpu, send.events_per_s) + " (producer)",
            _cpu(send.watched_cpu.get("kafka")),
        ]
    )
    lines = [
        f"Details: median of {rounds} round(s) and the range over them; latency and CPU are the median"
        " round's (CPU: seconds of CPU per second of window, 100% = one core of the "
        f"{os.cpu_count()}; µs/event: the server's CPU time per accepted event).",
        "",
    ]
    lines += table(
        [
            "measurement",
            "events/s",
            "range",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "loadgen CPU",
            "server CPU",
            "server CPU µs/event",
            "kafka CPU",
        ],
        rows,
        align="lrrrrrlrrrr",
    )
    return lines


def _profile(ctx: BenchContext, env: dict[str, str], key: str, batch_size: int) -> list[str]:
    """Load of ``batch_size`` events per request against ingest with cProfile on for the timed
    window only."""
    what = "single events" if batch_size == 1 else f"batches of {batch_size}"
    prof = BENCH_VAR / ("ingest-single.prof" if batch_size == 1 else f"ingest-batch-{batch_size}.prof")
    prof.unlink(missing_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "tests.bench.profiled_server", INGEST_APP, str(port), str(prof)]
    server = Server("ingest-profiled", argv, env, port)
    with running(server, ("/healthz", "/readyz")):
        _check(server, key)
        result = _load(ctx, f"ingest under cProfile, {what}", server, key, batch_size, profile_pid=server.pid)
        # The server writes its dump on the way out: wait until the file exists and has
        # stopped growing, rather than for a guessed while.
        deadline = time.monotonic() + 30.0
        sizes = [-2, -1]
        while time.monotonic() < deadline and (sizes[-1] <= 0 or sizes[-1] != sizes[-2]):
            time.sleep(0.1)
            sizes.append(prof.stat().st_size if prof.exists() else -1)
    lines = [
        f"### Profile of ingest, {what} (cProfile over the timed window; `var/bench/{prof.name}`)",
        "",
        f"Under the profiler ingest did {result.events_per_s:,.0f} events/s "
        f"(server CPU {_cpu(result.watched_cpu.get('server'))}); not comparable with the table.",
        "",
    ]
    if not prof.exists():
        return [*lines, f"(no profile written; see {server.log_path})"]
    return lines + summarize(prof)


def run(ctx: BenchContext) -> Section:
    options = ctx.options
    kafka = ctx.kafka()
    prefix = f"bench{uuid.uuid4().hex[:8]}.retain."
    asyncio.run(ensure_topics(kafka.bootstrap, all_topic_names(prefix), options.partitions))
    BENCH_VAR.mkdir(parents=True, exist_ok=True)
    keys_file = BENCH_VAR / f"api_keys-{os.getpid()}.json"
    ctx.stack.callback(keys_file.unlink, missing_ok=True)
    _, key = create_key(keys_file, ["events:write"], "bench")
    env = {
        "RETAIN_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "RETAIN_TOPIC_PREFIX": prefix,
        "RETAIN_PARTITIONS": str(options.partitions),
        "RETAIN_API_KEYS_FILE": str(keys_file),
        "RETAIN_INGEST_RATE_LIMIT_PER_S": "0",
        "RETAIN_LOG_LEVEL": "WARNING",
    }
    bare_port, ingest_port = free_port(), free_port()
    bare = Server("bare", uvicorn_argv(BARE_APP, bare_port), env, bare_port)
    ingest = Server("ingest", uvicorn_argv(INGEST_APP, ingest_port), env, ingest_port)

    bare_single = Measured("bare endpoint, single event")
    ingest_single = Measured("ingest, single event")
    bare_batch = Measured(f"bare endpoint, batch of {BATCH}")
    ingest_batch = Measured(f"ingest, batch of {BATCH}")
    plan: list[tuple[Measured, Server, str | None, int]] = [
        (bare_single, bare, None, 1),
        (ingest_single, ingest, key, 1),
        (bare_batch, bare, None, BATCH),
        (ingest_batch, ingest, key, BATCH),
    ]
    measured = [m for m, *_ in plan]
    sends: list[SendBatchResult] = []
    say(
        f"{options.rounds} round(s) of: {', '.join(m.name for m in measured)}, aiokafka send_batch; "
        f"each {options.warmup:g}s warm-up + {options.seconds:g}s, {options.concurrency} connections"
    )
    with contextlib.ExitStack() as servers:
        servers.enter_context(running(bare))
        servers.enter_context(running(ingest, ("/healthz", "/readyz")))
        _check(bare, None)
        _check(ingest, key)
        for n in range(1, options.rounds + 1):
            # Baseline and subject alternate, so a slow patch of the machine hits both alike.
            for target, server, api_key, batch_size in plan:
                label = f"{target.name} (round {n}/{options.rounds})"
                target.rounds.append(_load(ctx, label, server, api_key, batch_size))
            say(f"measuring aiokafka send_batch alone (round {n}/{options.rounds})")
            send = run_send_batch(
                kafka.bootstrap,
                prefix,
                partitions=options.partitions,
                batch_size=BATCH,
                warmup_s=options.warmup,
                seconds=options.seconds,
                watch_pids={"kafka": kafka.pid} if kafka.pid is not None else {},
            )
            say(f"  {send.events_per_s:,.0f} events/s, producer CPU {send.own_cpu:.0%}")
            sends.append(send)

    single = ingest_single.events_per_s
    batched = ingest_batch.events_per_s
    send_rate = statistics.median(s.events_per_s for s in sends)

    def ratio(value: float, base: float) -> float:
        return value / base if base > 0 else 0.0

    # A ratio with a target is the median over rounds of the round's ratio: a round's two
    # measurements are seconds apart, so a slow patch of the machine that spans a round hits
    # both (as in the kpi and end-to-end sections); a ratio of medians would pair figures from
    # different rounds. The same per-round ratios are listed in the details.
    compared = ((ingest_single, bare_single), (ingest_batch, ingest_single))
    per_round = {
        subject.name: [
            ratio(s.events_per_s, b.events_per_s) for s, b in zip(subject.rounds, base.rounds, strict=True)
        ]
        for subject, base in compared
    }

    section = Section("ingest", "Ingest: POST /v1/events")
    section.rows = [
        Row(bare_single.name + " (baseline)", bare_single.events_per_s),
        Row(bare_batch.name + " (baseline)", bare_batch.events_per_s),
        Row(f"aiokafka send_batch alone, {BATCH}/batch (baseline)", send_rate),
        Row(
            ingest_single.name,
            single,
            statistics.median(per_round[ingest_single.name]),
            "bare endpoint, single event",
            SINGLE_TARGET,
        ),
        Row(
            ingest_batch.name,
            batched,
            statistics.median(per_round[ingest_batch.name]),
            "ingest, single event",
            BATCH_TARGET,
        ),
        Row(
            ingest_batch.name,
            batched,
            ratio(batched, bare_batch.events_per_s),
            f"bare endpoint, batch of {BATCH}",
        ),
        Row(ingest_batch.name, batched, ratio(batched, send_rate), "aiokafka send_batch alone"),
    ]
    section.details = _details(measured, sends, options.rounds)
    for subject, base in compared:
        listed = ", ".join(f"{r:.2f}×" for r in per_round[subject.name])
        section.details.append(f"- {subject.name} / {base.name}, per round: {listed}")
    section.notes = [
        "Ingest ran with its rate limiter off (RETAIN_INGEST_RATE_LIMIT_PER_S=0): the bench measures "
        "throughput, not the limiter.",
        "A 202 from ingest means the broker acknowledged every event of the request (acks=all, idempotent "
        "producer, lz4); the bare endpoint answers 202 after validation alone, by ingest's own "
        "validate_body (for these bodies, which carry their ids: pydantic's JSON parser straight from "
        "the bytes), without ingest's check of the events' times.",
        f"Every request carries events with ids never sent before (pools of {_pool(options, 1):,} single "
        f"and {_pool(options, BATCH):,} batch bodies), so ingest's dedupe window never answers instead "
        "of producing. Event types take turns (purchase, support, profile, cancellation), customers are "
        f"spread over 10,000 ids, topics have {options.partitions} partitions.",
        f"Load: {options.concurrency} keep-alive HTTP/1.1 connections from a separate process "
        f"(tests/bench/loadgen.py), {options.warmup:g} s warm-up then {options.seconds:g} s counted; only "
        f"202s count. Each measurement ran {options.rounds} time(s), interleaved; the table shows medians "
        "of events/s; a ratio with a target is the median of the rounds' ratios (each round's two "
        "figures measured seconds apart), the others ratios of medians.",
        "send_batch baseline: one task per topic-partition, each sending groups of "
        f"{BATCH} pre-encoded events with create_batch()/send_batch() (a group spans several batches "
        "when it exceeds the producer's max_batch_size) and waiting for the acks.",
    ]
    wrapped = [m.name for m in measured if m.name.startswith("ingest") and any(r.wrapped for r in m.rounds)]
    if wrapped:
        section.notes.append(
            f"WARNING: the request pool ran out in {', '.join(wrapped)}; repeated ids were answered "
            "by the dedupe window (raise the pool or shorten --seconds)."
        )
    busy = [m.name for m in measured if any(r.loadgen_cpu > 0.9 for r in m.rounds)]
    if busy:
        section.notes.append(
            f"WARNING: the load generator used more than 90% of a core in {', '.join(busy)}: it may be "
            "what limits those numbers."
        )
    if options.profile:
        section.appendix = [*_profile(ctx, env, key, 1), "", *_profile(ctx, env, key, BATCH)]
    return section
