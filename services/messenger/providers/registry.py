"""Which provider each channel uses, from the settings: real ones where credentials exist.

- sms / whatsapp: Twilio with an account SID, auth token and that channel's sender number;
- email: SMTP when an SMTP host is set, else SendGrid when an API key is set;
- anything else: the sandbox outbox (``var/outbox/``), so nothing pretends to have sent.

The choice is logged once, when the providers are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from pydantic import SecretStr

from services.messenger.providers.base import Provider
from services.messenger.providers.outbox import OutboxProvider
from services.messenger.providers.ratelimit import SenderRateLimiter, SenderThroughput
from services.messenger.providers.sendgrid_api import SendGridProvider
from services.messenger.providers.smtp import SmtpProvider
from services.messenger.providers.twilio_sms import TwilioProvider
from shared.events import Channel
from shared.logs import get_logger

if TYPE_CHECKING:
    from services.messenger.config import MessengerSettings

log = get_logger(__name__)
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

SANDBOX_SENDER = "Retain"
STATUS_CALLBACK_PATH = "/webhooks/twilio/status"


class ProviderSettings(Protocol):
    """The settings the registry reads (``MessengerSettings`` has them all)."""

    @property
    def twilio_account_sid(self) -> str | None: ...
    @property
    def twilio_auth_token(self) -> SecretStr | str | None: ...
    @property
    def twilio_sms_from(self) -> str | None: ...
    @property
    def twilio_whatsapp_from(self) -> str | None: ...
    @property
    def twilio_base_url(self) -> str | None: ...
    @property
    def smtp_host(self) -> str | None: ...
    @property
    def smtp_port(self) -> int: ...
    @property
    def smtp_username(self) -> str | None: ...
    @property
    def smtp_password(self) -> SecretStr | str | None: ...
    @property
    def smtp_starttls(self) -> bool: ...
    @property
    def email_from(self) -> str: ...
    @property
    def live_channels(self) -> frozenset[Channel]: ...
    @property
    def sendgrid_api_key(self) -> SecretStr | str | None: ...
    @property
    def sendgrid_host(self) -> str | None: ...
    @property
    def messenger_public_url(self) -> str: ...
    @property
    def outbox_dir(self) -> str: ...


def _secret(value: SecretStr | str | None) -> str | None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value or None


def default_senders(settings: ProviderSettings) -> dict[Channel, str]:
    """The ``from_`` of each channel's messages."""
    return {
        Channel.EMAIL: settings.email_from,
        Channel.SMS: settings.twilio_sms_from or SANDBOX_SENDER,
        Channel.WHATSAPP: settings.twilio_whatsapp_from or SANDBOX_SENDER,
    }


def build_limiter(settings: MessengerSettings) -> SenderRateLimiter:
    """Per-sender pacing from the ``messenger_mps_*`` settings."""
    return SenderRateLimiter(SenderThroughput.from_settings(settings))


def build_providers(settings: ProviderSettings) -> dict[Channel, Provider]:
    outbox = OutboxProvider(settings.outbox_dir)
    providers: dict[Channel, Provider] = dict.fromkeys(Channel, outbox)

    # The channels the settings say really go: the consumer's decisions try the others last
    # (``sandboxed_last``), so what is built here must be exactly those.
    live = settings.live_channels
    sid, token = settings.twilio_account_sid, _secret(settings.twilio_auth_token)
    twilio_channels = live & {Channel.SMS, Channel.WHATSAPP}
    if twilio_channels and sid and token:  # both set: Twilio is configured whole or refused
        twilio = TwilioProvider(
            sid,
            token,
            base_url=settings.twilio_base_url,
            status_callback=settings.messenger_public_url.rstrip("/") + STATUS_CALLBACK_PATH,
        )
        for channel in twilio_channels:
            providers[channel] = twilio

    if Channel.EMAIL in live:
        providers[Channel.EMAIL] = _email_provider(settings)

    log.info(
        "messenger_providers",
        **{channel.value: describe(p) for channel, p in providers.items()},
    )
    sandboxed = sorted(c.value for c, p in providers.items() if isinstance(p, OutboxProvider))
    if live and sandboxed:
        log.warning(
            "some channels go to the sandbox outbox while others really go: they are tried after "
            "every other channel, and a customer reachable on none of the others is recorded as "
            "sent there and reached by no one; configure a provider for them",
            channels=sandboxed,
        )
    if live and urlsplit(settings.messenger_public_url).hostname in LOOPBACK:
        # A warning, not a refusal: a staging provider on this host is legitimate.
        log.warning(
            "messenger_public_url is this host's own address while messages really go: the "
            "unsubscribe and survey links in them, and Twilio's status callbacks, reach no one",
            messenger_public_url=settings.messenger_public_url,
        )
    return providers


def _email_provider(settings: ProviderSettings) -> Provider:
    """SMTP when a host is set, else SendGrid (``live_channels`` has email only with one)."""
    if settings.smtp_host:
        port = settings.smtp_port
        return SmtpProvider(
            settings.smtp_host,
            port,
            username=settings.smtp_username,
            password=_secret(settings.smtp_password),
            # 465 is implicit TLS; elsewhere smtp_starttls requires STARTTLS, or never uses it.
            use_tls=port == 465,
            start_tls=settings.smtp_starttls,
        )
    key = _secret(settings.sendgrid_api_key)
    if key is None:  # pragma: no cover - live_channels has email only with a host or a key
        raise ValueError("email has no provider configured")
    return SendGridProvider(key, host=settings.sendgrid_host)


def describe(provider: Provider) -> str:
    if isinstance(provider, OutboxProvider):
        return f"sandbox outbox {provider.directory} (no credentials: nothing leaves this host)"
    if isinstance(provider, SmtpProvider):
        return f"smtp {provider.host}:{provider.port}"
    if isinstance(provider, TwilioProvider):
        return f"twilio {provider.base_url or 'api.twilio.com'}"
    return provider.name


async def close_providers(providers: dict[Channel, Provider]) -> None:
    """Close each distinct provider once (one Twilio client serves SMS and WhatsApp)."""
    seen: set[int] = set()
    for provider in providers.values():
        if id(provider) not in seen:
            seen.add(id(provider))
            await provider.close()
