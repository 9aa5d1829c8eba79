"""Running a worker process (a consumer, the sender): its database, producer and metrics, and
signals → a clean stop (finish the batch, commit, leave)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector
from sqlalchemy.exc import DBAPIError

from shared.collector import settle_collector
from shared.config import CommonSettings, start_logging
from shared.db import Database, migrate
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.logs import get_logger
from shared.metrics import expose, serve_worker_metrics

log = get_logger(__name__)

DATABASE_WAIT_S = 60.0  # how long a starting worker waits for its database before giving up


async def migrate_when_reachable(db: Database, migrations: Path, wait_s: float = DATABASE_WAIT_S) -> None:
    """Migrate, waiting out a database that is restarting (a worker restarted during a
    database restart must not exit); a database still away after ``wait_s`` is an error."""
    deadline = time.monotonic() + wait_s
    backoff = 0.2
    while True:
        try:
            await migrate(db, migrations)
            return
        except (DBAPIError, OSError) as exc:
            if time.monotonic() + backoff > deadline:
                raise
            log.warning(
                "database unreachable at start; retrying", error=type(exc).__name__, backoff_s=backoff
            )
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def run_until_signalled(loop: ConsumerLoop[Any]) -> None:
    running = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(sig, loop.stop)
    await loop.run()


def worker_database(url: str) -> Database:
    """A worker's database (a consumer's, the sender's; the benches run theirs so too). A
    worker's loop waits on its transaction anyway: SQLite runs on the loop's own thread, and
    its log is checkpointed on another (``WalCheckpointer``)."""
    return Database(url, inline_sqlite=True, background_checkpoints=True)


@asynccontextmanager
async def worker(
    settings: CommonSettings,
    database_url: str,
    migrations: Path,
    client_id: str,
    metrics_port: int,
    own_metrics: Iterable[Collector] = (),
) -> AsyncIterator[tuple[Database, Producer]]:
    """Logging, /metrics (with ``own_metrics``, the ones only this kind of process updates:
    ``shared.metrics.expose``), the service's migrated database and a producer; closed on the
    way out."""
    start_logging(settings)
    expose(own_metrics)
    serve_worker_metrics(metrics_port)
    db = worker_database(database_url)
    await migrate_when_reachable(db, migrations)
    producer = Producer(settings.kafka_bootstrap, client_id=client_id)
    settle_collector()
    try:
        yield db, producer
    finally:
        await producer.stop()
        await db.dispose()
