"""The one producer everybody uses: acks=all, idempotent, keyed by customer, compressed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import aiokafka.record.default_records
from aiokafka import AIOKafkaProducer
from aiokafka.codec import lz4_encode
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.record._crecords import default_records as c_default_records

from shared.logs import get_logger

log = get_logger(__name__)


@lru_cache(maxsize=200_000)
def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, as the Java client), cached per key: customers
    come back, and the pure-Python hash is the dearest part of producing one record."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


# The most bytes of records (before compression) in one batch for one partition. aiokafka has
# one produce request in flight per broker, holding one batch per partition: at its default
# of 16 KiB a relay with 10,000 customer_update (1-2 KiB each) to send needed a hundred round
# trips, and the segmenter waited for them (make bench). Well below the broker's default
# message.max.bytes (1 MiB), which a compressed batch must fit.
MAX_BATCH_BYTES = 512 * 1024

# lz4's fast mode. aiokafka compresses lz4 at level 9, which is LZ4HC (the broker's default
# level when it recompresses itself), and has no setting for it. On a batch of 70 ingest
# events (18 KB) level 9 took 64 µs and made 4.3 KB, level 1 took 10 µs and made 4.9 KB.
# Ingest's throughput went from 63,187 to 83,203 events/s for batches of 100 and from 7,105
# to 7,663 for single events (make bench), for 0.6 KB more a batch on the wire. Any level
# decompresses the same way, so consumers see no difference.
LZ4_LEVEL = 1


def _lz4_encode(payload: Any) -> bytes:
    compressed: bytes = lz4_encode(payload, level=LZ4_LEVEL)
    return compressed


# Both record batch builders (the C one is the one in use) look the codec up by this name at
# every batch.
c_default_records.lz4_encode = _lz4_encode
aiokafka.record.default_records.lz4_encode = _lz4_encode

# As the producer's metadata_max_age_ms: partitions added to a topic are seen as soon.
_PARTITION_COUNT_TTL_S = 30.0


class _Waiter:
    """One ``send_all`` call: what it awaits, and how many of its partitions' groups the broker
    has still to acknowledge."""

    __slots__ = ("future", "pending")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.pending = 0


class _Group:
    """The records of one partition queued since its pump last took them, and their callers.

    Columns of bytes rather than a tuple and a future per record: under load a request waits
    for the broker with all of its records queued, and the collector walks whatever objects
    they are (in ingest's batched requests it took 13% of the CPU with per-record objects, 4%
    without; make bench).
    """

    __slots__ = ("headers", "keys", "outstanding", "spans", "values")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.headers: dict[int, tuple[tuple[str, bytes], ...]] = {}  # of the records that have any
        # Each caller's records are one run [start, end) of the columns: a call queues all of
        # its records without awaiting in between.
        self.spans: list[tuple[int, int, _Waiter]] = []
        self.outstanding = 0  # batches sent and not yet acknowledged; -1 once settled by a failure

    def settle(self, exc: BaseException | None) -> None:
        for _, _, waiter in self.spans:
            future = waiter.future
            if future.done():
                continue  # its caller gave up (deadline, cancellation), or another group failed it
            if exc is not None:
                future.set_exception(exc)
            else:
                waiter.pending -= 1
                if waiter.pending == 0:
                    future.set_result(None)

    def delivered(self, delivery: asyncio.Future[Any]) -> None:
        """The done callback of one of the group's batches."""
        if self.outstanding < 0:
            return
        exc = KafkaError("the batch was cancelled") if delivery.cancelled() else delivery.exception()
        if exc is not None:
            self.outstanding = -1
            self.settle(exc)
            return
        self.outstanding -= 1
        if self.outstanding == 0:
            self.settle(None)


_NO_HEADERS: list[tuple[str, bytes]] = []


