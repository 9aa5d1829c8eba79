"""Templates: the packaged defaults in he/ar/en, the sandbox, SMS segments, locale fallback, Babel."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from services.messenger.config import MessengerSettings
from services.messenger.stopwords import match_inbound
from services.messenger.templates import (
    OFFER_DETAILS,
    OPTIONAL_VARIABLES,
    SAMPLE_OFFER_CODE,
    SAMPLE_SURVEY_URL,
    SAMPLE_UNSUBSCRIBE_URL,
    STOP_KEYWORDS,
    VARIABLES,
    Brand,
    Rendered,
    Template,
    TemplateInvalidError,
    TemplateKey,
    TemplateNotFoundError,
    TemplateRenderError,
    TemplateStore,
    approved_content_sid,
    build_variables,
    count_sms,
    default_templates,
    first_name_of,
    formatting_locale,
    hebrew_prefix,
    in_language,
    locale_chain,
    render,
    sample_variables,
    sms_variants,
    validate_template,
)
from shared.events import Channel, MessageKind, ProfileSnapshot, TriggeringEvent, canonical_locale

JOURNEYS = ("welcome", "thank_you", "complaint_ack", "feedback_survey", "tier_upgrade", "at_risk", "win_back")
LOCALES = ("he", "ar", "en")
CHANNELS = (Channel.EMAIL, Channel.SMS, Channel.WHATSAPP)
# How each language says "stop these messages" (Arabic SMS: the shorter لوقف الرسائل).
UNSUBSCRIBE_HINTS = {"he": ("להסרה",), "ar": ("لإلغاء الاشتراك", "لوقف الرسائل"), "en": ("nsubscribe",)}
# Two links leave an Arabic SMS no room for the name beside a clear question.
NAMELESS = {("feedback_survey", Channel.SMS, "ar")}
FIRST_NAMES = {"he": "נועה", "ar": "ليلى", "en": "Sarah"}


@pytest.fixture(scope="module")
def store() -> TemplateStore:
    return TemplateStore()


def custom(text: str, channel: Channel = Channel.SMS, **fields: Any) -> Template:
    kind = fields.pop("kind", MessageKind.TRANSACTIONAL)
    key = TemplateKey(journey="custom", channel=channel, locale=fields.pop("locale", "en"))
    return Template(key=key, kind=kind, text=text, **fields)


def profile(name: str | None = "נועה לוי", *, locale: str = "he-IL", tier: str = "gold") -> ProfileSnapshot:
    return ProfileSnapshot(
        name=name,
        locale=locale,
        timezone="Asia/Jerusalem",
        lifecycle_stage="active",
        tier=tier,
        reporting_currency="ILS",
    )


def all_text(rendered: Any) -> str:
    return "\n".join(p for p in (rendered.subject, rendered.text, rendered.html) if p)


# --- The defaults ------------------------------------------------------------------------------


def test_every_default_journey_has_every_channel_in_he_ar_en() -> None:
    keys = set(default_templates())
    for journey in JOURNEYS:
        for channel in CHANNELS:
            for locale in LOCALES:
                assert TemplateKey(journey=journey, channel=channel, locale=locale) in keys


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize("journey", JOURNEYS)
def test_every_default_renders_with_sample_variables(
    store: TemplateStore, journey: str, channel: Channel, locale: str
) -> None:
    template = store.resolve(journey, channel, locale)
    variables = sample_variables(locale)
    for strict in (False, True):
        rendered = render(template, variables, strict=strict)
        assert rendered.text
        assert (FIRST_NAMES[locale] in rendered.text) != ((journey, channel, locale) in NAMELESS)
        for leftover in ("{{", "{%", "}}", "None", "Undefined"):
            assert leftover not in all_text(rendered)
        if channel is Channel.EMAIL:
            assert rendered.subject
            assert "\n" not in rendered.subject
            assert rendered.html is not None
            assert rendered.html.startswith("<!DOCTYPE html>")
        else:
            assert rendered.subject is None
            assert rendered.html is None
        if template.kind is MessageKind.MARKETING:
            assert SAMPLE_UNSUBSCRIBE_URL in rendered.text
            assert any(hint in rendered.text for hint in UNSUBSCRIBE_HINTS[locale])


@pytest.mark.parametrize("key", sorted(default_templates(), key=str), ids=str)
def test_defaults_pass_strict_validation(store: TemplateStore, key: TemplateKey) -> None:
    template = store.get(key)
    assert template is not None
    assert store.validate(template) == []


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("journey", JOURNEYS)
def test_defaults_render_without_any_optional_variable(
    store: TemplateStore, journey: str, locale: str
) -> None:
    """A customer without a name, offer or contact still gets a whole message."""
    required = {"thank_you": "last_order", "complaint_ack": "ticket_id", "feedback_survey": "survey_url"}
    full = sample_variables(locale)
    sparse = {k: v for k, v in full.items() if k not in OPTIONAL_VARIABLES or k == required.get(journey)}
    for channel in CHANNELS:
        rendered = render(store.resolve(journey, channel, locale), sparse, strict=False)
        assert FIRST_NAMES[locale] not in all_text(rendered)
        assert " ," not in rendered.text
        assert " ،" not in rendered.text


def test_variables_are_documented_in_one_place() -> None:
    assert set(VARIABLES) >= OPTIONAL_VARIABLES
    assert set(sample_variables("en")) <= set(VARIABLES)
    assert {
        "first_name",
        "name",
        "tier",
        "tier_perks",
        "last_order",
        "ticket_id",
        "ticket_category",
        "survey_url",
        "unsubscribe_url",
        "offer_code",
        "personal_contact",
        "brand_name",
        "support_phone",
    } <= set(VARIABLES)


# --- Validation --------------------------------------------------------------------------------


def test_unknown_variable_is_rejected_naming_it(store: TemplateStore) -> None:
    template = custom("Hi {{ favourite_colour }}")
    errors = store.validate(template)
    assert [e.path for e in errors] == ["$.text"]
    assert "favourite_colour" in errors[0].message
    assert "the variables are " in errors[0].message
    assert "first_name" in errors[0].message
    with pytest.raises(TemplateInvalidError) as raised:
        store.put(template)
    assert raised.value.status_code == 422
    assert raised.value.errors == tuple(errors)
    # A typo gets the name it was meant to be.
    (typo,) = store.validate(custom("Hi {{ frist_name or '' }} {{ unsubscribe_url }}"))
    assert typo.message.startswith("unknown variable 'frist_name'; did you mean 'first_name'")


def test_unknown_variable_in_a_content_variable_is_rejected() -> None:
    template = custom(
        "Hi", Channel.WHATSAPP, content_sid="config:custom.en", content_variables={"1": "{{ nickname }}"}
    )
    (error,) = validate_template(template)
    assert error.path == "$.content_variables.1"
    assert "nickname" in error.message


@pytest.mark.parametrize("name", ["offer_code", "personal_contact.name", "first_name"])
def test_unguarded_optional_variable_is_rejected_when_saved(name: str) -> None:
    root = name.partition(".")[0]
    errors = validate_template(custom(f"Hello {{{{ {name} }}}}"))
    assert any(root in e.message and "{% if" in e.message for e in errors)
    guarded = custom(f"Hello{{% if {root} %}} {{{{ {name} }}}}{{% endif %}}.")
    assert validate_template(guarded) == []


def test_an_offer_detail_must_be_guarded_apart_from_the_code() -> None:
    """The default shop configures no value nor validity: a code alone must render too."""
    errors = validate_template(
        custom("Hi{% if offer_code %} {{ offer_code }} until {{ offer_expires }}{% endif %}.")
    )
    assert any("offer_expires" in e.message for e in errors)
    until = "{% if offer_expires %} until {{ offer_expires }}{% endif %}"
    guarded = "Hi{% if offer_code %} {{ offer_code }}" + until + "{% endif %}."
    assert validate_template(custom(guarded)) == []


def test_at_send_time_an_absent_optional_variable_renders_empty() -> None:
    template = custom("Hello {{ offer_code }}!")
    variables = sample_variables("en") | {"offer_code": None}
    assert render(template, variables, strict=False).text == "Hello !"
    with pytest.raises(TemplateRenderError, match="offer_code"):
        render(template, variables, strict=True)


def test_a_journey_refuses_to_send_without_the_data_it_is_about(store: TemplateStore) -> None:
    variables = sample_variables("he")
    del variables["last_order"]
    with pytest.raises(TemplateRenderError, match="last_order"):
        render(store.resolve("thank_you", "sms", "he"), variables, strict=False)


def test_shape_of_each_channel_is_checked() -> None:
    sms_with_subject = custom("Hi", subject="Hello")
    assert [e.path for e in validate_template(sms_with_subject)] == ["$.subject"]
    email_without_html = custom("Hi", Channel.EMAIL, subject="Hello")
    assert "$.html" in [e.path for e in validate_template(email_without_html)]
    whole_document = custom("Hi", Channel.EMAIL, subject="Hello", html="<html><body>Hi</body></html>")
    assert "$.html" in [e.path for e in validate_template(whole_document)]
    # A placeholder must name what RETAIN_MESSENGER_WHATSAPP_CONTENT_SIDS can configure.
    for bad in ("not-a-sid", "config:promo", "config:Promo.he", "config:promo.hebrew!"):
        bad_sid = custom("Hi", Channel.WHATSAPP, content_sid=bad)
        assert [e.path for e in validate_template(bad_sid)] == ["$.content_sid"], bad
    assert validate_template(custom("Hi", Channel.WHATSAPP, content_sid="config:promo.he_IL")) == []


def test_marketing_sms_must_say_how_to_opt_out() -> None:
    template = custom("Hi, we miss you.", kind=MessageKind.MARKETING)
    (error,) = validate_template(template)
    assert "{{ opt_out }} or {{ unsubscribe_url }}" in error.message
    ok = custom("Hi, we miss you. Unsubscribe: {{ unsubscribe_url }}", kind=MessageKind.MARKETING)
    assert validate_template(ok) == []
    assert validate_template(custom("Hi, we miss you. {{ opt_out }}", kind=MessageKind.MARKETING)) == []
    # The keyword written out shows no way to opt out from a sender that takes no replies.
    keyword_only = custom("Hi, we miss you. Reply STOP to unsubscribe", kind=MessageKind.MARKETING)
    (error,) = validate_template(keyword_only)
    assert "how to opt out" in error.message


@pytest.mark.parametrize("locale", LOCALES)
def test_opt_out_is_the_keyword_to_reply_where_replies_are_taken_else_the_link(locale: str) -> None:
    link = SAMPLE_UNSUBSCRIBE_URL  # as long as a real one
    by_link = build_variables(profile(locale=locale), None, locale=locale, unsubscribe_url=link)
    by_reply = build_variables(
        profile(locale=locale), None, locale=locale, unsubscribe_url=link, opt_out_by_reply=True
    )
    assert by_link["opt_out"].endswith(link)
    assert link not in by_reply["opt_out"]
    keyword = STOP_KEYWORDS[locale]
    assert keyword in by_reply["opt_out"]
    # The keyword the message names is one the messenger (or Twilio, for STOP) unsubscribes on.
    found = match_inbound(keyword)
    assert found is not None
    assert found.intent == "stop"
    assert found.language == locale
    assert len(by_reply["opt_out"]) * 2 < len(by_link["opt_out"])


def test_the_sms_length_is_checked_with_this_deployments_links() -> None:
    """The defaults fit two segments with links under a public URL of 20 characters; a longer
    one eats into every SMS. The store checks a save, and lists the templates already saved,
    with the links as long as this deployment's."""
    assert TemplateStore().long_sms() == []
    assert TemplateStore(public_url="http://127.0.0.1:8003").long_sms() == []  # make run's
    long = TemplateStore(public_url="https://retain.shop.co.il/")
    assert {str(k) for k, _ in long.long_sms()} >= {"feedback_survey/sms/he", "win_back/sms/ar"}
    assert all(count.segments == 3 for _, count in long.long_sms())
    survey = long.resolve("feedback_survey", Channel.SMS, "he")
    assert validate_template(survey) == []
    # Too long only with the unsubscribe link, from a sender that takes no replies: named.
    [error] = long.validate(survey)
    assert "3 SMS segments" in error.message
    assert "this deployment's links, from a sender that takes none (an alphanumeric id)" in error.message


