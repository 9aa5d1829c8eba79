"""Email through SendGrid's v3 Mail Send API with the official ``sendgrid`` client.

The client is synchronous (urllib underneath), so each call runs in a worker thread.

Correlation: the personalization's ``custom_args.message_id`` carries our ledger id (the spec
types the top-level ``custom_args`` as a string); SendGrid echoes custom args in every
event-webhook event (delivered, bounce, spamreport, unsubscribe), which is how those events
find their message. The provider id is the ``X-Message-Id`` response header (the prefix
of the events' ``sg_message_id``), or our own id when the response has none.

Reconciliation: v3 Mail Send has no idempotency key, and no API looks a message up by custom
arg (the Email Activity API is a paid add-on, eventually consistent, and cannot prove absence),
so ``lookup`` returns None: a message left ``pending`` by a crash is sent again, and its
events still carry the same ``message_id``.

Errors: 429 is retried after the reset the response announces (Retry-After, else
X-RateLimit-Reset); other 4xx are permanent (bad request, auth, payload too large); 5xx and
network failures are retryable.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from collections.abc import Mapping
from email.utils import parseaddr
from typing import Any

# The sendgrid package ships no type hints; its client is used through a narrow surface here.
from python_http_client.exceptions import HTTPError  # type: ignore[import-untyped]
from sendgrid import SendGridAPIClient  # type: ignore[import-untyped]

from services.messenger.providers.base import (
    OutgoingMessage,
    ProviderError,
    ProviderResult,
    parse_retry_after,
)
from services.messenger.providers.mime import subject_of, unsubscribe_headers

DEFAULT_HOST = "https://api.sendgrid.com"
# Headers SendGrid sets itself and refuses in ``headers``.
_RESERVED = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)


class SendGridProvider:
    paced = False
    can_look_up = False

    def __init__(
        self,
        api_key: str,
        *,
        host: str | None = None,
        timeout: float = 30.0,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """``extra_headers`` go on every request (e.g. a mock's ``Prefer: code=500``)."""
        self._client = SendGridAPIClient(api_key=api_key, host=(host or DEFAULT_HOST).rstrip("/"))
        self._client.client.timeout = timeout  # urllib has none by default
        self._client.client.request_headers.update(extra_headers or {})

    @property
    def name(self) -> str:
        return "sendgrid"

    async def send(self, msg: OutgoingMessage) -> ProviderResult:
        payload = mail_payload(msg)
        return await asyncio.to_thread(self._send_sync, msg, payload)

    async def lookup(self, msg: OutgoingMessage) -> ProviderResult | None:
        # No lookup by custom arg in v3 (module docstring).
        return None

    async def close(self) -> None:
        return None

    def _send_sync(self, msg: OutgoingMessage, payload: dict[str, Any]) -> ProviderResult:
        try:
            response = self._client.send(payload)
        except HTTPError as exc:
            raise sendgrid_error(exc) from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            timed_out = isinstance(exc, TimeoutError) or isinstance(
                getattr(exc, "reason", None), TimeoutError
            )
            raise ProviderError(
                "timeout" if timed_out else "network",
                str(exc),
                permanent=False,
                # A timeout may strike after SendGrid took the request; a refused connection not.
                maybe_delivered=timed_out,
                provider="sendgrid",
            ) from exc
        status = int(response.status_code)
        headers = response.headers
        provider_id = (headers.get("X-Message-Id") if headers is not None else None) or msg.message_id
        return ProviderResult("sendgrid", str(provider_id), "queued", str(status))


def mail_payload(msg: OutgoingMessage) -> dict[str, Any]:
    """The v3 /mail/send body for one recipient."""
    from_name, from_email = parseaddr(msg.from_)
    to_name, to_email = parseaddr(msg.to)
    sender: dict[str, str] = {"email": from_email}
    if from_name:
        sender["name"] = from_name
    recipient: dict[str, str] = {"email": to_email}
    if to_name:
        recipient["name"] = to_name
    content = [{"type": "text/plain", "value": msg.text}]
    if msg.html is not None:
        content.append({"type": "text/html", "value": msg.html})
    headers = {k: v for k, v in unsubscribe_headers(dict(msg.headers)).items() if k.lower() not in _RESERVED}
    headers["Content-Language"] = msg.locale
    return {
        # Per personalization: the spec types the top-level custom_args as a string.
        "personalizations": [{"to": [recipient], "custom_args": {"message_id": msg.message_id}}],
        "from": sender,
        "subject": subject_of(msg),
        "content": content,
        "headers": headers,
    }


def sendgrid_error(exc: Any) -> ProviderError:
    status = int(exc.status_code)
    detail = _error_detail(exc.body)
    if status == 429:
        return ProviderError(
            "429", detail, permanent=False, retry_after=_rate_limit_reset(exc.headers), provider="sendgrid"
        )
    if status >= 500:
        return ProviderError(str(status), detail, permanent=False, maybe_delivered=True, provider="sendgrid")
    return ProviderError(str(status), detail, permanent=True, provider="sendgrid")


def _rate_limit_reset(headers: Any) -> float | None:
    if headers is None:
        return None
    hint = parse_retry_after(headers.get("Retry-After"))
    if hint is not None:
        return hint
    reset = headers.get("X-RateLimit-Reset")  # a Unix time
    try:
        return None if reset is None else max(0.0, float(reset) - time.time())
    except ValueError:
        return None


def _error_detail(body: Any) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    try:
        errors = json.loads(text).get("errors") or []
        return "; ".join(str(e.get("message", e)) for e in errors) or text
    except (ValueError, AttributeError):
        return text
