"""The churn service's collections: customers (state documents) and risk_models (every fit, by version)."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from services.churn.domain import history, new_state
from services.churn.model import RiskModel
from services.churn.signals import History
from services.runtime import versions
from services.runtime.statestore import Codec, Labels, StateStore, Tally

HISTORY_FIELDS = ("first", "purchase_days", "spend", "touches", "complaints", "low_scores")


def band_labels(s: dict[str, Any] | None) -> Labels:
    """The risk band ("no_purchase": known from other events only) and the retention ladder step."""
    s = s or {}
    return (
        ("bands", (s.get("risk") or {}).get("band") or "no_purchase"),
        ("ladder_steps", str((s.get("ladder") or {}).get("step", 0))),
    )


class ChurnStore(StateStore):
    def __init__(self, db: AsyncDatabase, codec: Codec | None = None):
        super().__init__(db["customers"], codec=codec, tally=Tally(["s.risk.band", "s.ladder.step"], band_labels))
        self.models = db["risk_models"]

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        d = await self.collection.find_one({"_id": customer_id}, {"s": 1})
        return None if d is None or d.get("s") is None else self.codec.decode(d["s"])

    async def histories(self) -> dict[str, History]:
        """Every customer's kept history (one projection scan): what a refit learns from."""
        out = {}
        query = {"s.first": {"$ne": None}}
        async for d in self.collection.find(query, {f"s.{f}": 1 for f in HISTORY_FIELDS}):
            s = d.get("s") or {}
            if s.get("first"):
                out[d["_id"]] = history(new_state() | s)
        return out

    async def latest_model(self) -> RiskModel | None:
        d = await versions.latest(self.models)
        return RiskModel.from_doc(d) if d else None

    async def model_history(self, limit: int = 20) -> list[dict[str, Any]]:
        return [d async for d in self.models.find({}, {"features": 0}).sort("_id", -1).limit(limit)]

    async def insert_model(self, model: RiskModel) -> RiskModel:
        return RiskModel.from_doc(await versions.insert(self.models, model.to_doc()))

    async def counts(self) -> dict[str, dict[str, int]]:
        """Customers per risk band and per retention ladder step (one projection scan)."""
        out: dict[str, dict[str, int]] = {"bands": {}, "ladder_steps": {}}
        async for d in self.collection.find({}, {"s.risk.band": 1, "s.ladder.step": 1}):
            for dim, key in band_labels(d.get("s")):
                out[dim][key] = out[dim].get(key, 0) + 1
        return out
