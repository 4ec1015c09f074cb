"""Churn's signals as `compute` worked them out before `Timeline` (services/churn/signals.py), kept
verbatim as the oracle: a band search must score every day exactly as this does, to the bit."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta

from services.churn import bgnbd
from services.churn.signals import ISSUE_DAYS, WINDOW_DAYS, History, Signals, bgnbd_inputs


def reference_compute(h: History, today: date, params: bgnbd.BgNbdParams, typical_gap_days: float) -> Signals:
    if h.first is None or h.last is None:
        raise ValueError("no purchase yet: churn signals start with the first purchase")
    today = max(today, h.last)  # an event older than the newest purchase (out of order) is judged at the latter
    x, t_x, T = bgnbd_inputs(h, today)
    cadence = (h.last - h.first).days / x if x else None

    def windows(days: Mapping[date, float | int]) -> tuple[float, float]:
        recent = previous = 0.0
        for d, v in days.items():
            age = (today - d).days
            if 0 <= age < WINDOW_DAYS:
                recent += v
            elif WINDOW_DAYS <= age < 2 * WINDOW_DAYS:
                previous += v
        return recent, previous

    counts = {d: 1 for d in h.spend}
    recent_n, previous_n = windows(counts)
    recent_spend, previous_spend = windows(h.spend)
    recent_t, previous_t = windows(h.touches)
    since = today - timedelta(days=ISSUE_DAYS)
    return Signals(
        recency_days=(today - h.last).days,
        cadence_days=cadence,
        usual_gap_days=cadence if cadence else typical_gap_days,
        repeat_purchases=x,
        age_days=(today - h.first).days,
        recent_purchases=int(recent_n),
        previous_purchases=int(previous_n),
        recent_spend=recent_spend,
        previous_spend=previous_spend,
        mean_spend=sum(h.spend.values()) / len(h.spend) if h.spend else 0.0,
        recent_touches=int(recent_t),
        previous_touches=int(previous_t),
        # Not after today: an interaction read before an older purchase (another topic) is in the
        # history already, but it had not happened on the day being judged.
        complaints=sum(1 for d in h.complaints if since < d <= today),
        low_scores=sum(1 for d in h.low_scores if since < d <= today),
        p_alive=bgnbd.p_alive(params, x, t_x, T),
        expected_purchases=bgnbd.expected_purchases(params, WINDOW_DAYS / 7, x, t_x, T),
    )
