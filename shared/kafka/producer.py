"""The one producer everybody uses: acks=all, idempotent, keyed by customer, compressed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

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
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._ack_timeout_s = ack_timeout_s
        self._linger_ms = linger_ms
        self._compression = compression
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

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
            if self._producer is not None:
                await self._producer.stop()  # flushes what is buffered
                self._producer = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def send_all(self, records: Sequence[OutboundRecord]) -> None:
        """Send every record and return once the broker has acknowledged all of them.

        Records are handed to the producer in order, so records with the same key keep their
        order within the partition (the idempotent producer preserves it across retries).
        """
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None  # noqa: S101 - set by start() or it raised
        try:
            # One deadline for queueing (which waits for metadata while the broker is away)
            # and for the acknowledgements.
            async with asyncio.timeout(self._ack_timeout_s):
                # send() with the partition given: the accumulator merges records of
                # concurrent requests into shared batches, and the cached partitioner spares
                # the pure-Python murmur2 hash per record.
                futures = []
                for r in records:
                    partition = await self._partition_of(producer, r)
                    futures.append(
                        await producer.send(
                            r.topic, r.value, key=r.key, partition=partition, headers=list(r.headers)
                        )
                    )
                await (futures[0] if len(futures) == 1 else asyncio.gather(*futures))
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailableError(f"Kafka did not acknowledge: {exc!r}") from exc

    async def _partition_of(self, producer: AIOKafkaProducer, record: OutboundRecord) -> int:
        known = producer.client.cluster.partitions_for_topic(record.topic)
        partitions = known if known else await producer.partitions_for(record.topic)
        return partition_for(record.key, len(partitions))

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
