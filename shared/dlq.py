"""Replaying dead letters: after a fix, put what a consumer refused back on its topic.

Each record in ``<topic>.dlq`` carries the original key and value, and headers naming the
topic, partition, offset and the time it was first refused. Replaying sends key and value
back to the original topic; consumers apply it as any event (their ledgers drop what was
applied meanwhile), and a record that is still poison lands in the DLQ again with its reason.

The replayed record carries its letter's origin headers (``ORIGIN_HEADERS``), and a consumer
that refuses it again writes those rather than the replayed record's own (``carried_origin``):
the new letter is the same record, so the next replay sends it back once, however many replays
came before. Each letter also says when it was itself refused (``x-retain-refused-at``), which
is what ``since`` compares: a record refused again for a new reason is among the letters since
that problem began.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.kafka.producer import OutboundRecord, Producer
from shared.topics import DLQ_SUFFIX, dlq

# What a letter says about the record it holds, kept through a replay (see the module's doc).
ORIGIN_HEADERS = ("x-retain-topic", "x-retain-partition", "x-retain-offset", "x-retain-first-seen")
REPLAYED_FROM = "x-retain-replayed-from"
REFUSED_AT = "x-retain-refused-at"
# A letter of a record too large to keep whole: the record's size; the letter holds its start.
TRUNCATED = "x-retain-truncated"
# The reason of a record whose event id was applied for another event (shared.db.claim_events).
EVENT_ID_REUSED = "event_id_reused"
SEND_CHUNK = 1000  # records sent at a time: a large DLQ is not held in memory to the end


class ReplayTimeoutError(RuntimeError):
    """The scan ran out of time; what was sent before stays sent (a second replay is safe)."""


@dataclass(slots=True)
class ReplayReport:
    topic: str
    scanned: int = 0
    replayed: int = 0
    skipped_before_since: int = 0
    # Letters of a record already taken: every consumer group of a topic dead-letters the same
    # poison record on its own, and it goes back once.
    same_record: int = 0
    # Letters of records too large to keep whole (``TRUNCATED``): not sent back, since only
    # their start is here; their origin headers say where the record is on its topic.
    truncated: int = 0
    # Letters of records whose event id was applied for another event (``EVENT_ID_REUSED``): not
    # sent back, since the same id would be refused again. Their producer sends them anew.
    reused: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return None if value is None else value.decode("utf-8", errors="replace")
    return None


def _instant(value: str | None) -> datetime | None:
    """A header's time, if it is one with a zone (a letter written by hand may hold anything)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def carried_origin(
    headers: Sequence[tuple[str, bytes | None]], topic: str
) -> tuple[tuple[str, bytes], ...] | None:
    """The first letter's origin that a record a replay put back on ``topic`` carries, if it is
    one a replay could have written: replayed, of this very topic, a partition and an offset
    that are numbers and a first-refused time with a zone. Anything else is a producer's own
    headers, which must not choose where the record's letter says it came from."""
    if _header(headers, REPLAYED_FROM) is None or _header(headers, "x-retain-topic") != topic:
        return None
    values = [_header(headers, name) for name in ORIGIN_HEADERS]
    partition, offset, first_seen = values[1], values[2], values[3]
    if not (partition or "").isdigit() or not (offset or "").isdigit() or _instant(first_seen) is None:
        return None
    return tuple((name, str(value).encode()) for name, value in zip(ORIGIN_HEADERS, values, strict=True))


@dataclass(slots=True)
class _Replay:
    """One replay's choice of letters and what it sends, ``SEND_CHUNK`` at a time."""

    dlq_topic: str
    report: ReplayReport
    producer: Producer
    since: datetime | None
    reason: str | None
    dry_run: bool
    taken: set[tuple[str, str]] = field(default_factory=set)  # the records' (partition, offset)
    batch: list[OutboundRecord] = field(default_factory=list)

    async def take(self, r: ConsumerRecord[bytes, bytes]) -> None:
        report = self.report
        report.scanned += 1
        headers = list(r.headers)
        why = _header(headers, "x-retain-error") or "unknown"
        # When this letter was refused; letters from before it said so, when the record was.
        refused = _instant(_header(headers, REFUSED_AT)) or _instant(_header(headers, "x-retain-first-seen"))
        if self.since is not None and refused is not None and refused < self.since:
            report.skipped_before_since += 1
            return
        if self.reason is not None and why != self.reason:
            return
        if _header(headers, TRUNCATED) is not None:
            report.truncated += 1
            return
        if why == EVENT_ID_REUSED:
            report.reused += 1
            return
        partition = _header(headers, "x-retain-partition")
        offset = _header(headers, "x-retain-offset")
        if partition is not None and offset is not None:
            if (partition, offset) in self.taken:
                report.same_record += 1
                return
            self.taken.add((partition, offset))
        report.by_reason[why] = report.by_reason.get(why, 0) + 1
        carried = tuple((k, v) for k, v in headers if k in ORIGIN_HEADERS and v is not None)
        self.batch.append(
            OutboundRecord(
                # The topic whose letters these are: never one a header names.
                report.topic,
                r.key or b"",  # a keyless record: one partition, which consumers don't mind
                r.value or b"",
                (*carried, (REPLAYED_FROM, f"{self.dlq_topic}:{r.partition}:{r.offset}".encode())),
            )
        )
        if len(self.batch) >= SEND_CHUNK:
            await self.send()

    async def send(self) -> None:
        if not self.dry_run and self.batch:
            await self.producer.send_all(self.batch)
            self.report.replayed += len(self.batch)
        self.batch.clear()


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
    name = dlq(topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = Producer(bootstrap, client_id="retain-dlq-replay")
    run = _Replay(name, ReplayReport(topic), producer, since, reason, dry_run)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(name)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(name) or set()
        tps = [TopicPartition(name, p) for p in sorted(partitions)]
        if not tps:
            return run.report
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        try:
            async with asyncio.timeout(timeout_s):
                while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        for r in records:
                            await run.take(r)
                await run.send()
        except TimeoutError:
            raise ReplayTimeoutError(
                f"{name} was not read to its end in {timeout_s:g} s ({run.report.scanned} letters "
                f"scanned, {run.report.replayed} sent): give a longer --timeout-s; replaying again is safe"
            ) from None
        return run.report
    finally:
        await consumer.stop()
        await producer.stop()
