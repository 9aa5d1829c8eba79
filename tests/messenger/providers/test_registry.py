"""Which provider each channel gets: credentials decide, the sandbox outbox is the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.messenger.config import MessengerSettings
from services.messenger.providers import registry
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.providers.registry import (
    build_limiter,
    build_providers,
    close_providers,
    default_senders,
)
from services.messenger.providers.sendgrid_api import SendGridProvider
from services.messenger.providers.smtp import SmtpProvider
from services.messenger.providers.twilio_sms import TwilioProvider
from shared.events import Channel
from tests.support.logs import WarningRecorder

NO_CREDENTIALS: dict[str, Any] = {
    "twilio_account_sid": None,
    "twilio_auth_token": None,
    "twilio_sms_from": None,
    "twilio_whatsapp_from": None,
    "twilio_base_url": None,
    "smtp_host": None,
    "sendgrid_api_key": None,
    "sendgrid_host": None,
}


def settings(tmp_path: Path, **overrides: Any) -> MessengerSettings:
    secret = {"messenger_link_secret": SecretStr("registry-test-link-secret")}
    return MessengerSettings(var_dir=tmp_path, **{**NO_CREDENTIALS, **secret, **overrides})


async def test_without_credentials_everything_goes_to_the_outbox(tmp_path: Path) -> None:
    providers = build_providers(settings(tmp_path))
    assert set(providers) == set(Channel)
    assert all(isinstance(p, OutboxProvider) for p in providers.values())
    outbox = providers[Channel.EMAIL]
    assert isinstance(outbox, OutboxProvider)
    assert outbox.directory == tmp_path / "outbox"
    await close_providers(providers)


async def test_twilio_for_the_channels_it_has_a_sender_for(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        twilio_account_sid="AC" + "0" * 32,
        twilio_auth_token=SecretStr("token"),
        twilio_sms_from="+15005550006",
        twilio_base_url="http://127.0.0.1:4010",
        messenger_public_url="https://retain.example/",
    )
    providers = build_providers(s)
    twilio = providers[Channel.SMS]
    assert isinstance(twilio, TwilioProvider)
    assert twilio.base_url == "http://127.0.0.1:4010"
    assert twilio.status_callback == "https://retain.example/webhooks/twilio/status"
    assert isinstance(providers[Channel.WHATSAPP], OutboxProvider)  # no WhatsApp sender
    assert isinstance(providers[Channel.EMAIL], OutboxProvider)
    await close_providers(providers)


async def test_one_twilio_client_serves_sms_and_whatsapp(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        twilio_account_sid="AC" + "0" * 32,
        twilio_auth_token=SecretStr("token"),
        twilio_sms_from="+15005550006",
        twilio_whatsapp_from="+14155238886",
    )
    providers = build_providers(s)
    assert providers[Channel.SMS] is providers[Channel.WHATSAPP]
    assert default_senders(s) == {
        Channel.EMAIL: "Retain <hello@retain.example>",
        Channel.SMS: "+15005550006",
        Channel.WHATSAPP: "+14155238886",
    }
    await close_providers(providers)


async def test_a_token_alone_verifies_webhooks_and_sends_nothing(tmp_path: Path) -> None:
    s = settings(tmp_path, twilio_auth_token=SecretStr("token"))
    providers = build_providers(s)
    assert isinstance(providers[Channel.SMS], OutboxProvider)
    assert default_senders(s)[Channel.SMS] == "Retain"


async def test_smtp_wins_over_sendgrid(tmp_path: Path) -> None:
    s = settings(tmp_path, smtp_host="mail.example.com", smtp_port=465, sendgrid_api_key=SecretStr("SG.x"))
    providers = build_providers(s)
    smtp = providers[Channel.EMAIL]
    assert isinstance(smtp, SmtpProvider)
    assert (smtp.host, smtp.port) == ("mail.example.com", 465)
    await close_providers(providers)


async def test_sendgrid_without_smtp(tmp_path: Path) -> None:
    providers = build_providers(settings(tmp_path, sendgrid_api_key=SecretStr("SG.x")))
    assert isinstance(providers[Channel.EMAIL], SendGridProvider)
    assert isinstance(providers[Channel.SMS], OutboxProvider)


async def test_real_messages_with_links_to_this_host_are_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = WarningRecorder()
    monkeypatch.setattr(registry, "log", recorder)
    await close_providers(build_providers(settings(tmp_path)))  # the sandbox: no one to reach
    assert recorder.warnings == []
    public = build_providers(
        settings(tmp_path, smtp_host="mail.example.com", messenger_public_url="https://r.example")
    )
    await close_providers(public)
    [(event, fields)] = recorder.warnings  # SMS and WhatsApp: "sent" into the outbox
    assert "tried after every other channel" in event
    assert fields == {"channels": ["sms", "whatsapp"]}
    await close_providers(build_providers(settings(tmp_path, smtp_host="mail.example.com")))
    event, fields = recorder.warnings[-1]
    assert "links in them, and Twilio's status callbacks, reach no one" in event
    assert fields == {"messenger_public_url": "http://127.0.0.1:8003"}


TWILIO: dict[str, Any] = {"twilio_account_sid": "AC" + "0" * 32, "twilio_auth_token": SecretStr("token")}


@pytest.mark.parametrize(
    ("overrides", "live"),
    [
        ({}, set()),
        ({"smtp_host": "mail.example.com"}, {Channel.EMAIL}),
        ({"sendgrid_api_key": SecretStr("SG.x")}, {Channel.EMAIL}),
        ({**TWILIO, "twilio_sms_from": "+15005550006"}, {Channel.SMS}),
        ({**TWILIO, "twilio_whatsapp_from": "+15005550006"}, {Channel.WHATSAPP}),
        (
            {**TWILIO, "twilio_sms_from": "Retain", "twilio_whatsapp_from": "+15005550006", "smtp_host": "m"},
            set(Channel),
        ),
    ],
)
async def test_the_channels_built_live_are_those_decisions_try_first(
    tmp_path: Path, overrides: dict[str, Any], live: set[Channel]
) -> None:
    s = settings(tmp_path, messenger_public_url="https://r.example", **overrides)
    providers = build_providers(s)
    await close_providers(providers)
    assert {c for c, p in providers.items() if not isinstance(p, OutboxProvider)} == live
    assert s.live_channels == live
    # The consumer's decisions try the sandboxed ones last, unless nothing really goes.
    assert s.sandboxed_last == (set(Channel) - live if live else set())


def test_limiter_defaults(tmp_path: Path) -> None:
    limiter = build_limiter(settings(tmp_path))
    assert limiter.throughput.rate_for("+15005550006", Channel.SMS) == 1.0
    assert limiter.throughput.rate_for("+14155238886", Channel.WHATSAPP) == 80.0
