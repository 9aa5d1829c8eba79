"""Unsubscribe tokens and survey links (services/messenger/links.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import pytest

from services.messenger.links import (
    message_id_of,
    sign_unsubscribe,
    survey_token,
    unsubscribe_url,
    verify_unsubscribe,
)

SECRET = "link-secret"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("customer", ["c-001234", "לקוח-7", "a" * 128, "123"])
@pytest.mark.parametrize("channel", ["email", "sms", "whatsapp"])
def test_a_token_names_its_customer_and_channel(customer: str, channel: str) -> None:
    assert verify_unsubscribe(SECRET, sign_unsubscribe(SECRET, customer, channel)) == (customer, channel)


def test_a_uuid_customer_travels_as_its_16_bytes() -> None:
    customer = "0c8f720c-acf4-43bd-b0b5-1e8e1e482978"
    token = sign_unsubscribe(SECRET, customer, "sms")
    assert len(token) == 35  # 23 for "S" + 16 bytes, the dot, 11 for the signature
    assert verify_unsubscribe(SECRET, token) == (customer, "sms")
    url = unsubscribe_url("https://shop.example/", SECRET, customer, "sms")
    assert url == f"https://shop.example/u/{token}"


@pytest.mark.parametrize(
    "customer",
    [
        "0C8F720C-ACF4-43BD-B0B5-1E8E1E482978",
        "0c8f720cacf443bdb0b51e8e1e482978",
        "{0c8f720c-acf4-43bd-b0b5-1e8e1e482978}",
    ],
)
def test_other_spellings_of_a_uuid_stay_text_so_the_same_id_comes_back(customer: str) -> None:
    token = sign_unsubscribe(SECRET, customer, "email")
    assert verify_unsubscribe(SECRET, token) == (customer, "email")


def test_tokens_signed_before_the_compact_form_still_work() -> None:
    customer = "0c8f720c-acf4-43bd-b0b5-1e8e1e482978"
    payload = f"w{customer}".encode()
    signature = hmac.new(SECRET.encode(), b"unsubscribe|" + payload, hashlib.sha256).digest()[:8]
    assert verify_unsubscribe(SECRET, f"{b64(payload)}.{b64(signature)}") == (customer, "whatsapp")


def test_forged_or_broken_tokens_are_refused() -> None:
    token = sign_unsubscribe(SECRET, str(uuid.uuid4()), "sms")
    payload, _ = token.split(".")
    assert verify_unsubscribe("another-secret", token) is None
    assert verify_unsubscribe(SECRET, f"{payload}.{b64(b'12345678')}") is None
    assert verify_unsubscribe(SECRET, payload) is None
    assert verify_unsubscribe(SECRET, "!!!.???") is None

    def signed(raw: bytes) -> str:
        mac = hmac.new(SECRET.encode(), b"unsubscribe|" + raw, hashlib.sha256).digest()[:8]
        return f"{b64(raw)}.{b64(mac)}"

    # Genuine signatures over payloads no link has: no channel, a short UUID, an empty id.
    assert verify_unsubscribe(SECRET, signed(b"xcustomer")) is None
    assert verify_unsubscribe(SECRET, signed(b"S" + bytes(15))) is None
    assert verify_unsubscribe(SECRET, signed(b"s")) is None


def test_a_survey_link_carries_a_uuid_in_22_characters_and_anything_else_as_it_is() -> None:
    message = str(uuid.uuid4())
    assert len(survey_token(message)) == 22
    assert message_id_of(survey_token(message)) == message
    assert message_id_of(message) == message
    assert survey_token("not-a-uuid") == "not-a-uuid"
    assert message_id_of("not-a-uuid") == "not-a-uuid"
