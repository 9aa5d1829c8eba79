"""The consumer-loop helper with a toy handler, against the real broker and both databases."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalStateError, KafkaConnectionError
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import Column, MetaData, Numeric, String, Table, select
from sqlalchemy.exc import OperationalError

from shared import metrics as metrics_module
from shared.codec import decode_event, encode_event, encode_key
from shared.config import CommonSettings
from shared.db import Database, applied_events_table, claim_events, insert_ignoring_conflicts
from shared.dlq import replay
from shared.events import EVENT_ADAPTER, EXAMPLES, Event, PurchaseEvent
from shared.kafka import consumer as consumer_module
from shared.kafka.consumer import BatchResult, ConsumerLoop, Delivered, PermanentError
from shared.kafka.producer import OutboundRecord, Producer
from shared.metrics import CONSUMER_BROKER_CONTACT, stalled
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all
from tests.support.logs import WarningRecorder

pytestmark = pytest.mark.integration

metadata = MetaData()
ledger = applied_events_table(metadata)
totals = Table(
    "toy_totals",
    metadata,
    Column("customer_id", String(128), primary_key=True),
    Column("total", Numeric(18, 4)),
)


class ToyHandler:
    """Sums purchase amounts per customer, once per event id, in one transaction per batch."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls = 0
        self.fail_transiently = 0

    async def __call__(self, batch: Sequence[Delivered[Event]]) -> BatchResult:
        self.calls += 1
        if self.fail_transiently:
            self.fail_transiently -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database away"))
        async with self.db.transaction() as session:
            claimed = await claim_events(session, ledger, batch)
            for d in claimed.fresh:
                event = d.value
                if not isinstance(event, PurchaseEvent):
                    continue
                if event.amount == Decimal("666"):
                    raise PermanentError("amount 666 is cursed")
                current = await session.scalar(
                    select(totals.c.total).where(totals.c.customer_id == event.customer_id)
                )
                if current is None:
                    await session.execute(
                        insert_ignoring_conflicts(session, totals).values(
                            customer_id=event.customer_id, total=0
                        )
                    )
                    current = Decimal(0)
                await session.execute(
                    totals.update()
                    .where(totals.c.customer_id == event.customer_id)
                    .values(total=current + event.amount)
                )
            return BatchResult(len(claimed.fresh), claimed.duplicates, claimed.reused)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, inline_sqlite=True)  # as the workers run it
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield database
    await database.dispose()


def purchase(n: int, customer: str, amount: str) -> PurchaseEvent:
    event = EVENT_ADAPTER.validate_python(
        {
            **EXAMPLES["purchase"],
            "event_id": f"p-{n}",
            "customer_id": customer,
            "amount": amount,
            "items": None,
        }
    )
    assert isinstance(event, PurchaseEvent)
    return event


async def produce(kafka: KafkaHandle, topic: str, values: list[tuple[str, bytes]]) -> None:
    producer = Producer(kafka.bootstrap, client_id="test")
    await producer.send_all([OutboundRecord(topic, encode_key(k), v) for k, v in values])
    await producer.stop()


async def produce_raw(kafka: KafkaHandle, topic: str, values: Sequence[bytes | None], **options: Any) -> None:
    """Values keyed c1, as a producer of our own could not send them (a null value, another
    compression): aiokafka's producer with ``options``."""
    raw = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, **options)
    await raw.start()
    try:
        for value in values:
            await raw.send_and_wait(topic, value, key=b"c1")
    finally:
        await raw.stop()


def make_loop(
    kafka: KafkaHandle, topic: str, group: str, handler: ToyHandler, commit_interval_ms: int = 0
) -> ConsumerLoop[Event]:
    return ConsumerLoop(
        bootstrap=kafka.bootstrap,
        topics=[topic],
        group_id=group,
        decode=lambda _topic, payload: decode_event(payload),
        handle=handler,
        producer=Producer(kafka.bootstrap, client_id=group),
        max_records=50,
        poll_timeout_ms=200,
        commit_interval_ms=commit_interval_ms,
    )


def loop_without_broker(group: str, tick: Callable[[], Awaitable[None]] | None = None) -> ConsumerLoop[Event]:
    """A loop whose broker address answers nothing, and whose handler is never called."""
    return ConsumerLoop(
        bootstrap="127.0.0.1:1",
        topics=["t"],
        group_id=group,
        decode=lambda _topic, payload: decode_event(payload),
        handle=ToyHandler(Database("sqlite+aiosqlite://")),
        producer=Producer("127.0.0.1:1", client_id="g"),
        tick=tick,
    )


