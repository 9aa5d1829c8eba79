"""POST /v1/events.

The route is served twice over. ``EventsEndpoint`` is a plain ASGI endpoint that ``IngestApp``
(app.py) calls for ``POST /v1/events`` before FastAPI's middleware, routing and dependency
solving, which cost a single-event request more CPU than parsing, validating and producing
its event (in-process, the FastAPI stack around the same endpoint took 57 µs a request against
9 µs for the endpoint itself). The FastAPI route below documents the operation in the OpenAPI
and serves what the fast path hands on (a query string, a root path); both run the same
``EventsEndpoint.accept``, so they answer alike.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from services.ingest.batch import (
    BatchTooLargeError,
    InvalidBatchError,
    MalformedJsonError,
)
from services.ingest.config import IngestSettings
from services.ingest.schemas import AcceptedResponse, ErrorResponse, events_request_body
from services.ingest.service import EVENTS_REJECTED, ConflictingIdsError, IngestService
from shared.auth import KeyStore, authorize
from shared.errors import (
    BadRequestError,
    ConflictError,
    InvalidInputError,
    PayloadTooLargeError,
    RateLimitedError,
    RetainError,
    UnavailableError,
    UnsupportedMediaTypeError,
    error_body,
)
from shared.http import KEY_SECURITY, query_error
from shared.kafka.producer import BrokerUnavailableError
from shared.logs import get_logger
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.ratelimit import RateLimiter

log = get_logger(__name__)

PATH = "/v1/events"
_JSON = (b"content-type", b"application/json")


def _charset(content_type: str) -> str | None:
    """The charset parameter of a Content-Type, lower case, unquoted; None when absent."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before resending.", "schema": {"type": "integer"}}
}

router = APIRouter()  # its query check is in accept, after the key's


