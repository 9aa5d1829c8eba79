"""Creating the topics, against the real broker."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from shared.topics import PartitionMismatchError, all_topic_names, ensure_topics
from tests.support.infra import KafkaHandle

pytestmark = pytest.mark.integration


async def topics_on(kafka: KafkaHandle, prefix: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(prefix)]
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)} if names else {}
    finally:
        await admin.close()


async def test_the_missing_topics_are_created_once_with_one_partition_count(
    kafka: KafkaHandle, unique: str
) -> None:
    prefix = f"tt{unique}.retain."
    names = all_topic_names(prefix)
    assert sorted(await ensure_topics(kafka.bootstrap, names, partitions=2)) == sorted(names)
    assert await ensure_topics(kafka.bootstrap, names, partitions=2) == []  # a second run: nothing to do
    assert await topics_on(kafka, prefix) == dict.fromkeys(names, 2)


async def test_a_partition_count_mismatch_fails_naming_the_topic_and_creates_nothing(
    kafka: KafkaHandle, unique: str
) -> None:
    """A deployment whose RETAIN_PARTITIONS disagrees with the cluster stops before it adds
    topics that would disagree with the existing ones."""
    prefix = f"tt{unique}.retain."
    old, new = f"{prefix}profiles", f"{prefix}purchases"
    await ensure_topics(kafka.bootstrap, [old], partitions=2)
    with pytest.raises(PartitionMismatchError, match=rf"other than 3: \{{'{old}': 2\}}"):
        await ensure_topics(kafka.bootstrap, [old, new], partitions=3)
    assert await topics_on(kafka, prefix) == {old: 2}
