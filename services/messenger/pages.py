"""The pages behind the links in messages (unsubscribe, feedback survey), in the customer's
language and direction. Pure: the API finds the language and the state, this renders them.

A customer who taps a link in a Hebrew SMS reads Hebrew, right to left, and is told what the
tap did (which channel, which business), not "Done. / בוצע. / تم." on one mixed line.
"""

from __future__ import annotations

from typing import Literal

from jinja2 import Environment

from services.messenger.templates import hebrew_prefix, language_of
from shared.events import Channel

Language = Literal["he", "ar", "en"]
SURVEY_SCORES = range(1, 6)
MAX_COMMENT = 1000

_ENV = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
_PAGE = _ENV.from_string(
    """<!doctype html>
<html lang="{{ lang }}" dir="{{ 'ltr' if lang == 'en' else 'rtl' }}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title></head>
<body style="font-family:sans-serif;max-width:30em;margin:3em auto;padding:0 1em;line-height:1.5">
<h1 style="font-size:1.3em">{{ title }}</h1>
{% for line in lines %}<p>{{ line }}</p>
{% endfor %}
{% if action %}
<form method="post" action="{{ action }}">
{% if scores %}
<p>{% for n in scores %}
<label style="margin-inline-end:1em">
<input type="radio" name="score" value="{{ n }}" required> {{ n }}</label>
{% endfor %}</p>
<p><label>{{ comment_label }}<br>
<textarea name="comment" rows="4" maxlength="{{ max_comment }}" style="width:100%"></textarea>
</label></p>
{% endif %}
<button type="submit">{{ button }}</button>
</form>
{% endif %}
</body></html>
"""
)

_CHANNEL: dict[Language, dict[Channel, str]] = {
    "he": {Channel.EMAIL: "דוא״ל", Channel.SMS: "SMS", Channel.WHATSAPP: "וואטסאפ"},
    "ar": {Channel.EMAIL: "البريد الإلكتروني", Channel.SMS: "SMS", Channel.WHATSAPP: "واتساب"},
    "en": {Channel.EMAIL: "email", Channel.SMS: "SMS", Channel.WHATSAPP: "WhatsApp"},
}

# {channel} and {brand} are filled in, and for Hebrew {from_brand} and {by_channel} with their
# prefix letter (``hebrew_prefix``); every text is gender-neutral in Hebrew.
_TEXTS: dict[Language, dict[str, str]] = {
    "he": {
        "unsubscribe_title": "הסרה מרשימת התפוצה",
        "unsubscribe_ask": "להפסיק לקבל הודעות {channel} {from_brand}?",
        "unsubscribe_button": "הסרה",
        "unsubscribed_title": "ההסרה בוצעה",
        "unsubscribed": "לא יישלחו אליך עוד הודעות שיווקיות {by_channel} {from_brand}. "
        "הודעות על הזמנות ופניות שלך יגיעו כרגיל.",
        "survey_title": "איך היה?",
        "survey_ask": "עד כמה הטיפול בפנייה שלך היה לשביעות רצונך? 1 – בכלל לא, 5 – מאוד.",
        "survey_comment": "רוצה להוסיף משהו? (לא חובה)",
        "survey_button": "שליחה",
        "survey_thanks_title": "תודה!",
        "survey_thanks": "קיבלנו את התשובה שלך, ואנחנו קוראים כל תשובה.",
        "survey_already": "כבר קיבלנו ממך תשובה על ההודעה הזאת. תודה!",
        "survey_gone": "הסקר הזה כבר לא פעיל. תודה על הרצון לעזור!",
    },
    "ar": {
        "unsubscribe_title": "إلغاء الاشتراك",
        "unsubscribe_ask": "هل تريد إيقاف رسائل {channel} من {brand}؟",
        "unsubscribe_button": "إلغاء الاشتراك",
        "unsubscribed_title": "تم إلغاء الاشتراك",
        "unsubscribed": "لن تصلك بعد الآن رسائل تسويقية عبر {channel} من {brand}. "
        "ستصلك الرسائل المتعلقة بطلباتك واستفساراتك كالمعتاد.",
        "survey_title": "كيف كانت تجربتك؟",
        "survey_ask": "ما مدى رضاك عن طريقة معالجة طلبك؟ 1 – غير راضٍ إطلاقًا، 5 – راضٍ جدًا.",
        "survey_comment": "هل تودّ إضافة شيء؟ (اختياري)",
        "survey_button": "إرسال",
        "survey_thanks_title": "شكرًا لك!",
        "survey_thanks": "وصلنا ردّك، ونحن نقرأ كل ردّ.",
        "survey_already": "وصلنا ردّك على هذه الرسالة من قبل. شكرًا لك!",
        "survey_gone": "هذا الاستطلاع لم يعد متاحًا. شكرًا على رغبتك في المساعدة!",
    },
    "en": {
        "unsubscribe_title": "Unsubscribe",
        "unsubscribe_ask": "Stop {channel} messages from {brand}?",
        "unsubscribe_button": "Unsubscribe",
        "unsubscribed_title": "You're unsubscribed",
        "unsubscribed": "You won't get marketing messages by {channel} from {brand} any more. "
        "Messages about your orders and requests still come as usual.",
        "survey_title": "How did we do?",
        "survey_ask": "How satisfied are you with how we handled your request? 1 – not at all, 5 – very.",
        "survey_comment": "Anything you'd like to add? (optional)",
        "survey_button": "Send",
        "survey_thanks_title": "Thank you!",
        "survey_thanks": "We have your answer, and we read every one.",
        "survey_already": "We already have your answer to this message. Thank you!",
        "survey_gone": "This survey is no longer open. Thank you for wanting to help!",
    },
}