def test_sms_longer_than_two_segments_is_rejected_with_the_count() -> None:
    (error,) = validate_template(custom("שלום " * 30, locale="he"))
    assert "3 SMS segments" in error.message
    assert "UCS-2" in error.message


def test_source_size_is_limited() -> None:
    (error,) = validate_template(custom("x" * 20_001))
    assert "20000" in error.message


def test_template_json_round_trip_and_errors_name_the_field(store: TemplateStore) -> None:
    template = store.resolve("win_back", "whatsapp", "ar")
    assert Template.from_json(template.to_json()) == template
    assert Template.from_json(Template.model_dump_json(template)) == template
    broken = template.to_json() | {"key": {"journey": "win_back", "channel": "fax", "locale": "ar"}}
    with pytest.raises(TemplateInvalidError) as raised:
        Template.from_json(broken)
    assert [e.path for e in raised.value.errors] == ["$.key.channel"]
    with pytest.raises(TemplateInvalidError) as raised:
        Template.from_json({"key": {"journey": "x", "channel": "sms", "locale": "xx-nope-"}, "text": "hi"})
    assert raised.value.errors[0].path == "$.key.locale"


# --- The sandbox -------------------------------------------------------------------------------

ATTACKS = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ name['__cla' ~ 'ss__'] }}",
    "{{ last_order['__class__'] }}",
    "{{ name.__len__() }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for a in range(100) %}{% for b in range(100) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
    "{{ 2 ** 10000000 }}",
    "{% set a = 'x' * 40000 %}{% set b = a ~ a %}{{ b }}",
    "{% set a = 'x' * 40000 %}{{ a + a }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999s' % name }}",
    "{{ name.replace('a', 'aaaaaaaaaa') }}",
    "{{ tier_perks.append('free') }}",
    "{{ name|safe }}",
    "{{ name|center(999999999) }}",
    "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for x in tier_perks recursive %}{{ loop(x) }}{% endfor %}",
    "{% autoescape false %}{{ name }}{% endautoescape %}",
    "{% include 'x' %}",
    "{{ lipsum(10**6) }}",
    "{% for i in range(1000) %}{{ 'x' * 100 }}{% endfor %}",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_template_injection_is_refused_at_save_and_contained_at_render(attack: str) -> None:
    started = time.monotonic()
    template = custom(attack, Channel.EMAIL, subject="Hi", html=attack)
    assert validate_template(template), attack
    for strict in (False, True):
        with pytest.raises(TemplateRenderError) as raised:
            render(template, sample_variables("en"), strict=strict)
        assert raised.value.path in {"$.text", "$.html"}
        assert raised.value.status_code == 422
    assert time.monotonic() - started < 5


