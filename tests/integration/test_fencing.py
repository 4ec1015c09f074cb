"""A consumer that lost its partitions without hearing of it cannot overwrite the new owner's write."""

from __future__ import annotations

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError

from services.runtime.statestore import StateStore


async def test_a_stale_owner_s_write_fails_and_leaves_the_new_owner_s_document(common, namespace):
    client = AsyncMongoClient(common.mongo_url)
    collection = client[f"{common.db_prefix}{namespace}_fencing"]["customers"]
    try:
        first = StateStore(collection)
        doc = (await first.load(["c1"]))["c1"]
        doc.state, doc.dirty = {"points": 10}, True
        await first.save([doc])

        old, new = StateStore(collection), StateStore(collection)  # the owner before and after a rebalance
        stale = (await old.load(["c1"]))["c1"]
        fresh = (await new.load(["c1"]))["c1"]
        fresh.state, fresh.dirty = {"points": 25}, True
        await new.save([fresh])
        stale.state, stale.dirty = {"points": 11}, True
        with pytest.raises(BulkWriteError):
            await old.save([stale])
        stored = await collection.find_one({"_id": "c1"})
        assert stored["s"] == {"points": 25} and stored["rev"] == 2
        # Read again, the old owner's copy writes on top of the new one (what a redelivery does).
        again = (await old.load(["c1"]))["c1"]
        assert again.state == {"points": 25}
        again.state, again.dirty = {"points": 26}, True
        await old.save([again])
        assert (await collection.find_one({"_id": "c1"}))["rev"] == 3
        # Emptying outboxes after an erasure is fenced too: the stale copy (rev 2) leaves rev 3's alone.
        await collection.update_one({"_id": "c1"}, {"$set": {"outbox": [{"t": "x", "id": "e1", "v": b"", "k": b""}]}})
        assert await new.clear_outboxes([fresh]) == 0
        assert len((await collection.find_one({"_id": "c1"}))["outbox"]) == 1
        assert await old.clear_outboxes([again]) == 1
        # A customer created by two consumers at once: the second insert fails too.
        a, b = (await StateStore(collection).load(["c2"]))["c2"], (await StateStore(collection).load(["c2"]))["c2"]
        a.state = b.state = {"points": 1}
        a.dirty = b.dirty = True
        await StateStore(collection).save([a])
        with pytest.raises(BulkWriteError):
            await StateStore(collection).save([b])
        # A document stored before revisions were written (no `rev`): replaced, not refused.
        await collection.insert_one({"_id": "c3", "s": {"points": 3}, "seen": [], "outbox": [], "due": None})
        legacy = (await StateStore(collection).load(["c3"]))["c3"]
        legacy.state, legacy.dirty = {"points": 4}, True
        await StateStore(collection).save([legacy])
        assert (await collection.find_one({"_id": "c3"}))["rev"] == 1
    finally:
        await client.drop_database(f"{common.db_prefix}{namespace}_fencing")
        await client.close()