def page_language(locale: str | None) -> Language:
    """The page's language: the customer's if we have its texts, else English."""
    try:
        lang = language_of(locale or "")  # as the templates read a locale (iw is he)
    except ValueError:  # no locale, or not a language tag
        return "en"
    return lang if lang in ("he", "ar") else "en"  # type: ignore[return-value]


def _render(lang: Language, title: str, lines: list[str], **form: object) -> str:
    return _PAGE.render(lang=lang, title=title, lines=lines, max_comment=MAX_COMMENT, **form)


def _fill(lang: Language, text: str, channel: Channel, brand: str) -> str:
    # Hebrew joins its prefix letters to a Hebrew word and puts a maqaf before a Latin one
    # (מ-Retain, ב-SMS); the other languages' texts do not use these two.
    name = _CHANNEL[lang][channel]
    return text.format(
        channel=name,
        brand=brand,
        from_brand=hebrew_prefix(brand, "מ"),
        by_channel=hebrew_prefix(name, "ב"),
    )


def unsubscribe_confirm(lang: Language, channel: Channel, brand: str, action: str) -> str:
    """The GET page: one button that POSTs (a mail scanner following the link unsubscribes nobody)."""
    t = _TEXTS[lang]
    ask = _fill(lang, t["unsubscribe_ask"], channel, brand)
    return _render(lang, t["unsubscribe_title"], [ask], action=action, button=t["unsubscribe_button"])


def unsubscribed(lang: Language, channel: Channel, brand: str) -> str:
    t = _TEXTS[lang]
    done = _fill(lang, t["unsubscribed"], channel, brand)
    return _render(lang, t["unsubscribed_title"], [done])


def survey_form(lang: Language, brand: str, action: str) -> str:
    t = _TEXTS[lang]
    return _render(
        lang,
        t["survey_title"],
        [t["survey_ask"].format(brand=brand)],
        action=action,
        scores=list(SURVEY_SCORES),
        comment_label=t["survey_comment"],
        button=t["survey_button"],
    )


SurveyState = Literal["thanks", "already", "gone"]


_DONE: dict[SurveyState, str] = {
    "thanks": "survey_thanks",
    "already": "survey_already",
    "gone": "survey_gone",
}


def survey_done(lang: Language, state: SurveyState) -> str:
    t = _TEXTS[lang]
    return _render(lang, t["survey_thanks_title"], [t[_DONE[state]]])
