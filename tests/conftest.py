"""Session-wide real infrastructure: one Kafka broker and one PostgreSQL for the whole run.

Each test gets its own topic prefix and consumer group, so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.topics import all_topic_names, ensure_topics
from tests.support.infra import KafkaHandle, PostgresHandle, kafka_for_session, postgres_for_session


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaHandle]:
    with kafka_for_session() as handle:
        yield handle


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresHandle]:
    with postgres_for_session() as handle:
        yield handle


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def topic_prefix(kafka: KafkaHandle, unique: str) -> str:
    """A fresh set of the architecture's topics (and DLQs) under a prefix of this test's own."""
    prefix = f"t{unique}.retain."
    await ensure_topics(kafka.bootstrap, all_topic_names(prefix), partitions=3)
    return prefix


@pytest.fixture
def pg_url(postgres: PostgresHandle, unique: str) -> str:
    """A fresh PostgreSQL database for this test."""
    return postgres.create_database(f"t_{unique}")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each dialect the services run on: a SQLite file of this test's
    own, then a PostgreSQL database (``pg_url``)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url
