"""The event contract (schema version 1): one pydantic model per event type.

Every service decodes what crosses a topic with ``EVENT_ADAPTER`` (or the adapters of the
derived events further down), so a field means the same thing everywhere. The models are
strict on purpose: an event that is accepted here is one every consumer can apply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import phonenumbers
from babel import Locale, UnknownLocaleError
from babel.core import get_global
from babel.numbers import list_currencies
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.networks import validate_email
from pydantic_core import ErrorDetails

from shared.conditions import Choices, Domains, Forms, Range

SCHEMA_VERSION = 1

# Identifiers are opaque to Retain but end up in Kafka keys, URLs and log lines, so they may
# not contain white space and are bounded.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^\S+$")]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]
Label = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^\S(.*\S)?$")
]


# The validators below are pure functions of one string and dear (phonenumbers, Babel and
# email-validator cost 7-27 µs a call, most of an event's validation): valid values are cached
# (customers send the same address again and again); an invalid one raises, which is never cached.
_CACHED = 65_536


@lru_cache(maxsize=_CACHED)
def _e164(value: str) -> str:
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        # The library's own words ("(0) Missing or invalid default region.") are about its
        # arguments; a national number without +country is what a sender got wrong.
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            raise ValueError("not an E.164 phone number: + and the country code, e.g. +972521234567") from exc
        raise ValueError("not a valid E.164 phone number, e.g. +972521234567") from exc
    canonical = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    # Possible rather than valid: number ranges are allocated faster than metadata ships.
    if canonical != value or not phonenumbers.is_possible_number(parsed):
        raise ValueError("not a valid E.164 phone number, e.g. +972521234567")
    return value


def e164(value: str) -> str:
    """``value`` if it is an E.164 phone number (what ``Phone`` accepts); else a ValueError
    saying what is wrong. For settings, which name numbers outside any event."""
    return _e164(value)


@lru_cache(maxsize=_CACHED)
def _bcp47(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*", value):
        raise ValueError("not a BCP 47 language tag, e.g. he-IL, ar, en-US")
    try:
        Locale.parse(value, sep="-")
    except (UnknownLocaleError, ValueError) as exc:
        raise ValueError(f"unknown locale {value!r}") from exc
    return canonical_locale(value)


@lru_cache(maxsize=1)
def _language_aliases() -> dict[str, str]:
    """CLDR's deprecated and three-letter language codes with a code of their own: iw → he (what
    older Java writes for Hebrew), heb → he, ara → ar, in → id. Those naming a script or a
    region too (sh → sr_Latn) are left as written."""
    aliases = get_global("language_aliases")
    return {str(k): str(v) for k, v in aliases.items() if str(v).isalpha() and str(v).islower()}


def locale_tag(value: str) -> str:
    """``value`` in its one spelling (``canonical_locale``) if it is a locale the events accept;
    else a ValueError saying what is wrong. For rules, which name locales outside any event."""
    return _bcp47(value)


def time_zone_name(value: str) -> str:
    """``value`` as the IANA database spells it (asia/jerusalem is Asia/Jerusalem) if it is a zone
    the events accept; else a ValueError saying what is wrong. For rules: a profile's zone is
    always so spelt, and `timezone eq "asia/jerusalem"` matched nobody."""
    found = _zones_by_folded().get(value.casefold())
    if found is None:
        raise ValueError(f"unknown IANA time zone {value!r}, e.g. Asia/Jerusalem")
    return found


@lru_cache(maxsize=1)
def _zones_by_folded() -> dict[str, str]:
    return {zone.casefold(): zone for zone in _zones()}


def language_code(value: str) -> str:
    """``value`` by its current code (iw → he) if it is a language the events accept; else a
    ValueError saying what is wrong. For rules, which compare the language of a locale."""
    if not re.fullmatch(r"[A-Za-z]{2,3}", value):
        raise ValueError("not a language code, e.g. he, ar, en (a tag such as he-IL is a locale)")
    try:
        return _bcp47(value)
    except ValueError:
        raise ValueError(f"unknown language code {value!r}") from None


def current_language(code: str) -> str:
    """A language subtag, lower-cased, by its current code (iw → he, heb → he, tl → fil): one
    reading for the events, the messenger's templates and settings, and its quiet hours."""
    lower = code.lower()
    return _language_aliases().get(lower, lower)


