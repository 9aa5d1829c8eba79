"""Messenger decisions + sends per second, against a bare client loop in the same run.

Input: N customer updates (5,000 at ``--scale 1``), one per customer, each a purchase that
happened now for a returning customer (``tier_old`` set, so thank_you is the one journey it
starts), with consent for SMS and email, a phone and an email address, locale ``en``,
preferred channel SMS, and a time zone whose wall clock is outside quiet hours for the next
hour (checked with ``services.messenger.quiet``: UTC when it qualifies). Customer ids that
fall in thank_you's holdout are skipped when the updates are built, so every update should
end in one message; caps cannot bite since every message has a customer of its own. What
still ends held, capped or in the holdout is counted and reported.

Measured: ``MessengerService.apply_batch`` over consumer-sized batches (SQLite under
var/bench, a fresh database per round), then ``send_due()`` until nothing is due, with the
outbox relay publishing ``retain.messages`` to the bench's broker as the service does in
production. Decisions + sends per second = N / (decide time + send time). Two targets:

(a) the sandbox outbox (``OutboxProvider``, a fresh directory per run) for every channel;
(b) SMS through ``TwilioProvider`` (the official client on its aiohttp transport) against
    Stoplight Prism validating Twilio's official OpenAPI spec (``tests/support/prism.py``).

Baseline, same run: the same rendered messages (read from the measured run's ledger) sent in
a plain loop with the same concurrency (``messenger_send_concurrency``) straight to the same
target: ``OutboxProvider.send`` into another fresh directory, or ``TwilioProvider.send`` to
the same Prism. No decisions, no database. Target ≥ 0.5× the bare loop.

Both run with the collector as the worker processes run it (``shared.collector.settle_collector``
once started), as in the segmenter and kpi sections.

The service runs without the per-sender rate limiter (as in the service tests): the
default pacing of a long code is 1 message per second, which would measure the limiter.
"""

from __future__ import annotations

import asyncio
import cProfile
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic import SecretStr
from sqlalchemy import func, select

from services.messenger.config import MessengerSettings
from services.messenger.consumer import MIGRATIONS
from services.messenger.decision import in_holdout
from services.messenger.journeys import default_journeys
from services.messenger.providers.base import OutgoingMessage, Provider
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.providers.registry import STATUS_CALLBACK_PATH
from services.messenger.providers.twilio_sms import TwilioProvider
from services.messenger.quiet import QuietHours, is_quiet
from services.messenger.service import MessengerService
from services.messenger.tables import messages
from shared.collector import settle_collector
from shared.db import Database, migrate
from shared.events import (
    Channel,
    ConsentState,
    CustomerUpdate,
    EventType,
    ProfileSnapshot,
    TriggeringEvent,
    UpdateCause,
)
from shared.kafka.consumer import Delivered
from shared.kafka.producer import Producer
from shared.service_main import worker_database
from shared.topics import SEGMENTS, all_topic_names, ensure_topics
from tests.bench.context import BenchContext, Options
from tests.bench.infra import (
    BENCH_VAR,
    Cpu,
    StatementCounter,
    Watch,
    collector_as_settled,
    noise_warning,
    say,
)
from tests.bench.profiling import where_time_goes
from tests.bench.report import Row, Section, table

UPDATES = 5_000
TARGET = 0.5
JOURNEY = "thank_you"
LOCALE = "en"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2  # the shape Twilio's spec requires; Prism checks it
AUTH_TOKEN = "bench-auth-token"
SMS_FROM = "+15005550006"


# --------------------------------------------------------------------------------------
# input