def test_reading_variables_and_loops_still_work() -> None:
    template = custom(
        "{% for perk in tier_perks %}{{ loop.index }}. {{ perk|upper }}{% if not loop.last %}; {% endif %}"
        "{% endfor %} | {{ tier_perks|join(', ')|length }} | {% if name %}{{ name.split()[0] }}{% endif %}"
        "{% if last_order %} | {{ last_order.get('id') }}{% endif %}"
    )
    assert validate_template(template) == []
    text = render(template, sample_variables("en"), strict=False).text
    assert text.startswith("1. DOUBLE POINTS ON EVERY PURCHASE; 2. ")
    assert text.endswith("| Sarah | 88412")


def test_html_is_escaped_but_text_parts_are_not(store: TemplateStore) -> None:
    evil = "<script>alert(1)</script>"
    variables = sample_variables("en") | {
        "first_name": evil,
        "unsubscribe_url": "https://rtn.example/u/a?b=1&c=2",
    }
    rendered = render(store.resolve("welcome", "email", "en"), variables, strict=False)
    assert rendered.html is not None
    assert "<script>" not in rendered.html
    assert "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;,</p>" in rendered.html
    assert "<title>Welcome to Retain, &lt;script&gt;" in rendered.html
    assert 'href="https://rtn.example/u/a?b=1&amp;c=2"' in rendered.html
    assert f"Hi {evil}," in rendered.text  # plain text is not HTML
    assert rendered.subject == f"Welcome to Retain, {evil}"  # a header, not HTML


# --- Email frame: direction, language, footer ----------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "direction", "lang"),
    [("he-IL", "rtl", "he"), ("ar-EG", "rtl", "ar"), ("en-US", "ltr", "en"), ("fr", "ltr", "en")],
)
def test_email_direction_and_language(store: TemplateStore, locale: str, direction: str, lang: str) -> None:
    template = store.resolve("welcome", "email", locale)
    rendered = render(template, sample_variables(template.key.locale), strict=False)
    assert (rendered.direction, rendered.lang) == (direction, lang)
    assert rendered.html is not None
    assert f'<html dir="{direction}" lang="{lang}">' in rendered.html
    assert f'<div dir="{direction}"' in rendered.html


