"""CLV models: reproduction of the published CDNOW fits, likelihood and monotonicity properties."""

# T (the customer's age at the cutoff) is the literature's notation.
# ruff: noqa: N803, N806

from __future__ import annotations

import math
from dataclasses import replace
from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import hyp2f1  # type: ignore[import-untyped]

from services.kpi.clv import (
    BgNbdParams,
    ClvFitError,
    FloatArray,
    GammaGammaParams,
    RfmData,
    bgnbd_log_likelihood,
    expected_purchases,
    expected_spend,
    fit_bgnbd,
    fit_gamma_gamma,
    gamma_gamma_log_likelihood,
    p_alive,
    predicted_clv,
    simulate_bgnbd,
    summarize,
)

DATA = Path(__file__).parent / "data" / "CDNOW_sample.txt"
CALIBRATION_END = date(1997, 9, 30)  # end of week 39 of 1997
HOLDOUT_END = date(1998, 6, 30)

# Fader, Hardie & Lee (2005), CDNOW 1/10th sample, 39-week calibration.
PUBLISHED_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
PUBLISHED_BGNBD_LL = -9582.4
# Fader & Hardie (2013), "The Gamma-Gamma Model of Monetary Value", same calibration period.
PUBLISHED_GG = {"p": 6.25, "q": 3.74, "gamma": 15.44}

CDNOW = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
CDNOW_GG = GammaGammaParams(p=6.25, q=3.74, gamma=15.44)


def _cdnow_purchases() -> list[tuple[str, date, Decimal]]:
    # Columns: master customer id, sample customer id, yyyymmdd, CDs bought, dollar value.
    rows = []
    for line in DATA.read_text().splitlines():
        _, customer, day, _, amount = line.split()
        rows.append((customer, date(int(day[:4]), int(day[4:6]), int(day[6:])), Decimal(amount)))
    return rows


@cache
def cdnow_calibration() -> RfmData:
    return summarize(_cdnow_purchases(), CALIBRATION_END)


@cache
def cdnow_fits() -> tuple[BgNbdParams, GammaGammaParams]:
    rfm = cdnow_calibration()
    return fit_bgnbd(rfm.x, rfm.t_x, rfm.T), fit_gamma_gamma(rfm.x, rfm.m)


# --------------------------------------------------------------------------- reference data


def test_cdnow_calibration_summary() -> None:
    rfm = cdnow_calibration()
    assert len(rfm.customer_ids) == 2357
    assert int((rfm.x > 0).sum()) == 946  # the Gamma-Gamma note's 946 repeat customers
    assert rfm.x.sum() == 2457  # repeat purchase days in weeks 1-39
    # Everyone joined in Q1 1997, so T runs from 27 weeks (1997-04-01) to 38.86 (1997-01-01).
    assert rfm.T.min() == pytest.approx(27.0)
    assert rfm.T.max() == pytest.approx(272 / 7)


def test_bgnbd_reproduces_fader_hardie_lee_2005() -> None:
    bg, _ = cdnow_fits()
    assert bg.converged
    for name, published in PUBLISHED_BGNBD.items():
        assert bg.as_dict()[name] == pytest.approx(published, rel=0.01), name
    assert bg.log_likelihood == pytest.approx(PUBLISHED_BGNBD_LL, rel=0.001)


def test_gamma_gamma_reproduces_fader_hardie_2013() -> None:
    _, gg = cdnow_fits()
    assert gg.converged
    for name, published in PUBLISHED_GG.items():
        assert gg.as_dict()[name] == pytest.approx(published, rel=0.01), name


def test_cdnow_holdout_repeat_purchases_are_of_the_right_size() -> None:
    # Sanity check of the predictions on the 39-week holdout: 1882 repeat purchase days actually
    # happened; the BG/NBD conditional expectation gives about 1653 (the model under-forecasts
    # this holdout, as the published CDNOW analyses also show).
    rfm = cdnow_calibration()
    full = summarize(_cdnow_purchases(), HOLDOUT_END)
    assert full.customer_ids == rfm.customer_ids
    actual = float((full.x - rfm.x).sum())
    predicted = float(expected_purchases(cdnow_fits()[0], 39.0, rfm.x, rfm.t_x, rfm.T).sum())
    assert actual == 1882
    assert predicted == pytest.approx(1653, rel=0.01)


