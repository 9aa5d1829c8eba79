"""The segmenter's consumer process: backend events and CLV predictions → profiles, tiers,
segments → customer_update on retain.segments. Run: ``python -m services.segmenter.consumer``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.segmenter.config import SegmenterSettings
from services.segmenter.service import CONSUMER_METRICS, SegmenterService
from shared.codec import decode_event_on, decode_with
from shared.events import CLV_ADAPTER, ClvPrediction, Event
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.service_main import run_until_signalled, worker
from shared.topics import CANCELLATIONS, CLV, PROFILES, PURCHASES, SUPPORT

MIGRATIONS = Path(__file__).parent / "migrations"
TICK_EVERY_S = 0.25  # the work between batches, at most this often


def build_loop(
    settings: SegmenterSettings, service: SegmenterService, producer: Producer
) -> ConsumerLoop[Event | ClvPrediction]:
    clv_topic = settings.topic(CLV)
    max_future = settings.max_future  # once: decode runs for every record

    def decode(topic: str, payload: bytes) -> Event | ClvPrediction:
        if topic == clv_topic:
            return decode_with(CLV_ADAPTER, payload)
        return decode_event_on(topic, payload, max_future)

    loop = ConsumerLoop(
        bootstrap=settings.kafka_bootstrap,
        topics=[settings.topic(t) for t in (PROFILES, PURCHASES, SUPPORT, CANCELLATIONS, CLV)],
        group_id=settings.segmenter_group_id,
        decode=decode,
        handle=service.apply_batch,
        producer=producer,
        max_records=settings.segmenter_batch_size,
        tick=service.tick,
        tick_every_s=TICK_EVERY_S,
        **settings.consumer_options(),
    )
    service.catching_up = lambda: loop.behind  # the sweep waits for a backlog to be applied
    return loop


async def main(settings: SegmenterSettings | None = None) -> None:
    settings = settings or SegmenterSettings()
    async with worker(
        settings, settings.database_url, MIGRATIONS, "retain-segmenter", 8102, own_metrics=CONSUMER_METRICS
    ) as (db, producer):
        service = SegmenterService(db, settings, producer)
        await service.ensure_default_rules()
        try:
            await run_until_signalled(build_loop(settings, service, producer))
        finally:
            await service.close()


if __name__ == "__main__":
    asyncio.run(main())
