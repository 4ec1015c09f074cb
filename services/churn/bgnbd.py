"""The BG/NBD model (Fader, Hardie & Lee 2005): who is still "alive", and how much they will buy.

Pure numerics on (x, t_x, T): x repeat purchases, t_x the time of the last
one, T the time since the first purchase (weeks here). Fitting maximises the
likelihood with scipy.optimize over log-parameters (they must stay positive);
customers with the same (x, t_x, T) are folded into one weighted term.
Everything is done in logs so that large x or tiny T neither overflow nor
produce NaN.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, gammaln, hyp2f1, logsumexp


@dataclass(frozen=True)
class BgNbdParams:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = float("nan")
    customers: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "a": self.a,
            "b": self.b,
            "log_likelihood": self.log_likelihood,
            "customers": self.customers,
        }


def _log_likelihood_terms(log_params: np.ndarray, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    r, alpha, a, b = np.exp(log_params)
    ln_a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    ln_a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    ln_a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        ln_a4 = np.where(
            x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + t_x), -np.inf
        )
    return ln_a1 + ln_a2 + logsumexp(np.stack([ln_a3, ln_a4]), axis=0)


def log_likelihood(params: BgNbdParams, x, t_x, T) -> float:
    lp = np.log([params.r, params.alpha, params.a, params.b])
    return float(np.sum(_log_likelihood_terms(lp, np.asarray(x, float), np.asarray(t_x, float), np.asarray(T, float))))


class FitError(ValueError):
    """The optimiser did not converge to finite estimates: keep the model in use."""


def fit(x: Sequence[int], t_x: Sequence[float], T: Sequence[float], *, penalizer: float = 0.0) -> BgNbdParams:
    """Maximum-likelihood estimates of r, alpha, a, b; FitError when the optimiser did not converge."""
    if len(x) == 0:
        raise ValueError("no customers to fit")
    folded = Counter(zip(x, t_x, T, strict=True))
    keys = np.array(list(folded.keys()), dtype=float)
    weights = np.array(list(folded.values()), dtype=float)
    xs, txs, Ts = keys[:, 0], keys[:, 1], keys[:, 2]
    if np.any(txs > Ts) or np.any(xs < 0) or np.any(txs < 0):
        raise ValueError("need 0 <= t_x <= T and x >= 0 for every customer")

    def objective(lp: np.ndarray) -> float:
        ll = np.sum(weights * _log_likelihood_terms(lp, xs, txs, Ts))
        value = -ll / weights.sum() + penalizer * np.sum(np.exp(lp) ** 2)
        return float(value) if np.isfinite(value) else 1e300

    # Nelder-Mead needs no gradients and is robust on this small, smooth problem;
    # starting from the unit point, as the reference implementations do.
    result = minimize(
        objective,
        x0=np.zeros(4),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20_000, "maxfev": 40_000},
    )
    r, alpha, a, b = np.exp(result.x)
    ll = float(np.sum(weights * _log_likelihood_terms(result.x, xs, txs, Ts)))
    # Limits are legitimate answers (b -> infinity: nobody drops out, CDNOW's first 100 days;
    # r and alpha -> infinity together: one purchase rate for all), so only a failed or
    # non-finite fit is refused.
    if not result.success or not np.all(np.isfinite([r, alpha, a, b, ll])) or min(r, alpha, a, b) <= 0:
        found = f"r={r:.3g} alpha={alpha:.3g} a={a:.3g} b={b:.3g}"
        raise FitError(f"BG/NBD fit did not converge ({result.message}; {found})")
    return BgNbdParams(float(r), float(alpha), float(a), float(b), ll, int(weights.sum()))


def _log_odds_dead(p: BgNbdParams, x: float, t_x: float, T: float) -> float:
    """ln( a/(b+x-1) * ((alpha+T)/(alpha+t_x))^(r+x) ), the log odds of having dropped out; -inf for x = 0."""
    if x <= 0:
        return -math.inf
    return math.log(p.a) - math.log(p.b + x - 1) + (p.r + x) * (math.log(p.alpha + T) - math.log(p.alpha + t_x))


def p_alive(p: BgNbdParams, x: float, t_x: float, T: float) -> float:
    """P(still active | x, t_x, T). 1 for a customer without repeat purchases (the model's convention)."""
    return float(expit(-_log_odds_dead(p, x, t_x, T)))


def expected_purchases(p: BgNbdParams, t: float, x: float, t_x: float, T: float) -> float:
    """Expected purchases in the next `t` time units, given (x, t_x, T) (FHL 2005, eq. 10).

    Written with the Pfaff transform 2F1(r+x, a-1; a+b+x-1; -t/(alpha+T)), so the
    factor ((alpha+T)/(alpha+T+t))^(r+x) cancels instead of under- or overflowing.
    """
    if t <= 0:
        return 0.0
    a_minus_1 = p.a - 1 if abs(p.a - 1) > 1e-9 else 1e-9
    z = -t / (p.alpha + T)
    # Python floats and math, not NumPy scalars: the band search calls this a dozen times per
    # customer, and NumPy's per-scalar overhead was most of its cost (same values).
    f = float(hyp2f1(p.r + x, a_minus_1, p.a + p.b + x - 1, z))
    if not math.isfinite(f):
        f = _hyp2f1_series_fallback(p.r + x, a_minus_1, p.a + p.b + x - 1, z)
    head = (p.a + p.b + x - 1) / a_minus_1 * (1 - f)
    value = head * p_alive(p, x, t_x, T)
    return max(value, 0.0) if math.isfinite(value) else 0.0


def _hyp2f1_series_fallback(a: float, b: float, c: float, z: float) -> float:
    """2F1(a, b; c; z) for z < 0 as (1-z)^-b 2F1(c-a, b; c; z/(z-1)), the series summed directly."""
    w = z / (z - 1)
    term, total = 1.0, 1.0
    for n in range(10_000):
        term *= (c - a + n) * (b + n) / ((c + n) * (n + 1)) * w
        total += term
        if abs(term) < 1e-14 * abs(total):
            break
    return (1 - z) ** (-b) * total


def p_no_purchase(p: BgNbdParams, t: float, x: float, t_x: float, T: float) -> float:
    """P(no purchase in the next `t` | x, t_x, T): dropped out, or alive and silent.

    Given alive, the purchase rate's posterior is Gamma(r + x, alpha + T), so the
    chance of no purchase in t is ((alpha + T) / (alpha + T + t))^(r + x).
    """
    alive = p_alive(p, x, t_x, T)
    silent = math.exp((p.r + x) * (math.log(p.alpha + T) - math.log(p.alpha + T + t)))
    return float((1 - alive) + alive * silent)
