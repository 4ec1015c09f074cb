"""Bad input never stops a partition: 50 malformed messages, interleaved with valid ones, each
dead-lettered with its reason while every valid event around them is processed, once."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from services.loyalty.app import build
from services.loyalty.settings import LoyaltySettings
from services.runtime.clock import EventClock
from services.runtime.records import DLQ_REASON, DLQ_SHA256, DLQ_TRUNCATED, header
from tests.support.backends import free_port
from tests.support.corpus import corpus
from tests.support.kafka import eventually, produce, purchase, read_topic, registered

T0 = datetime(1997, 3, 1, 12, tzinfo=UTC)


async def test_malformed_messages_are_dead_lettered_with_their_reason_and_the_rest_is_processed(common):
    bad = corpus()
    assert len(bad) >= 40
    host = build(common, LoyaltySettings(http_port=free_port()), clock=EventClock())  # 1997 events
    await host.start()
    try:
        # Around every bad message, a valid one for a customer of its own (all on shared partitions).
        sends: dict[str, list] = {"shop.purchases": [], "shop.interactions": []}
        valid = 0
        for i, b in enumerate(bad):
            cid = f"good-{i}"
            at = (T0 + timedelta(minutes=i)).isoformat()
            sends["shop.interactions"].append(
                (cid.encode(), json.dumps(registered(cid, occurred_at=at)).encode(), None)
            )
            ok = purchase(cid, total="20.00", order_id=f"o-{i}", occurred_at=at)
            sends["shop.purchases"].append((cid.encode(), json.dumps(ok).encode(), None))
            sends[b.topic].append((b.key, b.value, None))
            if i % 10 == 0:  # and now and then a duplicate of a valid one
                sends["shop.purchases"].append((cid.encode(), json.dumps(ok).encode(), None))
            valid += 1
        for topic, messages in sends.items():
            await produce(common.kafka_bootstrap, common.topic(topic), messages)

        async def all_processed():
            n = await host.db["accounts"].count_documents({"s.purchases": 1})
            return n == valid

        await eventually(all_processed, timeout=90)
        # Each purchase earned once (20 points and the 100 first-purchase bonus), duplicates or not.
        balances = {d["_id"]: d["s"]["balance"] async for d in host.db["accounts"].find({}, {"s.balance": 1})}
        assert balances == {f"good-{i}": 120 for i in range(valid)}

        got = []
        for topic in ("shop.purchases", "shop.interactions"):
            expect = sum(1 for b in bad if b.topic == topic)
            records = await read_topic(
                common.kafka_bootstrap, common.topic(f"{topic}.dlq"), expect=expect, timeout=30, settle=1.0
            )
            assert len(records) == expect, topic
            got += [(topic, r) for r in records]
        by_value = {}
        for topic, r in got:
            truncated = header(r.headers, DLQ_TRUNCATED)
            by_value[(topic, r.value, truncated)] = header(r.headers, DLQ_REASON)
        for b in bad:
            if b.value is not None and len(b.value) > common.max_message_bytes:
                key = (b.topic, b.value[: 64 * 1024], str(len(b.value)))
                digests = [header(r.headers, DLQ_SHA256) for _, r in got if header(r.headers, DLQ_TRUNCATED)]
                assert digests == [hashlib.sha256(b.value).hexdigest()]
            else:
                key = (b.topic, b.value, None)
            assert key in by_value, f"{b.name} was not dead-lettered"
            assert b.reason in by_value[key], f"{b.name}: {by_value[key]!r}"
    finally:
        await host.stop()
