from __future__ import annotations

import base64
import hashlib
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Form, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AfterValidator, AwareDatetime, ValidationError
from twilio.request_validator import RequestValidator

from services.messenger import pages
from services.messenger.caps import CapsConfig
from services.messenger.links import message_id_of, verify_unsubscribe
from services.messenger.pages import page_language
from services.messenger.schemas import (
    CapsOut,
    FollowUpIn,
    MessageOut,
    MessagesPage,
    RepliesPage,
    ReplyOut,
    SurveyAnswerOut,
    SurveyAnswersPage,
    WaitOut,
    WaitsPage,
    WaitStatus,
)
from services.messenger.service import CapsConflictError, CapsMatchRequiredError, MessengerService, caps_etag
from services.messenger.status import EmailEvent
from services.messenger.stopwords import match_inbound, reply_for
from shared.auth import ApiKey, KeyStore, require_scope
from shared.errors import (
    BadRequestError,
    ErrorResponse,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
    RetainError,
    pydantic_errors,
)
from shared.events import Channel, MessageStatus
from shared.http import ApiRoute, UniqueKeys, if_match_etag
from shared.storable import storable

router = APIRouter(route_class=ApiRoute)


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _service(request: Request) -> MessengerService:
    service: MessengerService = request.app.state.service
    return service


Reader = Annotated[ApiKey, Depends(require_scope(_store, "messages:read"))]
Writer = Annotated[ApiKey, Depends(require_scope(_store, "messages:write"))]
# Support records its follow-ups of survey answers and replies; it need not edit caps, journeys or
# templates.
SurveyWriter = Annotated[ApiKey, Depends(require_scope(_store, "surveys:write"))]
Service = Annotated[MessengerService, Depends(_service)]
# A message id in a path: the survey pages (a link's short form too) and its answer's follow-up.
MessageId = Annotated[str, Path(max_length=64), AfterValidator(storable)]


