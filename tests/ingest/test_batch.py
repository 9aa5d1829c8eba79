from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest import batch
from services.ingest.batch import (
    BatchTooLargeError,
    InvalidBatchError,
    MalformedJsonError,
    check_events,
    content_id,
    parse_body,
    validate_batch,
    validate_body,
)
from shared.events import BEYOND_64_BITS, EXAMPLES, ProfileEvent


def test_single_object_and_array_bodies() -> None:
    assert parse_body(b'{"a": 1}') == ([{"a": 1}], False)
    assert parse_body(b"[1, 2]") == ([1, 2], True)


def test_malformed_json_names_the_problem() -> None:
    with pytest.raises(MalformedJsonError, match="not valid JSON"):
        parse_body(b'{"type": "purchase",')


def test_missing_event_ids_are_assigned_once_in_order() -> None:
    counter = itertools.count()
    items = [{k: v for k, v in EXAMPLES[n].items() if k != "event_id"} for n in ("purchase", "support")]
    events = validate_batch(items, 10, new_id=lambda _item: f"gen-{next(counter)}")
    assert [e.event_id for e in events] == ["gen-0", "gen-1"]


def test_an_event_sent_again_without_an_id_is_the_same_event() -> None:
    """A resend (after a timeout or a 503) of events without ids gets the same ids, whatever the
    order of their keys; an event that differs in anything gets another."""
    purchase = {k: v for k, v in EXAMPLES["purchase"].items() if k != "event_id"}
    first = validate_batch([dict(purchase)], 10)[0].event_id
    again = validate_batch([dict(reversed(list(purchase.items())))], 10)[0].event_id
    assert first == again
    assert str(uuid.UUID(first)) == first
    other = validate_batch([{**purchase, "amount": "1.00"}], 10)[0].event_id
    assert other != first


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


# --- validate_body: the bytes path and the item-by-item path agree ---------------------------


def _ids() -> Callable[[dict[str, Any]], str]:
    counter = itertools.count()
    return lambda _item: f"gen-{next(counter)}"


def _outcome(validate: Callable[[], list[Any]]) -> tuple[Any, ...]:
    try:
        return ("accepted", validate())
    except InvalidBatchError as exc:
        return ("invalid", exc.errors, exc.types)
    except (MalformedJsonError, BatchTooLargeError) as exc:
        return (type(exc).__name__, str(exc))


def test_a_batch_that_carries_its_ids_is_validated_from_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def item_by_item(body: bytes) -> tuple[list[Any], bool]:
        raise AssertionError("took the item-by-item path")

    monkeypatch.setattr(batch, "parse_body", item_by_item)
    body = orjson.dumps([EXAMPLES["purchase"], EXAMPLES["support"]])
    assert [e.event_id for e in validate_body(body, 10)] == ["shop-order-88412", "desk-5512-opened"]
    single = b" \n" + orjson.dumps(EXAMPLES["profile"])
    assert [e.type for e in validate_body(single, 10)] == ["profile"]


def test_the_bytes_path_keeps_the_batch_limit() -> None:
    body = orjson.dumps([{**EXAMPLES["support"], "event_id": f"s-{i}"} for i in range(3)])
    with pytest.raises(BatchTooLargeError, match="at most 2 events; this one has 3"):
        validate_body(body, 2)


_PROFILE_WITH_NUMBER = orjson.dumps({**EXAMPLES["profile"], "attributes": {"x": "@"}})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[]", InvalidBatchError),  # empty: named as such, not accepted as nothing
        (b'[{"event_id": "x"', MalformedJsonError),
        (orjson.dumps([{**EXAMPLES["purchase"], "order_id": "a\u0000b"}]), InvalidBatchError),
        (orjson.dumps([EXAMPLES["purchase"], {**EXAMPLES["support"], "event_id": None}]), None),
        # Numbers orjson refuses and pydantic's parser would read as infinite.
        (_PROFILE_WITH_NUMBER.replace(b'"@"', b"1e400"), MalformedJsonError),
        (_PROFILE_WITH_NUMBER.replace(b'"@"', b"NaN"), MalformedJsonError),
    ],
)
def test_what_the_bytes_path_refuses_is_answered_by_the_item_by_item_path(
    body: bytes, expected: type[Exception] | None
) -> None:
    assert _outcome(lambda: validate_body(body, 10, _ids())) == _outcome(
        lambda: validate_batch(parse_body(body)[0], 10, _ids())
    )
    if expected is not None:
        with pytest.raises(expected):
            validate_body(body, 10)


