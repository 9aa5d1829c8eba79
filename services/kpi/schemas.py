"""The KPI API's response models. The service returns the pure modules' dataclasses; these
models read them by attribute (``from_attributes``) and fix the JSON shape and its docs."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)


class Header(_Out):
    from_: date = Field(alias="from", description="First local day (included).")
    to: date = Field(description="Last local day (included).")
    granularity: str
    by: str | None = Field(description="The breakdown asked for, if any.")
    timezone: str = Field(description="Days are local to this zone.")


# --- response time -----------------------------------------------------------------------------------


class DurationsOut(_Out):
    count: int
    p50_s: float | None = Field(description="Median, seconds (linear interpolation, as percentile_cont).")
    p90_s: float | None
    mean_s: float | None


class ResponseStatsOut(_Out):
    tickets: int = Field(description="Tickets opened in the period.")
    first_response: DurationsOut = Field(description="Opened → first agent reply, answered tickets.")
    resolution: DurationsOut = Field(description="Opened → final resolution, resolved tickets.")
    unanswered: int
    open: int = Field(description="Not resolved now.")
    reopened_tickets: int
    breached: int = Field(description="First-response target breached (late, or not answered in time).")
    pending: int = Field(description="Not answered yet, target not passed yet.")
    breach_rate: float | None = Field(description="breached / tickets.")


class ResponseBlock(_Out):
    stats: ResponseStatsOut
    groups: dict[str, ResponseStatsOut] = Field(description="Per value of the breakdown (by=).")


class ResponseBucket(ResponseBlock):
    start: date
    end: date


UNCONVERTED_HIGH_VALUE = (
    "Of the period's {what} not counted high-value, those whose customer bought before it in a "
    "currency without an exchange rate: that revenue is not known, so they may belong there."
)


class HighValueComplaints(ResponseBlock):
    threshold: float = Field(description="Revenue before the ticket (reporting currency) that makes it one.")
    with_unconverted_purchases: int = Field(description=UNCONVERTED_HIGH_VALUE.format(what="complaints"))


class OpenInBreach(_Out):
    count: int = Field(description="Unresolved tickets already past their first-response target.")
    groups: dict[str, int] = Field(description="By the breakdown asked for, else by category.")
    oldest_opened_at: datetime | None


class ResponseTimeOut(Header):
    first_response_targets_h: dict[str, float]
    total: ResponseBlock
    buckets: list[ResponseBucket]
    high_value_complaints: HighValueComplaints
    open_in_breach: OpenInBreach


# --- churn ---------------------------------------------------------------------------------------------


class ChurnCountOut(_Out):
    active_at_start: int
    churned: int
    rate: float | None = Field(description="churned / active_at_start.")


class WinBackOut(_Out):
    episodes: int = Field(description="Churn episodes (cancellations) that began in the period.")
    won_back: int = Field(description="… followed by a purchase within the win-back window.")
    pending: int = Field(description="… not back yet, window still open.")
    rate: float | None = Field(description="won_back / episodes.")


class ChurnBlock(_Out):
    contractual: ChurnCountOut
    non_contractual: ChurnCountOut | None = Field(
        description="Lapsed, and P(alive) at the lapse below p_alive_threshold; null before the "
        "first CLV model is fitted."
    )
    lapsed: ChurnCountOut = Field(description="The non-contractual window alone: no purchase for W.")
    groups: dict[str, dict[str, ChurnCountOut]] | None = Field(
        default=None, description="kind → breakdown value → counts (by=reason: contractual only)."
    )
    win_back: dict[str, WinBackOut] = Field(description="By cancellation reason, and 'all'.")


class ChurnBucket(ChurnBlock):
    start: date
    end: date


class PAliveModelOut(_Out):
    as_of: date = Field(description="The CLV model's calibration cutoff (local day).")
    fitted_at: datetime
    r: float
    alpha: float
    a: float
    b: float


class ChurnOut(Header):
    churn_window_days: int
    p_alive_threshold: float
    p_alive_model: PAliveModelOut | None = Field(
        description="The BG/NBD parameters P(alive) was computed with: the latest fitted model."
    )
    win_back_days: int
    total: ChurnBlock
    buckets: list[ChurnBucket]


class CohortOut(_Out):
    start: date = Field(description="First local day of the cohort's first-purchase bucket.")
    size: int
    active: list[int] = Field(description="Customers with a purchase in bucket k after the cohort's.")
    retention: list[float] = Field(description="active[k] / size.")


class CohortsOut(Header):
    cohorts: list[CohortOut]
    groups: dict[str, list[CohortOut]] | None = None


# --- conversion --------------------------------------------------------------------------------------


class ConversionStatsOut(_Out):
    sent: int = Field(description="Treatment messages (reached 'sent').")
    conversions: int
    conversion_rate: float | None
    revenue: float = Field(description="Purchases within the window after each sent message.")
    revenue_per_message: float | None
    holdout: int = Field(
        description="Held-out messages (the journey's control group) of the journeys with both arms here."
    )
    holdout_conversions: int
    holdout_rate: float | None
    assigned: int = Field(
        description="The uplift's other arm (intent to treat): messages of the journeys with a holdout "
        "here that were not held out, sent or not (capped, no consent, expired …)."
    )
    assigned_conversions: int = Field(
        description="Assigned messages followed by a purchase, from the decision."
    )
    assigned_rate: float | None
    uplift: float | None = Field(
        description="assigned_rate - holdout_rate (intent to treat); null when no journey has both "
        "arms here, and in a breakdown by channel (a held-out message has none)."
    )
    uplift_ci_low: float | None = Field(description="95 % Newcombe hybrid score interval.")
    uplift_ci_high: float | None
    attempted: int
    delivered: int
    failed: int
    delivery_rate: float | None
    failure_rate: float | None
    actions: int = Field(description="Replies + clicks + purchases within the window, delivered messages.")
    actions_per_engagement: float | None = Field(description="actions / delivered.")
    unconverted_purchases: int = Field(description="Purchases in windows without an exchange rate.")


class ConversionBlock(_Out):
    stats: ConversionStatsOut
    groups: dict[str, ConversionStatsOut]


class ConversionBucket(ConversionBlock):
    start: date
    end: date


class ConversionOut(Header):
    window_days: float
    currency: str
    uplift_interval: str
    total: ConversionBlock
    buckets: list[ConversionBucket]


# --- customer satisfaction ------------------------------------------------------------------------------


class CsatStatsOut(_Out):
    answers: int = Field(description="Survey answers, the first of each message.")
    satisfied: int = Field(description="Answers of 4 or 5.")
    neutral: int = Field(description="Answers of 3.")
    dissatisfied: int = Field(description="Answers of 1 or 2.")
    csat: float | None = Field(description="satisfied / answers; null without answers.")
    csat_ci_low: float | None = Field(description="95 % Wilson score interval of csat.")
    csat_ci_high: float | None = Field(description="Its upper bound.")
    mean_score: float | None = Field(description="The mean of the answers, on the 1–5 scale.")
    scores: dict[str, int] = Field(description='Answers per score, "1" to "5".')


class CsatBlock(_Out):
    stats: CsatStatsOut
    groups: dict[str, CsatStatsOut]


class CsatBucket(CsatBlock):
    start: date
    end: date


class CsatHighValue(CsatBlock):
    threshold: float = Field(
        description="Revenue before the answer (reporting currency) that makes a customer high-value."
    )
    with_unconverted_purchases: int = Field(description=UNCONVERTED_HIGH_VALUE.format(what="answers"))


class CsatOut(Header):
    scale: str
    satisfied_scores: list[int]
    interval: str
    total: CsatBlock
    buckets: list[CsatBucket]
    high_value: CsatHighValue


# --- CLV --------------------------------------------------------------------------------------------------


class ClvParams(_Out):
    r: float = Field(description="BG/NBD: shape of the purchase-rate gamma.")
    alpha: float = Field(description="BG/NBD: rate (scale) of the purchase-rate gamma, weeks.")
    a: float = Field(description="BG/NBD: dropout beta's a.")
    b: float = Field(description="BG/NBD: dropout beta's b.")
    p: float = Field(description="Gamma-Gamma: shape of the spend per transaction.")
    q: float = Field(description="Gamma-Gamma: shape of the customers' spend-scale gamma.")
    gamma: float = Field(description="Gamma-Gamma: scale of the customers' spend-scale gamma.")


class ClvModelOut(_Out):
    as_of: date = Field(description="Calibration cutoff: purchases up to and including this local day.")
    time_unit: str
    currency: str
    params: ClvParams
    log_likelihood: dict[str, float]
    converged: dict[str, bool]
    customers: int
    repeat_customers: int
    unconverted_purchases: int = Field(description="Left out: no exchange rate for their currency.")
    fit_seconds: float
    fitted_at: datetime
    cached: bool


class CustomerClvOut(_Out):
    customer_id: str
    currency: str
    as_of: date
    model_as_of: date
    orders: int
    unconverted_orders: int
    historic_value: float = Field(description="Revenue to date, reporting currency.")
    expected_purchases_90d: float | None
    p_alive: float | None
    predicted_clv: float | None
    horizon_weeks: float
    annual_discount_rate: float
    frequency: int | None = Field(default=None, description="x: repeat purchase days.")
    recency_weeks: float | None = Field(default=None, description="t_x: first to last purchase day.")
    age_weeks: float | None = Field(default=None, description="T: first purchase day to today.")


class RevenueBucket(_Out):
    start: date
    end: date
    revenue: float
    orders: int
    customers: int = Field(description="Customers who bought in the bucket.")
    new_customers: int = Field(description="Customers whose first purchase is in the bucket.")
    unconverted_orders: int


class PredictionSummary(_Out):
    customers: int
    historic_value: float
    predicted_clv: float
    mean_predicted_clv: float | None
    mean_p_alive: float | None
    at_risk: int = Field(description="P(alive) below the threshold.")
    expected_purchases_90d: float


class ClvTotal(RevenueBucket):
    predictions: PredictionSummary = Field(description="The latest scheduled refit's predictions.")


class ClvSummaryOut(Header):
    currency: str
    p_alive_threshold: float
    horizon_weeks: float
    annual_discount_rate: float
    model: ClvModelOut | None = Field(description="The latest model fitted as of today or earlier.")
    total: ClvTotal
    buckets: list[RevenueBucket]
    groups: dict[str, PredictionSummary] | None = None
