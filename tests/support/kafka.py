"""Reading topics back in tests: every record from the beginning to the current end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_all(
    bootstrap: str, topics: Sequence[str], timeout_s: float = 20.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """All committed records of ``topics`` up to their end offsets as of now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topics)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        out: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(timeout_s):
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    out.extend(records)
        return out
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group: str, topics: Sequence[str]) -> int:
    """Records of ``topics`` that ``group`` has not committed yet (end offset − committed)."""
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        partitions = await _partitions(consumer, topics)
        end = await consumer.end_offsets(partitions)
        return sum(end[tp] - (committed[tp].offset if tp in committed else 0) for tp in partitions)
    finally:
        await consumer.stop()
        await admin.close()


async def wait_caught_up(bootstrap: str, group: str, topics: Sequence[str], timeout_s: float = 90.0) -> None:
    async with asyncio.timeout(timeout_s):
        while await group_lag(bootstrap, group, topics) > 0:
            await asyncio.sleep(0.25)


async def _partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``; fails loudly rather than answer "none" from a cold cache."""
    for _ in range(50):
        found = {t: consumer.partitions_for_topic(t) for t in topics}
        if all(found.values()):
            return [TopicPartition(t, p) for t in topics for p in sorted(found[t] or ())]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no partitions known for some of {list(topics)}")
