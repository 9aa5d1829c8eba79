"""The event contract: strictness, and round-trips through the shared encoding."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.codec import decode_event, decode_event_on, encode, encode_event
from shared.events import (
    BEYOND_64_BITS,
    EVENT_ADAPTER,
    EXAMPLES,
    TOPIC_OF_TYPE,
    CancellationEvent,
    Consents,
    ProfileEvent,
    PurchaseEvent,
    PurchaseItem,
    SupportEvent,
    one_error_per_attribute,
)


def _errors(payload: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_python(payload)
    errors = one_error_per_attribute(info.value.errors())
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in errors}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_documented_example_is_valid_and_round_trips(name: str) -> None:
    event = EVENT_ADAPTER.validate_python(EXAMPLES[name])
    assert event.type == name
    assert decode_event(encode_event(event)) == event


def test_naive_datetime_is_rejected() -> None:
    errors = _errors({**EXAMPLES["purchase"], "occurred_at": "2026-11-21T18:02:11"})
    assert "timezone" in errors["occurred_at"]


def test_unknown_top_level_field_is_rejected_and_points_to_attributes() -> None:
    errors = _errors({**EXAMPLES["profile"], "vip": True})
    assert errors == {"vip": "Extra inputs are not permitted"}


def test_a_bad_attribute_is_one_error_at_its_own_path() -> None:
    """Not one per member of the union of attribute values, each under a path ending in
    pydantic's internal name for it (attributes.tags.constrained-str, ….constrained-int, …)."""
    errors = _errors(
        {
            **EXAMPLES["profile"],
            "attributes": {
                "tags": ["vip", "b2b"],
                "address": {"city": "Haifa"},
                "note": "x" * 501,
                "score": float("inf"),
                "ok": "fine",
            },
        }
    )
    flat = "must be a string, a number, a boolean or null: attributes hold flat values only, not "
    assert errors == {
        "attributes.tags": flat + "lists",
        "attributes.address": flat + "objects",
        "attributes.note": "String should have at most 500 characters",
        "attributes.score": "Input should be a finite number",
    }


def test_attribute_values_keep_their_kind_from_python_and_from_json() -> None:
    attributes = {"s": "fine", "b": True, "i": -(2**63), "j": 2**63 - 1, "f": 1.5, "n": None}
    payload = {**EXAMPLES["profile"], "attributes": attributes}
    for event in (EVENT_ADAPTER.validate_python(payload), EVENT_ADAPTER.validate_json(orjson.dumps(payload))):
        assert isinstance(event, ProfileEvent)
        assert event.attributes == attributes
        assert event.attributes is not None
        kinds = {k: type(v) for k, v in event.attributes.items()}
        assert kinds == {"s": str, "b": bool, "i": int, "j": int, "f": float, "n": type(None)}
        assert list(event.attributes) == sorted(attributes)  # kept in key order


@pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 123456789012345678901234])
def test_an_integer_attribute_beyond_64_bits_is_refused_not_kept_as_a_float(number: int) -> None:
    """The union's float member would take it, keeping 16 of its digits."""
    payload = {**EXAMPLES["profile"], "attributes": {"account": number}}
    assert _errors(payload) == {"attributes.account": "Value error, " + BEYOND_64_BITS}
    with pytest.raises(ValidationError, match="beyond 64 bits"):
        EVENT_ADAPTER.validate_json(_json_with(payload, number))
    # A float as large is a float, written so.
    event = EVENT_ADAPTER.validate_python({**payload, "attributes": {"account": float(number)}})
    assert isinstance(event, ProfileEvent)
    assert event.attributes == {"account": float(number)}


def _json_with(payload: dict[str, Any], number: int) -> bytes:
    """orjson writes no integer beyond 64 bits: a placeholder, replaced."""
    return orjson.dumps({**payload, "attributes": {"account": "@"}}).replace(b'"@"', str(number).encode())


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("he-il", "he-IL"),
        ("HE-IL", "he-IL"),
        ("he-IL", "he-IL"),
        ("AR", "ar"),
        ("zh-hant-tw", "zh-Hant-TW"),
        # The language by its current code: older Java writes Hebrew as iw; ISO 639-2 as heb.
        ("iw-IL", "he-IL"),
        ("heb", "he"),
        ("ARA-eg", "ar-EG"),
        ("in-ID", "id-ID"),
    ],
)
def test_a_locale_is_kept_in_its_conventional_case(sent: str, kept: str) -> None:
    # Rules compare text: `locale eq "he-IL"` missed a profile sent as "he-il".
    event = EVENT_ADAPTER.validate_python({**EXAMPLES["profile"], "locale": sent})
    assert isinstance(event, ProfileEvent)
    assert event.locale == kept


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("phone", "052-1234567", "+ and the country code"),
        ("phone", "+97252", "E.164"),
        ("phone", "phone me", "not a valid E.164 phone number"),
        ("locale", "klingon", "BCP 47"),
        ("locale", "xx-YY", "unknown locale"),
        ("timezone", "Asia/Atlantis", "IANA"),
        ("timezone", "localtime", "IANA"),
        ("email", "not-an-email", "email"),
        ("preferred_channel", "pigeon", "email"),
        ("name", "x" * 201, "at most 200"),
    ],
)
def test_profile_field_validation_names_the_field(field: str, value: str, fragment: str) -> None:
    errors = _errors({**EXAMPLES["profile"], field: value})
    assert field in errors
    assert fragment in errors[field]
    assert "default region" not in errors[field]  # phonenumbers' words about its own arguments


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("amount", "-0.01", "greater than or equal to 0"),
        ("amount", "lots", "decimal"),
        ("currency", "usd", "ISO 4217"),
        ("currency", "ABC", "ISO 4217"),
    ],
)
def test_purchase_field_validation(field: str, value: str, fragment: str) -> None:
    errors = _errors({**EXAMPLES["purchase"], field: value})
    assert fragment in errors[field]


