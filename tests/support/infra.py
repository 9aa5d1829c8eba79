"""Which broker and which PostgreSQL a test session uses, chosen once per session.

Order for Kafka: RETAIN_KAFKA_BOOTSTRAP → testcontainers' Kafka when a Docker engine answers
→ the project's local broker (real Apache Kafka from Maven Central). Same for PostgreSQL with
RETAIN_TEST_DATABASE_URL → testcontainers → Debian's PostgreSQL as a throwaway cluster.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import REPO_ROOT

TEST_VAR = REPO_ROOT / "var" / "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415 - only needed when probing for an engine

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


@dataclass
class KafkaHandle:
    bootstrap: str
    kind: str  # "external", "testcontainers" or "local"
    broker: Any = None  # LocalKafkaBroker when kind == "local": tests may stop/start it

    @property
    def controllable(self) -> bool:
        return self.kind == "local"


@dataclass
class PostgresHandle:
    admin_url: str
    kind: str
    server: Any = None  # LocalPostgres when kind == "local"

    def create_database(self, name: str) -> str:
        if self.server is not None:
            url: str = self.server.create_database(name)
            return url
        return _create_database(self.admin_url, name)


def _create_database(admin_url: str, name: str) -> str:
    import asyncio  # noqa: PLC0415

    from sqlalchemy import text  # noqa: PLC0415
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    async def go() -> None:
        engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            exists = await conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()

    asyncio.run(go())
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def kafka_for_session() -> Iterator[KafkaHandle]:
    external = os.environ.get("RETAIN_KAFKA_BOOTSTRAP")
    if external:
        yield KafkaHandle(external, "external")
        return
    if docker_answers():
        from testcontainers.kafka import KafkaContainer  # noqa: PLC0415

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield KafkaHandle(container.get_bootstrap_server(), "testcontainers")
        return
    from shared.infra.kafka_broker import LocalKafkaBroker, ensure_jars  # noqa: PLC0415

    # The jars are shared with `make run` (var/kafka/libs); the data is this session's own.
    libs = ensure_jars(REPO_ROOT / "var")
    var = TEST_VAR / f"kafka-{os.getpid()}"
    port = free_port()
    controller_port = free_port()
    while controller_port == port:  # the kernel may hand the same free port out twice
        controller_port = free_port()
    broker = LocalKafkaBroker(
        var, port=port, controller_port=controller_port, num_partitions=3, libs_dir=libs
    )
    broker.start()
    try:
        yield KafkaHandle(broker.bootstrap, "local", broker)
    finally:
        broker.stop()
        _remove(var)


@contextmanager
def postgres_for_session() -> Iterator[PostgresHandle]:
    external = os.environ.get("RETAIN_TEST_DATABASE_URL")
    if external:
        yield PostgresHandle(external, "external")
        return
    if docker_answers():
        from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

        with PostgresContainer("postgres:16", driver="asyncpg") as container:
            yield PostgresHandle(container.get_connection_url(), "testcontainers")
        return
    from shared.infra.postgres import LocalPostgres  # noqa: PLC0415

    root = TEST_VAR / f"pg-{os.getpid()}"
    server = LocalPostgres(root)
    url = server.start()
    try:
        yield PostgresHandle(url, "local", server)
    finally:
        server.stop("fast")
        _remove(root)


def _remove(path: Path) -> None:
    import shutil  # noqa: PLC0415

    shutil.rmtree(path, ignore_errors=True)