# --------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("factor", [0.95, 0.99, 1.01, 1.05])
@pytest.mark.parametrize("name", ["r", "alpha", "a", "b"])
def test_bgnbd_fit_is_a_local_maximum(name: str, factor: float) -> None:
    rfm = cdnow_calibration()
    bg, _ = cdnow_fits()
    at_fit = bgnbd_log_likelihood(bg, rfm.x, rfm.t_x, rfm.T)
    assert at_fit == pytest.approx(bg.log_likelihood)
    nearby = replace(bg, **{name: getattr(bg, name) * factor})
    assert bgnbd_log_likelihood(nearby, rfm.x, rfm.t_x, rfm.T) < at_fit


@pytest.mark.parametrize("factor", [0.95, 0.99, 1.01, 1.05])
@pytest.mark.parametrize("name", ["p", "q", "gamma"])
def test_gamma_gamma_fit_is_a_local_maximum(name: str, factor: float) -> None:
    rfm = cdnow_calibration()
    _, gg = cdnow_fits()
    at_fit = gamma_gamma_log_likelihood(gg, rfm.x, rfm.m)
    assert at_fit == pytest.approx(gg.log_likelihood)
    nearby = replace(gg, **{name: getattr(gg, name) * factor})
    assert gamma_gamma_log_likelihood(nearby, rfm.x, rfm.m) < at_fit


def test_simulated_customers_recover_the_parameters() -> None:
    # Two to three years of history per customer. With CDNOW's 27-39 weeks the dropout
    # parameters are weakly identified (b's sampling sd is ~10 % at n = 20k, so a 15 % bound
    # fails for about one seed in nine); here its sd is ~5 % and the bound is > 3 sd wide.
    rng = np.random.default_rng(20240601)
    x, t_x, T = simulate_bgnbd(CDNOW, 20_000, rng.uniform(104.0, 156.0, size=20_000), rng)
    fitted = fit_bgnbd(x, t_x, T)
    assert fitted.converged
    for name, true in CDNOW.as_dict().items():
        assert fitted.as_dict()[name] == pytest.approx(true, rel=0.15), name


def test_simulator_matches_the_unconditional_expectation() -> None:
    # E[X(t)] of a new customer is eq. 10 at x = t_x = T = 0 (eq. 9 of the paper).
    rng = np.random.default_rng(7)
    for horizon in (10.0, 39.0, 104.0):
        x, _, _ = simulate_bgnbd(CDNOW, 200_000, horizon, rng)
        standard_error = float(x.std()) / math.sqrt(x.size)
        expected = float(expected_purchases(CDNOW, horizon, 0.0, 0.0, 0.0))
        assert abs(float(x.mean()) - expected) < 4 * standard_error


def test_conditional_expectations_average_to_the_unconditional_increment() -> None:
    # Law of total expectation: averaged over customers drawn from the model and observed for
    # T weeks, E[Y(t) | x, t_x, T] must equal E[X(T + t)] - E[X(T)] of a new customer.
    rng = np.random.default_rng(11)
    T, t = 39.0, 39.0
    x, t_x, _ = simulate_bgnbd(CDNOW, 200_000, T, rng)
    conditional = expected_purchases(CDNOW, t, x, t_x, T)
    increment = float(
        expected_purchases(CDNOW, T + t, 0.0, 0.0, 0.0) - expected_purchases(CDNOW, T, 0.0, 0.0, 0.0)
    )
    standard_error = float(conditional.std()) / math.sqrt(conditional.size)
    assert abs(float(conditional.mean()) - increment) < 4 * standard_error


def test_fit_needs_repeat_purchases() -> None:
    with pytest.raises(ClvFitError):
        fit_bgnbd(np.zeros(3), np.zeros(3), np.full(3, 10.0))
    with pytest.raises(ClvFitError):
        fit_gamma_gamma(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="t_x"):
        fit_bgnbd(np.array([1.0]), np.array([5.0]), np.array([4.0]))


# --------------------------------------------------------------------------- predictions


