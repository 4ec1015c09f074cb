"""The clock port: wall time in production, event time when replaying history.

Time-driven logic (inactivity, birthdays, expiry, quiet hours) asks a Clock,
never `datetime.now()`, so a replay of 1997 behaves as if it were 1997.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    def now(self) -> datetime: ...

    def observe(self, event_time: datetime, source: object = None) -> None: ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def observe(self, event_time: datetime, source: object = None) -> None:
        """Wall time ignores events."""


class EventClock:
    """Now is the low watermark of event time: the oldest of the newest times seen per source.

    A source is a (topic, partition). Taking the minimum keeps time-driven work
    from running ahead of partitions that are still behind (a fast replay reads
    some partitions faster than others); a birthday fires only once every
    partition has passed it. Now never goes back.
    """

    def __init__(self, start: datetime = EPOCH):
        self._now = start
        self._newest: dict[object, datetime] = {}

    def now(self) -> datetime:
        return self._now

    def observe(self, event_time: datetime, source: object = None) -> None:
        prev = self._newest.get(source)
        if prev is not None and event_time <= prev:
            return
        self._newest[source] = event_time
        low = min(self._newest.values())
        if low > self._now:
            self._now = low

    def forget_sources(self) -> None:
        """After a rebalance: partitions no longer owned must not hold the watermark back."""
        self._newest.clear()


def make_clock(kind: str) -> Clock:
    return EventClock() if kind == "event" else WallClock()
