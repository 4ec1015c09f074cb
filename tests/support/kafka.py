"""Test helpers that talk to the real broker: produce raw bytes, read a topic back."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.runtime.kafka import assign_whole_topic


def purchase(
    customer_id: str,
    *,
    total: str = "10.00",
    order_id: str | None = None,
    event_id: str | None = None,
    occurred_at: str | None = None,
) -> dict:
    data = {
        "order_id": order_id or f"o-{uuid.uuid4().hex[:8]}",
        "store_id": "s-1",
        "channel": "online",
        "currency": "USD",
        "total": total,
        "lines": [{"sku": "cd-1", "category": "rock", "quantity": 1, "unit_price": total}],
    }
    event = shop_event("PurchaseCompleted", customer_id, data, occurred_at=occurred_at)
    if event_id:
        event["event_id"] = event_id
    return event


def encode(event: dict) -> bytes:
    return json.dumps(event).encode()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    try:
        # One at a time and in order: tests rely on the order within a partition.
        for key, value, headers in messages:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 30.0, settle: float = 1.0) -> list:
    """Read a topic from the beginning until `expect` records arrived, then `settle` seconds more
    so that an unexpected extra record (a duplicate) would be seen too."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = await assign_whole_topic(consumer, topic)
        await consumer.seek_to_beginning(*parts)
        out: list = []
        deadline = time.monotonic() + timeout
        settle_until = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                out.extend(msgs)
            if len(out) >= expect:
                settle_until = settle_until or time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
        return out
    finally:
        await consumer.stop()


async def eventually(check, *, timeout: float = 30.0, interval: float = 0.2):
    """Await `check()` until it returns a truthy value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


def shop_event(etype: str, customer_id: str, data: dict, *, occurred_at: str | None = None) -> dict:
    """Any shop event as the JSON a shop would send."""
    return {
        "event_id": str(uuid.uuid4()),
        "type": etype,
        "schema_version": 1,
        "occurred_at": occurred_at or datetime.now(UTC).isoformat(),
        "producer": "test-shop",
        "customer_id": customer_id,
        "data": data,
    }


def registered(customer_id: str, *, occurred_at: str | None = None, **fields) -> dict:
    data = {
        "name": "Li Wei",
        "email": f"{customer_id}@example.com",
        "phone": "+8613800138000",
        "birthday": "1990-06-15",
        "locale": "zh-CN",
        "timezone": "Asia/Shanghai",
        "preferred_channel": "sms",
        "consents": {"email": True, "sms": True},
        **fields,
    }
    return shop_event("CustomerRegistered", customer_id, data, occurred_at=occurred_at)


def care_kinds(records) -> list[str]:
    return sorted(json.loads(r.value)["data"]["kind"] for r in records)
