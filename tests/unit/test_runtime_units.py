"""Pure pieces of the runtime: log masking, the dedup window, the outbox trim, the clock."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

from services.runtime.clock import EventClock
from services.runtime.logs import JsonFormatter, customer_id_var, mask_text
from services.runtime.records import DLQ_REASON, DeadLetter, Record, header
from services.runtime.statestore import CustomerDoc, OutboxEntry, PlainCodec, Schedule


def test_personal_data_is_masked_in_log_lines():
    assert mask_text("sent to li.lei@example.com") == "sent to l***@example.com"
    assert mask_text("sms to +8613800001234 ok") == "sms to +***1234 ok"
    record = logging.makeLogRecord(
        {
            "msg": "welcome %s",
            "args": ("zhang@example.cn",),
            "name": "x",
            "levelname": "INFO",
            "phone": "+447700900123",
            "name_": 1,
        }
    )
    record.__dict__["email"] = "a.b@example.org"
    token = customer_id_var.set("c-9")
    try:
        line = json.loads(JsonFormatter("profile").format(record))
    finally:
        customer_id_var.reset(token)
    assert line["msg"] == "welcome z***@example.cn"
    assert line["email"] == "a***@example.org" and line["phone"] == "+***0123"
    assert line["customer_id"] == "c-9" and line["service"] == "profile"
    assert "zhang@" not in json.dumps(line)


def test_dedup_window_keeps_the_most_recent_ids():
    doc = CustomerDoc("c-1")
    for i in range(15):
        doc.remember(f"e{i}", window=10)
    assert not doc.has_seen("e4") and doc.has_seen("e5") and doc.has_seen("e14")
    assert len(doc.seen) == len(doc.seen_set) == 10


def test_published_outbox_entries_are_trimmed_on_the_next_write():
    doc = CustomerDoc(
        "c-1", outbox=[OutboxEntry("crm.care", "a", b"{}", b"c-1"), OutboxEntry("crm.care", "b", b"{}", b"c-1")]
    )
    doc.published.add("a")
    stored = doc.to_doc(PlainCodec())
    assert [e["id"] for e in stored["outbox"]] == ["b"]
    assert CustomerDoc.from_doc(stored, PlainCodec()).pending()[0].event_id == "b"


def test_event_clock_never_goes_back():
    clock = EventClock()
    clock.observe(datetime(1997, 3, 1, tzinfo=UTC))
    clock.observe(datetime(1997, 1, 1, tzinfo=UTC))
    assert clock.now() == datetime(1997, 3, 1, tzinfo=UTC)


def test_event_clock_is_the_low_watermark_of_its_sources():
    wall = [0.0]
    clock = EventClock(idle_s=5, monotonic=lambda: wall[0])
    clock.observe(datetime(1997, 1, 1, tzinfo=UTC), ("p", 0))
    clock.observe(datetime(1997, 3, 1, tzinfo=UTC), ("p", 1))
    assert clock.now() == datetime(1997, 1, 1, tzinfo=UTC)  # partition 0 is behind
    clock.observe(datetime(1997, 2, 1, tzinfo=UTC), ("p", 0))
    assert clock.now() == datetime(1997, 2, 1, tzinfo=UTC)
    wall[0] = 3
    clock.observe(datetime(1997, 4, 1, tzinfo=UTC), ("p", 1))
    wall[0] = 6  # partition 0 has been quiet for 6 s: it no longer holds time back
    assert clock.now() == datetime(1997, 4, 1, tzinfo=UTC)
    clock.observe(datetime(1997, 3, 15, tzinfo=UTC), ("p", 1))
    assert clock.now() == datetime(1997, 4, 1, tzinfo=UTC)  # never back while the assignment holds
    # A new assignment: a partition taken over is behind; time restarts from what it tells.
    clock.forget_sources()
    clock.expect_sources({("p", 2)})
    clock.observe(datetime(1997, 1, 15, tzinfo=UTC), ("p", 2))
    assert clock.now() == datetime(1997, 1, 15, tzinfo=UTC)


def test_dead_letter_headers_keep_the_original_ones_and_add_the_reason():
    rec = Record("shop.purchases", 3, 42, b"c-1", b"x", (("trace", b"\xff"), (DLQ_REASON, b"old")))
    headers = DeadLetter(rec, "bad", "profile").headers()
    assert ("trace", b"\xff") in headers
    assert header(headers, DLQ_REASON) == "bad"
    assert sum(1 for k, _ in headers if k == DLQ_REASON) == 1


def test_schedule_pops_due_customers_once_in_time_order():
    from datetime import UTC, datetime, timedelta

    t = datetime(1997, 1, 1, tzinfo=UTC)
    s = Schedule()
    s.set("a", t + timedelta(days=2))
    s.set("b", t + timedelta(days=1))
    s.set("c", None)
    s.set("a", t + timedelta(days=5))  # superseded: the old entry must not fire
    assert s.next_due() == t + timedelta(days=1)
    assert s.pop_due(t + timedelta(days=3), limit=10) == ["b"]
    assert s.pop_due(t + timedelta(days=3), limit=10) == []
    s.touch_all(t)
    assert sorted(s.pop_due(t, limit=10)) == ["a", "b", "c"]
    s.clear()
    assert s.stale and s.next_due() is None


def test_a_steady_event_clock_asks_each_source_once_and_still_follows_the_events():
    asked: list[object] = []
    clock = EventClock()

    def caught_up(src):
        asked.append(src)
        return src == ("p", 1)

    clock.caught_up = caught_up
    clock.observe(datetime(1997, 1, 1, tzinfo=UTC), ("p", 0))
    clock.observe(datetime(1997, 3, 1, tzinfo=UTC), ("p", 1))
    with clock.steady():
        assert clock.now() == datetime(1997, 1, 1, tzinfo=UTC)  # partition 0 is behind
        clock.observe(datetime(1997, 2, 1, tzinfo=UTC), ("p", 0))
        assert clock.now() == datetime(1997, 2, 1, tzinfo=UTC)
    assert sorted(asked) == [("p", 0), ("p", 1)]
    clock.now()
    assert len(asked) == 4  # outside the block every call asks again


def test_a_watermarked_source_holds_time_at_its_watermark_even_when_read_to_its_end():
    clock = EventClock()
    clock.caught_up = lambda src: True  # every partition read to the end of its last fetch
    clock.expect_sources({("p", 0), ("p", 1)})
    clock.watermark(datetime(1997, 1, 1, tzinfo=UTC), ("p", 0))
    clock.observe(datetime(1997, 3, 1, tzinfo=UTC), ("p", 1))
    assert clock.now() == datetime(1997, 1, 1, tzinfo=UTC)  # the producer may still be writing to p0
    # Its newest event counts once past the watermark: the producer promises time order.
    clock.observe(datetime(1997, 2, 1, tzinfo=UTC), ("p", 0))
    assert clock.now() == datetime(1997, 2, 1, tzinfo=UTC)
    clock.watermark(datetime(1997, 1, 15, tzinfo=UTC), ("p", 0))  # an older one changes nothing
    clock.watermark(datetime(1997, 4, 1, tzinfo=UTC), ("p", 0))
    assert clock.now() == datetime(1997, 4, 1, tzinfo=UTC)  # p1, without watermarks and caught up, holds nothing
    assert clock.position(("p", 0)) == (datetime(1997, 2, 1, tzinfo=UTC), datetime(1997, 4, 1, tzinfo=UTC))
    clock.forget_sources()
    assert clock.position(("p", 0)) == (None, None)


def test_held_events_come_out_in_time_then_id_order_whatever_order_they_went_in():
    import uuid
    from datetime import UTC, datetime, timedelta

    from contracts.shop import PurchaseCompleted
    from services.runtime.held import first_due, hold, take_ready
    from tests.support.kafka import purchase

    t0 = datetime(1997, 3, 1, 12, tzinfo=UTC)

    def ev(minutes: int, eid: str) -> PurchaseCompleted:
        body = purchase("c-1", total="1.00", occurred_at=(t0 + timedelta(minutes=minutes)).isoformat())
        return PurchaseCompleted.model_validate(body | {"event_id": eid})

    ids = [str(uuid.UUID(int=i)) for i in range(4)]
    events = [ev(10, ids[3]), ev(0, ids[2]), ev(10, ids[1]), ev(20, ids[0])]
    queue = None
    for e in events:
        queue = hold(queue, e)
    assert first_due(queue) == t0 and first_due([]) is None
    left, ready = take_ready(queue, t0 + timedelta(minutes=10), {"PurchaseCompleted": PurchaseCompleted})
    assert [str(e.event_id) for e in ready] == [ids[2], ids[1], ids[3]]  # the same time: by id
    assert ready[1] == events[2] and first_due(left) == t0 + timedelta(minutes=20)


def test_a_packed_document_comes_back_as_it_was_without_its_published_entries():
    doc = CustomerDoc("c1", state={"n": 3, "at": datetime(2026, 1, 2, tzinfo=UTC), "tags": ["a"]}, rev=4,
                      due=datetime(2026, 2, 1, tzinfo=UTC), meta={"lookup": {"k1"}})  # fmt: skip
    for eid in ("e1", "e2"):
        doc.remember(eid, 10)
    doc.outbox = [OutboxEntry("t", "x1", b"v1", b"c1"), OutboxEntry("t", "x2", b"v2", b"c1")]
    doc.published.add("x1")
    back = CustomerDoc.unpack("c1", doc.pack())
    assert back.state == doc.state and back.rev == 4 and back.due == doc.due and back.meta == {"lookup": {"k1"}}
    assert back.has_seen("e2") and not back.has_seen("e3") and back.seen == ["e1", "e2"]
    assert [e.event_id for e in back.pending()] == ["x2"] and not back.published and not back.dirty
    # Published entries are what the next write trims: the packed copy writes the same document.
    assert back.to_doc(PlainCodec()) == doc.to_doc(PlainCodec())


class _Collection:
    """Takes bulk writes; a store whose cache is complete reads nothing."""

    def __init__(self):
        self.written: list = []

    async def bulk_write(self, ops, ordered):
        self.written.extend(ops)


async def test_the_cache_packs_settled_documents_and_hands_a_held_one_out_as_the_same_object():
    import gc

    from services.runtime.statestore import StateStore

    store = StateStore(_Collection())
    store.complete = True  # every owned customer cached: a miss is a new customer
    doc = (await store.load(["c1"]))["c1"]
    doc.state, doc.dirty = {"points": 5}, True
    store.settle([doc])
    assert store.cache["c1"] is doc  # dirty: not written yet, so not packed
    await store.save([doc])
    store.settle([doc])
    assert isinstance(store.cache["c1"], bytes) and store.packed_bytes == len(store.cache["c1"]) > 0
    # Still held (notify keeps its documents while messages are out) and changed later: the
    # next load must see that change, so it returns the held object, not a copy of the cache.
    doc.state = {"points": 7}
    again = (await store.load(["c1"]))["c1"]
    assert again is doc and store.cache["c1"] is doc and store.packed_bytes == 0
    await store.save([doc])  # not dirty: nothing to write, but settle packs the newest state
    store.settle([doc])
    del doc, again
    gc.collect()
    fresh = (await store.load(["c1"]))["c1"]
    assert fresh.state == {"points": 7} and fresh.rev == 1
    store.settle([fresh])
    assert store.packed_bytes == len(store.cache["c1"])
    store.schedule.set("c1", datetime(2026, 2, 1, tzinfo=UTC))
    store.schedule.stale = False
    # Eviction makes the cache incomplete (the evicted document is in the store only) and
    # nothing else: the schedule in memory stays.
    store.cache_size = 1
    await store.load(["c2"])
    assert list(store.cache) == ["c2"] and not store.complete and store.packed_bytes == 0
    assert not store.schedule.stale and store.schedule.due == {"c1": datetime(2026, 2, 1, tzinfo=UTC)}
    # A rebalance: another consumer may own these customers now.
    store.complete = True
    store.drop_cache()
    assert not store.cache and not store._live and store.packed_bytes == 0
    assert not store.complete and store.schedule.stale and not store.schedule.due


def test_the_schedule_heap_stays_near_the_number_of_customers_when_due_times_keep_moving():
    s = Schedule()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(20_000):
        s.set(f"c{i % 100}", start + timedelta(minutes=i))  # each event moves the due time later
    assert len(s._heap) <= 2 * 100 + 1024 + 1
    assert s.pop_due(start + timedelta(days=30), 1000) == [f"c{i}" for i in range(100)]


class _Publisher:
    def __init__(self):
        self.sent: list = []

    async def send_many(self, messages):
        self.sent.extend(messages)


async def test_what_a_batch_makes_due_is_ticked_into_that_batch_s_write():
    """Loyalty holds a purchase the event clock has not reached. When the same batch moves the
    clock past it (here through another customer's event on the other partition), the purchase is
    applied before the write: one write of the account, not one now and one by the next sweep."""
    from contracts import registry_for, topics
    from services.bench import _purchase
    from services.loyalty.domain import LoyaltyDomain
    from services.loyalty.settings import LoyaltySettings
    from services.runtime.clock import EventClock
    from services.runtime.pipeline import Pipeline
    from services.runtime.records import Record
    from services.runtime.statestore import StateStore

    t0 = datetime(1997, 3, 1, tzinfo=UTC)
    clock = EventClock(start=t0)
    clock.caught_up = lambda source: False  # a live replay: every partition may still bring events
    topic = topics.SHOP_PURCHASES
    for p in (0, 1):
        clock.observe(t0, (topic, p))
    collection = _Collection()
    store = StateStore(collection)
    store.complete = True
    pipeline = Pipeline(service="loyalty", domain=LoyaltyDomain(LoyaltySettings().rules()),
                        registry=registry_for(topic), store=store, publisher=_Publisher(), clock=clock)  # fmt: skip
    first = _purchase("c1", t0 + timedelta(days=5), "o1", "100.00")  # partition 1 is then at day 5...
    second = _purchase("c2", t0 + timedelta(days=6), "o2", "50.00")  # ...and partition 0 at day 6
    records = [Record(topic, 1, 0, first.key(), first.to_bytes()), Record(topic, 0, 0, second.key(), second.to_bytes())]
    result = await pipeline.handle(records)

    assert clock.now() == t0 + timedelta(days=5)
    docs = await store.load(["c1", "c2"])
    assert docs["c1"].state["held"] == [] and docs["c1"].state["balance"] > 0  # applied in this batch
    assert len(docs["c2"].state["held"]) == 1 and docs["c2"].state["balance"] == 0  # day 6: still ahead
    assert "PointsEarned" in [e.type for e in result.derived]
    assert result.docs_written == 2 and len(collection.written) == 2


async def _profile_care(batches) -> list[tuple[str, str, str]]:
    """Profile's care requests (kind, what about, time) after these batches of records and the
    sweeps that follow each, under the event clock, as a live replay reads them."""
    from contracts import registry_for, topics
    from services.profile.domain import ProfileDomain, ProfileRules
    from services.runtime.pipeline import Pipeline
    from services.runtime.statestore import StateStore

    # No expiry of follow-ups: it judges how late the clock got to one, which is the batches' doing.
    domain = ProfileDomain(ProfileRules(followup_expiry_days=100_000))
    clock = EventClock(start=datetime(1997, 1, 1, tzinfo=UTC))
    clock.caught_up = lambda source: False  # a live replay: every partition may still bring events
    clock.expect_sources({(topics.SHOP_PURCHASES, 0), (topics.SHOP_INTERACTIONS, 0)})
    store = StateStore(_Collection())
    store.complete = True
    store.schedule.stale = False
    registries = {t: registry_for(t) for t in (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS)}
    pipeline = Pipeline(service="profile", domain=domain, registry=registries[topics.SHOP_PURCHASES],
                        registries=registries, store=store, publisher=_Publisher(), clock=clock)  # fmt: skip
    publisher, counted = pipeline.publisher, set()
    for records in batches:
        results = [await pipeline.handle(records)]
        while ids := store.schedule.pop_due(clock.now(), 100):
            results.append(await pipeline.sweep(ids, clock.now()))
        counted |= {str(e.event_id) for r in results for e in r.derived if e.type == "CareRequested"}
    published = {e["event_id"]: e for e in (json.loads(m[2]) for m in publisher.sent) if e["type"] == "CareRequested"}
    assert counted == set(published)  # what the metrics count is what went out
    return sorted(
        (e["data"]["kind"], e["data"]["template_data"].get("ref") or e["customer_id"], _utc(e["occurred_at"]))
        for e in published.values()
    )


def _utc(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).isoformat()


def _shop_records(events) -> list:
    """The shop topics' records (partition 0) in the order the replay writes them: a watermark on
    both topics before each day's first event, and one after the last."""
    from contracts import topics
    from contracts import watermark as wm
    from services.runtime.records import Record

    out: list = []
    offsets = {topics.SHOP_PURCHASES: 0, topics.SHOP_INTERACTIONS: 0}

    def add(topic, key, value, headers=()):
        out.append(Record(topic, 0, offsets[topic], key, value, headers))
        offsets[topic] += 1

    day = None
    for event in events:
        if event.occurred_at.date() != day:
            day = event.occurred_at.date()
            for topic in offsets:
                add(topic, None, wm.encode(event.occurred_at, "test"), wm.HEADERS)
        add(event.TOPIC, event.key(), event.to_bytes())
    for topic in offsets:
        add(topic, None, wm.encode(events[-1].occurred_at + timedelta(days=1), "test"), wm.HEADERS)
    return out


async def test_profile_follow_ups_do_not_depend_on_which_topic_was_read_first():
    """A complaint cancels the follow-up of a purchase before it, not of one after it, however
    late it is read. The fault test's clean run varied so (one customer's follow-up on 1997-08-18
    in one run, 09-16 in another), which reading its complaint after its later purchase reproduces."""
    from contracts import topics
    from contracts import watermark as wm
    from contracts.shop import InteractionRecorded, InteractionRecordedData
    from services.runtime.records import Record
    from tests.support.events import buy, ev

    t0 = datetime(1997, 1, 10, 12, tzinfo=UTC)
    p1, p2 = buy("o1", at=t0), buy("o2", at=t0 + timedelta(days=40))
    opened = InteractionRecordedData(kind="complaint", channel="web", ticket_id="T1", text="Call Ann on 555-0100")
    complaint = ev(InteractionRecorded, opened, t0 + timedelta(days=1))

    def rec(event, offset):
        return Record(event.TOPIC, 0, offset, event.key(), event.to_bytes())

    def marks(when, offset):
        value = wm.encode(when, "test")
        shop = (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS)
        return [Record(t, 0, offset, None, value, wm.HEADERS) for t in shop]

    end = t0 + timedelta(days=45)  # within the follow-up's 7 days of expiry
    in_order = [
        [*marks(t0, 0), rec(p1, 1)],
        [*marks(complaint.occurred_at, 2), rec(complaint, 3)],
        [*marks(p2.occurred_at, 3), rec(p2, 4)],
        marks(end, 5),
    ]
    purchases_first = [[*marks(t0, 0), rec(p1, 1), rec(p2, 2)], [rec(complaint, 1)], marks(end, 3)]
    expected = [("satisfaction_follow_up", "o2", (p2.occurred_at + timedelta(days=3)).isoformat())]  # not o1's

    async def follow_ups(batches):
        return [c for c in await _profile_care(batches) if c[0] == "satisfaction_follow_up"]

    assert await follow_ups(in_order) == expected
    assert await follow_ups(purchases_first) == expected


async def test_profile_care_requests_do_not_depend_on_how_the_two_shop_topics_interleave():
    """Eight CDNOW customers with complaints, their two topics read in random interleavings and
    batch sizes (one topic up to months ahead of the other): the same care requests every time."""
    import random

    from services.replay.cdnow import events, first_customers, read_master

    stream = [e for _, e in events(first_customers(read_master(), 1000))]
    complained = {e.customer_id for e in stream if e.type == "InteractionRecorded" and e.data.kind == "complaint"}
    chosen = sorted(complained)[:8]
    written = _shop_records([e for e in stream if e.customer_id in chosen])
    in_order = await _profile_care([[r] for r in written])
    assert {kind for kind, _, _ in in_order} >= {"satisfaction_follow_up", "complaint_acknowledgement"}
    rng = random.Random(20261127)
    for _ in range(6):
        pending = {t: [r for r in written if r.topic == t] for t in {r.topic for r in written}}
        batches = []
        while any(pending.values()):
            topic = rng.choice(sorted(t for t, records in pending.items() if records))
            n = rng.choice([1, 3, 20, 200])
            batches.append(pending[topic][:n])
            del pending[topic][:n]
        assert await _profile_care(batches) == in_order


def test_a_document_takes_a_domain_result_only_when_something_changed():
    from services.bench import _survey

    state = {"n": 1}
    doc = CustomerDoc("c1", state=state)
    assert not doc.take(state, []) and not doc.dirty and doc.state is state
    event = _survey("c1", datetime(2026, 1, 2, tzinfo=UTC), 4)
    assert doc.take(state, [event]) and doc.dirty  # same state, but an event to publish
    assert [(e.topic, e.event_id, e.key) for e in doc.pending()] == [(event.TOPIC, str(event.event_id), b"c1")]
    assert doc.take({"n": 2}, []) and doc.state == {"n": 2}


class _StoredCollection:
    """Keeps what bulk writes replace, and serves whole documents to scans and `_id $in` reads.
    With `fail` set, a bulk write applies a part of its operations and then raises."""

    def __init__(self, docs=()):
        self.docs = {d["_id"]: d for d in docs}
        self.fail = None  # a random.Random deciding which operations land before the failure

    async def bulk_write(self, ops, ordered):
        from pymongo.errors import AutoReconnect

        for op in ops:
            if self.fail is None or self.fail.random() < 0.5:
                self.docs[op._filter["_id"]] = op._doc
        if self.fail is not None:
            raise AutoReconnect("connection lost mid-write")

    def find(self, query, projection=None):
        wanted = set(query["_id"]["$in"]) if "_id" in query else None

        async def scan():
            for d in list(self.docs.values()):
                if wanted is None or d["_id"] in wanted:
                    yield d

        return scan()


async def test_the_tally_counts_what_is_stored_through_writes_failures_evictions_and_rebalances():
    """Gauges come from counts kept by the writes, not from scans: after every step they must equal
    a fresh count of the stored documents the consumer owns, also after writes that failed half
    done (retried, or given up and read again), evictions, a warm-up and a rebalance."""
    import random

    from pymongo.errors import AutoReconnect

    from services.runtime.statestore import StateStore, Tally

    def labels(s):
        return (("tier", (s or {}).get("tier") or "none"),)

    def owns(cid):
        return not cid.endswith("9")  # another replica's customers

    tiers = ["Gold", "Silver", None]
    coll = _StoredCollection({"_id": f"c{i}", "s": {"tier": tiers[i % 3]}, "due": None} for i in range(20))
    store = StateStore(coll, tally=Tally(["s.tier"], labels))

    async def recount():
        fresh = StateStore(coll, tally=Tally(["s.tier"], labels))
        await fresh.rebuild_schedule(owns)
        return fresh.tally.snapshot()

    assert store.tally.snapshot() is None  # not counted since the assignment: no figures at all
    await store.rebuild_schedule(owns)
    assert store.tally.snapshot() == await recount() == {"tier": {"Gold": 6, "Silver": 6, "none": 6}}
    rng = random.Random(3)
    failures = 0
    for step in range(200):
        if step == 50:
            await store.warm(owns)  # cached from the scan, without labels: they are what is stored
        if step == 100:
            store.drop_cache()  # a rebalance
            assert store.tally.snapshot() is None
            await store.rebuild_schedule(owns)
        store.cache_size = 4 if 120 <= step < 160 else 200_000  # evictions: read back from the store
        ids = [f"c{rng.randrange(30)}" for _ in range(3)]  # c20.. are new customers
        docs = await store.load(i for i in ids if owns(i))
        for doc in docs.values():
            if rng.random() < 0.7:
                doc.state, doc.dirty = {"tier": rng.choice(tiers)}, True
        if rng.random() < 0.2:
            coll.fail = random.Random(step)
            try:
                await store.save(docs.values())
            except AutoReconnect:
                failures += 1
            coll.fail = None
            if rng.random() < 0.5:
                await store.save(docs.values())  # the batch's retry, with the same documents
            # else the batch is given up: its customers are read from the store next time
        else:
            await store.save(docs.values())
            store.settle(docs.values())
        assert store.tally.snapshot() == await recount() or store.tally.unsure, step
        if not store.tally.unsure:
            continue
        # What failed and was given up is counted as before until it is read again.
        await store.load(list(store.tally.unsure))
        assert not store.tally.unsure and store.tally.snapshot() == await recount(), step
    assert failures >= 20


def test_the_tally_is_exported_per_label_at_scrape_time():
    from prometheus_client import CollectorRegistry, generate_latest

    from services.runtime.metrics import TallyCollector
    from services.runtime.statestore import Tally
    from services.stack import dashboard

    tally = Tally(["s.risk.band"], lambda s: (("bands", s["band"]), ("ladder_steps", "0")))
    registry = CollectorRegistry()
    registry.register(TallyCollector("crm_churn_customers", "", tally, dimension="bands", label="band"))
    assert "crm_churn_customers{" not in generate_latest(registry).decode()  # not counted yet: nothing
    tally.recounted(Counter({("bands", "high"): 2, ("bands", "low"): 0, ("ladder_steps", "0"): 2}))
    tally.move(None, (("bands", "low"), ("ladder_steps", "0")))
    snap = dashboard.parse({"churn": generate_latest(registry).decode()})
    assert snap.risk_bands == {"high": 2, "low": 1}


def test_a_stored_outbox_entry_of_a_moved_event_type_goes_to_its_new_topic():
    codec = PlainCodec()

    def stored(topic: str, etype: str) -> str:
        value = json.dumps({"event_id": "e1", "type": etype, "customer_id": "c1"}).encode()
        return OutboxEntry.from_doc({"t": topic, "id": "e1", "v": value, "k": b"c1"}, codec).topic

    assert stored("crm.profile", "SegmentChanged") == "crm.segments"
    assert stored("crm.profile", "LifecycleStageChanged") == "crm.segments"
    assert stored("crm.loyalty", "TierChanged") == "crm.tiers"
    assert stored("crm.loyalty", "ReferralQualified") == "crm.referrals"
    # What did not move stays where it was stored.
    assert stored("crm.profile", "ProfileUpdated") == "crm.profile"
    assert stored("crm.loyalty", "PointsEarned") == "crm.loyalty"
    assert stored("crm.care", "SegmentChanged") == "crm.care"
    bad = OutboxEntry.from_doc({"t": "crm.profile", "id": "x", "v": b"\xff not json", "k": b"c1"}, codec)
    assert bad.topic == "crm.profile" and bad.value == b"\xff not json"


async def test_a_revocation_waits_for_the_batch_even_when_the_guard_times_out():
    import asyncio

    from services.runtime.broker import _Rebalance

    lock, guard, batch_done, seen = asyncio.Lock(), asyncio.Lock(), asyncio.Event(), []
    listener = _Rebalance(lock, lambda: seen.append(batch_done.is_set()), lambda: None, 0.2, guard=guard)
    await guard.acquire()  # messages out with a provider that hangs
    await lock.acquire()  # a batch in flight

    async def batch_ends():
        await asyncio.sleep(0.3)
        batch_done.set()
        lock.release()

    ending = asyncio.create_task(batch_ends())
    await listener.on_partitions_revoked(set())
    await ending
    # The guard's wait gave up after 0.2 s, the batch's did not: the cache was dropped after it.
    assert seen == [True]


async def test_a_tick_that_fails_stays_due_for_the_next_sweep():
    from contracts import registry_for, topics
    from services.bench import _purchase
    from services.loyalty.domain import LoyaltyDomain
    from services.loyalty.settings import LoyaltySettings
    from services.runtime import pipeline as pipeline_module
    from services.runtime.clock import EventClock
    from services.runtime.pipeline import Pipeline
    from services.runtime.records import Record
    from services.runtime.statestore import StateStore

    t0 = datetime(1997, 3, 1, tzinfo=UTC)
    clock = EventClock(start=t0)
    store = StateStore(_Collection())
    store.complete = True
    domain = LoyaltyDomain(LoyaltySettings().rules())
    pipeline = Pipeline(service="loyalty", domain=domain, registry=registry_for(topics.SHOP_PURCHASES),
                        store=store, publisher=_Publisher(), clock=clock)  # fmt: skip
    buy = _purchase("c1", t0, "o1", "100.00")
    await pipeline.handle([Record(topics.SHOP_PURCHASES, 0, 0, buy.key(), buy.to_bytes())])
    due = store.schedule.due["c1"]
    assert due is not None

    def broken(*_a, **_k):
        raise RuntimeError("a bug for this customer")

    pipeline._tick = broken  # what the pipeline calls (bound at construction)
    assert store.schedule.pop_due(due, 10) == ["c1"]  # as the sweep loop takes it
    await pipeline.sweep(["c1"], due)
    # Back on the schedule, not forgotten; a little later, or the sweep would take it again at once.
    assert store.schedule.due["c1"] == due + pipeline_module.TICK_RETRY
    assert store.schedule.pop_due(due, 10) == []


async def test_a_batch_that_fails_leaves_the_event_clock_where_it_was():
    from pymongo.errors import AutoReconnect

    from contracts import registry_for, topics
    from services.bench import _purchase
    from services.loyalty.domain import LoyaltyDomain
    from services.loyalty.settings import LoyaltySettings
    from services.runtime.clock import EventClock
    from services.runtime.pipeline import Pipeline
    from services.runtime.records import Record
    from services.runtime.statestore import StateStore

    class Down(_Collection):
        async def bulk_write(self, ops, ordered):
            raise AutoReconnect("store down")

    t0 = datetime(1997, 3, 1, tzinfo=UTC)
    clock = EventClock(start=t0)
    topic = topics.SHOP_PURCHASES
    clock.observe(t0, (topic, 0))
    store = StateStore(Down())
    store.complete = True
    pipeline = Pipeline(service="loyalty", domain=LoyaltyDomain(LoyaltySettings().rules()),
                        registry=registry_for(topic), store=store, publisher=_Publisher(), clock=clock,
                        retry_attempts=1, retry_base_delay_s=0)  # fmt: skip
    later = _purchase("c1", t0 + timedelta(days=30), "o1", "100.00")
    before = clock.now()
    try:
        await pipeline.handle([Record(topic, 0, 7, later.key(), later.to_bytes())])
    except AutoReconnect:
        pass
    else:
        raise AssertionError("the write should have failed")
    # Delivered again later: it must find the clock where it was, not 30 days on.
    assert clock.now() == before == t0 and clock.position((topic, 0))[0] == t0
    assert pipeline.last_offsets == {}


def test_a_clock_snapshot_from_before_a_rebalance_is_not_restored():
    t0 = datetime(1997, 3, 1, tzinfo=UTC)
    clock = EventClock(start=t0)
    clock.observe(t0 + timedelta(days=10), ("shop.purchases", 0))
    snap = clock.snapshot()
    clock.forget_sources()  # the partitions moved while the failing batch waited
    clock.observe(t0 + timedelta(days=30), ("shop.purchases", 1))
    clock.restore(snap)
    assert clock.position(("shop.purchases", 0)) == (None, None)  # not brought back
    assert clock.position(("shop.purchases", 1))[0] == t0 + timedelta(days=30)


async def test_a_write_cancelled_in_flight_leaves_no_cached_copy_behind():
    """A stopping service cancels its sweep: the write may have landed (a new revision in the store),
    so a cached copy with the old revision would make the next write fail the fence."""
    import asyncio

    from services.runtime.statestore import StateStore

    class LandsThenCancelled(_Collection):
        async def bulk_write(self, ops, ordered):
            self.written.extend(ops)
            raise asyncio.CancelledError

    store = StateStore(LandsThenCancelled())
    store.complete = True
    doc = (await store.load(["c1"]))["c1"]
    doc.state, doc.dirty = {"points": 5}, True
    try:
        await store.save([doc])
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the write should have been cancelled")
    assert "c1" not in store.cache and not store.complete  # read from the store next time
