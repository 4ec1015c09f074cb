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
`{"watermark": "<ISO 8601 with offset>", "producer": "<who>"}`.

A topic that several producers write, each for its own share of the customers, carries shard
watermarks: `"shards": [k, ...], "of": n` adds that the promise holds for what those shards
(of n) send, and the partition's time is the lowest over all n (loyalty's referral hand-overs
on crm.referrals: shard k is partition k of the shop topics, whose customers' rewards come from
whichever replica owns it). It is not an event: consumers
that know the header skip it (the services use it for their clock); one with an invalid value
is dead-lettered like any invalid message. Shops on live traffic do not send watermarks (the
services run on wall time there).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contracts.envelope import InvalidMessage
from contracts.types import ShortText, Timestamp

HEADER = "crm-watermark"
HEADERS = ((HEADER, b"1"),)


class Watermark(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    watermark: Timestamp
    producer: ShortText
    shards: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=10_000)
    of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _shards_of(self) -> Watermark:
        if (self.shards is None) != (self.of is None):
            raise ValueError("shards and of come together")
        if self.of is not None and any(k >= self.of for k in self.shards or ()):
            raise ValueError(f"a shard must be below of ({self.of})")
        return self


def is_watermark(headers) -> bool:
    return any(k == HEADER for k, _ in headers or ())


def encode(when: datetime, producer: str, shards: list[int] | None = None, of: int | None = None) -> bytes:
    return (
        Watermark(watermark=when, producer=producer, shards=shards, of=of).model_dump_json(exclude_none=True).encode()
    )


def decode(value: bytes | None) -> datetime:
    return parse(value).watermark


def parse(value: bytes | None) -> Watermark:
    if value is None:
        raise InvalidMessage("watermark without a value")
    try:
        return Watermark.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "value"
        raise InvalidMessage(f"invalid watermark: {where}: {first['msg']}") from None
