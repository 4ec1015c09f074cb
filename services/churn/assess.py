"""From a score to what people act on: a risk band that does not flap, and reasons in words and numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

from services.churn.model import RiskModel
from services.churn.signals import ISSUE_DAYS, WINDOW_DAYS, History, Signals

BANDS = ("low", "medium", "high", "lost")
AT_RISK = ("high", "lost")


@dataclass(frozen=True)
class BandRules:
    """Bands measure drift: how far the customer's risk has risen since their last purchase day.

    The score is an absolute probability, and a one-time buyer starts far above a
    monthly regular; what calls for action is a customer becoming much less likely
    to come back than they were when last active. Thresholds are rises in log-odds
    (1.0 = the odds of not buying have grown 2.7-fold). High and lost also need the
    customer to be overdue: no purchase for at least `at_risk_min_ratio` times their
    usual gap.
    """

    medium: float = 0.6
    high: float = 1.0
    lost: float = 2.0
    # A customer leaves a band downwards only once the rise is this far below its entry threshold.
    hysteresis: float = 0.2
    at_risk_min_ratio: float = 1.0
    reason_min_logit: float = 0.10  # contributions smaller than this are not worth a reason
    max_reasons: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.medium < self.high < self.lost:
            raise ValueError("band thresholds must satisfy 0 < medium < high < lost")
        if not 0 <= self.hysteresis < self.medium:
            raise ValueError("hysteresis must be at least 0 and below the medium threshold")

    def entry(self, band: str) -> float:
        return {"low": -math.inf, "medium": self.medium, "high": self.high, "lost": self.lost}[band]


def band_for(rise: float, recency_ratio: float, previous: str | None, rules: BandRules) -> str:
    raw = "low"
    for band in BANDS[1:]:
        if rise >= rules.entry(band) and (band not in AT_RISK or recency_ratio >= rules.at_risk_min_ratio):
            raw = band
    if previous is None or BANDS.index(raw) >= BANDS.index(previous):
        return raw
    # Going down: step down only as far as the hysteresis margin allows.
    band = previous
    while band != "low" and rise < rules.entry(band) - rules.hysteresis:
        band = BANDS[BANDS.index(band) - 1]
    return band


def _plural(n: int | float, word: str) -> str:
    return f"{n:g} {word}" if n == 1 else f"{n:g} {word}s"


def _phrases(s: Signals) -> dict[str, str]:
    usual = (
        f"their usual gap of {s.cadence_days:.0f} days"
        if s.cadence_days
        else f"the typical gap of {s.usual_gap_days:.0f} days between purchases"
    )
    recency = f"no purchase for {s.recency_days} days, {s.recency_ratio:.1f}x {usual}"
    frequency = (
        f"{_plural(s.recent_purchases, 'purchase day')} in the last {WINDOW_DAYS} days"
        f" against {s.previous_purchases} in the {WINDOW_DAYS} before"
    )
    return {
        "recency": recency,
        "recency_ratio": recency,
        # BG/NBD calls every one-time buyer alive (P = 1): only worth saying after a repeat purchase.
        "expected_purchases": f"expected purchases next {WINDOW_DAYS} days {s.expected_purchases:.1f}"
        + (f" (P(alive) {s.p_alive:.2f})" if s.repeat_purchases else ""),
        "repeat_purchases": f"{_plural(s.repeat_purchases, 'repeat purchase day')} in {s.age_days} days",
        "recent_purchases": frequency,
        "previous_purchases": frequency,
        "spend_drop": f"spend {s.recent_spend:.2f} in the last {WINDOW_DAYS} days against {s.previous_spend:.2f}"
        " in the period before",
        "mean_spend": f"average spend per purchase day {s.mean_spend:.2f}",
        "complaints": f"{_plural(s.complaints, 'complaint')} in the last {ISSUE_DAYS} days",
        "low_scores": f"{_plural(s.low_scores, 'low survey score')} in the last {ISSUE_DAYS} days",
        "engagement_drop": f"{_plural(s.recent_touches, 'interaction')} in the last {WINDOW_DAYS} days"
        f" against {s.previous_touches} before",
    }


def reasons(model: RiskModel, now: Signals, then: Signals, rules: BandRules) -> list[str]:
    """What raised the risk since the last purchase day, largest first, in words and numbers."""
    phrases = _phrases(now)
    before, after = model.logit_terms(then), model.logit_terms(now)
    rises = {n: after[n] - before[n] for n in after}
    out: list[str] = []
    for name, c in sorted(rises.items(), key=lambda kv: -kv[1]):
        if c < rules.reason_min_logit or len(out) >= rules.max_reasons:
            break
        if phrases[name] not in out:
            out.append(phrases[name])
    if not out:
        out = [f"last purchase {now.recency_days} days ago", phrases["expected_purchases"]]
    return out


@dataclass(frozen=True)
class Assessment:
    score: float  # P(no purchase in the next 90 days)
    band: str
    reasons: list[str]
    signals: Signals


def logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


class Assessor:
    """Scores one history at any number of days, computing its baseline once."""

    def __init__(self, model: RiskModel, h: History, rules: BandRules):
        self.model, self.rules = model, rules
        last = h.last
        assert last is not None
        self.then = model.signals(h.as_of(last), last)
        self.baseline = model.score(self.then)
        self._timeline = model.timeline(h)

    def _scored(self, today: date, previous: str | None) -> tuple[Signals, float, str]:
        s = self._timeline.at(today)
        score = self.model.score(s)
        rise = logit(score) - logit(self.baseline)
        return s, score, band_for(rise, s.recency_ratio, previous, self.rules)

    def band(self, today: date, previous: str | None) -> str:
        return self._scored(today, previous)[2]

    def assess(self, today: date, previous: str | None) -> Assessment:
        s, score, band = self._scored(today, previous)
        return Assessment(score, band, reasons(self.model, s, self.then, self.rules), s)


def assess(model: RiskModel, h: History, today: date, previous: str | None, rules: BandRules) -> Assessment:
    return Assessor(model, h, rules).assess(today, previous)
