"""The real Kafka broker (shared.infra.kafka_broker) against the aiokafka features Retain uses."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared import metrics as metrics_module
from shared.codec import decode_event
from shared.events import Event
from shared.infra.kafka_broker import KafkaBrokerError, LocalKafkaBroker, ensure_jars
from shared.kafka import consumer as consumer_module
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.metrics import CONSUMER_BROKER_CONTACT
from shared.topics import ensure_topics, wait_for_group_coordinators

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def kafka_libs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_jars(tmp_path_factory.mktemp("kafka-jars"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path) -> Iterator[LocalKafkaBroker]:
    b = LocalKafkaBroker(
        tmp_path_factory.mktemp("kafka-var"),
        port=_free_port(),
        controller_port=_free_port(),
        num_partitions=3,
        libs_dir=kafka_libs,
    )
    b.start(timeout=90)
    try:
        yield b
    finally:
        b.stop(timeout=30)
    assert not b.is_running()
    assert b.returncode in (0, 143)  # 143: JVM exit after SIGTERM + shutdown hooks


async def _create_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        assert all(err[1] == 0 for err in resp.topic_errors), resp
    finally:
        await admin.close()


async def _consume_all(consumer: AIOKafkaConsumer, expected: int, within: float = 20) -> list[bytes]:
    values: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(values) < expected and loop.time() < deadline:
        batch = await consumer.getmany(timeout_ms=500)
        for msgs in batch.values():
            values.extend(m.value for m in msgs)
    return values


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_consumers_join_a_fresh_broker_without_coordinator_warnings_once_waited_for(
    broker: LocalKafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """First in this module, on the module's fresh broker (no __consumer_offsets yet): what
    ``make run`` does before starting the services. Without the wait, each consumer's first join
    logged GroupCoordinatorNotAvailable and 'Marking the coordinator dead' warnings."""
    groups = ["fresh-segmenter", "fresh-kpi"]
    await wait_for_group_coordinators(broker.bootstrap, groups, timeout_s=60)
    topic = _topic("fresh")
    await ensure_topics(broker.bootstrap, [topic], 3)  # as make run: waits until the topic is seen
    caplog.set_level(logging.INFO, logger="aiokafka")
    for group in groups:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=broker.bootstrap, group_id=group, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=200)
            await consumer.commit({TopicPartition(topic, 0): 0})
            assert await consumer.committed(TopicPartition(topic, 0)) == 0
        finally:
            await consumer.stop()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned


async def test_idempotent_producer_roundtrip(broker: LocalKafkaBroker) -> None:
    topic = _topic("idem")
    await _create_topics(broker.bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, f"c{i % 5}:{i}".encode(), key=f"c{i % 5}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        values = await _consume_all(consumer, 30)
    finally:
        await consumer.stop()
    assert sorted(values) == sorted(f"c{i % 5}:{i}".encode() for i in range(30))
    # same key -> same partition -> per-key order holds
    for key in range(5):
        mine = [v for v in values if v.startswith(f"c{key}:".encode())]
        assert mine == [f"c{key}:{i}".encode() for i in range(key, 30, 5)]


async def test_transactions_read_committed(broker: LocalKafkaBroker) -> None:
    source, sink = _topic("tx-in"), _topic("tx-out")
    await _create_topics(broker.bootstrap, source, sink)
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send(sink, b"committed-1", key=b"k")
        await producer.send_offsets_to_transaction({TopicPartition(source, 0): 7}, "tx-group")
        await producer.commit_transaction()

        await producer.begin_transaction()
        await producer.send(sink, b"aborted", key=b"k")
        await producer.abort_transaction()

        async with producer.transaction():
            await producer.send(sink, b"committed-2", key=b"k")
    finally:
        await producer.stop()

    committed = AIOKafkaConsumer(
        sink,
        bootstrap_servers=broker.bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    uncommitted = AIOKafkaConsumer(
        sink,
        bootstrap_servers=broker.bootstrap,
        isolation_level="read_uncommitted",
        auto_offset_reset="earliest",
    )
    await committed.start()
    await uncommitted.start()
    try:
        assert await _consume_all(committed, 2) == [b"committed-1", b"committed-2"]
        assert await _consume_all(uncommitted, 3) == [b"committed-1", b"aborted", b"committed-2"]
    finally:
        await committed.stop()
        await uncommitted.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets("tx-group")
    finally:
        await admin.close()
    assert offsets[TopicPartition(source, 0)].offset == 7


async def test_consumer_group_manual_commit(broker: LocalKafkaBroker) -> None:
    topic = _topic("group")
    await _create_topics(broker.bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode(), partition=0)
    finally:
        await producer.stop()

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap,
            group_id="manual",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    first = consumer()
    await first.start()
    try:
        seen = await _consume_all(first, 10)
        assert seen == [f"m{i}".encode() for i in range(10)]
        await first.commit({TopicPartition(topic, 0): 6})  # only m0..m5 are "applied"
        assert await first.committed(TopicPartition(topic, 0)) == 6
    finally:
        await first.stop()

    second = consumer()
    await second.start()
    try:
        assert await _consume_all(second, 4) == [f"m{i}".encode() for i in range(6, 10)]
    finally:
        await second.stop()


async def test_admin_create_describe_list(broker: LocalKafkaBroker) -> None:
    topic = _topic("admin")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(topic, 4, 1)])
        assert resp.topic_errors[0][1] == 0
        again = await admin.create_topics([NewTopic(topic, 4, 1)])
        assert again.topic_errors[0][1] == 36  # TOPIC_ALREADY_EXISTS
        assert topic in await admin.list_topics()
        (described,) = await admin.describe_topics([topic])
        assert described["error_code"] == 0
        assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2, 3]
        assert all(p["replicas"] == [1] and p["leader"] == 1 for p in described["partitions"])
        cluster = await admin.describe_cluster()
        assert [b["port"] for b in cluster["brokers"]] == [broker.port]
    finally:
        await admin.close()


async def test_restart_reuses_data_and_refuses_second_broker(tmp_path: Path, kafka_libs: Path) -> None:
    b = LocalKafkaBroker(tmp_path, port=_free_port(), controller_port=_free_port(), libs_dir=kafka_libs)
    b.start()
    cluster_id = (tmp_path / "kafka" / "cluster.id").read_text()
    try:
        topic = _topic("durable")
        await _create_topics(b.bootstrap, topic, partitions=1)
        producer = AIOKafkaProducer(bootstrap_servers=b.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"survives")
        finally:
            await producer.stop()

        second = LocalKafkaBroker(
            tmp_path / "other", port=b.port, controller_port=_free_port(), libs_dir=kafka_libs
        )
        with pytest.raises(KafkaBrokerError, match="already listening"):
            second.start()
        assert not second.is_running()

        b.stop()
        assert not b.is_running()
        assert b.returncode in (0, 143)
        assert "shut down completed" in (tmp_path / "kafka" / "logs" / "server.log").read_text()

        b.start()
        assert (tmp_path / "kafka" / "cluster.id").read_text() == cluster_id
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=b.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            assert await _consume_all(consumer, 1) == [b"survives"]
        finally:
            await consumer.stop()

        b.kill()
        assert not b.is_running()
        assert b.returncode == -9

        b.start()  # recovers after SIGKILL (unclean shutdown)
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=b.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            assert await _consume_all(consumer, 1) == [b"survives"]
        finally:
            await consumer.stop()
    finally:
        b.stop()


async def test_a_consumer_loop_says_when_the_broker_last_answered_across_an_outage(
    broker: LocalKafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What RetainConsumerBrokerUnreachable relies on, with the broker really stopped: the
    contact gauge stands still while it is away, the loop itself keeps passing (so it is the
    broker alert that fires, not RetainWorkerStalled), and the gauge moves again once it is
    back. The broker is started again before the test ends, for the module's other tests."""
    monkeypatch.setattr(consumer_module, "BEAT_EVERY_S", 0.5)
    topic = _topic("contact")
    await _create_topics(broker.bootstrap, topic)
    group = f"g-{uuid.uuid4().hex[:8]}"
    loop: ConsumerLoop[Event] = ConsumerLoop(
        bootstrap=broker.bootstrap,
        topics=[topic],
        group_id=group,
        decode=lambda _topic, payload: decode_event(payload),
        handle=lambda _items: asyncio.sleep(0),  # never called: nothing is produced
        producer=Producer(broker.bootstrap, client_id=group),
        poll_timeout_ms=200,
    )

    def contact() -> float | None:
        for metric in CONSUMER_BROKER_CONTACT.collect():
            for sample in metric.samples:
                if sample.labels == {"group": group}:
                    return float(sample.value)
        return None

    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(60):
            while contact() is None:
                await asyncio.sleep(0.1)
        await asyncio.to_thread(broker.stop, 30)
        stopped = time.time()
        beats_before = metrics_module._beats[group]
        await asyncio.sleep(5)
        last = contact()
        assert last is not None
        assert last <= stopped + 1  # nothing answered since (a request in flight as it stopped may)
        assert metrics_module._beats[group] > beats_before  # the loop still passes
        await asyncio.to_thread(broker.start, 90)
        async with asyncio.timeout(90):
            while (contact() or 0) <= stopped + 5:
                await asyncio.sleep(0.2)
    finally:
        if not broker.is_running():
            await asyncio.to_thread(broker.start, 90)
        loop.stop()
        async with asyncio.timeout(60):
            await task
