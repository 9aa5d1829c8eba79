from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from services.messenger.caps import Cap
from shared.storable import storable


class MessageOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    customer_id: str
    journey: str
    kind: str
    channel: str | None
    template: str | None
    locale: str | None
    tier: str | None
    status: str = Field(
        description="queued, sending, sent, delivered, held_quiet_hours, capped, no_consent, …"
    )
    reason: str | None = Field(
        description="Why: the cap, the consent, the quiet hours, the provider's answer."
    )
    send_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    attempts: int
    provider: str | None
    provider_message_id: str | None
    error_code: str | None
    trigger_event_id: str | None
    content: dict[str, Any] | None
    escalated: bool = Field(
        default=False,
        description="A complaint acknowledgement escalated to a person (a top-tier or valuable "
        "customer: the journey's escalate_if); its 'escalation' event is on retain.messages.",
    )

    @model_validator(mode="before")
    @classmethod
    def _escalated_from_details(cls, row: Any) -> Any:
        if isinstance(row, dict) and "escalated" not in row:
            return {**row, "escalated": bool((row.get("details") or {}).get("escalated"))}
        return row


class MessagesPage(BaseModel):
    messages: list[MessageOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older messages; null at the end.")


class SurveyCustomerOut(BaseModel):
    """The customer as the messenger knows them now (their latest profile from the segmenter)."""

    model_config = ConfigDict(extra="ignore", from_attributes=True)
    name: str | None
    email: str | None
    phone: str | None
    whatsapp: str | None
    tier: str | None = Field(description="Their tier now.")
    lifecycle_stage: str | None
    total_value: float = Field(description="Revenue to date, in reporting_currency.")
    predicted_clv: float | None = Field(description="The kpi's predicted CLV, if fitted yet.")
    reporting_currency: str


Note = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000), AfterValidator(storable)]


Agent = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(storable)
]


class FollowUpIn(BaseModel):
    """What support did about an answer (the call back, the refund, the apology)."""

    model_config = ConfigDict(extra="forbid")
    note: Note | None = Field(
        default=None,
        description="What was done, for whoever reads the answer next (at most 2,000 characters).",
    )
    agent: Agent | None = Field(
        default=None,
        description="Who took it up, as your support team names them (the API key may be shared).",
    )


class FollowUpOut(BaseModel):
    at: datetime = Field(description="When the follow-up was recorded (UTC).")
    by: str = Field(description="The id of the API key that recorded it.")
    note: str | None
    agent: str | None = Field(description="Who took it up, as support named them; null if not said.")


class FollowUpChangeOut(BaseModel):
    action: Literal["followed_up", "amended", "taken_back"] = Field(
        description="followed_up: taken up; amended: another note; taken_back: open again (DELETE)."
    )
    at: datetime
    by: str = Field(description="The id of the API key that made the change.")
    note: str | None
    agent: str | None = None


class SurveyAnswerOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message_id: str = Field(
        validation_alias="id", description="The message whose survey link was answered (GET /v1/messages)."
    )
    customer_id: str
    journey: str
    channel: str | None
    locale: str | None
    tier: str | None = Field(description="The customer's tier when the message was decided.")
    score: int = Field(description="1 (not at all) … 5 (very).")
    comment: str | None = Field(description="What the customer wrote, if anything.")
    answered_at: datetime = Field(validation_alias="created_at", description="When they answered (UTC).")
    customer: SurveyCustomerOut | None = Field(
        description="Who answered, to call them back and the valuable first; null if the messenger "
        "has no profile of them any more."
    )
    follow_up: FollowUpOut | None = Field(
        description="Support's follow-up of the answer (PUT /v1/surveys/{message_id}/follow-up); "
        "null while nobody has taken it up."
    )
    follow_up_history: list[FollowUpChangeOut] = Field(
        description="Every follow-up, amendment and take-back of the answer, oldest first."
    )


class SurveyAnswersPage(BaseModel):
    answers: list[SurveyAnswerOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older answers; null at the end.")


class ReplyMediaOut(BaseModel):
    url: str
    content_type: str = Field(description="e.g. image/jpeg.")


class ReplyOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(description="The provider's id of the inbound message (Twilio's MessageSid).")
    customer_id: str
    channel: str = Field(description="sms or whatsapp.")
    kind: Literal["reply", "help"] = Field(
        description="help: they asked for help (HELP, עזרה, مساعدة); reply: anything else but STOP/START."
    )
    text: str = Field(description="What the customer wrote (empty for a picture alone).")
    media: Annotated[list[ReplyMediaOut], BeforeValidator(lambda v: v or [])] = Field(
        description="What came with it (MMS, WhatsApp): Twilio's media URLs, which Twilio serves "
        "to the account (HTTP basic auth with the account SID and auth token)."
    )
    message_id: str | None = Field(
        description="Our last message to them on the channel, which they answered (GET /v1/messages); "
        "null if we had sent them none there."
    )
    journey: str | None = Field(description="That message's journey.")
    received_at: datetime = Field(validation_alias="created_at", description="When it came in (UTC).")
    customer: SurveyCustomerOut | None = Field(
        description="Who wrote, to answer them and the valuable first; null if the messenger has no "
        "profile of them any more."
    )
    follow_up: FollowUpOut | None = Field(
        description="Support's follow-up of the reply (PUT /v1/replies/{id}/follow-up); null while "
        "nobody has taken it up."
    )
    follow_up_history: list[FollowUpChangeOut] = Field(
        description="Every follow-up, amendment and take-back of the reply, oldest first."
    )


class RepliesPage(BaseModel):
    replies: list[ReplyOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older replies; null at the end.")


WaitStatus = Literal["waiting", "fired", "cancelled"]


class WaitOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    customer_id: str
    journey: str
    status: WaitStatus = Field(
        description="waiting: decided at due_at; fired: decided (see /v1/messages); cancelled: see reason."
    )
    due_at: datetime = Field(description="When the journey's message is decided, unless an exit comes first.")
    reason: str | None = Field(
        description="Why a wait was cancelled: the exit or 'unless' condition met, an event that came "
        "first, the journey disabled or removed."
    )
    trigger_event_id: str | None
    created_at: datetime


class WaitsPage(BaseModel):
    waits: list[WaitOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for older waits; null at the end.")


class CapsOut(BaseModel):
    caps: list[Cap]
    etag: str = Field(description="Send as If-Match with the next PUT, so no one else's change is undone.")
    updated_at: datetime | None
    updated_by: str | None