def open_zone(now: datetime, within: timedelta = timedelta(hours=1)) -> str:
    """UTC if its wall clock is outside quiet hours from now on for ``within``, else the fixed
    offset zone nearest to midday that is."""
    quiet = QuietHours()
    candidates = ["UTC", *(f"Etc/GMT{sign}{h}" for h in range(1, 13) for sign in ("-", "+"))]

    def open_for(name: str) -> bool:
        tz = ZoneInfo(name)
        steps = int(within / timedelta(minutes=5)) + 1
        return not any(is_quiet(now + i * timedelta(minutes=5), tz, LOCALE, quiet) for i in range(steps))

    def from_noon(name: str) -> float:
        wall = now.astimezone(ZoneInfo(name))
        return abs(wall.hour + wall.minute / 60 - 13)

    usable = [c for c in candidates if open_for(c)]
    if not usable:
        raise RuntimeError("no time zone is outside quiet hours now (the quiet-hours defaults changed?)")
    return "UTC" if "UTC" in usable else min(usable, key=from_noon)


@dataclass(frozen=True)
class Updates:
    items: list[CustomerUpdate]
    zone: str
    skipped_holdout: int  # customer ids passed over because thank_you would hold them out


def build_updates(n: int, run_id: str, now: datetime, zone: str) -> Updates:
    holdout = next(j.holdout_percent for j in default_journeys() if j.name == JOURNEY)
    items: list[CustomerUpdate] = []
    skipped = 0
    i = 0
    while len(items) < n:
        customer = f"bench-{run_id}-{i:06d}"
        i += 1
        if in_holdout(customer, JOURNEY, holdout):
            skipped += 1
            continue
        k = len(items)
        consent = ConsentState(granted=True, at=now - timedelta(days=30))
        profile = ProfileSnapshot(
            name=f"Dana Levi {k}",
            email=f"dana.{k}@example.com",
            phone=f"+97252{k:07d}",
            locale=LOCALE,
            timezone=zone,
            preferred_channel=Channel.SMS,
            consents={Channel.SMS: consent, Channel.EMAIL: consent},
            lifecycle_stage="active",
            tier="silver",
            orders_count=3,
            total_value=Decimal("900"),
            reporting_currency="ILS",
            last_purchase_at=now,
        )
        items.append(
            CustomerUpdate(
                event_id=f"update-{customer}",
                customer_id=customer,
                occurred_at=now,
                cause=UpdateCause.EVENTS,
                triggering_events=[
                    TriggeringEvent(
                        event_id=f"purchase-{customer}",
                        type=EventType.PURCHASE,
                        occurred_at=now,
                        order_id=f"o-{k}",
                        amount=Decimal("120.00"),
                        currency="ILS",
                    )
                ],
                tier_old="silver",
                tier_new="silver",
                rule_version=1,
                profile=profile,
            )
        )
    return Updates(items, zone, skipped)


# --------------------------------------------------------------------------------------
# the measured service


@dataclass
class Run:
    decide_s: float  # apply_batch over every update
    send_s: float  # send_due() until nothing is due
    statuses: dict[str, int]  # the ledger afterwards
    sent: list[OutgoingMessage]  # what was handed to the provider, rebuilt from the ledger
    cpu: Cpu
    sql: dict[str, tuple[int, int]]  # phase → (SQL statements incl. BEGIN, transactions)

    @property
    def seconds(self) -> float:
        return self.decide_s + self.send_s


@dataclass
class Bare:
    seconds: float
    sent: int
    cpu: Cpu


def _settings(bootstrap: str, prefix: str, partitions: int, url: str, outbox_dir: Path) -> MessengerSettings:
    return MessengerSettings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        partitions=partitions,
        messenger_database_url=url,
        messenger_outbox_dir=str(outbox_dir),
        var_dir=BENCH_VAR,
        # Twilio whole, as a real deployment has it (the bench passes its providers itself).
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=SecretStr("bench-auth-token"),
        twilio_sms_from=SMS_FROM,
        messenger_link_secret=SecretStr("bench-messenger-link-secret"),
        log_level="WARNING",
    )


