"""Accepting events: validate the whole batch, skip recent duplicates, produce, wait for acks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from services.ingest.batch import InvalidBatchError, check_ids, check_times, validate_body, with_time_errors
from services.ingest.dedupe import RecentIds
from shared.codec import encode_event, encode_key
from shared.events import TOPIC_OF_TYPE, Event
from shared.kafka.producer import BrokerUnavailableError, Producer
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


@dataclass(slots=True)
class Prepared:
    """A validated request, reduced to what producing it and answering it need."""

    event_ids: list[str]  # every event of the request, in order (the answer)
    # The events to produce (neither recent nor repeated), as the producer's columns: bytes
    # and strings, nothing the collector walks while the broker answers.
    topics: list[str]
    keys: list[bytes]
    values: list[bytes]
    fresh_ids: list[str]  # their ids
    fresh_types: dict[str, int]  # how many of each type
    duplicates: int
    waits: list[asyncio.Future[None]]  # concurrent requests producing some of the same ids


class IngestService:
    def __init__(
        self,
        producer: Producer,
        *,
        topic_prefix: str,
        max_batch: int,
        recent: RecentIds,
        max_future: timedelta = timedelta(days=1),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._producer = producer
        self._max_future = max_future
        self._wall_clock = wall_clock
        self._topic_of = {t: f"{topic_prefix}{topic}" for t, topic in TOPIC_OF_TYPE.items()}
        self._max_batch = max_batch
        self._recent = recent
        self._clock = clock
        # Event ids being produced right now, so two concurrent resends produce once.
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        # Labelled metric children, looked up once: .labels() is not free.
        self._accepted = {t: EVENTS_ACCEPTED.labels(t) for t in TOPIC_OF_TYPE}
        self._duplicate = {t: EVENTS_DUPLICATE.labels(t) for t in TOPIC_OF_TYPE}

    def validate(self, body: bytes) -> list[Event]:
        try:
            events = validate_body(body, self._max_batch)
        except InvalidBatchError as exc:
            raise with_time_errors(exc, self._wall_clock(), self._max_future) from exc
        check_times(events, self._wall_clock(), self._max_future)
        check_ids(events)
        return events

    def prepare(self, events: list[Event]) -> Prepared:
        """Sort out the duplicates and encode the rest, before anything is awaited: the events
        themselves need not stay alive while the broker answers (see ``produce``)."""
        BATCH_SIZE.observe(len(events))
        event_ids = [e.event_id for e in events]
        recent = self._recent.among(event_ids, self._clock())
        waits: list[asyncio.Future[None]] = []
        duplicates = 0
        if recent or len(set(event_ids)) < len(event_ids) or not self._in_flight.keys().isdisjoint(event_ids):
            fresh: list[Event] = []
            seen: set[str] = set()
            for event in events:
                eid = event.event_id
                if eid in seen or eid in recent:
                    duplicates += 1
                    self._duplicate[event.type].inc()
                elif eid in self._in_flight:
                    duplicates += 1
                    waits.append(self._in_flight[eid])
                else:
                    fresh.append(event)
                seen.add(eid)
            fresh_ids = [e.event_id for e in fresh]
        else:
            fresh, fresh_ids = events, event_ids  # the usual request: nothing in it seen before
        topic_of = self._topic_of
        return Prepared(
            event_ids,
            [topic_of[e.type] for e in fresh],
            [encode_key(e.customer_id) for e in fresh],
            [encode_event(e) for e in fresh],
            fresh_ids,
            dict(Counter(e.type for e in fresh)),
            duplicates,
            waits,
        )

    async def produce(self, prepared: Prepared) -> Accepted:
        """Produce what ``prepare`` left to produce; return once the broker has all of it."""
        fresh_ids = prepared.fresh_ids
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        in_flight = self._in_flight
        for eid in fresh_ids:
            in_flight[eid] = done
        try:
            if fresh_ids:
                started = time.perf_counter()
                await self._producer.send_columns(prepared.topics, prepared.keys, prepared.values)
                PRODUCE_SECONDS.observe(time.perf_counter() - started)
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc if isinstance(exc, Exception) else BrokerUnavailableError("cancelled"))
            raise
        finally:
            for eid in fresh_ids:
                in_flight.pop(eid, None)
            # Nobody else may be waiting; retrieve the exception so asyncio does not warn.
            if done.done() and not done.cancelled():
                done.exception()
        if prepared.waits:
            # The same id is being produced by a concurrent request: answer when it is acked.
            await asyncio.gather(*prepared.waits)
        self._recent.add(fresh_ids, self._clock())
        for event_type, n in prepared.fresh_types.items():
            self._accepted[event_type].inc(n)
        return Accepted(prepared.event_ids, produced=len(fresh_ids), duplicates=prepared.duplicates)
