"""The one consumer loop: getmany → decode → handler (one DB transaction) → DLQ → commit.

Offsets are committed only after the handler's transaction (which records the applied event
ids) has committed and every poison record has been acknowledged by its dead-letter topic.
A crash anywhere before the commit re-delivers the batch, and the handler's recorded event
ids make the second application a no-op. Nothing is skipped without landing in a DLQ.

Since a re-delivered batch changes nothing, the commit may also wait: with a commit interval
the offsets of applied batches are committed at most once per interval, when the loop finds
nothing new to fetch, and when it stops. A crash or a rebalance re-delivers up to an
interval's records more, which the ledger turns away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError

from shared.codec import encode_key, event_digest
from shared.dlq import EVENT_ID_REUSED, REFUSED_AT, TRUNCATED, carried_origin
from shared.events import one_error_per_attribute
from shared.kafka.producer import BrokerUnavailableError, OutboundRecord, Producer
from shared.logs import get_logger
from shared.metrics import (
    CONSUMER_BATCH_SECONDS,
    CONSUMER_BATCH_SIZE,
    CONSUMER_BROKER_CONTACT,
    CONSUMER_DUPLICATES,
    CONSUMER_LAG,
    CONSUMER_MISKEYED,
    CONSUMER_RECORDS,
    CONSUMER_RETRIES,
    DLQ_MESSAGES,
    forget_loop,
    heartbeat,
)
from shared.topics import dlq

log = get_logger(__name__)

T = TypeVar("T")

# How often a busy loop's long work between batches, and the broker watch, beat; and how long
# that work may take before its loop counts as stalled all the same.
BEAT_EVERY_S = 15.0
LONG_WORK_S = 30 * 60.0

# Errors worth retrying the whole batch for: the database or broker is away for a while.
# Anything else raised while applying one record is that record's fault and sends it to the DLQ.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    ConnectionError,
    TimeoutError,
    OSError,
    KafkaError,
    BrokerUnavailableError,
)


class PermanentError(Exception):
    """This record can never be applied as it is (a bug in its data, not in the weather)."""


@dataclass(frozen=True, slots=True)
class Delivered(Generic[T]):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: T
    timestamp_ms: int
    # What the value's id names, for the ledger to keep (shared.codec.event_digest): None
    # where the topic's ids are ours.
    digest: int | None = None


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    # Records not applied because their id was applied for another event (shared.db
    # Claimed.reused), each with what to tell its producer: the loop dead-letters them once
    # the handler's transaction has committed, so none is dropped unseen.
    reused: Sequence[tuple[Delivered[Any], str]] = ()


@dataclass(slots=True)
class _DeadLetter:
    record: ConsumerRecord[bytes, bytes]
    reason: str
    detail: str


@dataclass(slots=True)
class LoopStats:
    batches: int = 0
    records: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    miskeyed: int = 0
    commits: int = 0
    retries: int = 0
    positions: dict[TopicPartition, int] = field(default_factory=dict)


Decoder = Callable[[str, bytes], T]
Handler = Callable[[Sequence[Delivered[T]]], Awaitable[BatchResult | None]]


# PostgreSQL SQLSTATEs (classes or codes) of a server that is away for a while: connection
# exceptions, too many connections, shutting down or still recovering ("the database system is
# not yet accepting connections", 57P03, arrives as a bare DBAPIError after a crash restart);
# and of a transaction the server rolled back to let another go on (a deadlock, 40P01; a
# serialization failure, 40001): run again, it succeeds. Read as permanent, a batch that lost a
# deadlock to a webhook's transaction was split and its valid records dead-lettered.
TRANSIENT_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", "40P01", "40001")


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again may succeed (the database or broker is away)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(TRANSIENT_SQLSTATES):
            return True
    return isinstance(exc, TRANSIENT_ERRORS)


def _describe(exc: Exception) -> str:
    """What was wrong with a record, for the one who produced it: every field error as
    "path: message" (pydantic's own text opens with the model's internal name, e.g.
    "tagged-union[function-after[…], …]", and ends each error with a documentation link)."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(record)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in one_error_per_attribute(exc.errors(include_url=False))
    )


# A letter must fit in one request to the broker (message.max.bytes, 1 MiB by default) as our
# producer compresses it: a record that fit only thanks to its own producer's stronger
# compression (1.2 MB of base64, gzipped to 900 kB) came back from the broker as too large,
# which reads as the broker being away: the letter was retried for ever and the consumer stood
# still on every partition it had. A letter beyond this keeps the record's first
# ``DLQ_KEPT_BYTES`` and says how large it was (``TRUNCATED``); replay skips it.
DLQ_MAX_BYTES = 768 * 1024
DLQ_KEPT_BYTES = 64 * 1024