async def _ledger(db: Database, settings: MessengerSettings) -> tuple[dict[str, int], list[OutgoingMessage]]:
    async with db.sessions() as session:
        counts = await session.execute(select(messages.c.status, func.count()).group_by(messages.c.status))
        statuses = {str(s): int(c) for s, c in counts.all()}
        rows = (await session.execute(select(messages).where(messages.c.status == "sent"))).all()
    senders = {Channel.SMS: SMS_FROM, Channel.EMAIL: settings.email_from, Channel.WHATSAPP: SMS_FROM}
    sent = [
        OutgoingMessage(
            message_id=r.id,
            channel=Channel(r.channel),
            to=r.content["to"],
            from_=senders[Channel(r.channel)],
            text=r.content["text"],
            subject=r.content.get("subject"),
            created_at=r.created_at,
            locale=r.locale or LOCALE,
        )
        for r in rows
    ]
    return statuses, sent


def _providers(target: str, prism_url: str | None, outbox_dir: Path) -> dict[Channel, Provider]:
    """What the service sends through: the outbox for every channel, or Twilio for SMS."""
    outbox = OutboxProvider(outbox_dir)
    providers: dict[Channel, Provider] = dict.fromkeys(Channel, outbox)
    if target == "twilio":
        providers[Channel.SMS] = _twilio(prism_url)
    return providers


def _twilio(prism_url: str | None) -> TwilioProvider:
    if prism_url is None:
        raise RuntimeError("no Prism to send to")
    # The status callback as the registry sets it: Twilio's spec checks its shape too.
    callback = "http://127.0.0.1:8003" + STATUS_CALLBACK_PATH
    return TwilioProvider(ACCOUNT_SID, AUTH_TOKEN, base_url=prism_url, status_callback=callback)


async def _close(providers: Mapping[Channel, Provider]) -> None:
    seen: set[int] = set()
    for provider in providers.values():
        if id(provider) not in seen:
            seen.add(id(provider))
            await provider.close()


async def measured(
    settings: MessengerSettings,
    updates: Sequence[CustomerUpdate],
    target: str,
    prism_url: str | None,
    watch: Watch,
) -> Run:
    db = worker_database(settings.database_url)
    await migrate(db, MIGRATIONS)
    producer = Producer(settings.kafka_bootstrap, client_id="bench-messenger")
    providers = _providers(target, prism_url, Path(settings.outbox_dir))
    service = MessengerService(db, settings, producer, providers)
    topic = settings.topic(SEGMENTS)
    batch = settings.messenger_batch_size
    delivered = [
        Delivered(topic, i % settings.partitions, i, u.customer_id.encode(), u, 0)
        for i, u in enumerate(updates)
    ]
    try:
        await service.ensure_defaults()
        await producer.start()
        settle_collector()  # as the workers run it (shared.service_main.worker)
        counter = StatementCounter(db.engine)
        with Cpu.measure(watch.pids, watch.families) as cpu:
            started = time.perf_counter()
            for i in range(0, len(delivered), batch):
                await service.apply_batch(delivered[i : i + batch])
            decided = time.perf_counter()
            decide_sql = (counter.statements, counter.transactions)
            while await service.send_due():
                pass
            done = time.perf_counter()
        send_sql = (counter.statements - decide_sql[0], counter.transactions - decide_sql[1])
        statuses, sent = await _ledger(db, settings)
        sql = {"decide": decide_sql, "send": send_sql}
        return Run(decided - started, done - decided, statuses, sent, cpu, sql)
    finally:
        await _close(providers)
        await producer.stop()
        await db.dispose()


async def bare(
    target: str,
    prism_url: str | None,
    outbox_dir: Path,
    outgoing: Sequence[OutgoingMessage],
    concurrency: int,
    watch: Watch,
) -> Bare:
    """The same messages straight to the same target, ``concurrency`` at a time."""
    provider: Provider = _twilio(prism_url) if target == "twilio" else OutboxProvider(outbox_dir)
    semaphore = asyncio.Semaphore(concurrency)
    settle_collector()  # as the measured run

    async def one(msg: OutgoingMessage) -> None:
        async with semaphore:
            await provider.send(msg)

    try:
        with Cpu.measure(watch.pids, watch.families) as cpu:
            started = time.perf_counter()
            await asyncio.gather(*(one(m) for m in outgoing))
            elapsed = time.perf_counter() - started
    finally:
        await provider.close()
    return Bare(elapsed, len(outgoing), cpu)


