"""End-to-end latency: from ingest's 202 to the messenger's decision, against an echo.

The pipeline runs as under ``make run`` — ingest's API under uvicorn, the segmenter's and the
messenger's consumers as processes of their own, on SQLite files under var/bench/ — on the
bench's broker. Each customer is new and sends one profile event (address, consents), which
the segmenter turns into a ``customer_update`` and the messenger into a welcome decision
(queued, held for quiet hours, holdout...: every outcome is published on retain.messages).
The latency of a customer is from ingest's 202 for its event to the arrival of its first
message event, read by a consumer in this process (one clock).

1. Maximum sustained rate. A burst of customers sent in batches as fast as ingest takes them
   gives an upper bound (customers decided per second, from the first send to the last
   decision); a burst is decided in batches of hundreds, cheaper per customer than the few
   that paced single events make, so the bound is not a rate the pipeline sustains. Then
   paced probes (as in step 2, a few seconds each) bisect between 0 and that bound: a rate
   is sustained when the latency does not grow over the probe, nothing is missing and no
   send failed (``keeps_up``): a backlog that grows shows as the later sends waiting longer
   than the first ones. Each probe starts once the machine is idle (the last probe's backlog
   worked off) with ``WARM_S`` of untimed sends, as the rounds do.
2. At half the highest sustained rate, single events sent at even intervals (an open loop: a
   slow answer does not slow the sending), for the measured window; p50/p99 of the latencies.
   The paced sends come from a separate process (``tests/bench/pacer.py``); this one only
   reads, and both stamp times on the system-wide monotonic clock. Each run (here and in
   step 3) starts with ``WARM_S`` of sends at the same rate that are not timed: the first
   second of a run is slower than the rest (the echo's p99 over it was 28-200 ms against
   6-14 ms after it).
3. The baseline at the same rate and for as long: a bare produce → consume → produce echo
   through the same broker (``tests/bench/echo.py``); its latency is from the producer's
   acknowledgement to the echoed record's arrival. Target (issue 9): p99 ≤ 10× the echo's.

Steps 2 and 3 alternate for ``--rounds`` rounds (fresh customers and records each); the ratio
reported is the median of the rounds' ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.auth import create_key
from shared.collector import settle_collector
from shared.config import REPO_ROOT, CommonSettings
from shared.topics import all_topic_names, ensure_topics
from tests.bench.context import BenchContext
from tests.bench.infra import (
    BENCH_VAR,
    Process,
    Server,
    free_port,
    machine_busy_seconds,
    running,
    say,
    uvicorn_argv,
)
from tests.bench.pacer import profile_event
from tests.bench.report import Row, Section, table

TARGET = 10.0  # end-to-end p99 ≤ 10× the echo's p99
BURST = 2_000  # customers in the maximum-rate burst (× --scale)
BURST_BATCH = 100  # events per request in the burst
WARM_S = 1.0  # seconds of untimed sends at the start of each measured run
PROBES = 5  # paced probes bisecting for the maximum sustained rate
PROBE_S = 6.0  # seconds of sends per probe: the longer, the more a backlog outgrows the swings of batching
# A probe kept up unless its last quarter of sends waited this much longer (median) than its
# first quarter: at 10% over capacity, a 6 s probe's backlog adds 600 ms; noise adds tens.
GROWTH_MS = 100.0
# Each measured run waits for the machine to be this idle (cores busy, all processes) before it
# starts, for at most QUIET_LIMIT_S; whether it got there is reported with the run.
QUIET_BELOW = 0.3
QUIET_LIMIT_S = 15.0


@contextlib.contextmanager
def started(workers: Sequence[Process]) -> Iterator[None]:
    try:
        for w in workers:
            say(f"starting {w.name}")
            w.start()
        yield
    finally:
        for w in workers:
            w.stop()


class Sampler:
    """py-spy sampling a worker (``--profile``): a low-overhead look at where a stage's time
    goes, with no change to the process itself."""

    def __init__(self, worker: Process, seconds: float) -> None:
        self.worker = worker
        self.path = BENCH_VAR / f"{worker.name}.pyspy.txt"
        argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(worker.pid)]
        argv += ["--duration", str(max(1, round(seconds))), "--rate", "100", "--format", "raw"]
        argv += ["--output", str(self.path), "--nonblocking"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def summary(self, top: int = 12) -> list[str]:
        self._proc.wait(60)
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        total = 0
        try:
            lines = self.path.read_text("utf-8").splitlines()
        except OSError:
            return [f"(no py-spy samples for {self.worker.name})"]
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                if "(services/" in frame or "(shared/" in frame:
                    inclusive[frame] += n
        if total == 0:
            return [f"(no py-spy samples for {self.worker.name})"]
        rows = [[f"{100 * c / total:.1f}%", "inclusive", f"`{f}`"] for f, c in inclusive.most_common(top)]
        rows += [[f"{100 * c / total:.1f}%", "self", f"`{f}`"] for f, c in own.most_common(top // 2)]
        return [
            f"**{self.worker.name}** ({total} samples at 100/s, idle included):",
            "",
            *table(["share", "kind", "frame"], rows, align="rll"),
            "",
        ]


@dataclass(frozen=True)
class Latencies:
    name: str
    rate: float  # offered, per second
    values_ms: list[float]
    missing: int  # acknowledged, but never seen at the other end (within the wait)
    errors: int  # sends that failed (not acknowledged)

    def quantile(self, q: float) -> float:
        return _quantile(self.values_ms, q)

    @property
    def growth_ms(self) -> float:
        """Median latency of the last quarter of sends less that of the first (in send order)."""
        quarter = len(self.values_ms) // 4
        if quarter == 0:
            return 0.0
        return _quantile(self.values_ms[-quarter:], 0.5) - _quantile(self.values_ms[:quarter], 0.5)

    @property
    def keeps_up(self) -> bool:
        return not self.missing and not self.errors and self.growth_ms <= GROWTH_MS


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Arrivals:
    """Reads a topic from its current end; the first arrival time of each awaited key."""

    def __init__(self, bootstrap: str, topic: str, key_of: Any) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._key_of = key_of
        self.seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Arrivals:
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False)
        await consumer.start()
        partitions = consumer.partitions_for_topic(self._topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self._topic) or set()
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.monotonic()  # the pacer process stamps acknowledgements on this clock
            for records in batch.values():
                for r in records:
                    key = self._key_of(r)
                    if key is not None and key not in self.seen:
                        self.seen[key] = now

    async def wait_for(self, keys: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(k in self.seen for k in keys):
                return
            assert self._task is not None
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


def _key(record: Any) -> str | None:
    # Every topic is keyed by customer_id (ARCHITECTURE.md): no need to decode the value.
    return record.key.decode() if record.key else None


def _profile(run: str, n: int) -> dict[str, Any]:
    return profile_event(f"e2e-{run}-{n}")


async def _burst(base_url: str, key: str, arrivals: Arrivals, run: str, count: int) -> float:
    """Customers decided per second when sent as fast as ingest takes them."""
    headers = {"Authorization": f"Bearer {key}"}
    customers = [f"e2e-{run}-{n}" for n in range(count)]
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60.0) as client:
        queue = list(range(0, count, BURST_BATCH))

        async def sender() -> None:
            while queue:
                start = queue.pop()
                body = [_profile(run, n) for n in range(start, min(count, start + BURST_BATCH))]
                response = await client.post("/v1/events", json=body)
                response.raise_for_status()

        await asyncio.gather(*(sender() for _ in range(4)))
    await arrivals.wait_for(customers, timeout_s=300.0)
    decided = [arrivals.seen[c] for c in customers if c in arrivals.seen]
    if len(decided) < count:
        raise RuntimeError(f"only {len(decided)} of {count} customers were decided within 300 s")
    return count / (max(decided) - started)


async def _paced(
    name: str,
    rate: float,
    spec: dict[str, Any],
    arrivals: Arrivals,
    keys: Sequence[str],
    stage: tuple[str, Arrivals] | None = None,
    warm: Sequence[str] = (),
) -> list[Latencies]:
    """Have the pacer process send ``keys`` at ``rate`` per second (an open loop: a slow answer
    does not slow the sending), and time each one's arrival from its acknowledgement (and,
    given a ``stage``, its arrival at that intermediate topic too). ``warm`` go first, in the
    same run at the same rate, and are not timed."""
    # Arrivals are stamped in this process: a full collection during a run (57-254 ms seen
    # during the probes) would delay the stamps; everything so far is long-lived anyway.
    settle_collector()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.pacer",
        stdin=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    output = BENCH_VAR / f"pacer-{uuid.uuid4().hex[:8]}.json"
    sent = [*warm, *keys]
    await proc.communicate(orjson.dumps({**spec, "rate": rate, "keys": sent, "output": str(output)}))
    if proc.returncode != 0:
        raise RuntimeError(f"the pacer exited with {proc.returncode}")
    result = orjson.loads(output.read_bytes())
    output.unlink()
    acked: dict[str, float] = result["acked"]
    errors = int(result["errors"])
    for error in result["first_errors"]:
        say(f"e2e: {name}: a send failed: {error}")
    await arrivals.wait_for([k for k in sent if k in acked], timeout_s=60.0)

    def measured(label: str, seen: dict[str, float]) -> Latencies:
        timed = [k for k in keys if k in acked]
        values = [(seen[k] - acked[k]) * 1000 for k in timed if k in seen]
        return Latencies(label, rate, values, missing=len(timed) - len(values), errors=errors)

    out_: list[Latencies] = [measured(name, arrivals.seen)]
    if stage is not None:
        out_.append(measured(stage[0], stage[1].seen))
    return out_


def run(ctx: BenchContext) -> Section:
    options = ctx.options
    kafka = ctx.kafka()
    run_id = uuid.uuid4().hex[:8]
    prefix = f"e2e{run_id}.retain."
    echo_in, echo_out = f"{prefix}echo.in", f"{prefix}echo.out"
    asyncio.run(
        ensure_topics(
            kafka.bootstrap, [*all_topic_names(prefix), echo_in, echo_out], partitions=options.partitions
        )
    )
    work = BENCH_VAR / f"e2e-{run_id}"
    work.mkdir(parents=True, exist_ok=True)
    # The services' databases: 100-250 MB a run, of no use once it is measured.
    ctx.stack.callback(shutil.rmtree, work, ignore_errors=True)
    keys_file = work / "api_keys.json"
    _key, plain = create_key(keys_file, ["events:write"], "bench")
    env = {
        "RETAIN_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "RETAIN_TOPIC_PREFIX": prefix,
        "RETAIN_PARTITIONS": str(options.partitions),
        "RETAIN_VAR_DIR": str(work),
        "RETAIN_API_KEYS_FILE": str(keys_file),
        "RETAIN_INGEST_RATE_LIMIT_PER_S": "0",
        "RETAIN_LOG_LEVEL": "WARNING",
        "RETAIN_METRICS_PORT": "0",
    }
    port = free_port()
    ingest = Server("e2e-ingest", uvicorn_argv("services.ingest.app:create_app", port), env, port)
    workers = [
        Process(f"e2e-{name}", [sys.executable, "-m", f"services.{name}.consumer"], env)
        for name in ("segmenter", "messenger")
    ]
    # The workers' environment: the echo reads its commit interval from the same settings.
    echo = Process(
        "e2e-echo", [sys.executable, "-m", "tests.bench.echo", kafka.bootstrap, echo_in, echo_out], env
    )
    with running(ingest), started([*workers, echo]):
        result = asyncio.run(_measure(ctx, ingest.url, plain, prefix, run_id, echo_in, echo_out, workers))
    return _section(*result)


async def _measure(
    ctx: BenchContext,
    url: str,
    key: str,
    prefix: str,
    run_id: str,
    echo_in: str,
    echo_out: str,
    workers: Sequence[Process],
) -> tuple[Rates, list[Round], list[str]]:
    options = ctx.options
    bootstrap = ctx.kafka().bootstrap
    echo = {"mode": "kafka", "bootstrap": bootstrap, "topic": echo_in}
    through_ingest = {"mode": "http", "url": url, "api_key": key}
    rounds: list[Round] = []
    samplers: list[Sampler] = []
    async with (
        Arrivals(bootstrap, f"{prefix}messages", _key) as decisions,
        Arrivals(bootstrap, f"{prefix}segments", _key) as updates,
        Arrivals(bootstrap, echo_out, _key) as echoed,
    ):
        say("e2e: waiting for the consumers to join and decide a first customer")
        await _burst(url, key, decisions, f"{run_id}w", 1)
        for w in workers:
            w.check()
        count = max(200, int(BURST * options.scale))
        say(f"e2e: maximum rate, a burst of {count} customers")
        burst_rate = await _burst(url, key, decisions, f"{run_id}b", count)
        say(f"  {burst_rate:,.0f} customers/s; paced probes below it for the sustained rate")
        max_rate, probes = await _sustained(through_ingest, decisions, run_id, burst_rate)
        rate = max_rate / 2
        seconds = options.seconds * 3
        n = max(50, int(rate * seconds))
        # Each measured run begins with a second of sends at its rate that is not timed. The
        # first second of an echo run had a p99 of 28-200 ms against 6-14 ms for the rest of
        # the run (and the echo once warmed up by 20 records only before round 1 had a p99 of
        # 25-71 ms in that round, 5-12 ms in the others), which made the ratio small.
        warm = max(50, int(rate * WARM_S))
        for r in range(1, options.rounds + 1):
            pipeline_start = await _quiet()
            say(f"e2e: round {r}/{options.rounds}: {n} customers at {rate:,.0f}/s through the pipeline")
            if options.profile and r == 1:
                samplers = [Sampler(w, seconds) for w in workers]
            pipeline, first_hop = await _paced(
                "ingest 202 → messenger decision",
                rate,
                through_ingest,
                decisions,
                [f"e2e-{run_id}p{r}-{i}" for i in range(n)],
                stage=("ingest 202 → segmenter's customer_update (first hop)", updates),
                warm=[f"e2e-{run_id}p{r}w-{i}" for i in range(warm)],
            )
            echo_start = await _quiet()
            say(f"e2e: round {r}/{options.rounds}: the echo baseline, {n} records at {rate:,.0f}/s")
            [baseline] = await _paced(
                "produce → consume → produce echo",
                rate,
                echo,
                echoed,
                [f"echo-{run_id}-{r}-{i}" for i in range(n)],
                warm=[f"echo-{run_id}-{r}w-{i}" for i in range(warm)],
            )
            rounds.append(Round(pipeline, first_hop, baseline, pipeline_start, echo_start))
            p99, echo_p99 = pipeline.quantile(0.99), baseline.quantile(0.99)
            say(f"  p99 {p99:,.1f} ms against the echo's {echo_p99:,.1f} ms: {rounds[-1].ratio:,.2f}×")
    profile = [line for sampler in samplers for line in sampler.summary()]
    return Rates(burst_rate, max_rate, probes), rounds, profile


@dataclass(frozen=True)
class Quiet:
    """How idle the machine was when a measured run started (``_quiet``)."""

    idle: bool  # under QUIET_BELOW of a core busy; False: the wait gave up after QUIET_LIMIT_S
    busy: float  # cores busy over the last window before the start

    def __str__(self) -> str:
        return f"{'yes' if self.idle else 'no'} ({self.busy:.2f})"


async def _quiet(
    *, window_s: float = 0.5, below: float = QUIET_BELOW, limit_s: float = QUIET_LIMIT_S
) -> Quiet:
    """Wait until the machine is nearly idle: under ``below`` of a core busy, all processes
    together, over ``window_s`` (at most ``limit_s``, then the run starts anyway, and the
    report says so). What a paced run leaves behind (the broker's and the services' work after
    the last record) would otherwise run during the next measurement. (It did not remove the
    slow start of the echo's runs; the untimed warm-up at the start of each run does.)"""
    started = time.monotonic()
    busy = float("inf")
    while time.monotonic() - started < limit_s:
        before = machine_busy_seconds() or 0.0
        await asyncio.sleep(window_s)
        busy = ((machine_busy_seconds() or 0.0) - before) / window_s
        if busy < below:
            break
    idle = busy < below
    state = "idle" if idle else "still busy"
    say(f"  machine {state} ({busy:.2f} of a core busy) after {time.monotonic() - started:.1f} s")
    return Quiet(idle, busy)


@dataclass(frozen=True)
class Rates:
    burst: float  # customers decided/s in a burst: the upper bound
    sustained: float  # the highest paced rate that kept up
    probes: list[Latencies]  # in the order run


async def _sustained(
    spec: dict[str, Any], decisions: Arrivals, run_id: str, upper: float
) -> tuple[float, list[Latencies]]:
    """The highest paced rate (of ``PROBES``, bisecting below ``upper``) that kept up."""
    lo, hi = 0.0, upper
    probes: list[Latencies] = []
    for i in range(PROBES):
        rate = upper if i == 0 else (lo + hi) / 2
        # After the last probe's backlog is worked off (probes ran back to back: the next one's
        # first quarter waited behind it, so its latency 'fell' and a rate over capacity passed).
        await _quiet()
        # The same untimed warm-up as a measured round: a probe's first quarter is what its
        # growth is judged against, and a cold start there (slow first sends) hid a backlog
        # that grew: the first probe, at the burst's rate, 'kept up' with a p50 of 242 ms.
        [probe] = await _paced(
            "probe",
            rate,
            spec,
            decisions,
            [f"e2e-{run_id}s{i}-{n}" for n in range(max(50, int(rate * PROBE_S)))],
            warm=[f"e2e-{run_id}s{i}w-{n}" for n in range(max(50, int(rate * WARM_S)))],
        )
        probes.append(probe)
        say(
            f"  probe at {rate:,.0f}/s: p50 {probe.quantile(0.5):,.1f} ms, latency grew"
            f" {probe.growth_ms:,.0f} ms over it: {'kept up' if probe.keeps_up else 'fell behind'}"
        )
        if probe.keeps_up:
            lo = rate
            if i == 0:
                break  # the bound itself is sustained
        else:
            hi = rate
    if lo == 0.0:
        raise RuntimeError(f"the pipeline kept up with none of the probes down to {hi:,.0f}/s")
    return lo, probes


@dataclass(frozen=True)
class Round:
    """One paced run through the pipeline and the echo's run right after it."""

    pipeline: Latencies
    first_hop: Latencies
    echo: Latencies
    pipeline_start: Quiet  # the machine when the pipeline's run started
    echo_start: Quiet  # and when the echo's did

    @property
    def ratio(self) -> float:
        echo_p99 = self.echo.quantile(0.99)
        return self.pipeline.quantile(0.99) / echo_p99 if echo_p99 > 0 else float("inf")


def _section(rates: Rates, rounds: list[Round], profile: list[str]) -> Section:
    section = Section("e2e", "End to end: ingest's 202 → the messenger's decision")
    ratio = statistics.median(r.ratio for r in rounds)
    p99 = statistics.median(r.pipeline.quantile(0.99) for r in rounds)
    echo_p99 = statistics.median(r.echo.quantile(0.99) for r in rounds)
    section.rows = [
        Row("echo p99 latency (baseline), median round", echo_p99, unit="ms"),
        Row(
            "end-to-end p99 latency at half the maximum sustained rate, median round",
            p99,
            ratio=ratio,
            baseline="echo p99 (median of the rounds' ratios)",
            target=TARGET,
            at_most=True,
            unit="ms",
        ),
        Row(
            "maximum sustained rate: paced, the highest that kept up (customers decided/s)",
            rates.sustained,
            unit="/s",
        ),
        Row("a burst of batched requests, for comparison (customers decided/s)", rates.burst, unit="/s"),
    ]
    section.details = table(
        [
            "round",
            "path",
            "offered rate/s",
            "measured",
            "missing",
            "send errors",
            "seen before the ack",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 / echo p99",
            "idle at start (cores busy)",
        ],
        [
            [
                str(i),
                lat.name,
                f"{lat.rate:,.0f}",
                f"{len(lat.values_ms):,}",
                str(lat.missing),
                str(lat.errors),
                str(sum(1 for v in lat.values_ms if v < 0)),
                f"{lat.quantile(0.5):,.1f}",
                f"{lat.quantile(0.99):,.1f}",
                f"{max(lat.values_ms, default=float('nan')):,.1f}",
                f"{r.ratio:,.2f}×" if lat is r.pipeline else "",
                str(r.echo_start if lat is r.echo else r.pipeline_start),
            ]
            for i, r in enumerate(rounds, 1)
            for lat in (r.pipeline, r.first_hop, r.echo)
        ],
        align="rlrrrrrrrrrl",
    )
    probes = table(
        ["probe", "offered rate/s", "measured", "p50 ms", "p99 ms", "latency growth ms", "kept up"],
        [
            [
                str(i),
                f"{p.rate:,.0f}",
                f"{len(p.values_ms):,}",
                f"{p.quantile(0.5):,.1f}",
                f"{p.quantile(0.99):,.1f}",
                f"{p.growth_ms:,.0f}",
                "yes" if p.keeps_up else "no",
            ]
            for i, p in enumerate(rates.probes, 1)
        ],
        align="rrrrrrl",
    )
    section.details += [
        "",
        f"The maximum sustained rate, {rates.sustained:,.0f}/s: paced probes of {PROBE_S:g} s, each"
        f" once the machine is idle and after {WARM_S:g} s of untimed sends, the first at the"
        f" burst's rate ({rates.burst:,.0f}/s), then bisecting. A probe kept up when"
        f" the median latency of its last quarter of sends was at most {GROWTH_MS:g} ms above that"
        " of its first quarter, with nothing missing and no send errors.",
        "",
        *probes,
    ]
    section.notes = [
        "Each customer is new and sends one profile event; its decision is the first message event"
        " for it on retain.messages (welcome: queued, held for quiet hours, holdout... all count).",
        "The pipeline: ingest (uvicorn) → Kafka → segmenter consumer (SQLite, outbox relay after"
        " commit) → Kafka → messenger consumer (SQLite, likewise) → Kafka; two consumer hops and two"
        " database transactions. The echo: one consume → produce hop, no decoding, no database; it"
        " commits its offsets as the services' consumers do, at most once per"
        f" consumer_commit_interval_ms ({CommonSettings().consumer_commit_interval_ms:,} ms) while"
        " busy and at once when a fetch comes back empty.",
        f"Rounds: {len(rounds)}, each a paced run through the pipeline and then the echo at the same"
        " rate for as long, each waiting up to"
        f" {QUIET_LIMIT_S:g} s for the machine to be idle (under {QUIET_BELOW:g} of a core busy;"
        " 'idle at start' says whether it was) and starting with"
        f" {WARM_S:g} s of sends at the rate that are not timed; the"
        " ratio is the median of the rounds' ratios, so one round's hiccup in either (a stall of the"
        " shared machine) does not decide it. Mean of the pipeline's"
        f" latencies: {statistics.fmean([v for r in rounds for v in r.pipeline.values_ms] or [0]):,.1f} ms.",
        "The paced sends come from a process of their own (tests/bench/pacer.py), which stamps each"
        " acknowledgement on the system-wide monotonic clock; this process only reads the topics and"
        " stamps arrivals on the same clock, so neither side's timestamps carry the other's work.",
    ]
    if profile:
        section.appendix = ["### Where the consumers' time goes (py-spy, during the paced run)", "", *profile]
    return section