async def produce_purchases_of_three(kafka: KafkaHandle, topic: str, n: int) -> None:
    """``n`` purchases of 1, taking turns among customers c0, c1 and c2 (n/3 each)."""
    await produce(
        kafka, topic, [(f"c{i % 3}", encode_event(purchase(i, f"c{i % 3}", "1"))) for i in range(n)]
    )


async def drain(loop: ConsumerLoop[Event], expected: int, timeout_s: float = 30) -> None:
    """Start the loop, then ``more``."""
    await loop._producer.start()
    await loop._consumer.start()
    await more(loop, expected, timeout_s)


async def more(loop: ConsumerLoop[Event], expected: int, timeout_s: float = 30) -> None:
    """Run batches of a started loop until ``expected`` records in all were handled (applied,
    skipped or dead-lettered)."""
    async with asyncio.timeout(timeout_s):
        while loop.stats.records < expected:
            await loop.run_once()


async def stop(loop: ConsumerLoop[Event]) -> None:
    await loop._consumer.stop()
    await loop._producer.stop()


async def total_of(db: Database, customer: str) -> Decimal | None:
    async with db.transaction() as session:
        value = await session.scalar(select(totals.c.total).where(totals.c.customer_id == customer))
        return None if value is None else Decimal(value)


async def test_poison_goes_to_the_dlq_and_the_partition_keeps_flowing(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [
        ("c1", encode_event(purchase(1, "c1", "10"))),
        ("c1", b"\xff not json"),
        ("c1", b'{"type": "refund", "event_id": "x"}'),
        ("c1", encode_event(purchase(2, "c1", "666"))),
        ("c1", encode_event(purchase(3, "c1", "5.5"))),
    ])  # fmt: skip
    handler = ToyHandler(db)
    loop = make_loop(kafka, topic, f"g-{unique}", handler)
    try:
        await drain(loop, 5)
    finally:
        await stop(loop)

    assert await total_of(db, "c1") == Decimal("15.5")
    dead = await read_all(kafka.bootstrap, [topic + ".dlq"])
    assert [r.value for r in dead][:2] == [b"\xff not json", b'{"type": "refund", "event_id": "x"}']
    headers = [dict(r.headers) for r in dead]
    assert [h["x-retain-error"] for h in headers] == [b"undecodable", b"undecodable", b"PermanentError"]
    assert b"cursed" in headers[2]["x-retain-error-detail"]
    assert all(h["x-retain-topic"] == topic.encode() for h in headers)
    assert [int(h["x-retain-offset"]) for h in headers] == [1, 2, 3]
    assert all(b"T" in h["x-retain-first-seen"] for h in headers)
    assert loop.stats.dead_lettered == 3
    assert loop.stats.applied == 2


