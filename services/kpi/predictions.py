"""The CLV model as the service uses it: fit at a cutoff, predict for every customer, and decide
which predictions moved enough to publish. Pure (numpy/scipy via ``clv``); callers run it off the
event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import numpy.typing as npt

from services.kpi.clv import (
    BgNbdParams,
    ClvFitError,
    FloatArray,
    GammaGammaParams,
    RfmData,
    expected_purchases,
    fit_bgnbd,
    fit_gamma_gamma,
    p_alive,
    predicted_clv,
    summarize,
)

TIME_UNIT = "week"
WEEKS_90D = 90 / 7


@dataclass(frozen=True, slots=True)
class FittedModel:
    as_of: date
    rfm: RfmData
    bg: BgNbdParams
    gg: GammaGammaParams
    fit_seconds: float

    def describe(self, currency: str, unconverted: int) -> dict[str, Any]:
        """The model as ``GET /v1/clv/model`` returns it (and as it is cached)."""
        return {
            "as_of": self.as_of.isoformat(),
            "time_unit": TIME_UNIT,
            "currency": currency,
            "params": {**self.bg.as_dict(), **self.gg.as_dict()},
            "log_likelihood": {"bgnbd": self.bg.log_likelihood, "gamma_gamma": self.gg.log_likelihood},
            "converged": {"bgnbd": self.bg.converged, "gamma_gamma": self.gg.converged},
            "customers": len(self.rfm.customer_ids),
            "repeat_customers": int((self.rfm.x > 0).sum()),
            "unconverted_purchases": unconverted,
            "fit_seconds": round(self.fit_seconds, 4),
        }


def fit(purchases: Iterable[tuple[str, date, float | None]], as_of: date) -> FittedModel:
    """BG/NBD and Gamma-Gamma on the purchases up to and including ``as_of`` (days merged,
    weeks as the time unit). Raises ``ClvFitError`` when the data cannot identify a model."""
    started = time.perf_counter()
    rfm = summarize(purchases, as_of)
    bg = fit_bgnbd(rfm.x, rfm.t_x, rfm.T)
    gg = fit_gamma_gamma(rfm.x_m, rfm.m)
    if gg.q <= 1:
        # Refused here, not at prediction: a model stored and served that no CLV can be
        # predicted from would leave the predictions, their summary and churn's P(alive) on
        # different fits, and every customer's CLV answer failing.
        raise ClvFitError(
            f"the spend model (Gamma-Gamma) fitted q = {gg.q:.3f}, at most 1: spend per purchase is "
            "too heavy-tailed for an expected value (a few very large orders among many small ones)"
        )
    return FittedModel(as_of, rfm, bg, gg, time.perf_counter() - started)


def params_from(model: dict[str, Any]) -> tuple[BgNbdParams, GammaGammaParams]:
    p = model["params"]
    return (
        BgNbdParams(p["r"], p["alpha"], p["a"], p["b"]),
        GammaGammaParams(p["p"], p["q"], p["gamma"]),
    )


@dataclass(frozen=True, slots=True)
class CustomerPredictions:
    customer_ids: tuple[str, ...]
    historic_value: FloatArray
    p_alive: FloatArray
    expected_purchases_90d: FloatArray
    predicted_clv: FloatArray

    @property
    def usable(self) -> npt.NDArray[np.bool_]:
        """Customers whose predictions are all finite. A degenerate fit (e.g. a, b -> infinity
        on data without dropout) can overflow 2F1 for some rows: those are not published."""
        return (
            np.isfinite(self.p_alive)
            & np.isfinite(self.expected_purchases_90d)
            & np.isfinite(self.predicted_clv)
        )


def predict(
    bg: BgNbdParams,
    gg: GammaGammaParams,
    rfm: RfmData,
    *,
    horizon_weeks: float,
    annual_discount_rate: float,
) -> CustomerPredictions:
    if gg.q <= 1:
        raise ClvFitError("the Gamma-Gamma fit has q <= 1: expected spend is unbounded")
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are flagged by .usable
        return _predict(bg, gg, rfm, horizon_weeks, annual_discount_rate)


def _predict(
    bg: BgNbdParams, gg: GammaGammaParams, rfm: RfmData, horizon_weeks: float, annual_discount_rate: float
) -> CustomerPredictions:
    return CustomerPredictions(
        customer_ids=rfm.customer_ids,
        historic_value=rfm.historic_value,
        p_alive=np.clip(p_alive(bg, rfm.x, rfm.t_x, rfm.T), 0.0, 1.0),
        expected_purchases_90d=np.maximum(expected_purchases(bg, WEEKS_90D, rfm.x, rfm.t_x, rfm.T), 0.0),
        predicted_clv=np.maximum(
            predicted_clv(
                bg,
                gg,
                rfm.x,
                rfm.t_x,
                rfm.T,
                rfm.m,
                horizon_weeks=horizon_weeks,
                annual_discount_rate=annual_discount_rate,
                x_m=rfm.x_m,
            ),
            0.0,
        ),
    )


# Below these, a change is noise whatever its share: a cent of CLV, a point of probability.
ABSOLUTE_FLOOR = {"predicted_clv": 1.0, "p_alive": 0.01, "expected_purchases_90d": 0.01}


def moved(old: float | None, new: float, relative: float, floor: float) -> bool:
    """Whether ``new`` differs from the published ``old`` by more than the tolerance:
    max(floor, relative * |old|). Never published counts as moved."""
    if old is None or not math.isfinite(old):
        return True
    return abs(new - old) > max(floor, relative * abs(old))
