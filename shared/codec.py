"""The one JSON encoding of everything that crosses a Kafka topic.

Producers and consumers use these functions and nothing else, so that an event read back is
equal to the event written (Decimal amounts travel as strings, datetimes as RFC 3339).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta
from typing import TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter

from shared.events import EVENT_ADAPTER, NOT_AFTER_EPOCH, TOPIC_OF_TYPE, Event, EventBase, time_bound_broken
from shared.storable import unstorable_paths

T = TypeVar("T")


def encode(value: BaseModel) -> bytes:
    # Null fields are left out: in this contract "absent" and "null" both mean "not said".
    return value.__pydantic_serializer__.to_json(value, exclude_none=True)


def decode_with(adapter: TypeAdapter[T], payload: bytes) -> T:
    return adapter.validate_json(payload)


def encode_event(event: Event) -> bytes:
    return encode(event)


def decode_event(payload: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(payload)


# How far a consumer's clock may run behind ingest's before an event ingest took is refused.
CLOCK_SKEW = timedelta(minutes=5)


def decode_event_on(topic: str, payload: bytes, max_future: timedelta | None = None) -> Event:
    """A backend event read from ``topic``, refused (a ValueError: the consumer dead-letters it)
    when its type belongs on another topic: a producer writing straight to Kafka that puts a
    purchase on retain.support would otherwise have it applied as if nothing were wrong.
    With ``max_future``, also when its ``occurred_at`` is more than that (and ``CLOCK_SKEW``)
    ahead of this clock or not after 1970, as ingest refuses it (``RETAIN_INGEST_MAX_FUTURE_S``):
    a year typed wrong would be a customer's last purchase for years. Time only makes an event
    less ahead, and the skew allowance covers a consumer's clock a little behind ingest's, so
    one ingest accepted is not refused here (with the same setting on both); a refused one can
    be replayed once its time comes."""
    event = EVENT_ADAPTER.validate_json(payload)
    # As ingest refuses it: PostgreSQL stores no NUL, and the segmenter failed its profile's
    # write while the kpi applied the event. Only ever written as this escape (a raw control
    # character is not JSON), so the walk runs only for the rare record that has one.
    if b"\\u0000" in payload:
        paths = unstorable_paths(orjson.loads(payload))
        if paths:
            raise ValueError(f"NUL characters are not allowed (at {', '.join(paths[:5])})")
    home = TOPIC_OF_TYPE[event.type]
    if not topic.endswith(home):
        raise ValueError(f"a {event.type} event on {topic}: {event.type} events go on the {home!r} topic")
    if max_future is not None:
        at = event.occurred_at
        broken = time_bound_broken(at, time.time() + (max_future + CLOCK_SKEW).total_seconds())
        if broken == "ahead":
            raise ValueError(
                f"occurred_at {at.isoformat()} is more than "
                f"{max_future.total_seconds() / 3600:g} h ahead of this consumer's clock"
            )
        if broken == "epoch":
            raise ValueError(f"occurred_at {at.isoformat()} {NOT_AFTER_EPOCH}")
    return event


def event_digest(value: object) -> int | None:
    """What a backend event's id names, as a signed 64-bit integer (a BIGINT), for a consumer's
    ledger to keep beside the id: the digest of the event's one encoding, so a resend of it as
    it was matches whatever JSON its producer wrote (key order, spacing, an explicit null), and
    another event sent under an id already applied does not (shared.db.claim_events). The same
    values written the same way, as ingest's 409 judges (services.ingest.service): an amount
    100 is not 100.0, nor a time in another offset. Its low byte is ``DIGEST_VERSION``.

    None for the values of our own topics: their ids name one outcome (a message's status, the
    update a cause made), and a later copy of it may carry a later time; the first one stands.
    Backend ids are their producers', which may reuse one by mistake, as ingest refuses (409)."""
    if not isinstance(value, EventBase):
        return None
    digest = int.from_bytes(hashlib.blake2b(encode(value), digest_size=8).digest(), "big", signed=True)
    return (digest & ~DIGEST_VERSION_MASK) | DIGEST_VERSION


# The low byte of an event_digest: its version. The ledgers keep digests for good, so when an
# event's encoding may change (a validator that rewrites a value, a new field, pydantic's
# serialiser), bump it: digests of another version are not compared (shared.db.claim_events),
# where they would make every event read again (a restore, a replay) look reused.
# tests/shared/test_codec.py holds the digests of the example events to catch such a change.
# 2: an amount of -0 reads 0, a locale's language its current code (iw-IL is he-IL): events
# applied before with those, read again from the topics, encode otherwise.
DIGEST_VERSION = 2
DIGEST_VERSION_MASK = 0xFF


def content_etag(value: object) -> str:
    """A version of a JSON-able value as an ETag (the caps, a journey, a template): a digest of
    its canonical JSON, so that an edit's If-Match names what its editor read."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_key(customer_id: str) -> bytes:
    return customer_id.encode("utf-8")
