"""The one JSON encoding of everything that crosses a Kafka topic.

Producers and consumers use these functions and nothing else, so that an event read back is
equal to the event written (Decimal amounts travel as strings, datetimes as RFC 3339).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, TypeAdapter

from shared.events import EVENT_ADAPTER, Event

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


def encode_key(customer_id: str) -> bytes:
    return customer_id.encode("utf-8")
