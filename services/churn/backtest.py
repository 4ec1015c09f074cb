"""Scoring and backtesting on a transaction file, with the live service's own model code.

The backtest fits everything on the calibration period only (the risk model
learns from the calibration period's own last 90 days), scores every customer
at the calibration end, and compares three rankings for "no repeat purchase in
the holdout": the risk score, days since the last purchase, and the best of the
BG/NBD quantities (P(alive), P(no purchase in the holdout), expected holdout
purchases), each used alone.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from services.churn import bgnbd
from services.churn.assess import AT_RISK, Assessment, BandRules, assess
from services.churn.model import RiskModel, auc, fit
from services.churn.signals import History, bgnbd_inputs, histories_from_purchases
from services.churn.transactions import Purchase, holdout_purchase_days


class BacktestError(ValueError):
    """Inputs that cannot give a meaningful result (e.g. too few customers, an empty holdout)."""


@dataclass(frozen=True)
class Scored:
    customer_id: str
    assessment: Assessment
    x: int
    t_x: float
    T: float


def score_file(
    purchases: Sequence[Purchase], calibration_end: date, rules: BandRules
) -> tuple[RiskModel, list[Scored]]:
    histories = histories_from_purchases(purchases, calibration_end)
    model = fit(histories, calibration_end)
    if model is None:
        raise BacktestError(f"too few customers with 90 days of history before {calibration_end} to learn a risk model")
    return model, [_scored(model, cid, h, calibration_end, rules) for cid, h in histories.items()]


def _scored(model: RiskModel, cid: str, h: History, today: date, rules: BandRules) -> Scored:
    x, t_x, T = bgnbd_inputs(h, today)
    return Scored(cid, assess(model, h, today, None, rules), x, t_x, T)


def write_scores(path: Path, model: RiskModel, scored: Sequence[Scored], horizon_weeks: float = 39) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["customer_id", "risk_score", "band", "p_alive", "expected_purchases_39w", "reasons"])
        for s in scored:
            a = s.assessment
            e = bgnbd.expected_purchases(model.params, horizon_weeks, s.x, s.t_x, s.T)
            w.writerow(
                [s.customer_id, f"{a.score:.4f}", a.band, f"{a.signals.p_alive:.4f}", f"{e:.4f}", "; ".join(a.reasons)]
            )


@dataclass
class Method:
    name: str
    auc: float
    precision: float
    recall: float


@dataclass
class BacktestReport:
    calibration_end: date
    observation_end: date
    customers: int
    churned: int  # no repeat purchase in the holdout
    flagged: int  # customers each method flags: as many as the risk score puts in high or lost
    methods: list[Method]
    best_bgnbd: str
    predicted_purchases: float
    actual_purchases: int
    by_frequency: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calibration_end": self.calibration_end.isoformat(),
            "observation_end": self.observation_end.isoformat(),
            "customers": self.customers,
            "churned": self.churned,
            "flagged": self.flagged,
            "methods": [m.__dict__ for m in self.methods],
            "best_bgnbd": self.best_bgnbd,
            "predicted_purchases": self.predicted_purchases,
            "actual_purchases": self.actual_purchases,
            "by_frequency": self.by_frequency,
            "model": self.model,
        }


def _precision_recall(scores: np.ndarray, churned: np.ndarray, flagged: int) -> tuple[float, float]:
    if flagged == 0:
        return float("nan"), 0.0
    top = np.argsort(-scores, kind="stable")[:flagged]
    hits = int(churned[top].sum())
    return hits / flagged, hits / max(int(churned.sum()), 1)


def backtest(
    purchases: Sequence[Purchase], calibration_end: date, observation_end: date, rules: BandRules
) -> BacktestReport:
    if observation_end <= calibration_end:
        raise BacktestError("the observation end must come after the calibration end")
    model, scored = score_file(purchases, calibration_end, rules)
    holdout = holdout_purchase_days(purchases, date.fromordinal(calibration_end.toordinal() + 1), observation_end)
    churned = np.array([holdout.get(s.customer_id, 0) == 0 for s in scored])
    if churned.all() or not churned.any():
        raise BacktestError("every customer falls in one class in the holdout; nothing to rank")
    weeks = (observation_end - calibration_end).days / 7
    p = model.params
    expected = np.array([bgnbd.expected_purchases(p, weeks, s.x, s.t_x, s.T) for s in scored])
    candidates = {
        "risk_score": np.array([s.assessment.score for s in scored]),
        "days_since_last_purchase": np.array([s.assessment.signals.recency_days for s in scored], float),
        "bgnbd_p_not_alive": np.array([1 - s.assessment.signals.p_alive for s in scored]),
        "bgnbd_p_no_purchase": np.array([bgnbd.p_no_purchase(p, weeks, s.x, s.t_x, s.T) for s in scored]),
        "bgnbd_expected_purchases": -expected,
    }
    flagged = sum(1 for s in scored if s.assessment.band in AT_RISK)
    methods = []
    for name, sc in candidates.items():
        precision, recall = _precision_recall(sc, churned, flagged)
        methods.append(Method(name, auc(sc, churned), precision, recall))
    best = max((m for m in methods if m.name.startswith("bgnbd_")), key=lambda m: m.auc)
    xs = np.array([s.x for s in scored])
    actual = np.array([holdout.get(s.customer_id, 0) for s in scored])
    by_frequency = []
    for k in range(8):
        mask = xs == k if k < 7 else xs >= 7
        if mask.any():
            by_frequency.append(
                {
                    "x": str(k) if k < 7 else "7+",
                    "customers": int(mask.sum()),
                    "predicted": float(expected[mask].mean()),
                    "actual": float(actual[mask].mean()),
                }
            )
    return BacktestReport(
        calibration_end=calibration_end,
        observation_end=observation_end,
        customers=len(scored),
        churned=int(churned.sum()),
        flagged=flagged,
        methods=methods,
        best_bgnbd=best.name,
        predicted_purchases=float(expected.sum()),
        actual_purchases=int(actual.sum()),
        by_frequency=by_frequency,
        model=model.to_doc(),
    )
