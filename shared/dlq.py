"""Replaying dead letters: after a fix, put what a consumer refused back on its topic.

Each record in ``<topic>.dlq`` carries the original key and value, and headers naming the
topic, partition, offset and the time it was first refused. Replaying sends key and value
back to the original topic; consumers apply it as any event (their ledgers drop what was
applied meanwhile), and a record that is still poison lands in the DLQ again with its reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka.producer import OutboundRecord, Producer
from shared.topics import DLQ_SUFFIX, dlq


@dataclass(slots=True)
class ReplayReport:
    topic: str
    scanned: int = 0
    replayed: int = 0
    skipped_before_since: int = 0
    # Letters of a record already taken: every consumer group of a topic dead-letters the same
    # poison record on its own, and it goes back once.
    same_record: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("utf-8", errors="replace")
    return None


async def replay(
    bootstrap: str,
    topic: str,
    since: datetime | None = None,
    *,
    dry_run: bool = False,
    reason: str | None = None,
    timeout_s: float = 60.0,
) -> ReplayReport:
    """Re-produce the dead letters of ``topic`` first seen at or after ``since`` (and, if
    given, refused for ``reason``) to the topic they came from."""
    if topic.endswith(DLQ_SUFFIX):
        raise ValueError(
            f"{topic!r} is a dead-letter topic: give the topic its letters came from, "
            f"{topic.removesuffix(DLQ_SUFFIX)!r}"
        )
    report = ReplayReport(topic)
    taken: set[tuple[str, str, str]] = set()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = Producer(bootstrap, client_id="retain-dlq-replay")
    await consumer.start()
    try:
        name = dlq(topic)
        partitions = consumer.partitions_for_topic(name)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(name) or set()
        tps = [TopicPartition(name, p) for p in sorted(partitions)]
        if not tps:
            return report
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        batch: list[OutboundRecord] = []
        async with asyncio.timeout(timeout_s):
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        report.scanned += 1
                        headers = list(r.headers)
                        why = _header(headers, "x-retain-error") or "unknown"
                        first_seen = _header(headers, "x-retain-first-seen")
                        if since is not None and first_seen and datetime.fromisoformat(first_seen) < since:
                            report.skipped_before_since += 1
                            continue
                        if reason is not None and why != reason:
                            continue
                        origin = _header(headers, "x-retain-topic") or topic
                        partition = _header(headers, "x-retain-partition")
                        offset = _header(headers, "x-retain-offset")
                        if partition is not None and offset is not None:
                            if (origin, partition, offset) in taken:
                                report.same_record += 1
                                continue
                            taken.add((origin, partition, offset))
                        report.by_reason[why] = report.by_reason.get(why, 0) + 1
                        batch.append(
                            OutboundRecord(
                                origin,
                                r.key or b"",  # a keyless record: one partition, which consumers don't mind
                                r.value or b"",
                                (("x-retain-replayed-from", f"{name}:{r.partition}:{r.offset}".encode()),),
                            )
                        )
        if not dry_run and batch:
            await producer.send_all(batch)
        report.replayed = 0 if dry_run else len(batch)
        return report
    finally:
        await consumer.stop()
        await producer.stop()