def _literal_eq10(params: BgNbdParams, t: float, x: FloatArray, t_x: FloatArray, T: FloatArray) -> FloatArray:
    """[FHL05] eq. 10 exactly as printed, to check the Euler-transformed implementation."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    hyp = np.asarray(hyp2f1(r + x, b + x, a + b + x - 1.0, t / (alpha + T + t)), dtype=np.float64)
    bracket = 1.0 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp
    return (a + b + x - 1.0) / (a - 1.0) * bracket * p_alive(params, x, t_x, T)


@pytest.mark.parametrize("params", [CDNOW, BgNbdParams(2.0, 10.0, 3.0, 5.0), BgNbdParams(0.5, 2.0, 1.5, 0.8)])
def test_expected_purchases_matches_the_published_formula(params: BgNbdParams) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 30, size=500).astype(np.float64)
    T = rng.uniform(1.0, 80.0, size=500)
    t_x = np.where(x > 0, rng.uniform(0.01, 1.0, size=500) * T, 0.0)
    for t in (1.0, 39.0, 100.0):
        np.testing.assert_allclose(
            expected_purchases(params, t, x, t_x, T), _literal_eq10(params, t, x, t_x, T), rtol=1e-9
        )


def test_expected_purchases_stays_finite_for_heavy_buyers_and_long_horizons() -> None:
    # The printed form is 0 * inf here; x = 300 repeat purchases, a 10-year horizon.
    value = expected_purchases(CDNOW, 520.0, 300.0, 39.0, 39.0)
    assert np.isfinite(value)
    assert 0 < float(value) < 520 * 300 / 39  # below the posterior-mean rate times t


def test_expected_purchases_is_continuous_at_a_equal_one() -> None:
    # With r = alpha = b = 1 and a -> 1, E[X(t)] of a new customer tends to ln(1 + t).
    params = BgNbdParams(1.0, 1.0, 1.0, 1.0)
    for t in (1.0, 10.0, 100.0):
        assert float(expected_purchases(params, t, 0.0, 0.0, 0.0)) == pytest.approx(math.log1p(t), rel=1e-6)


def test_p_alive_is_one_without_repeat_purchases() -> None:
    # [FHL05]: dropout can only happen right after a repeat purchase, so x = 0 means alive,
    # however long ago the first purchase was.
    assert np.all(p_alive(CDNOW, 0.0, 0.0, np.array([1.0, 39.0, 1000.0])) == 1.0)
    assert float(p_alive(CDNOW, 1.0, 1.0, 39.0)) < 1.0


@settings(max_examples=200, deadline=None)
@given(
    x=st.integers(min_value=1, max_value=200),
    T=st.floats(min_value=0.5, max_value=200.0),
    t=st.floats(min_value=0.5, max_value=1000.0),
)
def test_more_purchases_at_the_same_recency_means_more_expected_purchases(x: int, T: float, t: float) -> None:
    # Recency at the cutoff (t_x == T): another purchase both raises the posterior purchase rate
    # and the chance of being alive.
    fewer = float(expected_purchases(CDNOW, t, float(x), T, T))
    more = float(expected_purchases(CDNOW, t, float(x + 1), T, T))
    assert more > fewer


def test_frequency_is_not_monotone_when_the_last_purchase_is_old() -> None:
    # The BG/NBD (like the Pareto/NBD; Fader, Hardie & Lee 2005, "RFM and CLV: Using Iso-Value
    # Curves") says a frequent buyer who has gone quiet has probably left: with the last purchase
    # in week 5 of 39, more purchases lower the forecast. This is the model, not a bug.
    forecasts = expected_purchases(CDNOW, 39.0, np.array([1.0, 3.0, 6.0]), 5.0, 39.0)
    assert forecasts[0] > forecasts[1] > forecasts[2]


@settings(max_examples=200, deadline=None)
@given(
    x=st.integers(min_value=1, max_value=100),
    T=st.floats(min_value=1.0, max_value=200.0),
    earlier=st.floats(min_value=0.01, max_value=0.98),
    later=st.floats(min_value=0.02, max_value=1.0),
)
def test_a_more_recent_last_purchase_means_more_likely_alive(
    x: int, T: float, earlier: float, later: float
) -> None:
    if later <= earlier:
        earlier, later = later, earlier
    if later - earlier < 1e-3:
        return
    old, recent = p_alive(CDNOW, float(x), np.array([earlier * T, later * T]), T)
    assert recent > old
    old_e, recent_e = expected_purchases(CDNOW, 39.0, float(x), np.array([earlier * T, later * T]), T)
    assert recent_e > old_e


@settings(max_examples=100, deadline=None)
@given(
    x=st.integers(min_value=0, max_value=50),
    recency=st.floats(min_value=0.01, max_value=1.0),
    T=st.floats(min_value=1.0, max_value=100.0),
)
def test_expected_purchases_grow_with_the_horizon(x: int, recency: float, T: float) -> None:
    t_x = recency * T if x > 0 else 0.0
    forecasts = expected_purchases(CDNOW, np.array([0.0, 1.0, 13.0, 52.0, 520.0]), float(x), t_x, T)
    assert forecasts[0] == 0.0
    assert np.all(np.diff(forecasts) > 0)


def test_expected_spend_shrinks_the_observed_mean_towards_the_population_mean() -> None:
    gg = CDNOW_GG
    population = gg.p * gg.gamma / (gg.q - 1.0)
    assert float(expected_spend(gg, 0.0, 0.0)) == pytest.approx(population)
    spends = expected_spend(gg, np.array([1.0, 5.0, 50.0]), 100.0)
    assert population < spends[0] < spends[1] < spends[2] < 100.0
    # The weighted-average form of Fader & Hardie (2013) eq. 5.
    x, m = 4.0, 20.0
    weight = gg.p * x / (gg.p * x + gg.q - 1.0)
    assert float(expected_spend(gg, x, m)) == pytest.approx((1 - weight) * population + weight * m)


# --------------------------------------------------------------------------- CLV


def test_clv_is_discounted_expected_purchases_times_expected_spend() -> None:
    x, t_x, T, m = 3.0, 30.0, 39.0, 40.0

    def clv(horizon: float, rate: float, step: float = 52.0 / 12) -> float:
        value = predicted_clv(
            CDNOW, CDNOW_GG, x, t_x, T, m, horizon_weeks=horizon, annual_discount_rate=rate, step_weeks=step
        )
        return float(value)

    spend = float(expected_spend(CDNOW_GG, x, m))
    purchases = float(expected_purchases(CDNOW, 52.0, x, t_x, T))
    assert clv(52.0, 0.0) == pytest.approx(purchases * spend)
    # One step of a whole year at 10 %: everything is discounted from the step's end.
    assert clv(52.0, 0.10, step=52.0) == pytest.approx(purchases * spend * 1.10 ** (-52.0 / (365.25 / 7)))
    assert clv(0.0, 0.10) == 0.0


@settings(max_examples=100, deadline=None)
@given(
    x=st.integers(min_value=0, max_value=30),
    recency=st.floats(min_value=0.01, max_value=1.0),
    m=st.floats(min_value=1.0, max_value=500.0),
    horizon=st.floats(min_value=1.0, max_value=260.0),
    rate=st.floats(min_value=0.0, max_value=0.5),
)
def test_clv_grows_with_the_horizon_and_falls_with_the_discount_rate(
    x: int, recency: float, m: float, horizon: float, rate: float
) -> None:
    T = 39.0
    t_x = recency * T if x > 0 else 0.0
    m_x = m if x > 0 else 0.0

    def clv(h: float, d: float) -> float:
        return float(
            predicted_clv(CDNOW, CDNOW_GG, float(x), t_x, T, m_x, horizon_weeks=h, annual_discount_rate=d)
        )

    base = clv(horizon, rate)
    assert base > 0
    assert clv(horizon + 4.0, rate) > base
    assert clv(horizon, rate + 0.05) < base


def test_clv_on_cdnow() -> None:
    rfm = cdnow_calibration()
    bg, gg = cdnow_fits()
    clv = predicted_clv(bg, gg, rfm.x, rfm.t_x, rfm.T, rfm.m, horizon_weeks=52.0, annual_discount_rate=0.10)
    assert clv.shape == rfm.x.shape
    assert np.all(clv > 0)
    assert np.all(np.isfinite(clv))


# --------------------------------------------------------------------------- summary


def test_summary_merges_same_day_purchases_and_respects_the_cutoff() -> None:
    purchases: list[tuple[str, date, Decimal | float]] = [
        ("a", date(2024, 1, 1), Decimal("10.00")),
        ("a", date(2024, 1, 1), Decimal("5.00")),  # same day: one transaction of 15
        ("a", date(2024, 1, 15), Decimal("20.00")),
        ("a", date(2024, 1, 15), 10.0),  # same day: one transaction of 30
        ("a", date(2024, 1, 29), Decimal("60.00")),
        ("a", date(2024, 3, 1), Decimal("999.00")),  # after the cutoff: ignored
        ("b", date(2024, 1, 22), Decimal("7.50")),
        ("c", date(2024, 2, 1), Decimal("1.00")),  # first purchase after the cutoff: absent
    ]
    rfm = summarize(purchases, cutoff=date(2024, 1, 29))
    assert rfm.customer_ids == ("a", "b")
    np.testing.assert_allclose(rfm.x, [2.0, 0.0])
    np.testing.assert_allclose(rfm.t_x, [4.0, 0.0])  # weeks from first to last purchase day
    np.testing.assert_allclose(rfm.T, [4.0, 1.0])  # weeks from first purchase day to cutoff
    np.testing.assert_allclose(rfm.m, [45.0, 0.0])  # mean of the repeat days (30, 60)
    np.testing.assert_allclose(rfm.historic_value, [105.0, 7.5])


def test_a_purchase_without_a_value_counts_for_bgnbd_not_for_the_spend() -> None:
    """None: a currency without an exchange rate. Its day is a purchase day (x, t_x, T, as
    churn's P(alive) counts it), and a repeat day with it is left out of m and x_m."""
    purchases: list[tuple[str, date, Decimal | float | None]] = [
        ("a", date(2024, 1, 1), 15.0),
        ("a", date(2024, 1, 8), None),  # a repeat day without a value
        ("a", date(2024, 1, 15), 30.0),
        ("a", date(2024, 1, 15), None),  # valued in part: not a spend either
        ("a", date(2024, 1, 22), 60.0),
        ("b", date(2024, 1, 1), None),  # a first day without a value
        ("b", date(2024, 1, 29), 8.0),
        ("c", date(2024, 1, 8), None),  # nothing valued at all
        ("c", date(2024, 1, 15), None),
    ]
    rfm = summarize(purchases, cutoff=date(2024, 1, 29))
    assert rfm.customer_ids == ("a", "b", "c")
    np.testing.assert_allclose(rfm.x, [3.0, 1.0, 1.0])
    np.testing.assert_allclose(rfm.t_x, [3.0, 4.0, 1.0])
    np.testing.assert_allclose(rfm.T, [4.0, 4.0, 3.0])
    np.testing.assert_allclose(rfm.x_m, [1.0, 1.0, 0.0])  # a: only the 22nd; b: the 29th
    np.testing.assert_allclose(rfm.m, [60.0, 8.0, 0.0])
    np.testing.assert_allclose(rfm.historic_value, [105.0, 8.0, 0.0])
    # Everything valued: x_m is x.
    valued = summarize([(c, d, v) for c, d, v in purchases if v is not None], cutoff=date(2024, 1, 29))
    np.testing.assert_array_equal(valued.x_m, valued.x)


def test_summary_time_unit_and_order_independence() -> None:
    purchases: list[tuple[str, date, Decimal | float]] = [
        ("a", date(2024, 1, 10), 3.0),
        ("a", date(2024, 1, 1), 1.0),
        ("a", date(2024, 1, 5), 2.0),
    ]
    rfm = summarize(purchases, cutoff=date(2024, 1, 31), time_unit_days=1.0)
    assert (rfm.x[0], rfm.t_x[0], rfm.T[0], rfm.m[0]) == (2.0, 9.0, 30.0, 2.5)
    assert summarize([], cutoff=date(2024, 1, 31)).customer_ids == ()
