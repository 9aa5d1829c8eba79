from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from services.ingest.batch import (
    BatchTooLargeError,
    InvalidBatchError,
    MalformedJsonError,
    parse_body,
)
from services.ingest.schemas import AcceptedResponse, ErrorResponse, events_request_body
from services.ingest.service import EVENTS_REJECTED, IngestService
from shared.auth import ApiKey, KeyStore, authorize
from shared.errors import (
    BadRequestError,
    InvalidInputError,
    PayloadTooLargeError,
    RateLimitedError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from shared.kafka.producer import BrokerUnavailableError
from shared.ratelimit import RateLimiter

router = APIRouter()


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _service(request: Request) -> IngestService:
    service: IngestService = request.app.state.service
    return service


def _limited_writer(request: Request) -> ApiKey:
    # Called inline rather than as a FastAPI dependency: on the hottest route, resolving a
    # dependency chain cost as much as the rest of the request (measured in make bench).
    key = authorize(request, _store(request), "events:write")
    limiter: RateLimiter = request.app.state.limiter
    wait = limiter.acquire(key.id, time.monotonic())
    if wait > 0:
        raise RateLimitedError(
            f"rate limit of {limiter.rate:g} requests/s for this key exceeded",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )
    return key


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes")
    # The ASGI messages themselves rather than request.stream(): an async generator per
    # request cost a fifth of the single-event path's CPU in a profile (py-spy, make bench).
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
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
    "/v1/events",
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
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        413: {"model": ErrorResponse, "description": "Body or batch over the limit."},
        415: {"model": ErrorResponse, "description": "Not application/json."},
        422: {"model": ErrorResponse, "description": "Invalid events: details list {index, field, message}."},
        429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After."},
        503: {"model": ErrorResponse, "description": "Kafka unavailable; resend after Retry-After."},
    },
    openapi_extra={"requestBody": _BODY["requestBody"]},
)
async def post_events(request: Request) -> JSONResponse:
    _limited_writer(request)
    settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json, not {content_type or 'absent'!r}"
        )
    body = await _read_body(request, settings.ingest_max_body_bytes)
    service = _service(request)
    try:
        items, _is_batch = parse_body(body)
        events = service.validate(items)
    except MalformedJsonError as exc:
        raise BadRequestError(str(exc)) from exc
    except BatchTooLargeError as exc:
        raise PayloadTooLargeError(str(exc)) from exc
    except InvalidBatchError as exc:
        for t in exc.types:
            EVENTS_REJECTED.labels(t).inc()
        raise InvalidInputError(
            "the batch was rejected whole; nothing was accepted",
            details=[{"index": e.index, "field": e.field, "message": e.message} for e in exc.errors],
        ) from exc
    try:
        accepted = await service.accept(events)
    except BrokerUnavailableError as exc:
        raise UnavailableError(
            "Kafka is not reachable; resend the same events later (their ids make it safe)",
            headers={"Retry-After": str(settings.ingest_retry_after_s)},
        ) from exc
    return JSONResponse(
        {
            "accepted": len(accepted.event_ids),
            "event_ids": accepted.event_ids,
            "duplicates": accepted.duplicates,
        },
        status_code=202,
    )