async def test_a_record_too_large_for_a_letter_is_dead_lettered_by_its_start_and_the_stream_goes_on(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """1.2 MB of base64 fits the broker's 1 MiB gzipped by its producer, not lz4'd in a letter:
    the broker refused the letter as too large, which was retried for ever as the broker being
    away, and nothing after the record was applied."""
    topic = topic_prefix + "purchases"
    poison = b'{"avatar": "' + base64.b64encode(random.Random(7).randbytes(900_000)) + b'"}'
    assert len(poison) > 1_200_000
    values = [poison, encode_event(purchase(1, "c1", "10"))]
    await produce_raw(kafka, topic, values, compression_type="gzip", max_request_size=2**21)
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    try:
        await drain(loop, 2, timeout_s=60)
    finally:
        await stop(loop)
    assert (loop.stats.dead_lettered, loop.stats.applied, loop.stats.retries) == (1, 1, 0)
    assert await total_of(db, "c1") == Decimal("10")
    [letter] = await read_all(kafka.bootstrap, [topic + ".dlq"])
    headers = dict(letter.headers)
    assert headers["x-retain-truncated"] == str(len(poison)).encode()
    assert headers["x-retain-error"] == b"undecodable"
    assert letter.value == poison[: consumer_module.DLQ_KEPT_BYTES]
    assert int(headers["x-retain-offset"]) == 0  # where the whole record is
    report = await replay(kafka.bootstrap, topic)
    assert (report.truncated, report.replayed, report.by_reason) == (1, 0, {})


async def test_a_tombstone_is_dead_lettered_as_one(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    topic = topic_prefix + "purchases"
    await produce_raw(kafka, topic, [None, b""])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    try:
        await drain(loop, 2)
    finally:
        await stop(loop)
    details = [
        dict(r.headers)["x-retain-error-detail"] for r in await read_all(kafka.bootstrap, [topic + ".dlq"])
    ]
    assert details[0] == b"a null value (a tombstone): events are never deleted by key, nothing to apply"
    assert b"EOF while parsing" in details[1]  # an empty value is another mistake


async def test_an_event_id_reused_for_another_event_is_dead_lettered_not_dropped(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """Straight onto Kafka, an event sent under an id already applied for another one used to be
    skipped as a duplicate, unseen. Now it is dead-lettered with the id and where the first event was read; a
    resend of the first as it was, in JSON written otherwise (keys reordered, spaced, an explicit
    null), is still a duplicate, in the same batch as in a later one."""
    topic = topic_prefix + "purchases"
    first = purchase(1, "c1", "10")
    rewritten = json.dumps(
        {**dict(reversed(orjson.loads(encode_event(first)).items())), "items": None}, indent=2
    )
    other = purchase(1, "c1", "12")  # another order's amount, under the first one's id
    await produce(kafka, topic, [("c1", encode_event(first)), ("c1", rewritten.encode())])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    try:
        await drain(loop, 2)
        assert (loop.stats.applied, loop.stats.duplicates, loop.stats.dead_lettered) == (1, 1, 0)
        await produce(
            kafka,
            topic,
            [
                ("c1", encode_event(other)),
                ("c1", rewritten.encode()),
                ("c1", encode_event(purchase(2, "c1", "5"))),
            ],
        )
        await more(loop, 5)
    finally:
        await stop(loop)
    assert (loop.stats.applied, loop.stats.duplicates, loop.stats.dead_lettered) == (2, 2, 1)
    assert await total_of(db, "c1") == Decimal("15")
    [letter] = await read_all(kafka.bootstrap, [topic + ".dlq"])
    headers = dict(letter.headers)
    assert letter.value == encode_event(other)
    assert (headers["x-retain-error"], headers["x-retain-offset"]) == (b"event_id_reused", b"2")
    partition = headers["x-retain-partition"].decode()  # the key's: both records share it
    detail = headers["x-retain-error-detail"].decode()
    first_read = f"(first read from {topic} partition {partition} offset 0)"
    assert detail.startswith(f"event_id 'p-1' was applied for another event {first_read}")
    report = await replay(kafka.bootstrap, topic)  # it would meet the same id: left for its producer
    assert (report.reused, report.replayed, report.by_reason) == (1, 0, {})


async def test_a_record_still_poison_after_a_replay_keeps_its_first_letter_and_goes_back_once(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """Replayed before the fix reached it, a record is refused again: its new letter says where
    it first came from and since when, so a second replay with the same --since sends it back
    once, not once per letter (which doubled it with every round)."""
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [("c1", encode_event(purchase(1, "c1", "666")))])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    try:
        await drain(loop, 1)
        since = datetime.now(UTC) - timedelta(hours=1)
        assert (await replay(kafka.bootstrap, topic, since)).replayed == 1
        await more(loop, 2)  # refused again
        letters = [dict(r.headers) for r in await read_all(kafka.bootstrap, [topic + ".dlq"])]
        assert len(letters) == 2
        first, again = letters
        for name in ("x-retain-topic", "x-retain-partition", "x-retain-offset", "x-retain-first-seen"):
            assert again[name] == first[name]
        assert again["x-retain-offset"] == b"0"
        assert again["x-retain-refused-at"] > first["x-retain-refused-at"]  # each letter's own
        second = await replay(kafka.bootstrap, topic, since)
        assert (second.scanned, second.replayed, second.same_record) == (2, 1, 1)
        # Refused again for a new reason, it counts among the letters since that problem began.
        between = datetime.fromisoformat(again["x-retain-refused-at"].decode()) - timedelta(microseconds=1)
        assert between > datetime.fromisoformat(first["x-retain-refused-at"].decode())
        third = await replay(kafka.bootstrap, topic, between, dry_run=True)
        assert (third.scanned, third.skipped_before_since, sum(third.by_reason.values())) == (2, 1, 1)
    finally:
        await stop(loop)
    assert len(await read_all(kafka.bootstrap, [topic])) == 3  # the record and one copy per replay


async def test_a_record_whose_own_headers_claim_an_origin_is_dead_lettered_as_itself(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """A producer's headers must not choose the topic a replay sends its record to."""
    topic = topic_prefix + "purchases"
    forged = (
        ("x-retain-topic", (topic_prefix + "segments").encode()),
        ("x-retain-partition", b"0"),
        ("x-retain-offset", b"7"),
        ("x-retain-first-seen", b"2026-01-01T00:00:00+00:00"),
        ("x-retain-replayed-from", b"elsewhere.dlq:0:1"),
    )
    producer = Producer(kafka.bootstrap, client_id="forger")
    await producer.send_all(
        [OutboundRecord(topic, encode_key("c1"), encode_event(purchase(1, "c1", "666")), forged)]
    )
    await producer.stop()
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    try:
        await drain(loop, 1)
    finally:
        await stop(loop)
    [letter] = [dict(r.headers) for r in await read_all(kafka.bootstrap, [topic + ".dlq"])]
    assert letter["x-retain-topic"] == topic.encode()
    assert letter["x-retain-offset"] == b"0"
    assert letter["x-retain-first-seen"] == letter["x-retain-refused-at"]


async def test_records_not_keyed_by_their_customer_are_applied_counted_and_logged_once(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend producing straight to Kafka with the order id as key: nothing is lost, and the
    operator is told (a counter, and one log line a minute per topic, not one per record)."""
    recorder = WarningRecorder()
    warnings = recorder.warnings
    monkeypatch.setattr(consumer_module, "log", recorder)
    topic = topic_prefix + "purchases"
    group = f"g-{unique}"
    await produce(kafka, topic, [
        ("c1", encode_event(purchase(1, "c1", "10"))),
        ("order-2", encode_event(purchase(2, "c1", "5"))),
        ("order-3", encode_event(purchase(3, "c2", "1"))),
    ])  # fmt: skip
    loop = make_loop(kafka, topic, group, ToyHandler(db))
    try:
        await drain(loop, 3)
    finally:
        await stop(loop)

    assert (await total_of(db, "c1"), await total_of(db, "c2")) == (Decimal(15), Decimal(1))
    assert loop.stats.miskeyed == 2
    counted = REGISTRY.get_sample_value("retain_consumer_miskeyed_total", {"group": group, "topic": topic})
    assert counted == 2
    [(_, warning)] = [w for w in warnings if w[0] == "record not keyed by its customer id"]
    assert (warning["key"], warning["customer_id"], warning["event_id"]) == ("order-2", "c1", "p-2")
    assert "key=customer_id.encode()" in str(warning["hint"])


async def test_crash_before_commit_redelivers_and_the_ledger_makes_it_a_noop(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    topic = topic_prefix + "purchases"
    await produce_purchases_of_three(kafka, topic, 30)
    group = f"g-{unique}"

    crashing = make_loop(kafka, topic, group, ToyHandler(db))

    async def crash(_batch: object) -> None:
        raise RuntimeError("process died after the transaction, before the offset commit")

    crashing._commit = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError, match="process died"):
        await drain(crashing, 30)
    await stop(crashing)
    applied_before = sum([await total_of(db, f"c{i}") or Decimal(0) for i in range(3)], Decimal(0))
    assert applied_before > 0  # the first batch was applied, its offsets never committed

    handler = ToyHandler(db)
    survivor = make_loop(kafka, topic, group, handler)
    try:
        await drain(survivor, 30)
    finally:
        await stop(survivor)
    assert survivor.stats.duplicates == applied_before  # re-delivered, recognised, skipped
    assert [await total_of(db, f"c{i}") for i in range(3)] == [Decimal(10)] * 3


async def test_transient_errors_are_retried_without_committing(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [("c1", encode_event(purchase(i, "c1", "2"))) for i in range(4)])
    handler = ToyHandler(db)
    handler.fail_transiently = 2
    loop = make_loop(kafka, topic, f"g-{unique}", handler)
    try:
        await drain(loop, 4)
    finally:
        await stop(loop)
    assert loop.stats.retries >= 2
    assert loop.stats.dead_lettered == 0
    assert await total_of(db, "c1") == Decimal(8)
    assert await read_all(kafka.bootstrap, [topic + ".dlq"]) == []


async def test_the_loop_says_whether_it_is_behind_the_topic(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """`behind` is what lets work between batches wait for a backlog (the segmenter's sweep):
    true while records wait past the position, false once all of them are applied."""
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [("c1", encode_event(purchase(i, "c1", "1"))) for i in range(120)])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))  # 50 records a batch
    assert loop.behind  # nothing fetched yet: not known to be caught up
    try:
        await drain(loop, 50)
        assert loop.stats.records < 120
        assert loop.behind
        await more(loop, 120)
        assert loop.behind is False
    finally:
        await stop(loop)


async def test_the_work_between_batches_runs_at_most_once_per_interval(
    kafka: KafkaHandle, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr("shared.kafka.consumer.time.monotonic", lambda: clock[0])

    async def tick() -> None:
        ticks.append(clock[0])

    loop: ConsumerLoop[Event] = ConsumerLoop(
        bootstrap=kafka.bootstrap,
        topics=[f"t-{unique}"],
        group_id=f"g-{unique}",
        decode=lambda _topic, payload: decode_event(payload),
        handle=lambda _items: asyncio.sleep(0),  # never called: no batch is consumed here
        producer=Producer(kafka.bootstrap, client_id=unique),
        tick=tick,
        tick_every_s=0.25,
    )
    for now in (1000.0, 1000.1, 1000.24, 1000.25, 1000.3, 1000.6):
        clock[0] = now
        await loop._run_tick()
    assert ticks == [1000.0, 1000.25, 1000.6]


async def test_a_commit_of_partitions_no_longer_ours_is_given_up_not_retried(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """After a rebalance the new owner re-delivers and the ledger skips; retrying would spin."""
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [("c1", encode_event(purchase(i, "c1", "1"))) for i in range(3)])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db))
    calls = 0

    async def revoked(_offsets: object) -> None:
        nonlocal calls
        calls += 1
        raise IllegalStateError("Partition is not assigned")

    loop._consumer.commit = revoked
    try:
        await drain(loop, 3, timeout_s=10)  # a retried commit would never return
    finally:
        await stop(loop)
    assert calls == 1
    assert loop.stats.commits == 0
    assert await total_of(db, "c1") == Decimal(3)


async def test_a_commit_retried_after_a_transient_broker_error_is_counted_as_a_retry(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """A commit that keeps failing must show on retain_consumer_retries_total, which
    RetainConsumerRetrying watches; the commit goes through once the broker answers."""
    topic = topic_prefix + "purchases"
    group = f"g-{unique}"
    await produce(kafka, topic, [("c1", encode_event(purchase(i, "c1", "1"))) for i in range(3)])
    loop = make_loop(kafka, topic, group, ToyHandler(db))
    commit = loop._consumer.commit
    failures = 2

    async def flaky(offsets: object) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise KafkaConnectionError("Connection at 127.0.0.1:9092 closed")
        await commit(offsets)

    labels = {"group": group, "error": "KafkaConnectionError"}
    loop._consumer.commit = flaky
    try:
        await drain(loop, 3, timeout_s=10)
    finally:
        await stop(loop)
    assert failures == 0
    assert loop.stats.commits == 1
    assert loop.stats.retries == 2
    assert REGISTRY.get_sample_value("retain_consumer_retries_total", labels) == 2
    assert await total_of(db, "c1") == Decimal(3)


async def committed(loop: ConsumerLoop[Event], topic: str) -> int:
    return sum(
        [await loop._consumer.committed(tp) or 0 for tp in loop._consumer.assignment() if tp.topic == topic]
    )


async def test_with_a_commit_interval_a_busy_loop_commits_once_per_interval_and_at_once_when_idle(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    topic = topic_prefix + "purchases"
    await produce(kafka, topic, [("c1", encode_event(purchase(i, "c1", "1"))) for i in range(120)])
    loop = make_loop(kafka, topic, f"g-{unique}", ToyHandler(db), commit_interval_ms=60_000)
    try:
        await drain(loop, 120)  # 50 records a batch
        assert loop.stats.batches >= 3
        assert loop.stats.commits == 1  # the first batch's; the others wait for the interval
        first = sum(loop.stats.positions.values())
        assert 0 < first < 120
        assert await committed(loop, topic) == first
        assert await loop.run_once() == 0  # caught up: nothing waits any longer
        assert loop.stats.commits == 2
        assert sum(loop.stats.positions.values()) == 120
        assert await committed(loop, topic) == 120
    finally:
        await stop(loop)
    assert await total_of(db, "c1") == Decimal(120)


async def test_a_crash_with_applied_batches_not_committed_yet_changes_nothing_twice(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database
) -> None:
    """What a commit interval risks: the batches applied since the last commit come again."""
    topic = topic_prefix + "purchases"
    await produce_purchases_of_three(kafka, topic, 120)
    group = f"g-{unique}"
    crashing = make_loop(kafka, topic, group, ToyHandler(db), commit_interval_ms=60_000)
    try:
        await drain(crashing, 120)
    finally:
        await stop(crashing)  # killed: the consumer leaves without committing what it holds
    first = sum(crashing.stats.positions.values())
    assert first < 120

    survivor = make_loop(kafka, topic, group, ToyHandler(db))
    try:
        await drain(survivor, 120 - first)
    finally:
        await stop(survivor)
    assert survivor.stats.duplicates == 120 - first  # applied once already, skipped now
    assert survivor.stats.applied == 0
    assert [await total_of(db, f"c{i}") for i in range(3)] == [Decimal(40)] * 3


async def test_the_fetch_settings_reach_the_kafka_consumer() -> None:
    """Each service's loop takes its group and fetch settings from ``consumer_options``."""
    settings = CommonSettings(
        consumer_fetch_max_wait_ms=7, consumer_fetch_min_bytes=1234, consumer_commit_interval_ms=250
    )
    loop: ConsumerLoop[Event] = ConsumerLoop(
        bootstrap="127.0.0.1:1",
        topics=["t"],
        group_id="g",
        decode=lambda _topic, payload: decode_event(payload),
        handle=ToyHandler(Database("sqlite+aiosqlite://")),
        producer=Producer("127.0.0.1:1", client_id="g"),
        **settings.consumer_options(),
    )
    assert loop._consumer._fetch_max_wait_ms == 7
    assert loop._consumer._fetch_min_bytes == 1234
    assert loop._commit_interval_s == 0.25
    assert loop._consumer._session_timeout_ms == settings.consumer_session_timeout_ms


async def test_a_customer_is_applied_by_one_consumer_of_a_group_on_every_topic(
    kafka: KafkaHandle, topic_prefix: str, unique: str
) -> None:
    """Each partition number goes to one consumer on every topic, so a customer's profile and
    purchases (keyed alike) are applied by one process. With round robin, two consumers of two
    topics of three partitions split partition 0 of one topic and of the other."""
    topics = [topic_prefix + "profiles", topic_prefix + "purchases"]
    group = f"g-{unique}"
    loops = [
        ConsumerLoop(
            bootstrap=kafka.bootstrap,
            topics=topics,
            group_id=group,
            client_id=f"{group}-{i}",
            decode=lambda _topic, payload: decode_event(payload),
            handle=ToyHandler(Database("sqlite+aiosqlite://")),  # nothing is produced: never called
            producer=Producer(kafka.bootstrap, client_id=f"{group}-{i}"),
            max_records=50,
            poll_timeout_ms=100,
        )
        for i in range(2)
    ]

    def settled() -> bool:
        held = [loop._consumer.assignment() for loop in loops]
        return all(held) and sum(len(h) for h in held) == 2 * 3

    try:
        for loop in loops:
            await loop._producer.start()
            await loop._consumer.start()
        async with asyncio.timeout(60):
            while not settled():
                await asyncio.gather(*(loop.run_once() for loop in loops))
        for loop in loops:
            by_topic = {
                t: {tp.partition for tp in loop._consumer.assignment() if tp.topic == t} for t in topics
            }
            assert by_topic[topics[0]] == by_topic[topics[1]]
            assert by_topic[topics[0]]  # each consumer holds a share
    finally:
        for loop in loops:
            await stop(loop)


async def test_long_work_between_batches_beats_for_a_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kpi's refit on a large history is work, not a stall: the loop beats while it runs, up to
    LONG_WORK_S; work that outlasts that stops the beats, and the loop counts as stalled."""
    beats: list[str] = []
    monkeypatch.setattr(consumer_module, "heartbeat", beats.append)
    monkeypatch.setattr(consumer_module, "BEAT_EVERY_S", 0.02)
    monkeypatch.setattr(consumer_module, "LONG_WORK_S", 0.2)
    work_s = [0.1]

    async def tick() -> None:
        await asyncio.sleep(work_s[0])

    loop = loop_without_broker("g-long-work", tick)
    await loop._run_tick()
    assert 2 <= len(beats) <= 5  # beats every 0.02 s of 0.1 s of work
    beats.clear()
    work_s[0] = 0.6
    await loop._run_tick()
    assert 5 <= len(beats) <= 10  # only during its first 0.2 s: the rest is a stall


async def test_a_loop_started_while_the_broker_is_away_exports_its_start_as_the_contact() -> None:
    """Restarted during an outage, a consumer waits for the broker before its first pass: the
    contact gauge is there from the start, and stands still, so the alert sees the outage."""
    group = "g-started-away"
    loop = loop_without_broker(group)
    before = time.time()
    running = asyncio.create_task(loop.run())
    try:
        await asyncio.sleep(0.5)
        assert loop.stats.batches == 0  # still waiting for the broker
        contact = CONSUMER_BROKER_CONTACT.labels(group)._value.get()
        assert before <= contact <= before + 0.5
        await asyncio.sleep(0.3)
        assert CONSUMER_BROKER_CONTACT.labels(group)._value.get() == contact
    finally:
        loop.stop()
        await asyncio.wait_for(running, 30)
    exported = generate_latest(REGISTRY).decode()  # stopped on purpose: no contact to age
    assert f'retain_consumer_broker_contact_timestamp_seconds{{group="{group}"}}' not in exported


async def test_the_broker_contact_stands_still_while_the_broker_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka's metadata request raises when no broker answers (KafkaError): the gauge keeps
    its last value, which RetainConsumerBrokerUnreachable compares with the clock."""
    monkeypatch.setattr(consumer_module, "BEAT_EVERY_S", 0.01)
    group = "g-contact"
    loop = loop_without_broker(group)
    answers = [False]

    async def topics() -> set[str]:
        if not answers[0]:
            raise KafkaConnectionError("Unable to get cluster metadata over all known brokers")
        return {"t"}

    monkeypatch.setattr(loop._consumer, "topics", topics)
    CONSUMER_BROKER_CONTACT.labels(group).set(1000.0)  # its last answer
    watch = asyncio.create_task(loop._watch_broker())
    try:
        await asyncio.sleep(0.1)
        assert CONSUMER_BROKER_CONTACT.labels(group)._value.get() == 1000.0
        answers[0] = True  # the broker is back
        await asyncio.sleep(0.1)
        assert CONSUMER_BROKER_CONTACT.labels(group)._value.get() == pytest.approx(time.time(), abs=10)
    finally:
        watch.cancel()
        CONSUMER_BROKER_CONTACT.remove(group)


async def test_a_running_loop_beats_and_says_when_the_broker_last_answered(
    kafka: KafkaHandle, topic_prefix: str, unique: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What RetainWorkerStalled and RetainConsumerBrokerUnreachable read: both move while the
    loop runs (idle polls included), and both are forgotten once the loop is stopped on purpose."""
    monkeypatch.setattr(consumer_module, "BEAT_EVERY_S", 0.1)
    topic = topic_prefix + "purchases"
    await produce_purchases_of_three(kafka, topic, 6)
    group = f"g-{unique}"
    loop = make_loop(kafka, topic, group, ToyHandler(db))
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(30):
            while loop.stats.records < 6 or group not in metrics_module._beats:
                await asyncio.sleep(0.05)
        first = metrics_module._beats[group]
        contact = CONSUMER_BROKER_CONTACT.labels(group)._value.get()
        assert contact == pytest.approx(time.time(), abs=10)
        async with asyncio.timeout(30):
            while (
                metrics_module._beats[group] == first
                or CONSUMER_BROKER_CONTACT.labels(group)._value.get() == contact
            ):
                await asyncio.sleep(0.05)  # idle: each empty poll is a pass, each fetch an answer
        assert group not in stalled()
    finally:
        loop.stop()
        await task
    assert group not in metrics_module._beats
    exported = generate_latest().decode()
    assert (
        f'retain_consumer_broker_contact_timestamp_seconds{{group="{group}"}}' not in exported
    )  # none to go stale
