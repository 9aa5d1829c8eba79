"""The one JSON encoding of everything that crosses a Kafka topic.

Producers and consumers use these functions and nothing else, so that an event read back is
equal to the event written (Decimal amounts travel as strings, datetimes as RFC 3339).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, TypeAdapter

from shared.events import EVENT_ADAPTER, TOPIC_OF_TYPE, Event

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


def decode_event_on(topic: str, payload: bytes) -> Event:
    """A backend event read from ``topic``, refused (a ValueError: the consumer dead-letters it)
    when its type belongs on another topic: a producer writing straight to Kafka that puts a
    purchase on retain.support would otherwise have it applied as if nothing were wrong."""
    event = EVENT_ADAPTER.validate_json(payload)
    home = TOPIC_OF_TYPE[event.type]
    if not topic.endswith(home):
        raise ValueError(f"a {event.type} event on {topic}: {event.type} events go on the {home!r} topic")
    return event


def encode_key(customer_id: str) -> bytes:
    return customer_id.encode("utf-8")
