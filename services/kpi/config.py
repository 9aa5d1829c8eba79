from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Self
from zoneinfo import ZoneInfo

from pydantic import Field, model_validator

from services.kpi.fx import Fx
from services.kpi.response_time import Targets
from shared.config import CommonSettings, check_fx_table
from shared.events import Currency, FxRate, TimeZone

# A first-response target: hours, more than none and at most a year.
TargetHours = Annotated[float, Field(gt=0, le=24 * 366)]


class KpiSettings(CommonSettings):
    kpi_database_url: str | None = Field(
        default=None, description="Database URL; default sqlite+aiosqlite:///<var_dir>/kpi.db."
    )
    kpi_group_id: str = Field(default="retain-kpi", description="Kafka consumer group.")
    kpi_batch_size: int = Field(
        default=2000,
        ge=1,
        le=10000,
        description="Records per consumed batch. KPIs are recomputed between batches, not per event, "
        "so larger batches cost no freshness and spread each batch's fixed statements thinner.",
    )
    kpi_timezone: TimeZone = Field(
        default="Asia/Jerusalem", description="Reporting time zone: KPI days and months are local to it."
    )
    kpi_reporting_currency: Currency = Field(
        default="ILS", description="Currency of every money KPI and CLV."
    )
    kpi_fx_rates: dict[Currency, FxRate] = Field(
        default={
            "USD": Decimal("3.65"),
            "EUR": Decimal("3.95"),
            "GBP": Decimal("4.60"),
            "EGP": Decimal("0.075"),
        },
        description="Units of the reporting currency per unit of each other currency (JSON object).",
    )
    kpi_first_response_targets_h: dict[str, TargetHours] = Field(
        default={"complaint": 4.0, "billing": 24.0},
        description="First-response target per ticket category, hours; 'complaint' also applies to "
        "tickets flagged is_complaint when it is stricter.",
    )
    kpi_default_first_response_target_h: TargetHours = Field(
        default=24.0, description="First-response target of the other categories, hours."
    )
    kpi_high_value_threshold: Decimal = Field(
        default=Decimal(5000),
        ge=0,
        description="Revenue before a complaint or a survey answer (reporting currency) that makes it "
        "a high-value one.",
    )
    kpi_churn_window_days: int = Field(
        default=90, ge=1, description="Non-contractual churn: this many days without a purchase."
    )
    kpi_churn_p_alive_threshold: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Non-contractual churn also needs the customer's BG/NBD P(alive) at the lapse "
        "below this (latest fitted CLV model).",
    )
    kpi_win_back_days: int = Field(
        default=180, ge=1, description="A purchase this soon after a cancellation is a win-back."
    )
    kpi_conversion_window_days: float = Field(
        default=7.0,
        gt=0,
        le=366,
        description="A message converts when a purchase follows within this window.",
    )
    kpi_p_alive_threshold: float = Field(
        default=0.3, ge=0, le=1, description="Customers with P(alive) below this count as at risk."
    )
    kpi_clv_horizon_weeks: float = Field(default=52.0, gt=0, description="Horizon of predicted CLV.")
    kpi_clv_discount_rate: float = Field(
        default=0.10, gt=-1, description="Annual discount rate of predicted CLV."
    )
    kpi_clv_refit_interval_s: float = Field(
        default=3600.0, gt=0, description="Scheduled CLV refit (and retain.clv publication) interval."
    )
    kpi_clv_refit_after_change_s: float = Field(
        default=300.0,
        gt=0,
        description="Refit sooner, this long after the last fit, when purchases arrived since.",
    )
    kpi_clv_relative_tolerance: float = Field(
        default=0.02, ge=0, description="Publish a prediction when it moved by more than this share."
    )
    kpi_rollup_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the tickets and the Grafana tables (kpi_*_daily/monthly) catch up "
        "(the API derives the tickets not rebuilt yet from their steps).",
    )
    kpi_metrics_window_days: int = Field(
        default=30, ge=1, le=366, description="/metrics gauges cover the last this many days."
    )
    kpi_metrics_ttl_s: float = Field(
        default=15.0, ge=0, description="/metrics recomputes the KPI gauges at most this often."
    )

    @model_validator(mode="after")
    def _rates_for_the_reporting_currency(self) -> Self:
        check_fx_table(
            self.kpi_reporting_currency,
            self.kpi_fx_rates,
            "RETAIN_KPI_REPORTING_CURRENCY",
            "RETAIN_KPI_FX_RATES",
        )
        return self

    @property
    def database_url(self) -> str:
        return self.kpi_database_url or self.sqlite_url("kpi")

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.kpi_timezone)

    @property
    def fx(self) -> Fx:
        return Fx(self.kpi_reporting_currency, dict(self.kpi_fx_rates))

    @property
    def targets(self) -> Targets:
        return Targets(
            default_s=self.kpi_default_first_response_target_h * 3600,
            per_category={c.casefold(): h * 3600 for c, h in self.kpi_first_response_targets_h.items()},
        )

    @property
    def churn_window(self) -> timedelta:
        return timedelta(days=self.kpi_churn_window_days)

    @property
    def win_back_window(self) -> timedelta:
        return timedelta(days=self.kpi_win_back_days)

    @property
    def conversion_window(self) -> timedelta:
        return timedelta(days=self.kpi_conversion_window_days)