@lru_cache(maxsize=_CACHED)
def canonical_locale(tag: str) -> str:
    """A tag in BCP 47's conventional case (RFC 5646 2.1.1): he-IL, zh-Hant-TW, its language by
    its current code (iw-IL is he-IL). Tags are case-insensitive, but rules compare text:
    `locale eq "he-IL"` did not match a profile sent as "he-il", and its `language` was "HE" for
    one sent as "HE-IL"; a Hebrew speaker sent as iw-IL or heb got English templates from the
    messenger and another `language` in the segmenter and the kpi's breakdowns."""
    first, *rest = tag.split("-")
    parts = [current_language(first)]
    for sub in rest:  # no extensions (one-letter subtags): the pattern above refuses them
        if len(sub) == 4 and sub.isalpha():
            parts.append(sub.title())  # a script
        elif len(sub) == 2 and sub.isalpha():
            parts.append(sub.upper())  # a region
        else:
            parts.append(sub.lower())
    return "-".join(parts)


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    # The system database also lists file names that are not zones ("localtime", "posix/…").
    return frozenset(
        z
        for z in available_timezones()
        if z not in {"localtime", "posixrules", "Factory"} and not z.startswith(("posix/", "right/"))
    )


@lru_cache(maxsize=_CACHED)
def _iana_zone(value: str) -> str:
    # ZoneInfo alone accepts file-system paths such as "localtime"; the list does not.
    if value not in _zones():
        raise ValueError(f"unknown IANA time zone {value!r}, e.g. Asia/Jerusalem")
    try:
        ZoneInfo(value)
    except ZoneInfoNotFoundError as exc:  # pragma: no cover - list and database disagree
        raise ValueError(f"unknown IANA time zone {value!r}") from exc
    return value


@lru_cache(maxsize=1)
def _currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def _iso4217(value: str) -> str:
    # Membership alone: every code in the list is three capitals (tests/shared/test_events.py),
    # and a regex first cost a fifth of validating a purchase.
    if value not in _currencies():
        raise ValueError("not an ISO 4217 currency code, e.g. ILS, USD, EUR")
    return value


@lru_cache(maxsize=_CACHED)
def _email(value: str) -> str:
    # pydantic's EmailStr, cached: the same check and the same normalised address.
    return validate_email(value)[1]


Email = Annotated[
    str,
    StringConstraints(max_length=254),
    AfterValidator(_email),
    WithJsonSchema({"type": "string", "format": "email", "maxLength": 254}),
]
Phone = Annotated[
    str,
    StringConstraints(max_length=16),
    AfterValidator(_e164),
    WithJsonSchema({"type": "string", "pattern": "^\\+[1-9][0-9]{1,14}$", "maxLength": 16}),
]
LocaleTag = Annotated[str, StringConstraints(max_length=35), AfterValidator(_bcp47)]
TimeZone = Annotated[str, StringConstraints(max_length=64), AfterValidator(_iana_zone)]
Currency = Annotated[
    str,
    AfterValidator(_iso4217),
    WithJsonSchema({"type": "string", "pattern": "^[A-Z]{3}$", "description": "An ISO 4217 code, e.g. ILS."}),
]


# A float keeps any decimal of up to 15 significant digits exactly (DBL_DIG); past that, the
# digits a backend sent may already be gone when the number is read.
EXACT_FLOAT_DIGITS = 15
# The validation context of what ingest reads from a request (services.ingest.batch): rules for
# new input only. Events on the topics are read again as they were accepted (a replay, a new
# consumer group), and one refused then would be lost to the dead-letter topic.
INPUT = {"input": True}