@pytest.mark.parametrize("locale", LOCALES)
def test_marketing_email_footer_unsubscribes_and_transactional_does_not(
    store: TemplateStore, locale: str
) -> None:
    variables = sample_variables(locale)
    marketing = render(store.resolve("win_back", "email", locale), variables, strict=False)
    assert marketing.html is not None
    assert f'<a href="{SAMPLE_UNSUBSCRIBE_URL}"' in marketing.html
    assert marketing.text.rstrip().endswith(SAMPLE_UNSUBSCRIBE_URL)
    transactional = render(store.resolve("complaint_ack", "email", locale), variables, strict=False)
    assert SAMPLE_UNSUBSCRIBE_URL not in all_text(transactional)
    forced = render(
        store.resolve("complaint_ack", "email", locale), variables, strict=False, kind=MessageKind.MARKETING
    )
    assert SAMPLE_UNSUBSCRIBE_URL in forced.text


# --- SMS segments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "GSM-7", 0, 0),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("€" * 80, "GSM-7", 160, 1),  # extension characters count two septets
        ("€" * 81, "GSM-7", 162, 2),
        ("a" * 159 + "{", "GSM-7", 161, 2),
        ("^{}\\[~]|€", "GSM-7", 18, 1),
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),  # ESC + € never split across parts
        ("Ünicödé? ÄÖÑÜ äöñüà é", "GSM-7", 21, 1),
        ("Ünïcödé", "UCS-2", 7, 1),  # ï is not in the GSM alphabet
        ("ש" * 70, "UCS-2", 70, 1),
        ("ש" * 71, "UCS-2", 71, 2),
        ("ع" * 134, "UCS-2", 134, 2),
        ("ع" * 135, "UCS-2", 135, 3),
        ("a" * 69 + "ש", "UCS-2", 70, 1),  # one Hebrew letter makes the whole message UCS-2
        ("a" * 160 + "’", "UCS-2", 161, 3),  # a curly apostrophe too
        ("🙂" * 35, "UCS-2", 70, 1),  # outside the BMP: two UTF-16 units each
        ("a" * 66 + "🙂" + "a", "UCS-2", 69, 1),
        ("a" * 66 + "🙂" + "a" * 2, "UCS-2", 70, 1),
        ("a" * 66 + "🙂" + "a" * 3, "UCS-2", 71, 2),
        ("a" * 66 + "🙂" * 2, "UCS-2", 70, 1),
        ("a" * 66 + "🙂" * 3, "UCS-2", 72, 2),  # the pair at 67–68 moves whole to part two
    ],
)
def test_sms_segments(text: str, encoding: str, units: int, segments: int) -> None:
    count = count_sms(text)
    assert (count.encoding, count.units, count.segments) == (encoding, units, segments)


def test_surrogate_pair_is_not_split_across_parts() -> None:
    # After 66 units the pair would straddle part one's 67-unit boundary: it starts part two,
    # so part one carries 66 and 133 units fit two parts but 134 need three.
    assert count_sms("a" * 66 + "🙂" + "a" * 65).segments == 2
    assert count_sms("a" * 66 + "🙂" + "a" * 66).segments == 3
    assert count_sms("a" * 67 + "🙂" + "a" * 65).segments == 2  # the same 134 units, no straddle


# First names twice as long as the samples' (נועה, ليلى, Sarah), for the SMS length budget.
LONG_FIRST_NAMES = {"he": "אלכסנדרה", "ar": "عبد الله", "en": "Christopher"}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("journey", JOURNEYS)
def test_default_sms_fit_in_two_segments(store: TemplateStore, journey: str, locale: str) -> None:
    """With links as long as real ones (a UUID customer's unsubscribe token, a message's survey
    token, a 20-character public URL) and a long first name, from a sender that takes replies
    (opt_out the keyword) and from one that does not (the link)."""
    template = store.resolve(journey, "sms", locale)
    full = sample_variables(locale)
    lean = full | {"offer_code": None, "personal_contact": None}
    long_name = {"first_name": LONG_FIRST_NAMES[locale[:2]]}
    for base in (full, lean, full | long_name, lean | long_name):
        for variables in sms_variants(base, locale):
            _assert_fits(render(template, variables, strict=False), locale)


def _assert_fits(rendered: Rendered, locale: str) -> None:
    assert rendered.sms_encoding == ("GSM-7" if locale == "en" else "UCS-2")
    assert rendered.sms_segments is not None
    assert 1 <= rendered.sms_segments <= 2, rendered.text
    if locale != "en":
        assert len(rendered.text) <= 134, rendered.text
    else:
        assert rendered.sms_segments == 1, rendered.text


# --- Locale fallback ---------------------------------------------------------------------------


def test_locale_chain() -> None:
    assert locale_chain("he-IL") == ["he-IL", "he", "en"]
    assert locale_chain("he_il") == ["he-IL", "he", "en"]
    assert locale_chain("iw-IL") == ["he-IL", "he", "en"]
    assert locale_chain("zh-Hant-TW", "en-US") == ["zh-Hant-TW", "zh-Hant", "zh", "en-US", "en"]
    assert locale_chain(None) == ["en"]
    assert locale_chain("not a locale!") == ["en"]


def test_fallback_exact_then_language_then_default(store: TemplateStore) -> None:
    assert store.resolve("welcome", "email", "he-IL").key.locale == "he"
    assert store.resolve("welcome", "sms", "ar-EG").key.locale == "ar"
    assert store.resolve("welcome", "whatsapp", "fr-FR").key.locale == "en"
    assert store.resolve("welcome", "email", None).key.locale == "en"
    hebrew_default = TemplateStore(default_locale="he")
    assert hebrew_default.resolve("welcome", "email", "fr").key.locale == "he"


