"""The loyalty service's collections: one account document per customer (state, lots, its latest
ledger entries) and the closed ledger pages beside them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from services.loyalty.domain import archived, close_pages, page_first_seq
from services.runtime.statestore import CustomerDoc, Labels, StateStore, Tally


def tier_labels(s: dict[str, Any] | None) -> Labels:
    return (("tier", (s or {}).get("tier") or "none"),)


class LoyaltyStore(StateStore):
    """Accounts, and their closed ledger pages (`ledger`; ids from `domain.page_id`).

    Pages are written before the account that lists them, and a page is never overwritten: its
    id carries a digest of its entries, and the same page written again (a retry) is the same
    document. A crash between the two writes leaves the account as it was, entries and all, and a
    page it does not list; so does a replica still writing after it lost the customer's partition.
    Readers and the audit read only the pages the account lists, so such a page is never read.
    """

    def __init__(self, db: AsyncDatabase, page_entries: int = 50):
        super().__init__(db["accounts"], tally=Tally(["s.tier"], tier_labels))
        self.pages = db["ledger"]
        self.page_entries = page_entries

    async def save(self, docs: Iterable[CustomerDoc]) -> int:
        docs = list(docs)
        closing = []
        ops = []
        for doc in docs:
            if doc.dirty and doc.state is not None:
                state, pages = close_pages(doc.state, self.page_entries, doc.customer_id)
                for pid, entries in pages:
                    ops.append(ReplaceOne({"_id": pid}, {"c": doc.customer_id, "entries": entries}, upsert=True))
                if pages:
                    closing.append((doc, state))
        if ops:
            await self.write_beside(self.pages, ops, docs)
            for doc, state in closing:
                doc.state = state
        return await super().save(docs)

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        d = await self.collection.find_one({"_id": customer_id}, {"s": 1})
        return None if d is None else d.get("s")

    async def closed_pages(self, state: dict[str, Any], ids: list[str] | None = None) -> list[list[dict]]:
        """The entries of these pages of the account (default: all it lists), in the account's order.
        A listed page that is missing is left out (the audit then finds the count short)."""
        ids = archived(state)["pages"] if ids is None else ids
        if not ids:
            return []
        found = {d["_id"]: d["entries"] async for d in self.pages.find({"_id": {"$in": ids}})}
        return [found[i] for i in ids if i in found]

    async def entries(self, state: dict[str, Any], before: int, limit: int) -> list[dict]:
        """Up to `limit` ledger entries with sequence numbers below `before`, oldest first: from the
        account, then from the fewest of its pages that hold the rest."""
        out = [e for e in state["entries"] if e["seq"] < before][-limit:]
        done = archived(state)
        ids = done["pages"]
        # The pages tile the sequence numbers: page k holds bounds[k] up to bounds[k + 1] - 1.
        bounds = [page_first_seq(pid) for pid in ids] + [done["entries"] + 1]
        need, start = limit - len(out), len(ids)
        while need > 0 and start > 0:
            start -= 1
            need -= max(0, min(before, bounds[start + 1]) - bounds[start])
        if start == len(ids):
            return out
        pages = await self.closed_pages(state, [pid for k, pid in enumerate(ids[start:], start) if bounds[k] < before])
        return ([e for page in pages for e in page if e["seq"] < before] + out)[-limit:]

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
