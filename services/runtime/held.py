"""Events that wait in a customer's state until the event clock has passed them. Pure: no I/O.

Under event time a service's clock is the low watermark of its input partitions, and nothing
orders reads across topics: after a restart one topic's backlog may be read weeks ahead of
another's. A domain whose outcome depends on the order of events from different topics keeps the
events its clock has not reached in its state and applies them once it has, oldest first, so the
order is the events' own and not the reads'. The queue is plain data (BSON, pickle):

    [[occurred_at (UTC, ISO 8601), event id, type, event JSON], ...]    sorted by (time, id)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from contracts import Event


def hold(held: Sequence[list[str]] | None, event: Event) -> list[list[str]]:
    """A new queue with `event` in (time, id) order: the same order whatever order events were read in.

    A redelivered event never gets here: the pipeline skips ids it has seen."""
    entry = [event.occurred_at.astimezone(UTC).isoformat(), str(event.event_id), event.type, event.to_bytes().decode()]
    return sorted([*(held or ()), entry], key=lambda h: (h[0], h[1]))


def first_due(held: Sequence[list[str]] | None) -> datetime | None:
    """When the oldest held event is due (its own time), or None when nothing waits."""
    return datetime.fromisoformat(held[0][0]) if held else None


def split_ready(held: Sequence[list[str]] | None, until: datetime) -> tuple[list[list[str]], list[list[str]]]:
    """(what still waits, the entries at or before `until` oldest first), unparsed."""
    held = held or []
    n = 0
    while n < len(held) and datetime.fromisoformat(held[n][0]) <= until:
        n += 1
    return list(held[n:]), list(held[:n])


def take_ready(
    held: Sequence[list[str]] | None, until: datetime, types: Mapping[str, type[Event]]
) -> tuple[list[list[str]], list[Event]]:
    """(what still waits, the events at or before `until` oldest first, parsed by their type name)."""
    rest, ready = split_ready(held, until)
    return rest, [types[name].model_validate_json(body) for _, _, name, body in ready]


def listing(held: Sequence[list[str]] | None) -> list[dict[str, str]]:
    """What waits, as a read API shows it: each event's time and type."""
    return [{"occurred_at": at, "type": kind} for at, _id, kind, _body in held or ()]
