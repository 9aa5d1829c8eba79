"""What an event id names (``event_digest``): the same for a resend however its JSON was
written, another for another event, and stable across releases (the ledgers keep it)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from shared.codec import DIGEST_VERSION, DIGEST_VERSION_MASK, decode_event, encode_event, event_digest
from shared.events import EVENT_ADAPTER, EXAMPLES, MESSAGE_EVENT_ADAPTER, Event

# The digests of the README's example events. The ledgers keep digests for good: if this fails,
# the encoding of events changed (a validator, a field, pydantic's serialiser), and the change
# must bump DIGEST_VERSION in shared/codec.py, with these values, or every event read again
# after the release (a restore, a replay) would be dead-lettered as reusing its own id.
KEPT = {
    "profile": 8991639326260945922,
    "purchase": 5416595645782431490,
    "support": -8656357310642605822,
    "cancellation": -7316514069522023422,
}


def example(kind: str, **changes: Any) -> Event:
    return EVENT_ADAPTER.validate_python({**EXAMPLES[kind], **changes})


def test_the_example_events_keep_their_digests_across_releases() -> None:
    assert {kind: event_digest(example(kind)) for kind in EXAMPLES} == KEPT
    assert all(d & DIGEST_VERSION_MASK == DIGEST_VERSION for d in KEPT.values())


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_a_resend_written_otherwise_names_the_same_event(kind: str) -> None:
    """Keys in another order, spaced, the schema version said: the same event."""
    event = example(kind)
    written = orjson.loads(encode_event(event))
    again = decode_event(
        json.dumps({**dict(reversed(written.items())), "schema_version": 1}, indent=3).encode()
    )
    assert again == event
    assert event_digest(again) == event_digest(event)


def test_a_null_said_is_a_null_left_out() -> None:
    said = decode_event(orjson.dumps({**EXAMPLES["purchase"], "items": None}))
    left_out = decode_event(orjson.dumps({k: v for k, v in EXAMPLES["purchase"].items() if k != "items"}))
    assert event_digest(said) == event_digest(left_out)


def test_another_event_under_the_same_id_has_another_digest() -> None:
    first = example("purchase")
    assert event_digest(example("purchase", amount="350.00")) != event_digest(first)
    assert event_digest(example("purchase", order_id="88413")) != event_digest(first)


def test_a_json_number_amount_reads_alike_on_both_of_ingest_s_readers() -> None:
    """Ingest validates a body whose items all have ids straight from JSON, and any other from
    orjson's Python values: 100.0 was Decimal('100') on one and Decimal('100.0') on the other,
    so one body encoded two ways, and its resend was judged another event."""
    for number in ("100.0", "1e2", "349.9", "100"):
        body = orjson.dumps({**EXAMPLES["purchase"], "items": None}).replace(b'"349.90"', number.encode())
        from_json = EVENT_ADAPTER.validate_json(body)
        from_python = EVENT_ADAPTER.validate_python(orjson.loads(body))
        assert encode_event(from_json) == encode_event(from_python), number
        assert event_digest(from_json) == event_digest(from_python)


def test_our_own_topics_values_have_no_digest() -> None:
    message = MESSAGE_EVENT_ADAPTER.validate_python(
        {
            "event_id": "m1:sent",
            "customer_id": "c1",
            "occurred_at": "2026-11-21T18:02:11Z",
            "message_id": "m1",
            "journey": "welcome",
            "kind": "marketing",
            "status": "sent",
        }
    )
    assert event_digest(message) is None
