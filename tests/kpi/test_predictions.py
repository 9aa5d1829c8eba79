"""The CLV model as the service uses it: fit at a cutoff, predictions for everyone, the
publication tolerance, and a degenerate fit that must not turn into NaN."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import numpy as np
import pytest
from scipy.special import hyp2f1  # type: ignore[import-untyped]

from services.kpi.clv import BgNbdParams, ClvFitError, GammaGammaParams, expected_purchases, summarize
from services.kpi.fx import Fx
from services.kpi.predictions import fit, moved, params_from, predict

# A fit on data without visible dropout: a and b run off towards the optimiser's bound.
DEGENERATE = BgNbdParams(
    r=1.0573509578901052, alpha=9.387818515603767, a=8285.783173958138, b=162754.79141900392
)


def test_expected_purchases_of_a_degenerate_fit_are_finite() -> None:
    x = np.array([0.0, 3.0, 20.0])
    t_x = np.array([0.0, 30.0, 38.0])
    T = np.full(3, 40.0)  # noqa: N806 - the literature's name
    t = 90 / 7
    got = expected_purchases(DEGENERATE, t, x, t_x, T)
    assert np.isfinite(got).all()
    # The published form, evaluated directly (it is finite for these parameters).
    a, b, r, alpha = DEGENERATE.a, DEGENERATE.b, DEGENERATE.r, DEGENERATE.alpha
    z = t / (alpha + T + t)
    printed = (
        (a + b + x - 1)
        / (a - 1)
        * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z))
    )
    assert got[0] == pytest.approx(printed[0], rel=1e-9)  # x = 0: P(alive) = 1
    assert (got <= printed + 1e-12).all()


def test_fit_describe_and_predict() -> None:
    rows = [
        ("a", date(2025, 1, 1), 10.0),
        ("a", date(2025, 1, 1), 5.0),  # the same day: one transaction of 15
        ("a", date(2025, 3, 1), 20.0),
        ("b", date(2025, 2, 1), 30.0),
        ("b", date(2025, 2, 20), 40.0),
        ("b", date(2025, 4, 2), 50.0),
        ("c", date(2025, 1, 15), 12.0),
        ("d", date(2025, 3, 3), 8.0),
        ("d", date(2025, 5, 3), 9.0),
    ]
    model = fit(rows, date(2025, 6, 30))
    described = model.describe("ILS", unconverted=2)
    assert described["customers"] == 4
    assert described["repeat_customers"] == 3
    assert described["unconverted_purchases"] == 2
    assert described["time_unit"] == "week"
    bg, gg = params_from(described)
    assert bg.as_dict() == model.bg.as_dict()
    assert gg.as_dict() == model.gg.as_dict()
    result = predict(model.bg, model.gg, model.rfm, horizon_weeks=52, annual_discount_rate=0.1)
    assert result.customer_ids == ("a", "b", "c", "d")
    assert list(result.historic_value) == [35.0, 120.0, 12.0, 17.0]
    assert result.usable.all()
    assert ((result.p_alive >= 0) & (result.p_alive <= 1)).all()
    assert (result.predicted_clv >= 0).all()


def test_currency_scale_moves_only_gamma() -> None:
    # Spend drawn from the Gamma-Gamma model itself (p = 6, q = 4, gamma = 15), in dollars and
    # in shekels at a fixed rate: the same shapes, gamma scaled by the rate.
    rng = np.random.default_rng(3)
    rows: list[tuple[str, date, float]] = []
    for i in range(400):
        nu = rng.gamma(4.0, 1 / 15.0)
        for k in range(1 + int(rng.integers(0, 6))):
            rows.append(
                (
                    f"c{i}",
                    date.fromordinal(date(2025, 1, 1).toordinal() + 20 * k + i % 20),
                    float(rng.gamma(6.0, 1 / nu)),
                )
            )
    rate = float(Fx("ILS", {"USD": Decimal("3.65")}).rate("USD") or 0)
    usd = fit(rows, date(2025, 6, 30))
    ils = fit([(c, d, v * rate) for c, d, v in rows], date(2025, 6, 30))
    assert ils.gg.p == pytest.approx(usd.gg.p, rel=1e-3)  # the optimiser stops a hair apart
    assert ils.gg.q == pytest.approx(usd.gg.q, rel=1e-3)
    assert ils.gg.gamma == pytest.approx(usd.gg.gamma * rate, rel=1e-3)
    assert ils.bg.as_dict() == usd.bg.as_dict()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, 10.0, True),  # never published
        (100.0, 101.9, False),  # within 2 %
        (100.0, 102.1, True),
        (10.0, 10.9, False),  # within the 1.0 floor even though 9 %
        (0.0, 0.5, False),
        (float("nan"), 1.0, True),
    ],
)
def test_publication_tolerance(old: float | None, new: float, expected: bool) -> None:
    assert moved(old, new, relative=0.02, floor=1.0) is expected


def test_gamma_gamma_with_q_at_most_one_cannot_predict() -> None:
    rfm = summarize([("a", date(2025, 1, 1), 1.0), ("a", date(2025, 2, 1), 2.0)], date(2025, 3, 1))
    with pytest.raises(ClvFitError):
        predict(DEGENERATE, GammaGammaParams(1.0, 0.9, 1.0), rfm, horizon_weeks=52, annual_discount_rate=0.0)


def test_a_fit_whose_spend_model_has_q_at_most_one_is_refused() -> None:
    """Heavy-tailed spend (log-normal, sigma 2.5: a few orders a thousand times the usual) fits
    q < 1, from which no expected spend follows: the fit is refused, saying why."""
    rng = np.random.default_rng(3)
    rows = [
        (f"c{c}", date(2025, 1, 1) + timedelta(days=int(rng.integers(0, 300))), float(rng.lognormal(3, 2.5)))
        for c in range(300)
        for _ in range(int(rng.integers(1, 5)))
    ]
    with pytest.raises(ClvFitError, match=r"q = 0\.\d+, at most 1: spend per purchase is too heavy-tailed"):
        fit(rows, date(2025, 12, 31))


def test_purchases_without_a_value_count_as_purchases_and_not_as_spend() -> None:
    """A customer whose repeat purchases are in a currency without a rate: as likely to be
    alive as one whose are valued (the same days), and valued at the population's mean spend."""
    days = [date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)]
    valued = [("v", d, 50.0) for d in days]
    others = [(f"o{i}", d, 20.0 + 10 * i + j) for i in range(6) for j, d in enumerate(days[i % 2 :])]
    unvalued = [("u", days[0], 50.0), ("u", days[1], None), ("u", days[2], None)]
    model = fit([*valued, *others, *unvalued], date(2025, 6, 30))
    result = predict(model.bg, model.gg, model.rfm, horizon_weeks=52, annual_discount_rate=0.1)
    at = {cid: i for i, cid in enumerate(result.customer_ids)}
    v, u = at["v"], at["u"]
    assert model.rfm.x[u] == model.rfm.x[v] == 2
    assert model.rfm.x_m[u] == 0
    assert result.p_alive[u] == result.p_alive[v]
    assert result.expected_purchases_90d[u] == result.expected_purchases_90d[v]
    population_mean = model.gg.p * model.gg.gamma / (model.gg.q - 1)
    spend = (
        result.predicted_clv[u]
        / result.predicted_clv[v]
        * float(model.gg.p * (model.gg.gamma + 2 * 50.0) / (2 * model.gg.p + model.gg.q - 1))
    )
    assert spend == pytest.approx(population_mean, rel=1e-9)
    assert result.historic_value[u] == 50.0
