from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BeforeValidator

from services.kpi.periods import Granularity, buckets
from services.kpi.schemas import (
    ChurnOut,
    ClvModelOut,
    ClvSummaryOut,
    CohortsOut,
    ConversionOut,
    CsatOut,
    CustomerClvOut,
    ResponseTimeOut,
)
from services.kpi.service import InsufficientDataError, KpiQuery, KpiService
from shared.auth import ApiKey, KeyStore, require_scope
from shared.errors import InvalidInputError, NotFoundError
from shared.http import ApiRoute

router = APIRouter(route_class=ApiRoute)

DEFAULT_DAYS = 30
MAX_DAYS = 3660
MAX_BUCKETS = 1000


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _service(request: Request) -> KpiService:
    service: KpiService = request.app.state.service
    return service


Reader = Annotated[ApiKey, Depends(require_scope(_store, "kpi:read"))]
Service = Annotated[KpiService, Depends(_service)]
# Days outside these make no report and, near date.min/max, overflow the arithmetic of periods.
EARLIEST = date(1900, 1, 1)
LATEST = date(2999, 12, 31)
ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_day(value: object) -> object:
    """Only YYYY-MM-DD: pydantic's date also reads a Unix time ('1767225600') and a datetime at
    midnight ('2026-01-01T00:00:00Z', in whose zone?) as a day, and answers '20260101' with a
    message about datetimes; a report's first or last day is none of those."""
    if isinstance(value, str) and not ISO_DAY.fullmatch(value):
        raise ValueError(f"expected a day as YYYY-MM-DD, got {value[:40]!r}")
    return value


Day = Annotated[date, BeforeValidator(_iso_day)]
From = Annotated[
    Day | None,
    Query(
        alias="from",
        ge=EARLIEST,
        le=LATEST,
        description="First local day, YYYY-MM-DD, 1900-01-01 … 2999-12-31 (default: 29 days before 'to').",
    ),
]
To = Annotated[
    Day | None,
    Query(ge=EARLIEST, le=LATEST, description="Last local day, included, 1900 … 2999 (default: today)."),
]
Grain = Annotated[Granularity, Query(description="Bucket size: day, week (ISO, Monday) or month.")]


def _query(
    service: KpiService,
    first: date | None,
    last: date | None,
    granularity: Granularity,
    by: str | None,
    *,
    rows_to_today: bool = False,
) -> KpiQuery:
    """The query, or a 422 naming what is wrong. ``rows_to_today``: each row of the answer runs
    from its bucket to today whatever 'to' is (a cohort's), so the buckets are counted to today."""
    today = service.today()
    last = last or today
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    end = max(last, today) if rows_to_today else last
    problems: list[dict[str, str]] = []
    if last < first:
        problems.append({"field": "query.to", "message": f"'to' ({last}) is before 'from' ({first})"})
    elif (last - first).days >= MAX_DAYS:
        problems.append({"field": "query.from", "message": f"the range may span at most {MAX_DAYS} days"})
    elif len(buckets(first, end, granularity, service.tz)) > MAX_BUCKETS:
        through = f"from 'from' ({first}) to today" if end > last else "in the range"
        problems.append(
            {
                "field": "query.granularity",
                "message": f"more than {MAX_BUCKETS} {granularity.value} buckets {through}: "
                "use a coarser granularity" + (" or a later 'from'" if end > last else ""),
            }
        )
    if problems:
        raise InvalidInputError("the request is not valid", details=problems)
    return KpiQuery(first, last, granularity, by)


@router.get(
    "/v1/kpis/response-time",
    response_model=ResponseTimeOut,
    tags=["kpis"],
    summary="First response and resolution times, target breaches, high-value complaints",
)
async def response_time(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.DAY,
    by: Annotated[
        Literal["category", "priority", "tier", "channel", "complaint"] | None,
        Query(description="Break every block down by this (tier and channel: the customer's latest)."),
    ] = None,
) -> dict[str, Any]:
    return await service.response_time(_query(service, from_, to, granularity, by))


