"""Outgoing messages for the provider tests: English, Hebrew (RTL) and Arabic (RTL) content."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from services.messenger.providers.base import OutgoingMessage
from shared.events import Channel

CREATED_AT = datetime(2026, 3, 15, 9, 30, 12, 345678, tzinfo=UTC)
UNSUBSCRIBE = "<https://retain.example/u/tok123>, <mailto:unsubscribe@retain.example?subject=unsubscribe>"
HEBREW_HTML = (
    '<!doctype html><html lang="he" dir="rtl"><body style="direction:rtl;text-align:right">'
    "<p>שלום דנה,</p><p>תודה שקנית אצלנו! קוד ההנחה שלך: <b>SAVE10</b></p></body></html>"
)
ARABIC_HTML = (
    '<!doctype html><html lang="ar" dir="rtl"><body>'
    "<p>مرحباً سارة،</p><p>شكراً لتسوقك معنا! رمز الخصم: <b>SAVE10</b></p></body></html>"
)


def new_id() -> str:
    return f"msg-{uuid.uuid4().hex}"


def email_message(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "message_id": new_id(),
        "channel": Channel.EMAIL,
        "to": "דנה כהן <dana@example.com>",
        "from_": "Retain <hello@retain.example>",
        "subject": "תודה על הקנייה 🎉",
        "text": "שלום דנה,\nתודה שקנית אצלנו! קוד ההנחה שלך: SAVE10",
        "html": HEBREW_HTML,
        "locale": "he-IL",
        "headers": {"List-Unsubscribe": UNSUBSCRIBE},
        "created_at": CREATED_AT,
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def sms_message(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "message_id": new_id(),
        "channel": Channel.SMS,
        "to": "+972501234567",
        "from_": "+15005550006",
        "text": "Thanks for shopping with us! Your code: SAVE10",
        "locale": "en-US",
        "created_at": CREATED_AT,
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def whatsapp_message(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {"channel": Channel.WHATSAPP, "from_": "+14155238886"}
    fields.update(overrides)
    return sms_message(**fields)