def test_amount_accepts_numbers_and_strings_as_decimal() -> None:
    as_number = EVENT_ADAPTER.validate_python({**EXAMPLES["purchase"], "amount": 12.5, "items": None})
    as_string = EVENT_ADAPTER.validate_python({**EXAMPLES["purchase"], "amount": "12.50", "items": None})
    assert isinstance(as_number, PurchaseEvent)
    assert isinstance(as_string, PurchaseEvent)
    assert as_number.amount == as_string.amount == Decimal("12.5")


@pytest.mark.parametrize("zero", ["-0", "-0.00", -0.0])
def test_a_negative_zero_amount_is_zero(zero: object) -> None:
    """It passed the bound (>= 0) and read "-₪0.00" in a customer's thank-you."""
    event = EVENT_ADAPTER.validate_python({**EXAMPLES["purchase"], "amount": zero, "items": None})
    assert isinstance(event, PurchaseEvent)
    assert event.amount.is_zero()
    assert not event.amount.is_signed()
    assert '"amount":"0' in encode(event).decode()


def test_profile_event_must_say_something() -> None:
    errors = _errors({k: EXAMPLES["profile"][k] for k in ("event_id", "type", "customer_id", "occurred_at")})
    assert "at least one of" in next(iter(errors.values()))


def test_future_schema_version_is_rejected() -> None:
    errors = _errors({**EXAMPLES["support"], "schema_version": 2})
    assert "schema_version" in errors


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_python({**EXAMPLES["support"], "type": "refund"})
    assert info.value.errors()[0]["type"] == "union_tag_invalid"


# --- property: whatever the models accept round-trips through the shared encoding ---------

# Identifiers hold no white space: every separator category (Zs, and the line and paragraph
# separators Zl and Zp, U+2028 and U+2029, which \S also refuses), no control characters.
ids = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=("Zs", "Zl", "Zp", "Cc", "Cs")),
    min_size=1,
    max_size=40,
)
labels = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=20)
offsets = st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis takes naive bounds
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=offsets | st.just(UTC),
)
money = st.decimals(
    min_value=0, max_value=Decimal("99999999"), places=2, allow_nan=False, allow_infinity=False
)
common = {"event_id": ids, "customer_id": ids, "occurred_at": moments}

profiles = st.builds(
    ProfileEvent,
    **common,
    name=st.text(min_size=1, max_size=50).map(str.strip).filter(bool),
    email=st.sampled_from(["a@example.com", "נועה@example.co.il", "x.y+z@example.org"]),
    phone=st.sampled_from(["+972521234567", "+201001234567", "+12125551234"]) | st.none(),
    locale=st.sampled_from(["he-IL", "ar", "ar-EG", "en-US"]),
    timezone=st.sampled_from(["Asia/Jerusalem", "Africa/Cairo", "America/New_York", "UTC"]),
    preferred_channel=st.sampled_from(["email", "sms", "whatsapp"]) | st.none(),
    consents=st.builds(Consents, email=st.booleans() | st.none(), sms=st.booleans(), whatsapp=st.booleans())
    | st.none(),
    attributes=st.dictionaries(
        labels, st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20) | st.booleans(), max_size=4
    )
    | st.none(),
)
purchases = st.builds(
    PurchaseEvent,
    **common,
    order_id=ids,
    amount=money,
    currency=st.sampled_from(["ILS", "USD", "EGP", "EUR"]),
    items=st.lists(
        st.builds(
            PurchaseItem,
            sku=ids,
            category=labels | st.none(),
            quantity=st.integers(1, 99),
            unit_price=money,
        ),
        max_size=3,
    )
    | st.none(),
)
supports = st.builds(
    SupportEvent,
    **common,
    ticket_id=ids,
    action=st.sampled_from(["opened", "agent_replied", "customer_replied", "resolved", "reopened"]),
    category=labels,
    priority=st.sampled_from(["low", "normal", "high", "urgent"]) | st.none(),
    is_complaint=st.booleans(),
)
cancellations = st.builds(
    CancellationEvent,
    **common,
    reason=st.sampled_from(["price", "service", "both", "other"]),
    subscription_id=ids | st.none(),
    reason_text=st.text(max_size=100).map(str.strip) | st.none(),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(profiles, purchases, supports, cancellations))
