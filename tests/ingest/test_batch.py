from __future__ import annotations

import itertools

import pytest

from services.ingest.batch import (
    BatchTooLargeError,
    InvalidBatchError,
    MalformedJsonError,
    parse_body,
    validate_batch,
)
from shared.events import EXAMPLES


def test_single_object_and_array_bodies() -> None:
    assert parse_body(b'{"a": 1}') == ([{"a": 1}], False)
    assert parse_body(b"[1, 2]") == ([1, 2], True)


def test_malformed_json_names_the_problem() -> None:
    with pytest.raises(MalformedJsonError, match="not valid JSON"):
        parse_body(b'{"type": "purchase",')


def test_missing_event_ids_are_assigned_once_in_order() -> None:
    counter = itertools.count()
    items = [{k: v for k, v in EXAMPLES[n].items() if k != "event_id"} for n in ("purchase", "support")]
    events = validate_batch(items, 10, new_id=lambda: f"gen-{next(counter)}")
    assert [e.event_id for e in events] == ["gen-0", "gen-1"]


def test_every_error_of_every_event_is_listed_with_index_and_field() -> None:
    items = [
        EXAMPLES["support"],
        {**EXAMPLES["purchase"], "amount": "-3", "currency": "usd"},
        {**EXAMPLES["profile"], "timezone": "Nowhere/City"},
        {**EXAMPLES["support"], "type": "refund"},
        "not an object",
    ]
    with pytest.raises(InvalidBatchError) as info:
        validate_batch(items, 10)
    found = {(e.index, e.field) for e in info.value.errors}
    assert found == {(1, "amount"), (1, "currency"), (2, "timezone"), (3, "type"), (4, "(event)")}
    assert info.value.types == ["purchase", "purchase", "profile", "unknown", "unknown"]


def test_batch_over_the_limit_is_refused_before_validation() -> None:
    with pytest.raises(BatchTooLargeError, match="at most 2"):
        validate_batch([{}, {}, {}], 2)


def test_empty_batch_is_invalid() -> None:
    with pytest.raises(InvalidBatchError):
        validate_batch([], 2)


@pytest.mark.parametrize("tag", [{}, [], ["purchase"], 3, None])
def test_a_type_of_any_json_shape_is_an_invalid_event_not_a_crash(tag: object) -> None:
    with pytest.raises(InvalidBatchError) as info:
        validate_batch([{**EXAMPLES["purchase"], "type": tag}], 10)
    assert [(e.index, e.field) for e in info.value.errors] == [(0, "type")]
    assert info.value.types == ["unknown"]
