"""SMS and WhatsApp through the official ``twilio`` client, on its aiohttp transport.

Why the async transport: bursts of 500-1000 creates against the Prism mock (2-core machine, 16
runs each, 8 or 32 in flight): ``AsyncTwilioHttpClient`` + ``create_async`` 300-600 messages/s
at 0.39-0.57 ms of client CPU per message; the sync client in a thread pool (8 / 32 workers)
300-590 messages/s at 0.91-1.31 ms. Prism is the ceiling for both, so throughput is noisy
(async ahead in most runs); the CPU per message, the cost that stays when Twilio's latency
replaces Prism's, is consistently half.

Never twice: Twilio's Messages API has no idempotency key: a create that is retried after a
timeout, or repeated after a crash between the call and our commit, is a second SMS. So the
ledger row is committed (``pending``) before the call, and a row found ``pending`` after a
restart is settled by ``lookup`` rather than sent again. Twilio cannot be asked "did you get
message X", only "what did sender F send to T": ``lookup`` lists messages by To, From and
DateSent (from the UTC day of ``created_at``; then, since a message still queued at Twilio has
no date_sent yet, the newest messages to T from F without a date filter) and matches the body
(for a WhatsApp template, every content variable must appear in the rendered body) on messages
created no earlier than ``created_at`` minus a clock-skew allowance. Two messages with the same
body to the same number in the same window cannot be told apart; the earliest is returned.

Errors: invalid To (21211), unsubscribed recipient (21610) and not a mobile number (21614) are
permanent and suppress the address; outside the WhatsApp session window (63016) is permanent
(use an approved template); other 4xx are permanent; 429 / 20429 and 5xx are retried, after the
response's Retry-After when it has one.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from services.messenger.providers.base import (
    DeliveryStatus,
    OutgoingMessage,
    ProviderError,
    ProviderResult,
    parse_retry_after,
)
from shared.events import Channel

# Twilio errors that mean the address itself will not work on this channel.
SUPPRESS_CODES = frozenset({21211, 21610, 21614})
# Permanent whatever their HTTP status (63016: free-form WhatsApp outside the 24-hour window).
PERMANENT_CODES = SUPPRESS_CODES | {63016}
RATE_LIMIT_CODES = frozenset({20429})
QUEUED_STATUSES = frozenset({"accepted", "queued", "scheduled", "sending"})
LOOKUP_SKEW = timedelta(minutes=5)
LOOKUP_PAGE_SIZE = 200

# Retry-After of the last error response in this task (see _HttpClient).
_RETRY_AFTER: ContextVar[float | None] = ContextVar("twilio_retry_after", default=None)
_SMART_PUNCTUATION = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-"})


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio is untyped
    """Twilio's aiohttp client with three fixes: its own timeout applies to every request (the
    stock client passes only the per-call one, None, to aiohttp: no timeout at all); an error
    response's Retry-After is kept where the caller, awaiting in the same task, finds it
    (TwilioRestException carries no headers); credentials go as a header, not as the
    BasicAuth object aiohttp deprecates."""

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - twilio's signature, overridden
        allow_redirects: bool = False,
    ) -> Response:
        if auth is not None:  # as a header: aiohttp deprecates BasicAuth objects
            credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            headers = {**(headers or {}), "Authorization": f"Basic {credentials}"}
        response: Response = await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout if timeout is not None else self.timeout,
            allow_redirects=allow_redirects,
        )
        if response.status_code >= 400:
            _RETRY_AFTER.set(parse_retry_after((response.headers or {}).get("Retry-After")))
        return response


class TwilioMessage(Protocol):
    """The fields of a Twilio Message resource that ``lookup`` reads."""

    @property
    def sid(self) -> str | None: ...
    @property
    def to(self) -> str | None: ...
    @property
    def from_(self) -> str | None: ...
    @property
    def body(self) -> str | None: ...
    @property
    def status(self) -> object: ...
    @property
    def direction(self) -> object: ...
    @property
    def date_created(self) -> datetime | None: ...


M = TypeVar("M", bound=TwilioMessage)


class TwilioProvider:
    paced = True
    can_look_up = True  # the day's messages to the number, matched by the body

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        base_url: str | None = None,
        status_callback: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.account_sid = account_sid
        self._auth_token = auth_token
        self.base_url = base_url.rstrip("/") if base_url else None
        self.status_callback = status_callback
        self._timeout = timeout
        self._client: Any = None  # created on first use: aiohttp wants a running loop

    @property
    def name(self) -> str:
        return "twilio"

    def _twilio(self) -> Any:
        if self._client is None:
            http = _HttpClient(timeout=self._timeout)
            # environment={}: TWILIO_REGION / TWILIO_EDGE in the process env would rewrite hosts.
            client = Client(self.account_sid, self._auth_token, http_client=http, environment={})
            if self.base_url:
                client.api.base_url = self.base_url
            self._client = client
        return self._client

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        params: dict[str, Any] = {
            "to": channel_address(msg.to, msg.channel),
            "from_": channel_address(msg.from_, msg.channel),
        }
        if self.status_callback:
            # Our id too: a callback may come before the sender has recorded Twilio's id.
            params["status_callback"] = f"{self.status_callback}?{urlencode({'m': msg.message_id})}"
        if msg.content_sid is not None:
            params["content_sid"] = msg.content_sid
            if msg.content_variables:
                params["content_variables"] = json.dumps(dict(msg.content_variables), ensure_ascii=False)
        else:
            params["body"] = msg.text
        created = await self._call(self._twilio().messages.create_async, **params)
        return _result(created)

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        to = channel_address(msg.to, msg.channel)
        from_ = channel_address(msg.from_, msg.channel)
        day = msg.created_at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        messages = self._twilio().messages
        # One page each: a sender does not send 200 messages a day to one customer.
        sent = await self._call(
            messages.page_async, to=to, from_=from_, date_sent_after=day, page_size=LOOKUP_PAGE_SIZE
        )
        found = match_message(msg, list(sent))
        if found is None:
            # Still queued at Twilio (no date_sent yet): the newest messages, no date filter.
            recent = await self._call(messages.page_async, to=to, from_=from_, page_size=LOOKUP_PAGE_SIZE)
            found = match_message(msg, list(recent))
        return None if found is None else _result(found)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.http_client.close()
            self._client = None

    async def _call(self, fn: Any, **kwargs: Any) -> Any:
        token = _RETRY_AFTER.set(None)
        try:
            return await fn(**kwargs)
        except TwilioException as exc:
            raise twilio_error(exc, _RETRY_AFTER.get()) from exc
        except aiohttp.ClientConnectorError as exc:
            # The connection never opened: nothing reached Twilio.
            raise ProviderError("network", str(exc), permanent=False, provider="twilio") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(
                "timeout" if isinstance(exc, TimeoutError) else "network",
                str(exc) or type(exc).__name__,
                permanent=False,
                maybe_delivered=True,
                provider="twilio",
            ) from exc
        finally:
            _RETRY_AFTER.reset(token)


def channel_address(address: str, channel: Channel) -> str:
    """WhatsApp addresses are ``whatsapp:+E164`` at Twilio, for To and From alike."""
    if channel is Channel.WHATSAPP and not address.startswith("whatsapp:"):
        return f"whatsapp:{address}"
    return address


def twilio_error(exc: TwilioException, retry_after: float | None) -> ProviderError:
    """Map a client exception (create: TwilioRestException or, for RFC 9457 bodies,
    TwilioServiceException; listing: a bare TwilioException carrying the response)."""
    if isinstance(exc, TwilioRestException | TwilioServiceException):
        status = int(exc.status or 0)
        raw_code: object = exc.code
    else:
        response = exc.args[1] if len(exc.args) > 1 else None
        status = int(getattr(response, "status_code", 0) or 0)
        raw_code = None
    code = int(str(raw_code)) if str(raw_code).isdigit() else status
    text = _error_text(exc)
    if status == 0:  # no HTTP response to judge by
        return ProviderError("unknown", text, permanent=False, maybe_delivered=True, provider="twilio")
    if code in PERMANENT_CODES:
        return ProviderError(
            str(code), text, permanent=True, suppress_address=code in SUPPRESS_CODES, provider="twilio"
        )
    if status == 429 or code in RATE_LIMIT_CODES:
        return ProviderError(str(code), text, permanent=False, retry_after=retry_after, provider="twilio")
    if status >= 500:
        # Twilio may have created the message before failing: look before resending.
        return ProviderError(
            str(code), text, permanent=False, retry_after=retry_after, maybe_delivered=True, provider="twilio"
        )
    return ProviderError(str(code), text, permanent=True, provider="twilio")


def _error_text(exc: TwilioException) -> str:
    for attr in ("msg", "detail", "title"):
        value = getattr(exc, attr, None)
        if value:
            return str(value)
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_SMART_PUNCTUATION)
    return re.sub(r"\s+", " ", text).strip()


def _body_matches(msg: OutgoingMessage, body: str) -> bool:
    if msg.content_sid is not None:
        # The body is the template rendered by Twilio: every variable must show in it.
        rendered = _normal(body)
        return bool(body) and all(_normal(v) in rendered for v in (msg.content_variables or {}).values())
    return _normal(body) == _normal(msg.text)


def match_message(msg: OutgoingMessage, candidates: Iterable[M]) -> M | None:
    """The earliest outbound message in ``candidates`` that is ``msg``, or None."""
    to = channel_address(msg.to, msg.channel)
    from_ = channel_address(msg.from_, msg.channel)
    not_before = msg.created_at - LOOKUP_SKEW
    matches = [
        m
        for m in candidates
        if m.to == to
        and m.from_ == from_
        and str(m.direction or "").startswith("outbound")
        and (m.date_created is None or m.date_created >= not_before)
        and _body_matches(msg, m.body or "")
    ]
    if not matches:
        return None
    return min(matches, key=lambda m: m.date_created or datetime.max.replace(tzinfo=UTC))


def _result(m: Any) -> ProviderResult:
    raw = str(m.status or "")
    # Anything past Twilio's queue (sent, delivered, even failed) was handed over; callbacks
    # and raw_status carry the rest.
    status: DeliveryStatus = "queued" if raw in QUEUED_STATUSES else "sent"
    return ProviderResult("twilio", str(m.sid), status, raw)
