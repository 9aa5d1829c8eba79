from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from services.segmenter.rules import validate_rules
from services.segmenter.schemas import (
    RULES_EXAMPLE,
    AuditEntry,
    CustomerOut,
    DraftOut,
    GroupOut,
    JobOut,
    MemberOut,
    MembersPage,
    PreviewOut,
    PublishOut,
    RulesProblem,
    SegmentsOut,
    TiersOut,
    ValidationOut,
    VersionOut,
    VersionSummary,
)
from services.segmenter.service import (
    InvalidRulesError,
    NothingToPublishError,
    RulesConflictError,
    SegmenterService,
    UnknownVersionError,
)
from shared.auth import ApiKey, KeyStore, require_scope
from shared.errors import (
    ConflictError,
    ErrorResponse,
    InvalidInputError,
    NotFoundError,
    PreconditionFailedError,
    RetainError,
)
from shared.http import ApiRoute, UniqueKeys, if_match_etag
from shared.storable import storable

router = APIRouter(route_class=ApiRoute)


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _service(request: Request) -> SegmenterService:
    service: SegmenterService = request.app.state.service
    return service


Reader = Annotated[ApiKey, Depends(require_scope(_store, "rules:read"))]
Writer = Annotated[ApiKey, Depends(require_scope(_store, "rules:write"))]
Service = Annotated[SegmenterService, Depends(_service)]
RulesBody = Annotated[
    dict[str, Any], Body(examples=[RULES_EXAMPLE], description="A rule set."), AfterValidator(storable)
]
# Versions are a 32-bit integer column: a larger number names no version, and PostgreSQL would
# refuse it as a query argument (a 500) rather than find nothing.
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _invalid(exc: InvalidRulesError, what: str = "the rule set is not valid") -> InvalidInputError:
    return InvalidInputError(what, details=[{"path": e.path, "message": e.message} for e in exc.errors])


def _draft_etag(value: str | None) -> str | None:
    """If-Match of a draft replacement: ``*`` matches whatever draft there is (RFC 9110 13.1.1),
    as no header does; anything else must be the draft's current ETag."""
    etag = if_match_etag(value)
    return None if etag == "*" else etag


@router.get("/v1/rules/draft", response_model=DraftOut, tags=["rules"], summary="The draft being edited")
async def get_draft(_key: Reader, service: Service) -> JSONResponse:
    rules, etag, updated_at, updated_by = await service.draft()
    body = DraftOut(rules=rules, etag=etag, updated_at=updated_at, updated_by=updated_by)
    return JSONResponse(body.model_dump(mode="json"), headers={"ETag": f'"{etag}"'})


