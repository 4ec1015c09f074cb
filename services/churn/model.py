"""The churn risk score: explainable signals combined by a logistic model the customer base teaches.

The score is the estimated probability of no purchase in the next 90 days. It is
learned from the base's own past: the signals as they stood 90 days ago, against
whether each customer bought in the 90 days since. BG/NBD (refit on the whole
base) contributes its expected purchases as one signal among the others, so the
score can only add to what the probabilistic model knows.

Every term of the score is a contribution in log-odds relative to the average
customer of the training split, which is what the reasons are made of. Signals
the training data does not show (no complaints ever, say) keep documented prior
weights instead of silently counting for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from services.churn import bgnbd
from services.churn.signals import WINDOW_DAYS, History, Signals, Timeline, bgnbd_inputs, compute

# name -> how the signal enters the model (monotone transforms keep the weights readable)
FEATURES: dict[str, Callable[[Signals], float]] = {
    "expected_purchases": lambda s: math.log(s.expected_purchases + 1e-3),
    "recency": lambda s: math.log1p(s.recency_days),
    "recency_ratio": lambda s: math.log((s.recency_days + 1) / max(s.usual_gap_days, 1.0)),
    "repeat_purchases": lambda s: math.log1p(s.repeat_purchases),
    "recent_purchases": lambda s: math.log1p(s.recent_purchases),
    "previous_purchases": lambda s: math.log1p(s.previous_purchases),
    "spend_drop": lambda s: math.log((s.previous_spend + 1) / (s.recent_spend + 1)),
    "mean_spend": lambda s: math.log1p(s.mean_spend),
    "complaints": lambda s: float(s.complaints),
    "low_scores": lambda s: float(s.low_scores),
    "engagement_drop": lambda s: math.log((s.previous_touches + 1) / (s.recent_touches + 1)),
}
NAMES = tuple(FEATURES)

# The direction each weight may take, so that every reason reads the right way round
# (+1: more of it means more risk, -1: less risk).
SIGNS = {
    "expected_purchases": -1,
    "recency": 1,
    "recency_ratio": 1,
    "repeat_purchases": -1,
    "recent_purchases": -1,
    "previous_purchases": 1,
    "spend_drop": 1,
    "mean_spend": -1,
    "complaints": 1,
    "low_scores": 1,
    "engagement_drop": 1,
}
assert set(SIGNS) == set(FEATURES)

# Log-odds per unit, used while the training data has no variation in that signal.
PRIOR_WEIGHTS = {"complaints": 0.6, "low_scores": 0.5, "engagement_drop": 0.3}


@dataclass(frozen=True)
class RiskModel:
    version: int
    params: bgnbd.BgNbdParams
    typical_gap_days: float
    intercept: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    fitted_on: str | None = None  # the day the model was fitted for (event time), ISO
    train_customers: int = 0
    train_positive_rate: float | None = None
    train_auc: float | None = None

    def logit_terms(self, s: Signals) -> dict[str, float]:
        return {
            n: w * (FEATURES[n](s) - m) / sc
            for n, w, m, sc in zip(NAMES, self.weights, self.mean, self.scale, strict=True)
        }

    def score(self, s: Signals) -> float:
        # The same sum as logit_terms, term by term, without building the dict: a band search
        # scores a dozen days per customer. 1/(1+e^-z) is what expit computes, to the bit.
        total = 0.0
        for f, w, m, sc in self._terms:
            total += w * (f(s) - m) / sc
        z = self.intercept + total
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else float(expit(z))  # math.exp would overflow

    @cached_property
    def _terms(self) -> tuple[tuple[Callable[[Signals], float], float, float, float], ...]:
        return tuple(
            (FEATURES[n], w, m, sc) for n, w, m, sc in zip(NAMES, self.weights, self.mean, self.scale, strict=True)
        )

    def signals(self, h: History, today: date) -> Signals:
        return compute(h, today, self.params, self.typical_gap_days)

    def timeline(self, h: History) -> Timeline:
        return Timeline(h, self.params, self.typical_gap_days)

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.version,
            "params": self.params.as_dict(),
            "typical_gap_days": self.typical_gap_days,
            "intercept": self.intercept,
            "features": dict(zip(NAMES, zip(self.mean, self.scale, self.weights, strict=True), strict=True)),
            "fitted_on": self.fitted_on,
            "train_customers": self.train_customers,
            "train_positive_rate": self.train_positive_rate,
            "train_auc": self.train_auc,
        }

    @classmethod
    def from_doc(cls, d: Mapping[str, Any]) -> RiskModel:
        p = d["params"]
        feats = d["features"]
        # A feature added after this fit was stored counts with its prior weight.
        rows = [feats.get(n, (0.0, 1.0, PRIOR_WEIGHTS.get(n, 0.0))) for n in NAMES]
        return cls(
            version=int(d["_id"]),
            params=bgnbd.BgNbdParams(p["r"], p["alpha"], p["a"], p["b"], p["log_likelihood"], p["customers"]),
            typical_gap_days=float(d["typical_gap_days"]),
            intercept=float(d["intercept"]),
            mean=tuple(float(r[0]) for r in rows),
            scale=tuple(float(r[1]) for r in rows),
            weights=tuple(float(r[2]) for r in rows),
            fitted_on=d.get("fitted_on"),
            train_customers=int(d.get("train_customers", 0)),
            train_positive_rate=d.get("train_positive_rate"),
            train_auc=d.get("train_auc"),
        )


def auc(scores, labels) -> float:
    """ROC AUC (Mann-Whitney, ties counted half): P(score of a positive > score of a negative)."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _logistic(z: np.ndarray, y: np.ndarray, l2: float, signs: list[int]) -> tuple[float, np.ndarray]:
    """L2-regularised logistic regression on standardised columns (intercept unpenalised), signs bounded."""
    design = np.c_[np.ones(len(z)), z]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        eta = design @ w
        loss = np.sum(np.logaddexp(0, eta) - y * eta) + l2 * np.sum(w[1:] ** 2) / 2
        grad = design.T @ (expit(eta) - y)
        grad[1:] += l2 * w[1:]
        return float(loss), grad

    bounds = [(None, None)] + [(0, None) if sg > 0 else (None, 0) if sg < 0 else (None, None) for sg in signs]
    res = minimize(objective, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B", bounds=bounds)
    return float(res.x[0]), res.x[1:]


def typical_gap(histories: Mapping[str, History], today: date) -> float:
    gaps = [
        (h.last - h.first).days / (h.purchase_days - 1)
        for h in histories.values()
        if h.first is not None and h.first <= today and h.purchase_days > 1
    ]
    return float(np.median(gaps)) if gaps else 60.0


def fit_bgnbd(histories: Mapping[str, History], today: date) -> bgnbd.BgNbdParams:
    rows = [bgnbd_inputs(h, today) for h in histories.values() if h.first is not None and h.first <= today]
    x, t_x, T = zip(*rows, strict=True) if rows else ((), (), ())
    return bgnbd.fit(list(x), list(t_x), list(T))


def fit(
    histories: Mapping[str, History],
    today: date,
    *,
    version: int = 1,
    l2: float = 1.0,
    min_customers: int = 200,
) -> RiskModel | None:
    """A model for scoring at `today`, trained on the split WINDOW_DAYS earlier; None if too few customers."""
    split = today - timedelta(days=WINDOW_DAYS)
    past = {cid: h.as_of(split) for cid, h in histories.items()}
    past = {cid: h for cid, h in past.items() if h.first is not None}
    # A live service may hold purchases newer than its clock (event time lags the fastest partition).
    current = {cid: h.as_of(today) for cid, h in histories.items()}
    current = {cid: h for cid, h in current.items() if h.first is not None}
    if len(past) < min_customers or len(current) < min_customers:
        return None
    past_params = fit_bgnbd(past, split)
    past_gap = typical_gap(past, split)
    ids = list(past)
    feats = np.array([[f(compute(past[c], split, past_params, past_gap)) for f in FEATURES.values()] for c in ids])
    # Positive: no purchase day after the split (up to `today`).
    # From `current`, not the whole history: a purchase after `today` must not label the fit.
    y = np.array([0.0 if current[c].purchase_days > past[c].purchase_days else 1.0 for c in ids])
    if y.min() == y.max():
        return None
    mean, scale = feats.mean(axis=0), feats.std(axis=0)
    varying = scale > 1e-9
    signs = [SIGNS[n] for n, v in zip(NAMES, varying, strict=True) if v]
    intercept, w = _logistic((feats[:, varying] - mean[varying]) / scale[varying], y, l2, signs)
    weights = np.array([PRIOR_WEIGHTS.get(n, 0.0) for n in NAMES])
    weights[varying] = w
    mean = np.where(varying, mean, 0.0)
    scale = np.where(varying, scale, 1.0)
    # In-sample AUC on the training split: a health figure stored with the fit, not a test score.
    train_auc = auc(intercept + ((feats - mean) / scale) @ weights, y)
    return RiskModel(
        version=version,
        params=fit_bgnbd(current, today),
        typical_gap_days=typical_gap(current, today),
        intercept=intercept,
        mean=tuple(map(float, mean)),
        scale=tuple(map(float, scale)),
        weights=tuple(map(float, weights)),
        fitted_on=today.isoformat(),
        train_customers=len(ids),
        train_positive_rate=float(y.mean()),
        train_auc=train_auc,
    )