class EventsEndpoint:
    """Validates a request whole, produces its events and answers once the broker has them."""

    def __init__(
        self, settings: IngestSettings, keys: KeyStore, limiter: RateLimiter, service: IngestService
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.limiter = limiter
        self.service = service
        # What the metrics middleware records for the other routes, for this one (labelled
        # children looked up once: .labels() is not free).
        self._latency = HTTP_LATENCY.labels("ingest", PATH, "POST")
        self._requests: dict[int, Any] = {}

    async def accept(self, scope: Scope, receive: Receive) -> bytes:
        """The 202 body; every other answer is raised as a ``RetainError``."""
        request = Request(scope, receive)
        key = authorize(request, self.keys, "events:write")
        # Only through FastAPI's route: the fast path takes no query string (app.py).
        if (error := query_error(request, frozenset())) is not None:
            raise error
        wait = self.limiter.acquire(key.id, time.monotonic())
        if wait > 0:
            raise RateLimitedError(
                f"rate limit of {self.limiter.rate:g} requests/s for this key exceeded",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        headers = request.headers
        content_type = headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaTypeError(
                f"Content-Type must be application/json, not {content_type or 'absent'!r}"
            )
        if (charset := _charset(content_type)) not in (None, "utf-8", "utf8", "us-ascii"):
            # JSON is UTF-8 (RFC 8259); a Latin-1 body was answered "str is not valid UTF-8:
            # surrogates not allowed", as if the text were broken rather than its encoding.
            raise UnsupportedMediaTypeError(f"the body must be UTF-8 JSON, not charset={charset}")
        body = await _read_body(receive, headers.get("content-length"), self.settings.ingest_max_body_bytes)
        service = self.service
        try:
            events = service.validate(body)
        except MalformedJsonError as exc:
            raise BadRequestError(str(exc)) from exc
        except BatchTooLargeError as exc:
            raise PayloadTooLargeError(str(exc)) from exc
        except InvalidBatchError as exc:
            raise _refused(exc, InvalidInputError, "the batch was rejected whole") from exc
        try:
            prepared = service.prepare(events)
        except ConflictingIdsError as exc:
            message = "an event id names another event accepted before; the batch was rejected whole"
            raise _refused(exc, ConflictError, message) from exc
        # Nothing but the encoded events and their ids stays alive while the broker answers:
        # the body and the models go now, not after the acknowledgement, so
        # the collector has fewer objects to walk and a waiting request holds less memory.
        del body, events
        try:
            accepted = await service.produce(prepared)
        except BrokerUnavailableError as exc:
            raise UnavailableError(
                "Kafka is not reachable; resend the same events later (their ids make it safe)",
                headers={"Retry-After": str(self.settings.ingest_retry_after_s)},
            ) from exc
        return orjson.dumps(
            {
                "accepted": len(accepted.event_ids),
                "event_ids": accepted.event_ids,
                "duplicates": accepted.duplicates,
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = [_JSON]
        try:
            body = await self.accept(scope, receive)
            status = 202
        except RetainError as exc:
            # As the error handler of every service renders it (shared/errors.py).
            status = exc.status_code
            body = orjson.dumps(error_body(exc.code, exc.message, exc.details))
            for name, value in (exc.headers or {}).items():
                headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        except ClientDisconnect:
            return  # nobody to answer
        except Exception:
            log.exception("unexpected error in POST /v1/events")
            status = 500
            body = orjson.dumps(error_body("internal", "an unexpected error; it has been logged"))
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        counter = self._requests.get(status)
        if counter is None:
            counter = self._requests[status] = HTTP_REQUESTS.labels("ingest", PATH, "POST", str(status))
        counter.inc()
        self._latency.observe(time.perf_counter() - started)


def _refused(exc: InvalidBatchError, error: type[RetainError], message: str) -> RetainError:
    """A batch refused whole: its events counted as rejected, each problem by index and field."""
    for t in exc.types:
        EVENTS_REJECTED.labels(t).inc()
    return error(
        f"{message}; nothing was accepted",
        details=[{"index": e.index, "field": e.field, "message": e.message} for e in exc.errors],
    )


async def _read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes")
    # The ASGI messages themselves rather than request.stream(): an async generator per
    # request cost a fifth of the single-event path's CPU in a profile (py-spy, make bench).
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_BODY = events_request_body()


@router.post(
    PATH,
    status_code=202,
    response_model=AcceptedResponse,
    summary="Send one event or a JSON array of events",
    description=(
        "Validates the whole request before anything is produced: one invalid event rejects the"
        " batch (422, every problem listed). 202 means the broker has acknowledged every event."
        " Resending the same event ids is safe."
    ),
    responses={
        400: {"model": ErrorResponse, "description": "The body is not JSON."},
        401: {
            "model": ErrorResponse,
            "description": "No API key, or not a valid one.",
            "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
        },
        403: {"model": ErrorResponse},
        409: {
            "model": ErrorResponse,
            "description": "An event_id accepted in the dedupe window (or being accepted) for a different "
            "event: details list {index, field, message}; nothing was accepted.",
        },
        413: {"model": ErrorResponse, "description": "Body or batch over the limit."},
        415: {"model": ErrorResponse, "description": "Not application/json, or a charset other than UTF-8."},
        422: {"model": ErrorResponse, "description": "Invalid events: details list {index, field, message}."},
        429: {
            "model": ErrorResponse,
            "description": "Rate limited; see Retry-After.",
            "headers": _RETRY_AFTER,
        },
        503: {
            "model": ErrorResponse,
            "description": "Kafka unavailable; resend after Retry-After.",
            "headers": _RETRY_AFTER,
        },
    },
    # The key is checked in accept (before the body is read), not by a dependency: declared here.
    openapi_extra={"requestBody": _BODY["requestBody"], "security": KEY_SECURITY},
)
async def post_events(request: Request) -> Response:
    endpoint: EventsEndpoint = request.app.state.events
    body = await endpoint.accept(request.scope, request.receive)
    return Response(body, status_code=202, media_type="application/json")