def _float_as_written(value: object, info: ValidationInfo) -> object:
    # A JSON number is read as a float by both of pydantic's readers (the JSON one and the
    # Python one over orjson's output), which then made 100.0 Decimal('100') and
    # Decimal('100.0') respectively: the same body, two encodings, and a resend of one event
    # judged another (ingest's 409, the ledgers' digests). The float's shortest repr, on both.
    if type(value) is not float:
        return value
    written = Decimal(repr(value))
    if info.context is not None and info.context.get("input"):
        # 12345678901234.5678 as a number was read as 12345678901234.568 and accepted, changed.
        # Float noise (0.1 + 0.2) has more than 4 decimals: the decimal-places rule names it.
        shape = written.as_tuple()
        places = -shape.exponent if isinstance(shape.exponent, int) else 0
        if places <= 4 and len(written.normalize().as_tuple().digits) > EXACT_FLOAT_DIGITS:
            raise ValueError(
                f"as a JSON number, an amount keeps at most {EXACT_FLOAT_DIGITS} significant "
                f"digits exactly (this one was read as {written}, perhaps not as sent): send it as "
                "a JSON string of its digits instead"
            )
    return written


def _unsigned_zero(value: Decimal) -> Decimal:
    # "-0" (a backend's 0 * -1) passes ge=0 and read "-₪0.00" in a customer's thank-you.
    return abs(value) if value.is_zero() else value


Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=4),
    BeforeValidator(_float_as_written),
    AfterValidator(_unsigned_zero),
    # As the model reads it: at most 14 digits before the point and 4 after, never below zero
    # (pydantic's own schema let a string such as "-5" or "1.00001" pass).
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]{1,14}(\\.[0-9]{1,4})?$"},
            ]
        }
    ),
]
# Units of a reporting currency per unit of another (the segmenter's and the kpi's FX tables):
# a rate of 0 or below would make every amount in that currency worth nothing or less.
FxRate = Annotated[Decimal, Field(gt=0)]
INT64 = range(-(2**63), 2**63)
BEYOND_64_BITS = (
    "an integer beyond 64 bits would lose digits as a number (it would be read as a float): "
    "send it as a string"
)


def _within_64_bits(value: object) -> object:
    # Before the union: its float member would otherwise take the integer the int member
    # refuses, and keep 16 of its digits.
    if type(value) is int and value not in INT64:
        raise ValueError(BEYOND_64_BITS)
    return value


# Integers are bounded to 64 bits and floats finite: attributes are stored as JSON, where
# larger integers do not survive a round trip and infinities and NaN do not exist.
AttributeValue = Annotated[
    Annotated[str, StringConstraints(max_length=500)]
    | Annotated[int, Field(ge=INT64.start, le=INT64.stop - 1)]
    | Annotated[float, Field(allow_inf_nan=False)]
    | bool
    | None,
    BeforeValidator(_within_64_bits),
]

# The members of AttributeValue as pydantic names them at the end of an error's path, and the
# one that judges a value of each kind.
_ATTRIBUTE_MEMBERS = frozenset({"constrained-str", "constrained-int", "float", "bool"})
_MEMBER_OF_KIND = {str: "constrained-str", int: "constrained-int", float: "float"}
_FLAT_ONLY = "must be a string, a number, a boolean or null: attributes hold flat values only, not {}"


