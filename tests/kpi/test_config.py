"""The kpi's settings refuse what would silently give wrong money KPIs."""

from __future__ import annotations

import re
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
