"""The clock port: wall time in production, event time when replaying history.

Time-driven logic (inactivity, birthdays, expiry, quiet hours) asks a Clock,
never `datetime.now()`, so a replay of 1997 behaves as if it were 1997.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    partition has passed it. A source that is caught up (nothing left to read,
    as told by `caught_up`) does not hold time back: registrations stop long
    before purchases do. Without that callback, a source silent for `idle_s`
    wall seconds counts as caught up. When every source is caught up, time is
    the newest event seen. Now never goes back.
    """

    def __init__(self, start: datetime = EPOCH, idle_s: float = 5.0, monotonic=time.monotonic):
        self._now = start
        self._newest: dict[object, tuple[datetime, float]] = {}
        self.idle_s = idle_s
        self._monotonic = monotonic
        self.caught_up: Callable[[object], bool] | None = None
        # Sources assigned to us; one not seen yet holds time still until it is caught up
        # (a partition read later than its siblings must not find its events already in the past).
        self._expected: set[object] = set()

    def expect_sources(self, sources: set[object]) -> None:
        self._expected = set(sources)

    def _holds_back(self, source: object, seen: float, cutoff: float) -> bool:
        if self.caught_up is not None:
            return not self.caught_up(source)
        return seen >= cutoff

    def now(self) -> datetime:
        if self.caught_up is not None and any(
            src not in self._newest and not self.caught_up(src) for src in self._expected
        ):
            return self._now
        if self._newest:
            cutoff = self._monotonic() - self.idle_s
            behind = [t for src, (t, seen) in self._newest.items() if self._holds_back(src, seen, cutoff)]
            low = min(behind) if behind else max(t for t, _ in self._newest.values())
            if low > self._now:
                self._now = low
        return self._now

    def observe(self, event_time: datetime, source: object = None) -> None:
        prev = self._newest.get(source)
        newest = event_time if prev is None or event_time > prev[0] else prev[0]
        self._newest[source] = (newest, self._monotonic())

    def forget_sources(self) -> None:
        """After a rebalance: partitions no longer owned must not hold the watermark back."""
        self._newest.clear()
        self._expected.clear()


def make_clock(kind: str) -> Clock:
    return EventClock() if kind == "event" else WallClock()
