"""Inbound keywords in English, Hebrew and Arabic, and what we answer."""

from __future__ import annotations

import pytest

from services.messenger.stopwords import (
    KEYWORDS,
    TWILIO_HELP,
    TWILIO_OPT_IN,
    TWILIO_OPT_OUT,
    InboundIntent,
    Language,
    classify_inbound,
    match_inbound,
    normalise,
    reply_for,
)
from services.messenger.templates import Brand
from shared.events import Channel


@pytest.mark.parametrize("word", sorted(TWILIO_OPT_OUT))
def test_twilios_opt_out_keywords_stop(word: str) -> None:
    assert classify_inbound(word) == "stop"
    assert classify_inbound(word.upper()) == "stop"
    assert classify_inbound(f"  {word.title()}\n") == "stop"


@pytest.mark.parametrize("body", ["START", "start", "Unstop", "YES", " yes "])
def test_start_unstop_and_yes_resubscribe(body: str) -> None:
    assert classify_inbound(body) == "start"


@pytest.mark.parametrize("body", ["HELP", "info", "עזרה", "مساعدة"])
def test_help(body: str) -> None:
    assert classify_inbound(body) == "help"


@pytest.mark.parametrize("body", ["Stop.", "STOP!", "stop!!!", "«stop»", "Stop 🙏", "opt-out", "Stop all"])
def test_punctuation_and_emoji_are_ignored(body: str) -> None:
    assert classify_inbound(body) == "stop"


@pytest.mark.parametrize(
    "body",
    [
        "please stop",
        "stop sending me this",
        "don't stop",
        "I will cancel my order",
        "yes please",
        "",
        "   ",
        "🙂",
    ],
)
def test_only_the_whole_message_counts(body: str) -> None:
    assert classify_inbound(body) is None


@pytest.mark.parametrize(
    "body",
    ["הסר", "הסירו", "הסר אותי", "עצור", "הפסק", "ביטול", "בטל", "הָסֵר", "עֲצוֹר!", " הסרה. "],
)
def test_hebrew_stop(body: str) -> None:
    found = match_inbound(body)
    assert found is not None
    assert (found.intent, found.language) == ("stop", "he")


@pytest.mark.parametrize(
    "body",
    [
        "إلغاء",
        "الغاء",
        "الْغَاءْ",
        "ألغاء",
        "توقف",
        "إيقاف",
        "ايقاف",
        "إلغاء الاشتراك",
        "الغاء الاشتراك",
        "إزالة",
        "ازاله",
        "توقـــف",
    ],
)
def test_arabic_stop_whatever_the_alef_diacritics_or_tatweel(body: str) -> None:
    found = match_inbound(body)
    assert found is not None
    assert (found.intent, found.language) == ("stop", "ar")


@pytest.mark.parametrize(
    ("body", "language"), [("התחל", "he"), ("ابدأ", "ar"), ("ابدا", "ar"), ("اشتراك", "ar")]
)
def test_start_in_hebrew_and_arabic(body: str, language: str) -> None:
    found = match_inbound(body)
    assert found is not None
    assert (found.intent, found.language) == ("start", language)


def test_normalise() -> None:
    assert normalise("  ShaLOM\u200f  World!! ") == "shalom world"
    assert normalise("إِلْغَاء") == "الغاء"
    assert normalise("שָׁלוֹם") == "שלום"


def test_no_keyword_means_two_things() -> None:
    seen: dict[str, str] = {}
    for intent, by_language in KEYWORDS.items():
        for words in by_language.values():
            for word in words:
                key = normalise(word)
                assert seen.setdefault(key, intent) == intent, word


def test_twilio_answers_its_own_keywords_on_sms() -> None:
    for body in ["STOP", " stop ", "Start", "HELP"]:
        found = match_inbound(body)
        assert found is not None
        assert found.handled_by_twilio(Channel.SMS, body)
        assert reply_for(found, Channel.SMS, body) is None


def test_we_answer_what_twilio_does_not() -> None:
    hebrew = match_inbound("הסר")
    assert hebrew is not None
    # Right-to-left from its first character, the business named, what stops said.
    assert reply_for(hebrew, Channel.SMS, "הסר", Brand("תה ונענע")) == (
        "\u200fתה ונענע: ההסרה בוצעה, לא יישלחו אליך עוד הודעות כאן. להרשמה מחדש אפשר להשיב התחל."
    )
    arabic = match_inbound("إلغاء")
    assert arabic is not None
    reply = reply_for(arabic, Channel.SMS, "إلغاء")
    assert reply is not None
    assert "إلغاء اشتراكك" in reply
    # WhatsApp has no keyword handling at Twilio: we answer even STOP.
    stop = match_inbound("STOP")
    assert stop is not None
    assert reply_for(stop, Channel.WHATSAPP, "STOP") == (
        "Retain: you are unsubscribed; no more messages from us here. Reply START to resubscribe."
    )
    # HELP says how to reach a person: the support phone, isolated left-to-right in Hebrew.
    help_ = match_inbound("עזרה")
    assert help_ is not None
    assert "להתקשר למספר \u2066+972-3-555-0199\u2069" in (
        reply_for(help_, Channel.WHATSAPP, "עזרה", Brand("Retain", "+972-3-555-0199")) or ""
    )
    # Punctuated, Twilio's exact match may not have fired: we answer.
    punctuated = match_inbound("Stop!")
    assert punctuated is not None
    assert reply_for(punctuated, Channel.SMS, "Stop!") is not None


def test_every_intent_has_a_reply_in_every_language() -> None:
    intents: tuple[InboundIntent, ...] = ("stop", "start", "help")
    languages: tuple[Language, ...] = ("en", "he", "ar")
    for intent in intents:
        for language in languages:
            found = match_inbound(next(iter(KEYWORDS[intent][language])))
            assert found is not None
            assert reply_for(found, Channel.WHATSAPP, "x")


def test_twilio_lists() -> None:
    assert {"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout"} == TWILIO_OPT_OUT
    assert {"start", "yes", "unstop"} == TWILIO_OPT_IN
    assert {"help", "info"} == TWILIO_HELP