def test_overrides_win_at_each_step_of_the_chain() -> None:
    store = TemplateStore()
    israel = custom("שלום מישראל", locale="he-IL").model_copy(
        update={"key": TemplateKey(journey="welcome", channel=Channel.SMS, locale="he-IL")}
    )
    # Resolved before the override (and kept): the override still wins once it is put.
    assert store.resolve("welcome", "sms", "he-IL").key.locale == "he"
    store.put(israel.model_copy(update={"kind": MessageKind.TRANSACTIONAL}))
    assert store.resolve("welcome", "sms", "he-IL").text == "שלום מישראל"
    assert store.resolve("welcome", "sms", "he").key.locale == "he"  # the default still
    assert store.is_overridden(israel.key)
    assert store.remove(israel.key)
    assert store.resolve("welcome", "sms", "he-IL").key.locale == "he"
    assert not store.remove(israel.key)


def test_unknown_template_is_not_found(store: TemplateStore) -> None:
    with pytest.raises(TemplateNotFoundError):
        store.resolve("birthday", "email", "he")
    assert set(JOURNEYS) <= store.journeys()


# --- Variables and Babel -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "currency", "expected"),
    [
        ("he-IL", "ILS", "₪"),
        ("he-IL", "USD", "$"),
        ("he", "EGP", "EGP"),
        ("ar", "ILS", "₪"),
        ("ar-EG", "USD", "US$"),
        ("ar", "EGP", "ج.م."),
        ("en", "ILS", "₪1,349.90"),
        ("en-US", "USD", "$1,349.90"),
        ("en", "EGP", "EGP"),
    ],
)
def test_order_amount_is_formatted_per_locale(locale: str, currency: str, expected: str) -> None:
    details = {
        "order_id": "88412",
        "amount": "1349.9",
        "currency": currency,
        "occurred_at": "2026-11-21T18:02:11+02:00",
    }
    variables = build_variables(profile(locale=locale), details, locale=locale, unsubscribe_url="u")
    amount = variables["last_order"]["amount"]
    assert "1,349.90" in amount
    assert expected in amount
    if locale.startswith(("he", "ar")):
        assert "\u200f" in amount  # Babel's right-to-left mark keeps the number in place


# 23:30 UTC on the 21st: already the 22nd in Jerusalem.
ORDER_LATE_ON_THE_21ST_UTC = TriggeringEvent.model_validate(
    {
        "event_id": "e1",
        "type": "purchase",
        "occurred_at": "2026-11-21T23:30:00+00:00",
        "order_id": "88412",
        "amount": "10",
        "currency": "ILS",
    }
)


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("he-IL", "22 בנובמבר 2026"), ("ar", "22 نوفمبر 2026"), ("en-US", "November 22, 2026")],
)
def test_order_date_is_formatted_per_locale_in_the_customers_time_zone(locale: str, expected: str) -> None:
    # 23:30 UTC on the 21st is already the 22nd in Jerusalem.
    event = ORDER_LATE_ON_THE_21ST_UTC
    variables = build_variables(profile(locale=locale), event, locale=locale, unsubscribe_url="u")
    assert variables["last_order"]["date"] == expected


def test_dates_of_a_customer_without_a_zone_are_in_the_zone_the_sender_finds() -> None:
    """The profile names no zone: the date is shown in the one quiet hours use (the service
    passes ``customer_zone``'s), not in UTC, where 01:30 in Jerusalem is the day before."""
    event = ORDER_LATE_ON_THE_21ST_UTC
    zoneless = profile().model_copy(update={"timezone": None})
    shown = build_variables(zoneless, event, locale="he-IL", unsubscribe_url="u", timezone="Asia/Jerusalem")
    assert shown["last_order"]["date"] == "22 בנובמבר 2026"
    assert build_variables(zoneless, event, locale="he-IL", unsubscribe_url="u")["last_order"]["date"] == (
        "21 בנובמבר 2026"
    )


@pytest.mark.parametrize(
    ("brand", "expected"),
    [("Retain", "שמחים שהצטרפת ל-Retain!"), ("תה ונענע", "שמחים שהצטרפת לתה ונענע!")],
)
def test_a_hebrew_prefix_letter_takes_a_maqaf_only_before_a_latin_name(
    store: TemplateStore, brand: str, expected: str
) -> None:
    variables = {**sample_variables("he"), "brand_name": brand}
    rendered = render(store.resolve("welcome", Channel.SMS, "he"), variables, strict=True)
    assert expected in rendered.text
    assert hebrew_prefix("SMS", "ב") == "ב-SMS"
    assert hebrew_prefix("דוא״ל", "ב") == "בדוא״ל"


@pytest.mark.parametrize("locale", ["he", "ar", "en"])
def test_the_win_back_approved_template_carries_the_offer_code(store: TemplateStore, locale: str) -> None:
    """Outside the 24-hour window a win-back goes as the approved template: its {{2}} says the
    customer's code (which the sent event tells the shop to honour), or invites an answer."""
    template = store.resolve("win_back", Channel.WHATSAPP, locale)
    with_code = render(template, sample_variables(locale), strict=True).content_variables
    assert with_code["2"].endswith(f": {SAMPLE_OFFER_CODE}")
    without = {k: v for k, v in sample_variables(locale).items() if k not in ("offer_code", *OFFER_DETAILS)}
    assert SAMPLE_OFFER_CODE not in render(template, without, strict=True).content_variables["2"]


def test_the_thank_you_on_whatsapp_keeps_its_blank_line_after_the_order(store: TemplateStore) -> None:
    rendered = render(store.resolve("thank_you", Channel.WHATSAPP, "en"), sample_variables("en"), strict=True)
    order, _, rest = rendered.text.partition("\n\n")
    assert order.splitlines()[-1].startswith("Order number: ")
    assert rest.startswith("If anything isn't right")


