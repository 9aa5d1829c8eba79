"""The demo generator: deterministic, well-formed, and telling believable customer stories."""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import phonenumbers
import pytest

from shared.demo import DemoEvent, generate
from shared.events import EVENT_ADAPTER

START = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 365

COMMON = {"event_id", "type", "customer_id", "occurred_at", "schema_version"}
PROFILE_FIELDS = {
    "name",
    "email",
    "phone",
    "whatsapp",
    "locale",
    "timezone",
    "preferred_channel",
    "consents",
    "attributes",
}
REQUIRED = {
    "profile": set(),
    "purchase": {"order_id", "amount", "currency", "items"},
    "support": {"ticket_id", "action", "category", "priority", "is_complaint"},
    "cancellation": {"reason"},
}
OPTIONAL = {
    "profile": PROFILE_FIELDS,
    "purchase": set(),
    "support": set(),
    "cancellation": {"subscription_id", "reason_text"},
}
CURRENCY_OF_COUNTRY_CODE = {972: "ILS", 20: "EGP", 1: "USD", 44: "GBP"}
HEBREW = re.compile(r"[\u0590-\u05FF]")
ARABIC = re.compile(r"[\u0600-\u06FF]")


@pytest.fixture(scope="module")
def events() -> list[DemoEvent]:
    # The size the demo runs at, so the proportions below are the ones people will see.
    return generate(7, 3000, START, DAYS)


@pytest.fixture(scope="module")
def by_customer(events: list[DemoEvent]) -> dict[str, list[DemoEvent]]:
    stories: dict[str, list[DemoEvent]] = defaultdict(list)
    for event in events:
        stories[str(event["customer_id"])].append(event)
    return stories


def at(event: DemoEvent) -> datetime:
    return datetime.fromisoformat(str(event["occurred_at"]))


def consents(event: DemoEvent) -> dict[str, bool]:
    value = event["consents"]
    assert isinstance(value, dict)
    return value


def test_same_seed_gives_the_same_events() -> None:
    assert generate(11, 150, START, 90) == generate(11, 150, START, 90)


def test_another_seed_gives_other_events() -> None:
    one, other = generate(11, 150, START, 90), generate(12, 150, START, 90)
    assert one != other
    assert not {e["event_id"] for e in one} & {e["event_id"] for e in other}


def test_a_customer_does_not_depend_on_how_many_follow() -> None:
    small = generate(3, 40, START, 120)
    large = generate(3, 90, START, 120)
    known = {event["customer_id"] for event in small}
    assert [event for event in large if event["customer_id"] in known] == small


def test_start_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        generate(1, 1, datetime(2025, 1, 1), 10)  # noqa: DTZ001 - the point of the test


def test_start_in_any_offset_gives_the_same_instants() -> None:
    local = START.astimezone(timezone(timedelta(hours=2)))
    assert generate(5, 30, local, 30) == generate(5, 30, START, 30)


def test_common_fields_ids_and_order(events: list[DemoEvent]) -> None:
    assert len(events) > 10_000
    ids = [event["event_id"] for event in events]
    assert len(set(ids)) == len(ids)
    moments = [at(event) for event in events]
    assert moments == sorted(moments)
    assert moments[0] >= START
    assert moments[-1] < START + timedelta(days=DAYS)
    for event in events:
        assert event.keys() >= COMMON
        assert event["schema_version"] == 1
        assert re.fullmatch(r"c-\d{6}", str(event["customer_id"]))


def test_every_event_has_the_fields_of_its_type(events: list[DemoEvent]) -> None:
    assert Counter(event["type"] for event in events).keys() == REQUIRED.keys()
    for event in events:
        kind = str(event["type"])
        fields = event.keys() - COMMON
        assert REQUIRED[kind] <= fields, event
        assert fields <= REQUIRED[kind] | OPTIONAL[kind], event
        if kind == "profile":
            assert fields, event


def test_every_event_passes_the_contract(events: list[DemoEvent]) -> None:
    for event in events:
        EVENT_ADAPTER.validate_python(event)


