"""The runtime's promises, on real servers: commit after processing, dead letters, dedup, outbox."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest
from pymongo import AsyncMongoClient

from contracts import derived_id
from services.runtime.deadletters import list_dead_letters, replay_dead_letters
from services.runtime.records import DLQ_OFFSET, DLQ_REASON, DLQ_TOPIC, header
from tests.support.backends import free_port
from tests.support.kafka import encode, eventually, produce, purchase, read_topic
from tests.support.probe_service import ProbeSettings, build


async def _state(common, customer_id):
    client = AsyncMongoClient(common.mongo_url)
    try:
        return await client[f"{common.db_prefix}probe"]["customers"].find_one({"_id": customer_id})
    finally:
        await client.close()


async def _committed(host, topic: str) -> dict[int, int]:
    consumer = host.subscriber.consumer
    out = {}
    for tp in sorted(consumer.assignment()):
        if tp.topic == topic:
            out[tp.partition] = await consumer.committed(tp) or 0
    return out


async def test_purchase_is_consumed_and_its_offset_committed(common):
    port = free_port()
    host = build(common, ProbeSettings(http_port=port))
    topic = common.topic("shop.purchases")
    http = asyncio.create_task(host.http.serve())
    await host.start()
    try:
        await produce(common.kafka_bootstrap, topic, [(b"c-1", encode(purchase("c-1", total="12.30")), None)])
        state = await eventually(lambda: _state(common, "c-1"))
        assert state["s"] == {"purchases": 1, "spend": "12.30"}
        # Exactly one record was produced: the committed offsets must add up to 1.
        committed = await eventually(lambda: _sum_committed(host, topic, 1))
        assert committed == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["partitions"] == 6
            metrics = (await client.get("/metrics")).text
        assert f'crm_events_consumed_total{{service="probe",topic="{topic}",type="PurchaseCompleted"}} 1.0' in metrics
        assert 'crm_events_published_total{service="probe",topic="crm.care",type="CareRequested"} 1.0' in metrics
        assert f'crm_consumer_lag{{partition="0",service="probe",topic="{topic}"}} 0.0' in metrics
        assert "crm_faststream_received_messages_total" in metrics
    finally:
        await host.stop()
        host.http.should_exit = True
        await http


async def _sum_committed(host, topic, want):
    total = sum((await _committed(host, topic)).values())
    return total if total == want else None


async def test_malformed_message_is_dead_lettered_and_the_next_one_processed(common):
    host = build(common, ProbeSettings(http_port=free_port()))
    topic = common.topic("shop.purchases")
    bad = encode(purchase("c-2", total="5.00")).replace(b'"5.00"', b"5.00", 1)  # float money
    good = encode(purchase("c-2", total="7.00"))
    await produce(common.kafka_bootstrap, topic, [(b"c-2", bad, [("trace", b"abc")]), (b"c-2", good, None)])
    await host.start()
    try:
        state = await eventually(lambda: _state(common, "c-2"))
        assert state["s"]["spend"] == "7.00"
        letters = await read_topic(common.kafka_bootstrap, topic + ".dlq", expect=1)
        assert len(letters) == 1
        dl = letters[0]
        assert dl.value == bad and dl.key == b"c-2"  # the original bytes
        headers = tuple(dl.headers)
        assert ("trace", b"abc") in headers  # original headers kept
        assert header(headers, DLQ_TOPIC) == topic
        assert header(headers, DLQ_OFFSET) == "0"
        assert "data.total" in header(headers, DLQ_REASON) and "decimal string" in header(headers, DLQ_REASON)
        # The CLI's view of the same dead letter.
        listed = await list_dead_letters(common, "shop.purchases")
        assert [d.reason for d in listed] == [header(headers, DLQ_REASON)]
    finally:
        await host.stop()


async def test_dead_letters_replay_once_to_their_topic(common):
    topic = common.topic("shop.purchases")
    await produce(common.kafka_bootstrap, topic + ".dlq", [(b"c-3", b"not json", [("x-dlq-reason", b"invalid")])])
    assert await replay_dead_letters(common, "shop.purchases") == 1
    assert await replay_dead_letters(common, "shop.purchases") == 0  # already replayed
    replayed = await read_topic(common.kafka_bootstrap, topic, expect=1)
    assert [(r.key, r.value, list(r.headers)) for r in replayed] == [(b"c-3", b"not json", [])]


async def test_same_event_twice_changes_state_once_and_publishes_once(common):
    host = build(common, ProbeSettings(http_port=free_port()))
    topic = common.topic("shop.purchases")
    event = purchase("c-4", total="3.00")
    await host.start()
    try:
        # Once in the same batch, once in a later one.
        await produce(common.kafka_bootstrap, topic, [(b"c-4", encode(event), None)] * 2)
        await eventually(lambda: _sum_committed(host, topic, 2))
        await produce(common.kafka_bootstrap, topic, [(b"c-4", encode(event), None)])
        await eventually(lambda: _sum_committed(host, topic, 3))
        state = await _state(common, "c-4")
        assert state["s"] == {"purchases": 1, "spend": "3.00"}
        care = await read_topic(common.kafka_bootstrap, common.topic("crm.care"), expect=1)
        assert len(care) == 1
        assert json.loads(care[0].value)["event_id"] == str(
            derived_id(uuid.UUID(event["event_id"]), "CareRequested", "")
        )
    finally:
        await host.stop()


async def test_crash_between_store_write_and_publish_publishes_exactly_once_after_restart(common, tmp_path):
    topic = common.topic("shop.purchases")
    event = purchase("c-5", total="9.99")
    env = {
        **os.environ,
        "CRM_KAFKA_BOOTSTRAP": common.kafka_bootstrap,
        "CRM_MONGO_URL": common.mongo_url,
        "CRM_TOPIC_PREFIX": common.topic_prefix,
        "CRM_DB_PREFIX": common.db_prefix,
        "CRM_BATCH_TIMEOUT_MS": "50",
        "CRM_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "CRM_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "CRM_PROBE_HTTP_PORT": str(free_port()),
        "CRM_LOG_JSON": "false",
    }
    await produce(common.kafka_bootstrap, topic, [(b"c-5", encode(event), None)])
    argv = [sys.executable, "-m", "tests.support.probe_service"]
    crashed = await asyncio.to_thread(
        subprocess.run, argv, env={**env, "CRM_FAILPOINT": "after_store_write"}, timeout=60, capture_output=True
    )
    assert crashed.returncode == 86, crashed.stderr.decode()[-2000:]
    # The state was written, the derived event was not published, the offset was not committed.
    assert (await _state(common, "c-5"))["s"]["purchases"] == 1
    assert await read_topic(common.kafka_bootstrap, common.topic("crm.care"), expect=1, timeout=1, settle=0) == []

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        care = await read_topic(common.kafka_bootstrap, common.topic("crm.care"), expect=1, timeout=60, settle=2)
        assert len(care) == 1
        body = json.loads(care[0].value)
        assert body["data"]["kind"] == "first_purchase_thanks"
        assert body["causation_id"] == event["event_id"]
        # Redelivered after the crash, the purchase itself was not counted twice.
        assert (await _state(common, "c-5"))["s"]["purchases"] == 1
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]


async def test_store_outage_is_retried_not_dead_lettered_and_readiness_follows_it(common):
    host = build(common, ProbeSettings(http_port=free_port()))
    topic = common.topic("shop.purchases")
    await host.start()
    real = host.store.collection
    # Nothing listens on this port: every read fails like a MongoDB outage.
    dead = AsyncMongoClient(f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", serverSelectionTimeoutMS=200)
    host.store.collection = dead["x"]["customers"]
    try:
        await produce(common.kafka_bootstrap, topic, [(b"c-6", encode(purchase("c-6", total="4.00")), None)])
        await eventually(lambda: _not_ready(host))
        assert await _sum_committed(host, topic, 0) == 0
        host.store.collection = real  # the outage ends
        await eventually(lambda: _state(common, "c-6"))
        await eventually(lambda: _sum_committed(host, topic, 1))
        assert host.readiness()[0]
        assert await read_topic(common.kafka_bootstrap, topic + ".dlq", expect=1, timeout=1, settle=0) == []
    finally:
        await host.stop()
        await dead.close()


async def _not_ready(host):
    ready, detail = host.readiness()
    return detail if not ready and detail["failing"] else None


async def test_a_warmed_cache_holds_every_owned_customer_and_reads_misses_again_once_incomplete(common):
    from services.runtime.statestore import StateStore

    client = AsyncMongoClient(common.mongo_url, tz_aware=True)
    coll = client[f"{common.db_prefix}warm"]["customers"]

    def stored(cid: str, n: int) -> dict:
        return {"_id": cid, "s": {"n": n}, "seen": ["e0"], "outbox": [], "due": None, "rev": 1}

    try:
        await coll.insert_many([stored("a1", 1), stored("a2", 2), stored("b1", 3)])
        store = StateStore(coll, cache_size=3)
        assert await store.warm(lambda cid: cid.startswith("a")) == 2  # b1 belongs to another consumer
        assert store.complete and set(store.cache) == {"a1", "a2"}
        # Nothing else writes an owned customer, so a miss is a new customer: not read. (Written here
        # behind the cache's back only to show that no read happens.)
        await coll.insert_one(stored("a3", 9))
        docs = await store.load(["a1", "a3"])
        assert docs["a1"].state == {"n": 1} and docs["a1"].has_seen("e0")
        assert docs["a3"].state is None
        # A full cache evicts, and the evicted document is in the store only: misses are read again.
        await store.load(["a4"])
        assert len(store.cache) == 3 and not store.complete
        store.drop_cache()
        assert (await store.load(["a3"]))["a3"].state == {"n": 9}
        # More owned documents than the cache holds: no warm-up, reads as before.
        small = StateStore(coll, cache_size=2)
        assert await small.warm(lambda cid: True) is None and not small.complete
        assert (await small.load(["b1"]))["b1"].state == {"n": 3}
    finally:
        await client.drop_database(f"{common.db_prefix}warm")
        await client.close()


async def test_watermarks_hold_the_event_clock_are_not_events_and_are_kept_in_the_clock_marks(common):
    """A partition read to its end holds the event clock at its watermark: its producer may still be writing."""
    from datetime import UTC, datetime

    from contracts import watermark as wm
    from services.runtime.broker import KafkaPublisher

    common = common.model_copy(update={"clock": "event"})
    topic = common.topic("shop.purchases")
    mark = datetime(1997, 3, 1, tzinfo=UTC)
    publisher = KafkaPublisher(common)
    await publisher.start()
    try:
        await publisher.send_to_every_partition([topic], wm.encode(mark, "test"), wm.HEADERS)
    finally:
        await publisher.stop()
    naive = b'{"watermark": "1997-03-02T00:00:00", "producer": "test"}'
    await produce(common.kafka_bootstrap, topic, [(None, naive, list(wm.HEADERS))])
    await produce(common.kafka_bootstrap, topic, [(b"c-w", encode(purchase("c-w", total="3.00")), None)])
    host = build(common, ProbeSettings(http_port=free_port()))
    await host.start()
    try:
        assert (await eventually(lambda: _state(common, "c-w")))["s"]["spend"] == "3.00"
        letters = await read_topic(common.kafka_bootstrap, topic + ".dlq", expect=1)
        assert [header(tuple(d.headers), DLQ_REASON) for d in letters] == [
            "invalid watermark: watermark: Input should have timezone info"
        ]
        # Every partition is read to its end and the purchase is of today, yet time stays at the watermark.
        assert host.clock.now() == mark
        consumed = {"service": "probe", "topic": topic, "type": "PurchaseCompleted"}
        assert host.registry.get_sample_value("crm_events_consumed_total", consumed) == 1
    finally:
        await host.stop()
    client = AsyncMongoClient(common.mongo_url, tz_aware=True)
    try:
        marks = await client[f"{common.db_prefix}probe"]["clock_marks"].find().to_list()
    finally:
        await client.close()
    assert len(marks) == 6 and {m["w"] for m in marks} == {mark}


async def test_a_replay_that_fails_lets_the_clocks_pass_what_it_sent(common):
    """After an error the player writes a last watermark at the newest event the broker acknowledged:
    nothing more comes from it, and the services' clocks should not wait for a day that never comes."""
    from datetime import UTC, date, datetime

    import pytest

    from contracts import watermark as wm
    from contracts.shop import PurchaseCompleted
    from services.replay.player import play

    def ev(cid: str, hour: int) -> tuple[date, PurchaseCompleted]:
        at = datetime(1997, 1, 1, hour, tzinfo=UTC)
        return at.date(), PurchaseCompleted.model_validate(purchase(cid, total="1.00", occurred_at=at.isoformat()))

    stream = [ev("c-1", 8), ev("c-2", 9), ev("c-3", 10), ev("c-4", 7)]  # the last one is out of order
    with pytest.raises(ValueError, match="out of time order"):
        await play(common, stream, seconds_per_day=None, chunk=2)
    topic = common.topic("shop.purchases")
    records = await read_topic(common.kafka_bootstrap, topic, expect=6 + 2 + 6)  # day mark, 2 events, last mark
    marks = [r for r in records if wm.is_watermark(tuple(r.headers))]
    last = {r.partition: wm.decode(r.value) for r in sorted(marks, key=lambda r: r.offset)}
    assert len(last) == 6 and set(last.values()) == {datetime(1997, 1, 1, 9, tzinfo=UTC)}
    assert sorted(r.key for r in records if r not in marks) == [b"c-1", b"c-2"]


