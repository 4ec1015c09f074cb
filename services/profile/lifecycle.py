"""Lifecycle stage from recency and frequency relative to the customer's own cadence.

    no purchase yet, or one purchase day             new
    2 .. mature_min_days-1 purchase days             growing
    mature_min_days or more purchase days            mature
    recency > max(declining_factor x cadence, declining_min_days)   declining (overrides the above)
    recency > max(lost_factor x cadence, lost_min_days)             lost

The cadence is the customer's mean gap between distinct purchase days; with a
single purchase day it is `default_cadence_days`. The minimum days stop a
customer who bought twice in one week from being called "declining" a fortnight later.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("new", "growing", "mature", "declining", "lost")


@dataclass(frozen=True)
class LifecycleRules:
    default_cadence_days: float = 90.0
    mature_min_days: int = 5
    declining_factor: float = 2.0
    declining_min_days: float = 60.0
    lost_factor: float = 4.0
    lost_min_days: float = 180.0


def cadence_days(first_day: int, last_day: int, purchase_days: int, rules: LifecycleRules) -> float:
    """Mean gap between distinct purchase days (day numbers are ordinals)."""
    if purchase_days < 2 or last_day <= first_day:
        return rules.default_cadence_days
    return (last_day - first_day) / (purchase_days - 1)


def thresholds(cadence: float, rules: LifecycleRules) -> tuple[float, float]:
    """(declining, lost): days since the last purchase at which the stage falls."""
    return (
        max(rules.declining_factor * cadence, rules.declining_min_days),
        max(rules.lost_factor * cadence, rules.lost_min_days),
    )


def stage(purchase_days: int, days_since_last: float | None, cadence: float, rules: LifecycleRules) -> str:
    if purchase_days == 0 or days_since_last is None:
        return "new"
    declining, lost = thresholds(cadence, rules)
    if days_since_last > lost:
        return "lost"
    if days_since_last > declining:
        return "declining"
    if purchase_days >= rules.mature_min_days:
        return "mature"
    return "growing" if purchase_days >= 2 else "new"


def next_stage_change(days_since_last: float, cadence: float, rules: LifecycleRules) -> float | None:
    """Days since the last purchase at which time alone changes the stage next (None once lost)."""
    for limit in thresholds(cadence, rules):
        if days_since_last <= limit:
            return limit
    return None
