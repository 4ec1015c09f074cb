"""A consumed Kafka record, independent of the client library, and dead-letter headers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

Headers = tuple[tuple[str, bytes], ...]

# Headers a dead letter carries on top of the original ones.
DLQ_REASON = "x-dlq-reason"
DLQ_TOPIC = "x-dlq-source-topic"
DLQ_PARTITION = "x-dlq-source-partition"
DLQ_OFFSET = "x-dlq-source-offset"
DLQ_CONSUMER = "x-dlq-consumer"
DLQ_AT = "x-dlq-at"
# On a message too large to keep whole: its original length and SHA-256 (the value is a prefix).
DLQ_TRUNCATED = "x-dlq-truncated"
DLQ_SHA256 = "x-dlq-sha256"
DLQ_HEADERS = (DLQ_REASON, DLQ_TOPIC, DLQ_PARTITION, DLQ_OFFSET, DLQ_CONSUMER, DLQ_AT, DLQ_TRUNCATED, DLQ_SHA256)
# The reason header is truncated: a pydantic error list can be long, a header should not be.
MAX_REASON = 2000


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    consumer: str

    def headers(self, now: datetime | None = None) -> Headers:
        now = now or datetime.now(UTC)
        own = (
            (DLQ_REASON, self.reason[:MAX_REASON].encode()),
            (DLQ_TOPIC, self.record.topic.encode()),
            (DLQ_PARTITION, str(self.record.partition).encode()),
            (DLQ_OFFSET, str(self.record.offset).encode()),
            (DLQ_CONSUMER, self.consumer.encode()),
            (DLQ_AT, now.isoformat().encode()),
        )
        original = tuple((k, v) for k, v in self.record.headers if k not in DLQ_HEADERS)
        return original + own


def header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("utf-8", "replace")
    return None


def strip_dlq_headers(headers: Headers) -> Headers:
    return tuple((k, v) for k, v in headers if k not in DLQ_HEADERS)
