"""Event-time watermarks: a producer's promise that a partition holds nothing older from here on.

A replay of history runs the services on event time, and their clock is the low watermark of
what they have read. Reading a partition to its end does not tell that nothing older is still
on its way: the producer keeps writing while the consumer fetches, and a clock that counted
such a partition as done ran days ahead of purchases not read yet (their customers were then
walked past them and sent a win-back offer after buying again). So the replay says it itself:
before each day's events and at the end it writes, to every partition of every shop topic, a
control record meaning
"everything after this record on this partition has `occurred_at` >= `watermark`, in order".

A watermark is a record with the header `crm-watermark: 1`, no key, and the JSON value
`{"watermark": "<ISO 8601 with offset>", "producer": "<who>"}`. It is not an event: consumers
that know the header skip it (the services use it for their clock); one with an invalid value
is dead-lettered like any invalid message. Shops on live traffic do not send watermarks (the
services run on wall time there).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, ValidationError

from contracts.envelope import InvalidMessage
from contracts.types import ShortText, Timestamp

HEADER = "crm-watermark"
HEADERS = ((HEADER, b"1"),)


class Watermark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    watermark: Timestamp
    producer: ShortText


def is_watermark(headers) -> bool:
    return any(k == HEADER for k, _ in headers or ())


def encode(when: datetime, producer: str) -> bytes:
    return Watermark(watermark=when, producer=producer).model_dump_json().encode()


def decode(value: bytes | None) -> datetime:
    if value is None:
        raise InvalidMessage("watermark without a value")
    try:
        return Watermark.model_validate_json(value).watermark
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "value"
        raise InvalidMessage(f"invalid watermark: {where}: {first['msg']}") from None
