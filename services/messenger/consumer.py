"""The messenger's consumer: customer updates on retain.segments → journeys → decisions, and
due journey waits between batches. Run: ``python -m services.messenger.consumer``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.messenger.config import MessengerSettings
from services.messenger.service import MessengerService
from shared.codec import decode_with
from shared.events import CUSTOMER_UPDATE_ADAPTER, CustomerUpdate
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.service_main import run_until_signalled, worker
from shared.topics import SEGMENTS

MIGRATIONS = Path(__file__).parent / "migrations"
TICK_EVERY_S = 0.25  # the work between batches, at most this often


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
        tick_every_s=TICK_EVERY_S,
        **settings.consumer_options(),
    )


async def main(settings: MessengerSettings | None = None) -> None:
    settings = settings or MessengerSettings()
    async with worker(settings, settings.database_url, MIGRATIONS, "retain-messenger", 8103) as (
        db,
        producer,
    ):
        service = MessengerService(db, settings, producer)
        await service.ensure_defaults()
        try:
            await run_until_signalled(build_loop(settings, service, producer))
        finally:
            await service.flush()  # a clean stop: what the last batches staged goes out now


if __name__ == "__main__":
    asyncio.run(main())
