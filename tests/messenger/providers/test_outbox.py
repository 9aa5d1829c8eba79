"""The sandbox outbox: real files a person (and a mail parser) can read; the shared MIME builder."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from email.message import EmailMessage, MIMEPart
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from services.messenger.providers.base import ProviderResult
from services.messenger.providers.mime import email_bytes, message_id_header
from services.messenger.providers.outbox import OutboxProvider, sms_encoding, sms_segments
from tests.messenger.providers.factories import (
    ARABIC_HTML,
    CREATED_AT,
    HEBREW_HTML,
    UNSUBSCRIBE,
    email_message,
    sms_message,
    whatsapp_message,
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def only_file(directory: Path) -> Path:
    [path] = directory.iterdir()
    return path


def body_text(part: MIMEPart) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


async def test_email_is_an_eml_file_with_headers_parts_and_rtl_html(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = email_message()

    result = await outbox.send(msg)

    path = only_file(tmp_path)
    assert path.suffix == ".eml"
    assert path.name == f"20260315T093012345678Z_email_{msg.message_id}.eml"
    assert result.provider == "outbox"
    assert result.status == "sent"
    assert result.provider_message_id == path.name

    raw = path.read_bytes()
    raw.decode("ascii")  # 7-bit clean: any SMTP server takes it, no 8BITMIME needed
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    eml = parse(raw)
    assert eml["From"] == "Retain <hello@retain.example>"
    assert eml["To"].addresses[0].display_name == "דנה כהן"
    assert eml["To"].addresses[0].addr_spec == "dana@example.com"
    assert eml["Subject"] == "תודה על הקנייה 🎉"
    assert eml["Message-ID"] == f"<{msg.message_id}@retain>"
    assert parsedate_to_datetime(eml["Date"]) == CREATED_AT.replace(microsecond=0)
    assert eml["List-Unsubscribe"] == UNSUBSCRIBE
    assert eml["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert eml["Content-Language"] == "he-IL"
    assert eml["MIME-Version"] == "1.0"
    assert eml.get_content_type() == "multipart/alternative"

    plain, html = eml.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert plain.get_content_charset() == "utf-8"
    assert html.get_content_charset() == "utf-8"
    assert body_text(plain).strip() == msg.text
    assert body_text(html).strip() == HEBREW_HTML  # RTL markup passes through untouched


async def test_arabic_email_keeps_its_rtl_html(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = email_message(
        to="sara@example.com", subject="شكراً لك", text="مرحباً سارة،\nشكراً لتسوقك معنا!", html=ARABIC_HTML
    )
    await outbox.send(msg)

    path = only_file(tmp_path)
    eml = parse(path.read_bytes())
    assert eml["Subject"] == "شكراً لك"
    plain, html = eml.iter_parts()
    assert body_text(plain).strip() == "مرحباً سارة،\nشكراً لتسوقك معنا!"
    assert body_text(html).strip() == ARABIC_HTML
    assert html["Content-Transfer-Encoding"] in {"base64", "quoted-printable"}


def test_plain_only_email_and_mailto_only_unsubscribe() -> None:
    msg = email_message(html=None, headers={"List-Unsubscribe": "<mailto:u@retain.example>"}, subject=None)
    eml = parse(email_bytes(msg))
    assert eml.get_content_type() == "text/plain"
    assert eml["Subject"] == "שלום דנה,"  # first line when a template gave no subject
    assert eml["List-Unsubscribe"] == "<mailto:u@retain.example>"
    assert eml["List-Unsubscribe-Post"] is None  # one-click needs an http(s) URI (RFC 8058)


def test_mime_is_deterministic_and_message_id_is_stable() -> None:
    msg = email_message()
    assert email_bytes(msg) == email_bytes(msg)  # a resend after a crash is the same message
    assert message_id_header("abc-123") == "<abc-123@retain>"
    assert message_id_header("a b/=c") == "<a=20b/=3Dc@retain>"
    assert message_id_header("x..y") != message_id_header("x.y")


def test_caller_cannot_override_builder_headers() -> None:
    msg = email_message(headers={"Message-ID": "<evil@x>", "X-Campaign": "winback"})
    eml = parse(email_bytes(msg))
    assert eml.get_all("Message-ID") == [f"<{msg.message_id}@retain>"]
    assert eml["X-Campaign"] == "winback"


async def test_sms_is_json_with_segments(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = sms_message(text="שלום דנה! " * 8, locale="he-IL")
    await outbox.send(msg)

    path = only_file(tmp_path)
    assert path.name == f"20260315T093012345678Z_sms_{msg.message_id}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["to"] == msg.to
    assert doc["from"] == msg.from_
    assert doc["body"] == msg.text
    assert doc["encoding"] == "UCS-2"
    assert doc["segments"] == 2  # 80 UCS-2 characters > 70
    assert doc["message_id"] == msg.message_id


async def test_whatsapp_template_json(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = whatsapp_message(
        content_sid="HX" + "b" * 32, content_variables={"1": "Dana", "2": "SAVE10"}, text="Hi Dana: SAVE10"
    )
    await outbox.send(msg)
    path = only_file(tmp_path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["channel"] == "whatsapp"
    assert doc["content_sid"] == "HX" + "b" * 32
    assert doc["content_variables"] == {"1": "Dana", "2": "SAVE10"}


async def test_send_is_idempotent_and_lookup_finds_the_file(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = sms_message()
    assert await outbox.lookup(msg) is None

    first, second = await asyncio.gather(outbox.send(msg), outbox.send(msg))
    third = await outbox.send(msg)

    only = only_file(tmp_path)  # never twice, and no temporary file left behind
    assert first.provider_message_id == second.provider_message_id == third.provider_message_id
    found = await outbox.lookup(msg)
    assert found is not None
    assert found.provider_message_id == only.name
    assert await outbox.lookup(sms_message()) is None


async def test_odd_message_ids_make_safe_file_names(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    msg = sms_message(message_id="journey/welcome:42 ü")
    result = await outbox.send(msg)
    path = only_file(tmp_path)
    assert path.parent == tmp_path
    assert "/" not in path.name
    assert result.provider_message_id == path.name
    assert await outbox.lookup(msg) == ProviderResult("outbox", path.name, "sent", "found")


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters take two septets
        ("€" * 81, "GSM-7", 2),
        ("ש" * 70, "UCS-2", 1),
        ("ش" * 71, "UCS-2", 2),
        ("a" * 134 + "ש", "UCS-2", 3),  # one non-GSM character turns the whole text to UCS-2
        ("🎉" * 35, "UCS-2", 1),  # outside the BMP: two code units each
        ("🎉" * 36, "UCS-2", 2),
    ],
)
def test_sms_segments(text: str, encoding: str, segments: int) -> None:
    assert sms_encoding(text) == encoding
    assert sms_segments(text) == segments
