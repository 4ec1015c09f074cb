"""The profile's collections: customers (state documents), contact_lookup, rfm_breakpoints.

contact_lookup maps the keyed hash of an e-mail or phone number to a customer
id. It is written only when contact details change, instead of indexing the
customers collection, whose every write would then pay for the index.
Entries are added before and removed after the customer write, and a lookup
checks the decrypted contact, so a crash in between leaves at worst a stale
entry that matches nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo import DeleteOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from services.profile import rfm
from services.profile.crypto import LookupHasher, normalise_email
from services.profile.domain import net_spend, primary_currency
from services.runtime import versions
from services.runtime.statestore import Codec, CustomerDoc, StateStore

log = logging.getLogger(__name__)


class ProfileStore(StateStore):
    def __init__(self, db: AsyncDatabase, codec: Codec | None, hasher: LookupHasher):
        super().__init__(db["customers"], codec=codec)
        self.lookups = db["contact_lookup"]
        self.breakpoints = db["rfm_breakpoints"]
        self.hasher = hasher

    async def load(self, customer_ids: Iterable[str]) -> dict[str, CustomerDoc]:
        docs = await super().load(customer_ids)
        for doc in docs.values():
            if "lookup" not in doc.meta:  # as stored: the invariant after every save
                doc.meta["lookup"] = self.hasher.keys_of(doc.state)
        return docs

    async def save(self, docs: Iterable[CustomerDoc]) -> int:
        docs = list(docs)
        changes = []
        for doc in docs:
            if doc.dirty:
                new = self.hasher.keys_of(doc.state)
                old = doc.meta.get("lookup", set())
                if new != old:
                    changes.append((doc, old, new))
        adds = [
            UpdateOne({"_id": k}, {"$set": {"c": d.customer_id}}, upsert=True) for d, o, n in changes for k in n - o
        ]
        if adds:
            await self.lookups.bulk_write(adds, ordered=False)
        written = await super().save(docs)
        removes = [DeleteOne({"_id": k, "c": d.customer_id}) for d, o, n in changes for k in o - n]
        if removes:
            await self.lookups.bulk_write(removes, ordered=False)
        for doc, _, new in changes:
            doc.meta["lookup"] = new
        return written

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        """The stored, decrypted state of one customer (what the read API shows)."""
        d = await self.collection.find_one({"_id": customer_id}, {"s": 1})
        if d is None or d.get("s") is None:
            return None
        return self.codec.decode(d["s"])

    async def find_by_contact(self, *, email: str | None = None, phone: str | None = None) -> str | None:
        key = self.hasher.email(email) if email else self.hasher.phone(phone or "")
        hit = await self.lookups.find_one({"_id": key})
        if hit is None:
            return None
        state = await self.read(hit["c"])
        contact = (state or {}).get("contact") or {}
        if email and normalise_email(contact.get("email") or "") == normalise_email(email):
            return hit["c"]
        if phone and (contact.get("phone") or "") == phone.strip():
            return hit["c"]
        return None

    async def population(self, now: datetime) -> tuple[list[rfm.PopulationRow], float]:
        """Recency, frequency and spend of every customer who bought (one projection scan),
        and how many days back the base's purchase history goes."""
        rows = []
        earliest = now
        query = {"s.purchases.last": {"$ne": None}}
        async for d in self.collection.find(query, {"s.purchases": 1, "s.spend": 1}):
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
                gap = (last.toordinal() - first.toordinal()) / (n - 1)
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
        projection = {"s.rfm.segment": 1, "s.stage": 1, "s.value_tier": 1}
        async for d in self.collection.find({}, projection):
            s = d.get("s") or {}
            for dim, value in (
                ("segments", (s.get("rfm") or {}).get("segment")),
                ("stages", s.get("stage")),
                ("value_tiers", s.get("value_tier")),
            ):
                key = value or "none"
                out[dim][key] = out[dim].get(key, 0) + 1
        return {dim: dict(sorted(v.items(), key=lambda kv: -kv[1])) for dim, v in out.items()}