def test_every_accepted_event_round_trips_unchanged(event: Any) -> None:
    # Whatever the constructor accepted must also be accepted back from its own JSON, equal.
    revalidated = EVENT_ADAPTER.validate_python(event.model_dump())
    decoded = decode_event(encode_event(revalidated))
    assert decoded == revalidated
    assert decoded.occurred_at == event.occurred_at
    assert decoded.occurred_at.utcoffset() == event.occurred_at.utcoffset()


def test_every_known_currency_code_is_three_capitals() -> None:
    """The currency check is set membership alone; that is ISO 4217's shape only while the
    list it checks against holds nothing else (a babel upgrade could change it)."""
    from shared.events import _currencies  # noqa: PLC0415 - the private list the check uses

    codes = _currencies()
    assert len(codes) > 150
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in codes)


@pytest.mark.parametrize("kind", ["profile", "purchase", "support", "cancellation"])
def test_a_backend_event_decodes_on_its_own_topic_only(kind: str) -> None:
    payload = orjson.dumps(EXAMPLES[kind])
    home = "retain." + TOPIC_OF_TYPE[kind]
    assert decode_event_on(home, payload).type == kind
    elsewhere = next(f"retain.{t}" for k, t in TOPIC_OF_TYPE.items() if k != kind)
    with pytest.raises(ValueError, match=f"a {kind} event on {elsewhere}: {kind} events go on"):
        decode_event_on(elsewhere, payload)


def test_straight_onto_kafka_a_nul_is_refused_as_ingest_refuses_it() -> None:
    # PostgreSQL stores no NUL: the segmenter failed its write of the profile (a letter naming
    # an SQL statement) while the kpi applied the same event.
    named = orjson.dumps({**EXAMPLES["profile"], "name": "No\u0000a", "attributes": {"k\u0000": 1}})
    with pytest.raises(
        ValueError, match=r"^NUL characters are not allowed \(at \$\.name, \$\.attributes\[\?\]\)$"
    ):
        decode_event_on("retain.profiles", named)
    # The escaped backslash before u0000 is text, not a NUL.
    text = orjson.dumps({**EXAMPLES["profile"], "name": "No\\u0000a"})
    kept = decode_event_on("retain.profiles", text)
    assert isinstance(kept, ProfileEvent)
    assert kept.name == "No\\u0000a"


def test_straight_onto_kafka_the_time_is_bounded_as_ingest_bounds_it() -> None:
    """A record produced straight to Kafka with a year typed wrong is refused (dead-lettered by
    the consumer) by the bound ingest applies; one within it, or in the past, is taken."""
    day = timedelta(days=1)

    def at(when: datetime) -> bytes:
        return orjson.dumps({**EXAMPLES["purchase"], "occurred_at": when.isoformat()})

    now = datetime.now(UTC)
    assert decode_event_on("retain.purchases", at(now + timedelta(hours=23)), day).type == "purchase"
    # A consumer's clock a minute behind ingest's: what ingest took at its edge still goes in.
    assert decode_event_on("retain.purchases", at(now + day + timedelta(minutes=1)), day).type == "purchase"
    with pytest.raises(ValueError, match=r"ahead of this consumer's clock"):
        decode_event_on("retain.purchases", at(now + day + timedelta(minutes=10)), day)
    assert decode_event_on("retain.purchases", at(datetime(1999, 5, 1, tzinfo=UTC)), day).type == "purchase"
    with pytest.raises(ValueError, match=r"is more than 24 h ahead of this consumer's clock"):
        decode_event_on("retain.purchases", at(now.replace(year=now.year + 1)), day)
    with pytest.raises(ValueError, match=r"is not after 1970-01-01"):
        decode_event_on("retain.purchases", at(datetime(1970, 1, 1, tzinfo=UTC)), day)
    # Without a bound (the codec alone), only the schema and the topic are checked.
    assert decode_event_on("retain.purchases", at(now.replace(year=now.year + 1))).type == "purchase"


def test_an_event_on_the_topics_is_read_again_as_it_was_accepted() -> None:
    """Ingest refuses more of a new request than the event models do (services.ingest.batch):
    an event accepted before, produced straight onto Kafka or by an older ingest, is read
    again on a replay or by a new consumer group; refused then, it went to the dead letters
    (an opt-out lost with it)."""
    accepted_before = [
        {**EXAMPLES["purchase"], "amount": "1E+3"},  # Java's BigDecimal.toString()
        {**EXAMPLES["purchase"], "amount": 12345678901234.5678},  # a float, its digits gone
        {**EXAMPLES["profile"], "name": "Noa\tLevi", "consents": {"email": False}},
        {**EXAMPLES["profile"], "customer_id": "c\u200b1"},
        {**EXAMPLES["support"], "category": "late\x1bdelivery"},
    ]
    for payload in accepted_before:
        topic = "retain." + TOPIC_OF_TYPE[payload["type"]]
        assert decode_event_on(topic, orjson.dumps(payload)).type == payload["type"]
