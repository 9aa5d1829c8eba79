"""Customer lifetime value: RFM summary, BG/NBD and Gamma-Gamma fitted by maximum likelihood.

Pure numpy/scipy: no I/O, no clock. Conventions (see docs/kpis.md, "Customer lifetime value"):

* purchases on the same calendar day are merged into one transaction (their amounts summed);
* the first purchase day is the customer's "birth"; ``x`` counts the repeat purchase days after
  it up to and including the calibration cutoff;
* time is measured in ``time_unit_days`` units (weeks by default): ``t_x`` from the first to the
  last purchase day, ``T`` from the first purchase day to the cutoff;
* ``m`` is the mean of the repeat purchase days' totals (the first purchase is excluded, as in
  Fader & Hardie's Gamma-Gamma note) over the ``x_m`` of them whose every purchase has a value
  (an amount in a currency without an exchange rate has none: its day counts as a purchase for
  BG/NBD, not as a spend for Gamma-Gamma); 0 when ``x_m == 0``.

References:
  [FHL05] Fader, Hardie & Lee (2005), "'Counting Your Customers' the Easy Way: An Alternative
          to the Pareto/NBD Model", Marketing Science 24(2), 275-284.
  [FH13]  Fader & Hardie (2013), "The Gamma-Gamma Model of Monetary Value",
          http://brucehardie.com/notes/025/
"""

# The literature's notation (T for the customer's age at the cutoff) is kept on purpose.
# ruff: noqa: N803, N806

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize  # type: ignore[import-untyped]
from scipy.special import betaln, gammaln, hyp2f1, psi  # type: ignore[import-untyped]

FloatArray = npt.NDArray[np.float64]
ArrayLike = FloatArray | float

WEEKS_PER_YEAR = 365.25 / 7.0
WEEKS_PER_MONTH = WEEKS_PER_YEAR / 12.0

# Optimiser search box on log-parameters: keeps exp() finite without constraining real fits.
_LOG_BOUND = 12.0
# Half-width of the window around a == 1 where E[Y(t)] is taken as the mean of both sides.
_A_EPS = 1e-7


class ClvFitError(ValueError):
    """The data cannot identify the model (e.g. no repeat purchases at all)."""


@dataclass(frozen=True, slots=True)
class RfmData:
    """Per-customer calibration summary; all arrays align with ``customer_ids``."""

    customer_ids: tuple[str, ...]
    x: FloatArray  # repeat purchase days in (first purchase, cutoff]
    t_x: FloatArray  # first to last purchase day, in time units
    T: FloatArray  # first purchase day to cutoff, in time units
    m: FloatArray  # mean day total of the x_m valued repeat purchase days; 0 when x_m == 0
    historic_value: FloatArray  # total revenue (valued purchases) through the cutoff
    x_m: FloatArray  # repeat purchase days whose every purchase has a value: Gamma-Gamma's x


