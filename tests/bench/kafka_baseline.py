"""The Kafka baseline: aiokafka ``create_batch()``/``send_batch()`` alone, no HTTP, no validation.

The producer has the settings of ``shared/kafka/producer.py`` (acks=all, idempotent, lz4, the
same linger and request timeout). The events are the ones the HTTP measurements send, validated
and encoded with ``shared.codec`` exactly as ingest encodes them, keyed by customer and put on
the partition the default partitioner would choose. One task per topic-partition sends groups of
``batch_size`` events (a group spans more than one ``BatchBuilder`` when it exceeds the
producer's ``max_batch_size``, as ingest's own sends do) and waits for their acks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from shared.codec import encode_event, encode_key
from shared.events import EVENT_LIST_ADAPTER, TOPIC_OF_TYPE
from shared.kafka.producer import Producer
from tests.bench.infra import cpu_seconds
from tests.bench.payloads import events


@dataclass(frozen=True)
class SendBatchResult:
    events: int
    elapsed_s: float
    batches: int  # BatchBuilders sent inside the window
    own_cpu: float  # CPU seconds per second of window
    watched_cpu: dict[str, float]

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


Record = tuple[bytes, bytes]


def _records(topic_prefix: str, partitions: int, count: int) -> dict[tuple[str, int], list[Record]]:
    partitioner: Any = DefaultPartitioner()
    every = list(range(partitions))
    validated = EVENT_LIST_ADAPTER.validate_python(list(events(uuid.uuid4().hex[:12], 0, count)))
    out: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for event in validated:
        key = encode_key(event.customer_id)
        partition: int = partitioner(key, every, every)
        out[(f"{topic_prefix}{TOPIC_OF_TYPE[event.type]}", partition)].append((key, encode_event(event)))
    return dict(out)


def _producer(bootstrap: str) -> Any:
    # Same construction as the service's producer: the settings cannot drift apart.
    return Producer(bootstrap, client_id="retain-bench-baseline")._new()


async def _measure(
    *,
    bootstrap: str,
    topic_prefix: str,
    partitions: int,
    batch_size: int,
    warmup_s: float,
    seconds: float,
    watch_pids: dict[str, int],
) -> SendBatchResult:
    per_tp = _records(topic_prefix, partitions, max(20_000, 4 * partitions * batch_size * 4))
    producer = _producer(bootstrap)
    await producer.start()
    measuring = False
    stopping = False
    acked = 0
    batches = 0

    async def worker(topic: str, partition: int, records: list[Record]) -> None:
        nonlocal acked, batches
        i = 0
        while not stopping:
            futures = []
            batch = producer.create_batch()
            for _ in range(batch_size):
                key, value = records[i % len(records)]
                i += 1
                if batch.append(key=key, value=value, timestamp=None) is None:
                    batch.close()
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise RuntimeError("one record does not fit an empty batch")
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
            if measuring:
                acked += batch_size
                batches += len(futures)

    try:
        tasks = [asyncio.create_task(worker(t, p, r)) for (t, p), r in per_tp.items()]
        await asyncio.sleep(warmup_s)
        before = {name: cpu_seconds(pid) for name, pid in watch_pids.items()}
        own_before = time.process_time()
        started = time.perf_counter()
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - started
        own = (time.process_time() - own_before) / elapsed
        watched: dict[str, float] = {}
        for name, pid in watch_pids.items():
            start, end = before[name], cpu_seconds(pid)
            if start is not None and end is not None:
                watched[name] = (end - start) / elapsed
        stopping = True
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    return SendBatchResult(acked, elapsed, batches, own, watched)


def run_send_batch(
    bootstrap: str,
    topic_prefix: str,
    *,
    partitions: int,
    batch_size: int,
    warmup_s: float,
    seconds: float,
    watch_pids: dict[str, int],
) -> SendBatchResult:
    try:
        import uvloop  # noqa: PLC0415 - the loop uvicorn runs ingest's producer on

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(
            _measure(
                bootstrap=bootstrap,
                topic_prefix=topic_prefix,
                partitions=partitions,
                batch_size=batch_size,
                warmup_s=warmup_s,
                seconds=seconds,
                watch_pids=watch_pids,
            )
        )
