"""Play a stream of (day, event) onto Kafka with compressed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import date

from contracts import Event
from services.runtime.broker import KafkaPublisher
from services.runtime.settings import CommonSettings

# Flushed together; a few hundred keeps memory flat and the broker busy.
CHUNK = 500


async def play(
    settings: CommonSettings,
    stream: Iterable[tuple[date, Event]],
    *,
    seconds_per_day: float | None,
    progress: Callable[[date, int], None] = lambda _d, _n: None,
    stop: asyncio.Event | None = None,
) -> int:
    """Publish every event; with `seconds_per_day` None, as fast as the broker takes them."""
    publisher = KafkaPublisher(settings)
    await publisher.start()
    sent = 0
    first_day: date | None = None
    started = time.monotonic()
    pending: list[tuple[str, bytes, bytes, tuple]] = []
    current: date | None = None
    try:
        for day, event in stream:
            if stop is not None and stop.is_set():
                break
            if day != current:
                if pending:
                    await publisher.send_many(pending)
                    sent += len(pending)
                    pending = []
                    progress(current, sent)
                current = day
                first_day = first_day or day
                if seconds_per_day:
                    due = started + (day - first_day).days * seconds_per_day
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            pending.append((settings.topic(event.TOPIC), event.key(), event.to_bytes(), ()))
            if len(pending) >= CHUNK:
                await publisher.send_many(pending)
                sent += len(pending)
                pending = []
        if pending:
            await publisher.send_many(pending)
            sent += len(pending)
            progress(current, sent)
    finally:
        await publisher.stop()
    return sent
