from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from services.segmenter.rules import default_rules

RULES_EXAMPLE = default_rules()


class RulesProblem(BaseModel):
    path: str = Field(description="JSON path of the problem, e.g. $.tiers[0].when.all[1].value")
    message: str


class DraftOut(BaseModel):
    rules: dict[str, Any]
    etag: str = Field(description="Send it back as If-Match to publish or replace this draft.")
    updated_at: datetime
    updated_by: str


class ValidationOut(BaseModel):
    valid: bool
    errors: list[RulesProblem]


class PreviewOut(BaseModel):
    customers: int
    published_version: int | None
    tiers: dict[str, int] = Field(description="Customers per tier under the previewed rules.")
    segments: dict[str, int] = Field(description="Customers per segment under the previewed rules.")
    tier_moves: dict[str, dict[str, int]] = Field(description="from tier → to tier → customers moving.")
    segments_entered: dict[str, int]
    segments_left: dict[str, int]
    sample: list[dict[str, Any]] = Field(description="Some of the customers who would change.")


class PublishOut(BaseModel):
    version: int
    job_id: str
    job: str = Field(description="URL of the re-evaluation job's progress.")


class VersionSummary(BaseModel):
    version: int
    created_at: datetime
    created_by: str
    note: str | None


class VersionOut(VersionSummary):
    rules: dict[str, Any]


class JobOut(BaseModel):
    id: str
    version: int
    status: str = Field(description="pending, running, done or superseded (by a newer publish).")
    done: int
    total: int
    changed: int
    eta_s: float | None = Field(description="Seconds left at the rate so far; null until known.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class AuditEntry(BaseModel):
    at: datetime
    actor: str = Field(description="API key id of who did it ('system' for the default).")
    action: str
    version: int | None
    diff: list[dict[str, Any]] = Field(description="JSON Patch (RFC 6902) from the previous rules.")


class CustomerOut(BaseModel):
    customer_id: str
    tier: str
    segments: list[str]
    lifecycle_stage: str
    rule_version: int
    updated_at: datetime
    next_check_at: datetime | None
    profile: dict[str, Any]
    consents: dict[str, Any]
    why: dict[str, Any] = Field(description="Every tier and segment rule, matched or not, leaf by leaf.")


class MemberOut(BaseModel):
    customer_id: str
    entered_at: datetime


class MembersPage(BaseModel):
    segment: str
    customers: list[MemberOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end.")


class GroupOut(BaseModel):
    name: str
    description: str
    customers: int = Field(description="Customers in it now (a publish in progress moves them).")


class TiersOut(BaseModel):
    version: int = Field(description="The published rule version the tiers come from.")
    tiers: list[GroupOut] = Field(description="In ladder order, then 'none' (no tier matched).")


class SegmentsOut(BaseModel):
    version: int = Field(description="The published rule version the segments come from.")
    segments: list[GroupOut] = Field(description="In the rule set's order.")