def one_error_per_attribute(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """Validation errors with one per attribute value, at the attribute's own path: pydantic
    reports a value that no member of AttributeValue accepts once per member, each under a
    path ending in the member's internal name (``attributes.tags.constrained-str``,
    ``….constrained-int``, …), which a developer never wrote. The one kept is that of the
    value's own kind (a string too long, an infinite number), else "flat values only".
    Applied where errors are shown, so that valid events cost nothing more."""
    out: list[ErrorDetails] = []
    said: set[tuple[int | str, ...]] = set()
    for error in errors:
        loc = error["loc"]
        if len(loc) < 3 or loc[-1] not in _ATTRIBUTE_MEMBERS:
            out.append(error)
            continue
        path = loc[:-1]
        if path in said:
            continue
        said.add(path)
        given = error["input"]
        own_loc = (*path, _MEMBER_OF_KIND.get(type(given), ""))
        own = next((e for e in errors if e["loc"] == own_loc), None)
        if own is not None:
            out.append({**own, "loc": path})
        else:
            kind = (
                "lists"
                if isinstance(given, list)
                else "objects"
                if isinstance(given, dict)
                else "other values"
            )
            out.append({**error, "type": "attribute_value_type", "loc": path, "msg": _FLAT_ONLY.format(kind)})
    return out


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    WHATSAPP = "whatsapp"


# The profile field that holds a customer's address on each channel.
ADDRESS_FIELD: dict[Channel, str] = {
    Channel.EMAIL: "email",
    Channel.SMS: "phone",
    Channel.WHATSAPP: "whatsapp",
}


class EventType(StrEnum):
    PROFILE = "profile"
    PURCHASE = "purchase"
    SUPPORT = "support"
    CANCELLATION = "cancellation"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventBase(_Strict):
    event_id: Identifier
    customer_id: Identifier
    occurred_at: AwareDatetime
    schema_version: Literal[1] = 1


class Consents(_Strict):
    """Per-channel consent; a channel left out is unchanged by the event."""

    email: bool | None = None
    sms: bool | None = None
    whatsapp: bool | None = None


def _by_key(values: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(values.items()))


PROFILE_FIELDS = (
    "name",
    "email",
    "phone",
    "whatsapp",
    "locale",
    "timezone",
    "preferred_channel",
    "consents",
    "attributes",
)


class ProfileEvent(EventBase):
    """Contact details and preferences. A field left out (or null) leaves it as it was."""

    type: Literal["profile"] = "profile"
    name: ShortText | None = None
    email: Email | None = None
    phone: Phone | None = None
    whatsapp: Phone | None = None
    locale: LocaleTag | None = None
    timezone: TimeZone | None = None
    preferred_channel: Channel | None = None
    consents: Consents | None = None
    # Kept in key order: the order a sender's map happened to give is no part of the event, and
    # ingest knows a resend by the event as encoded (services.ingest.service.content_digest).
    attributes: (
        Annotated[dict[Label, AttributeValue], Field(max_length=50), AfterValidator(_by_key)] | None
    ) = None

    @model_validator(mode="after")
    def _says_something(self) -> ProfileEvent:
        for name in PROFILE_FIELDS:  # a loop, not all(): most events say their first field
            if getattr(self, name) is not None:
                return self
        raise ValueError(f"a profile event needs at least one of: {', '.join(PROFILE_FIELDS)}")


class PurchaseItem(_Strict):
    sku: Identifier
    category: Label | None = None
    quantity: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    unit_price: Money


class PurchaseEvent(EventBase):
    type: Literal["purchase"] = "purchase"
    order_id: Identifier
    amount: Money
    currency: Currency
    items: Annotated[list[PurchaseItem], Field(max_length=500)] | None = None


class SupportAction(StrEnum):
    OPENED = "opened"
    AGENT_REPLIED = "agent_replied"
    CUSTOMER_REPLIED = "customer_replied"
    RESOLVED = "resolved"
    REOPENED = "reopened"


# The steps of one ticket at the same instant are in the order a help desk records them: the
# order of a ticket's steps is (occurred_at, this, event id) in every service, so the
# segmenter and the kpi agree on which step is a ticket's newest.
SUPPORT_ACTION_ORDER: dict[str, int] = {
    SupportAction.OPENED: 0,
    SupportAction.CUSTOMER_REPLIED: 1,
    SupportAction.AGENT_REPLIED: 2,
    SupportAction.RESOLVED: 3,
    SupportAction.REOPENED: 4,
}


def support_step_order(at: datetime, action: str, event_id: str) -> tuple[datetime, int, str]:
    """The sort key of a ticket's step (see ``SUPPORT_ACTION_ORDER``)."""
    return (at, SUPPORT_ACTION_ORDER[action], event_id)


def ticket_resolved(actions_in_order: Iterable[str]) -> bool:
    """Whether a ticket whose steps, in ``support_step_order``, had these actions is resolved:
    its last 'resolved' or 'reopened' is a 'resolved'. A reply after the resolution (the
    customer's thanks, an agent's follow-up) does not reopen it; only 'reopened' does. The
    segmenter (open tickets, a complaint resolved) and the kpi (resolution time) both judge so."""
    status = [a for a in actions_in_order if a in (SupportAction.RESOLVED, SupportAction.REOPENED)]
    return bool(status) and status[-1] == SupportAction.RESOLVED


class SupportEvent(EventBase):
    type: Literal["support"] = "support"
    ticket_id: Identifier
    action: SupportAction
    category: Label
    priority: Literal["low", "normal", "high", "urgent"] | None = None
    is_complaint: bool = False

    @property
    def complaint(self) -> bool:
        """Flagged, or of the category ``complaint`` (``complaint_category``)."""
        return self.is_complaint or complaint_category(self.category)


def complaint_category(category: str) -> bool:
    """Whether a ticket's category names a complaint, in any case: a help desk writing
    "Complaint" sent no acknowledgement and counted in no complaint KPI."""
    return category.casefold() == "complaint"


class CancellationReason(StrEnum):
    PRICE = "price"
    SERVICE = "service"
    BOTH = "both"
    OTHER = "other"


class CancellationEvent(EventBase):
    type: Literal["cancellation"] = "cancellation"
    reason: CancellationReason
    subscription_id: Identifier | None = None
    reason_text: LongText | None = None


Event = Annotated[
    ProfileEvent | PurchaseEvent | SupportEvent | CancellationEvent,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_LIST_ADAPTER: TypeAdapter[list[Event]] = TypeAdapter(list[Event])

# An occurred_at at or before the Unix epoch is refused (ingest: 422; straight onto Kafka: dead
# letter): a zero or unset timestamp, or a year typed wrong. Histories older than that are not
# customers' purchases.
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
NOT_AFTER_EPOCH = "is not after 1970-01-01: a zero timestamp?"


def time_bound_broken(at: datetime, latest: float) -> Literal["ahead", "epoch"] | None:
    """Which bound an ``occurred_at`` breaks: after ``latest`` (POSIX seconds: a clock plus what
    may be ahead of it) or not after 1970. Ingest refuses such an event (422); the consumers
    dead-letter one produced straight to Kafka (``shared.codec.decode_event_on``)."""
    t = at.timestamp()
    if t > latest:
        return "ahead"
    if t <= EARLIEST_EVENT_TIME.timestamp():
        return "epoch"
    return None


# Which topic (without the deployment's prefix) each backend event type goes to.
TOPIC_OF_TYPE: dict[str, str] = {
    EventType.PROFILE: "profiles",
    EventType.PURCHASE: "purchases",
    EventType.SUPPORT: "support",
    EventType.CANCELLATION: "cancellations",
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "profile": {
        "event_id": "crm-7f3a1c",
        "type": "profile",
        "customer_id": "c-000123",
        "occurred_at": "2026-11-20T09:15:00+02:00",
        "schema_version": 1,
        "name": "נועה לוי",
        "email": "noa.levi@example.co.il",
        "phone": "+972521234567",
        "whatsapp": "+972521234567",
        "locale": "he-IL",
        "timezone": "Asia/Jerusalem",
        "preferred_channel": "whatsapp",
        "consents": {"email": True, "sms": False, "whatsapp": True},
        "attributes": {"city": "חיפה", "signup_source": "store"},
    },
    "purchase": {
        "event_id": "shop-order-88412",
        "type": "purchase",
        "customer_id": "c-000123",
        "occurred_at": "2026-11-21T18:02:11+02:00",
        "order_id": "88412",
        "amount": "349.90",
        "currency": "ILS",
        "items": [
            {"sku": "TEA-01", "category": "tea", "quantity": 2, "unit_price": "99.95"},
            {"sku": "MUG-07", "category": "kitchen", "quantity": 1, "unit_price": "150.00"},
        ],
    },
    "support": {
        "event_id": "desk-5512-opened",
        "type": "support",
        "customer_id": "c-000456",
        "occurred_at": "2026-11-22T10:00:00+03:00",
        "ticket_id": "T-5512",
        "action": "opened",
        "category": "delivery",
        "priority": "high",
        "is_complaint": True,
    },
    "cancellation": {
        "event_id": "billing-sub-991-cancel",
        "type": "cancellation",
        "customer_id": "c-000789",
        "occurred_at": "2026-11-23T12:30:00Z",
        "reason": "price",
        "subscription_id": "sub-991",
        "reason_text": "המחיר עלה יותר מדי",
    },
}


# --- Events derived by Retain's own services ------------------------------------------------


class ConsentState(_Strict):
    granted: bool
    at: AwareDatetime  # since when: the first profile event of the run saying it (not a repeat)


# The segmenter's lifecycle stages (services/segmenter/profile.lifecycle), in a customer's order.
LifecycleStage = Literal["new", "active", "at_risk", "lapsed", "churned", "won_back"]
LIFECYCLE_STAGES: tuple[str, ...] = get_args(LifecycleStage)

# What the facts that rules and journey conditions read can be, beyond their type: a value
# outside these is a typo or a comparison that holds for everyone (shared.conditions.Domains).
FACT_DOMAINS: Domains = {
    "preferred_channel": Choices(frozenset(c.value for c in Channel)),
    "lifecycle_stage": Choices(frozenset(LIFECYCLE_STAGES)),
    "churn_reason": Choices(frozenset(r.value for r in CancellationReason)),
    "p_alive": Range(0, 1),
    # Counts, money and durations are never negative: `orders_count lt 0` holds for nobody,
    # `orders_count gte -1` for everybody by a bound no customer can be below.
    **dict.fromkeys(
        (
            "orders_count",
            "distinct_purchase_days",
            "total_value",
            "avg_order_value",
            "purchases_30d",
            "purchases_90d",
            "purchases_365d",
            "open_tickets",
            "complaints_90d",
            "median_first_response_minutes",
            "predicted_clv",
            "expected_purchases_90d",
        ),
        Range(0, math.inf),
    ),
}

# The spelling the facts give locales and languages in, into which rules read theirs
# (shared.conditions.Forms).
FACT_FORMS: Forms = {"locale": locale_tag, "language": language_code, "timezone": time_zone_name}


class ProfileSnapshot(_Strict):
    """What the messenger needs to reach and address a customer, as of the update."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None
    whatsapp: str | None = None
    locale: str | None = None
    timezone: str | None = None
    preferred_channel: Channel | None = None
    consents: dict[Channel, ConsentState] = Field(default_factory=dict)
    lifecycle_stage: str
    churn_reason: CancellationReason | None = None
    churned_at: AwareDatetime | None = None
    tier: str
    segments: list[str] = Field(default_factory=list)
    orders_count: int = 0
    total_value: Decimal = Decimal(0)
    reporting_currency: str
    last_purchase_at: AwareDatetime | None = None
    open_tickets: int = 0
    last_complaint_resolved: bool | None = None
    predicted_clv: Decimal | None = None
    p_alive: float | None = None
    expected_purchases_90d: float | None = None
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)

    @property
    def has_address(self) -> bool:
        """Whether any contact detail is known (an email, a phone or a WhatsApp number)."""
        return bool(self.email or self.phone or self.whatsapp)

    def address(self, channel: Channel) -> str | None:
        """The customer's address on ``channel``."""
        value: str | None = getattr(self, ADDRESS_FIELD[channel])
        return value


class TriggeringEvent(_Strict):
    """A backend event that caused an update, with the fields a message about it needs."""

    event_id: str
    type: EventType
    occurred_at: AwareDatetime
    order_id: str | None = None
    amount: Decimal | None = None
    currency: str | None = None
    ticket_id: str | None = None
    action: SupportAction | None = None
    category: str | None = None
    priority: str | None = None
    is_complaint: bool | None = None
    reason: CancellationReason | None = None


class UpdateCause(StrEnum):
    EVENTS = "events"  # backend events about the customer arrived
    TIME = "time"  # time passed (the sweep): e.g. 60 days without a purchase
    RULES = "rules"  # a new rule set was published
    CLV = "clv"  # the kpi service published a new prediction


class CustomerUpdate(_Strict):
    """On retain.segments: one per customer whose profile changed in a segmenter batch.

    ``event_id`` is derived from what caused the update, so a re-published update carries the
    same id and the messenger drops the copy.
    """

    event_id: str
    type: Literal["customer_update"] = "customer_update"
    customer_id: str
    occurred_at: AwareDatetime
    schema_version: Literal[1] = 1
    cause: UpdateCause
    triggering_events: list[TriggeringEvent] = Field(default_factory=list)
    tier_old: str | None = None
    tier_new: str
    # Up the ladder of the rule version that assigned tier_new (its tiers in order, the first the
    # highest; none the lowest), which only the segmenter knows: marketing names and orders the
    # tiers. None on updates from before the segmenter said so.
    tier_upgrade: bool | None = None
    segments_entered: list[str] = Field(default_factory=list)
    segments_left: list[str] = Field(default_factory=list)
    rule_version: int
    profile: ProfileSnapshot


class ClvPrediction(_Strict):
    """On retain.clv: the kpi service's latest prediction for one customer."""

    event_id: str
    type: Literal["clv"] = "clv"
    customer_id: str
    occurred_at: AwareDatetime  # when the model was fitted
    schema_version: Literal[1] = 1
    model_as_of: AwareDatetime
    predicted_clv: Decimal
    p_alive: Annotated[float, Field(ge=0, le=1)]
    expected_purchases_90d: Annotated[float, Field(ge=0)]
    currency: Currency


CUSTOMER_UPDATE_ADAPTER: TypeAdapter[CustomerUpdate] = TypeAdapter(CustomerUpdate)
CLV_ADAPTER: TypeAdapter[ClvPrediction] = TypeAdapter(ClvPrediction)


class MessageKind(StrEnum):
    TRANSACTIONAL = "transactional"  # complaint acknowledgements, ticket updates
    MARKETING = "marketing"  # everything else: welcome, thank-you, win-back …


class MessageStatus(StrEnum):
    """Every decision and every later fact about a message; ``reason`` says why."""

    QUEUED = "queued"  # decided to send, waiting for the provider call
    SENT = "sent"  # handed to a provider (or the sandbox outbox)
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    HELD_QUIET_HOURS = "held_quiet_hours"
    CAPPED = "capped"
    NO_CONSENT = "no_consent"
    SUPPRESSED = "suppressed"
    NO_ADDRESS = "no_address"
    HOLDOUT = "holdout"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # held, then its journey's exit condition came true before it could go
    REPLIED = "replied"  # the customer answered (inbound SMS/WhatsApp)
    CLICKED = "clicked"  # when a provider reports it
    UNSUBSCRIBED = "unsubscribed"  # STOP, unsubscribe link, bounce or spam report
    ESCALATION = "escalation"  # a complaint of a valuable customer, for support


class MessageEvent(_Strict):
    """On retain.messages: one per status a message reaches, for the kpi service and ops.

    ``event_id`` is ``<message_id>:<status>`` (plus a sequence for repeatable statuses), so
    a re-published outcome is dropped by consumers as a duplicate.
    """

    event_id: str
    type: Literal["message"] = "message"
    customer_id: str
    occurred_at: AwareDatetime
    schema_version: Literal[1] = 1
    message_id: str
    journey: str
    kind: MessageKind
    status: MessageStatus
    reason: str | None = None
    channel: Channel | None = None
    template: str | None = None
    locale: str | None = None
    tier: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    error_code: str | None = None
    triggered_by: str | None = None  # the backend event id behind the message, if any
    # When the message was decided: its journey, tier and locale are as of then, whatever
    # status this is (a sending after quiet hours, a reply days later). None from producers
    # before the field existed.
    decided_at: AwareDatetime | None = None
    holdout: bool = False
    details: dict[str, AttributeValue] = Field(default_factory=dict)


MESSAGE_EVENT_ADAPTER: TypeAdapter[MessageEvent] = TypeAdapter(MessageEvent)