# --------------------------------------------------------------------------------------
# the section

TARGET_NAMES = {
    "outbox": "sandbox outbox",
    "twilio": "Twilio client → Prism",
}


@dataclass
class Target:
    name: str
    runs: list[Run] = field(default_factory=list)
    bares: list[Bare] = field(default_factory=list)
    n: int = 0
    skipped_holdout: int = 0  # customer ids passed over to keep the holdout out of the way

    @property
    def label(self) -> str:
        return TARGET_NAMES[self.name]

    def ratios(self) -> list[float]:
        """Each round's messenger run against the bare loop right after it."""
        pairs = zip(self.runs, self.bares, strict=True)
        return [
            _rate(self.n, r.seconds) / _rate(b.sent, b.seconds) for r, b in pairs if b.seconds and r.seconds
        ]


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}" if len(values) > 1 else ""


def _start_prism(ctx: BenchContext) -> tuple[str | None, int | None, str | None]:
    """Prism on Twilio's spec until the bench ends: (url, pid, or why there is none)."""
    try:
        from tests.support.prism import prism_mock, twilio_spec_for_mock  # noqa: PLC0415

        spec = twilio_spec_for_mock(BENCH_VAR / "prism")
        server = ctx.stack.enter_context(prism_mock(spec, "twilio-bench"))
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        return None, None, f"{type(exc).__name__}: {str(exc)[:300]}"
    say(f"Prism (Twilio spec) on {server.url}")
    return server.url, server.process.pid, None


@collector_as_settled()
def run(ctx: BenchContext) -> Section:
    options = ctx.options
    kafka = ctx.kafka()
    prefix = f"bench{uuid.uuid4().hex[:8]}.retain."
    asyncio.run(ensure_topics(kafka.bootstrap, all_topic_names(prefix), options.partitions))
    n = max(10, round(UPDATES * options.scale))
    tag = uuid.uuid4().hex[:6]
    prism_url, prism_pid, no_prism = _start_prism(ctx)
    watch = Watch(
        {"kafka": kafka.pid} if kafka.pid is not None else {},
        {"prism": prism_pid} if prism_pid is not None else {},
    )
    targets = [Target("outbox", n=n)]
    if prism_url is not None:
        targets.append(Target("twilio", n=n))
    else:
        say(f"messenger: no Prism ({no_prism}); sandbox outbox only")
    zone = "UTC"
    for round_no in range(1, options.rounds + 1):
        for target in targets:
            zone = _one_round(ctx, target, round_no, tag, prefix, prism_url, watch)
    section = Section("messenger", "Messenger: customer updates → decisions → sends")
    for target in targets:
        base = statistics.median(_rate(b.sent, b.seconds) for b in target.bares)
        rate = statistics.median(_rate(target.n, r.seconds) for r in target.runs)
        section.rows += [
            Row(f"bare client loop → {target.label}, same messages (baseline)", base),
            Row(
                f"messenger decisions + sends → {target.label}",
                rate,
                statistics.median(target.ratios()),
                f"bare loop → {target.label}",
                TARGET,
            ),
        ]
    section.details = _details(targets, options.rounds)
    section.notes = _notes(n, zone, targets, options)
    if no_prism is not None:
        section.notes.append(f"Twilio through Prism was not measured: {no_prism}")
    noisy = noise_warning(
        [*(x.cpu for t in targets for x in t.runs), *(x.cpu for t in targets for x in t.bares)]
    )
    if noisy:
        section.notes.append(noisy)
    if options.profile:
        section.appendix = _profile(ctx, n, tag, prefix)
    return section


def _sqlite(name: str) -> tuple[str, list[Path]]:
    path = BENCH_VAR / f"{name}.db"
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    for f in files:
        f.unlink(missing_ok=True)
    return f"sqlite+aiosqlite:///{path}", files


