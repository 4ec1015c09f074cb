"""A state store that keeps a contact lookup (keyed hash of e-mail / phone -> customer id) beside the states.

The lookup collection is written only when contact details change, instead of
indexing the customers collection, whose every write would then pay for the
index. Entries are added before and removed after the customer write, and a
lookup checks the decrypted contact, so a crash in between leaves at worst a
stale entry that matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pymongo import DeleteOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from services.runtime.crypto import LookupHasher, normalise_email
from services.runtime.statestore import Codec, CustomerDoc, StateStore, Tally


class LookupStateStore(StateStore):
    def __init__(
        self,
        collection: AsyncCollection,
        lookups: AsyncCollection,
        hasher: LookupHasher,
        codec: Codec | None,
        tally: Tally | None = None,
    ):
        super().__init__(collection, codec=codec, tally=tally)
        self.lookups = lookups
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
            await self.write_beside(self.lookups, adds, docs)
        written = await super().save(docs)
        removes = [DeleteOne({"_id": k, "c": d.customer_id}) for d, o, n in changes for k in o - n]
        if removes:
            async with self.turns.turn():
                await self.lookups.bulk_write(removes, ordered=False)
        for doc, _, new in changes:
            doc.meta["lookup"] = new
        return written

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        """The stored, decrypted state of one customer."""
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
