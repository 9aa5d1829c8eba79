"""The shared producer against the real broker: concurrent callers' records coalesce into
per-partition batches, and nothing of that changes what lands where, or in which order."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.codec import lz4_encode
from aiokafka.errors import KafkaConnectionError
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from shared.kafka.producer import (
    LZ4_LEVEL,
    MAX_BATCH_BYTES,
    BrokerUnavailableError,
    OutboundRecord,
    Producer,
    partition_for,
)
from tests.support.infra import KafkaHandle
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration


async def test_concurrent_callers_keep_per_key_order_and_the_default_partitioner(
    kafka: KafkaHandle, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}purchases"
    producer = Producer(kafka.bootstrap, client_id="producer-test")
    rng = random.Random(7)
    keys = [f"c{n}".encode() for n in range(40)]
    sequence: dict[bytes, int] = dict.fromkeys(keys, 0)
    headers_of: dict[bytes, tuple[tuple[str, bytes], ...]] = {}

    def record(key: bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> OutboundRecord:
        sequence[key] += 1
        value = f"{key.decode()}:{sequence[key]}".encode()
        headers_of[value] = headers
        return OutboundRecord(topic, key, value, headers)

    async def caller(n: int) -> None:
        # Each caller sends for customers of its own (as one client's requests would), a mix
        # of single records and batches, while the other callers share the partitions.
        own = keys[n::8]
        for _ in range(12):
            size = 1 if rng.random() < 0.5 else rng.randint(2, 40)
            await producer.send_all([record(rng.choice(own), (("n", str(n).encode()),)) for _ in range(size)])

    try:
        await asyncio.gather(*(caller(n) for n in range(8)))
        # A record larger than max_batch_size (16 KiB) travels in a batch of its own.
        await producer.send_all(
            [record(keys[0]), OutboundRecord(topic, keys[0], b"x" * 50_000), record(keys[0])]
        )
    finally:
        await producer.stop()

    records = await read_all(kafka.bootstrap, [topic])
    sent = sum(sequence.values()) + 1
    assert len(records) == sent
    seen: dict[bytes, list[int]] = {}
    for r in records:
        assert r.key is not None
        assert r.value is not None
        assert r.partition == partition_for(r.key, 3), "the Java client's partitioner decides"
        if r.value == b"x" * 50_000:
            continue
        seen.setdefault(r.key, []).append(int(r.value.split(b":")[1]))
        assert tuple(r.headers) == headers_of[r.value]
    for key, numbers in seen.items():
        assert numbers == list(range(1, sequence[key] + 1)), (
            f"order of {key!r} within its partition: {numbers}"
        )


async def test_an_unreachable_broker_is_one_error_type_after_the_deadline() -> None:
    producer = Producer("127.0.0.1:1", client_id="producer-test", ack_timeout_s=1.0)
    with pytest.raises(BrokerUnavailableError):
        await producer.send_all([OutboundRecord("t", b"k", b"v")])
    await producer.stop()


async def test_a_client_that_keeps_failing_is_replaced_by_a_fresh_one(
    kafka: KafkaHandle, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After sends fail for three deadlines in a row (a client that lost the broker for good,
    as the chaos suite saw), the next send starts a fresh client and gets through."""
    topic = f"{topic_prefix}purchases"
    clock = [1000.0]
    producer = Producer(kafka.bootstrap, client_id="producer-test", ack_timeout_s=1.0, clock=lambda: clock[0])
    await producer.send_all([OutboundRecord(topic, b"c1", b"before")])
    stuck = producer._producer
    assert stuck is not None

    async def refuse(*_args: object, **_kwargs: object) -> None:
        raise KafkaConnectionError("Unable connect to node with id 1")

    # Every record, a lone one too, reaches the client through send_batch.
    monkeypatch.setattr(stuck, "send_batch", refuse)
    for _ in range(3):
        with pytest.raises(BrokerUnavailableError):
            await producer.send_all([OutboundRecord(topic, b"c1", b"lost")])
        assert producer._producer is stuck, "one failure, or a short run of them, keeps the client"
        clock[0] += 1.0
    clock[0] += 3.0  # three deadlines of failures without one acknowledgement
    with pytest.raises(BrokerUnavailableError):
        await producer.send_all([OutboundRecord(topic, b"c1", b"lost")])
    assert producer._producer is None
    await producer.send_all([OutboundRecord(topic, b"c1", b"after")])
    assert producer._producer is not stuck
    await producer.stop()
    values = [r.value for r in await read_all(kafka.bootstrap, [topic])]
    assert values == [b"before", b"after"]


async def test_records_beyond_one_batch_go_out_as_several_in_order(
    kafka: KafkaHandle, topic_prefix: str
) -> None:
    """One call's records for one partition, far more than a batch holds, and a second call
    queued behind them: every record lands, in the order sent."""
    topic = f"{topic_prefix}support"
    producer = Producer(kafka.bootstrap, client_id="producer-test")
    first = [OutboundRecord(topic, b"c1", b"%06d" % n + b"." * 300) for n in range(1500)]
    second = [OutboundRecord(topic, b"c1", b"%06d" % n + b"." * 300) for n in range(1500, 1600)]
    try:
        await asyncio.gather(producer.send_all(first), producer.send_all(second))
    finally:
        await producer.stop()
    records = await read_all(kafka.bootstrap, [topic])
    assert [int(r.value[:6]) for r in records if r.value is not None] == list(range(1600))


def test_record_batches_are_compressed_in_lz4_fast_mode_and_read_back_whole() -> None:
    # The builder aiokafka uses, as it uses it; 61 bytes of v2 batch header stay uncompressed.
    header = 61
    values = [b'{"event_id":"e-%d","type":"purchase","amount":"%d.90"}' % (n, n) for n in range(200)]

    def built(compression: int) -> bytes:
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=compression,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=MAX_BATCH_BYTES,
        )
        # One fixed timestamp (ms): with None each record takes the clock's, and the two builds
        # differed whenever a millisecond ticked between them (make test saw it once).
        for offset, value in enumerate(values):
            builder.append(offset, timestamp=1_764_150_000_000, key=b"c1", value=value, headers=[])
        return bytes(builder.build())

    plain, compressed = built(DefaultRecordBatch.CODEC_NONE), built(DefaultRecordBatch.CODEC_LZ4)
    assert compressed[header:] == lz4_encode(plain[header:], level=LZ4_LEVEL)
    assert compressed[header:] != lz4_encode(plain[header:], level=9)  # aiokafka's own level
    assert [r.value for r in DefaultRecordBatch(compressed)] == values
