"""The kpi's settings refuse what would silently give wrong money KPIs."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from services.kpi.config import KpiSettings


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"kpi_reporting_currency": "usd"}, "ISO 4217"),
        ({"kpi_fx_rates": {"dollars": 3.6}}, "ISO 4217"),
        ({"kpi_fx_rates": {"EUR": 0}}, "greater than 0"),
        ({"kpi_fx_rates": {"EUR": -3.9}}, "greater than 0"),
    ],
)
def test_settings_that_would_give_wrong_money_kpis_are_refused_by_name(
    settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(named)):
        KpiSettings(**settings)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        # A table of ILS per unit left in force when the reporting currency became USD.
        ({"kpi_reporting_currency": "USD"}, "RETAIN_KPI_FX_RATES gives USD, the reporting currency"),
        ({"kpi_reporting_currency": "XYZ"}, "ISO 4217"),
        ({"kpi_timezone": "localtime"}, "kpi_timezone"),
        ({"kpi_first_response_targets_h": {"complaint": -4}}, "greater than 0"),
        ({"kpi_first_response_targets_h": {"billing": 0}}, "greater than 0"),
        ({"kpi_first_response_targets_h": {"billing": "inf"}}, "finite number"),
        ({"kpi_default_first_response_target_h": "nan"}, "finite number"),
        ({"kpi_conversion_window_days": 1e9}, "less than or equal to 366"),
    ],
)
def test_settings_that_would_fail_later_or_quietly_are_refused_at_start(
    settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(named)):
        KpiSettings(**settings)


def test_a_table_for_the_reporting_currency_is_taken() -> None:
    usd = KpiSettings(kpi_reporting_currency="USD", kpi_fx_rates={"ILS": "0.27", "USD": 1})
    assert usd.fx.convert(Decimal(100), "ILS") == Decimal("27.00")
    # A refit interval below the refit-after-change delay: the schedule comes first, harmlessly.
    assert KpiSettings(kpi_clv_refit_interval_s=120).kpi_clv_refit_after_change_s == 300
