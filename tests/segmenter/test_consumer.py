"""The segmenter's consumer through the real broker: shuffled and duplicated replays, a
SIGKILL mid-stream, and poison events — compared with the pure functions as the oracle."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS, build_loop
from services.segmenter.profile import ProfileState, apply_event, dump_state, facts, facts_from_json
from services.segmenter.rules import compile_rules, default_rules
from services.segmenter.service import SegmenterService
from services.segmenter.tables import customers, outbox
from shared.codec import decode_with, encode_event, encode_key
from shared.config import REPO_ROOT
from shared.db import Database, migrate
from shared.demo.generator import generate
from shared.events import CUSTOMER_UPDATE_ADAPTER, EVENT_ADAPTER, TOPIC_OF_TYPE, Event
from shared.kafka.producer import OutboundRecord, Producer
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all, wait_caught_up

pytestmark = pytest.mark.integration

HISTORY_START = datetime(2025, 6, 1, tzinfo=UTC)


def demo_events(customers_n: int, seed: int = 11) -> list[Event]:
    return [EVENT_ADAPTER.validate_python(e) for e in generate(seed, customers_n, HISTORY_START, 300)]


async def produce(kafka: KafkaHandle, prefix: str, events: list[Event]) -> None:
    producer = Producer(kafka.bootstrap, client_id="test-producer")
    records = [
        OutboundRecord(f"{prefix}{TOPIC_OF_TYPE[e.type]}", encode_key(e.customer_id), encode_event(e))
        for e in events
    ]
    for i in range(0, len(records), 2000):
        await producer.send_all(records[i : i + 2000])
    await producer.stop()


def settings_for(kafka: KafkaHandle, prefix: str, url: str, group: str, tmp_path: Path) -> SegmenterSettings:
    return SegmenterSettings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=prefix,
        segmenter_database_url=url,
        segmenter_group_id=group,
        segmenter_batch_size=200,
        var_dir=tmp_path,
    )


async def stored(db: Database) -> dict[str, dict[str, object]]:
    async with db.sessions() as session:
        return {r.customer_id: r._asdict() for r in await session.execute(select(customers))}


async def wait_for_applied(db: Database, expected_customers: int, outbox_empty: bool = True) -> None:
    async with asyncio.timeout(90):
        while True:
            async with db.sessions() as session:
                n = await session.scalar(select(func.count()).select_from(customers))
                waiting = await session.scalar(select(func.count()).select_from(outbox))
            if n == expected_customers and (waiting == 0 or not outbox_empty):
                return
            await asyncio.sleep(0.2)


def oracle_check(events: list[Event], rows: dict[str, dict[str, object]]) -> None:
    """Every stored profile equals the pure fold of the customer's events, and its tier and
    segments are what the published rules say at the row's own evaluation time: never before
    the customer's latest event, whatever batch brought it (the history lies in the past)."""
    by_customer: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_customer[e.customer_id].append(e)
    assert set(rows) == set(by_customer)
    rules = compile_rules(default_rules(), 1)
    config = SegmenterSettings().lifecycle
    for customer_id, evs in by_customer.items():
        state = ProfileState(customer_id)
        for e in sorted(evs, key=lambda e: (e.occurred_at, e.event_id)):
            apply_event(state, e)
        row = rows[customer_id]
        assert row["state"] == dump_state(state), customer_id
        now = row["updated_at"]
        assert isinstance(now, datetime)
        assert state.last_event_at is not None
        assert now >= state.last_event_at, customer_id
        expected_facts, _ = facts(state, now, config)
        assignment = rules.assign(expected_facts, now)
        segments = row["segments"]
        assert isinstance(segments, list)
        assert (row["tier"], segments) == (assignment.tier, list(assignment.segments)), customer_id
        assert facts_from_json(row["facts"])["orders_count"] == expected_facts["orders_count"]  # type: ignore[arg-type]


