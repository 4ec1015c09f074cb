"""A customer's recent behaviour, and the explainable churn signals computed from it at a given day.

`History` is what the churn service keeps per customer (purchase days with spend,
interaction days, complaints, low survey scores), read from its stored state or
built from a transactions file; the backtest and the live service compute the
same `Signals` from it. All pure, all O(size of the kept windows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date

from services.churn import bgnbd

WINDOW_DAYS = 90  # the recent window, the previous one of the same length, and the forecast horizon
ISSUE_DAYS = 180  # how long a complaint or a low survey score counts


@dataclass(frozen=True)
class History:
    first: date | None = None
    purchase_days: int = 0  # distinct purchase days ever; `spend` may keep fewer (the old ones trimmed)
    spend: Mapping[date, float] = field(default_factory=dict)  # per purchase day
    touches: Mapping[date, int] = field(default_factory=dict)  # non-purchase interactions per day
    complaints: tuple[date, ...] = ()
    low_scores: tuple[date, ...] = ()

    @property
    def last(self) -> date | None:
        return max(self.spend) if self.spend else self.first

    def as_of(self, day: date) -> History:
        """What was known at the end of `day` (for learning from an earlier split)."""
        later = sum(1 for d in self.spend if d > day)
        if self.first is None or self.first > day:
            return History()
        return History(
            first=self.first,
            purchase_days=self.purchase_days - later,
            spend={d: v for d, v in self.spend.items() if d <= day},
            touches={d: n for d, n in self.touches.items() if d <= day},
            complaints=tuple(d for d in self.complaints if d <= day),
            low_scores=tuple(d for d in self.low_scores if d <= day),
        )


def histories_from_purchases(purchases: Iterable, until: date) -> dict[str, History]:
    """Histories from (customer_id, day, amount) records up to and including `until`."""
    spend: dict[str, dict[date, float]] = {}
    for p in purchases:
        if p.day <= until:
            days = spend.setdefault(p.customer_id, {})
            days[p.day] = days.get(p.day, 0.0) + p.amount
    return {cid: History(first=min(d), purchase_days=len(d), spend=d) for cid, d in sorted(spend.items())}


@dataclass(frozen=True)
class Signals:
    """Everything the score and its reasons are made of, in plain units (days, counts, money)."""

    recency_days: int
    cadence_days: float | None  # the customer's own mean gap between purchase days; None before a repeat
    usual_gap_days: float  # the cadence, or the population's typical gap for one-time buyers
    repeat_purchases: int
    age_days: int
    recent_purchases: int
    previous_purchases: int
    recent_spend: float
    previous_spend: float
    mean_spend: float
    recent_touches: int
    previous_touches: int
    complaints: int
    low_scores: int
    p_alive: float
    expected_purchases: float  # over the next WINDOW_DAYS

    @property
    def recency_ratio(self) -> float:
        return self.recency_days / max(self.usual_gap_days, 1.0)


def bgnbd_inputs(h: History, today: date) -> tuple[int, float, float]:
    """(x, t_x, T) in weeks; T runs from the first purchase day to `today`."""
    assert h.first is not None and h.last is not None
    return max(h.purchase_days - 1, 0), (h.last - h.first).days / 7, (today - h.first).days / 7


def compute(h: History, today: date, params: bgnbd.BgNbdParams, typical_gap_days: float) -> Signals:
    return Timeline(h, params, typical_gap_days).at(today)


class Timeline:
    """One history's signals on any day. What does not depend on the day is worked out once:
    a band search scores a dozen days of the same history, and the sweep does that for every
    customer every few weeks of event time."""

    __slots__ = (
        "_cadence",
        "_complaints",
        "_first",
        "_last",
        "_low_scores",
        "_mean_spend",
        "_params",
        "_spend",
        "_t_x",
        "_touches",
        "_usual",
        "_x",
    )

    def __init__(self, h: History, params: bgnbd.BgNbdParams, typical_gap_days: float):
        if h.first is None or h.last is None:
            raise ValueError("no purchase yet: churn signals start with the first purchase")
        self._first, self._last = h.first.toordinal(), h.last.toordinal()
        x, self._t_x, _ = bgnbd_inputs(h, h.last)
        self._x = x
        self._cadence = (h.last - h.first).days / x if x else None
        self._usual = self._cadence if self._cadence else typical_gap_days
        self._mean_spend = sum(h.spend.values()) / len(h.spend) if h.spend else 0.0
        # In the history's own order: the window sums then add up exactly as they always did.
        self._spend = tuple((d.toordinal(), v) for d, v in h.spend.items())
        self._touches = tuple((d.toordinal(), n) for d, n in h.touches.items())
        self._complaints = tuple(d.toordinal() for d in h.complaints)
        self._low_scores = tuple(d.toordinal() for d in h.low_scores)
        self._params = params

    def at(self, today: date) -> Signals:
        # An event older than the newest purchase (out of order) is judged at the latter.
        t = max(today.toordinal(), self._last)
        recent_n = previous_n = 0
        recent_spend = previous_spend = 0.0
        for d, v in self._spend:
            age = t - d
            if 0 <= age < WINDOW_DAYS:
                recent_n += 1
                recent_spend += v
            elif WINDOW_DAYS <= age < 2 * WINDOW_DAYS:
                previous_n += 1
                previous_spend += v
        recent_t = previous_t = 0
        for d, n in self._touches:
            age = t - d
            if 0 <= age < WINDOW_DAYS:
                recent_t += n
            elif WINDOW_DAYS <= age < 2 * WINDOW_DAYS:
                previous_t += n
        # Not after today: an interaction read before an older purchase (another topic) is in the
        # history already, but it had not happened on the day being judged.
        since = t - ISSUE_DAYS
        T = (t - self._first) / 7
        p = self._params
        return Signals(
            recency_days=t - self._last,
            cadence_days=self._cadence,
            usual_gap_days=self._usual,
            repeat_purchases=self._x,
            age_days=t - self._first,
            recent_purchases=recent_n,
            previous_purchases=previous_n,
            recent_spend=recent_spend,
            previous_spend=previous_spend,
            mean_spend=self._mean_spend,
            recent_touches=recent_t,
            previous_touches=previous_t,
            complaints=sum(1 for d in self._complaints if since < d <= t),
            low_scores=sum(1 for d in self._low_scores if since < d <= t),
            p_alive=bgnbd.p_alive(p, self._x, self._t_x, T),
            expected_purchases=bgnbd.expected_purchases(p, WINDOW_DAYS / 7, self._x, self._t_x, T),
        )