def test_build_variables_leaves_out_what_is_unknown() -> None:
    variables = build_variables(profile(None, tier="silver"), None, locale="ar", unsubscribe_url="https://u")
    assert set(variables) == {
        "tier",
        "tier_name",
        "tier_perks",
        "brand_name",
        "support_phone",
        "response_hours",
        "unsubscribe_url",
        "opt_out",
        "can_reply",
    }
    assert variables["opt_out"] == "لوقف الرسائل: https://u"
    assert variables["response_hours"] == "4"
    assert variables["tier_name"] == "الفضي"
    assert variables["tier_perks"][0] == "نقاط مضاعفة على كل عملية شراء"


def test_build_variables_with_everything() -> None:
    variables = build_variables(
        profile("ד״ר נועה לוי"),
        {"ticket_id": "T-1", "category": "delivery", "order_id": "7", "amount": 5, "currency": "ILS"},
        locale="he-IL",
        unsubscribe_url="https://u",
        survey_url="https://s",
        offer_code=SAMPLE_OFFER_CODE,
        personal_contact={"name": "דנה כהן"},
        perks_config={"gold": {"he": ["קפה עלינו"]}},
        brand=Brand(name="תה ונענע", support_phone="*5555"),
    )
    assert variables["first_name"] == "נועה"
    assert variables["tier_name"] == "זהב"
    assert variables["tier_perks"] == ["קפה עלינו"]
    assert variables["ticket_id"] == "T-1"
    assert variables["ticket_category"] == "delivery"
    assert variables["personal_contact"] == {"name": "דנה כהן", "phone": "*5555"}
    assert variables["last_order"]["id"] == "7"
    assert variables["last_order"]["date"] == ""
    assert variables["brand_name"] == "תה ונענע"


def test_perks_are_never_in_another_language() -> None:
    assert build_variables(profile(locale="fr"), None, locale="fr", unsubscribe_url="u")["tier_perks"] == []


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("נועה לוי", "נועה"),
        ('ד"ר יוסי כהן', "יוסי"),
        ("גב' מירב אזולאי", "מירב"),
        ("ليلى حداد", "ليلى"),
        ("عبد الله حداد", "عبد الله"),
        ("د. عبد الرحمن خوري", "عبد الرحمن"),
        ("أبو محمد", "أبو محمد"),
        ("السيدة ريم ناصر", "ريم"),
        ("Levi, Noa", "Noa"),
        ("SARAH MILLER", "Sarah"),
        ("dr. sarah miller", "Sarah"),
        ("Mary-Kate O'Neil", "Mary-Kate"),
        # Hebrew given names of two words, before a family name; Ben alone is Ben.
        ("בת שבע לוי", "בת שבע"),
        ("בן ציון כהן", "בן ציון"),
        ("בן לוי", "בן"),
        # Placeholders of several words, and an initial: greeted by no name.
        ("לקוח מזדמן", None),
        ("Guest User", None),
        ("Customer 1234", None),
        ("NULL NULL", None),
        ("N. Levi", None),
        ("א' לוי", None),
        # Na is a name (Na Li), N/A is none.
        ("Na Li", "Na"),
        ("Na", "Na"),
        # A title and one word: the family name, not a name to greet by.
        ("גב' כהן", None),
        ("السيد خوري", None),
        ("Mrs. Cohen", None),
        ("Dr. Sarah", None),
        # What a CRM or a form left where it had no name.
        ("null", None),
        ("N/A", None),
        ("Unknown", None),
        ("לקוח", None),
        ("noa@example.com", None),
        ("12345", None),
        ("   ", None),
        (None, None),
    ],
)
def test_first_name(name: str | None, first: str | None) -> None:
    assert first_name_of(name) == first


def test_attribute_first_name_wins_over_the_name() -> None:
    snapshot = profile("Levi Noa").model_copy(update={"attributes": {"first_name": "Noa"}})
    assert build_variables(snapshot, None, locale="en", unsubscribe_url="u")["first_name"] == "Noa"


@pytest.mark.parametrize(
    ("given", "greeted"),
    [
        ("NOA", "Noa"),
        ("בת שבע", "בת שבע"),
        ("NULL", "Sarah"),
        ("לקוח", "Sarah"),
        ("N/A", "Sarah"),
        ("Na", "Na"),
    ],
)
def test_the_crm_s_first_name_is_read_as_a_name_is(given: str, greeted: str) -> None:
    """Kept whole, in a name's case; a placeholder the CRM wrote is none (the name's first word)."""
    snapshot = profile("Sarah Miller").model_copy(update={"attributes": {"first_name": given}})
    assert build_variables(snapshot, None, locale="en", unsubscribe_url="u")["first_name"] == greeted


def test_formatting_locale() -> None:
    assert formatting_locale("he-IL", "he") == "he-IL"
    assert formatting_locale("he-IL", "en") == "en"
    assert formatting_locale(None, "ar") == "ar"


# --- Journey-specific content ------------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", [Channel.EMAIL, Channel.WHATSAPP])
def test_win_back_says_what_the_offer_gives_and_until_when_if_configured(
    store: TemplateStore, channel: Channel, locale: str
) -> None:
    template = store.resolve("win_back", channel, locale)
    variables = sample_variables(locale)
    value, until = variables["offer_value"], variables["offer_expires"]
    told = render(template, variables, strict=True)
    assert f"– {value}" in told.text
    assert until in told.text
    if told.html is not None:
        assert value in told.html
        assert until in told.html
    plain = render(template, variables | {"offer_value": None, "offer_expires": None}, strict=False)
    assert SAMPLE_OFFER_CODE in plain.text
    assert value not in all_text(plain)
    assert until not in all_text(plain)
    # Never a value or a date without a code (build_variables leaves them out, too).
    assert value not in all_text(render(template, variables | {"offer_code": None}, strict=False))