async def test_shuffled_duplicated_stream_gives_the_oracles_profiles(
    kafka: KafkaHandle, topic_prefix: str, unique: str, database_url: str, tmp_path: Path
) -> None:
    events = demo_events(40)
    shuffled = events + random.Random(3).sample(events, 200)
    random.Random(5).shuffle(shuffled)
    await produce(kafka, topic_prefix, shuffled)

    settings = settings_for(kafka, topic_prefix, database_url, f"seg-{unique}", tmp_path)
    db = Database(database_url)
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="seg-test")
    service = SegmenterService(db, settings, producer)
    await service.ensure_default_rules()
    loop = build_loop(settings, service, producer)
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(90):
            while loop.stats.records < len(shuffled):
                await asyncio.sleep(0.1)
        loop.stop()
        await task
        await service.close()  # as the consumer process does: the relay sends in the background
    finally:
        if not task.done():
            task.cancel()
        await producer.stop()

    assert loop.stats.duplicates == 200
    assert loop.stats.dead_lettered == 0
    rows = await stored(db)
    oracle_check(events, rows)

    updates = [
        decode_with(CUSTOMER_UPDATE_ADAPTER, r.value)
        for r in await read_all(kafka.bootstrap, [topic_prefix + "segments"])
    ]
    triggered = {t.event_id for u in updates for t in u.triggering_events}
    assert triggered == {e.event_id for e in events}  # every event announced, none twice
    assert sum(len(u.triggering_events) for u in updates) == len(events)
    assert all(u.rule_version == 1 for u in updates)
    await db.dispose()


async def test_sigkill_mid_stream_loses_nothing(
    kafka: KafkaHandle, topic_prefix: str, unique: str, pg_url: str, tmp_path: Path
) -> None:
    events = demo_events(300, seed=23)
    await produce(kafka, topic_prefix, events)
    env = {
        **os.environ,
        "RETAIN_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "RETAIN_TOPIC_PREFIX": topic_prefix,
        "RETAIN_SEGMENTER_DATABASE_URL": pg_url,
        "RETAIN_SEGMENTER_GROUP_ID": f"seg-{unique}",
        "RETAIN_SEGMENTER_BATCH_SIZE": "100",
        "RETAIN_VAR_DIR": str(tmp_path),
        "RETAIN_LOG_LEVEL": "WARNING",
        "RETAIN_CONSUMER_SESSION_TIMEOUT_MS": "2000",
    }
    command = [sys.executable, "-m", "services.segmenter.consumer"]
    db = Database(pg_url)
    kills = 0
    for threshold in (40, 150):
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)  # noqa: ASYNC220
        try:
            async with asyncio.timeout(90):
                while True:
                    await asyncio.sleep(0.05)
                    try:
                        async with db.sessions() as session:
                            n = await session.scalar(select(func.count()).select_from(customers))
                    except DBAPIError:  # the consumer has not created its tables yet
                        continue
                    if (n or 0) >= threshold:
                        break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills == 2

    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT)  # noqa: ASYNC220
    try:
        backend = [topic_prefix + t for t in ("profiles", "purchases", "support", "cancellations")]
        await wait_caught_up(kafka.bootstrap, f"seg-{unique}", backend)
        await wait_for_applied(db, 300)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a clean stop after SIGTERM

    oracle_check(events, await stored(db))
    updates = [
        decode_with(CUSTOMER_UPDATE_ADAPTER, r.value)
        for r in await read_all(kafka.bootstrap, [topic_prefix + "segments"])
    ]
    triggered = {t.event_id for u in updates for t in u.triggering_events}
    assert triggered == {e.event_id for e in events}  # no update lost to the kills
    by_id: dict[str, bytes] = {}
    for u in updates:  # a re-sent update is byte-identical in meaning: same id, same content
        by_id.setdefault(u.event_id, u.model_dump_json().encode())
        assert by_id[u.event_id] == u.model_dump_json().encode()
    await db.dispose()


async def test_poison_event_goes_to_the_dlq_and_the_rest_flows(
    kafka: KafkaHandle, topic_prefix: str, unique: str, tmp_path: Path
) -> None:
    events = demo_events(5, seed=3)
    producer = Producer(kafka.bootstrap, client_id="poison")
    await producer.send_all(
        [OutboundRecord(topic_prefix + "purchases", b"c-x", b'{"type": "purchase", "amount": -1}')]
    )
    await producer.stop()
    await produce(kafka, topic_prefix, events)
    url = f"sqlite+aiosqlite:///{tmp_path / 'seg.db'}"
    settings = settings_for(kafka, topic_prefix, url, f"seg-{unique}", tmp_path)
    db = Database(url)
    await migrate(db, MIGRATIONS)
    producer = Producer(kafka.bootstrap, client_id="seg-test")
    service = SegmenterService(db, settings, producer)
    await service.ensure_default_rules()
    loop = build_loop(settings, service, producer)
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(60):
            while loop.stats.records < len(events) + 1:
                await asyncio.sleep(0.1)
        loop.stop()
        await task
    finally:
        await producer.stop()
    dead = await read_all(kafka.bootstrap, [topic_prefix + "purchases.dlq"])
    assert [r.value for r in dead] == [b'{"type": "purchase", "amount": -1}']
    assert dict(dead[0].headers)["x-retain-error"] == b"undecodable"
    oracle_check(events, await stored(db))
    await db.dispose()