@dataclass(frozen=True, slots=True)
class BgNbdParams:
    """BG/NBD: purchase rate ~ Gamma(shape r, rate alpha), dropout probability ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = float("nan")
    converged: bool = True

    def as_dict(self) -> dict[str, float]:
        return {"r": self.r, "alpha": self.alpha, "a": self.a, "b": self.b}


@dataclass(frozen=True, slots=True)
class GammaGammaParams:
    """Gamma-Gamma: spend per transaction ~ Gamma(p, nu), nu ~ Gamma(q, gamma) across customers."""

    p: float
    q: float
    gamma: float
    log_likelihood: float = float("nan")
    converged: bool = True

    def as_dict(self) -> dict[str, float]:
        return {"p": self.p, "q": self.q, "gamma": self.gamma}


# --------------------------------------------------------------------------- summary


def summarize(
    purchases: Iterable[tuple[str, date, Decimal | float | None]],
    cutoff: date,
    time_unit_days: float = 7.0,
) -> RfmData:
    """Summarise ``(customer_id, day, amount)`` purchases into RFM arrays at ``cutoff``; an
    amount of None is a purchase without a value (no exchange rate): it counts in x, t_x and T,
    and a day with one is left out of the repeat spend (m, x_m).

    Purchases after ``cutoff`` are ignored; the cutoff day itself is included. Customers whose
    first purchase is after the cutoff do not appear. Customer order is first appearance order.
    """
    if time_unit_days <= 0:
        raise ValueError("time_unit_days must be positive")
    cutoff_ordinal = cutoff.toordinal()
    days: dict[str, dict[int, float]] = {}
    unvalued: dict[str, set[int]] = {}  # customer → the days with a purchase without a value
    for customer_id, day, amount in purchases:
        ordinal = day.toordinal()
        if ordinal > cutoff_ordinal:
            continue
        per_day = days.setdefault(customer_id, {})
        if amount is None:
            per_day.setdefault(ordinal, 0.0)
            unvalued.setdefault(customer_id, set()).add(ordinal)
        else:
            per_day[ordinal] = per_day.get(ordinal, 0.0) + float(amount)

    n = len(days)
    x = np.zeros(n)
    t_x = np.zeros(n)
    T = np.zeros(n)
    m = np.zeros(n)
    x_m = np.zeros(n)
    historic = np.zeros(n)
    for i, (customer_id, per_day) in enumerate(days.items()):
        ordinals = sorted(per_day)
        first, last = ordinals[0], ordinals[-1]
        x[i] = len(ordinals) - 1
        t_x[i] = (last - first) / time_unit_days
        T[i] = (cutoff_ordinal - first) / time_unit_days
        historic[i] = sum(per_day.values())
        skipped = unvalued.get(customer_id, ())
        valued = [per_day[o] for o in ordinals[1:] if o not in skipped]
        x_m[i] = len(valued)
        if valued:
            m[i] = sum(valued) / len(valued)
    return RfmData(tuple(days), x, t_x, T, m, historic, x_m)


# --------------------------------------------------------------------------- BG/NBD


def _f64(value: Any) -> FloatArray:
    """Type boundary for untyped scipy results."""
    return np.asarray(value, dtype=np.float64)


def _bgnbd_terms(
    theta: FloatArray, x: FloatArray, t_x: FloatArray, T: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per-row log-likelihood and its gradient w.r.t. the log-parameters ([FHL05] eq. 6)."""
    r, alpha, a, b = np.exp(theta)
    repeat = x > 0
    log_ab = _f64(betaln(a, b))
    # ln of the two terms of L(r, alpha, a, b | x, t_x, T), without the common factor
    # Gamma(r + x) alpha^r / Gamma(r).
    l1 = _f64(betaln(a, b + x)) - log_ab - (r + x) * np.log(alpha + T)
    # The second term exists only for x > 0; b + x - 1 is clipped so x == 0 rows stay finite.
    bx1 = np.where(repeat, b + x - 1.0, 1.0)
    l2 = np.where(repeat, _f64(betaln(a + 1.0, bx1)) - log_ab - (r + x) * np.log(alpha + t_x), -np.inf)
    l12 = np.logaddexp(l1, l2)
    ll = _f64(gammaln(r + x)) - _f64(gammaln(r)) + r * np.log(alpha) + l12

    w1 = np.exp(l1 - l12)
    w2 = np.exp(l2 - l12)
    psi_abx = _f64(psi(a + b + x))
    d_r = _f64(psi(r + x)) - _f64(psi(r)) + np.log(alpha) - w1 * np.log(alpha + T) - w2 * np.log(alpha + t_x)
    d_alpha = r / alpha - (r + x) * (w1 / (alpha + T) + w2 / (alpha + t_x))
    d_a = w1 * (_f64(psi(a)) - psi_abx) + w2 * (_f64(psi(a + 1.0)) - psi_abx) - (psi(a) - psi(a + b))
    d_b = (
        w1 * (_f64(psi(b + x)) - psi_abx)
        + w2 * (np.where(repeat, _f64(psi(bx1)), 0.0) - psi_abx)
        - (psi(b) - psi(a + b))
    )
    grad = np.stack([d_r * r, d_alpha * alpha, d_a * a, d_b * b])
    return ll, grad