async def test_new_topics_follow_the_existing_partition_count_and_a_mismatch_refuses_to_start(common):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from services.runtime.kafka import NotCopartitioned, check_copartitioned, ensure_topics

    admin = AIOKafkaAdminClient(bootstrap_servers=common.kafka_bootstrap)
    await admin.start()
    try:
        # A deployment whose topics were made with 3 partitions gets a new version's topic with 3.
        grown = common.model_copy(update={"topic_prefix": common.topic_prefix + "grown."})
        await admin.create_topics([NewTopic(grown.topic("shop.purchases"), 3, 1)])
        created = await ensure_topics(grown)
        assert grown.topic("crm.referrals") in created
        loyalty = [grown.topic(t) for t in ("shop.purchases", "shop.interactions", "crm.referrals")]
        assert set((await check_copartitioned(grown, loyalty)).values()) == {3}

        # Made by hand with another count: the service refuses, and says which topics differ.
        odd = common.model_copy(update={"topic_prefix": common.topic_prefix + "odd."})
        await admin.create_topics(
            [NewTopic(odd.topic("shop.purchases"), 3, 1), NewTopic(odd.topic("crm.referrals"), 2, 1)]
        )
        with pytest.raises(NotCopartitioned, match=r"crm\.referrals: 2.*shop\.purchases: 3"):
            await check_copartitioned(odd, [odd.topic("shop.purchases"), odd.topic("crm.referrals")])
    finally:
        await admin.close()
