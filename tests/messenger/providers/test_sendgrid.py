"""SendGrid v3 Mail Send through the official client against Prism on SendGrid's own spec."""

from __future__ import annotations

import time

import pytest
from python_http_client.exceptions import TooManyRequestsError  # type: ignore[import-untyped]

from services.messenger.providers.base import ProviderError
from services.messenger.providers.sendgrid_api import SendGridProvider, mail_payload, sendgrid_error
from tests.messenger.providers.factories import HEBREW_HTML, UNSUBSCRIBE, email_message
from tests.support.prism import PrismServer

API_KEY = "SG.test-key"


def test_payload_carries_correlation_unsubscribe_and_both_parts() -> None:
    msg = email_message()
    payload = mail_payload(msg)
    [personalization] = payload["personalizations"]
    assert personalization["to"] == [{"email": "dana@example.com", "name": "דנה כהן"}]
    assert personalization["custom_args"] == {"message_id": msg.message_id}
    assert payload["from"] == {"email": "hello@retain.example", "name": "Retain"}
    assert payload["subject"] == "תודה על הקנייה 🎉"
    assert payload["content"] == [
        {"type": "text/plain", "value": msg.text},
        {"type": "text/html", "value": HEBREW_HTML},
    ]
    assert payload["headers"] == {
        "List-Unsubscribe": UNSUBSCRIBE,
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Content-Language": "he-IL",
    }


def test_reserved_headers_are_not_passed() -> None:
    payload = mail_payload(email_message(headers={"Reply-To": "x@y.z", "X-Campaign": "winback"}))
    assert "Reply-To" not in payload["headers"]
    assert payload["headers"]["X-Campaign"] == "winback"


@pytest.mark.integration
async def test_send_is_accepted_by_the_spec(sendgrid_prism: PrismServer) -> None:
    provider = SendGridProvider(API_KEY, host=sendgrid_prism.url)
    msg = email_message()
    result = await provider.send(msg)
    assert result.provider == "sendgrid"
    assert result.status == "queued"
    assert result.raw_status == "202"
    # No X-Message-Id from the mock: our id, which events carry back in custom_args.
    assert result.provider_message_id == msg.message_id
    assert await provider.lookup(msg) is None


@pytest.mark.integration
async def test_plain_text_only_is_accepted(sendgrid_prism: PrismServer) -> None:
    provider = SendGridProvider(API_KEY, host=sendgrid_prism.url)
    result = await provider.send(email_message(html=None, headers={}, to="sara@example.com"))
    assert result.status == "queued"


@pytest.mark.integration
async def test_request_the_spec_rejects_is_permanent(sendgrid_prism: PrismServer) -> None:
    provider = SendGridProvider(API_KEY, host=sendgrid_prism.url)
    with pytest.raises(ProviderError) as caught:
        await provider.send(email_message(to="not-an-address"))  # to.email must be an email
    assert caught.value.code == "400"
    assert caught.value.permanent


@pytest.mark.integration
async def test_server_error_is_retryable(sendgrid_prism: PrismServer) -> None:
    # Prism answers with the spec's 500 response when asked to.
    provider = SendGridProvider(API_KEY, host=sendgrid_prism.url, extra_headers={"Prefer": "code=500"})
    with pytest.raises(ProviderError) as caught:
        await provider.send(email_message())
    assert caught.value.code == "500"
    assert caught.value.retryable


@pytest.mark.integration
async def test_unreachable_host_is_retryable() -> None:
    from tests.support.infra import free_port  # noqa: PLC0415

    provider = SendGridProvider(API_KEY, host=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ProviderError) as caught:
        await provider.send(email_message())
    assert caught.value.code == "network"
    assert caught.value.retryable


def test_rate_limit_maps_to_retry_after() -> None:
    from email.message import Message  # noqa: PLC0415

    headers = Message()
    headers["Retry-After"] = "12"
    err = sendgrid_error(
        TooManyRequestsError(429, "Too Many Requests", b'{"errors":[{"message":"slow"}]}', headers)
    )
    assert err.code == "429"
    assert err.retryable
    assert err.retry_after == 12.0
    assert err.message == "slow"

    reset = Message()
    reset["X-RateLimit-Reset"] = str(int(time.time()) + 30)
    err = sendgrid_error(TooManyRequestsError(429, "Too Many Requests", b"", reset))
    assert err.retry_after is not None
    assert 25 <= err.retry_after <= 31
