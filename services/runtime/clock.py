"""The clock port: wall time in production, event time when replaying history.

Time-driven logic (inactivity, birthdays, expiry, quiet hours) asks a Clock,
never `datetime.now()`, so a replay of 1997 behaves as if it were 1997.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    def now(self) -> datetime: ...

    def observe(self, event_time: datetime, source: object = None) -> None: ...

    def watermark(self, when: datetime, source: object = None) -> None: ...

    def snapshot(self) -> object: ...

    def restore(self, snapshot: object) -> None: ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def observe(self, event_time: datetime, source: object = None) -> None:
        """Wall time ignores events."""

    def watermark(self, when: datetime, source: object = None) -> None:
        """And watermarks."""

    def snapshot(self) -> object:
        """Nothing to put back: wall time is no batch's doing."""
        return None

    def restore(self, snapshot: object) -> None:
        """See `snapshot`."""


class EventClock:
    """Now is the low watermark of event time: the oldest of the newest times seen per source.

    A source is a (topic, partition). Taking the minimum keeps time-driven work
    from running ahead of partitions that are still behind (a fast replay reads
    some partitions faster than others); a birthday fires only once every
    partition has passed it. A source that is caught up (nothing left to read,
    as told by `caught_up`) does not hold time back: registrations stop long
    before purchases do. Without that callback, a source silent for `idle_s`
    wall seconds counts as caught up. When every source is caught up, time is
    the newest event seen. Now never goes back while the assignment holds (see `forget_sources`).

    A source whose producer sends watermarks (contracts/watermark.py: a replay does) is judged by
    them instead: it holds time at its watermark, or at its newest event if that is later (the
    producer promises time order), and never counts as caught up. Reading a partition to its end
    tells nothing about what its producer is writing meanwhile; the watermark does.
    """

    def __init__(self, start: datetime = EPOCH, idle_s: float = 5.0, monotonic=time.monotonic):
        self._now = self._start = start
        self._newest: dict[object, tuple[datetime, float]] = {}
        self.idle_s = idle_s
        self._monotonic = monotonic
        self.caught_up: Callable[[object], bool] | None = None
        # Sources assigned to us; one not seen yet holds time still until it is caught up
        # (a partition read later than its siblings must not find its events already in the past).
        self._expected: set[object] = set()
        self._steady: dict[object, bool] | None = None
        self._watermarks: dict[object, datetime] = {}
        self._generation = 0  # bumped by `forget_sources`: a snapshot from before does not restore

    def expect_sources(self, sources: set[object]) -> None:
        self._expected = set(sources)

    @contextmanager
    def steady(self) -> Iterator[None]:
        """Within this block each source's caught-up state is asked once and then remembered.

        For code that does not yield to the event loop (a batch's apply loop): nothing is fetched
        meanwhile, so the answers cannot change, and asking for every event of a big batch cost
        more than the events' domain logic.
        """
        self._steady = {}
        try:
            yield
        finally:
            self._steady = None

    def _is_caught_up(self, source: object) -> bool:
        assert self.caught_up is not None
        if self._steady is None:
            return self.caught_up(source)
        known = self._steady.get(source)
        if known is None:
            known = self._steady[source] = self.caught_up(source)
        return known

    def _holds_back(self, source: object, seen: float, cutoff: float) -> bool:
        if self.caught_up is not None:
            return not self._is_caught_up(source)
        return seen >= cutoff

    def now(self) -> datetime:
        marks = self._watermarks
        if self.caught_up is not None and any(
            src not in self._newest and src not in marks and not self._is_caught_up(src) for src in self._expected
        ):
            return self._now
        if self._newest or marks:
            cutoff = self._monotonic() - self.idle_s
            behind = [
                t for src, (t, seen) in self._newest.items() if src not in marks and self._holds_back(src, seen, cutoff)
            ]
            for src, w in marks.items():
                seen = self._newest.get(src)
                behind.append(w if seen is None or seen[0] < w else seen[0])
            low = min(behind) if behind else max(t for t, _ in self._newest.values())
            if low > self._now:
                self._now = low
        return self._now

    def watermark(self, when: datetime, source: object = None) -> None:
        """The source's producer promises nothing older than `when` from here on."""
        prev = self._watermarks.get(source)
        if prev is None or when > prev:
            self._watermarks[source] = when

    def observe(self, event_time: datetime, source: object = None) -> None:
        prev = self._newest.get(source)
        newest = event_time if prev is None or event_time > prev[0] else prev[0]
        self._newest[source] = (newest, self._monotonic())

    def position(self, source: object) -> tuple[datetime | None, datetime | None]:
        """(newest event time, watermark) read from the source, for its clock mark."""
        seen = self._newest.get(source)
        return (seen[0] if seen else None), self._watermarks.get(source)

    def snapshot(self) -> tuple:
        """What `restore` puts back: the time and what each source told, before a batch."""
        return self._generation, self._now, dict(self._newest), dict(self._watermarks)

    def restore(self, snapshot: tuple) -> None:
        """Back to a `snapshot` after the batch that followed it failed (it is delivered again);
        not across a rebalance (`forget_sources` since), which must not get its old sources back."""
        generation, now, newest, marks = snapshot
        if generation != self._generation:
            return
        self._now, self._newest, self._watermarks = now, dict(newest), dict(marks)

    def forget_sources(self) -> None:
        """After a rebalance: partitions no longer owned must not hold the watermark back, and time
        starts again from what the partitions now owned tell (their clock marks, then their events).

        The one place where now goes back: partitions taken over from another consumer may be
        behind the time this one had reached with its own, and their customers must not be swept
        to a day their events have not reached yet (a won-back purchase would come after the offer).
        """
        self._newest.clear()
        self._watermarks.clear()
        self._expected.clear()
        self._now = self._start
        self._generation += 1


def steady(clock: Clock):
    """The clock's `steady` block if it has one (event time), else nothing to hold."""
    hold = getattr(clock, "steady", None)
    return hold() if hold is not None else nullcontext()


def make_clock(kind: str) -> Clock:
    return EventClock() if kind == "event" else WallClock()