def test_an_offer_value_and_date_come_only_with_a_code() -> None:
    profile = ProfileSnapshot(
        lifecycle_stage="churned", tier="gold", reporting_currency="ILS", locale="he-IL"
    )
    until = datetime(2026, 12, 21, 12, tzinfo=UTC)
    common: dict[str, Any] = {"locale": "he-IL", "unsubscribe_url": "u", "offer_value": "15% הנחה"}
    without = build_variables(profile, None, offer_expires=until, **common)
    assert "offer_value" not in without
    assert "offer_expires" not in without
    with_code = build_variables(profile, None, offer_code="BACK-1", offer_expires=until, **common)
    assert (with_code["offer_value"], with_code["offer_expires"]) == ("15% הנחה", "21 בדצמבר 2026")


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_win_back_with_and_without_offer(store: TemplateStore, channel: Channel, locale: str) -> None:
    template = store.resolve("win_back", channel, locale)
    variables = sample_variables(locale)
    with_offer = render(template, variables, strict=False)
    without = render(template, variables | {"offer_code": None}, strict=False)
    assert SAMPLE_OFFER_CODE in with_offer.text
    assert SAMPLE_OFFER_CODE not in all_text(without)
    code_word = {"he": "קוד", "ar": "رمز", "en": "code"}[locale]
    assert code_word in with_offer.text
    assert code_word not in all_text(without)
    for rendered in (with_offer, without):
        assert SAMPLE_UNSUBSCRIBE_URL in rendered.text
        assert any(hint in rendered.text for hint in UNSUBSCRIBE_HINTS[locale])
        if rendered.html is not None:
            assert SAMPLE_UNSUBSCRIBE_URL in rendered.html
    if with_offer.html is not None:
        assert SAMPLE_OFFER_CODE in with_offer.html


