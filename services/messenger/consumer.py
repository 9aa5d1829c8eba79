"""The messenger's consumer: customer updates on retain.segments → journeys → decisions, and
due journey waits between batches. Run: ``python -m services.messenger.consumer``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.messenger.config import MessengerSettings
from services.messenger.service import MessengerService
from shared.codec import decode_with
from shared.db import Database, migrate
from shared.events import CUSTOMER_UPDATE_ADAPTER, CustomerUpdate
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.logs import configure_logging
from shared.metrics import serve_worker_metrics
from shared.service_main import run_until_signalled
from shared.topics import SEGMENTS

MIGRATIONS = Path(__file__).parent / "migrations"


def build_loop(
    settings: MessengerSettings, service: MessengerService, producer: Producer
) -> ConsumerLoop[CustomerUpdate]:
    return ConsumerLoop(
        bootstrap=settings.kafka_bootstrap,
        topics=[settings.topic(SEGMENTS)],
        group_id=settings.messenger_group_id,
        decode=lambda _topic, payload: decode_with(CUSTOMER_UPDATE_ADAPTER, payload),
        handle=service.apply_batch,
        producer=producer,
        max_records=settings.messenger_batch_size,
        tick=service.tick,
        session_timeout_ms=settings.consumer_session_timeout_ms,
    )


async def main(settings: MessengerSettings | None = None) -> None:
    settings = settings or MessengerSettings()
    configure_logging(settings.log_level, settings.log_json)
    serve_worker_metrics(8103)
    db = Database(settings.database_url)
    await migrate(db, MIGRATIONS)
    producer = Producer(settings.kafka_bootstrap, client_id="retain-messenger")
    service = MessengerService(db, settings, producer)
    await service.ensure_defaults()
    try:
        await run_until_signalled(build_loop(settings, service, producer))
    finally:
        await producer.stop()
        await db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
