"""The segmenter's settings refuse what would silently give wrong profiles."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from services.segmenter.config import SegmenterSettings


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        # Lower case: every USD purchase would be unconverted, its value left out of total_value.
        ({"segmenter_reporting_currency": "usd"}, "ISO 4217"),
        ({"segmenter_fx_rates": {"XYZ": 1}}, "ISO 4217"),
        # A total_value below zero, or every amount in that currency worth nothing.
        ({"segmenter_fx_rates": {"EUR": -1}}, "greater than 0"),
        ({"segmenter_fx_rates": {"EUR": 0}}, "greater than 0"),
        # at_risk would never come: active goes straight to lapsed.
        ({"segmenter_lapsed_after_days": 30}, "must be more than RETAIN_SEGMENTER_AT_RISK_AFTER_DAYS (60)"),
        # The reporting currency changed alone: the table of ILS per unit stays, its USD ignored.
        (
            {"segmenter_reporting_currency": "USD"},
            "RETAIN_SEGMENTER_FX_RATES gives USD, the reporting currency",
        ),
        # inf turned the sweep off without a word.
        ({"segmenter_sweep_interval_s": "inf"}, "finite number"),
        # A step reads its customers in one statement: past SQLite's 32,766 parameters it failed
        # as if the database were away, and the publish job was retried for ever.
        ({"segmenter_publish_chunk": 40_000}, "less than or equal to 20000"),
    ],
)
def test_settings_that_would_give_wrong_profiles_are_refused_by_name(
    settings: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(named)):
        SegmenterSettings(**settings)


def test_the_defaults_hold() -> None:
    settings = SegmenterSettings()
    assert settings.lifecycle.reporting_currency == "ILS"
    assert dict(settings.lifecycle.fx_rates)["USD"] > 0