def bgnbd_log_likelihood(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> float:
    """Total BG/NBD log-likelihood of the sample at ``params`` ([FHL05] eq. 6)."""
    theta = np.log(np.array([params.r, params.alpha, params.a, params.b]))
    xa, txa, Ta = np.broadcast_arrays(_f64(x), _f64(t_x), _f64(T))
    ll, _ = _bgnbd_terms(theta, xa, txa, Ta)
    return float(ll.sum())


def _weighted(ll: FloatArray, grad: FloatArray, weight: FloatArray, total: float) -> tuple[float, FloatArray]:
    """The mean negative log-likelihood and its gradient over weighted rows.

    Plain multiply-and-sum rather than ``@``: a matrix product goes to numpy's OpenBLAS, which
    may have been loaded with a thread per core before ``services.kpi`` limited it (see the
    package's docstring), and whose threads then spin-wait between the optimiser's calls.
    """
    return -float(np.sum(weight * ll)) / total, -np.sum(grad * weight, axis=1) / total


def _compress(*columns: FloatArray) -> tuple[list[FloatArray], FloatArray]:
    """Collapse identical rows into unique rows plus a multiplicity weight."""
    stacked = np.column_stack(columns)
    unique, counts = np.unique(stacked, axis=0, return_counts=True)
    return [np.ascontiguousarray(unique[:, j]) for j in range(unique.shape[1])], counts.astype(np.float64)


def _validate(x: FloatArray, t_x: FloatArray, T: FloatArray) -> None:
    if x.size == 0:
        raise ClvFitError("no customers to fit")
    if np.any(x < 0) or np.any(t_x < 0) or np.any(t_x > T) or np.any((x > 0) & (t_x <= 0)):
        raise ValueError("need x >= 0 and 0 <= t_x <= T, with t_x > 0 whenever x > 0")


def fit_bgnbd(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> BgNbdParams:
    """Maximum-likelihood BG/NBD fit ([FHL05] eq. 6).

    Maximises the published log-likelihood with L-BFGS-B over log(r, alpha, a, b) using the
    analytic gradient; identical (x, t_x, T) rows are evaluated once and weighted.
    """
    xa, txa, Ta = (a.ravel() for a in np.broadcast_arrays(_f64(x), _f64(t_x), _f64(T)))
    _validate(xa, txa, Ta)
    if not np.any(xa > 0):
        raise ClvFitError("BG/NBD needs at least one customer with a repeat purchase")
    (ux, utx, uT), weight = _compress(xa, txa, Ta)
    total = float(weight.sum())

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        ll, grad = _bgnbd_terms(theta, ux, utx, uT)
        return _weighted(ll, grad, weight, total)

    # Start from moment-like values: mean rate = mean(x) / mean(T) with r = 1.
    rate = max(float(xa.mean() / max(Ta.mean(), 1e-9)), 1e-6)
    start = np.log(np.array([1.0, 1.0 / rate, 1.0, 1.0]))
    result = _minimize(objective, start, bounds=4)
    r, alpha, a, b = (float(v) for v in np.exp(result.x))
    return BgNbdParams(
        r, alpha, a, b, log_likelihood=-float(result.fun) * total, converged=bool(result.success)
    )


def _minimize(objective: Any, start: FloatArray, bounds: int) -> Any:
    return minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=[(-_LOG_BOUND, _LOG_BOUND)] * bounds,
        options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9},
    )


