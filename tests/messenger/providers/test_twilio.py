"""Twilio SMS and WhatsApp through the official client against Prism on Twilio's own spec.

Prism answers a request the spec rejects with an error response, so every successful send
here is a request shaped the way Twilio's API describes it, and the rejection tests prove
that Prism is really validating.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException

from services.messenger.providers.base import ProviderError
from services.messenger.providers.twilio_sms import TwilioProvider, match_message, twilio_error
from tests.messenger.providers.factories import sms_message, whatsapp_message
from tests.support.infra import free_port
from tests.support.prism import PrismServer

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
STATUS_CALLBACK = "http://127.0.0.1:8003/webhooks/twilio/status"
CONTENT_SID = "HX" + "0123456789abcdef" * 2


@pytest.fixture
async def twilio(twilio_prism: PrismServer) -> AsyncIterator[TwilioProvider]:
    provider = TwilioProvider(
        ACCOUNT_SID, AUTH_TOKEN, base_url=twilio_prism.url, status_callback=STATUS_CALLBACK
    )
    yield provider
    await provider.close()


# --- sends through Prism ---------------------------------------------------------------------


@pytest.mark.integration
async def test_sms_send(twilio: TwilioProvider) -> None:
    result = await twilio.send(sms_message(text="שלום דנה! קוד ההנחה שלך: SAVE10", locale="he-IL"))
    assert result.provider == "twilio"
    assert result.provider_message_id.startswith("SM")
    assert result.status == "queued"
    assert result.raw_status == "queued"


@pytest.mark.integration
async def test_whatsapp_free_form(twilio: TwilioProvider) -> None:
    result = await twilio.send(whatsapp_message(text="Thanks for your reply! Here is your code: SAVE10"))
    assert result.provider_message_id.startswith("SM")


@pytest.mark.integration
async def test_whatsapp_template(twilio: TwilioProvider) -> None:
    msg = whatsapp_message(content_sid=CONTENT_SID, content_variables={"1": "דנה", "2": "SAVE10"})
    result = await twilio.send(msg)
    assert result.status == "queued"


@pytest.mark.integration
async def test_request_the_spec_rejects_is_a_provider_error(twilio: TwilioProvider) -> None:
    # ContentSid must match ^HX[0-9a-fA-F]{32}$.
    with pytest.raises(ProviderError) as caught:
        await twilio.send(whatsapp_message(content_sid="HX-not-a-content-sid"))
    assert caught.value.code == "422"
    assert caught.value.permanent


@pytest.mark.integration
async def test_bad_account_sid_is_rejected(twilio_prism: PrismServer) -> None:
    provider = TwilioProvider("ACnot-a-sid", AUTH_TOKEN, base_url=twilio_prism.url)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(sms_message())
    finally:
        await provider.close()
    assert caught.value.code == "422"
    assert caught.value.permanent
    assert not caught.value.suppress_address


@pytest.mark.integration
async def test_missing_credentials_are_rejected(twilio_prism: PrismServer) -> None:
    provider = TwilioProvider(ACCOUNT_SID, "", base_url=twilio_prism.url)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(sms_message())
    finally:
        await provider.close()
    assert caught.value.code == "401"
    assert caught.value.permanent


# --- lookup (reconciliation) through Prism -----------------------------------------------------
# Prism answers the list with the spec's example page: an outbound "testing" from +12019235161
# to +18182008801 created 2019-05-24 17:44:46Z, and an inbound message between the same numbers.


@pytest.mark.integration
async def test_lookup_finds_the_message_sent_before_a_crash(twilio: TwilioProvider) -> None:
    msg = sms_message(
        to="+18182008801",
        from_="+12019235161",
        text="testing",
        created_at=datetime(2019, 5, 24, 17, 44, 45, tzinfo=UTC),
    )
    found = await twilio.lookup(msg)
    assert found is not None
    assert found.provider_message_id == "SMded05904ccb347238880ca9264e8fe1c"
    assert found.status == "sent"
    assert found.raw_status == "sent"


@pytest.mark.integration
async def test_lookup_does_not_settle_on_another_message(twilio: TwilioProvider) -> None:
    at = datetime(2019, 5, 24, 17, 44, 45, tzinfo=UTC)
    base = {"to": "+18182008801", "from_": "+12019235161", "created_at": at}
    assert await twilio.lookup(sms_message(**base, text="a different body")) is None
    assert await twilio.lookup(sms_message(**base, text="look mom I have media!")) is None  # inbound
    later = {**base, "created_at": datetime(2019, 5, 25, tzinfo=UTC)}
    assert await twilio.lookup(sms_message(**later, text="testing")) is None  # sent before ours existed


@dataclass
class FakeTwilioMessage:
    sid: str
    to: str
    from_: str
    body: str
    status: str = "sent"
    direction: str = "outbound-api"
    date_created: datetime | None = datetime(2026, 3, 15, 9, 30, 13, tzinfo=UTC)


def test_match_whatsapp_template_by_its_variables() -> None:
    msg = whatsapp_message(content_sid=CONTENT_SID, content_variables={"1": "Dana", "2": "SAVE10"})
    to, from_ = f"whatsapp:{msg.to}", f"whatsapp:{msg.from_}"
    rendered = FakeTwilioMessage("SM1", to, from_, "Hi Dana, welcome back! Use SAVE10 by Friday.")
    other = FakeTwilioMessage("SM2", to, from_, "Hi Dana, your order shipped.")
    assert match_message(msg, [other, rendered]) is rendered
    assert match_message(msg, [other]) is None


def test_match_prefers_the_earliest_and_tolerates_smart_punctuation() -> None:
    msg = sms_message(text='Your "code" is SAVE10 - enjoy')
    early = FakeTwilioMessage("SM1", msg.to, msg.from_, "Your “code” is SAVE10 – enjoy")
    late = FakeTwilioMessage(
        "SM2", msg.to, msg.from_, msg.text, date_created=datetime(2026, 3, 15, 9, 31, tzinfo=UTC)
    )
    assert match_message(msg, [late, early]) is early


# --- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "permanent", "suppress"),
    [
        (400, 21211, True, True),  # invalid To
        (400, 21610, True, True),  # recipient replied STOP
        (400, 21614, True, True),  # not a mobile number
        (400, 63016, True, False),  # free-form WhatsApp outside the 24-hour window
        (400, 21408, True, False),  # region not enabled: permanent, the address is fine
        (401, 20003, True, False),
        (429, 20429, False, False),
        (500, 20500, False, False),
        (503, 503, False, False),
    ],
)
def test_error_mapping(status: int, code: int, permanent: bool, suppress: bool) -> None:
    err = twilio_error(TwilioRestException(status, "/Messages.json", "nope", code=code, method="POST"), None)
    assert err.code == str(code)
    assert err.permanent is permanent
    assert err.suppress_address is suppress
    assert err.maybe_delivered is (status >= 500)


def test_error_mapping_of_service_and_bare_exceptions() -> None:
    service = TwilioServiceException("https://x", "Too Many Requests", 429, 20429)
    assert twilio_error(service, 3.0).retry_after == 3.0
    assert twilio_error(service, 3.0).retryable
    bare = TwilioException("Unable to fetch page", None)
    assert twilio_error(bare, None).retryable


# --- Retry-After ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def messages_endpoint(create: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """A stand-in for Twilio's Messages endpoint answering with ``create``; its base URL."""
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", create)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def throttling_server() -> AsyncIterator[str]:
    """Twilio's 429 answer (documented, but absent from the OpenAPI spec, so Prism can't send it):
    a JSON error with code 20429 and a Retry-After header."""

    async def create(request: web.Request) -> web.Response:
        body = {"code": 20429, "message": "Too Many Requests", "more_info": "", "status": 429}
        return web.json_response(body, status=429, headers={"Retry-After": "7"})

    async with messages_endpoint(create) as url:
        yield url


async def test_429_carries_retry_after(throttling_server: str) -> None:
    provider = TwilioProvider(ACCOUNT_SID, AUTH_TOKEN, base_url=throttling_server)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(sms_message())
    finally:
        await provider.close()
    assert caught.value.code == "20429"
    assert caught.value.retryable
    assert caught.value.retry_after == 7.0


async def test_the_status_callback_names_our_message() -> None:
    """Twilio calls StatusCallback as it was given: with our message id in it, a callback that
    comes before the sender has recorded Twilio's id still finds its message."""
    forms: list[dict[str, str]] = []

    async def create(request: web.Request) -> web.Response:
        forms.append({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response({"sid": "SM" + "0" * 32, "status": "queued"}, status=201)

    msg = sms_message()
    async with messages_endpoint(create) as url:
        provider = TwilioProvider(ACCOUNT_SID, AUTH_TOKEN, base_url=url, status_callback=STATUS_CALLBACK)
        try:
            result = await provider.send(msg)
        finally:
            await provider.close()
    assert result.provider_message_id == "SM" + "0" * 32
    [form] = forms
    assert form["StatusCallback"] == f"{STATUS_CALLBACK}?m={msg.message_id}"