OFFER_WORDS = {
    "he": ["הנחה", "קופון", "קוד", "מבצע", "הטבה", "מתנה", "חינם", "%"],
    "ar": ["خصم", "كوبون", "قسيمة", "عرض", "تخفيض", "رمز", "هدية", "مجان", "%"],
    "en": ["discount", "coupon", "offer", "code", "deal", "sale", "promo", "free", "%"],
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_at_risk_is_a_check_in_without_discount(store: TemplateStore, channel: Channel, locale: str) -> None:
    rendered = render(store.resolve("at_risk", channel, locale), sample_variables(locale), strict=False)
    words = all_text(rendered).lower()
    for word in OFFER_WORDS[locale]:
        assert word not in words, word
    assert SAMPLE_OFFER_CODE not in words


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("channel", CHANNELS)
def test_complaint_ack_names_the_personal_contact_only_when_escalated(
    store: TemplateStore, channel: Channel, locale: str
) -> None:
    template = store.resolve("complaint_ack", channel, locale)
    variables = sample_variables(locale)
    contact = variables["personal_contact"]
    escalated = render(template, variables, strict=False)
    assert contact["name"] in escalated.text
    assert contact["phone"] in escalated.text
    assert "T-5512" in escalated.text
    plain = render(template, variables | {"personal_contact": None}, strict=False)
    assert contact["name"] not in all_text(plain)
    assert "T-5512" in plain.text


@pytest.mark.parametrize("locale", LOCALES)
def test_tier_upgrade_lists_the_new_tiers_perks(store: TemplateStore, locale: str) -> None:
    variables = sample_variables(locale)
    email = render(store.resolve("tier_upgrade", "email", locale), variables, strict=False)
    assert email.html is not None
    for perk in variables["tier_perks"]:
        assert f"- {perk}" in email.text
        assert f"<li>{perk}</li>" in email.html
    assert variables["tier_name"] in (email.subject or "")


def test_a_tier_marketing_named_reads_by_its_name_in_each_language(store: TemplateStore) -> None:
    """A tier of the deployment's own (vip_plus) read "Vip Plus" in a Hebrew sentence; with
    RETAIN_MESSENGER_TIER_NAMES each language has its name, and a default tier can be renamed."""
    settings = MessengerSettings(
        messenger_tier_names={
            "vip_plus": {"he_IL": "VIP פלוס", "en": "VIP Plus"},
            "gold": {"en": "Gold Club"},
        }
    )
    names = settings.messenger_tier_names
    assert names["vip_plus"] == {"he-IL": "VIP פלוס", "en": "VIP Plus"}
    upgraded = profile("נועה לוי").model_copy(update={"tier": "vip_plus"})
    he = build_variables(upgraded, None, locale="he-IL", unsubscribe_url="u", tier_names=names)
    assert he["tier_name"] == "VIP פלוס"
    subject = render(store.resolve("tier_upgrade", "sms", "he"), he, strict=False).text
    assert "VIP פלוס" in subject
    assert build_variables(upgraded, None, locale="ar", unsubscribe_url="u", tier_names=names)[
        "tier_name"
    ] == (
        "Vip Plus"  # no Arabic name configured: the id spelt out, as without the setting
    )
    assert sample_variables("en", tier_names=names)["tier_name"] == "Gold Club"
    assert sample_variables("he", tier_names=names)["tier_name"] == "זהב"
    for bad in ({"vip": {"en": "VIP\nPlus"}}, {"vip": {"en": " "}}, {"vip": {"xx yy": "VIP"}}):
        with pytest.raises(ValidationError):
            MessengerSettings(messenger_tier_names=bad)


def test_feedback_survey_links_the_survey(store: TemplateStore) -> None:
    variables = sample_variables("ar")
    for channel in CHANNELS:
        rendered = render(store.resolve("feedback_survey", channel, "ar"), variables, strict=False)
        assert variables["survey_url"] in (rendered.html or rendered.text)


def test_whatsapp_approved_template_placeholder(store: TemplateStore) -> None:
    template = store.resolve("win_back", "whatsapp", "he-IL")
    assert template.content_sid == "config:win_back.he"
    sid = "HX" + "0" * 32
    variables = sample_variables("he")
    rendered = render(template, variables, strict=False, content_sids={"win_back.he": sid})
    assert rendered.content_sid == sid
    assert rendered.content_variables == {"1": "נועה", "2": f"קוד ההטבה האישי שלך: {SAMPLE_OFFER_CODE}"}
    # A placeholder is read as the setting's keys are (config:promo.he_IL is promo.he-IL).
    promo = custom("Hi", Channel.WHATSAPP, locale="he-IL", content_sid="config:promo.he_IL")
    assert approved_content_sid(promo, {"promo.he-IL": sid}) == sid
    assert approved_content_sid(promo, {"promo.he": sid}) is None
    unnamed = render(template, variables | {"first_name": None}, strict=False)
    assert unnamed.content_sid is None  # not configured: no approved template to fall back on
    assert unnamed.content_variables["1"] == "לקוח/ה יקר/ה"
    survey = render(store.resolve("feedback_survey", "whatsapp", "en"), sample_variables("en"), strict=False)
    assert survey.content_variables == {"1": "Sarah", "2": SAMPLE_SURVEY_URL}


def test_rendered_to_json_for_the_preview(store: TemplateStore) -> None:
    rendered = render(store.resolve("welcome", "sms", "ar"), sample_variables("ar"), strict=False)
    body = rendered.to_json()
    assert body["template"] == "welcome/sms/ar"
    assert body["sms_encoding"] == "UCS-2"
    assert body["sms_segments"] == 2
    assert body["direction"] == "rtl"


# Second-person forms that speak to a man only: a woman reading "يمكنك أن تكتب لنا" or a
# button "شارك رأيك" is addressed as one. The defaults use verbal nouns (مراسلتنا, لمشاركة).
MASCULINE_ONLY = {"ar": ("تكتب", "اكتب", "شارك", "تفضل")}


@pytest.mark.parametrize("journey", JOURNEYS)
@pytest.mark.parametrize("channel", CHANNELS)
def test_arabic_defaults_speak_to_every_customer(
    store: TemplateStore, journey: str, channel: Channel
) -> None:
    rendered = render(store.resolve(journey, channel, "ar"), sample_variables("ar"), strict=False)
    words = set(re.findall(r"\w+", all_text(rendered)))
    assert words.isdisjoint(MASCULINE_ONLY["ar"]), sorted(words & set(MASCULINE_ONLY["ar"]))


@pytest.mark.parametrize("locale", LOCALES)
def test_a_win_back_sms_says_what_its_code_gives_where_it_fits(store: TemplateStore, locale: str) -> None:
    """A bare code says nothing of what it is for. Beside the opt-out keyword (a sender that
    takes replies) the SMS says what it gives; beside the unsubscribe link, it would not fit."""
    template = store.resolve("win_back", "sms", locale)
    variables = sample_variables(locale)
    from_number, from_name = (
        render(template, way, strict=True).text for way in sms_variants(variables, locale)
    )
    assert f"{variables['offer_code']} ({variables['offer_value']})" in from_number
    assert variables["offer_code"] in from_name
    assert variables["offer_value"] not in from_name


REPLY_INVITATIONS = {
    "he": ("להשיב", "השיבו"),
    "ar": ("الرد", "ملاحظاتك هنا"),
    "en": ("reply", "Tell us here"),
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("journey", ["welcome", "thank_you", "at_risk", "win_back"])
def test_an_sms_invites_a_reply_only_where_the_customer_can_send_one(
    store: TemplateStore, journey: str, locale: str
) -> None:
    """From an alphanumeric sender id (RETAIN_TWILIO_SMS_FROM=Retain) a customer cannot answer:
    "reply here" promised what the phone cannot do. The SMS says nothing of it then, and keeps
    its single spaces."""
    template = store.resolve(journey, "sms", locale)
    lean = sample_variables(locale) | {"offer_code": None}
    from_number, from_name = (render(template, way, strict=False).text for way in sms_variants(lean, locale))
    assert any(word in from_number for word in REPLY_INVITATIONS[locale]), from_number
    assert not any(word in from_name for word in REPLY_INVITATIONS[locale]), from_name
    assert "  " not in from_name
    # The way out too: the keyword to reply where replies are taken, else the link.
    assert STOP_KEYWORDS[locale] in from_number
    assert lean["unsubscribe_url"] not in from_number
    assert lean["unsubscribe_url"] in from_name


def test_which_sms_senders_take_replies() -> None:
    takes = {
        sender: MessengerSettings(
            twilio_account_sid="AC" + "0" * 32,
            twilio_sms_from=sender,
            twilio_auth_token="t",
            messenger_link_secret="a-secret-of-this-deployment",
        ).sms_takes_replies
        for sender in ("+15017122661", "12345", "Retain")
    }
    assert takes == {"+15017122661": True, "12345": True, "Retain": False}
    assert MessengerSettings().sms_takes_replies  # the sandbox writes as a number would


def test_settings_and_events_read_a_language_by_one_code() -> None:
    """Events read a locale's language by its current code (tl-PH is fil-PH, heb is he); the
    messenger's settings, keyed as a shop wrote them, read the same way, so they still match."""
    settings = MessengerSettings(messenger_offer_value={"tl": "15% off", "heb": "15% הנחה"})
    assert settings.messenger_offer_value == {"fil": "15% off", "he": "15% הנחה"}
    event_locale = canonical_locale("tl-PH")
    assert event_locale == "fil-PH"
    assert in_language(settings.messenger_offer_value, event_locale) == "15% off"
    assert in_language(settings.messenger_offer_value, canonical_locale("iw-IL")) == "15% הנחה"
