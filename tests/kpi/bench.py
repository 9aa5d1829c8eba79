"""``python -m tests.kpi.bench [--customers N] [--clv-customers N] [--rounds R] [--postgres]``

Two measurements of the kpi service, printed as a markdown table:

* consumer throughput on the demo stream (``shared.demo.generator.generate(7, N, …)``) through
  the real broker, against the same-run baseline: the same ``ConsumerLoop`` whose handler only
  records the batch's event ids in the ledger (bare consume + one batch write per batch);
* CLV fit time on simulated customers through the service path (``KpiService.clv_model``:
  reading the purchases from the database, summarising, fitting both models), cold.

Each consumer measurement replays all events into a fresh group and a fresh database; the
baseline and the kpi consumer alternate, and the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Column, MetaData, String, Table, insert

from services.kpi.clv import BgNbdParams, simulate_bgnbd
from services.kpi.config import KpiSettings
from services.kpi.consumer import MIGRATIONS, build_loop
from services.kpi.service import KpiService
from shared.codec import encode, encode_key
from shared.db import Database, UtcDateTime, applied_events_table, claim_events, migrate
from shared.demo.generator import generate
from shared.events import EVENT_ADAPTER, TOPIC_OF_TYPE, Event, MessageEvent, PurchaseEvent
from shared.kafka.consumer import BatchResult, ConsumerLoop, Delivered
from shared.kafka.producer import OutboundRecord, Producer
from shared.logs import configure_logging
from shared.topics import (
    CANCELLATIONS,
    MESSAGES,
    PROFILES,
    PURCHASES,
    SUPPORT,
    all_topic_names,
    ensure_topics,
)
from tests.kpi.factories import apply
from tests.support.infra import kafka_for_session, postgres_for_session

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


async def produce(bootstrap: str, prefix: str, events: Sequence[Event]) -> None:
    producer = Producer(bootstrap, client_id="kpi-bench")
    records = [
        OutboundRecord(f"{prefix}{TOPIC_OF_TYPE[e.type]}", encode_key(e.customer_id), encode(e))
        for e in events
    ]
    for i in range(0, len(records), 5000):
        await producer.send_all(records[i : i + 5000])
    await producer.stop()


async def timed_consume(loop: ConsumerLoop[Any], records: int) -> float:
    task = asyncio.create_task(loop.run())
    started: float | None = None
    while loop.stats.records < records:
        await asyncio.sleep(0.01)
        if started is None and loop.stats.records:
            started = time.perf_counter()  # from the first batch: not the group join
        if task.done():
            task.result()
    elapsed = time.perf_counter() - (started or time.perf_counter())
    loop.stop()
    await task
    return elapsed


async def baseline(settings: KpiSettings, url: str, records: int, first_batch: int) -> float:
    db = Database(url)
    metadata = MetaData()
    ledger = applied_events_table(metadata)
    raw = Table(
        "raw_events",
        metadata,
        Column("event_id", String(128), primary_key=True),
        Column("type", String(16), nullable=False),
        Column("customer_id", String(128), nullable=False),
        Column("occurred_at", UtcDateTime(), nullable=False),
    )
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)

    async def handle(batch: Sequence[Delivered[Event | MessageEvent]]) -> BatchResult:
        # The bare minimum of an idempotent consumer: the ledger and one row per new event.
        async with db.transaction() as session:
            new = await claim_events(
                session, ledger, [(d.value.event_id, d.topic, d.partition, d.offset) for d in batch]
            )
            rows = {
                d.value.event_id: {
                    "event_id": d.value.event_id,
                    "type": d.value.type,
                    "customer_id": d.value.customer_id,
                    "occurred_at": d.value.occurred_at,
                }
                for d in batch
                if d.value.event_id in new
            }
            if rows:
                await session.execute(insert(raw), list(rows.values()))
        return BatchResult(applied=len(new), duplicates=len(batch) - len(new))

    producer = Producer(settings.kafka_bootstrap, client_id="kpi-bench-baseline")
    bare: ConsumerLoop[Any] = ConsumerLoop(
        bootstrap=settings.kafka_bootstrap,
        topics=[settings.topic(t) for t in (PROFILES, PURCHASES, SUPPORT, CANCELLATIONS, MESSAGES)],
        group_id=settings.kpi_group_id,
        decode=lambda _t, payload: EVENT_ADAPTER.validate_json(payload),
        handle=handle,
        producer=producer,
        max_records=settings.kpi_batch_size,
    )
    try:
        return (await timed_consume(bare, records)) * records / max(records - first_batch, 1)
    finally:
        await producer.stop()
        await db.dispose()


async def kpi_consumer(settings: KpiSettings, url: str, records: int, first_batch: int) -> float:
    db = Database(url)
    await migrate(db, MIGRATIONS)
    producer = Producer(settings.kafka_bootstrap, client_id="kpi-bench")
    service = KpiService(db, settings, producer, clock=lambda: NOW)
    try:
        return (
            (await timed_consume(build_loop(settings, service, producer), records))
            * records
            / max(records - first_batch, 1)
        )
    finally:
        await producer.stop()
        await db.dispose()


def simulated_purchases(customers: int, seed: int = 1) -> list[Event | MessageEvent]:
    """Customers drawn from the CDNOW-like BG/NBD, first purchases over a year, one purchase
    event per purchase day (the simulator's times rounded to days)."""
    rng = np.random.default_rng(seed)
    params = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
    first_days = rng.integers(0, 365, size=customers)
    T = (730 - first_days) / 7.0  # noqa: N806 - the literature's name
    x, t_x, _ = simulate_bgnbd(params, customers, T, rng)
    start = datetime(2024, 6, 1, 12, tzinfo=UTC)
    events: list[Event | MessageEvent] = []
    for i in range(customers):
        begin = start + timedelta(days=int(first_days[i]))
        days = {
            0.0,
            *(np.sort(rng.uniform(0, t_x[i], size=int(x[i]) - 1)).round().tolist() if x[i] > 1 else []),
        }
        if x[i] >= 1:
            days.add(round(float(t_x[i]) * 7))
        for n, day in enumerate(sorted(days)):
            events.append(
                PurchaseEvent(
                    event_id=f"sim-{i}-{n}",
                    customer_id=f"s{i:06d}",
                    occurred_at=begin + timedelta(days=day),
                    order_id=f"{i}-{n}",
                    amount=Decimal(str(round(float(rng.gamma(6.25, 1 / rng.gamma(3.74, 1 / 15.44))), 2))),
                    currency="USD",
                )
            )
    return events


async def clv_fit(customers: int, url: str) -> tuple[float, dict[str, Any], int]:
    events = simulated_purchases(customers)
    settings = KpiSettings(kpi_database_url=url, kpi_reporting_currency="USD")
    db = Database(url)
    await migrate(db, MIGRATIONS)
    service = KpiService(db, settings, clock=lambda: datetime(2026, 6, 1, 12, tzinfo=UTC))
    await apply(service, events, batch=5000)
    started = time.perf_counter()
    model = await service.clv_model(date(2026, 5, 31))
    elapsed = time.perf_counter() - started
    await db.dispose()
    return elapsed, model, len(events)


async def run(args: argparse.Namespace) -> None:
    configure_logging("WARNING")
    events = [
        EVENT_ADAPTER.validate_python(e) for e in generate(7, args.customers, NOW - timedelta(days=365), 365)
    ]
    with kafka_for_session() as kafka, tempfile.TemporaryDirectory() as tmp:
        pg = postgres_for_session() if args.postgres else None
        handle = pg.__enter__() if pg is not None else None
        prefix = f"bench{uuid.uuid4().hex[:8]}.retain."
        await ensure_topics(kafka.bootstrap, all_topic_names(prefix), partitions=args.partitions)
        await produce(kafka.bootstrap, prefix, events)
        say(f"{len(events)} demo events on {prefix}*")

        def url(kind: str, n: int) -> str:
            if handle is not None:
                return handle.create_database(f"b_{kind}_{n}_{uuid.uuid4().hex[:6]}")
            return f"sqlite+aiosqlite:///{Path(tmp) / f'{kind}-{n}.db'}"

        measure: dict[str, Callable[[KpiSettings, str, int, int], Awaitable[float]]] = {
            "baseline": baseline,
            "kpi": kpi_consumer,
        }
        seconds: dict[str, list[float]] = {k: [] for k in measure}
        for n in range(args.rounds):
            for kind, fn in measure.items():
                settings = KpiSettings(
                    kafka_bootstrap=kafka.bootstrap,
                    topic_prefix=prefix,
                    kpi_group_id=f"bench-{kind}-{n}-{uuid.uuid4().hex[:6]}",
                    kpi_batch_size=args.batch,
                    var_dir=Path(tmp),
                )
                elapsed = await fn(settings, url(kind, n), len(events), 0)
                seconds[kind].append(elapsed)
                say(f"round {n + 1} {kind}: {len(events) / elapsed:,.0f} events/s")
        clv_s, model, purchases = await clv_fit(args.clv_customers, url("clv", 0))
        if pg is not None:
            pg.__exit__(None, None, None)
    base = statistics.median(seconds["baseline"])
    kpi = statistics.median(seconds["kpi"])
    db = "PostgreSQL" if args.postgres else "SQLite"
    lines = [
        f"| measurement ({db}, {args.partitions} partitions, batch {args.batch}) | value |",
        "|---|---|",
        f"| demo events (generate(7, {args.customers}, …, 365)) | {len(events):,} |",
        f"| baseline: consume + ledger + a row per event, events/s (median of {args.rounds}) "
        f"| {len(events) / base:,.0f} |",
        f"| kpi consumer, events/s (median of {args.rounds}) | {len(events) / kpi:,.0f} |",
        f"| kpi overhead over the baseline | {100 * (kpi / base - 1):+.0f} % |",
        f"| CLV: customers / purchase events | {model['customers']:,} / {purchases:,} |",
        f"| CLV: GET /v1/clv/model path, cold (read + summarise + fit) | {clv_s:.2f} s |",
        f"| CLV: of which summary + both fits | {model['fit_seconds']:.2f} s |",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kpi.bench", description=__doc__)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--clv-customers", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--postgres", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
