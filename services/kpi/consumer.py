"""The kpi service's consumer process: backend events and message outcomes → fact tables;
between batches, the Grafana tables and the scheduled CLV refit → retain.clv.
Run: ``python -m services.kpi.consumer``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.kpi.config import KpiSettings
from services.kpi.service import CONSUMER_METRICS, KpiService
from shared.codec import decode_event_on, decode_with
from shared.events import MESSAGE_EVENT_ADAPTER, Event, MessageEvent
from shared.kafka.consumer import ConsumerLoop
from shared.kafka.producer import Producer
from shared.service_main import run_until_signalled, worker
from shared.topics import CANCELLATIONS, MESSAGES, PROFILES, PURCHASES, SUPPORT

MIGRATIONS = Path(__file__).parent / "migrations"


def build_loop(
    settings: KpiSettings, service: KpiService, producer: Producer
) -> ConsumerLoop[Event | MessageEvent]:
    messages_topic = settings.topic(MESSAGES)
    max_future = settings.max_future  # once: decode runs for every record

    def decode(topic: str, payload: bytes) -> Event | MessageEvent:
        if topic == messages_topic:
            return decode_with(MESSAGE_EVENT_ADAPTER, payload)
        return decode_event_on(topic, payload, max_future)

    loop: ConsumerLoop[Event | MessageEvent] = ConsumerLoop(
        bootstrap=settings.kafka_bootstrap,
        topics=[settings.topic(t) for t in (PROFILES, PURCHASES, SUPPORT, CANCELLATIONS, MESSAGES)],
        group_id=settings.kpi_group_id,
        decode=decode,
        handle=service.apply_batch,
        producer=producer,
        max_records=settings.kpi_batch_size,
        tick=service.tick,
        **settings.consumer_options(),
    )
    service.catching_up = lambda: loop.behind  # the scheduled CLV fit waits for a backlog to be applied
    return loop


async def main(settings: KpiSettings | None = None) -> None:
    settings = settings or KpiSettings()
    async with worker(
        settings, settings.database_url, MIGRATIONS, "retain-kpi", 8104, own_metrics=CONSUMER_METRICS
    ) as (db, producer):
        service = KpiService(db, settings, producer)
        await run_until_signalled(build_loop(settings, service, producer))


if __name__ == "__main__":
    asyncio.run(main())
