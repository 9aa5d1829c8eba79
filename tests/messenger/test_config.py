"""The messenger's settings: what an operator gets wrong is refused at start, naming it, rather
than found at the first message (or never: a channel quietly in the sandbox)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from services.messenger.config import MessengerSettings

SID = "AC" + "0" * 32
SECRET = SecretStr("a-secret-of-our-own")
# A P-256 public key in the form SendGrid's Event Webhook settings show it.
SENDGRID_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3G"
    "Rqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)


def refused(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        MessengerSettings(**values)
    return str(caught.value)


def test_twilio_is_configured_whole_or_not_at_all() -> None:
    """Partly configured, every channel went to the sandbox outbox, each message recorded as
    sent: refused, naming what is missing. A token alone (verifying webhooks) is whole."""
    assert "RETAIN_TWILIO_AUTH_TOKEN missing" in refused(
        twilio_account_sid=SID, twilio_sms_from="+15005550006"
    )
    assert "RETAIN_TWILIO_SMS_FROM or RETAIN_TWILIO_WHATSAPP_FROM missing" in refused(
        twilio_account_sid=SID, twilio_auth_token=SecretStr("t"), messenger_link_secret=SECRET
    )
    assert "RETAIN_TWILIO_ACCOUNT_SID" in refused(twilio_whatsapp_from="+14155238886")
    MessengerSettings(twilio_auth_token=SecretStr("t"))
    whole = MessengerSettings(
        twilio_account_sid=SID,
        twilio_auth_token=SecretStr("t"),
        twilio_sms_from="Retain",
        messenger_link_secret=SECRET,
    )
    assert whole.live_providers == ["Twilio"]


def test_real_messages_need_a_link_secret_of_our_own() -> None:
    for live in ({"smtp_host": "mail.example.com"}, {"sendgrid_api_key": SecretStr("SG.x")}):
        assert "RETAIN_MESSENGER_LINK_SECRET is the published default" in refused(**live)
        assert MessengerSettings(**live, messenger_link_secret=SECRET).live_providers
    assert MessengerSettings(messenger_link_secret=SecretStr("devsecret")).live_providers == []
    assert MessengerSettings().live_providers == []  # the sandbox: the default secret will do


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"twilio_sms_from": "0501234567"}, "not a sender Twilio takes"),
        ({"twilio_whatsapp_from": "whatsapp:14155238886"}, "not an E.164 phone number"),
        ({"messenger_mps_overrides": {"15017122661": 10}}, "'15017122661': not a sender Twilio takes"),
        ({"messenger_mps_overrides": {"+1 501 712 2661": 10}}, "not a valid E.164 phone number"),
        ({"messenger_mps_overrides": {"whatsapp:14155238886": 80}}, "not an E.164 phone number"),
        ({"messenger_public_url": "shop.example"}, "not an absolute http(s) URL"),
        ({"email_from": "not an address"}, "has no email address"),
        ({"sendgrid_webhook_public_key": "not-a-key"}, "not a SendGrid verification key"),
    ],
)
def test_a_malformed_setting_is_refused_naming_it(values: dict[str, Any], words: str) -> None:
    message = refused(**values)
    assert next(iter(values)) in message
    assert re.search(re.escape(words), message), message


def test_well_formed_senders_and_keys_are_taken() -> None:
    s = MessengerSettings(
        twilio_account_sid=SID,
        twilio_auth_token=SecretStr("t"),
        twilio_sms_from="My-Shop_IL",  # Twilio's alphanumeric sender ids take + - _ &
        twilio_whatsapp_from="whatsapp:+14155238886",  # as Twilio's console writes it
        messenger_link_secret=SECRET,
        messenger_mps_overrides={
            "+15017122661": 10,
            "whatsapp:+14155238886": 80,
            "55555": 100,
            "hello@x.example": 5,
        },
        messenger_public_url="https://retain.shop.example",
        email_from="Shop <hello@shop.example>",
        sendgrid_webhook_public_key=SENDGRID_KEY,
    )
    assert s.messenger_mps_overrides["55555"] == 100
    assert MessengerSettings(messenger_default_timezone="").messenger_default_timezone is None
    assert MessengerSettings().messenger_default_timezone == "Asia/Jerusalem"
