"""The topics of ARCHITECTURE.md, their dead-letter twins, and their idempotent creation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from shared.logs import get_logger

log = get_logger(__name__)

# Names without the deployment's prefix.
PROFILES = "profiles"
PURCHASES = "purchases"
SUPPORT = "support"
CANCELLATIONS = "cancellations"
SEGMENTS = "segments"
MESSAGES = "messages"
CLV = "clv"

ALL_TOPICS = (PROFILES, PURCHASES, SUPPORT, CANCELLATIONS, SEGMENTS, MESSAGES, CLV)


DLQ_SUFFIX = ".dlq"
# Dead letters wait for a fix and a replay: a month, not the broker's default week, so that a
# letter outlives a holiday. Only the topics `retain topics` creates get it.
DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000


def dlq(topic: str) -> str:
    return f"{topic}{DLQ_SUFFIX}"


def all_topic_names(prefix: str) -> list[str]:
    names = [f"{prefix}{t}" for t in ALL_TOPICS]
    return names + [dlq(n) for n in names]


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    # The controller acknowledges creation before every broker's metadata cache has the
    # topics; a producer asking right away would be told they do not exist.
    async with asyncio.timeout(timeout_s):
        while not set(names) <= set(await admin.list_topics()):  # noqa: ASYNC110 - polling the broker
            await asyncio.sleep(0.05)


class TopicCreationError(RuntimeError):
    """The broker refused to create a topic, and said why."""


class PartitionMismatchError(RuntimeError):
    """An existing topic has another partition count: per-customer order would break."""


async def ensure_topics(bootstrap: str, names: list[str], partitions: int) -> list[str]:
    """Create the topics that are missing; return the ones created.

    Every topic gets the same partition count, so that a customer's events land in the same
    partition number everywhere and keyed joins stay per-customer ordered.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # Checked before anything is created: a mismatch leaves the cluster as it found it.
        present = [n for n in names if n in existing]
        if present:
            described = await admin.describe_topics(present)
            wrong = {
                d["topic"]: len(d["partitions"]) for d in described if len(d["partitions"]) != partitions
            }
            if wrong:
                raise PartitionMismatchError(
                    f"topics with a partition count other than {partitions}: {wrong}"
                )
        missing = [n for n in names if n not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        n,
                        num_partitions=partitions,
                        replication_factor=1,
                        topic_configs={"retention.ms": str(DLQ_RETENTION_MS)}
                        if n.endswith(DLQ_SUFFIX)
                        else {},
                    )
                    for n in missing
                ]
            )
            failed: dict[str, str] = {}
            for name, code, *message in response.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:  # that one: another process was first
                    failed[name] = f"{for_code(code).__name__}: {message[0] if message else ''}".rstrip(": ")
            if failed:
                raise TopicCreationError(f"the broker refused to create {failed}")
        if created:
            log.info("topics created", topics=created, partitions=partitions)
            await _wait_visible(admin, created)
        return created
    finally:
        await admin.close()


async def wait_for_group_coordinators(bootstrap: str, groups: Sequence[str], timeout_s: float = 60.0) -> None:
    """Return once the broker names a coordinator for every group in ``groups``.

    On a fresh broker the first group lookup creates ``__consumer_offsets``; until its partitions
    are loaded, every consumer joining logs GroupCoordinatorNotAvailable and "marking the
    coordinator dead" warnings (harmless: it retries), which is what the first ``make run`` on a
    new machine showed. Asked here first, once, the consumers start on a broker that is ready.
    """
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        await client.bootstrap()
        for group in groups:
            while True:
                try:
                    await client.coordinator_lookup(CoordinationType.GROUP, group)
                    break
                except KafkaError as exc:
                    if not exc.retriable or asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
    finally:
        await client.close()
