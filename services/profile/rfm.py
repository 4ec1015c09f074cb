"""RFM scoring: population quantile breakpoints, 1-5 scores, named segments, value tiers.

Pure functions. Breakpoints are recomputed from the customer base now and then
(see `compute_breakpoints`) and stored with a version; until the base is large
enough, the bootstrap breakpoints below (version 0) apply.

Recency is judged against the shop's own rhythm: its cut points are the
quintiles of the customers' mean gaps between purchase days (repeat buyers),
not quintiles of days-since-last-purchase. The latter call a customer who has
not bought for 300 days "recent" whenever most of the base has gone quiet
(a dormant cohort, as in CDNOW by 1998); a gap-based cut point says "recent"
means "within the time customers here usually take to come back". With too
few repeat buyers the recency quantiles of the base are used instead.

Scores use "how many breakpoints lie strictly below the value": ties at a
breakpoint go to the lower score, which keeps the many one-time buyers of a
typical shop in F=1 instead of spreading them over several quintiles.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np

# The ten segments, on a grid of recency score (rows, 5 = most recent) by the
# frequency-monetary score FM = round((F + M) / 2) (columns, 1..5). One-purchase
# customers (F = 1) with R >= 4 are "New" (R = 5) or "Promising" (R = 4) whatever they spent.
SEGMENT_GRID: dict[int, tuple[str, str, str, str, str]] = {
    5: ("New", "Potential Loyalist", "Potential Loyalist", "Champions", "Champions"),
    4: ("Promising", "Potential Loyalist", "Potential Loyalist", "Loyal", "Champions"),
    3: ("Needs Attention", "Needs Attention", "Needs Attention", "Loyal", "Loyal"),
    2: ("Hibernating", "Hibernating", "At Risk", "At Risk", "Can't Lose"),
    1: ("Lost", "Lost", "At Risk", "Can't Lose", "Can't Lose"),
}
SEGMENTS = (
    "Champions",
    "Loyal",
    "Potential Loyalist",
    "New",
    "Promising",
    "Needs Attention",
    "At Risk",
    "Can't Lose",
    "Hibernating",
    "Lost",
)
VALUE_TIERS = ("vip", "high", "medium", "low")


@dataclass(frozen=True)
class Breakpoints:
    """Four cut points per dimension (quintiles); monetary and value tiers per currency."""

    version: int
    computed_at: str | None
    customers: int
    recency_days: tuple[float, ...]  # ascending; fewer days = better
    frequency: tuple[float, ...]  # distinct purchase days, ascending
    monetary: dict[str, tuple[float, ...]]  # net spend per currency, ascending
    # Net spend at which a customer becomes (medium, high, vip), per currency.
    tiers: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {
            "_id": self.version,
            "computed_at": self.computed_at,
            "customers": self.customers,
            "recency_days": list(self.recency_days),
            "frequency": list(self.frequency),
            "monetary": {k: list(v) for k, v in self.monetary.items()},
            "tiers": {k: list(v) for k, v in self.tiers.items()},
        }

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Breakpoints:
        return cls(
            version=int(d["_id"]),
            computed_at=d.get("computed_at"),
            customers=int(d.get("customers", 0)),
            recency_days=tuple(d["recency_days"]),
            frequency=tuple(d["frequency"]),
            monetary={k: tuple(v) for k, v in d["monetary"].items()},
            tiers={k: tuple(v) for k, v in d.get("tiers", {}).items()},  # type: ignore[misc]
        )


# Used until the first population computation: round numbers that suit a
# shop where a typical order is a few tens of dollars.
BOOTSTRAP = Breakpoints(
    version=0,
    computed_at=None,
    customers=0,
    recency_days=(30, 90, 180, 365),
    frequency=(1, 2, 3, 5),
    monetary={"*": (25, 60, 150, 400)},
    tiers={"*": (60, 250, 1000)},
)


def _cut(value: float, points: Sequence[float]) -> int:
    return bisect_left(points, value)


def recency_score(days: float, bp: Breakpoints) -> int:
    return 5 - _cut(days, bp.recency_days)


def frequency_score(purchase_days: int, bp: Breakpoints) -> int:
    return 1 + _cut(purchase_days, bp.frequency)


Rates = Mapping[str, Decimal]
# What one unit of a currency is worth in the currency of the bootstrap cut points (USD-sized).
DEFAULT_RATES: dict[str, Decimal] = {"USD": Decimal(1)}


def _against(
    net_spend: Decimal, currency: str, table: Mapping[str, Sequence[float]], rates: Rates, bootstrap: Sequence[float]
) -> tuple[Sequence[float], float] | None:
    """The cut points a customer's net spend is compared with, and the spend in their units.

    A currency with cut points of its own uses them. Otherwise the shared ones ("*", USD-sized),
    after conversion where a rate is configured, or as they are while no currency has cut points
    of its own (a new or one-currency base). A minority currency without a rate is not comparable
    (None): a 5,000 JPY order is not a VIP's spend."""
    own = table.get(currency)
    if own is not None:
        return own, float(net_spend)
    shared = table.get("*") or bootstrap
    rate = rates.get(currency)
    if rate is not None:
        return shared, float(net_spend * rate)
    if not any(k != "*" for k in table):
        return shared, float(net_spend)
    return None