def _letter(d: _DeadLetter, group: str, now: str) -> OutboundRecord:
    """The dead letter of one record: its key and value, why, and where it came from."""
    key, value = d.record.key or b"", d.record.value or b""
    cut: tuple[tuple[str, bytes], ...] = ()
    if len(key) + len(value) + len(d.detail) > DLQ_MAX_BYTES:
        cut = ((TRUNCATED, str(len(value)).encode()),)
        key, value = key[:DLQ_KEPT_BYTES], value[:DLQ_KEPT_BYTES]
    return OutboundRecord(
        topic=dlq(d.record.topic),
        key=key,
        value=value,
        headers=(
            ("x-retain-error", d.reason.encode()),
            ("x-retain-error-detail", d.detail[:DLQ_KEPT_BYTES].encode()),
            *_origin(d.record, now),
            ("x-retain-group", group.encode()),
            *cut,
        ),
    )


def _origin(record: ConsumerRecord[bytes, bytes], now: str) -> tuple[tuple[str, bytes], ...]:
    """Where a dead letter's record came from and since when it is refused (this record, or,
    for a record a replay put back, its first letter's: ``shared.dlq.carried_origin``), and
    when this letter is."""
    origin = carried_origin(record.headers, record.topic) or (
        ("x-retain-topic", record.topic.encode()),
        ("x-retain-partition", str(record.partition).encode()),
        ("x-retain-offset", str(record.offset).encode()),
        ("x-retain-first-seen", now.encode()),
    )
    return (*origin, (REFUSED_AT, now.encode()))


def _reason(exc: BaseException) -> str:
    # A bounded label for metrics and headers: the class, never the message.
    return type(exc).__name__