@router.put(
    "/v1/rules/draft",
    response_model=DraftOut,
    tags=["rules"],
    summary="Replace the draft (If-Match: the ETag you read, to not overwrite someone else's edit)",
    responses={412: {"description": "the draft changed since you read it"}, 422: {"description": "invalid"}},
)
async def put_draft(
    rules: RulesBody,
    key: Writer,
    _keys: UniqueKeys,
    service: Service,
    if_match: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    try:
        etag = await service.put_draft(rules, key.id, _draft_etag(if_match))
    except InvalidRulesError as exc:
        raise _invalid(exc) from exc
    except RulesConflictError as exc:
        raise PreconditionFailedError(
            "the draft changed or was published since you read it (a publish gives the draft a new "
            "ETag, so that one ETag publishes once): GET /v1/rules/draft for its ETag"
        ) from exc
    body = DraftOut(rules=rules, etag=etag, updated_at=datetime.now(UTC), updated_by=key.id)
    return JSONResponse(body.model_dump(mode="json"), headers={"ETag": f'"{etag}"'})


@router.post("/v1/rules/validate", response_model=ValidationOut, tags=["rules"], summary="Check a rule set")
async def validate(rules: RulesBody, _key: Reader, _keys: UniqueKeys) -> ValidationOut:
    errors = validate_rules(rules)
    return ValidationOut(
        valid=not errors, errors=[RulesProblem(path=e.path, message=e.message) for e in errors]
    )


@router.post(
    "/v1/rules/preview",
    response_model=PreviewOut,
    tags=["rules"],
    summary="Who would move if these rules (default: the draft) were published",
)
async def preview(
    _key: Reader,
    _keys: UniqueKeys,
    service: Service,
    rules: Annotated[dict[str, Any] | None, Body(examples=[RULES_EXAMPLE]), AfterValidator(storable)] = None,
    sample: Annotated[int, Query(ge=0, le=200)] = 20,
) -> PreviewOut:
    if rules is None:
        rules, *_ = await service.draft()
    try:
        p = await service.preview(rules, sample)
    except InvalidRulesError as exc:
        raise _invalid(exc) from exc
    return PreviewOut(**asdict(p))


@router.post(
    "/v1/rules/publish",
    response_model=PublishOut,
    status_code=202,
    tags=["rules"],
    summary="Publish the draft as a new immutable version (If-Match: the draft's ETag)",
    responses={
        409: {"model": ErrorResponse, "description": "The draft is the published rules: nothing to publish."},
        412: {"description": "stale ETag"},
        428: {"description": "If-Match missing"},
    },
)
async def publish(
    request: Request,
    key: Writer,
    service: Service,
    if_match: Annotated[str | None, Header()] = None,
    note: Annotated[str | None, Query(max_length=500)] = None,
) -> PublishOut:
    etag = if_match_etag(if_match)
    if etag is None or etag == "*":
        # "*" matches any draft (a PUT may overwrite whatever is there), but a publish must
        # say which one it read: what was previewed is what goes out, once.
        said = "" if etag is None else " (If-Match: * does not say which draft you read)"
        raise RetainError(
            f"If-Match with the draft's ETag is required{said}: GET /v1/rules/draft for it",
            status_code=428,
            code="precondition_required",
        )
    try:
        version, job_id = await service.publish(key.id, etag, note)
    except RulesConflictError as exc:
        raise PreconditionFailedError(
            "the draft changed since you read it (stale ETag); GET it again"
        ) from exc
    except NothingToPublishError as exc:
        raise ConflictError(
            f"nothing to publish: the draft is version {exc.version}'s rules, published; edit it first "
            f"(POST /v1/rules/rollback/{exc.version} re-evaluates everyone under them, if that is the aim)",
            code="unchanged",
        ) from exc
    except InvalidRulesError as exc:
        raise _invalid(exc) from exc
    return PublishOut(version=version, job_id=job_id, job=str(request.url_for("get_job", job_id=job_id)))


@router.get("/v1/rules/versions", response_model=list[VersionSummary], tags=["rules"])
async def versions(_key: Reader, service: Service) -> list[VersionSummary]:
    return [VersionSummary(**r._mapping) for r in await service.versions()]


@router.get("/v1/rules/versions/{n}", response_model=VersionOut, tags=["rules"])
async def version(n: VersionNumber, _key: Reader, service: Service) -> VersionOut:
    row = await service.version(n)
    if row is None:
        raise NotFoundError(f"no rule version {n}")
    return VersionOut(**row._mapping)


@router.post(
    "/v1/rules/rollback/{n}",
    response_model=PublishOut,
    status_code=202,
    tags=["rules"],
    summary="Publish version n's rules again as a new version",
    responses={
        409: {"model": ErrorResponse, "description": "Another publish at the same moment."},
        422: {"model": ErrorResponse, "description": "Version n is not valid under the current validation."},
    },
)
async def rollback(n: VersionNumber, request: Request, key: Writer, service: Service) -> PublishOut:
    try:
        version_no, job_id = await service.rollback(n, key.id)
    except UnknownVersionError as exc:
        raise NotFoundError(f"no rule version {n}") from exc
    except InvalidRulesError as exc:
        # Published before a release whose validation refuses what it holds.
        raise _invalid(exc, f"rule version {n} is not valid now; publish a corrected draft instead") from exc
    except RulesConflictError as exc:
        raise ConflictError("another publish happened at the same moment; try again") from exc
    return PublishOut(version=version_no, job_id=job_id, job=str(request.url_for("get_job", job_id=job_id)))


@router.get("/v1/rules/jobs/{job_id}", response_model=JobOut, tags=["rules"], name="get_job")
async def get_job(job_id: Annotated[str, Path(max_length=36)], _key: Reader, service: Service) -> JobOut:
    job = await service.job(job_id)
    if job is None:
        raise NotFoundError(f"no publish job {job_id}")
    eta: float | None = None
    if job.status == "running" and job.started_at and job.done:
        elapsed = (datetime.now(UTC) - job.started_at).total_seconds()
        eta = round(elapsed / job.done * max(job.total - job.done, 0), 1)
    elif job.status in ("done", "superseded"):
        eta = 0.0
    return JobOut(**{k: getattr(job, k) for k in JobOut.model_fields if k != "eta_s"}, eta_s=eta)


@router.get(
    "/v1/rules/audit", response_model=list[AuditEntry], tags=["rules"], summary="Who changed what, when"
)
async def audit(
    _key: Reader, service: Service, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditEntry]:
    return [AuditEntry(**r._mapping) for r in await service.audit_log(limit)]


@router.get(
    "/v1/customers/{customer_id:path}",  # :path: an id may hold a slash (acme/42)
    response_model=CustomerOut,
    tags=["customers"],
    summary="Profile, tier, segments, and which condition of which rule made them",
)
async def customer(
    customer_id: Annotated[str, Path(max_length=128)], _key: Reader, service: Service
) -> dict[str, Any]:
    found = await service.customer(customer_id)
    if found is None:
        raise NotFoundError(f"no customer {customer_id!r}")
    return found


@router.get(
    "/v1/tiers",
    response_model=TiersOut,
    tags=["customers"],
    summary="The published tiers with how many customers are in each",
)
async def tiers(_key: Reader, service: Service) -> TiersOut:
    version, tiers = await service.groups("tiers")
    return TiersOut(
        version=version, tiers=[GroupOut(name=n, description=d, customers=c) for n, d, c in tiers]
    )


@router.get(
    "/v1/segments",
    response_model=SegmentsOut,
    tags=["customers"],
    summary="The published segments with how many customers are in each",
)
async def segments(_key: Reader, service: Service) -> SegmentsOut:
    version, segments = await service.groups("segments")
    return SegmentsOut(
        version=version, segments=[GroupOut(name=n, description=d, customers=c) for n, d, c in segments]
    )


@router.get("/v1/segments/{name}/customers", response_model=MembersPage, tags=["customers"])
async def members(
    name: Annotated[str, Path(max_length=64)],
    _key: Reader,
    service: Service,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MembersPage:
    if not await service.known_segment(name):
        raise NotFoundError(f"no segment {name!r} in the published rules")
    rows = await service.segment_members(name, cursor, limit)
    return MembersPage(
        segment=name,
        customers=[MemberOut(customer_id=c, entered_at=at) for c, at in rows],
        next_cursor=rows[-1][0] if len(rows) == limit else None,
    )
