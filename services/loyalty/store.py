"""The loyalty service's collection: one account document per customer (state, ledger, lots)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from services.runtime.statestore import Labels, StateStore, Tally


def tier_labels(s: dict[str, Any] | None) -> Labels:
    return (("tier", (s or {}).get("tier") or "none"),)


class LoyaltyStore(StateStore):
    def __init__(self, db: AsyncDatabase):
        super().__init__(db["accounts"], tally=Tally(["s.tier"], tier_labels))

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        d = await self.collection.find_one({"_id": customer_id}, {"s": 1})
        return None if d is None else d.get("s")

    async def accounts(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every account (one scan): what the audit checks."""
        async for d in self.collection.find({"s": {"$ne": None}}, {"s": 1}):
            yield d["_id"], d["s"]

    async def tiers(self) -> dict[str, int]:
        """Accounts per tier, over the whole collection (one projection scan)."""
        out: dict[str, int] = {}
        async for d in self.collection.find({}, {"s.tier": 1}):
            ((_, tier),) = tier_labels(d.get("s"))
            out[tier] = out.get(tier, 0) + 1
        return out
