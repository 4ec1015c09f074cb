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

    def observe(self, event_time: datetime) -> None: ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def observe(self, event_time: datetime) -> None:
        """Wall time ignores events."""


class EventClock:
    """Now is the latest event time seen (a watermark that never goes back)."""

    def __init__(self, start: datetime = EPOCH):
        self._now = start

    def now(self) -> datetime:
        return self._now

    def observe(self, event_time: datetime) -> None:
        if event_time > self._now:
            self._now = event_time


def make_clock(kind: str) -> Clock:
    return EventClock() if kind == "event" else WallClock()
