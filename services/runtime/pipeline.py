"""The batch pipeline every stateful service runs: parse, dedup, apply, save once, publish, commit.

    records ─► parse (invalid ─► <topic>.dlq) ─► group by customer ─► load docs (cache, one $in read)
            ─► domain.apply per event (skip seen ids) ─► one bulk write ─► publish outbox + dead letters
            ─► return (the caller commits the offsets)

The domain is a pure function `apply(state, event, now) -> (state, derived events)`;
everything with I/O is here, once, for all services. Time-driven work (`sweep`)
goes the same way: `tick(state, customer_id, now)` for each customer whose due
time has come, then the same single write and publish.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from contracts import Event, InvalidMessage, Registry
from contracts import watermark as wm
from contracts.topics import dlq
from services.runtime.clock import Clock, steady
from services.runtime.logs import customer_id_var, event_id_var
from services.runtime.records import DLQ_SHA256, DLQ_TRUNCATED, DeadLetter, Record
from services.runtime.statestore import ClockMarks, CustomerDoc, OutboxEntry, StateStore, with_backoff

log = logging.getLogger(__name__)

# A customer whose tick failed is tried again this much later (clock time).
TICK_RETRY = timedelta(seconds=60)

TRUNCATED_PREFIX = 64 * 1024  # what an oversized message keeps in its dead letter


class Domain(Protocol):
    """A service's pure core. `state` is the JSON-able dict stored for the customer (None if new).

    Optional members, used when present:
      tick(state, customer_id, now) -> (state, derived)  time-driven change; return the same
                                                         state object when nothing changed
      due(state, now) -> datetime | None                 when tick next has something to do, given
                                                         that it has nothing to do before `now`
      ERASING: tuple[type[Event], ...]                   events after which the published outbox
                                                         is cleared from the store at once
      wants(event) -> bool                               False: the event is not for this service
                                                         (skipped: no dedup entry, no write)
    """

    def apply(
        self, state: dict[str, Any] | None, event: Event, now: datetime
    ) -> tuple[dict[str, Any] | None, list[Event]]: ...


class Publisher(Protocol):
    async def send_many(self, messages: Sequence[tuple[str, bytes | None, bytes | None, tuple]]) -> None:
        """Send (topic, key, value, headers) messages and return once every one is acknowledged."""


@dataclass
class BatchResult:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    published: int = 0
    docs_written: int = 0
    derived: list[Event] = field(default_factory=list)
    consumed_types: Counter = field(default_factory=Counter)
    newest_event_time: datetime | None = None
    erased: set[str] = field(default_factory=set)


class Pipeline:
    def __init__(
        self,
        *,
        service: str,
        domain: Domain,
        registry: Registry,
        registries: dict[str, Registry] | None = None,
        store: StateStore,
        publisher: Publisher,
        clock: Clock,
        topic_name=lambda t: t,
        dedup_window: int = 2000,
        retry_attempts: int = 4,
        retry_base_delay_s: float = 0.2,
        failpoint: str | None = None,
        metrics: Any = None,
        clock_marks: ClockMarks | None = None,
    ):
        self.service = service
        # Event time only: partitions' newest event times, kept in the store across owners.
        self.clock_marks = clock_marks
        self.clock_to_seed: set[tuple[str, int]] = set()
        self.domain = domain
        self.registry = registry
        # Per physical topic: an event type is accepted only on its own topic.
        self.registries = registries or {}
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.topic_name = topic_name  # logical -> physical (adds the configured prefix)
        self.dedup_window = dedup_window
        self.retry_attempts = retry_attempts
        self.retry_base_delay_s = retry_base_delay_s
        self.failpoint = failpoint
        self.metrics = metrics
        # Held by whoever changes state: the subscriber (across a batch and its offset commit)
        # and time-driven sweeps. Both touch the same cached docs; a rebalance waits for it.
        self.lock = asyncio.Lock()
        # Run at the start of every batch, under `lock` (the host warms its cache after an assignment).
        self.before_batch: Callable[[], Awaitable[None]] | None = None
        self.last_offsets: dict[tuple[str, int], int] = {}  # newest offset handled per partition
        self._due = getattr(domain, "due", None)
        self._tick = getattr(domain, "tick", None)
        self._erasing = tuple(getattr(domain, "ERASING", ()))
        self._wants = getattr(domain, "wants", None)
        # A domain whose `tick` judges everything as of its due time can have it run before each
        # event (as of the event's time), which makes its outputs independent of sweep timing.
        self._catch_up = bool(getattr(domain, "CATCH_UP_BEFORE_EVENTS", False))

    async def handle(self, records: Sequence[Record]) -> BatchResult:
        """Process one batch. The caller holds `self.lock`."""
        await self.seed_clock()
        # A batch that fails is delivered again; time must not stay where its records took it,
        # or the redelivered events would find the clock past them and skip their wait (the
        # order of topics would decide again) and unread partitions would look caught up.
        clock, offsets = self.clock.snapshot(), dict(self.last_offsets)
        try:
            return await self._handle(records)
        except BaseException:
            self.clock.restore(clock)
            self.last_offsets = offsets
            raise

    async def _handle(self, records: Sequence[Record]) -> BatchResult:
        started = time.perf_counter()
        if self.before_batch is not None:
            await self.before_batch()
        result = BatchResult(consumed=len(records))
        by_customer: dict[str, list[tuple[Event, Record]]] = defaultdict(list)
        newest: dict[tuple[str, int], datetime] = {}
        marks: dict[tuple[str, int], datetime] = {}
        for rec in records:
            src = (rec.topic, rec.partition)
            if rec.offset > self.last_offsets.get(src, -1):
                self.last_offsets[src] = rec.offset
            if rec.headers and wm.is_watermark(rec.headers):
                try:
                    when = wm.decode(rec.value)
                except InvalidMessage as exc:
                    result.dead_letters.append(DeadLetter(rec, exc.reason, self.service))
                    continue
                if src not in marks or when > marks[src]:
                    marks[src] = when
                continue
            if rec.key is None:
                # The key decides the partition, and so which replica owns the customer: an event
                # without one lands anywhere, and a replica that does not own its customer would
                # write the customer's document beside the one that does.
                reason = "no message key: the key must be the customer_id (UTF-8)"
                result.dead_letters.append(DeadLetter(rec, reason, self.service))
                continue
            try:
                event = self.registries.get(rec.topic, self.registry).parse(rec.value, rec.key)
            except InvalidMessage as exc:
                result.dead_letters.append(DeadLetter(rec, exc.reason, self.service))
                continue
            if src not in newest or event.occurred_at > newest[src]:
                newest[src] = event.occurred_at
            result.consumed_types[(rec.topic, event.type)] += 1
            if self._wants is not None and not self._wants(event):
                continue
            by_customer[event.customer_id].append((event, rec))
            if result.newest_event_time is None or event.occurred_at > result.newest_event_time:
                result.newest_event_time = event.occurred_at

        # A watermark speaks for what follows it on its partition, so the batch's last ones already
        # hold for everything after the batch: every event older than the clock is in hand.
        for src, when in marks.items():
            self.clock.watermark(when, src)
        docs = await with_backoff(
            lambda: self.store.load(by_customer.keys()),
            attempts=self.retry_attempts,
            base_delay=self.retry_base_delay_s,
            what="store read",
        )
        # In event-time order across the whole batch (Kafka gives no order across topics, and a batch
        # after a restart may span months): the clock then advances with the events, and every
        # decision sees the time it would have seen had the events come one by one.
        ordered = sorted((it for items in by_customer.values() for it in items), key=lambda it: it[0].occurred_at)
        changed: dict[str, datetime] = {}
        with steady(self.clock):
            for event, rec in ordered:
                doc = docs[event.customer_id]
                at = self._apply_event(doc, event, rec, result)
                if at is not None:
                    changed[doc.customer_id] = at
        if self._due is not None:
            for cid, at in changed.items():
                # Once per customer and batch: only the final state's next due time matters.
                doc = docs[cid]
                doc.due = self._due(doc.state, at) if doc.state is not None else None

        # Every valid event tells the time of its partition, also one applied before a crash
        # (a duplicate now) or one this service does not want.
        for src, when in newest.items():
            self.clock.observe(when, src)
        if self._tick is not None and changed:
            # What this batch made due by now (the clock moved with it: a held event it passed)
            # goes into this batch's write; the sweep would write these documents a second time.
            now = self.clock.now()
            for cid in changed:
                doc = docs[cid]
                if doc.due is not None and doc.due <= now:
                    self._tick_doc(doc, now, result)
        result.docs_written = await with_backoff(
            lambda: self.store.save(docs.values()),
            attempts=self.retry_attempts,
            base_delay=self.retry_base_delay_s,
            what="store write",
        )
        if self.clock_marks is not None and (newest or marks):
            store, position = self.clock_marks, self.clock.position  # type: ignore[attr-defined]
            positions = {src: position(src) for src in newest.keys() | marks.keys()}
            await with_backoff(lambda: store.save(positions), attempts=self.retry_attempts,
                               base_delay=self.retry_base_delay_s, what="clock marks write")  # fmt: skip
        if self.failpoint == "after_store_write" and result.docs_written:
            # Fault injection for the crash tests: die exactly between write and publish.
            log.error("failpoint after_store_write: exiting")
            os._exit(86)
        result.published = await self.publish(docs.values(), result.dead_letters)
        if result.erased:
            # Published events of an erased customer may carry personal data (sealed or not):
            # they must not wait in the stored outbox for a next write that may never come.
            await with_backoff(
                lambda: self.store.clear_outboxes([docs[c] for c in result.erased]),
                attempts=self.retry_attempts,
                base_delay=self.retry_base_delay_s,
                what="outbox trim",
            )
        if self.metrics is not None:
            self.metrics.observe_batch(self.service, result, records, time.perf_counter() - started)
        return result

    async def flush_outboxes(self, owns) -> int:
        """Publish events a crash left in stored outboxes. The caller holds `self.lock`.

        A redelivered batch republishes its customers' outboxes, but a time-driven sweep is not a
        message: a crash between its write and its publish would leave the events in the store
        until the customer's next write, maybe for ever. Run after every new assignment.
        """
        ids = await self.store.with_pending_outbox(owns)
        if not ids:
            return 0
        docs = await with_backoff(lambda: self.store.load(ids), attempts=self.retry_attempts,
                                  base_delay=self.retry_base_delay_s, what="store read")  # fmt: skip
        published = await self.publish(docs.values(), [])
        await with_backoff(lambda: self.store.clear_outboxes(docs.values()), attempts=self.retry_attempts,
                           base_delay=self.retry_base_delay_s, what="outbox trim")  # fmt: skip
        return published

    async def seed_clock(self) -> None:
        """After an assignment: start the newly owned partitions' time where their last owner left it.
        The caller holds `self.lock`."""
        if self.clock_marks is None or not self.clock_to_seed:
            return
        marks = self.clock_marks
        sources = sorted(self.clock_to_seed)
        found = await with_backoff(lambda: marks.load(sources), attempts=self.retry_attempts,
                                   base_delay=self.retry_base_delay_s, what="clock marks read")  # fmt: skip
        for src, (when, mark) in found.items():
            if when is not None:
                self.clock.observe(when, src)
            if mark is not None:
                self.clock.watermark(mark, src)
        self.clock_to_seed = set()

    async def sweep(self, customer_ids: Sequence[str], now: datetime) -> BatchResult:
        """Run the domain's time-driven `tick` for these customers. The caller holds `self.lock`."""
        result = BatchResult()
        docs = await with_backoff(
            lambda: self.store.load(customer_ids),
            attempts=self.retry_attempts,
            base_delay=self.retry_base_delay_s,
            what="store read",
        )
        for doc in docs.values():
            if doc.state is None:
                continue
            ticked = self._tick_doc(doc, now, result)
            if ticked is False:
                # Only the due time moved (e.g. new scoring rules): the schedule in memory
                # is enough; the stored value is refreshed by the next real write.
                self.store.schedule.set(doc.customer_id, doc.due)
            elif ticked is None:
                # Failed: taken off the schedule by `pop_due`, so put back, or it would wait for the
                # customer's next event or the next rebalance. A little later, not at its past due
                # time: the sweep would take it again at once, for ever, and hold the event loop.
                self.store.schedule.set(doc.customer_id, now + TICK_RETRY)
        result.docs_written = await with_backoff(
            lambda: self.store.save(docs.values()),
            attempts=self.retry_attempts,
            base_delay=self.retry_base_delay_s,
            what="store write",
        )
        result.published = await self.publish(docs.values(), [])
        if self.metrics is not None:
            self.metrics.observe_sweep(self.service, result, len(customer_ids))
        return result

    def _tick_doc(self, doc: CustomerDoc, now: datetime, result: BatchResult) -> bool | None:
        """Run the domain's `tick` on one document: True if its state changed or it derived events,
        False if only its due time moved, None if the tick failed (retried by the next sweep)."""
        token_c = customer_id_var.set(doc.customer_id)
        try:
            state, derived = self._tick(doc.state, doc.customer_id, now)  # type: ignore[misc]
        except Exception:
            # A bug for one customer must not stop every other customer's sweep.
            log.exception("tick failed; the customer is retried at the next sweep")
            return None
        finally:
            customer_id_var.reset(token_c)
        doc.due = self._due(state, now) if self._due else None
        if not doc.take(state, derived):
            return False
        result.derived.extend(derived)
        result.applied += 1
        return True

    def _apply_event(self, doc: CustomerDoc, event: Event, rec: Record, result: BatchResult) -> datetime | None:
        """Apply one event to its customer's document; the clock time if the state changed."""
        eid = str(event.event_id)
        if doc.has_seen(eid):
            result.duplicates += 1
            return None
        self.clock.observe(event.occurred_at, (rec.topic, rec.partition))
        token_e, token_c = event_id_var.set(eid), customer_id_var.set(event.customer_id)
        now = self.clock.now()
        # Not past the clock: what is due later may yet be changed by events not read so far.
        when = min(event.occurred_at, now)
        changed_at = now if self._catch_up and self._catch_up_until(doc, when, now, result) else None
        try:
            state, derived = self.domain.apply(doc.state, event, now)
        except Exception as exc:
            log.exception("processing %s failed", event.type)
            result.dead_letters.append(DeadLetter(rec, f"processing failed: {type(exc).__name__}: {exc}", self.service))
            return changed_at
        finally:
            event_id_var.reset(token_e)
            customer_id_var.reset(token_c)
        if state is not doc.state:
            changed_at = now
        doc.take(state, derived)
        if self._erasing and isinstance(event, self._erasing):
            result.erased.add(doc.customer_id)
        doc.remember(eid, self.dedup_window)
        result.derived.extend(derived)
        doc.dirty = True  # also when nothing changed: the event's id joins the dedup window
        result.applied += 1
        return changed_at

    def _catch_up_until(self, doc: CustomerDoc, when: datetime, now: datetime, result: BatchResult) -> bool:
        """Run the time-driven work that fell due before this event, as of the event's time (or
        the clock's, if that is earlier).

        Otherwise its outcome would depend on whether a sweep got there before the event was read
        (a restart, a fast replay, a partition read ahead of another), not on the events.
        """
        if doc.state is None or self._due is None:
            return False
        due = self._due(doc.state, now)
        if due is None or due > when:
            return False
        try:
            state, derived = self.domain.tick(doc.state, doc.customer_id, when)  # type: ignore[attr-defined]
        except Exception:
            log.exception("tick before an event failed; the sweep retries it")
            return False
        result.derived.extend(derived)
        return doc.take(state, derived)

    async def publish(self, docs, dead_letters: list[DeadLetter]) -> int:
        """Send the docs' pending outbox entries and these dead letters; mark the entries published.

        The docs are then done with, and the store packs them (see `StateStore.settle`)."""
        docs = list(docs)
        messages: list[tuple[str, bytes | None, bytes | None, tuple]] = []
        sent: list[tuple[CustomerDoc, OutboxEntry]] = []
        for doc in docs:
            for entry in doc.pending():
                messages.append((self.topic_name(entry.topic), entry.key, entry.value, ()))
                sent.append((doc, entry))
        for dl in dead_letters:
            physical_dlq = dlq(dl.record.topic)
            value, headers = dl.record.value, dl.headers()
            limit = getattr(self.registry, "max_bytes", None)
            if value is not None and limit is not None and len(value) > limit:
                # Refused for its size, it would not fit the dead-letter topic either (and a publish that
                # can never succeed would hold the partition): keep a prefix, the size and a digest.
                headers += (
                    (DLQ_TRUNCATED, str(len(value)).encode()),
                    (DLQ_SHA256, hashlib.sha256(value).hexdigest().encode()),
                )
                value = value[:TRUNCATED_PREFIX]
            messages.append((physical_dlq, dl.record.key, value, headers))
            log.warning(
                "dead-lettered %s[%d]@%d to %s: %s",
                dl.record.topic,
                dl.record.partition,
                dl.record.offset,
                physical_dlq,
                dl.reason,
            )
        if messages:
            await with_backoff(
                lambda: self.publisher.send_many(messages),
                attempts=self.retry_attempts,
                base_delay=self.retry_base_delay_s,
                what="publish",
                transient=(Exception,),
            )
            for doc, entry in sent:
                doc.published.add(entry.event_id)
        self.store.settle(docs)
        return len(messages)
