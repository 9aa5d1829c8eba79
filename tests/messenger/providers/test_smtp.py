"""SMTP end to end: aiosmtplib → a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import random

import pytest

from services.messenger.providers.base import ProviderError
from services.messenger.providers.mime import email_bytes
from services.messenger.providers.retry import send_with_retry
from services.messenger.providers.smtp import SmtpProvider
from tests.messenger.conftest import SmtpServer
from tests.messenger.providers.factories import ARABIC_HTML, HEBREW_HTML, UNSUBSCRIBE, email_message

pytestmark = pytest.mark.integration


def provider_for(server: SmtpServer) -> SmtpProvider:
    # aiosmtpd here offers no STARTTLS; production settings require it (smtp_starttls=True).
    return SmtpProvider(server.host, server.port, start_tls=False, timeout=10)


async def test_email_arrives_with_headers_encoding_and_unsubscribe(smtp_server: SmtpServer) -> None:
    provider = provider_for(smtp_server)
    msg = email_message()
    try:
        result = await provider.send(msg)
    finally:
        await provider.close()

    assert result.provider == "smtp"
    assert result.status == "sent"
    assert result.provider_message_id == f"<{msg.message_id}@retain>"
    assert "queued" in result.raw_status

    [mail] = smtp_server.handler.with_message_id(f"<{msg.message_id}@retain>")
    assert mail.mail_from == "hello@retain.example"
    assert mail.rcpt_tos == ["dana@example.com"]
    assert mail.data.replace(b"\r\n", b"\n") == email_bytes(msg).replace(b"\r\n", b"\n")  # the outbox's bytes
    mail.data.decode("ascii")  # 7-bit clean on the wire
    eml = mail.parsed()
    assert eml["Subject"] == "תודה על הקנייה 🎉"
    assert eml["To"].addresses[0].display_name == "דנה כהן"
    assert eml["List-Unsubscribe"] == UNSUBSCRIBE
    assert eml["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert eml["Content-Language"] == "he-IL"
    plain, html = eml.iter_parts()
    assert plain.get_content_charset() == html.get_content_charset() == "utf-8"
    assert plain.get_content().replace("\r\n", "\n").strip() == msg.text
    assert html.get_content().replace("\r\n", "\n").strip() == HEBREW_HTML


async def test_resend_after_a_crash_carries_the_same_message_id(smtp_server: SmtpServer) -> None:
    """SMTP can't be asked (lookup is None); a resend is recognisable: same Message-ID, same bytes."""
    msg = email_message(to="sara@example.com", subject="شكراً لك", text="مرحباً سارة", html=ARABIC_HTML)
    first, second = provider_for(smtp_server), provider_for(smtp_server)  # before and after a restart
    try:
        assert await first.lookup(msg) is None
        await first.send(msg)
        await second.send(msg)
    finally:
        await first.close()
        await second.close()

    copies = smtp_server.handler.with_message_id(f"<{msg.message_id}@retain>")
    assert len(copies) == 2
    assert copies[0].data == copies[1].data
    assert len({c.parsed()["Message-ID"] for c in copies}) == 1  # what a receiver dedupes on


async def test_connections_are_reused(smtp_server: SmtpServer) -> None:
    provider = provider_for(smtp_server)
    try:
        for _ in range(5):
            await provider.send(email_message(to="reuse@example.com"))
        assert len(provider._idle) == 1  # one connection served all five
    finally:
        await provider.close()


async def test_unknown_mailbox_is_permanent_and_suppresses(smtp_server: SmtpServer) -> None:
    provider = provider_for(smtp_server)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(email_message(to="unknown-user@example.com"))
        assert caught.value.code == "550"
        assert caught.value.permanent
        assert caught.value.suppress_address
        # The connection stays usable after a refused recipient.
        await provider.send(email_message(to="after-refusal@example.com"))
    finally:
        await provider.close()


async def test_temporary_refusal_is_retryable(smtp_server: SmtpServer) -> None:
    provider = provider_for(smtp_server)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(email_message(to="busy@example.com"))
    finally:
        await provider.close()
    assert caught.value.code == "451"
    assert caught.value.retryable
    assert not caught.value.suppress_address


async def test_greylisting_is_ridden_out_by_send_with_retry(smtp_server: SmtpServer) -> None:
    provider = provider_for(smtp_server)
    msg = email_message(to=f"flaky-{random.randrange(10**9)}@example.com")
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    try:
        result = await send_with_retry(provider, msg, sleep=sleep, rng=random.Random(1))
    finally:
        await provider.close()
    assert result.status == "sent"
    assert len(sleeps) == 1
    assert len(smtp_server.handler.with_message_id(f"<{msg.message_id}@retain>")) == 1


async def test_unreachable_server_is_retryable() -> None:
    from tests.support.infra import free_port  # noqa: PLC0415

    provider = SmtpProvider("127.0.0.1", free_port(), start_tls=False, timeout=2)
    with pytest.raises(ProviderError) as caught:
        await provider.send(email_message())
    assert caught.value.code == "network"
    assert caught.value.retryable
    assert not caught.value.maybe_delivered  # the connection never opened
