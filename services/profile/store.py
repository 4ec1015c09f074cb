"""The profile's collections: customers (state documents), contact_lookup, rfm_breakpoints.

contact_lookup maps the keyed hash of an e-mail or phone number to a customer
id (see services.runtime.lookups).
"""

from __future__ import annotations

import logging
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase

from services.profile import rfm
from services.profile.domain import local_ordinal, net_spend, primary_currency
from services.runtime import versions
from services.runtime.crypto import LookupHasher
from services.runtime.lookups import LookupStateStore
from services.runtime.statestore import Codec, Labels, Tally

log = logging.getLogger(__name__)


SEGMENT_FIELDS = ("s.rfm.segment", "s.stage", "s.value_tier")


def segment_labels(s: dict | None) -> Labels:
    """The customer's segment, lifecycle stage and value tier ("none" where not known yet)."""
    s = s or {}
    return (
        ("segments", (s.get("rfm") or {}).get("segment") or "none"),
        ("stages", s.get("stage") or "none"),
        ("value_tiers", s.get("value_tier") or "none"),
    )


class ProfileStore(LookupStateStore):
    def __init__(self, db: AsyncDatabase, codec: Codec | None, hasher: LookupHasher):
        super().__init__(
            db["customers"], db["contact_lookup"], hasher, codec, tally=Tally(SEGMENT_FIELDS, segment_labels)
        )
        self.breakpoints = db["rfm_breakpoints"]

    async def population(self, now: datetime) -> tuple[list[rfm.PopulationRow], float]:
        """Recency, frequency and spend of every customer who bought (one projection scan),
        and how many days back the base's purchase history goes."""
        rows = []
        earliest = now
        query = {"s.purchases.last": {"$ne": None}}
        async for d in self.collection.find(query, {"s.purchases": 1, "s.spend": 1, "s.profile.timezone": 1}):
            s = d.get("s") or {}
            p = s.get("purchases") or {}
            if not p.get("last"):
                continue
            cur = primary_currency(s)
            if cur is None:
                continue
            last = datetime.fromisoformat(p["last"])
            days = max((now - last).total_seconds() / 86400, 0.0)
            n = int(p.get("days", 0))
            gap = None
            first = datetime.fromisoformat(p["first"]) if p.get("first") else last
            earliest = min(earliest, first)
            if n >= 2:
                gap = (local_ordinal(s, last) - local_ordinal(s, first)) / (n - 1)  # local days, as `days` counts them
            rows.append(rfm.PopulationRow(days, n, cur, float(net_spend(s, cur)), gap))
        return rows, (now - earliest).total_seconds() / 86400

    async def latest_breakpoints(self) -> rfm.Breakpoints | None:
        d = await versions.latest(self.breakpoints)
        return rfm.Breakpoints.from_doc(d) if d else None

    async def insert_breakpoints(self, bp: rfm.Breakpoints) -> rfm.Breakpoints:
        return rfm.Breakpoints.from_doc(await versions.insert(self.breakpoints, bp.to_doc()))

    async def counts(self) -> dict[str, dict[str, int]]:
        """Customers per segment, lifecycle stage and value tier: one projection scan, counted here
        (one pass instead of an aggregation per dimension)."""
        out: dict[str, dict[str, int]] = {"segments": {}, "stages": {}, "value_tiers": {}}
        async for d in self.collection.find({}, dict.fromkeys(SEGMENT_FIELDS, 1)):
            for dim, key in segment_labels(d.get("s")):
                out[dim][key] = out[dim].get(key, 0) + 1
        return {dim: dict(sorted(v.items(), key=lambda kv: -kv[1])) for dim, v in out.items()}