def _one_round(
    ctx: BenchContext,
    target: Target,
    round_no: int,
    tag: str,
    prefix: str,
    prism_url: str | None,
    watch: Watch,
) -> str:
    options = ctx.options
    kafka = ctx.kafka()
    now = datetime.now(UTC)
    zone = open_zone(now)
    updates = build_updates(target.n, f"{tag}{round_no}{target.name}", now, zone)
    target.skipped_holdout = updates.skipped_holdout
    name = f"messenger-{tag}-{round_no}-{target.name}"
    url, files = _sqlite(name)
    outbox_dir, bare_dir = BENCH_VAR / f"{name}-outbox", BENCH_VAR / f"{name}-bare-outbox"
    settings = _settings(kafka.bootstrap, prefix, options.partitions, url, outbox_dir)
    label = f"{target.label} (round {round_no}/{options.rounds})"
    try:
        say(f"messenger: {target.n:,} updates → decisions → sends, {label}")
        result = asyncio.run(measured(settings, updates.items, target.name, prism_url, watch))
        say(
            f"  {_rate(target.n, result.seconds):,.0f}/s (decide {result.decide_s:.1f} s, send "
            f"{result.send_s:.1f} s); ledger {result.statuses}"
        )
        say(f"messenger: bare client loop, {label}")
        concurrency = settings.messenger_send_concurrency
        plain = asyncio.run(bare(target.name, prism_url, bare_dir, result.sent, concurrency, watch))
        say(f"  {_rate(plain.sent, plain.seconds):,.0f}/s ({plain.seconds:.1f} s)")
    finally:
        for f in files:
            f.unlink(missing_ok=True)
        shutil.rmtree(outbox_dir, ignore_errors=True)
        shutil.rmtree(bare_dir, ignore_errors=True)
    target.runs.append(result)
    target.bares.append(plain)
    return zone


def _cpu(cpu: Cpu, key: str) -> str:
    value = {"loop": cpu.loop_thread, "threads": cpu.other_threads, "others": cpu.unaccounted}.get(
        key, cpu.watched.get(key)
    )
    return cpu.share(value)


def _per_message(sql: tuple[int, int], n: int) -> str:
    statements, transactions = sql
    return f"{statements / max(n, 1):.1f} stmts, {transactions / max(n, 1):.2f} txns"


def _details(targets: Sequence[Target], rounds: int) -> list[str]:
    rows = []
    for t in targets:
        order = sorted(range(len(t.runs)), key=lambda i: t.runs[i].seconds)
        i = order[(len(order) - 1) // 2]
        r, b = t.runs[i], t.bares[i]
        statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(r.statuses.items()))
        rows.append(
            [
                f"messenger → {t.label}",
                f"{_rate(t.n, r.seconds):,.0f}",
                _spread([_rate(t.n, x.seconds) for x in t.runs]),
                f"{r.seconds:.1f} s",
                f"{r.decide_s:.1f} s ({_rate(t.n, r.decide_s):,.0f}/s)",
                f"{r.send_s:.1f} s ({_rate(len(r.sent), r.send_s):,.0f}/s)",
                _per_message(r.sql["decide"], t.n),
                _per_message(r.sql["send"], t.n),
                statuses,
                _cpu(r.cpu, "loop"),
                _cpu(r.cpu, "threads"),
                _cpu(r.cpu, "prism"),
                _cpu(r.cpu, "kafka"),
                _cpu(r.cpu, "others"),
                f"{r.cpu.total / t.n * 1e3:.2f}",
                ", ".join(f"{x:.2f}" for x in t.ratios()),
            ]
        )
        rows.append(
            [
                f"bare loop → {t.label}",
                f"{_rate(b.sent, b.seconds):,.0f}",
                _spread([_rate(x.sent, x.seconds) for x in t.bares]),
                f"{b.seconds:.1f} s",
                "",
                f"{b.seconds:.1f} s",
                "",
                "",
                f"sent {b.sent:,}",
                _cpu(b.cpu, "loop"),
                _cpu(b.cpu, "threads"),
                _cpu(b.cpu, "prism"),
                _cpu(b.cpu, "kafka"),
                _cpu(b.cpu, "others"),
                f"{b.cpu.total / max(b.sent, 1) * 1e3:.2f}",
                "",
            ]
        )
    lines = [
        f"The median round of {rounds}, per target, and the bare loop of the same round. CPU: share of "
        "one core over the run (the event loop's thread; this process's other threads, i.e. "
        "aiosqlite's and the outbox's file writes; Prism; the Kafka broker; and other processes on the "
        "machine meanwhile). CPU ms/message adds up this process, Prism and the broker. The ratio in "
        "the table is the median of the rounds' ratios (each messenger run against the bare loop "
        "right after it).",
        "",
    ]
    return lines + table(
        [
            "measurement",
            "messages/s",
            "range",
            "wall",
            "decide (apply_batch)",
            "send (send_due)",
            "SQL per update: decide",
            "SQL per message: send",
            "ledger afterwards",
            "loop thread",
            "other threads",
            "Prism",
            "Kafka",
            "others",
            "CPU ms/message",
            "ratio per round",
        ],
        rows,
        align="lrrrrrrrlrrrrrrl",
    )


