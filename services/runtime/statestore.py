"""Per-customer state documents with dedup ids and an outbox, written in bulk.

One document per customer, keyed by `_id = customer_id`:

    {_id, s: <service state>, seen: [recent event ids], outbox: [{t, id, v}], due, rev}

The state, the ids of the events that produced it and the events it caused
are one document, so a single write makes them atomic without a transaction.
Outbox entries are published after the write and before the offsets are
committed; they are trimmed lazily by the next write of the same document,
which costs no extra round trip. Entries that survive in the store (the
process died after the write) are published again when the document is next
loaded; their ids are deterministic, so consumers drop the repeat.

A partition is owned by one consumer at a time, so documents are cached in
memory and the cache is dropped on every rebalance. Between uses a cached
document is kept packed (pickled and compressed, `CustomerDoc.pack`): a state
that grows with the customer's history (a points ledger, recent orders, the
dedup window) takes several times less memory so, and a process serving a
fixed population does not keep growing while their histories do. After an assignment, one
scan of the collection (`warm`) can fill the cache with every document the
consumer now owns; while the cache is so complete, a customer missing from it
is new and needs no read. Reads by `_id $in` are the store's slowest path
(about 800 documents/s on the embedded server, against 66,000/s for a scan),
and without this every first event of a customer would pay for one.

`due` is when time alone may change the state (a birthday, an expiry, a
recency threshold). The schedule of due times is kept in memory for the
customers this consumer owns, rebuilt by one projection scan after each
rebalance, rather than in a secondary index that every write would pay for.

A `Codec` lets a service keep personal data encrypted at rest: it transforms
the state on its way to and from the store, and seals outbox payloads.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import pickle
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import lz4.block
from pymongo import ReplaceOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, BulkWriteError, ConnectionFailure, NetworkTimeout, OperationFailure

from contracts import TOPIC_OF_TYPE, topics
from services.runtime.turns import StoreTurns

log = logging.getLogger(__name__)

TRANSIENT_STORE_ERRORS = (AutoReconnect, ConnectionFailure, NetworkTimeout)


class Codec(Protocol):
    """How state and outbox payloads look at rest. The identity codec stores them as they are."""

    def encode(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def decode(self, state: dict[str, Any]) -> dict[str, Any]: ...

    def seal(self, value: bytes) -> bytes: ...

    def unseal(self, value: bytes) -> bytes: ...


class PlainCodec:
    def encode(self, state, meta=None):
        return state

    def decode(self, state):
        return state

    def seal(self, value):
        return value

    def unseal(self, value):
        return value


@dataclass(slots=True)
class OutboxEntry:
    topic: str
    event_id: str
    value: bytes
    key: bytes

    def to_doc(self, codec: Codec) -> dict[str, Any]:
        return {"t": self.topic, "id": self.event_id, "v": codec.seal(self.value), "k": self.key}

    @classmethod
    def from_doc(cls, d: dict[str, Any], codec: Codec) -> OutboxEntry:
        value = codec.unseal(bytes(d["v"]))
        return cls(current_topic(d["t"], value), d["id"], value, bytes(d["k"]))


def current_topic(stored: str, value: bytes) -> str:
    """Where a stored outbox entry goes now: one written before its event type moved to a topic of
    its own names the topic the type left (contracts.topics.LEFT_BY_TYPES). Entries stay in the
    store until the document's next write, so after an upgrade every customer's last events are
    published again from there (and dropped as repeats by their consumers)."""
    if stored not in topics.LEFT_BY_TYPES:
        return stored  # no type left it: no need to read the entry
    try:
        etype = json.loads(value).get("type")
    except (ValueError, AttributeError):
        return stored  # not an event: its old topic's readers dead-letter it, with the reason
    return TOPIC_OF_TYPE.get(etype, stored)


@dataclass(slots=True, weakref_slot=True)
class CustomerDoc:
    customer_id: str
    state: dict[str, Any] | None = None
    seen: list[str] = field(default_factory=list)
    seen_set: set[str] = field(default_factory=set)
    outbox: list[OutboxEntry] = field(default_factory=list)
    published: set[str] = field(default_factory=set)
    rev: int = 0
    due: datetime | None = None
    dirty: bool = False
    # Bookkeeping of a store extension (not persisted), e.g. which lookup keys are stored.
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, d: dict[str, Any], codec: Codec) -> CustomerDoc:
        seen = list(d.get("seen", []))
        state = d.get("s")
        return cls(
            customer_id=d["_id"],
            state=codec.decode(state) if state is not None else None,
            seen=seen,
            seen_set=set(seen),
            outbox=[OutboxEntry.from_doc(x, codec) for x in d.get("outbox", [])],
            rev=d.get("rev", 0),
            due=d.get("due"),
        )

    def pack(self) -> bytes:
        """The document as the cache keeps it between uses. Published outbox entries are left
        out: the next write drops them anyway (the lazy trim), and nothing publishes them again."""
        pending = [(e.topic, e.event_id, e.value, e.key) for e in self.pending()]
        fields = (self.state, self.seen, pending, self.rev, self.due, self.meta)
        # LZ4 rather than zlib's fastest level: a loyalty account packs in less than half the CPU
        # time, to about half of its pickle (zlib: two fifths); measured in docs/runtime.md.
        return lz4.block.compress(pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def unpack(cls, customer_id: str, packed: bytes) -> CustomerDoc:
        state, seen, pending, rev, due, meta = pickle.loads(lz4.block.decompress(packed))
        return cls(customer_id, state, seen, set(seen), [OutboxEntry(*e) for e in pending], set(), rev, due,
                   False, meta)  # fmt: skip

    def take(self, state: dict[str, Any] | None, derived: Sequence[Any]) -> bool:
        """Adopt a domain's result: the new state, and its derived events in the outbox. False, and
        nothing changes, when the state is the same object and nothing was derived."""
        if state is self.state and not derived:
            return False
        self.state, self.dirty = state, True
        for d in derived:
            self.outbox.append(OutboxEntry(d.TOPIC, str(d.event_id), d.to_bytes(), d.key()))
        return True

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

    def to_doc(self, codec: Codec, rev: int | None = None) -> dict[str, Any]:
        # Entries already published are dropped here: this is the lazy trim.
        return {
            "_id": self.customer_id,
            "s": codec.encode(self.state, self.meta) if self.state is not None else None,
            "seen": self.seen,
            "outbox": [e.to_doc(codec) for e in self.pending()],
            "due": self.due,
            "rev": self.rev if rev is None else rev,
        }


class Schedule:
    """When each owned customer is next due; a heap with lazy deletion."""

    def __init__(self) -> None:
        self.due: dict[str, datetime | None] = {}
        self._heap: list[tuple[datetime, str]] = []
        self.stale = True

    def clear(self) -> None:
        self.due.clear()
        self._heap.clear()
        self.stale = True

    def set(self, cid: str, when: datetime | None) -> None:
        if cid in self.due and self.due[cid] == when:
            return
        self.due[cid] = when
        if when is not None:
            heapq.heappush(self._heap, (when, cid))
            if len(self._heap) > 2 * len(self.due) + 1024:
                # Superseded entries leave the heap only when they reach its top, and a due time
                # that moves later with every event (a recency threshold) never gets there: rebuild.
                self._heap = [(w, c) for c, w in self.due.items() if w is not None]
                heapq.heapify(self._heap)

    def touch_all(self, when: datetime) -> None:
        """Make every known customer due at `when` (e.g. after the rules that judge them changed)."""
        for cid, current in self.due.items():
            if current is None or current > when:
                self.set(cid, when)

    def pop_due(self, now: datetime, limit: int) -> list[str]:
        out: list[str] = []
        while self._heap and len(out) < limit and self._heap[0][0] <= now:
            when, cid = heapq.heappop(self._heap)
            if self.due.get(cid) == when:  # else superseded by a later set()
                self.due[cid] = None
                out.append(cid)
        return out

    def next_due(self) -> datetime | None:
        while self._heap and self.due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


Labels = tuple[tuple[str, str], ...]


class Tally:
    """How many of the owned customers have each label (segment, tier, risk band...), kept up to
    date by the writes instead of a collection scan per gauge refresh.

    The invariant: `counts` sums `labels(s)` over the stored documents this consumer owns. The
    projection scan that rebuilds the schedule after an assignment counts them; every successful
    write then moves its documents from the labels they were stored with (`meta["tally"]`, set
    when a document comes from the store, None while a new one is not stored) to their new ones.
    A failed write leaves its documents counted as they were until a retry of that write, or
    their next read from the store, tells what the store holds.
    Scans of 23,570 customers cost the embedded store several seconds each: three of them every
    30 s kept it busy even while nothing happened. Each replica counts only what it owns, so the
    totals are the sum over replicas.
    """

    def __init__(self, fields: Iterable[str], labels: Callable[[dict[str, Any] | None], Labels]):
        self.projection = {f: 1 for f in fields}
        self.labels = labels
        self.counts: Counter[tuple[str, str]] = Counter()
        self.ready = False  # counted since the last assignment
        # Documents whose write failed, with the labels they are counted under: the store may hold
        # the old or the new state. A retry of the same write settles them; else the next read does.
        self.unsure: dict[str, Labels | None] = {}

    def clear(self) -> None:
        self.counts.clear()
        self.unsure.clear()
        self.ready = False

    def recounted(self, counts: Counter[tuple[str, str]]) -> None:
        """Adopt a count of the store (swapped in whole, so the gauges never show a partial one)."""
        self.counts = counts
        self.unsure.clear()
        self.ready = True

    def read(self, customer_id: str, state: dict[str, Any] | None, stored: bool) -> Labels | None:
        """The labels a document read from the store is stored with (None: not stored)."""
        labels = self.labels(state) if stored else None
        if customer_id in self.unsure:
            self.move(self.unsure.pop(customer_id), labels)
        return labels

    def move(self, old: Labels | None, new: Labels | None) -> None:
        if old is not None:
            self.counts.subtract(old)
        if new is not None:
            self.counts.update(new)

    def snapshot(self) -> dict[str, dict[str, int]] | None:
        """{dimension: {value: customers}}; None until counted since the last assignment."""
        if not self.ready:
            return None
        out: dict[str, dict[str, int]] = {}
        for (dim, value), n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            if n:
                out.setdefault(dim, {})[value] = n
        return out


class StateStore:
    """Loads and saves CustomerDocs for one collection, with a rebalance-scoped cache and schedule."""

    def __init__(
        self,
        collection: AsyncCollection,
        *,
        cache_size: int = 200_000,
        codec: Codec | None = None,
        tally: Tally | None = None,
    ):
        self.collection = collection
        # A document in use is kept as an object; `settle` packs it when its user is done.
        self.cache: OrderedDict[str, CustomerDoc | bytes] = OrderedDict()
        # Every document handed out that someone still holds. A holder may keep one past `settle`
        # (notify's delivery round keeps its documents while messages are out) and change it
        # later: the next `load` must return that same object, not a second copy from the cache.
        self._live: weakref.WeakValueDictionary[str, CustomerDoc] = weakref.WeakValueDictionary()
        self.packed_bytes = 0  # of the packed entries in `cache` (exported as crm_state_cache_bytes)
        self.cache_size = cache_size
        self.codec: Codec = codec or PlainCodec()
        self.schedule = Schedule()
        self.tally = tally
        # True while the cache holds every stored document of the customers this consumer owns.
        self.complete = False
        # Set by the service host: its hot-path requests take turns with the other services'.
        self.turns = StoreTurns()

    def drop_cache(self) -> None:
        self.cache.clear()
        self._live.clear()
        self.packed_bytes = 0
        self.schedule.clear()
        self.complete = False
        if self.tally is not None:
            self.tally.clear()

    def _set(self, cid: str, entry: CustomerDoc | bytes) -> None:
        """Replace or add a cache entry (keeping its place), counting packed bytes."""
        old = self.cache.get(cid)
        if isinstance(old, bytes):
            self.packed_bytes -= len(old)
        if isinstance(entry, bytes):
            self.packed_bytes += len(entry)
        self.cache[cid] = entry

    def _forget(self, cid: str) -> None:
        old = self.cache.pop(cid, None)
        if isinstance(old, bytes):
            self.packed_bytes -= len(old)

    async def warm(self, owns: Callable[[str], bool]) -> int | None:
        """Cache every stored document this consumer owns (one scan); how many, or None if they
        do not fit in the cache (then misses are read as before). Cached documents are kept: they
        are what was last written."""
        found: dict[str, dict[str, Any]] = {}
        async for d in self.collection.find({}):
            if d["_id"] not in self.cache and owns(d["_id"]):
                found[d["_id"]] = d
                if len(found) + len(self.cache) > self.cache_size:
                    return None
        for n, (cid, d) in enumerate(found.items(), 1):
            if cid not in self.cache:  # loaded meanwhile (notify's deliveries run beside batches): newer
                self._set(cid, CustomerDoc.from_doc(d, self.codec).pack())
            if n % 1000 == 0:
                # Decoding and packing is CPU work (30 µs a profile document of five orders,
                # measured: 6 s for 200,000, more for longer histories, against a 10 s session
                # timeout): let the consumer's heartbeats run, or the group takes the partitions away.
                await asyncio.sleep(0)
        self.complete = True
        return len(found)

    async def rebuild_schedule(self, owns: Callable[[str], bool]) -> int:
        """One projection scan: every customer this consumer owns, with its due time (and the
        labels the tally counts). The caller holds the pipeline lock: no write runs meanwhile."""
        self.schedule.clear()
        tally = self.tally
        projection = {"_id": 1, "due": 1} | (tally.projection if tally is not None else {})
        counts: Counter[tuple[str, str]] = Counter()
        async for d in self.collection.find({}, projection):
            if owns(d["_id"]):
                self.schedule.set(d["_id"], d.get("due"))
                if tally is not None:
                    counts.update(tally.labels(d.get("s")))
        if tally is not None:
            tally.recounted(counts)
        self.schedule.stale = False
        return len(self.schedule.due)

    async def load(self, customer_ids: Iterable[str]) -> dict[str, CustomerDoc]:
        """The documents for these customers; missing ones come back empty (new customers)."""
        out: dict[str, CustomerDoc] = {}
        missing = []
        for cid in customer_ids:
            entry = self.cache.get(cid)
            doc = entry if isinstance(entry, CustomerDoc) else self._live.get(cid)
            if doc is None and entry is not None:
                doc = CustomerDoc.unpack(cid, entry)
            if doc is None:
                missing.append(cid)
                continue
            if entry is None:
                self._cache_put(cid, doc)  # evicted while held: the held object is the newest state
            else:
                self._set(cid, doc)
                self.cache.move_to_end(cid)
            self._live[cid] = doc
            out[cid] = doc
            if self.tally is not None and "tally" not in doc.meta:
                doc.meta["tally"] = self.tally.read(cid, doc.state, True)  # cached by warm(): as stored
        if missing:
            stored_docs = []
            if not self.complete:
                async with self.turns.turn():
                    stored_docs = [d async for d in self.collection.find({"_id": {"$in": missing}})]
            # Decoded after the turn (profile's and notify's states are encrypted): no other
            # service waits for this.
            found = {d["_id"]: CustomerDoc.from_doc(d, self.codec) for d in stored_docs}
            for cid in missing:
                stored = found.get(cid)
                doc = stored or CustomerDoc(cid)
                if self.tally is not None:
                    # None for a new customer: not stored, so counted at its first write.
                    doc.meta["tally"] = self.tally.read(cid, doc.state, stored is not None)
                out[cid] = doc
                self._cache_put(cid, doc)
                self._live[cid] = doc
        return out

    def settle(self, docs: Iterable[CustomerDoc]) -> None:
        """Pack the cached documents their user is done with (written and published)."""
        for doc in docs:
            if not doc.dirty and self.cache.get(doc.customer_id) is doc:
                self._set(doc.customer_id, doc.pack())

    def _cache_put(self, cid: str, doc: CustomerDoc) -> None:
        self._set(cid, doc)
        while len(self.cache) > self.cache_size:
            self._forget(next(iter(self.cache)))
            self.complete = False  # the evicted document is in the store only now

    async def save(self, docs: Iterable[CustomerDoc]) -> int:
        """One unordered bulk write of every dirty document.

        Each replaces the stored document only if that is still the revision this one was read
        as (`rev`; 0: none stored). A partition has one owner, but an owner that has not heard of
        its revocation yet (its batch outlived the rebalance timeout, or it missed its heartbeats)
        can still be writing: its write then fails with a duplicate key instead of overwriting
        the new owner's, and its batch is delivered again (to whoever owns it) and read afresh.
        """
        ops = []
        dirty = []
        for doc in docs:
            if doc.dirty:
                ops.append(ReplaceOne({"_id": doc.customer_id, "rev": _stored_rev(doc)},
                                      doc.to_doc(self.codec, doc.rev + 1), upsert=True))  # fmt: skip
                dirty.append(doc)
        if not ops:
            return 0
        try:
            async with self.turns.turn():
                await self.collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            stale = [
                dirty[e["index"]].customer_id for e in exc.details.get("writeErrors", []) if e.get("code") == 11000
            ]
            if stale:
                log.warning(
                    "%d document(s) changed in the store since this consumer read them (e.g. %s): another "
                    "consumer owns them now, or an earlier try of this write did land though its reply was "
                    "lost; the batch is delivered again and read afresh",
                    len(stale),
                    stale[0],
                )
            self.unwritten(dirty)
            raise
        except BaseException:
            # Failed, or cancelled (a stopping service cancels its sweep) after the write may
            # have landed: the cached copies' revision is unknown, so they are read again.
            self.unwritten(dirty)
            raise
        for doc in dirty:
            doc.rev += 1
            if self.tally is not None:
                new = self.tally.labels(doc.state)
                if "tally" in doc.meta:
                    self.tally.move(doc.meta["tally"], new)
                    self.tally.unsure.pop(doc.customer_id, None)  # a retry of a failed write: settled
                else:  # not handed out by `load`: what it was stored with is unknown
                    self.schedule.stale = True
                doc.meta["tally"] = new
            doc.dirty = False
            doc.outbox = doc.pending()
            doc.published.clear()
            self.schedule.set(doc.customer_id, doc.due)
        return len(ops)

    async def write_beside(self, collection: AsyncCollection, ops: list, docs: Iterable[CustomerDoc]) -> None:
        """A store extension's write that must happen before these documents' own (ledger pages,
        contact lookups): when it fails, the dirty documents' cached copies are treated as when
        their own write fails."""
        try:
            async with self.turns.turn():
                await collection.bulk_write(ops, ordered=False)
        except (OperationFailure, *TRANSIENT_STORE_ERRORS):
            self.unwritten(doc for doc in docs if doc.dirty)
            raise

    def unwritten(self, docs: Iterable[CustomerDoc]) -> None:
        """A write of these documents failed: the cached copies may be ahead of the store, so they
        are forgotten and the next load reads the store again."""
        docs = list(docs)
        for doc in docs:
            self._forget(doc.customer_id)
            self._live.pop(doc.customer_id, None)
        self.complete = False  # they must be read again
        if self.tally is not None:
            for doc in docs:
                self.tally.unsure.setdefault(doc.customer_id, doc.meta.get("tally"))

    async def with_pending_outbox(self, owns: Callable[[str], bool]) -> list[str]:
        """Customers this consumer owns whose stored outbox still holds events (one projection scan)."""
        return [
            d["_id"] async for d in self.collection.find({"outbox.0": {"$exists": True}}, {"_id": 1}) if owns(d["_id"])
        ]

    async def clear_outboxes(self, docs: Iterable[CustomerDoc]) -> int:
        """Drop already-published outbox entries now instead of at the next write (after an erasure)."""
        docs = list(docs)
        if not docs:
            return 0
        # Fenced like `save`: an owner that lost the document must not empty the new owner's outbox.
        ops = [UpdateOne({"_id": d.customer_id, "rev": _stored_rev(d)}, {"$set": {"outbox": []}}) for d in docs]
        async with self.turns.turn():
            res = await self.collection.bulk_write(ops, ordered=False)
        for d in docs:
            d.outbox = d.pending()
            d.published.clear()
        return res.modified_count


def _stored_rev(doc: CustomerDoc) -> int | None:
    """The fence's filter value: the revision read, or None (matches a missing field) for 0: a new
    customer, or a document stored before revisions were written."""
    return doc.rev or None


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


class ClockMarks:
    """The newest event time read per partition, saved with every batch under event time.

    An event clock lives in one process; without these marks, a restarted or new owner of a
    partition would start its clock at zero and learn time again only from events it reads
    afterwards: after a crash at the end of a replay it would never reach the last day, and
    birthdays, expiry and inactivity would fire differently than in an uninterrupted run.
    One small document per partition, written by its single owner.
    """

    def __init__(self, collection: AsyncCollection, turns: StoreTurns | None = None):
        self.collection = collection
        self.turns = turns or StoreTurns()

    async def save(self, marks: dict[tuple[str, int], tuple[datetime | None, datetime | None]]) -> None:
        """Per partition: (newest event time read, newest watermark read); None where there is none."""
        if marks:
            ops = []
            for (topic, p), (when, mark) in marks.items():
                doc = {k: v for k, v in (("t", when), ("w", mark)) if v is not None}
                ops.append(ReplaceOne({"_id": f"{topic}/{p}"}, doc, upsert=True))
            async with self.turns.turn():
                await self.collection.bulk_write(ops, ordered=False)

    async def load(
        self, sources: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[datetime | None, datetime | None]]:
        by_id = {f"{t}/{p}": (t, p) for t, p in sources}
        if not by_id:
            return {}
        return {
            by_id[d["_id"]]: (d.get("t"), d.get("w")) async for d in self.collection.find({"_id": {"$in": list(by_id)}})
        }
