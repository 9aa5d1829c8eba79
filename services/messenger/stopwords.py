"""What an inbound SMS / WhatsApp message asks for: stop, start, help, or nothing. Pure.

Matching follows Twilio's rule for its keywords: the whole message is the keyword ("STOP"
stops, "please stop" does not), case does not matter and surrounding white space is trimmed.
We also ignore punctuation and emoji ("Stop!", "stop." still stop) and accept a few short
phrases ("הסר אותי", "إلغاء الاشتراك"), because a customer who clearly asked to stop must stop.

Hebrew and Arabic are normalised first: Hebrew points (niqqud) and cantillation are removed;
Arabic diacritics (harakat), the tatweel and the hamza forms of alef (أ إ آ ٱ → ا) are folded,
as are the final ى → ي and ة → ه, so "إلغاء", "الغاء" and "الْغَاء" are one word.

Replies: on SMS, Twilio itself answers its own English keywords (STOP, START, HELP …) and
blocks the number; we only record. Everything else (our Hebrew and Arabic keywords, and every
keyword on WhatsApp, where Twilio does no keyword handling) is answered by us, in the language
the customer used.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from services.messenger.templates import DEFAULT_BRAND, Brand
from shared.events import Channel

InboundIntent = Literal["stop", "start", "help"]
Language = Literal["en", "he", "ar"]

# Twilio's defaults (Advanced Opt-Out): the keywords it answers and acts on by itself on SMS.
TWILIO_OPT_OUT = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "revoke", "optout"})
TWILIO_OPT_IN = frozenset({"start", "yes", "unstop"})
TWILIO_HELP = frozenset({"help", "info"})

# Normalised forms (see ``normalise``).
KEYWORDS: dict[InboundIntent, dict[Language, frozenset[str]]] = {
    "stop": {
        "en": TWILIO_OPT_OUT | {"stop all", "opt out", "unsubscribe me"},
        "he": frozenset(
            {"הסר", "הסירו", "הסירי", "הסרה", "הסר אותי", "הסירו אותי", "עצור", "עצרו", "הפסק", "הפסיקו"}
            | {"ביטול", "בטל", "בטלו", "הסר מרשימה", "הסרה מרשימת תפוצה"}
        ),
        "ar": frozenset(
            {"الغاء", "الغاء الاشتراك", "توقف", "توقيف", "ايقاف", "اوقف", "اوقفوا", "الغي"}
            | {"الغي الاشتراك", "ازالة", "ازالتي", "احذفني", "ستوب"}
        ),
    },
    "start": {
        "en": TWILIO_OPT_IN,
        "he": frozenset({"התחל", "הפעל", "הרשמה", "הרשם"}),
        "ar": frozenset({"ابدا", "اشتراك", "اشترك", "تفعيل"}),
    },
    "help": {
        "en": TWILIO_HELP,
        "he": frozenset({"עזרה", "מידע"}),
        "ar": frozenset({"مساعدة", "مساعده", "معلومات"}),
    },
}

_ALEF = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ة": "ه"})
_SPACE = re.compile(r"\s+")


def _drop(ch: str) -> bool:
    code = ord(ch)
    hebrew_marks = 0x0591 <= code <= 0x05C7 and ch not in "\u05be\u05c0\u05c3\u05c6"
    arabic_marks = 0x064B <= code <= 0x065F or code in (0x0670, 0x0640)
    # Punctuation, symbols (emoji) and other marks go; letters, digits and spaces stay.
    return hebrew_marks or arabic_marks or unicodedata.category(ch)[0] in "PSMC"


def normalise(body: str) -> str:
    """Case-folded, marks and punctuation removed, alef forms folded, white space collapsed."""
    text = unicodedata.normalize("NFKC", body).casefold().translate(_ALEF)
    text = "".join(" " if ch.isspace() or ch in "\u05be" else ch for ch in text if not _drop(ch))
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True, slots=True)
class InboundKeyword:
    intent: InboundIntent
    language: Language
    keyword: str  # normalised

    def handled_by_twilio(self, channel: Channel, body: str) -> bool:
        """Whether Twilio already acted and answered (its own keyword, exactly, on SMS)."""
        exact = body.strip().casefold()
        return channel is Channel.SMS and exact in TWILIO_OPT_OUT | TWILIO_OPT_IN | TWILIO_HELP


_LOOKUP: dict[str, tuple[InboundIntent, Language]] = {
    normalise(word): (intent, language)
    for intent, by_language in KEYWORDS.items()
    for language, words in by_language.items()
    for word in words
}


def match_inbound(body: str) -> InboundKeyword | None:
    """The keyword the whole message is, with its language; None for ordinary text."""
    text = normalise(body)
    found = _LOOKUP.get(text)
    return None if found is None else InboundKeyword(found[0], found[1], text)


def classify_inbound(body: str) -> InboundIntent | None:
    """``"stop"``, ``"start"``, ``"help"`` or None (rules: module doc)."""
    found = match_inbound(body)
    return None if found is None else found.intent


# Each names the business (a reply from a number the customer may not know) and says what
# stops: our messages here (on this channel), not on every channel. Hebrew is gender-neutral. The phone
# is isolated left-to-right (U+2066 … U+2069) inside Hebrew and Arabic, and those begin with a
# right-to-left mark: a Latin brand first would otherwise set the whole text left-to-right.
_REPLIES: dict[InboundIntent, dict[Language, str]] = {
    "stop": {
        "en": "{brand}: you are unsubscribed; no more messages from us here. Reply START to resubscribe.",
        "he": "\u200f{brand}: ההסרה בוצעה, לא יישלחו אליך עוד הודעות כאן. להרשמה מחדש אפשר להשיב התחל.",
        "ar": "\u200f{brand}: تم إلغاء اشتراكك، ولن تصلك منا رسائل أخرى هنا. لإعادة الاشتراك أرسل ابدأ.",
    },
    "start": {
        "en": "{brand}: you are subscribed again. Reply STOP to unsubscribe.",
        "he": "\u200f{brand}: ההרשמה חודשה. להסרה אפשר להשיב הסר.",
        "ar": "\u200f{brand}: تمت إعادة اشتراكك. لإلغاء الاشتراك أرسل إلغاء.",
    },
    "help": {
        "en": "{brand}: for help call {phone} or write to us here. Reply STOP to unsubscribe.",
        "he": "\u200f{brand}: לעזרה אפשר להתקשר למספר \u2066{phone}\u2069 או לכתוב לנו כאן. "
        "להסרה אפשר להשיב הסר.",
        "ar": "\u200f{brand}: للمساعدة اتصلوا على \u2066{phone}\u2069 أو اكتبوا لنا هنا. "
        "لإلغاء الاشتراك أرسل إلغاء.",
    },
}


def reply_for(
    keyword: InboundKeyword, channel: Channel, body: str, brand: Brand = DEFAULT_BRAND
) -> str | None:
    """The text to answer with, or None when Twilio has already answered."""
    if keyword.handled_by_twilio(channel, body):
        return None
    return _REPLIES[keyword.intent][keyword.language].format(brand=brand.name, phone=brand.support_phone)