def _notes(n: int, zone: str, targets: Sequence[Target], options: Options) -> list[str]:
    unsent = max((t.n - r.statuses.get("sent", 0) for t in targets for r in t.runs), default=0)
    notes = [
        f"{n:,} updates per run, one per customer (purchase now, returning customer, preferred channel "
        f"SMS with consent, locale {LOCALE}, time zone {zone}: outside quiet hours for the next hour). "
        f"Customer ids in the {JOURNEY} holdout were skipped when building the updates "
        f"({targets[0].skipped_holdout:,} of {n + targets[0].skipped_holdout:,} in the last round of "
        f"the {targets[0].label} target; each round's ids differ, and so may the count); the "
        "'ledger afterwards' column shows what the service decided: every message should be 'sent'.",
        "Each run: a fresh SQLite database under var/bench and a fresh outbox directory; apply_batch in "
        "batches of messenger_batch_size, then send_due() (200 due messages per call, "
        "messenger_send_concurrency in flight) until nothing is due. The outbox relay publishes every "
        "decision and send to retain.messages on the bench's broker, as in production. The consumer "
        "loop's own work (getmany, decode, offset commit) is not in this measurement.",
        "Bare loop: the measured run's messages as they were handed to the provider (text and To "
        "from the ledger, From the sender the service is configured with), sent with asyncio.gather "
        "under a semaphore of the same concurrency, to a fresh outbox directory or to the same Prism.",
        "No sender rate limiter (SenderRateLimiter) in either: Twilio pacing of a long code (1/s) would "
        "be measured instead of the messenger.",
        f"Rounds: {options.rounds}; each target's measured run is followed by its bare loop.",
    ]
    if unsent:
        notes.append(f"WARNING: up to {unsent:,} of {n:,} updates per run did not end 'sent'.")
    return notes


def _profile(ctx: BenchContext, n: int, tag: str, prefix: str) -> list[str]:
    """One more run to the outbox under cProfile (event-loop thread), not counted."""
    target = Target("outbox", n=n)
    prof = BENCH_VAR / "messenger.prof"
    profiler = cProfile.Profile()
    say("messenger: one more run to the outbox under cProfile")
    profiler.enable()
    try:
        _one_round(ctx, target, 0, tag + "p", prefix, None, Watch())
    finally:
        profiler.disable()
    profiler.dump_stats(str(prof))
    r = target.runs[0]
    lines = [
        f"### Profile of the messenger to the sandbox outbox (cProfile; `var/bench/{prof.name}`)",
        "",
        f"Under the profiler: {_rate(n, r.seconds):,.0f} messages/s (decide {r.decide_s:.1f} s, send "
        f"{r.send_s:.1f} s); the bare loop ran under it too. Not comparable with the table. SQLite runs "
        "in aiosqlite's thread, which cProfile does not see.",
        "",
    ]
    return lines + where_time_goes(prof)