@pytest.mark.parametrize("with_ids", [True, False])
def test_an_integer_attribute_beyond_64_bits_is_refused_on_both_paths(with_ids: bool) -> None:
    """orjson reads it as a float, which the schema would keep with 16 of its digits."""
    item = {**EXAMPLES["profile"], "attributes": {"account": "@", "score": "#"}}
    if not with_ids:
        del item["event_id"]
    body = orjson.dumps([item]).replace(b'"@"', b"123456789012345678901234").replace(b'"#"', b"1e30")
    for new_id in (_ids(), content_id):  # the id made from the content too: a 422, not a 500
        with pytest.raises(InvalidBatchError) as info:
            validate_body(body, 10, new_id)
        assert [(e.field, e.message) for e in info.value.errors] == [
            ("attributes.account", "Value error, " + BEYOND_64_BITS)
        ]
    # A float written as one, however large, is a float.
    [event] = validate_body(body.replace(b"123456789012345678901234", b"12"), 10, _ids())
    assert isinstance(event, ProfileEvent)
    assert event.attributes == {"account": 12, "score": 1e30}


# Numbers as written, whatever a parser makes of them: "@" marks a token the body gets raw.
_RAW = [
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "100000000000000000000",
    "1E2",
    "-0",
    "0.1000000000000000000001",
]

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([f"@{raw}" for raw in _RAW])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(
        ["349.90", "1e2", " 12 ", "-0", "+972521234567", "0521234567", "2026-11-21T18:02:11", "ar-EG", "UTC"]
    ),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["city", "email", "x y"]) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    items: list[Any] = []
    for n in range(draw(st.integers(1, 4))):
        item = {**EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))], "event_id": f"e-{n}"}
        for field in draw(
            st.lists(st.sampled_from([*item, "amount", "email", "attributes", "bogus"]), max_size=3)
        ):
            if draw(st.booleans()):
                item[field] = draw(_json)
            else:
                item.pop(field, None)
        items.append(item)
    value: Any = items if len(items) > 1 or draw(st.booleans()) else items[0]
    # Both ways backends write JSON: UTF-8 as is, and everything beyond ASCII escaped.
    body = json.dumps(value).encode() if draw(st.booleans()) else orjson.dumps(value)
    for raw in _RAW:
        body = body.replace(f'"@{raw}"'.encode(), raw.encode())
    return body


@settings(max_examples=400, deadline=None)
@given(_bodies())
def test_both_paths_accept_the_same_events_with_equal_values_and_refuse_alike(body: bytes) -> None:
    assert _outcome(lambda: validate_body(body, 3, _ids())) == _outcome(
        lambda: validate_batch(parse_body(body)[0], 3, _ids())
    )


def test_event_times_within_a_day_ahead_and_after_1970_pass() -> None:
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    times = [
        "2026-11-28T11:59:59+00:00",  # a day ahead, less a second
        "2026-11-28T14:00:01+02:00",  # a day and a second
        "1970-01-01T00:00:01+00:00",
        "1970-01-01T02:00:00+02:00",  # the epoch, in Israel
    ]
    body = [{**EXAMPLES["purchase"], "event_id": f"p{i}", "occurred_at": t} for i, t in enumerate(times)]
    events = validate_batch(body, 10)
    check_events(events[:1] + events[2:3], now, timedelta(days=1))  # no error
    with pytest.raises(InvalidBatchError) as info:
        check_events(events, now, timedelta(days=1))
    assert [(e.index, e.field) for e in info.value.errors] == [(1, "occurred_at"), (3, "occurred_at")]
    assert "at most 24 h ahead" in info.value.errors[0].message
    assert info.value.types == ["purchase", "purchase"]


@pytest.mark.parametrize(
    ("number", "read_as"),
    [("12345678901234.5678", "12345678901234.568"), ("1234567890123.4567", "1234567890123.4568")],
)
def test_an_amount_a_json_number_cannot_keep_exactly_is_refused_not_changed(
    number: str, read_as: str
) -> None:
    """Read as a float, it was accepted with its last digits changed; as a string it is kept."""
    item = {**EXAMPLES["purchase"], "amount": "@"}
    body = orjson.dumps([item]).replace(b'"@"', number.encode())
    with pytest.raises(InvalidBatchError) as info:
        validate_body(body, 10, _ids())
    [error] = info.value.errors
    assert error.field == "amount"
    assert f"read as {read_as}" in error.message
    assert "send it as a JSON string" in error.message
    [event] = validate_body(orjson.dumps([{**item, "amount": number}]), 10, _ids())
    assert str(event.amount) == number  # type: ignore[union-attr]
    # Up to 15 significant digits a number is what was written.
    [exact] = validate_body(body.replace(number.encode(), b"99999999999.9999"), 10, _ids())
    assert str(exact.amount) == "99999999999.9999"  # type: ignore[union-attr]


