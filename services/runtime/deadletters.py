"""Listing and replaying dead letters (`crm dlq list|replay TOPIC`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from contracts.topics import dlq
from services.runtime.kafka import assign_whole_topic, client_options
from services.runtime.records import (
    DLQ_AT,
    DLQ_CONSUMER,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TRUNCATED,
    header,
    strip_dlq_headers,
)
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass
class DeadLetterView:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def reason(self) -> str:
        return header(self.headers, DLQ_REASON) or ""

    def summary(self) -> dict[str, object]:
        return {
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
            "source_partition": header(self.headers, DLQ_PARTITION),
            "source_offset": header(self.headers, DLQ_OFFSET),
            "consumer": header(self.headers, DLQ_CONSUMER),
            "at": header(self.headers, DLQ_AT),
            "reason": self.reason,
            "bytes": len(self.value or b""),
        }


async def _read(
    consumer: AIOKafkaConsumer, parts: list[TopicPartition], end: dict[TopicPartition, int] | None = None
) -> AsyncIterator[DeadLetterView]:
    """Everything from the current position up to `end` (default: the end offsets at the time of the call)."""
    end = end if end is not None else await consumer.end_offsets(parts)
    remaining = {tp for tp in parts if await consumer.position(tp) < end[tp]}
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=2000)
        if not batch:
            break
        for tp, msgs in batch.items():
            for m in msgs:
                if m.offset < end[tp]:
                    yield DeadLetterView(tp.partition, m.offset, m.key, m.value, tuple(m.headers or ()))
            if msgs and msgs[-1].offset >= end[tp] - 1:
                remaining.discard(tp)


async def list_dead_letters(settings: CommonSettings, topic: str) -> list[DeadLetterView]:
    name = settings.topic(dlq(topic))
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        enable_auto_commit=False,
        group_id=None,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = await assign_whole_topic(consumer, name)
        await consumer.seek_to_beginning(*parts)
        return [dl async for dl in _read(consumer, parts)]
    finally:
        await consumer.stop()


async def replay_dead_letters(settings: CommonSettings, topic: str, *, from_beginning: bool = False) -> int:
    """Publish dead letters back to their topic, original bytes and headers, each once.

    A consumer group per topic remembers what was replayed, so running replay
    twice does not double the traffic; `from_beginning` replays everything again.
    """
    name = settings.topic(dlq(topic))
    target = settings.topic(topic)
    group = f"crm-dlq-replay.{name}"
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(**client_options(settings), acks="all", max_request_size=16 * 1024 * 1024)
    await consumer.start()
    await producer.start()
    try:
        parts = await assign_whole_topic(consumer, name)
        for tp in parts:
            committed = None if from_beginning else await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        count = 0
        futures = []
        end = await consumer.end_offsets(parts)
        async for dl in _read(consumer, parts, end):
            if header(dl.headers, DLQ_TRUNCATED) is not None:
                # Refused for its size: only a prefix was kept, and it could never be processed anyway.
                log.warning("not replaying %s[%d]@%d: truncated oversized message", name, dl.partition, dl.offset)
                continue
            futures.append(
                await producer.send(target, dl.value, key=dl.key, headers=list(strip_dlq_headers(dl.headers)))
            )
            count += 1
        for f in futures:
            await f
        # Up to what was read, never past `end`: a fetch may have gone beyond it, and a dead letter
        # written meanwhile (a replayed message that failed again) was not replayed by this run.
        await consumer.commit({tp: min(await consumer.position(tp), end[tp]) for tp in parts})
        return count
    finally:
        await producer.stop()
        await consumer.stop()
