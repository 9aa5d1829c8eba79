"""Creating the topics, against the real broker."""

from __future__ import annotations

import re

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.topics import (
    DLQ_RETENTION_MS,
    PartitionMismatchError,
    TopicCreationError,
    all_topic_names,
    ensure_topics,
)
from tests.support.infra import KafkaHandle

pytestmark = pytest.mark.integration

TOPIC_CONFIG = 1  # DescribeConfigs v1+: the value's source is the topic's own config (5: the default)


async def topics_on(kafka: KafkaHandle, prefix: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(prefix)]
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)} if names else {}
    finally:
        await admin.close()


async def retention_ms(kafka: KafkaHandle, names: list[str]) -> dict[str, str]:
    """The topics' retention.ms where it was set on the topic (not the broker's default)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    out: dict[str, str] = {}
    for response in described:
        for _code, _message, _type, name, entries in response.resources:
            for key, value, _read_only, source, *_ in entries:
                if key == "retention.ms" and source == TOPIC_CONFIG:
                    out[name] = value
    return out


async def test_the_missing_topics_are_created_once_with_one_partition_count(
    kafka: KafkaHandle, unique: str
) -> None:
    prefix = f"tt{unique}.retain."
    names = all_topic_names(prefix)
    assert sorted(await ensure_topics(kafka.bootstrap, names, partitions=2)) == sorted(names)
    assert await ensure_topics(kafka.bootstrap, names, partitions=2) == []  # a second run: nothing to do
    assert await topics_on(kafka, prefix) == dict.fromkeys(names, 2)
    retention = await retention_ms(kafka, [f"{prefix}purchases", f"{prefix}purchases.dlq"])
    assert retention == {f"{prefix}purchases.dlq": str(DLQ_RETENTION_MS)}  # the other: the broker's default


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


async def test_a_topic_the_broker_refuses_fails_with_the_broker_s_reason(
    kafka: KafkaHandle, unique: str
) -> None:
    """Not a 30 s wait for a topic that will never appear."""
    name = f"tt{unique}.retain.profiles"
    with pytest.raises(TopicCreationError, match=rf"{re.escape(name)}.*InvalidPartitionsError"):
        await ensure_topics(kafka.bootstrap, [name], partitions=0)
    assert await topics_on(kafka, f"tt{unique}.") == {}
