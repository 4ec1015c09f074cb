"""Per-customer state documents with dedup ids and an outbox, written in bulk.

One document per customer, keyed by `_id = customer_id`:

    {_id, s: <service state>, seen: [recent event ids], outbox: [{t, id, v}], rev}

The state, the ids of the events that produced it and the events it caused
are one document, so a single write makes them atomic without a transaction.
Outbox entries are published after the write and before the offsets are
committed; they are trimmed lazily by the next write of the same document,
which costs no extra round trip. Entries that survive in the store (the
process died after the write) are published again when the document is next
loaded; their ids are deterministic, so consumers drop the repeat.

A partition is owned by one consumer at a time, so documents are cached in
memory and the cache is dropped on every rebalance.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, ConnectionFailure, NetworkTimeout, OperationFailure

log = logging.getLogger(__name__)

TRANSIENT_STORE_ERRORS = (AutoReconnect, ConnectionFailure, NetworkTimeout)


@dataclass(slots=True)
class OutboxEntry:
    topic: str
    event_id: str
    value: bytes
    key: bytes

    def to_doc(self) -> dict[str, Any]:
        return {"t": self.topic, "id": self.event_id, "v": self.value, "k": self.key}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> OutboxEntry:
        return cls(d["t"], d["id"], bytes(d["v"]), bytes(d["k"]))


@dataclass(slots=True)
class CustomerDoc:
    customer_id: str
    state: dict[str, Any] | None = None
    seen: list[str] = field(default_factory=list)
    seen_set: set[str] = field(default_factory=set)
    outbox: list[OutboxEntry] = field(default_factory=list)
    published: set[str] = field(default_factory=set)
    rev: int = 0
    dirty: bool = False

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> CustomerDoc:
        seen = list(d.get("seen", []))
        return cls(
            customer_id=d["_id"],
            state=d.get("s"),
            seen=seen,
            seen_set=set(seen),
            outbox=[OutboxEntry.from_doc(x) for x in d.get("outbox", [])],
            rev=d.get("rev", 0),
        )

    def has_seen(self, event_id: str) -> bool:
        return event_id in self.seen_set

    def remember(self, event_id: str, window: int) -> None:
        self.seen.append(event_id)
        self.seen_set.add(event_id)
        if len(self.seen) > window:
            drop = self.seen[: len(self.seen) - window]
            self.seen = self.seen[len(drop) :]
            self.seen_set.difference_update(drop)

    def pending(self) -> list[OutboxEntry]:
        return [e for e in self.outbox if e.event_id not in self.published]

    def to_doc(self) -> dict[str, Any]:
        # Entries already published are dropped here: this is the lazy trim.
        return {
            "_id": self.customer_id,
            "s": self.state,
            "seen": self.seen,
            "outbox": [e.to_doc() for e in self.pending()],
            "rev": self.rev,
        }


class StateStore:
    """Loads and saves CustomerDocs for one collection, with a rebalance-scoped cache."""

    def __init__(self, collection: AsyncCollection, *, cache_size: int = 200_000):
        self.collection = collection
        self.cache: OrderedDict[str, CustomerDoc] = OrderedDict()
        self.cache_size = cache_size

    def drop_cache(self) -> None:
        self.cache.clear()

    async def load(self, customer_ids: Iterable[str]) -> dict[str, CustomerDoc]:
        """The documents for these customers; missing ones come back empty (new customers)."""
        out: dict[str, CustomerDoc] = {}
        missing = []
        for cid in customer_ids:
            doc = self.cache.get(cid)
            if doc is None:
                missing.append(cid)
            else:
                self.cache.move_to_end(cid)
                out[cid] = doc
        if missing:
            found = {}
            async for d in self.collection.find({"_id": {"$in": missing}}):
                found[d["_id"]] = CustomerDoc.from_doc(d)
            for cid in missing:
                doc = found.get(cid) or CustomerDoc(cid)
                out[cid] = doc
                self._cache_put(cid, doc)
        return out

    def _cache_put(self, cid: str, doc: CustomerDoc) -> None:
        self.cache[cid] = doc
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def save(self, docs: Iterable[CustomerDoc]) -> int:
        """One unordered bulk write of every dirty document."""
        ops = []
        dirty = []
        for doc in docs:
            if doc.dirty:
                doc.rev += 1
                ops.append(ReplaceOne({"_id": doc.customer_id}, doc.to_doc(), upsert=True))
                dirty.append(doc)
        if not ops:
            return 0
        try:
            await self.collection.bulk_write(ops, ordered=False)
        except (OperationFailure, *TRANSIENT_STORE_ERRORS):
            # The cached copies are now ahead of the store; forget them so the retry reloads.
            for doc in dirty:
                self.cache.pop(doc.customer_id, None)
            raise
        for doc in dirty:
            doc.dirty = False
            doc.outbox = doc.pending()
            doc.published.clear()
        return len(ops)


async def with_backoff(op, *, attempts: int, base_delay: float, what: str, transient=TRANSIENT_STORE_ERRORS):
    """Run `op()` until it succeeds, sleeping base*2^n between tries; re-raise after `attempts`."""
    for attempt in range(1, attempts + 1):
        try:
            return await op()
        except transient as exc:
            if attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
            await asyncio.sleep(delay)