def test_a_body_nested_beyond_the_second_reader_s_limit_is_a_400_not_a_500() -> None:
    """A float beyond 64 bits sends the body to pydantic's reader, whose nesting limit is lower
    than orjson's: its ValueError was an internal error."""
    item = {**EXAMPLES["profile"], "attributes": {"a": "@"}, "extra": "#"}
    body = orjson.dumps(item).replace(b'"@"', b"1e30").replace(b'"#"', b"[" * 250 + b"]" * 250)
    with pytest.raises(MalformedJsonError, match="could not be read"):
        parse_body(body)


@pytest.mark.parametrize(
    ("field", "one", "other"),
    [
        ("amount", "1.0", "1.00"),
        ("occurred_at", "2026-05-01T02:00:00+02:00", "2026-05-01T00:00:00Z"),
    ],
)
def test_one_id_on_two_spellings_in_one_batch_is_refused_as_a_resend_of_it_would_be(
    field: str, one: str, other: str
) -> None:
    """Equal values, different bytes on the topic: sent alone later, the second is a 409 (the
    resend check compares what was produced); in one request it was dropped as a duplicate."""
    first = {**EXAMPLES["purchase"], field: one}
    second = {**first, field: other}
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)  # after both events' times
    with pytest.raises(InvalidBatchError) as info:
        check_events(validate_batch([first, second], 10), now, timedelta(days=1))
    assert [(e.index, e.field) for e in info.value.errors] == [(1, "event_id")]
    check_events(validate_batch([first, dict(first)], 10), now, timedelta(days=1))  # one event


def test_a_new_event_s_ids_and_texts_hold_no_control_or_invisible_character() -> None:
    """ "c\u200b1" looked like "c1" and was another customer; a bell in a name reached a
    customer's message. Refused for what a request brings (the models still read an event
    already on the topics as it was accepted); each named by its code point."""
    items = [
        {**EXAMPLES["purchase"], "customer_id": "c\u200b1", "order_id": "o\x07"},
        {**EXAMPLES["profile"], "event_id": "p1", "name": "Noa\x1b", "attributes": {"ti\x7fer": "x"}},
        {**EXAMPLES["support"], "category": "late\tdelivery"},
        # Direction marks and joiners are text: Hebrew, Arabic and Persian names carry them.
        {
            **EXAMPLES["profile"],
            "event_id": "p2",
            "name": "\u05d3\u05e0\u05d4 \u200f(VIP) \u0645\u06cc\u200c",
        },
    ]
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    with pytest.raises(InvalidBatchError) as info:
        check_events(validate_batch(items, 10), now, timedelta(days=1))
    assert [(e.index, e.field, e.message) for e in info.value.errors] == [
        (0, "customer_id", "control and invisible characters are not allowed here (U+200B)"),
        (0, "order_id", "control and invisible characters are not allowed here (U+0007)"),
        (1, "name", "control characters are not allowed here (U+001B)"),
        (1, "attributes.ti\x7fer", "control characters are not allowed here (U+007F)"),
        (2, "category", "control characters are not allowed here (U+0009)"),
    ]


@pytest.mark.parametrize(
    "empty",
    [{"consents": {}}, {"consents": {"email": None}}, {"attributes": {}}, {"consents": {}, "attributes": {}}],
)
def test_a_new_profile_event_whose_only_fields_are_empty_says_nothing(empty: dict[str, Any]) -> None:
    """Accepted, it only moved the customer's last-seen time in the segmenter."""
    base = {k: EXAMPLES["profile"][k] for k in ("event_id", "type", "customer_id", "occurred_at")}
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    events = validate_batch([{**base, **empty}], 10)  # the model reads it (as on the topics)
    with pytest.raises(InvalidBatchError) as info:
        check_events(events, now, timedelta(days=1))
    [error] = info.value.errors
    assert (error.index, error.field) == (0, "(event)")
    assert "empty ones say nothing" in error.message
    check_events(validate_batch([{**base, **empty, "name": "Noa"}], 10), now, timedelta(days=1))