class BrokerUnavailableError(RuntimeError):
    """The broker did not acknowledge in time; the caller may resend the same records."""


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class Producer:
    """A started-on-demand ``AIOKafkaProducer`` that reports broker trouble as one error type.

    It starts lazily and restarts after a failed start, so a service comes up (and answers
    /healthz) while the broker is still down, and recovers without a restart of its own.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str,
        ack_timeout_s: float = 10.0,
        linger_ms: int = 2,
        compression: str = "lz4",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._ack_timeout_s = ack_timeout_s
        self._linger_ms = linger_ms
        self._compression = compression
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._partition_counts: dict[str, tuple[int, float]] = {}
        # Records waiting for their partition's pump, in the order they came, and the pumps.
        self._queued: dict[tuple[str, int], _Group] = {}
        self._pumps: dict[tuple[str, int], asyncio.Task[None]] = {}
        # When the broker last acknowledged, and since when sends have failed without one.
        self._failing_since: float | None = None
        self._clock = clock

    def _new(self) -> AIOKafkaProducer:
        request_timeout_ms = int(self._ack_timeout_s * 1000)
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            compression_type=self._compression,
            linger_ms=self._linger_ms,
            max_batch_size=MAX_BATCH_BYTES,
            request_timeout_ms=request_timeout_ms,
            # Fail fast enough that an HTTP caller gets its 503 before its own timeout.
            metadata_max_age_ms=30000,
        )

    async def start(self) -> None:
        async with self._lock:
            if self._producer is not None:
                return
            producer = self._new()
            try:
                await asyncio.wait_for(producer.start(), self._ack_timeout_s)
            except (KafkaError, OSError, TimeoutError) as exc:
                await producer.stop()
                raise BrokerUnavailableError(f"cannot reach Kafka at {self._bootstrap}: {exc}") from exc
            self._producer = producer

    async def stop(self) -> None:
        async with self._lock:
            # What callers queued reaches the producer, which flushes it on stop.
            await asyncio.gather(*self._pumps.values(), return_exceptions=True)
            if self._producer is not None:
                await self._producer.stop()  # flushes what is buffered
                self._producer = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def send_all(self, records: Sequence[OutboundRecord]) -> None:
        """Send every record and return once the broker has acknowledged all of them.

        Records are queued per partition in order, so records with the same key keep their
        order within the partition (the idempotent producer preserves it across retries).
        One pump per partition hands them to the producer: while its previous batch waits in
        the producer, the records of every caller pile up behind it and go out together as
        the next ``BatchBuilder``, which is aiokafka's own batching without its per-record
        ``send()`` and future. That cost more CPU than the rest of a batched request, and for
        64 concurrent single-record callers 27-30 µs a record against 19-23 (make bench).
        """
        await self.send_columns(
            [r.topic for r in records],
            [r.key for r in records],
            [r.value for r in records],
            [r.headers for r in records] if any(r.headers for r in records) else None,
        )

    async def send_columns(
        self,
        topics: Sequence[str],
        keys: Sequence[bytes],
        values: Sequence[bytes],
        headers: Sequence[tuple[tuple[str, bytes], ...]] | None = None,
    ) -> None:
        """``send_all`` for records given as columns (record ``i`` is ``topics[i]``,
        ``keys[i]``, ``values[i]``, ``headers[i]``): the same, without an object per record,
        for a caller that produces many (ingest)."""
        if not keys:
            return
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None  # noqa: S101 - set by start() or it raised
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        try:
            # One deadline for queueing (which waits for metadata while the broker is away)
            # and for the acknowledgements.
            async with asyncio.timeout(self._ack_timeout_s):
                counts = await self._partition_counts_of(producer, set(topics))
                self._enqueue(topics, keys, values, headers, counts, waiter)
                # Cancelled by the deadline, the future tells the pumps that the caller gave
                # up: whatever of its records is still queued is not sent, so a backlog built
                # while the broker was away cannot hold up the callers that come after it. (A
                # caller that gives up resends; what did go out is dropped downstream by its
                # event id.)
                await waiter.future
        except (KafkaError, TimeoutError) as exc:
            await self._failed(producer)
            raise BrokerUnavailableError(f"Kafka did not acknowledge: {exc!r}") from exc
        self._failing_since = None

    def _enqueue(
        self,
        topics: Sequence[str],
        keys: Sequence[bytes],
        values: Sequence[bytes],
        headers: Sequence[tuple[tuple[str, bytes], ...]] | None,
        counts: dict[str, int],
        waiter: _Waiter,
    ) -> None:
        queued = self._queued
        starts: dict[_Group, int] = {}
        for i, (topic, key) in enumerate(zip(topics, keys, strict=True)):
            tp = (topic, partition_for(key, counts[topic]))
            group = queued.get(tp)
            if group is None:
                group = queued[tp] = _Group()
                if tp not in self._pumps:
                    self._pumps[tp] = asyncio.get_running_loop().create_task(self._pump(tp))
            if group not in starts:
                starts[group] = len(group.keys)
            group.keys.append(key)
            group.values.append(values[i])
            if headers is not None and headers[i]:
                group.headers[len(group.keys) - 1] = headers[i]
        for group, start in starts.items():
            group.spans.append((start, len(group.keys), waiter))
        waiter.pending = len(starts)

    async def _failed(self, producer: AIOKafkaProducer) -> None:
        """After sends have failed for three deadlines in a row, replace the client.

        A broker that comes back normally is found again by the same client. But after a
        restart, aiokafka was seen (in the chaos suite) to keep dialling a node that refused
        it for minutes while every other client had long reconnected; a fresh client starts
        from the bootstrap address. Records it held are dropped, not lost: their callers got
        an error and resend them, and consumers drop what did arrive twice by event id.
        """
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
            return
        if now - self._failing_since < 3 * self._ack_timeout_s:
            return
        stop_stale = producer.stop
        async with self._lock:
            if self._producer is not producer:
                return  # another caller replaced it already
            self._producer = None
            self._failing_since = None
        log.warning("replacing the Kafka producer after failing sends", bootstrap=self._bootstrap)
        with contextlib.suppress(Exception):
            # Its batches never expire (idempotence): stop() would wait for the broker.
            await asyncio.wait_for(stop_stale(), 1.0)

    async def _pump(self, tp: tuple[str, int]) -> None:
        """Hand one partition's queued records to the producer until none are left."""
        topic, partition = tp
        try:
            while (group := self._queued.pop(tp, None)) is not None:
                # The client of the moment: _failed may have replaced the one this pump began with.
                producer = self._producer
                if producer is None:
                    group.settle(KafkaError("the Kafka client is being replaced"))
                    continue
                batches = self._batches(producer, group)
                group.outstanding = len(batches)
                for batch in batches:
                    try:
                        # Returns once the partition's previous batch has left for the broker.
                        delivery = await producer.send_batch(batch, topic, partition=partition)
                    except Exception as exc:  # noqa: BLE001 - every waiter gets the cause
                        group.outstanding = -1
                        group.settle(exc)
                        break
                    delivery.add_done_callback(group.delivered)
        finally:
            del self._pumps[tp]
            left = self._queued.pop(tp, None)
            if left is not None:
                left.settle(KafkaError("the producer stopped"))

    @staticmethod
    def _batches(producer: AIOKafkaProducer, group: _Group) -> list[Any]:
        """The group's records, but those of callers that gave up, in batches of at most
        ``max_batch_size`` bytes (a batch always takes its first record, so a larger record
        travels alone, as with send()).

        Each batch is closed: a closed batch leaves with the producer's next request instead
        of lingering ``linger_ms`` first. Its records have waited already, behind the batch
        before it; lingering only held back the records queued meanwhile (64 single-record
        callers took three times the CPU a record, in batches a fifth as full; make bench).
        """
        batches: list[Any] = []
        batch = producer.create_batch()
        keys, values, headers = group.keys, group.values, group.headers
        for start, end, waiter in group.spans:
            if waiter.future.done():
                continue
            for i in range(start, end):
                h = list(headers[i]) if headers and i in headers else _NO_HEADERS
                if batch.append(key=keys[i], value=values[i], timestamp=None, headers=h) is None:
                    batches.append(batch)
                    batch = producer.create_batch()
                    batch.append(key=keys[i], value=values[i], timestamp=None, headers=h)
        if batch.record_count():
            batches.append(batch)
        for full in batches:
            full.close()
        return batches

    async def _partition_counts_of(self, producer: AIOKafkaProducer, topics: set[str]) -> dict[str, int]:
        # The partition count per topic, looked up again once the metadata may have changed:
        # the client's lookup copies the topic's partition set on every call (a profile showed
        # it as 5% of a single-event request).
        now = time.monotonic()
        counts: dict[str, int] = {}
        for topic in topics:
            known = self._partition_counts.get(topic)
            if known is None or now - known[1] > _PARTITION_COUNT_TTL_S:
                partitions = producer.client.cluster.partitions_for_topic(topic)
                if not partitions:
                    partitions = await producer.partitions_for(topic)
                known = self._partition_counts[topic] = (len(partitions), now)
            counts[topic] = known[0]
        return counts

    async def healthy(self) -> bool:
        if self._producer is None:
            try:
                await self.start()
            except BrokerUnavailableError:
                return False
        assert self._producer is not None  # noqa: S101
        client = self._producer.client
        try:
            return bool(await asyncio.wait_for(client.fetch_all_metadata(), 5.0))
        except (KafkaError, OSError, TimeoutError):
            return False

    async def topics(self) -> set[str]:
        if self._producer is None:
            await self.start()
        assert self._producer is not None  # noqa: S101
        metadata = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), 5.0)
        return set(metadata.topics())
