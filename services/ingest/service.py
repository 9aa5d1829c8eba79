"""Accepting events: validate the whole batch, skip recent duplicates, produce, wait for acks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from services.ingest.batch import validate_batch
from services.ingest.dedupe import RecentIds
from shared.codec import encode_event, encode_key
from shared.events import TOPIC_OF_TYPE, Event
from shared.kafka.producer import BrokerUnavailableError, OutboundRecord, Producer
from shared.logs import get_logger

log = get_logger(__name__)

EVENTS_ACCEPTED = MetricCounter("retain_ingest_events_accepted_total", "Events accepted, by type.", ["type"])
EVENTS_REJECTED = MetricCounter("retain_ingest_events_rejected_total", "Invalid events, by type.", ["type"])
EVENTS_DUPLICATE = MetricCounter(
    "retain_ingest_events_duplicate_total", "Events answered from the dedupe window, by type.", ["type"]
)
BATCH_SIZE = Histogram(
    "retain_ingest_batch_size", "Events per request.", buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
)
PRODUCE_SECONDS = Histogram(
    "retain_ingest_produce_seconds",
    "From handing a batch to the producer to the broker's acknowledgement of all of it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass(frozen=True, slots=True)
class Accepted:
    event_ids: list[str]
    produced: int
    duplicates: int


class IngestService:
    def __init__(
        self,
        producer: Producer,
        *,
        topic_prefix: str,
        max_batch: int,
        recent: RecentIds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._prefix = topic_prefix
        self._max_batch = max_batch
        self._recent = recent
        self._clock = clock
        # Event ids being produced right now, so two concurrent resends produce once.
        self._in_flight: dict[str, asyncio.Future[None]] = {}

    def validate(self, items: list[Any]) -> list[Event]:
        return validate_batch(items, self._max_batch)

    async def accept(self, events: list[Event]) -> Accepted:
        BATCH_SIZE.observe(len(events))
        now = self._clock()
        fresh: list[Event] = []
        waits: list[asyncio.Future[None]] = []
        batch_ids: set[str] = set()
        duplicates = 0
        for event in events:
            eid = event.event_id
            if eid in batch_ids or self._recent.contains(eid, now):
                duplicates += 1
                EVENTS_DUPLICATE.labels(event.type).inc()
            elif eid in self._in_flight:
                duplicates += 1
                waits.append(self._in_flight[eid])
            else:
                fresh.append(event)
            batch_ids.add(eid)

        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for event in fresh:
            self._in_flight[event.event_id] = done
        try:
            if fresh:
                await self._produce(fresh)
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc if isinstance(exc, Exception) else BrokerUnavailableError("cancelled"))
            raise
        finally:
            for event in fresh:
                self._in_flight.pop(event.event_id, None)
            # Nobody else may be waiting; retrieve the exception so asyncio does not warn.
            if done.done() and not done.cancelled():
                done.exception()
        if waits:
            # The same id is being produced by a concurrent request: answer when it is acked.
            await asyncio.gather(*waits)
        self._recent.add([e.event_id for e in fresh], self._clock())
        for event_type, n in Counter(e.type for e in fresh).items():
            EVENTS_ACCEPTED.labels(event_type).inc(n)
        return Accepted([e.event_id for e in events], produced=len(fresh), duplicates=duplicates)

    async def _produce(self, events: list[Event]) -> None:
        records = [
            OutboundRecord(
                topic=f"{self._prefix}{TOPIC_OF_TYPE[event.type]}",
                key=encode_key(event.customer_id),
                value=encode_event(event),
            )
            for event in events
        ]
        started = time.perf_counter()
        await self._producer.send_all(records)
        PRODUCE_SECONDS.observe(time.perf_counter() - started)
