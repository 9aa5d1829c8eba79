from __future__ import annotations

from decimal import Decimal
from typing import Self

from pydantic import Field, model_validator

from services.segmenter.profile import LifecycleConfig
from shared.config import CommonSettings, check_fx_table
from shared.events import Currency, FxRate


class SegmenterSettings(CommonSettings):
    segmenter_database_url: str | None = Field(
        default=None, description="Database URL; default sqlite+aiosqlite:///<var_dir>/segmenter.db."
    )
    segmenter_group_id: str = Field(default="retain-segmenter", description="Kafka consumer group.")
    segmenter_batch_size: int = Field(default=500, ge=1, le=10000, description="Records per consumed batch.")
    segmenter_sweep_interval_s: float = Field(
        default=60.0, gt=0, description="How often customers whose state changes with time are re-evaluated."
    )
    segmenter_sweep_max_defer_s: float = Field(
        default=600.0,
        ge=0,
        description="How long the sweep waits while the consumer catches up on a backlog (a "
        "replay): until then customers may be only partly applied. 0 = never wait.",
    )
    segmenter_publish_chunk: int = Field(
        default=2000,
        ge=1,
        # A step reads its customers by id in one statement: SQLite takes 32,766 parameters.
        le=20_000,
        description="Customers re-evaluated per step of a rule-publish job (at most 20,000).",
    )
    segmenter_reporting_currency: Currency = Field(default="ILS", description="Currency of total_value.")
    segmenter_fx_rates: dict[Currency, FxRate] = Field(
        default={
            "USD": Decimal("3.65"),
            "EUR": Decimal("3.95"),
            "GBP": Decimal("4.60"),
            "EGP": Decimal("0.075"),
        },
        description="Units of the reporting currency per unit of each other currency (JSON object).",
    )
    segmenter_new_days: int = Field(
        default=30, ge=1, description="A customer is new this long after the first purchase."
    )
    segmenter_at_risk_after_days: int = Field(
        default=60, ge=1, description="Days without a purchase → at_risk."
    )
    segmenter_lapsed_after_days: int = Field(
        default=180, ge=1, description="Days without a purchase → lapsed."
    )
    segmenter_won_back_days: int = Field(
        default=90, ge=1, description="How long a returning customer is won_back."
    )

    @model_validator(mode="after")
    def _rates_for_the_reporting_currency(self) -> Self:
        check_fx_table(
            self.segmenter_reporting_currency,
            self.segmenter_fx_rates,
            "RETAIN_SEGMENTER_REPORTING_CURRENCY",
            "RETAIN_SEGMENTER_FX_RATES",
        )
        return self

    @model_validator(mode="after")
    def _stages_in_order(self) -> Self:
        # Otherwise a customer would go from active straight to lapsed: at_risk never comes.
        if self.segmenter_lapsed_after_days <= self.segmenter_at_risk_after_days:
            raise ValueError(
                f"RETAIN_SEGMENTER_LAPSED_AFTER_DAYS ({self.segmenter_lapsed_after_days}) must be more "
                f"than RETAIN_SEGMENTER_AT_RISK_AFTER_DAYS ({self.segmenter_at_risk_after_days})"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.segmenter_database_url or self.sqlite_url("segmenter")

    @property
    def lifecycle(self) -> LifecycleConfig:
        return LifecycleConfig(
            new_days=self.segmenter_new_days,
            at_risk_after_days=self.segmenter_at_risk_after_days,
            lapsed_after_days=self.segmenter_lapsed_after_days,
            won_back_days=self.segmenter_won_back_days,
            reporting_currency=self.segmenter_reporting_currency,
            fx_rates=tuple(sorted(self.segmenter_fx_rates.items())),
        )
