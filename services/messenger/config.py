from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from email.utils import parseaddr
from typing import Annotated, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, StringConstraints, field_validator, model_validator

from services.messenger.providers.ratelimit import SenderThroughput
from services.messenger.templates import DEFAULT_PERKS, Brand, content_sid_key, normalize_locale
from shared.config import CommonSettings
from shared.events import Channel, TimeZone, e164

TierPerks = dict[str, dict[str, list[str]]]
_PACE = SenderThroughput()  # Twilio's default throughput per kind of sender
# An approved WhatsApp template's Twilio Content SID.
ContentSid = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^HX[0-9a-fA-F]{32}$")]


# A setting a message shows in one line: what an offer gives, beside the code ("15% הנחה"), a
# tier's name. A newline or another control character would break the message's layout.
OneLine = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40, pattern=r"^[^\x00-\x1f\x7f]+$")
]


# The link secret's default: anyone can read it here, and sign unsubscribe links with it.
DEFAULT_LINK_SECRET = "change-me-in-production"  # noqa: S105 - refused once messages really go


def _sms_sender(value: str) -> str:
    """An SMS sender as Twilio takes one: an E.164 number, a short code, or an alphanumeric
    sender id. (0501234567, a national number, reaches no one from abroad: refused.)"""
    if value.startswith("+"):
        return e164(value)
    # Twilio's alphanumeric sender ids: letters, digits, space, + - _ &; one letter at least.
    if re.fullmatch(r"\d{3,8}", value) or re.fullmatch(r"(?=.*[A-Za-z])[A-Za-z0-9 +\-_&]{1,11}", value):
        return value
    raise ValueError(
        "not a sender Twilio takes: an E.164 number (+ and the country code, e.g. +972521234567), "
        "a short code (3 to 8 digits) or an alphanumeric sender id (up to 11 letters, digits, "
        "spaces or + - _ &, one letter at least)"
    )


def _whatsapp_sender(value: str) -> str:
    """A WhatsApp sender: its E.164 number, written bare or as Twilio names it (whatsapp:+…)."""
    e164(value.removeprefix("whatsapp:"))
    return value


def _paced_sender(value: str) -> str:
    """A key of ``messenger_mps_overrides``: a sender as the limiter names it (rate_for)."""
    if value.startswith("whatsapp:"):
        return _whatsapp_sender(value)
    if "@" in value:  # an email sender, as RETAIN_EMAIL_FROM gives it
        return value
    try:
        return _sms_sender(value)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}; a WhatsApp sender as whatsapp:+…") from exc


SmsSender = Annotated[str, AfterValidator(_sms_sender)]

L = TypeVar("L")


def _by_normalised_locale(values: Mapping[str, L]) -> dict[str, L]:
    """A setting per language keyed as templates look it up, by BCP 47 tag (he-IL → he):
    "he_il" or "EN" must still match."""
    return {normalize_locale(locale): value for locale, value in values.items()}


def _tiers_named(values: Mapping[str, L]) -> Mapping[str, L]:
    """A setting per tier, each tier named."""
    if any(not tier.strip() for tier in values):
        raise ValueError("a tier name is empty")
    return values


WhatsAppSender = Annotated[str, AfterValidator(_whatsapp_sender)]
PacedSender = Annotated[str, AfterValidator(_paced_sender)]