class ConsumerLoop(Generic[T]):
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        group_id: str,
        decode: Decoder[T],
        handle: Handler[T],
        producer: Producer,
        max_records: int = 500,
        poll_timeout_ms: int = 500,
        max_backoff_s: float = 5.0,
        client_id: str | None = None,
        tick: Callable[[], Awaitable[None]] | None = None,
        tick_every_s: float = 0.0,
        session_timeout_ms: int = 10000,
        fetch_max_wait_ms: int = 500,
        fetch_min_bytes: int = 1,
        commit_interval_ms: int = 0,
    ) -> None:
        self._topics = list(topics)
        self._group_id = group_id
        self._decode = decode
        self._handle = handle
        self._producer = producer
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._max_backoff_s = max_backoff_s
        self._tick = tick
        # Under a full topic batches come back to back, and a tick's own transactions need not
        # follow each of them: at most one per ``tick_every_s`` (0: after every batch).
        self._tick_every_s = tick_every_s
        self._last_tick = float("-inf")
        # Offsets of applied batches not committed yet, and when they last were (0: every batch).
        self._commit_interval_s = commit_interval_ms / 1000
        self._pending: dict[TopicPartition, int] = {}
        self._last_commit = float("-inf")
        self._stopping = asyncio.Event()
        self.stats = LoopStats()
        self._lag_partitions: set[TopicPartition] = set()
        self._miskeyed_logged: dict[str, float] = {}  # topic → when a miskeyed record was last logged
        self.behind = True  # records waiting past our position, as of the latest fetch (or not known yet)
        self._consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id=client_id or group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=max_records,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 3),
            fetch_max_wait_ms=fetch_max_wait_ms,
            fetch_min_bytes=fetch_min_bytes,
            # Partition i of every topic goes to one consumer (the topics share a partition
            # count), so a customer's events, keyed alike on every topic, are applied by one
            # process: aiokafka's default, round robin over all the topics' partitions, gives
            # partition 0 of one topic and of the next to different consumers of a group. Round
            # robin stays listed so that a group rolling over from it can still agree on one.
            partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
        )

    @property
    def group_id(self) -> str:
        return self._group_id

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit it, and return."""
        self._stopping.set()

    async def _start(self) -> bool:
        """Start the producer and the consumer, waiting out a broker that is away (a worker
        restarted during a broker restart must not exit); False if asked to stop meanwhile."""
        backoff = 0.1
        while True:
            try:
                await self._producer.start()
                await self._consumer.start()
                return True
            except (KafkaError, BrokerUnavailableError, OSError) as exc:
                log.warning(
                    "broker unreachable at start; retrying",
                    group=self._group_id,
                    error=_reason(exc),
                    backoff_s=backoff,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                return False
            backoff = min(backoff * 2, self._max_backoff_s)

    async def run(self) -> None:
        # Until the broker first answers, the contact is the loop's start: a process restarted
        # while the broker is away ages into RetainConsumerBrokerUnreachable as the one it
        # replaced did (with no series, it said nothing while the broker stayed away).
        CONSUMER_BROKER_CONTACT.labels(self._group_id).set_to_current_time()
        if not await self._start():
            with contextlib.suppress(KeyError):
                CONSUMER_BROKER_CONTACT.remove(self._group_id)
            await self._consumer.stop()
            return
        log.info("consumer started", group=self._group_id, topics=self._topics)
        heartbeat(self._group_id)  # from here on, a first pass that hangs is a stall too
        watch = asyncio.create_task(self._watch_broker())
        try:
            while not self._stopping.is_set():
                await self.run_once()
                await self._run_tick()
                heartbeat(self._group_id)
            await self.commit_pending()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            forget_loop(self._group_id)
            with contextlib.suppress(KeyError):
                CONSUMER_BROKER_CONTACT.remove(self._group_id)
            await self._consumer.stop()
            log.info("consumer stopped", group=self._group_id, **self._summary())

    async def _run_tick(self) -> None:
        """The service's work between batches (sweeps, jobs, outbox); never kills the loop."""
        if self._tick is None or time.monotonic() - self._last_tick < self._tick_every_s:
            return
        self._last_tick = time.monotonic()
        try:
            await self._beating(self._tick())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried at the next tick, and logged with its type
            log.warning(
                "work between batches failed; retrying next time",
                group=self._group_id,
                error=_reason(exc),
                detail=str(exc)[:300],
            )

    async def _beating(self, work: Awaitable[None]) -> None:
        """Await ``work`` (the work between batches), beating while it runs for up to
        ``LONG_WORK_S``: a kpi's Grafana tables and CLV refit on a large history may take
        minutes, which is work, not a stall; past that bound it counts as one."""
        task = asyncio.ensure_future(work)
        started = time.monotonic()
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=BEAT_EVERY_S)
                if not task.done() and time.monotonic() - started < LONG_WORK_S:
                    heartbeat(self._group_id)
            task.result()
        finally:
            if not task.done():
                task.cancel()

    async def _watch_broker(self) -> None:
        """When the broker last answered: a metadata round trip every ``BEAT_EVERY_S``, apart
        from the loop's passes and from what its fetches buffered (a backlog leaves nothing to
        fetch for minutes, and a loop waiting out its database fetches nothing either)."""
        while True:
            try:
                async with asyncio.timeout(BEAT_EVERY_S):
                    await self._consumer.topics()
                CONSUMER_BROKER_CONTACT.labels(self._group_id).set_to_current_time()
            except (KafkaError, OSError, TimeoutError):
                pass  # the gauge stands still: RetainConsumerBrokerUnreachable
            await asyncio.sleep(BEAT_EVERY_S)

    def _summary(self) -> dict[str, int]:
        s = self.stats
        return {
            "batches": s.batches,
            "records": s.records,
            "applied": s.applied,
            "duplicates": s.duplicates,
            "dead_lettered": s.dead_lettered,
            "miskeyed": s.miskeyed,
        }

    async def run_once(self) -> int:
        """Consume, apply and commit one batch; return how many records it held."""
        batch = await self._consumer.getmany(timeout_ms=self._poll_timeout_ms, max_records=self._max_records)
        records = [r for tp in sorted(batch, key=lambda t: (t.topic, t.partition)) for r in batch[tp]]
        if not records:
            await self.commit_pending()  # caught up: what was applied need not wait any longer
            await self._record_lag()  # idle: the lag falls to 0 instead of freezing at the last batch's
            return 0
        started = time.perf_counter()
        decoded, dead = self._decode_all(records)
        if not await self._apply(decoded, dead):
            return 0  # stopping while the database was away: leave the batch uncommitted
        if dead and not await self._dead_letter(dead):
            return 0
        self._pending.update({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
        if time.monotonic() - self._last_commit >= self._commit_interval_s:
            await self.commit_pending()
        self.stats.batches += 1
        self.stats.records += len(records)
        CONSUMER_BATCH_SIZE.labels(self._group_id).observe(len(records))
        CONSUMER_BATCH_SECONDS.labels(self._group_id).observe(time.perf_counter() - started)
        await self._record_lag()
        return len(records)

    async def _record_lag(self) -> None:
        """Lag per held partition: its end as of our latest fetch (the last stable offset, since we
        read committed; the high watermark where the broker gives none) minus our position, which
        after the commit is the committed offset. Only what the fetches already told us: no extra
        broker calls. Partitions given away in a rebalance stop being reported here, so the new
        owner's series is the only one."""
        ends: dict[TopicPartition, int] = {}
        for tp in self._consumer.assignment():
            lso = self._consumer.last_stable_offset(tp)
            end = lso if lso is not None and lso >= 0 else self._consumer.highwater(tp)
            if end is not None:  # None: not fetched yet since the assignment
                ends[tp] = end
        reported: set[TopicPartition] = set()
        behind = len(ends) < len(self._consumer.assignment())  # a partition not fetched yet: unknown
        for tp, end in ends.items():
            try:
                position = await self._consumer.position(tp)
            except IllegalStateError:
                continue  # revoked while we looked
            CONSUMER_LAG.labels(self._group_id, tp.topic, str(tp.partition)).set(max(0, end - position))
            reported.add(tp)
            behind = behind or end > position
        for tp in self._lag_partitions - set(self._consumer.assignment()):
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self._group_id, tp.topic, str(tp.partition))
        self._lag_partitions = (self._lag_partitions & set(self._consumer.assignment())) | reported
        self.behind = behind

    def _decode_all(
        self, records: list[ConsumerRecord[bytes, bytes]]
    ) -> tuple[list[tuple[ConsumerRecord[bytes, bytes], Delivered[T]]], list[_DeadLetter]]:
        decoded: list[tuple[ConsumerRecord[bytes, bytes], Delivered[T]]] = []
        dead: list[_DeadLetter] = []
        for r in records:
            if r.value is None:
                # A tombstone: a producer deleting by key, which no topic of events does. Said
                # so, not "Invalid JSON: EOF while parsing" as an empty value is.
                detail = "a null value (a tombstone): events are never deleted by key, nothing to apply"
                dead.append(_DeadLetter(r, "undecodable", detail))
                continue
            try:
                value = self._decode(r.topic, r.value)
            except (ValidationError, ValueError, PermanentError) as exc:
                detail = _describe(exc)[:2000]
                dead.append(_DeadLetter(r, "undecodable", detail))
                continue
            delivered = Delivered(
                r.topic, r.partition, r.offset, r.key, value, r.timestamp, event_digest(value)
            )
            decoded.append((r, delivered))
            customer_id = getattr(value, "customer_id", None)
            if isinstance(customer_id, str) and r.key != encode_key(customer_id):
                self._miskeyed(r, customer_id, getattr(value, "event_id", None))
        return decoded, dead

    def _miskeyed(self, record: ConsumerRecord[bytes, bytes], customer_id: str, event_id: object) -> None:
        """Every topic is keyed by customer, so that one customer's events share a partition and
        stay in order. A record keyed otherwise is still applied (the consumers do not depend on
        the order), but its producer is told: counted, and logged once a minute per topic."""
        self.stats.miskeyed += 1
        CONSUMER_MISKEYED.labels(self._group_id, record.topic).inc()
        now = time.monotonic()
        if now - self._miskeyed_logged.get(record.topic, -float("inf")) < 60:
            return
        self._miskeyed_logged[record.topic] = now
        log.warning(
            "record not keyed by its customer id",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=None if record.key is None else record.key.decode("utf-8", "replace")[:200],
            customer_id=customer_id,
            event_id=event_id,
            hint="produce with key=customer_id.encode() (README, 'Producing straight to Kafka')",
        )

    async def _apply(
        self,
        decoded: list[tuple[ConsumerRecord[bytes, bytes], Delivered[T]]],
        dead: list[_DeadLetter],
    ) -> bool:
        if not decoded:
            return True
        items = [d for _, d in decoded]
        try:
            result = await self._retrying(lambda: self._handle(items))
        except asyncio.CancelledError:
            raise
        except _StoppedError:
            return False
        except Exception as exc:  # noqa: BLE001 - isolated below, record by record
            log.warning(
                "batch failed, applying record by record",
                group=self._group_id,
                error=_reason(exc),
                records=len(items),
            )
            return await self._apply_one_by_one(decoded, dead)
        self._count(result, decoded, dead)
        return True

    async def _apply_one_by_one(
        self,
        decoded: list[tuple[ConsumerRecord[bytes, bytes], Delivered[T]]],
        dead: list[_DeadLetter],
    ) -> bool:
        for record, item in decoded:
            try:
                result = await self._retrying(lambda item=item: self._handle([item]))  # type: ignore[misc]
            except _StoppedError:
                return False
            except Exception as exc:  # noqa: BLE001 - a poison record goes to the DLQ with its reason
                log.error(
                    "record cannot be applied",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    error=_reason(exc),
                    detail=str(exc)[:500],
                )
                dead.append(_DeadLetter(record, _reason(exc), str(exc)[:2000]))
                continue
            self._count(result, [(record, item)], dead)
        return True

    def _count(
        self,
        result: BatchResult | None,
        decoded: Sequence[tuple[ConsumerRecord[bytes, bytes], Delivered[T]]],
        dead: list[_DeadLetter],
    ) -> None:
        """Count what the handler did, and queue the records it refused for a reused id as dead
        letters (sent after its commit, with the batch's other letters)."""
        duplicates = result.duplicates if result else 0
        self.stats.applied += result.applied if result else len(decoded)
        self.stats.duplicates += duplicates
        refused: dict[int, str] = {id(item): detail for item, detail in result.reused} if result else {}
        for record, item in decoded:
            detail = refused.get(id(item))
            if detail is None:
                CONSUMER_RECORDS.labels(self._group_id, item.topic, "handled").inc()
                continue
            log.warning(
                "event id reused for another event: dead-lettered",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                event_id=getattr(item.value, "event_id", None),
            )
            dead.append(_DeadLetter(record, EVENT_ID_REUSED, detail))
        if duplicates:
            CONSUMER_DUPLICATES.labels(self._group_id).inc(duplicates)
            log.debug("duplicates skipped", group=self._group_id, duplicates=duplicates)

    async def _retrying(self, call: Callable[[], Awaitable[BatchResult | None]]) -> BatchResult | None:
        """Run ``call`` until it succeeds or fails permanently; transient errors back off."""
        backoff = 0.1
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.stats.retries += 1
                CONSUMER_RETRIES.labels(self._group_id, _reason(exc)).inc()
                log.warning(
                    "transient error, retrying batch",
                    group=self._group_id,
                    error=_reason(exc),
                    backoff_s=backoff,
                )
            if self._stopping.is_set():
                raise _StoppedError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _dead_letter(self, dead: list[_DeadLetter]) -> bool:
        now = datetime.now(UTC).isoformat()
        records = [_letter(d, self._group_id, now) for d in dead]
        try:
            await self._retrying(lambda: self._send(records))
        except _StoppedError:
            return False
        for d in dead:
            DLQ_MESSAGES.labels(d.record.topic, d.reason).inc()
            CONSUMER_RECORDS.labels(self._group_id, d.record.topic, "dead_lettered").inc()
            log.warning(
                "sent to dead-letter topic",
                topic=d.record.topic,
                partition=d.record.partition,
                offset=d.record.offset,
                reason=d.reason,
            )
        self.stats.dead_lettered += len(dead)
        return True

    async def _send(self, records: list[OutboundRecord]) -> None:
        await self._producer.send_all(records)

    async def commit_pending(self) -> None:
        """Commit the offsets of the batches applied since the last commit."""
        if not self._pending:
            return
        held = self._consumer.assignment()
        # A partition given away since its batch was applied is its new owner's to commit:
        # offering it would fail the whole commit, and the new owner's replay changes nothing.
        offsets = {tp: offset for tp, offset in self._pending.items() if tp in held}
        self._pending = {}
        self._last_commit = time.monotonic()
        if offsets:
            await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        backoff = 0.1
        while True:
            try:
                await self._consumer.commit(offsets)
                break
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced while we applied (or, IllegalStateError, the partitions
                # are no longer ours): the new owner re-delivers these records and the
                # recorded event ids make that a no-op.
                log.warning("commit failed after rebalance", group=self._group_id, error=str(exc))
                return
            except KafkaError as exc:
                if self._stopping.is_set():
                    log.warning("commit abandoned at stop", group=self._group_id, error=_reason(exc))
                    return
                # Counted as a batch's retry is: a commit failing for minutes (a coordinator
                # that does not settle) raises RetainConsumerRetrying, not only the stall alert.
                self.stats.retries += 1
                CONSUMER_RETRIES.labels(self._group_id, _reason(exc)).inc()
                log.warning("commit failed, retrying", group=self._group_id, error=_reason(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
        self.stats.commits += 1
        self.stats.positions.update(offsets)


class _StoppedError(Exception):
    """The loop was asked to stop while waiting out a transient error."""
