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

from services.ingest.batch import (
    FieldError,
    InvalidBatchError,
    check_events,
    validate_body,
    with_event_errors,
)
from services.ingest.dedupe import DIGEST_MASK, RecentIds
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


class ConflictingIdsError(InvalidBatchError):
    """Items whose ``event_id`` an earlier request (still in the dedupe window, or still being
    produced) used for a different event."""


def content_digest(value: bytes) -> int:
    """What an event id names, as the event was encoded for its topic: the same event resent
    encodes to the same bytes. Python's hash of bytes (SipHash, in C, a fraction of a
    microsecond for an event), 32 bits of it (``RecentIds`` packs it beside the time): two
    different events under one id are told apart but for one time in four billion, when the
    second is answered as a duplicate, as it was before ids had digests. In-process only, as
    the window is."""
    return hash(value) & DIGEST_MASK


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    return f"{seconds:g} s"


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
    digests: list[int]  # of their values: what each id names, for a later resend to be checked
    fresh_types: dict[str, int]  # how many of each type
    duplicates: int
    waits: list[asyncio.Future[None]]  # concurrent requests producing some of the same ids
    answered: list[str]  # the types of the duplicates answered from the window


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
        # Event ids being produced right now (the request's acknowledgement, the event's digest),
        # so two concurrent resends produce once.
        self._in_flight: dict[str, tuple[asyncio.Future[None], int]] = {}
        # Labelled metric children, looked up once: .labels() is not free.
        self._accepted = {t: EVENTS_ACCEPTED.labels(t) for t in TOPIC_OF_TYPE}
        self._duplicate = {t: EVENTS_DUPLICATE.labels(t) for t in TOPIC_OF_TYPE}

    def validate(self, body: bytes) -> list[Event]:
        try:
            events = validate_body(body, self._max_batch)
        except InvalidBatchError as exc:
            raise with_event_errors(exc, self._wall_clock(), self._max_future) from exc
        check_events(events, self._wall_clock(), self._max_future, body)
        return events

    def prepare(self, events: list[Event]) -> Prepared:
        """Sort out the duplicates and encode the rest, before anything is awaited: the events
        themselves need not stay alive while the broker answers (see ``produce``). Raises
        ``ConflictingIdsError`` when an id accepted earlier (or being accepted) names another
        event: the request is refused whole."""
        BATCH_SIZE.observe(len(events))
        event_ids = [e.event_id for e in events]
        recent = self._recent.among(event_ids, self._clock())
        in_flight = self._in_flight
        waits: list[asyncio.Future[None]] = []
        duplicates = 0
        if recent or len(set(event_ids)) < len(event_ids) or not in_flight.keys().isdisjoint(event_ids):
            fresh: list[Event] = []
            seen: set[str] = set()
            conflicts: list[FieldError] = []
            answered: list[str] = []  # types of the duplicates answered from the window
            for i, event in enumerate(events):
                eid = event.event_id
                if eid in seen:  # the same event again in this request (id_errors)
                    answered.append(event.type)
                elif eid in recent or eid in in_flight:
                    done, digest = (None, recent[eid]) if eid in recent else in_flight[eid]
                    if content_digest(encode_event(event)) != digest:
                        conflicts.append(FieldError(i, "event_id", self._conflict(eid, done is not None)))
                    elif done is None:
                        answered.append(event.type)
                    else:
                        duplicates += 1
                        waits.append(done)
                else:
                    fresh.append(event)
                seen.add(eid)
            if conflicts:
                raise ConflictingIdsError(conflicts, [events[c.index].type for c in conflicts])
            duplicates += len(answered)
            fresh_ids = [e.event_id for e in fresh]
        else:
            fresh, fresh_ids, answered = events, event_ids, []  # the usual request: nothing seen before
        topic_of = self._topic_of
        values = [encode_event(e) for e in fresh]
        return Prepared(
            event_ids,
            [topic_of[e.type] for e in fresh],
            [encode_key(e.customer_id) for e in fresh],
            values,
            fresh_ids,
            list(map(content_digest, values)),
            dict(Counter(e.type for e in fresh)),
            duplicates,
            waits,
            answered,
        )

    def _conflict(self, event_id: str, in_flight: bool) -> str:
        when = (
            "is being accepted in another request right now"
            if in_flight
            else f"was accepted in the last {_duration(self._recent.ttl_s)}"
        )
        return (
            f"event_id {event_id!r} {when} for a different event: an id names one event (a resend "
            "must repeat the event as it was; another event needs an id of its own)"
        )

    async def produce(self, prepared: Prepared) -> Accepted:
        """Produce what ``prepare`` left to produce; return once the broker has all of it."""
        fresh_ids = prepared.fresh_ids
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        in_flight = self._in_flight
        for eid, digest in zip(fresh_ids, prepared.digests, strict=True):
            in_flight[eid] = (done, digest)
        try:
            if fresh_ids:
                started = time.perf_counter()
                await self._producer.send_columns(prepared.topics, prepared.keys, prepared.values)
                PRODUCE_SECONDS.observe(time.perf_counter() - started)
                # In the window before they leave the in-flight table, with no await between:
                # while this request waits for another's ids below, a different event sent
                # under one of its own would otherwise have been in neither, and produced.
                self._recent.add(fresh_ids, prepared.digests, self._clock())
                for event_type, n in prepared.fresh_types.items():  # in the log: accepted
                    self._accepted[event_type].inc(n)
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
        for event_type in prepared.answered:  # counted for a request answered 202 only
            self._duplicate[event_type].inc()
        return Accepted(prepared.event_ids, produced=len(fresh_ids), duplicates=prepared.duplicates)