def p_alive(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> FloatArray:
    """P(still active at T | x, t_x, T) ([FHL05] eq. 13).

    1 / (1 + [x > 0] * a / (b + x - 1) * ((alpha + T) / (alpha + t_x))^(r + x)).

    A customer with no repeat purchase (x == 0) has P(alive) = 1: in the BG/NBD, dropout can only
    happen immediately after a repeat purchase, so nobody dies before their first one.
    """
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    xa, txa, Ta = np.broadcast_arrays(_f64(x), _f64(t_x), _f64(T))
    repeat = xa > 0
    bx1 = np.where(repeat, b + xa - 1.0, 1.0)
    log_odds = np.log(a) - np.log(bx1) + (r + xa) * (np.log(alpha + Ta) - np.log(alpha + txa))
    return np.where(repeat, 1.0 / (1.0 + np.exp(log_odds)), 1.0)


def expected_purchases(
    params: BgNbdParams, t: ArrayLike, x: ArrayLike, t_x: ArrayLike, T: ArrayLike
) -> FloatArray:
    """E[Y(t) | x, t_x, T]: expected purchases in (T, T + t] ([FHL05] eq. 10).

    (a + b + x - 1) / (a - 1)
      * [1 - ((alpha + T) / (alpha + T + t))^(r + x) * 2F1(r + x, b + x; a + b + x - 1; t / (alpha + T + t))]
      / (1 + [x > 0] * a / (b + x - 1) * ((alpha + T) / (alpha + t_x))^(r + x))

    The last factor is P(alive) (eq. 13). With x = t_x = T = 0 this is the unconditional E[X(t)]
    of a newly acquired customer (eq. 9). Evaluated via Euler's transformation of 2F1 (see
    ``_expected_given_alive``); at a == 1 (a removable singularity) the limit is approximated.
    """
    ta, xa, txa, Ta = np.broadcast_arrays(_f64(t), _f64(x), _f64(t_x), _f64(T))
    a = params.a
    if abs(a - 1.0) < _A_EPS:
        # Removable singularity at a == 1: average the two sides.
        below = _expected_given_alive(params, a - _A_EPS, ta, xa, Ta)
        above = _expected_given_alive(params, a + _A_EPS, ta, xa, Ta)
        given_alive = (below + above) / 2.0
    else:
        given_alive = _expected_given_alive(params, a, ta, xa, Ta)
    return given_alive * p_alive(params, xa, txa, Ta)


def _expected_given_alive(
    params: BgNbdParams, a: float, t: FloatArray, x: FloatArray, T: FloatArray
) -> FloatArray:
    """The first two factors of [FHL05] eq. 10, after Euler's transformation of 2F1.

    With z = t / (alpha + T + t), Euler's identity 2F1(A, B; C; z) = (1 - z)^(C - A - B)
    2F1(C - A, C - B; C; z) turns (1 - z)^(r + x) 2F1(r + x, b + x; a + b + x - 1; z) into
    (1 - z)^(a - 1) 2F1(a - 1, a + b - 1 - r; a + b + x - 1; z), which stays finite for large x
    and long horizons where the published form is 0 * inf.

    The other way round, a very large a (a fit whose dropout distribution degenerates to a
    point, a, b -> infinity, on data without visible dropout) overflows the transformed 2F1
    while the published form is finite: those rows fall back to the published form.
    """
    r, alpha, b = params.r, params.alpha, params.b
    z = t / (alpha + T + t)
    log_1mz = np.log(alpha + T) - np.log(alpha + T + t)
    with np.errstate(invalid="ignore", over="ignore"):
        hyp = _f64(hyp2f1(a - 1.0, a + b - 1.0 - r, a + b + x - 1.0, z))
        # 1 - (1 - z)^(a - 1) * hyp, written to keep precision when a is close to 1.
        bracket = (1.0 - hyp) - hyp * np.expm1((a - 1.0) * log_1mz)
        overflowed = ~np.isfinite(bracket)
        if overflowed.any():
            printed = 1.0 - np.exp((r + x) * log_1mz) * _f64(hyp2f1(r + x, b + x, a + b + x - 1.0, z))
            bracket = np.where(overflowed, printed, bracket)
    return (a + b + x - 1.0) / (a - 1.0) * bracket


def simulate_bgnbd(
    params: BgNbdParams, n: int, T_weeks: ArrayLike, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Draw (x, t_x, T) for ``n`` customers from the BG/NBD generative process.

    Each customer makes a first purchase at time 0 and is observed until ``T_weeks`` (a scalar
    or one value per customer). Rate lambda ~ Gamma(r, rate alpha), dropout p ~ Beta(a, b);
    purchases follow a Poisson process with rate lambda, and after each repeat purchase the
    customer becomes inactive with probability p.
    """
    T = np.broadcast_to(_f64(T_weeks), (n,)).copy()
    lam = rng.gamma(params.r, 1.0 / params.alpha, size=n)
    p = rng.beta(params.a, params.b, size=n)
    x = np.zeros(n)
    t_x = np.zeros(n)
    now = np.zeros(n)
    active = np.ones(n, dtype=bool)
    while active.any():
        idx = np.flatnonzero(active)
        # A zero rate would be an infinite wait: such customers never purchase again.
        wait = rng.exponential(1.0, size=idx.size) / np.maximum(lam[idx], 1e-300)
        arrival = now[idx] + wait
        inside = arrival <= T[idx]
        hit = idx[inside]
        x[hit] += 1.0
        t_x[hit] = arrival[inside]
        now[hit] = arrival[inside]
        dies = rng.random(hit.size) < p[hit]
        active[:] = False
        active[hit[~dies]] = True
    return x, t_x, T


# --------------------------------------------------------------------------- Gamma-Gamma


def _gg_terms(theta: FloatArray, x: FloatArray, m: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per-customer log density of the mean spend m over x transactions ([FH13] eq. 3)."""
    p, q, g = np.exp(theta)
    px = p * x
    log_gmx = np.log(g + m * x)
    ll = (
        _f64(gammaln(px + q))
        - _f64(gammaln(px))
        - gammaln(q)
        + q * np.log(g)
        + (px - 1.0) * np.log(m)
        + px * np.log(x)
        - (px + q) * log_gmx
    )
    psi_pxq = _f64(psi(px + q))
    d_p = x * (psi_pxq - _f64(psi(px)) + np.log(m) + np.log(x) - log_gmx)
    d_q = psi_pxq - psi(q) + np.log(g) - log_gmx
    d_g = q / g - (px + q) / (g + m * x)
    return ll, np.stack([d_p * p, d_q * q, d_g * g])


def gamma_gamma_log_likelihood(params: GammaGammaParams, x: ArrayLike, m: ArrayLike) -> float:
    """Total Gamma-Gamma log-likelihood over customers with x > 0 and m > 0 ([FH13] eq. 3)."""
    xa, ma = np.broadcast_arrays(_f64(x), _f64(m))
    keep = (xa > 0) & (ma > 0)
    theta = np.log(np.array([params.p, params.q, params.gamma]))
    ll, _ = _gg_terms(theta, xa[keep], ma[keep])
    return float(ll.sum())


def fit_gamma_gamma(x: ArrayLike, m: ArrayLike) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma fit on the customers with x > 0 (and m > 0) ([FH13]).

    ``m`` is the mean value of the customer's x repeat transactions. Customers with a zero mean
    spend are left out: the gamma distribution has no mass at 0.
    """
    xa, ma = (a.ravel() for a in np.broadcast_arrays(_f64(x), _f64(m)))
    keep = (xa > 0) & (ma > 0)
    if keep.sum() < 2:
        raise ClvFitError("Gamma-Gamma needs customers with repeat purchases of positive value")
    (ux, um), weight = _compress(xa[keep], ma[keep])
    total = float(weight.sum())

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        ll, grad = _gg_terms(theta, ux, um)
        return _weighted(ll, grad, weight, total)

    # p = q = 2 with the population mean spend p * gamma / (q - 1) matching the sample mean.
    start = np.log(np.array([2.0, 2.0, float(np.average(um, weights=weight)) / 2.0]))
    result = _minimize(objective, start, bounds=3)
    p, q, g = (float(v) for v in np.exp(result.x))
    return GammaGammaParams(
        p, q, g, log_likelihood=-float(result.fun) * total, converged=bool(result.success)
    )


def expected_spend(params: GammaGammaParams, x: ArrayLike, m: ArrayLike) -> FloatArray:
    """E[M | x, m]: expected value of a future transaction ([FH13] eq. 5).

    p * (gamma + x * m) / (p * x + q - 1), a weighted average of the population mean
    p * gamma / (q - 1) and the customer's observed mean m (weight p x / (p x + q - 1)).
    For x == 0 it is the population mean. Requires q > 1.
    """
    if params.q <= 1:
        raise ValueError("expected spend is infinite for q <= 1")
    xa, ma = np.broadcast_arrays(_f64(x), _f64(m))
    ma = _f64(np.where(xa > 0, ma, 0.0))
    return params.p * (params.gamma + xa * ma) / (params.p * xa + params.q - 1.0)


# --------------------------------------------------------------------------- CLV


def predicted_clv(
    bg: BgNbdParams,
    gg: GammaGammaParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    m: ArrayLike,
    *,
    horizon_weeks: float,
    annual_discount_rate: float,
    step_weeks: float = WEEKS_PER_MONTH,
    x_m: ArrayLike | None = None,
) -> FloatArray:
    """Discounted expected revenue over the next ``horizon_weeks`` after the cutoff.

    The horizon is cut into steps of ``step_weeks`` (a month, 365.25 / 84 weeks, by default;
    the last step is shorter when the horizon is not a whole number of steps): t_k =
    min(k * step_weeks, horizon_weeks), k = 1..K. Then

        CLV = E[M | x, m] * sum_k (E[Y(t_k) | x, t_x, T] - E[Y(t_{k-1}) | x, t_x, T])
                                * (1 + annual_discount_rate) ** -(t_k / WEEKS_PER_YEAR)

    i.e. the purchases expected in each step are valued at the Gamma-Gamma conditional mean
    spend and discounted from the end of the step, with WEEKS_PER_YEAR = 365.25 / 7.
    Time unit: weeks, so x, t_x, T must come from ``summarize`` with the default unit.
    ``x_m``: the repeat transactions that ``m`` is the mean of, when not all x of them have a
    value (``RfmData.x_m``); E[M | x_m, m] then weighs the customer's mean by those.
    """
    if horizon_weeks < 0 or step_weeks <= 0:
        raise ValueError("horizon_weeks must be >= 0 and step_weeks > 0")
    if annual_discount_rate <= -1:
        raise ValueError("annual_discount_rate must be > -1")
    xa, txa, Ta, ma = np.broadcast_arrays(_f64(x), _f64(t_x), _f64(T), _f64(m))
    steps = int(np.ceil(horizon_weeks / step_weeks - 1e-12))
    ends = np.minimum(np.arange(1, steps + 1) * step_weeks, horizon_weeks)
    total = np.zeros(xa.shape)
    previous = np.zeros(xa.shape)
    for end in ends:
        cumulative = expected_purchases(bg, float(end), xa, txa, Ta)
        total += (cumulative - previous) * (1.0 + annual_discount_rate) ** (-float(end) / WEEKS_PER_YEAR)
        previous = cumulative
    return total * expected_spend(gg, xa if x_m is None else _f64(x_m), ma)
