"""The marketers' API: journeys and templates. Changes take effect on the consumer's next
batch and the sender's next pass (both reload a setting when its updated_at changes)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Response
from pydantic import AfterValidator, BaseModel, Field

from services.messenger.admin import MessengerAdmin, TemplateEntry, journey_etag, template_etag, template_key
from services.messenger.api import Reader, Service, Writer
from services.messenger.journeys import Journey
from services.messenger.templates import VARIABLES, SmsEncoding, Template
from shared.auth import allows
from shared.errors import ErrorResponse, ForbiddenError
from shared.events import Channel, MessageKind
from shared.http import ApiRoute, UniqueKeys, if_match_etag
from shared.storable import storable

router = APIRouter(route_class=ApiRoute)

JOURNEY_NAME = r"^[a-z][a-z0-9_]{0,63}$"
JourneyName = Annotated[str, Path(pattern=JOURNEY_NAME, description="The journey, e.g. win_back.")]
TemplateName = Annotated[str, Path(pattern=JOURNEY_NAME, description="The template name, e.g. win_back.")]
Locale = Annotated[
    str,
    Path(
        max_length=35,
        pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$",
        description="BCP 47: he, ar, en, he-IL …",
    ),
]

JOURNEY_EXAMPLE = {
    "name": "vip_thanks",
    "description": "Thank platinum customers after every purchase.",
    "trigger": {"event": "purchase"},
    "entry": {"field": "tier", "op": "eq", "value": "platinum"},
    "template": "thank_you",
    "reentry": "once_per_days",
    "reentry_days": 7,
    "holdout_percent": 10,
}
JourneyBody = Annotated[
    dict[str, Any],
    Body(
        examples=[JOURNEY_EXAMPLE],
        description="A journey; conditions use the segmenter's language over the profile snapshot.",
    ),
    AfterValidator(storable),
]
TemplateBody = Annotated[
    dict[str, Any],
    Body(
        examples=[{"text": "Hi{% if first_name %} {{ first_name }}{% endif %}! {{ unsubscribe_url }}"}],
        description="subject + html + text (email) or text (sms, whatsapp); kind defaults to the "
        "journey's. Variables: " + ", ".join(sorted(VARIABLES)) + ".",
    ),
    AfterValidator(storable),
]


def _admin(service: Service) -> MessengerAdmin:
    return MessengerAdmin(service)


Admin = Annotated[MessengerAdmin, Depends(_admin)]


class JourneysOut(BaseModel):
    journeys: list[Journey] = Field(description="Every journey, paused ones with enabled=false.")
    updated_at: datetime | None
    updated_by: str | None


class JourneyStatsOut(BaseModel):
    journey: str
    enabled: bool
    entered: int = Field(description="Entries into the journey (re-entries count again).")
    waiting: int = Field(description="Entries waiting for their delay (cool-off, a day after …).")
    decided: int = Field(description="Messages decided, whatever the outcome.")
    sent: int = Field(description="Handed to a provider: sent, delivered or undelivered.")
    pending: int = Field(description="Decided to go, not sent yet: queued, sending, held for quiet hours.")
    holdout: int = Field(description="Held out on purpose (control group): sent nothing.")
    not_sent: dict[str, int] = Field(
        description="Not sent, by reason: capped, no_consent, suppressed, no_address, expired, failed."
    )
    by_status: dict[str, int] = Field(description="Every message of the journey by its status.")
    converted: int | None = Field(
        default=None,
        description="Always null here. Conversion (a purchase within 7 days of a message, against "
        "the holdout) is the kpi service's: GET /v1/kpis/conversion. It sees purchases; the "
        "messenger sees only the updates that trigger journeys.",
    )


class TemplateKeyOut(BaseModel):
    journey: str
    channel: Channel
    locale: str
    overridden: bool = Field(description="A marketer's override is in force.")
    has_default: bool = Field(description="A packaged default exists (DELETE goes back to it).")


class TemplatesOut(BaseModel):
    templates: list[TemplateKeyOut]


class TemplateOut(TemplateKeyOut):
    kind: MessageKind
    subject: str | None
    html: str | None = Field(description="The email's body; the frame (dir, lang, footer) is added.")
    text: str
    content_sid: str | None
    content_variables: dict[str, str]


class PreviewIn(BaseModel):
    journey: str = Field(pattern=JOURNEY_NAME, description="The template name (a journey's template).")
    channel: Channel
    locale: str | None = Field(
        default=None,
        max_length=35,
        description="Default: the customer's, else en. Falls back he-IL → he → en.",
    )
    customer_id: Annotated[str | None, AfterValidator(storable)] = Field(
        default=None, max_length=128, description="Render with this customer's stored profile."
    )
    draft: Annotated[dict[str, Any] | None, AfterValidator(storable)] = Field(
        default=None,
        description="An unsaved template body (as for PUT /v1/templates/…) to render instead of the "
        "stored one, for exactly this journey, channel and locale (no fallback); checked as a save "
        "would be (422 names each problem). Nothing is stored.",
    )


class PreviewOut(BaseModel):
    template: str = Field(description="The template used after the locale fallback: journey/channel/locale.")
    overridden: bool
    draft: bool = Field(description="Rendered from the request's draft, not a stored template.")
    customer_id: str | None
    kind: MessageKind
    subject: str | None
    text: str
    html: str | None
    sms_segments: int | None
    sms_encoding: SmsEncoding | None
    direction: str
    lang: str
    content_sid: str | None = Field(
        description="WhatsApp: the approved template a message outside the customer's 24-hour "
        "window goes with (RETAIN_MESSENGER_WHATSAPP_CONTENT_SIDS, or the template's own HX…); "
        "null: none, so such a message goes on the customer's next channel."
    )
    content_variables: dict[str, str] = Field(
        description="WhatsApp: the approved template's numbered variables as filled here."
    )
    sample_data: list[str] = Field(
        description="Variables filled with sample values: all of them without a customer; with "
        "one, what a message takes from its trigger (order, ticket, offer …) and the links."
    )


def _key_out(entry: TemplateEntry) -> TemplateKeyOut:
    key = entry.key
    return TemplateKeyOut(
        journey=key.journey,
        channel=key.channel,
        locale=key.locale,
        overridden=entry.overridden,
        has_default=entry.has_default,
    )


def _template_out(entry: TemplateEntry, template: Template) -> TemplateOut:
    return TemplateOut(
        **_key_out(entry).model_dump(),
        kind=template.kind,
        subject=template.subject,
        html=template.html,
        text=template.text,
        content_sid=template.content_sid,
        content_variables=template.content_variables,
    )


# --- journeys ----------------------------------------------------------------------------------


@router.get("/v1/journeys", response_model=JourneysOut, tags=["journeys"], summary="Every journey")
async def list_journeys(_key: Reader, admin: Admin) -> JourneysOut:
    found = await admin.journeys()
    return JourneysOut(journeys=found.journeys, updated_at=found.updated_at, updated_by=found.updated_by)


# Optional on the journeys' and templates' edits (the caps require one): given, a stale one is a
# 412 rather than an edit made meanwhile overwritten; the GETs and the edits give the ETag.
IfMatch = Annotated[
    str | None,
    Header(description="The ETag of the journey or template you read: a 412 if it changed since."),
]
_STALE: dict[int | str, dict[str, Any]] = {
    412: {"model": ErrorResponse, "description": "It changed since you read it (stale If-Match)."}
}


def _tagged(response: Response, etag: str) -> None:
    response.headers["ETag"] = f'"{etag}"'


@router.get("/v1/journeys/{name}", response_model=Journey, tags=["journeys"], summary="One journey (ETag)")
async def get_journey(name: JourneyName, _key: Reader, admin: Admin, response: Response) -> Journey:
    journey = await admin.journey(name)
    _tagged(response, journey_etag(journey))
    return journey


@router.post(
    "/v1/journeys",
    response_model=Journey,
    status_code=201,
    tags=["journeys"],
    summary="Create a journey (409 if the name is taken; 422 names the JSON path of each problem)",
    responses={409: {"model": ErrorResponse, "description": "A journey of this name exists."}},
)
async def create_journey(body: JourneyBody, key: Writer, _keys: UniqueKeys, admin: Admin) -> Journey:
    return await admin.create_journey(body, key.id)


@router.put(
    "/v1/journeys/{name}",
    response_model=Journey,
    tags=["journeys"],
    summary="Replace a journey (422 names the JSON path of each problem; If-Match: the ETag you read)",
    responses=_STALE,
)
async def replace_journey(
    name: JourneyName,
    body: JourneyBody,
    key: Writer,
    _keys: UniqueKeys,
    admin: Admin,
    response: Response,
    if_match: IfMatch = None,
) -> Journey:
    journey = await admin.replace_journey(name, body, key.id, if_match_etag(if_match))
    _tagged(response, journey_etag(journey))
    return journey


@router.delete(
    "/v1/journeys/{name}",
    status_code=204,
    tags=["journeys"],
    summary="Delete a journey (its waiting and held messages are cancelled when due)",
    responses=_STALE,
)
async def delete_journey(name: JourneyName, key: Writer, admin: Admin, if_match: IfMatch = None) -> Response:
    await admin.delete_journey(name, key.id, if_match_etag(if_match))
    return Response(status_code=204)


@router.post(
    "/v1/journeys/{name}/pause",
    response_model=Journey,
    tags=["journeys"],
    summary="Pause: no new entries; waiting and held messages are cancelled when due",
    responses=_STALE,
)
async def pause_journey(
    name: JourneyName, key: Writer, admin: Admin, response: Response, if_match: IfMatch = None
) -> Journey:
    return await _switched(admin, name, False, key.id, response, if_match)


@router.post(
    "/v1/journeys/{name}/resume",
    response_model=Journey,
    tags=["journeys"],
    summary="Resume",
    responses=_STALE,
)
async def resume_journey(
    name: JourneyName, key: Writer, admin: Admin, response: Response, if_match: IfMatch = None
) -> Journey:
    return await _switched(admin, name, True, key.id, response, if_match)


async def _switched(
    admin: MessengerAdmin, name: str, enabled: bool, actor: str, response: Response, if_match: str | None
) -> Journey:
    journey = await admin.set_enabled(name, enabled, actor, if_match_etag(if_match))
    _tagged(response, journey_etag(journey))
    return journey


@router.get(
    "/v1/journeys/{name}/stats",
    response_model=JourneyStatsOut,
    tags=["journeys"],
    summary="Entered, waiting, sent, not sent by reason, holdout",
)
async def journey_stats(name: JourneyName, _key: Reader, admin: Admin) -> JourneyStatsOut:
    stats = await admin.stats(name)
    return JourneyStatsOut(
        journey=stats.journey,
        enabled=stats.enabled,
        entered=stats.entered,
        waiting=stats.waiting,
        decided=stats.decided,
        sent=stats.sent,
        pending=stats.pending,
        holdout=stats.holdout,
        not_sent=stats.not_sent,
        by_status=stats.by_status,
    )


# --- templates ---------------------------------------------------------------------------------


@router.get(
    "/v1/templates",
    response_model=TemplatesOut,
    tags=["templates"],
    summary="Every template: journey × channel × locale, overridden or default",
)
async def list_templates(_key: Reader, admin: Admin) -> TemplatesOut:
    return TemplatesOut(templates=[_key_out(e) for e in await admin.templates()])


@router.post(
    "/v1/templates/preview",
    response_model=PreviewOut,
    tags=["templates"],
    summary="Render a template, stored or a draft, for a customer or sample data, with its SMS segments",
    responses={404: {"model": ErrorResponse, "description": "No such template or customer."}},
)
async def preview_template(body: PreviewIn, key: Reader, _keys: UniqueKeys, admin: Admin) -> PreviewOut:
    if body.draft is not None and not allows(key, "messages:write"):
        # A draft is a template to run in the sandbox: what saving one needs.
        raise ForbiddenError("previewing a draft needs the scope 'messages:write', as saving one does")
    preview = await admin.preview(body.journey, body.channel, body.locale, body.customer_id, body.draft)
    rendered = preview.rendered
    return PreviewOut(
        template=str(rendered.key),
        overridden=preview.overridden,
        draft=preview.draft,
        customer_id=preview.customer_id,
        kind=rendered.kind,
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
        sms_segments=rendered.sms_segments,
        sms_encoding=rendered.sms_encoding,
        direction=rendered.direction,
        lang=rendered.lang,
        content_sid=rendered.content_sid,
        content_variables=rendered.content_variables,
        sample_data=preview.sample_data,
    )


@router.get(
    "/v1/templates/{journey}/{channel}/{locale}",
    response_model=TemplateOut,
    tags=["templates"],
    summary="One template, exactly this key (no locale fallback; ETag)",
)
async def get_template(
    journey: TemplateName, channel: Channel, locale: Locale, _key: Reader, admin: Admin, response: Response
) -> TemplateOut:
    entry, template = await admin.template(template_key(journey, channel, locale))
    _tagged(response, template_etag(template))
    return _template_out(entry, template)


@router.put(
    "/v1/templates/{journey}/{channel}/{locale}",
    response_model=TemplateOut,
    tags=["templates"],
    summary="Override a template (validated in the sandbox with sample data; 422 names each problem; "
    "If-Match: the ETag you read)",
    responses=_STALE,
)
async def put_template(
    journey: TemplateName,
    channel: Channel,
    locale: Locale,
    body: TemplateBody,
    key: Writer,
    _keys: UniqueKeys,
    admin: Admin,
    response: Response,
    if_match: IfMatch = None,
) -> TemplateOut:
    target = template_key(journey, channel, locale)
    entry, template = await admin.put_template(target, body, key.id, if_match_etag(if_match))
    _tagged(response, template_etag(template))
    return _template_out(entry, template)


@router.delete(
    "/v1/templates/{journey}/{channel}/{locale}",
    status_code=204,
    tags=["templates"],
    summary="Drop the override: the default applies again",
    responses={
        409: {"model": ErrorResponse, "description": "The last template of a journey in use."},
        **_STALE,
    },
)
async def reset_template(
    journey: TemplateName,
    channel: Channel,
    locale: Locale,
    key: Writer,
    admin: Admin,
    if_match: IfMatch = None,
) -> Response:
    await admin.reset_template(template_key(journey, channel, locale), key.id, if_match_etag(if_match))
    return Response(status_code=204)
