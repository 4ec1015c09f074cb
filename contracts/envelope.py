"""The envelope every message carries, and the registry that parses raw bytes.

One model per event type and schema version. A consumer looks the pair up in
the registry, so a breaking change (a new `schema_version`) can be accepted
side by side with the old one, and a version it does not know is rejected
with a reason instead of being half-understood.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.types import CustomerId, ShortText, Timestamp

# Derived event ids are uuid5 in this namespace, so the same cause always
# yields the same id and downstream dedup works across crashes and replays.
DERIVED_NAMESPACE = uuid.UUID("6f1c1f2e-8a53-4d1c-9a57-3c1f0a6d2b10")


class Payload(BaseModel):
    """Base of every `data` model: closed to unknown fields (shops get a clear error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(BaseModel):
    """The envelope. Subclasses pin `type`, `schema_version` and `data`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    TOPIC: ClassVar[str] = ""
    event_id: uuid.UUID
    type: str
    schema_version: int = Field(1, ge=1)
    occurred_at: Timestamp
    producer: ShortText
    customer_id: CustomerId
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    data: Payload

    def key(self) -> bytes:
        return self.customer_id.encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @property
    def root_id(self) -> uuid.UUID:
        """The original shop event this one descends from."""
        return self.correlation_id or self.event_id


def derived_id(cause: uuid.UUID, *parts: object) -> uuid.UUID:
    return uuid.uuid5(DERIVED_NAMESPACE, "/".join([str(cause), *map(str, parts)]))


def derive(
    cls: type[Event], cause: Event, data: Payload, *, producer: str, discriminator: object = "", occurred_at: Any = None
) -> Event:
    """Build the event that `cause` leads to, with an id that only depends on the cause."""
    return derive_from_ids(
        cls,
        cause.event_id,
        cause.root_id,
        cause.customer_id,
        data,
        producer=producer,
        discriminator=discriminator,
        occurred_at=occurred_at or cause.occurred_at,
    )


def derive_from_ids(
    cls: type[Event],
    cause_id: uuid.UUID,
    root_id: uuid.UUID,
    customer_id: str,
    data: Payload,
    *,
    producer: str,
    occurred_at: Any,
    discriminator: object = "",
) -> Event:
    """`derive` when only the cause's ids were kept (a request or a refund waiting in a state)."""
    return cls(
        event_id=derived_id(cause_id, cls.__name__, discriminator),
        type=cls.__name__,
        occurred_at=occurred_at,
        producer=producer,
        customer_id=customer_id,
        causation_id=cause_id,
        correlation_id=root_id,
        data=data,
    )


def scheduled(
    cls: type[Event],
    customer_id: str,
    data: Payload,
    *,
    producer: str,
    occasion: object,
    occurred_at: Any,
    cause: uuid.UUID | None = None,
) -> Event:
    """An event caused by time rather than by a message (a birthday, an expiry).

    Its id depends only on the customer, the type and the occasion (e.g. "birthday/1997"),
    so a sweep that runs twice, or on another replica after a rebalance, yields the same id.
    """
    return cls(
        event_id=derived_id(cause or uuid.uuid5(DERIVED_NAMESPACE, customer_id), cls.__name__, occasion),
        type=cls.__name__,
        occurred_at=occurred_at,
        producer=producer,
        customer_id=customer_id,
        causation_id=cause,
        correlation_id=cause,
        data=data,
    )


class InvalidMessage(ValueError):
    """A message that can never be processed; it goes to the dead-letter topic with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(message)"
        parts.append(f"{loc}: {e['msg']}")
    more = err.error_count() - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Registry:
    """(type, schema_version) -> model, for one topic or several."""

    models: dict[tuple[str, int], type[Event]]
    max_bytes: int = 1_000_000

    @classmethod
    def of(cls, *models: type[Event], max_bytes: int = 1_000_000) -> Registry:
        table = {}
        for m in models:
            version = m.model_fields["schema_version"].default
            table[(m.__name__, version)] = m
        return cls(table, max_bytes)

    def types(self) -> list[str]:
        return sorted({t for t, _ in self.models})

    def parse(self, raw: bytes | None, key: bytes | None = None) -> Event:
        if raw is None:
            raise InvalidMessage("empty message (tombstone)")
        if len(raw) > self.max_bytes:
            raise InvalidMessage(f"message of {len(raw)} bytes exceeds the limit of {self.max_bytes}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"not UTF-8: {exc}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidMessage(f"invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidMessage(f"the message must be a JSON object, got {type(doc).__name__}")
        etype, version = doc.get("type"), doc.get("schema_version", 1)
        if not isinstance(etype, str):
            raise InvalidMessage("missing or non-string field 'type'")
        if type(version) is not int:
            raise InvalidMessage("schema_version must be an integer")
        model = self.models.get((etype, version))
        if model is None:
            known = sorted(v for t, v in self.models if t == etype)
            if not known:
                raise InvalidMessage(f"unknown event type {etype!r}; this topic carries {', '.join(self.types())}")
            raise InvalidMessage(f"unsupported schema_version {version} for {etype} (supported: {known})")
        try:
            event = model.model_validate(doc)
        except ValidationError as exc:
            raise InvalidMessage(f"{etype}: {_describe(exc)}") from None
        if key is not None and key != event.key():
            raise InvalidMessage(
                f"message key {key.decode('utf-8', 'replace')!r} disagrees with customer_id {event.customer_id!r}"
            )
        return event