class MessengerSettings(CommonSettings):
    messenger_database_url: str | None = Field(
        default=None, description="Database URL; default sqlite+aiosqlite:///<var_dir>/messenger.db."
    )
    messenger_group_id: str = Field(default="retain-messenger", description="Kafka consumer group.")
    messenger_batch_size: int = Field(default=200, ge=1, le=5000, description="Records per consumed batch.")
    # Checked at start: a channel misspelt here ("mail") failed every decision instead.
    messenger_fallback_order: list[Channel] = Field(
        default=[Channel.EMAIL, Channel.WHATSAPP, Channel.SMS],
        description="Channels tried after the preferred one (email, whatsapp, sms).",
    )
    messenger_default_timezone: TimeZone | None = Field(
        default="Asia/Jerusalem",
        description="IANA zone of a customer whose profile and locale's region name none (quiet "
        "hours, dates in messages): the business's market, as RETAIN_KPI_TIMEZONE's default. "
        "Empty: the language's likely region (he → Asia/Jerusalem, ar → Africa/Cairo), else UTC.",
    )
    messenger_send_concurrency: int = Field(default=16, ge=1, description="Provider calls in flight at once.")
    messenger_sender_interval_s: float = Field(
        default=1.0, gt=0, description="How often the sender looks for due messages."
    )
    messenger_send_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="The longest one message's provider call may take, retries and pacing included; "
        "then it fails (it may have reached the provider: at most once, never twice).",
    )
    messenger_reconcile_after_s: float = Field(
        default=180.0,
        gt=0,
        description="A message still 'sending' after this long is looked up at the provider. Longer "
        "than messenger_send_timeout_s: no sender is still at work on it, only a crashed one left it.",
    )
    messenger_max_attempts: int = Field(default=5, ge=1, description="Provider attempts before 'failed'.")
    messenger_outbox_dir: str | None = Field(
        default=None, description="Sandbox outbox; default <var_dir>/outbox."
    )
    messenger_public_url: str = Field(
        default="http://127.0.0.1:8003", description="Base URL providers call back (status, unsubscribe)."
    )
    messenger_link_secret: SecretStr = Field(
        default=SecretStr(DEFAULT_LINK_SECRET),
        description="Signs unsubscribe and survey links; a secret of your own (not this default) is "
        "required once a real provider is configured.",
    )
    messenger_brand_name: str = Field(
        default="Retain", min_length=1, max_length=60, description="The business's name in every message."
    )
    messenger_support_phone: str = Field(
        default="+972-3-555-0100",
        min_length=1,
        max_length=30,
        description="The support phone number shown in messages, as it should be shown.",
    )
    messenger_complaint_response_hours: int = Field(
        default=4,
        ge=1,
        le=168,
        description="What a complaint acknowledgement promises: an answer within this many hours "
        "(the kpi's first-response target for complaints, RETAIN_KPI_FIRST_RESPONSE_TARGETS_H).",
    )
    messenger_escalation_contact_name: str | None = Field(
        default=None,
        max_length=60,
        description="Who looks after an escalated complaint of a valuable customer, named in its "
        "acknowledgement; unset: the acknowledgement names nobody.",
    )
    messenger_escalation_contact_phone: str | None = Field(
        default=None, max_length=30, description="That person's phone; unset: the support phone."
    )
    messenger_whatsapp_content_sids: dict[str, ContentSid] = Field(
        default_factory=dict,
        description="The approved WhatsApp templates (Twilio Content SIDs) per template and "
        'language, as JSON {"<template>.<language>": "HX…"}, e.g. {"win_back.he": "HX…", '
        '"win_back.ar": "HX…"}: a business-initiated WhatsApp message outside the 24-hour '
        "customer-service window goes with its template's, filled with the template's "
        "content_variables (GET /v1/templates). Without one the message goes on the customer's "
        "next channel. Unset: WhatsApp only inside the window, unless a template override "
        "(PUT /v1/templates) carries an approved template's HX… SID itself.",
    )
    messenger_offer_value: dict[str, OneLine] = Field(
        default_factory=dict,
        description="What the win-back offer gives, per language, as JSON {locale: text}, e.g. "
        '{"he": "15% הנחה", "ar": "خصم 15%", "en": "15% off"}: said beside the code in email, '
        "WhatsApp and (from a sender that takes replies) SMS. A language left out "
        "(and the default, unset, which the start warns of) shows the code alone.",
    )
    messenger_offer_valid_days: int | None = Field(
        default=None,
        ge=1,
        le=365,
        description="The offer's code is good for this many days from the message's decision: its "
        "last day is said beside the code in email and WhatsApp, and is in the sent event's "
        "details (offer_expires_at) for the shop. Unset: no expiry is said.",
    )
    messenger_tier_perks: TierPerks = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_PERKS),
        description="Perks per tier and language, as JSON {tier: {locale: [perk, ...]}}: what "
        "tier_upgrade lists for the new tier. A tier or language left out shows no perks.",
    )
    messenger_tier_names: dict[str, dict[str, OneLine]] = Field(
        default_factory=dict,
        description="The tiers' names as customers read them, per tier and language, as JSON "
        '{tier: {locale: name}}, e.g. {"vip_plus": {"he": "VIP פלוס", "en": "VIP Plus"}}. Unset: '
        "bronze, silver, gold and platinum have names in he, ar and en; another tier reads as its "
        'id spelt out ("Vip Plus") in every language.',
    )
    # Providers: without credentials a channel goes to the sandbox outbox.
    twilio_account_sid: str | None = Field(default=None, description="Twilio account SID (SMS, WhatsApp).")
    twilio_auth_token: SecretStr | None = Field(
        default=None, description="Twilio auth token; also verifies webhooks."
    )
    twilio_sms_from: SmsSender | None = Field(
        default=None,
        description="Sender for SMS: an E.164 number, a short code or an alphanumeric sender id.",
    )
    twilio_whatsapp_from: WhatsAppSender | None = Field(
        default=None, description="Sender number for WhatsApp (E.164)."
    )
    twilio_base_url: str | None = Field(default=None, description="Override Twilio's API base URL (tests).")
    # Twilio's throughput per sender (messages per second): what the sender paces itself to, as
    # Twilio would queue the excess for hours and then fail it (providers/ratelimit.py).
    messenger_mps_long_code: float = Field(
        default=_PACE.long_code, ge=0, description="Per long code (and alphanumeric sender id); 0: unpaced."
    )
    messenger_mps_toll_free: float = Field(default=_PACE.toll_free, ge=0, description="Per toll-free number.")
    messenger_mps_short_code: float = Field(default=_PACE.short_code, ge=0, description="Per short code.")
    messenger_mps_whatsapp: float = Field(default=_PACE.whatsapp, ge=0, description="Per WhatsApp sender.")
    messenger_mps_email: float = Field(default=_PACE.email, ge=0, description="Per email sender; 0: unpaced.")
    messenger_mps_overrides: dict[PacedSender, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description='Senders with their own rate, as JSON {"+15017122661": 10}: an upgraded long '
        'code; a WhatsApp sender as "whatsapp:+1…".',
    )
    smtp_host: str | None = Field(default=None, description="SMTP server for email.")
    smtp_port: int = Field(default=587, description="SMTP port.")
    smtp_username: str | None = Field(default=None, description="SMTP user.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password.")
    smtp_starttls: bool = Field(default=True, description="Use STARTTLS.")
    email_from: str = Field(default="Retain <hello@retain.example>", description="From address of email.")
    sendgrid_api_key: SecretStr | None = Field(
        default=None, description="SendGrid API key (used when no SMTP host)."
    )
    sendgrid_host: str | None = Field(default=None, description="Override SendGrid's API host (tests).")
    sendgrid_webhook_public_key: str | None = Field(
        default=None, description="SendGrid event webhook verification key (base64 ECDSA public key)."
    )
    sendgrid_webhook_tolerance_s: int = Field(
        default=600,
        ge=1,
        le=86_400,
        description="How far a SendGrid webhook's signed timestamp may be from now, in seconds; "
        "older (or replayed) deliveries are refused with 403.",
    )

    @field_validator("messenger_default_timezone", mode="before")
    @classmethod
    def _empty_zone_is_none(cls, value: object) -> object:
        # RETAIN_MESSENGER_DEFAULT_TIMEZONE= (empty): no business zone; the language's region.
        return None if value == "" else value

    @field_validator("messenger_public_url")
    @classmethod
    def _absolute_url(cls, url: str) -> str:
        # Every unsubscribe and survey link, and Twilio's status callback, start with it.
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an absolute http(s) URL, e.g. https://retain.shop.example")
        return url

    @field_validator("email_from")
    @classmethod
    def _an_address(cls, value: str) -> str:
        _, address = parseaddr(value)
        if "@" not in address or address.startswith("@") or address.endswith("@"):
            raise ValueError(f"{value!r} has no email address, e.g. Retain <hello@shop.example>")
        return value

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _a_public_key(cls, key: str | None) -> str | None:
        # Unparsable, it refused every event SendGrid sent (403), bounces and spam reports too.
        if key is not None:
            # Here, not at the top: every service reads these settings' names at start.
            from sendgrid.helpers.eventwebhook import EventWebhook  # type: ignore[import-untyped]  # noqa: PLC0415

            try:
                EventWebhook().convert_public_key_to_ecdsa(key)
            except Exception as exc:
                raise ValueError(
                    "not a SendGrid verification key (the base64 public key of the Event Webhook's "
                    f"signature settings): {exc}"
                ) from exc
        return key

    @model_validator(mode="after")
    def _twilio_whole_or_not_at_all(self) -> Self:
        # Partly configured, the channels went to the sandbox outbox, recorded as sent.
        senders = self.twilio_sms_from or self.twilio_whatsapp_from
        if self.twilio_account_sid or senders:
            missing = [
                name
                for name, value in (
                    ("RETAIN_TWILIO_ACCOUNT_SID", self.twilio_account_sid),
                    ("RETAIN_TWILIO_AUTH_TOKEN", self.twilio_auth_token),
                    ("RETAIN_TWILIO_SMS_FROM or RETAIN_TWILIO_WHATSAPP_FROM", senders),
                )
                if not value
            ]
            if missing:
                raise ValueError(
                    f"Twilio is partly configured: {', '.join(missing)} missing (all of them, or none "
                    "for the sandbox outbox)"
                )
        return self

    @model_validator(mode="after")
    def _a_secret_of_our_own_for_real_messages(self) -> Self:
        if self.live_providers and self.messenger_link_secret.get_secret_value() == DEFAULT_LINK_SECRET:
            raise ValueError(
                "RETAIN_MESSENGER_LINK_SECRET is the published default while messages really go "
                f"({', '.join(self.live_providers)}): anyone could sign an unsubscribe link; set a secret"
            )
        return self

    @property
    def live_providers(self) -> list[str]:
        """The providers configured to reach customers (none: the sandbox outbox)."""
        live = []
        if self.twilio_account_sid:
            live.append("Twilio")
        if self.smtp_host:
            live.append("SMTP")
        elif self.sendgrid_api_key:
            live.append("SendGrid")
        return live

    @property
    def sms_takes_replies(self) -> bool:
        """Whether a customer can answer our SMS: not from an alphanumeric sender id (one-way);
        a number or a short code takes them, and the sandbox (no sender) is written as if."""
        sender = self.twilio_sms_from
        return sender is None or sender.startswith("+") or sender.isdigit()

    @property
    def live_channels(self) -> frozenset[Channel]:
        """The channels a real provider serves (the registry builds them from this); the others
        go to the sandbox outbox. Twilio is configured whole or not at all (checked above)."""
        live: set[Channel] = set()
        if self.twilio_account_sid and self.twilio_sms_from:
            live.add(Channel.SMS)
        if self.twilio_account_sid and self.twilio_whatsapp_from:
            live.add(Channel.WHATSAPP)
        if self.smtp_host or self.sendgrid_api_key:
            live.add(Channel.EMAIL)
        return frozenset(live)

    @property
    def sandboxed_last(self) -> frozenset[Channel]:
        """The channels tried after every other: those without a provider while others have
        one. A customer who prefers SMS where only email really goes is written to by email,
        not recorded as sent on an SMS nobody receives; with no other channel left, the sandbox
        still takes it (as the start warning says). Empty when nothing really goes: a sandbox
        deployment decides as a live one would."""
        live = self.live_channels
        return frozenset(set(Channel) - live) if live else frozenset()

    @model_validator(mode="after")
    def _reconcile_after_the_longest_call(self) -> Self:
        # Sooner, one sender's reconciliation would queue again a message another sender (or
        # its own pass) is still sending, slowly, and it would go twice.
        if self.messenger_reconcile_after_s <= self.messenger_send_timeout_s:
            raise ValueError(
                f"messenger_reconcile_after_s ({self.messenger_reconcile_after_s:g}) must be longer than "
                f"messenger_send_timeout_s ({self.messenger_send_timeout_s:g})"
            )
        return self

    @property
    def brand(self) -> Brand:
        """The business as its messages name it."""
        return Brand(
            self.messenger_brand_name, self.messenger_support_phone, self.messenger_complaint_response_hours
        )

    @field_validator("messenger_whatsapp_content_sids")
    @classmethod
    def _content_sids_by_template_and_language(cls, sids: dict[str, str]) -> dict[str, str]:
        # As the templates' placeholders name them (config:win_back.he): "win_back.HE" and
        # "win_back.he_il" must still match.
        out: dict[str, str] = {}
        for key, sid in sids.items():
            normal = content_sid_key(key)
            if normal in out and out[normal] != sid:
                raise ValueError(f"{key!r} and another key are both {normal!r}, with different SIDs")
            out[normal] = sid
        return out

    @field_validator("messenger_offer_value")
    @classmethod
    def _offer_by_normalised_locale(cls, values: dict[str, str]) -> dict[str, str]:
        return _by_normalised_locale(values)

    @field_validator("messenger_tier_names")
    @classmethod
    def _tier_names_by_normalised_locale(cls, names: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {tier: _by_normalised_locale(per_locale) for tier, per_locale in _tiers_named(names).items()}

    @field_validator("messenger_tier_perks")
    @classmethod
    def _perks_by_normalised_locale(cls, perks: TierPerks) -> TierPerks:
        out: TierPerks = {}
        for tier, per_locale in _tiers_named(perks).items():
            stripped: dict[str, list[str]] = {}
            for locale, items in per_locale.items():
                if any(not item.strip() for item in items):
                    raise ValueError(f"an empty perk for tier {tier!r} in {locale!r}")
                stripped[locale] = [item.strip() for item in items]
            out[tier] = _by_normalised_locale(stripped)
        return out

    @property
    def database_url(self) -> str:
        return self.messenger_database_url or self.sqlite_url("messenger")

    @property
    def outbox_dir(self) -> str:
        return self.messenger_outbox_dir or str(self.var_dir / "outbox")