def test_occurred_at_carries_an_offset(events: list[DemoEvent]) -> None:
    offsets: Counter[str | bool] = Counter()
    for event in events:
        text = str(event["occurred_at"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", text), text
        assert at(event).utcoffset() is not None
        offsets[text[-1] == "Z" or text[-6:]] += 1
    # Local time of Israel (both sides of daylight saving time), plus UTC from the help desk.
    assert {"+02:00", "+03:00", True} <= offsets.keys()


def test_the_first_event_of_every_customer_is_a_full_profile(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    assert len(by_customer) == 3000
    for story in by_customer.values():
        first = story[0]
        assert first["type"] == "profile"
        assert {"name", "email", "phone", "locale", "timezone", "consents"} <= first.keys()
        assert at(first) < min((at(event) for event in story[1:]), default=at(first) + _MINUTE)


_MINUTE = timedelta(minutes=1)


def test_phone_numbers_are_valid_e164(events: list[DemoEvent]) -> None:
    numbers = {
        str(event[key])
        for event in events
        for key in ("phone", "whatsapp")
        if event["type"] == "profile" and key in event
    }
    assert len(numbers) > 3000
    for number in numbers:
        parsed = phonenumbers.parse(number, None)
        assert phonenumbers.is_valid_number(parsed), number
        assert phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == number


def test_no_two_customers_share_a_phone_or_an_address(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    first_profiles = [story[0] for story in by_customer.values()]
    phones = [profile["phone"] for profile in first_profiles]
    emails = [profile["email"] for profile in first_profiles]
    assert len(set(phones)) == len(phones)
    assert len(set(emails)) == len(emails)
    # Reserved domains only: a demo must never mail a stranger.
    domains = {str(email).rsplit("@", 1)[1] for email in emails}
    assert all(re.fullmatch(r"(.+\.)?example\.(com|net|org)", domain) for domain in domains)


def test_whatsapp_for_many(by_customer: dict[str, list[DemoEvent]]) -> None:
    with_whatsapp = sum("whatsapp" in story[0] for story in by_customer.values())
    assert 0.5 < with_whatsapp / len(by_customer) < 0.95


def test_locales_names_and_timezones_fit_together(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    locales: Counter[str] = Counter()
    zones: Counter[object] = Counter()
    for story in by_customer.values():
        profile = story[0]
        locale, name = str(profile["locale"]), str(profile["name"])
        locales[locale] += 1
        zones[profile["timezone"]] += 1
        if locale == "he-IL":
            assert HEBREW.search(name), name
        elif locale.startswith("ar-"):
            assert ARABIC.search(name), name
        else:
            assert name.isascii(), name
        if locale == "ar-EG":
            assert profile["timezone"] == "Africa/Cairo"
            assert str(profile["phone"]).startswith("+201")
    assert set(locales) == {"he-IL", "ar-IL", "ar-EG", "en-US"}
    assert locales.most_common(1)[0][0] == "he-IL"
    assert {"Asia/Jerusalem", "Africa/Cairo", "America/New_York", "Europe/London"} <= zones.keys()


def test_channels_and_consents_are_mixed(by_customer: dict[str, list[DemoEvent]]) -> None:
    profiles = [story[0] for story in by_customer.values()]
    assert {p["preferred_channel"] for p in profiles} == {"email", "sms", "whatsapp"}
    for channel in ("email", "sms", "whatsapp"):
        given = Counter(consents(p)[channel] for p in profiles)
        assert given[True]
        assert given[False]
    for profile in profiles:
        if profile["preferred_channel"] == "whatsapp":
            assert "whatsapp" in profile


def test_some_customers_change_their_profile_later(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    later = [e for story in by_customer.values() for e in story[1:] if e["type"] == "profile"]
    assert len(later) > 100
    changed = Counter(key for event in later for key in event.keys() - COMMON)
    assert {"consents", "email", "preferred_channel"} <= changed.keys()
    withdrawn = [e for e in later if "consents" in e and False in consents(e).values()]
    assert withdrawn


def test_a_later_profile_event_changes_something(by_customer: dict[str, list[DemoEvent]]) -> None:
    for story in by_customer.values():
        known = dict(story[0])
        known_consents = dict(consents(story[0]))
        for event in story[1:]:
            if event["type"] != "profile":
                continue
            fields = event.keys() - COMMON - {"consents"}
            changes = [event[key] != known.get(key) for key in fields]
            if "consents" in event:
                # A consent update names only the channels it changes.
                changes += [known_consents[k] != v for k, v in consents(event).items()]
                known_consents.update(consents(event))
            assert changes
            assert all(changes), event
            known.update({key: event[key] for key in fields})


def test_amounts_are_money_and_equal_the_items(by_customer: dict[str, list[DemoEvent]]) -> None:
    for story in by_customer.values():
        country_code = phonenumbers.parse(str(story[0]["phone"]), None).country_code or 0
        for event in story:
            if event["type"] != "purchase":
                continue
            amount = str(event["amount"])
            assert re.fullmatch(r"\d+\.\d\d", amount), amount
            assert event["currency"] == CURRENCY_OF_COUNTRY_CODE[country_code]
            items = event["items"]
            assert isinstance(items, list)
            assert items
            total = sum(Decimal(item["unit_price"]) * item["quantity"] for item in items)
            assert Decimal(amount) == total > 0


def test_ils_baskets_look_like_a_shop(events: list[DemoEvent]) -> None:
    ils = [Decimal(str(e["amount"])) for e in events if e.get("currency") == "ILS"]
    median = statistics.median(ils)
    assert 100 < median < 500
    assert sum(40 <= amount <= 2000 for amount in ils) / len(ils) > 0.9


def test_buying_habits_differ(by_customer: dict[str, list[DemoEvent]]) -> None:
    orders = Counter(sum(event["type"] == "purchase" for event in story) for story in by_customer.values())
    assert orders[0] > 0  # signed up, never bought
    assert orders[1] > 300  # one-time buyers
    assert sum(n for count, n in orders.items() if count >= 10) > 200  # loyal repeat buyers


def test_ticket_lifecycles_are_in_order(events: list[DemoEvent]) -> None:
    tickets: dict[str, list[DemoEvent]] = defaultdict(list)
    for event in events:
        if event["type"] == "support":
            tickets[str(event["ticket_id"])].append(event)
    assert len(tickets) > 500
    first_replies: list[float] = []
    for ticket_id, story in tickets.items():
        actions = [str(event["action"]) for event in story]
        assert actions[0] == "opened", ticket_id
        assert actions.count("opened") == 1
        moments = [at(event) for event in story]
        assert moments == sorted(moments)
        assert len(set(moments)) == len(moments)
        assert len({(e["customer_id"], e["category"], e["priority"]) for e in story}) == 1
        state = "open"
        for action in actions[1:]:
            if action == "resolved":
                assert "agent_replied" in actions[: actions.index(action)], ticket_id
                state = "resolved"
            elif action == "reopened":
                assert state == "resolved", ticket_id
                state = "open"
            else:
                assert state == "open", ticket_id
        if len(story) > 1:
            assert actions[1] == "agent_replied"
            first_replies.append((moments[1] - moments[0]).total_seconds() / 3600)
    assert statistics.median(first_replies) < 4
    breached = sum(hours > 4 for hours in first_replies) / len(first_replies)
    assert 0.03 < breached < 0.4
    seen = Counter(str(event["action"]) for story in tickets.values() for event in story)
    assert set(seen) == {"opened", "agent_replied", "customer_replied", "resolved", "reopened"}


def test_complaints_and_categories(events: list[DemoEvent]) -> None:
    opened = [e for e in events if e["type"] == "support" and e["action"] == "opened"]
    assert {e["category"] for e in opened} == {
        "billing", "delivery", "product", "technical", "complaint", "account"
    }  # fmt: skip
    assert {e["priority"] for e in opened} == {"low", "normal", "high", "urgent"}
    assert 0 < sum(bool(e["is_complaint"]) for e in opened) < len(opened) / 2


def test_cancellation_reasons_price_first(events: list[DemoEvent]) -> None:
    cancellations = [event for event in events if event["type"] == "cancellation"]
    reasons = Counter(event["reason"] for event in cancellations)
    assert set(reasons) == {"price", "service", "both", "other"}
    assert reasons.most_common(1)[0][0] == "price"
    assert any("subscription_id" in event for event in cancellations)


def test_reason_texts_speak_the_customers_language(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    seen: Counter[str] = Counter()
    for story in by_customer.values():
        locale = str(story[0]["locale"])
        for event in story:
            if event["type"] != "cancellation" or "reason_text" not in event:
                continue
            text = str(event["reason_text"])
            seen[locale] += 1
            if locale == "he-IL":
                assert HEBREW.search(text), text
            elif locale.startswith("ar-"):
                assert ARABIC.search(text), text
            else:
                assert text.isascii(), text
    assert {"he-IL", "ar-IL", "en-US"} <= seen.keys()


def test_some_leavers_come_back_price_leavers_more_often(
    by_customer: dict[str, list[DemoEvent]],
) -> None:
    left: Counter[str] = Counter()
    returned: Counter[str] = Counter()
    for story in by_customer.values():
        cancellations = [event for event in story if event["type"] == "cancellation"]
        if not cancellations:
            continue
        reason, when = str(cancellations[0]["reason"]), at(cancellations[0])
        left[reason] += 1
        if any(event["type"] == "purchase" and at(event) > when for event in story):
            returned[reason] += 1
    assert sum(returned.values()) > 20
    assert returned["price"] / left["price"] > returned["service"] / left["service"]