@router.get(
    "/v1/kpis/churn",
    response_model=ChurnOut,
    tags=["kpis"],
    summary="Contractual and non-contractual churn rates, and win-back by churn reason",
)
async def churn(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.MONTH,
    by: Annotated[Literal["reason", "tier"] | None, Query(description="Break churn down by this.")] = None,
) -> dict[str, Any]:
    return await service.churn(_query(service, from_, to, granularity, by))


@router.get(
    "/v1/kpis/cohorts",
    response_model=CohortsOut,
    tags=["kpis"],
    summary="Retention table by cohort of first purchase",
)
async def cohorts(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.MONTH,
    by: Annotated[
        Literal["tier", "locale", "channel"] | None, Query(description="One table per value of this.")
    ] = None,
) -> dict[str, Any]:
    # A cohort's row runs to today, whatever 'to' is: counted to 'to' only, a daily table from
    # years back answered with millions of cells.
    return await service.cohorts(_query(service, from_, to, granularity, by, rows_to_today=True))


@router.get(
    "/v1/kpis/conversion",
    response_model=ConversionOut,
    tags=["kpis"],
    summary="Conversion of outreach, uplift against holdout, revenue per message, delivery",
)
async def conversion(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.DAY,
    by: Annotated[
        Literal["journey", "channel", "tier", "locale"] | None,
        Query(description="Break down by this (as stamped on each message)."),
    ] = None,
) -> dict[str, Any]:
    return await service.conversion(_query(service, from_, to, granularity, by))


@router.get(
    "/v1/kpis/csat",
    response_model=CsatOut,
    tags=["kpis"],
    summary="Customer satisfaction from survey answers: CSAT (4–5 of 5), mean score, high-value customers",
)
async def csat(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.DAY,
    by: Annotated[
        Literal["journey", "channel", "tier", "locale"] | None,
        Query(description="Break down by this (as stamped on the answered message)."),
    ] = None,
) -> dict[str, Any]:
    return await service.csat(_query(service, from_, to, granularity, by))


@router.get(
    "/v1/kpis/clv/summary",
    response_model=ClvSummaryOut,
    tags=["kpis", "clv"],
    summary="Revenue per period, and the latest CLV predictions summed up",
)
async def clv_summary(
    _key: Reader,
    service: Service,
    from_: From = None,
    to: To = None,
    granularity: Grain = Granularity.MONTH,
    by: Annotated[
        Literal["tier", "locale", "channel"] | None,
        Query(description="Break the predictions down by this."),
    ] = None,
) -> dict[str, Any]:
    return await service.clv_summary(_query(service, from_, to, granularity, by))


@router.get(
    "/v1/clv/model",
    response_model=ClvModelOut,
    tags=["clv"],
    summary="BG/NBD + Gamma-Gamma fitted on the purchases up to and including as_of (cached)",
    responses={422: {"description": "invalid date, or not enough purchases to fit"}},
)
async def clv_model(
    _key: Reader,
    service: Service,
    as_of: Annotated[
        Day | None,
        Query(ge=EARLIEST, le=LATEST, description="Calibration cutoff, YYYY-MM-DD (default: today)."),
    ] = None,
) -> dict[str, Any]:
    today = service.today()
    cutoff = as_of or today
    if cutoff > today:
        raise InvalidInputError(
            "the request is not valid",
            details=[{"field": "query.as_of", "message": f"{cutoff} is in the future (today is {today})"}],
        )
    try:
        return await service.clv_model(cutoff)
    except InsufficientDataError as exc:
        raise InvalidInputError(
            str(exc), details=[{"field": "query.as_of", "message": str(exc)}], code="insufficient_data"
        ) from exc


@router.get(
    "/v1/customers/{customer_id:path}/clv",  # :path: an id may hold a slash (acme/42)
    response_model=CustomerClvOut,
    tags=["clv"],
    summary="A customer's historic value, P(alive), expected purchases in 90 days, predicted CLV",
)
async def customer_clv(
    customer_id: Annotated[str, Path(min_length=1, max_length=128)], _key: Reader, service: Service
) -> dict[str, Any]:
    try:
        found = await service.customer_clv(customer_id)
    except InsufficientDataError as exc:
        raise InvalidInputError(str(exc), code="insufficient_data") from exc
    if found is None:
        raise NotFoundError(f"no purchases of customer {customer_id!r}")
    return found
