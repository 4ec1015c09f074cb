"""Play a stream of (day, event) onto Kafka with compressed time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import date

from contracts import Event, topics
from contracts import watermark as wm
from services.runtime.broker import KafkaPublisher
from services.runtime.settings import CommonSettings

# Flushed together; a few hundred keeps memory flat and the broker busy.
CHUNK = 500
PRODUCER = "cdnow-replay"


async def play(
    settings: CommonSettings,
    stream: Iterable[tuple[date, Event]],
    *,
    seconds_per_day: float | None,
    progress: Callable[[date, int], None] = lambda _d, _n: None,
    stop: asyncio.Event | None = None,
    chunk: int = CHUNK,
) -> int:
    """Publish every event; with `seconds_per_day` None, as fast as the broker takes them.

    The stream must be in event-time order. Before each day and at the end, every partition of the
    shop topics gets a watermark (contracts/watermark.py): the services' event clocks may then pass
    what was sent, and only that.
    """
    shop_topics = [settings.topic(t) for t in (topics.SHOP_PURCHASES, topics.SHOP_INTERACTIONS)]
    publisher = KafkaPublisher(settings)
    await publisher.start()
    sent = 0
    first_day: date | None = None
    started = time.monotonic()
    pending: list[tuple[str, bytes, bytes, tuple]] = []
    current: date | None = None
    newest = None
    acked = None  # the newest event time the broker has acknowledged, or of the last watermark

    async def watermark(when) -> None:
        await publisher.send_to_every_partition(shop_topics, wm.encode(when, PRODUCER), wm.HEADERS)

    try:
        for day, event in stream:
            if stop is not None and stop.is_set():
                break
            if day != current:
                if pending:
                    await publisher.send_many(pending)
                    sent += len(pending)
                    pending, acked = [], newest
                    progress(current, sent)
                # Everything before this day's first event is sent (and acknowledged).
                await watermark(event.occurred_at)
                acked = event.occurred_at
                current = day
                first_day = first_day or day
                if seconds_per_day:
                    due = started + (day - first_day).days * seconds_per_day
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            if newest is not None and event.occurred_at < newest:
                raise ValueError(f"replay stream out of time order: {event.occurred_at} after {newest}")
            newest = event.occurred_at
            pending.append((settings.topic(event.TOPIC), event.key(), event.to_bytes(), ()))
            if len(pending) >= chunk:
                await publisher.send_many(pending)
                sent += len(pending)
                pending, acked = [], newest
        if pending:
            await publisher.send_many(pending)
            sent += len(pending)
            progress(current, sent)
        if newest is not None and not (stop is not None and stop.is_set()):
            await watermark(newest)
    except Exception:
        # Nothing more comes from this replay: let the services' clocks pass what was sent, so
        # its expiry, birthdays and sweeps are not left waiting for a day that never comes.
        if acked is not None:
            with contextlib.suppress(Exception):
                await watermark(acked)
        raise
    finally:
        await publisher.stop()
    return sent
