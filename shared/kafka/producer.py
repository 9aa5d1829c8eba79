"""The one producer everybody uses: acks=all, idempotent, keyed by customer, compressed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from shared.logs import get_logger

log = get_logger(__name__)


@lru_cache(maxsize=200_000)
def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2, as the Java client), cached per key: customers
    come back, and the pure-Python hash is the dearest part of producing one record."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


# As the producer's metadata_max_age_ms: partitions added to a topic are seen as soon.
_PARTITION_COUNT_TTL_S = 30.0


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue  # its caller gave up (timeout, cancellation)
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
            waiter.exception()  # its caller may have gone; asyncio must not log it as lost


def _settled_by(waiters: list[asyncio.Future[None]], delivered: asyncio.Future[Any]) -> None:
    if delivered.cancelled():
        _settle(waiters, KafkaError("the batch was cancelled"))
    else:
        _settle(waiters, delivered.exception())


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
        self._queued: dict[tuple[str, int], list[tuple[OutboundRecord, asyncio.Future[None]]]] = {}
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
        Several records go through one pump per partition: while its previous batch waits in
        the producer, the records of every caller pile up behind it and go out together as
        the next ``BatchBuilder``, which is aiokafka's own batching without its per-record
        ``send()`` (it cost more CPU than the rest of a batched request). A lone record takes
        ``send()``, whose lingering batch gathers concurrent callers' single records better
        (both measured in ``make bench``).
        """
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None  # noqa: S101 - set by start() or it raised
        try:
            # One deadline for queueing (which waits for metadata while the broker is away)
            # and for the acknowledgements.
            async with asyncio.timeout(self._ack_timeout_s):
                if len(records) == 1:
                    r = records[0]
                    partition = await self._partition_of(producer, r)
                    await (
                        await producer.send(
                            r.topic, r.value, key=r.key, partition=partition, headers=list(r.headers)
                        )
                    )
                    self._failing_since = None
                    return
                loop = asyncio.get_running_loop()
                acks: list[asyncio.Future[None]] = []
                for r in records:
                    tp = (r.topic, await self._partition_of(producer, r))
                    ack: asyncio.Future[None] = loop.create_future()
                    queue = self._queued.get(tp)
                    if queue is None:
                        queue = self._queued[tp] = []
                        if tp not in self._pumps:
                            self._pumps[tp] = loop.create_task(self._pump(tp))
                    queue.append((r, ack))
                    acks.append(ack)
                try:
                    for ack in acks:
                        await ack
                except BaseException:
                    # The caller gives up (deadline, cancellation): whatever of its records is
                    # still queued is not sent, so a backlog built while the broker was away
                    # cannot hold up the callers that come after it. (A caller that gives up
                    # resends; what did go out is dropped downstream by its event id.)
                    for ack in acks:
                        ack.cancel()
                    raise
        except (KafkaError, TimeoutError) as exc:
            await self._failed(producer)
            raise BrokerUnavailableError(f"Kafka did not acknowledge: {exc!r}") from exc
        self._failing_since = None

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
            while (entries := self._queued.pop(tp, None)) is not None:
                # The client of the moment: _failed may have replaced the one this pump began with.
                producer = self._producer
                if producer is None:
                    _settle([ack for _, ack in entries], KafkaError("the Kafka client is being replaced"))
                    continue
                for batch, waiters in self._batches(producer, entries):
                    try:
                        # Returns once the partition's previous batch has left for the broker.
                        delivered = await producer.send_batch(batch, topic, partition=partition)
                    except Exception as exc:  # noqa: BLE001 - every waiter gets the cause
                        _settle(waiters, exc)
                        continue
                    delivered.add_done_callback(functools.partial(_settled_by, waiters))
        finally:
            del self._pumps[tp]
            for _, ack in self._queued.pop(tp, ()):
                _settle([ack], KafkaError("the producer stopped"))

    @staticmethod
    def _batches(
        producer: AIOKafkaProducer, entries: list[tuple[OutboundRecord, asyncio.Future[None]]]
    ) -> Iterator[tuple[Any, list[asyncio.Future[None]]]]:
        """Split one partition's records into batches of at most ``max_batch_size`` bytes (a
        batch always takes its first record, so a larger record travels alone, as with send())."""
        batch = producer.create_batch()
        waiters: list[asyncio.Future[None]] = []
        for record, ack in entries:
            if ack.done():
                continue  # its caller gave up before the record left
            headers = list(record.headers)
            if batch.append(key=record.key, value=record.value, timestamp=None, headers=headers) is None:
                yield batch, waiters
                batch, waiters = producer.create_batch(), []
                batch.append(key=record.key, value=record.value, timestamp=None, headers=headers)
            waiters.append(ack)
        if waiters:
            yield batch, waiters

    async def _partition_of(self, producer: AIOKafkaProducer, record: OutboundRecord) -> int:
        # The partition count per topic, looked up again once the metadata may have changed:
        # the client's lookup copies the topic's partition set on every call (a profile showed
        # it as 5% of a single-event request).
        now = time.monotonic()
        known = self._partition_counts.get(record.topic)
        if known is None or now - known[1] > _PARTITION_COUNT_TTL_S:
            partitions = producer.client.cluster.partitions_for_topic(record.topic)
            if not partitions:
                partitions = await producer.partitions_for(record.topic)
            known = self._partition_counts[record.topic] = (len(partitions), now)
        return partition_for(record.key, known[0])

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