def _in_utc(value: datetime) -> datetime:
    """An instant as UTC, where the database compares it: one UTC cannot hold
    (0001-01-01T00:00:00+05:00) is a 422 naming the parameter, not a 500 at the query."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("outside the instants UTC can hold (years 1 to 9999)") from None


Instant = Annotated[AwareDatetime, AfterValidator(_in_utc)]


def _cursor(value: str | None) -> tuple[datetime, str] | None:
    if value is None:
        return None
    try:
        at, mid = base64.urlsafe_b64decode(value.encode()).decode().split("|", 1)
        instant = datetime.fromisoformat(at)
        if instant.tzinfo is None:  # ours carry an offset; a naive one would fail in the query
            raise ValueError("no UTC offset")
        if "\x00" in mid:  # PostgreSQL's text takes none (a 500 from the query)
            raise ValueError("NUL in the id")
        # In UTC here, as the query would (at 0001-01-01 with an offset east of UTC, OverflowError).
        return instant.astimezone(UTC), mid
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        # Named as every other parameter is (query.<name>), with what is wrong.
        raise InvalidInputError(
            "the cursor is not one this API gave out",
            details=[
                {"field": "query.cursor", "message": "pass the next_cursor of the page before, as it is"}
            ],
        ) from exc


@router.get(
    "/v1/messages",
    response_model=MessagesPage,
    tags=["messages"],
    summary="Every decision with its reason: why a customer did (or did not) get a message",
)
async def list_messages(
    _key: Reader,
    service: Service,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    journey: Annotated[str | None, Query(max_length=64)] = None,
    # The statuses a ledger row can have: every MessageStatus, and 'sending' (claimed by the
    # sender, not settled yet), which is the ledger's own and never published.
    status: MessageStatus | Literal["sending"] | None = None,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> MessagesPage:
    rows = await service.list_messages(
        customer_id=customer_id,
        journey=journey,
        status=None if status is None else str(status),
        before=_cursor(cursor),
        limit=limit,
    )
    return MessagesPage(
        messages=[MessageOut.model_validate(r) for r in rows], next_cursor=_next_cursor(rows, limit)
    )


@router.get(
    "/v1/surveys",
    response_model=SurveyAnswersPage,
    tags=["messages"],
    summary="The customers' answers to the feedback survey, newest first: who is unhappy, and what they said",
)
async def list_survey_answers(
    _key: Reader,
    service: Service,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    journey: Annotated[str | None, Query(max_length=64)] = None,
    max_score: Annotated[
        int | None,
        Query(
            ge=1, le=5, description="Only answers of at most this score (2: the unhappy; 3: the not pleased)."
        ),
    ] = None,
    since: Annotated[
        Instant | None,
        Query(description="Answered at or after this instant: RFC 3339 (2026-11-26T00:00:00+02:00)."),
    ] = None,
    until: Annotated[Instant | None, Query(description="Answered before this instant.")] = None,
    followed_up: Annotated[
        bool | None,
        Query(
            description="false: only the answers nobody has taken up yet (the call-back list); "
            "true: only those followed up (PUT /v1/surveys/{message_id}/follow-up)."
        ),
    ] = None,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> SurveyAnswersPage:
    _check_window(since, until)
    rows = await service.list_survey_answers(
        customer_id=customer_id,
        journey=journey,
        max_score=max_score,
        since=since,
        until=until,
        followed_up=followed_up,
        before=_cursor(cursor),
        limit=limit,
    )
    return SurveyAnswersPage(
        answers=[SurveyAnswerOut.model_validate(r) for r in rows],
        next_cursor=_next_cursor(rows, limit),
    )


@router.get(
    "/v1/replies",
    response_model=RepliesPage,
    tags=["messages"],
    summary="What customers wrote back by SMS or WhatsApp, newest first, with who they are",
)
async def list_replies(
    _key: Reader,
    service: Service,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    channel: Literal["sms", "whatsapp"] | None = None,
    since: Annotated[
        Instant | None,
        Query(description="Came in at or after this instant: RFC 3339 (2026-11-26T00:00:00+02:00)."),
    ] = None,
    until: Annotated[Instant | None, Query(description="Came in before this instant.")] = None,
    followed_up: Annotated[
        bool | None,
        Query(
            description="false: only the replies nobody has taken up yet (support's queue); "
            "true: only those followed up (PUT /v1/replies/{reply_id}/follow-up)."
        ),
    ] = None,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RepliesPage:
    """Every inbound SMS and WhatsApp message of a known customer but a STOP or a START: the
    messages invite a reply ("write to us here"), and this is where support reads them. Each
    is also its message's ``replied`` event on retain.messages, with ``reply_id`` and the first
    500 characters as ``reply`` in its details."""
    _check_window(since, until)
    rows = await service.list_replies(
        customer_id=customer_id,
        channel=channel,
        since=since,
        until=until,
        followed_up=followed_up,
        before=_cursor(cursor),
        limit=limit,
    )
    return RepliesPage(
        replies=[ReplyOut.model_validate(r) for r in rows], next_cursor=_next_cursor(rows, limit)
    )


ReplyId = MessageId  # Twilio's MessageSid (34 characters), bounded as our message ids


@router.put(
    "/v1/replies/{reply_id}/follow-up",
    response_model=ReplyOut,
    tags=["messages"],
    summary="Record that support answered a reply (called back, wrote back), with what was done",
    responses={404: {"description": "no reply of that id"}},
)
async def follow_up_reply(
    reply_id: ReplyId, body: FollowUpIn, key: SurveyWriter, service: Service
) -> ReplyOut:
    """The reply leaves support's queue (``GET /v1/replies?followed_up=false``), as a survey
    answer leaves the call-back list: the same note again changes nothing, another amends it,
    and every change is kept in ``follow_up_history``."""
    reply = await service.follow_up("reply", reply_id, body.note or None, key.id, body.agent)
    if reply is None:
        raise NotFoundError(f"no reply {reply_id!r}")
    return ReplyOut.model_validate(reply)


@router.delete(
    "/v1/replies/{reply_id}/follow-up",
    status_code=204,
    tags=["messages"],
    summary="Take back a follow-up recorded by mistake: the reply is in support's queue again",
    responses={404: {"description": "no reply of that id"}},
)
async def reopen_reply(reply_id: ReplyId, key: SurveyWriter, service: Service) -> Response:
    if not await service.reopen("reply", reply_id, key.id):
        raise NotFoundError(f"no reply {reply_id!r}")
    return Response(status_code=204)


@router.put(
    "/v1/surveys/{message_id}/follow-up",
    response_model=SurveyAnswerOut,
    tags=["messages"],
    summary="Record that support took up an answer (called back, refunded), with what was done",
    responses={404: {"description": "nobody answered the survey of that message"}},
)
async def follow_up_survey_answer(
    message_id: MessageId, body: FollowUpIn, key: SurveyWriter, service: Service
) -> SurveyAnswerOut:
    """The answer leaves the call-back list (``GET /v1/surveys?followed_up=false``). On an
    answer already taken up, no note or the same note changes nothing; another note amends it,
    stamped with who and when. Every change is kept in ``follow_up_history``."""
    answer = await service.follow_up("survey", message_id, body.note or None, key.id, body.agent)
    if answer is None:
        raise NotFoundError(f"nobody answered the survey of message {message_id!r}")
    return SurveyAnswerOut.model_validate(answer)


@router.delete(
    "/v1/surveys/{message_id}/follow-up",
    status_code=204,
    tags=["messages"],
    summary="Take back a follow-up recorded by mistake: the answer is on the call-back list again",
    responses={404: {"description": "nobody answered the survey of that message"}},
)
async def reopen_survey_answer(message_id: MessageId, key: SurveyWriter, service: Service) -> Response:
    if not await service.reopen("survey", message_id, key.id):
        raise NotFoundError(f"nobody answered the survey of message {message_id!r}")
    return Response(status_code=204)


@router.get(
    "/v1/waits",
    response_model=WaitsPage,
    tags=["messages"],
    summary="Journey messages waiting for their delay, and what became of earlier ones",
)
async def list_waits(
    _key: Reader,
    service: Service,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    journey: Annotated[str | None, Query(max_length=64)] = None,
    status: WaitStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> WaitsPage:
    """A journey with a wait (the feedback survey a day after a ticket is resolved, a check-in
    after a quiet spell) decides its message when the wait is due: until then the message is not
    in /v1/messages. This is where it is, newest first."""
    rows = await service.list_waits(
        customer_id=customer_id, journey=journey, status=status, before=_cursor(cursor), limit=limit
    )
    return WaitsPage(waits=[WaitOut.model_validate(r) for r in rows], next_cursor=_next_cursor(rows, limit))


MAX_INBOUND_MEDIA = 10


def _inbound_media(form: Any) -> list[dict[str, str]]:
    """What came with an inbound message, as Twilio names it: NumMedia, then MediaUrl<i> and
    MediaContentType<i> for each (at most 10 on MMS and WhatsApp)."""
    try:
        count = min(int(form.get("NumMedia") or 0), MAX_INBOUND_MEDIA)
    except ValueError:
        return []
    found = []
    for i in range(count):
        url = str(form.get(f"MediaUrl{i}") or "")
        if url.startswith("https://") and len(url) <= 2048:
            content_type = str(form.get(f"MediaContentType{i}") or "")[:100]
            found.append({"url": url, "content_type": content_type})
    return found


def _check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until <= since:
        raise InvalidInputError(
            "the request is not valid",
            details=[
                {"field": "query.until", "message": f"'until' ({until}) is not after 'since' ({since})"}
            ],
        )


def _next_cursor(rows: list[dict[str, Any]], limit: int) -> str | None:
    """The keyset cursor after the last row of a full page (created_at|id); None after the last."""
    if len(rows) < limit:
        return None
    last = rows[-1]
    return base64.urlsafe_b64encode(f"{last['created_at'].isoformat()}|{last['id']}".encode()).decode()


async def _caps_response(service: MessengerService) -> JSONResponse:
    caps, updated_at, updated_by = await service.get_caps()
    etag = caps_etag(caps)
    body = CapsOut(caps=caps.caps, etag=etag, updated_at=updated_at, updated_by=updated_by)
    return JSONResponse(body.model_dump(mode="json"), headers={"ETag": f'"{etag}"'})


@router.get("/v1/caps", response_model=CapsOut, tags=["caps"], summary="Frequency caps in force")
async def get_caps(_key: Reader, service: Service) -> JSONResponse:
    return await _caps_response(service)


@router.put(
    "/v1/caps",
    response_model=CapsOut,
    tags=["caps"],
    summary="Replace the frequency caps (all of them: send every cap to keep; If-Match: the ETag you read)",
    responses={
        412: {"description": "the caps changed since they were read"},
        428: {"description": "If-Match missing"},
    },
)
async def put_caps(
    body: Annotated[
        dict[str, Any],
        Body(
            examples=[
                {"caps": [{"name": "sms_7d", "scope": "channel", "channel": "sms", "limit": 2, "window": 7}]}
            ]
        ),
        AfterValidator(storable),
    ],
    key: Writer,
    _keys: UniqueKeys,
    service: Service,
    if_match: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    try:
        caps = CapsConfig.model_validate(body)
    except ValidationError as exc:
        raise InvalidInputError("the caps are not valid", details=pydantic_errors(exc.errors())) from exc
    try:
        await service.put_caps(caps, key.id, if_match_etag(if_match), match_required=True)
    except CapsMatchRequiredError as exc:
        raise RetainError(
            "If-Match with the ETag of the caps you read (GET /v1/caps) is required",
            status_code=428,
            code="precondition_required",
        ) from exc
    except CapsConflictError as exc:
        raise PreconditionFailedError(
            "the caps changed since you read them (stale ETag); GET them again"
        ) from exc
    return await _caps_response(service)


# --- provider callbacks ------------------------------------------------------------------------


async def _twilio_form(request: Request) -> dict[str, str]:
    """The callback's form, after checking X-Twilio-Signature against our auth token and the
    public URL Twilio was given (forged, missing or stale-token signatures → 403)."""
    service = _service(request)
    token = service.settings.twilio_auth_token
    form = {k: str(v) for k, v in (await request.form()).items()}
    signature = request.headers.get("x-twilio-signature")
    if token is None or not signature:
        raise ForbiddenError("missing X-Twilio-Signature (or no Twilio auth token configured)")
    url = service.settings.messenger_public_url.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    if not RequestValidator(token.get_secret_value()).validate(url, form, signature):
        raise ForbiddenError("X-Twilio-Signature does not match")
    return form


_SIGNED: dict[int | str, dict[str, Any]] = {
    204: {"description": "Taken (or already taken: a retry or a replay changes nothing)."},
    403: {"model": ErrorResponse, "description": "The signature is missing, forged or stale."},
}


@router.post(
    "/webhooks/twilio/status",
    tags=["webhooks"],
    summary="Twilio message status callback",
    status_code=204,
    response_class=Response,
    responses=_SIGNED,
)
async def twilio_status(request: Request, service: Service) -> Response:
    form = await _twilio_form(request)
    sid = form.get("MessageSid") or form.get("SmsSid")
    status = form.get("MessageStatus") or form.get("SmsStatus")
    if not sid or not status:
        raise InvalidInputError(
            "MessageSid and MessageStatus are required", details=[{"field": "MessageSid"}]
        )
    await service.provider_status(sid, status, form.get("ErrorCode"), request.query_params.get("m"))
    return Response(status_code=204)


@router.post(
    "/webhooks/twilio/inbound",
    tags=["webhooks"],
    summary="Inbound SMS / WhatsApp (STOP, START, replies)",
    response_class=Response,
    responses={
        200: {
            "description": "TwiML: the reply to a keyword, or an empty <Response/>.",
            "content": {"application/xml": {"schema": {"type": "string"}}},
        },
        403: _SIGNED[403],
    },
)
async def twilio_inbound(request: Request, service: Service) -> Response:
    form = await _twilio_form(request)
    sender = form.get("From", "")
    body = form.get("Body", "")
    channel = Channel.WHATSAPP if sender.startswith("whatsapp:") else Channel.SMS
    keyword = match_inbound(body)
    kind = keyword.intent if keyword else None
    sid = form.get("MessageSid") or form.get("SmsSid")
    taken = await service.inbound(channel, sender, body, kind, sid, media=_inbound_media(form))
    # A START with nothing to lift was taken as an answer: nothing to confirm.
    answered = keyword is not None and taken.intent == keyword.intent
    reply = reply_for(keyword, channel, body, service.settings.brand) if keyword and answered else None
    # TwiML: an empty response sends nothing; Twilio answers its own STOP keywords itself.
    twiml = '<?xml version="1.0" encoding="UTF-8"?><Response>'
    if reply:
        from xml.sax.saxutils import escape  # noqa: PLC0415

        twiml += f"<Message>{escape(reply)}</Message>"
    twiml += "</Response>"
    return Response(twiml, media_type="application/xml")


@router.post(
    "/webhooks/sendgrid/events",
    tags=["webhooks"],
    summary="SendGrid event webhook (signed)",
    status_code=204,
    response_class=Response,
    responses=_SIGNED,
)
async def sendgrid_events(request: Request, service: Service) -> Response:
    key = service.settings.sendgrid_webhook_public_key
    signature = request.headers.get("x-twilio-email-event-webhook-signature")
    timestamp = request.headers.get("x-twilio-email-event-webhook-timestamp")
    payload = (await request.body()).decode("utf-8", errors="replace")
    if key is None or not signature or not timestamp:
        raise ForbiddenError("missing SendGrid signature headers (or no verification key configured)")
    from sendgrid.helpers.eventwebhook import EventWebhook  # type: ignore[import-untyped]  # noqa: PLC0415

    webhook = EventWebhook()
    try:
        verified = webhook.verify_signature(
            payload, signature, timestamp, webhook.convert_public_key_to_ecdsa(key)
        )
    except (ValueError, TypeError):
        verified = False
    if not verified:
        raise ForbiddenError("the SendGrid signature does not match")
    # The signature covers the timestamp: a stale one is a replay of an old delivery, and a
    # fresh one seen before is a replay inside the window (the receipt, in the transaction).
    tolerance = service.settings.sendgrid_webhook_tolerance_s
    try:
        skew = abs(time.time() - float(timestamp))
    except ValueError:
        skew = float("inf")
    if not skew <= tolerance:
        raise ForbiddenError(f"the SendGrid timestamp is more than {tolerance} s from now (a replay?)")
    import json  # noqa: PLC0415

    try:
        events = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(events, list):
        raise InvalidInputError("the body must be a JSON array of events")
    applied = await service.email_events(
        [
            EmailEvent(
                event["email"],
                str(event.get("event", "")),
                # Our ledger id, which the send put in custom_args (providers/sendgrid_api.py):
                # SendGrid echoes each custom arg as a key of every event of the message.
                _text(event.get("message_id"), 64),
                _text(event.get("type"), 32),
                _text(event.get("reason"), 500),
                _text(event.get("sg_event_id"), 100),
            )
            for event in events[:1000]
            if isinstance(event, dict) and isinstance(event.get("email"), str)
        ],
        # What was signed, not the signature: an ECDSA signature has a second valid form.
        receipt=hashlib.sha256(f"{timestamp}\n{payload}".encode()).hexdigest(),
    )
    if not applied:
        raise ForbiddenError("this SendGrid delivery was received before (a replay)")
    return Response(status_code=204)


def _text(value: object, longest: int) -> str | None:
    """A field of a SendGrid event as text, if it is one; cut to ``longest``."""
    return value[:longest] if isinstance(value, str) and value else None


# --- links in messages ---------------------------------------------------------------------------


@router.get("/u/{token}", tags=["links"], response_class=HTMLResponse, summary="Unsubscribe page")
async def unsubscribe_page(token: Annotated[str, Path(max_length=300)], service: Service) -> HTMLResponse:
    found = verify_unsubscribe(service.settings.messenger_link_secret.get_secret_value(), token)
    if found is None:
        raise NotFoundError("this unsubscribe link is not valid")
    customer_id, channel = found
    lang = page_language(await service.customer_locale(customer_id))
    # GET never unsubscribes by itself: mail scanners follow links. The button POSTs.
    brand = service.settings.messenger_brand_name
    return HTMLResponse(pages.unsubscribe_confirm(lang, Channel(channel), brand, f"/u/{token}"))


@router.post(
    "/u/{token}", tags=["links"], response_class=HTMLResponse, summary="One-click unsubscribe (RFC 8058)"
)
async def unsubscribe(token: Annotated[str, Path(max_length=300)], service: Service) -> HTMLResponse:
    found = verify_unsubscribe(service.settings.messenger_link_secret.get_secret_value(), token)
    if found is None:
        raise NotFoundError("this unsubscribe link is not valid")
    customer_id, channel = found
    await service.unsubscribe(customer_id, Channel(channel))
    lang = page_language(await service.customer_locale(customer_id))
    return HTMLResponse(pages.unsubscribed(lang, Channel(channel), service.settings.messenger_brand_name))


@router.get(
    "/s/{message_id}", tags=["links"], response_class=HTMLResponse, summary="Feedback survey: the question"
)
async def survey(message_id: MessageId, service: Service) -> HTMLResponse:
    locale, state = await service.survey_state(message_id_of(message_id))
    if state is not None:
        return _survey_done(locale, state)
    brand = service.settings.messenger_brand_name
    return HTMLResponse(pages.survey_form(page_language(locale), brand, f"/s/{message_id}"))


@router.post(
    "/s/{message_id}", tags=["links"], response_class=HTMLResponse, summary="Feedback survey: the answer"
)
async def survey_answer(
    message_id: MessageId,
    service: Service,
    score: Annotated[int, Form(ge=pages.SURVEY_SCORES.start, le=pages.SURVEY_SCORES.stop - 1)],
    comment: Annotated[str, Form(max_length=pages.MAX_COMMENT), AfterValidator(storable)] = "",
) -> HTMLResponse:
    locale, state = await service.answer_survey(message_id_of(message_id), score, comment.strip())
    return _survey_done(locale, state)


def _survey_done(locale: str | None, state: pages.SurveyState) -> HTMLResponse:
    """The page after the survey (thanks, already answered), or a 404 for no such message."""
    return HTMLResponse(pages.survey_done(page_language(locale), state), 404 if state == "gone" else 200)


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "error", "message": message}}, status_code=status)