def monetary_score(net_spend: Decimal, currency: str, bp: Breakpoints, rates: Rates = DEFAULT_RATES) -> int:
    """1-5; 3 (neither high nor low) for a minority currency the cut points cannot judge."""
    found = _against(net_spend, currency, bp.monetary, rates, BOOTSTRAP.monetary["*"])
    return 3 if found is None else 1 + _cut(found[1], found[0])


def segment(r: int, f: int, m: int) -> str:
    if f == 1 and r >= 4:
        return "New" if r == 5 else "Promising"
    fm = min(5, max(1, int((f + m) / 2 + 0.5)))
    return SEGMENT_GRID[r][fm - 1]


def value_tier(net_spend: Decimal, currency: str | None, bp: Breakpoints, rates: Rates = DEFAULT_RATES) -> str | None:
    """VIP / high / medium / low by net spend against the population's percentiles; None for a
    minority currency without a rate (see `_against`)."""
    if currency is None or net_spend <= 0:
        return "low"
    found = _against(net_spend, currency, bp.tiers, rates, BOOTSTRAP.tiers["*"])
    if found is None:
        return None
    (medium, high, vip), spend = found
    if spend >= vip:
        return "vip"
    if spend >= high:
        return "high"
    if spend >= medium:
        return "medium"
    return "low"


@dataclass(frozen=True)
class Scores:
    r: int
    f: int
    m: int
    segment: str
    version: int


def score(
    days_since_last: float,
    purchase_days: int,
    net_spend: Decimal,
    currency: str,
    bp: Breakpoints,
    rates: Rates = DEFAULT_RATES,
) -> Scores:
    r = recency_score(days_since_last, bp)
    f = frequency_score(purchase_days, bp)
    m = monetary_score(net_spend, currency, bp, rates)
    return Scores(r, f, m, segment(r, f, m), bp.version)


def next_recency_change(days_since_last: float, bp: Breakpoints) -> float | None:
    """Days since the last purchase at which R drops next (None once R = 1)."""
    for point in bp.recency_days:
        if days_since_last <= point:
            # R drops when the days exceed the point (ties stay at the higher score).
            return point
    return None


@dataclass(frozen=True)
class PopulationRow:
    days_since_last: float
    purchase_days: int
    currency: str
    net_spend: float
    mean_gap_days: float | None = None  # between distinct purchase days; None for one purchase day


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(x), 2) for x in np.quantile(np.asarray(values, dtype=float), qs, method="linear"))


def _recency_cuts(
    rows: list[PopulationRow], qs: Sequence[float], min_customers: int, history_days: float, min_history_days: float
) -> tuple[float, ...]:
    if history_days < min_history_days:
        # A young shop has seen only short gaps (none can be longer than its history), so its
        # quintiles would call a customer lost after a few weeks: keep the bootstrap cut points.
        return BOOTSTRAP.recency_days
    gaps = [r.mean_gap_days for r in rows if r.mean_gap_days is not None]
    if len(gaps) >= min_customers:
        return _quantiles(gaps, qs)
    return _quantiles([r.days_since_last for r in rows], qs)


def compute_breakpoints(
    rows: Iterable[PopulationRow],
    *,
    version: int,
    now: datetime,
    tier_quantiles: tuple[float, float, float] = (0.40, 0.75, 0.95),
    min_customers: int = 100,
    history_days: float = float("inf"),
    min_history_days: float = 180.0,
) -> Breakpoints | None:
    """`history_days` is how far back the base's purchases go; recency needs `min_history_days` of it."""
    rows = list(rows)
    if len(rows) < min_customers:
        return None
    quintiles = (0.2, 0.4, 0.6, 0.8)
    by_currency: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_currency[row.currency].append(row.net_spend)
    monetary, tiers = {}, {}
    for cur, values in by_currency.items():
        if len(values) >= min_customers:
            monetary[cur] = _quantiles(values, quintiles)
            tiers[cur] = _quantiles(values, tier_quantiles)
    monetary.setdefault("*", BOOTSTRAP.monetary["*"])
    tiers.setdefault("*", BOOTSTRAP.tiers["*"])
    return Breakpoints(
        version=version,
        computed_at=now.isoformat(),
        customers=len(rows),
        recency_days=_recency_cuts(rows, quintiles, min_customers, history_days, min_history_days),
        frequency=_quantiles([r.purchase_days for r in rows], quintiles),
        monetary=monetary,
        tiers=tiers,  # type: ignore[arg-type]
    )
