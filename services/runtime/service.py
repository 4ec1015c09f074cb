"""Hosting one service: store, broker, pipeline, HTTP, signals. Each service's app.py composes this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from starlette.routing import BaseRoute

from contracts import registry_for
from services.runtime import logs
from services.runtime.broker import KafkaPublisher, consumer_lag, make_broker, subscribe_batches
from services.runtime.clock import Clock, make_clock
from services.runtime.http import make_app, make_server
from services.runtime.kafka import check_copartitioned, ensure_topics
from services.runtime.metrics import LagCollector, PipelineMetrics
from services.runtime.pipeline import Domain, Pipeline
from services.runtime.settings import CommonSettings, ServiceSettings
from services.runtime.statestore import ClockMarks, Codec, StateStore, with_backoff
from services.runtime.turns import StoreTurns

log = logging.getLogger(__name__)

# How long stop() lets guarded work (notify's delivery round) finish and record. Below the 20 s that
# `crm up` gives a service to exit after SIGTERM, so the rest of stop() still runs before a kill.
GUARDED_STOP_S = 12.0


class Guard(asyncio.Lock):
    """A lock whose holder can see that someone waits for it. Held by long work outside batches
    (notify's delivery round); a stop or a revocation waits for it, and the work, seeing `wanted`,
    starts nothing new and lets go as soon as what it started has finished and been recorded."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting = 0

    @property
    def wanted(self) -> bool:
        return self._waiting > 0

    async def acquire(self) -> bool:
        self._waiting += 1
        try:
            return await super().acquire()
        finally:
            self._waiting -= 1


@dataclass
class ServiceSpec:
    """What a service is: its name, what it consumes, its pure domain and its store layout."""

    name: str
    consumes: Sequence[str]
    domain: Domain
    indexes: dict[str, list[IndexModel]] = field(default_factory=dict)
    state_collection: str = "customers"
    codec: Codec | None = None
    # Builds the state store from the service's database (a subclass adds collections of its own).
    make_store: Callable[[AsyncDatabase, Codec | None], StateStore] | None = None


Background = Callable[["ServiceHost"], Awaitable[None]]


class ServiceHost:
    def __init__(
        self,
        spec: ServiceSpec,
        common: CommonSettings,
        settings: ServiceSettings,
        clock: Clock | None = None,
        routes: Sequence[BaseRoute] | Callable[[ServiceHost], Sequence[BaseRoute]] = (),
        background: Sequence[Background] = (),
    ):
        self.spec = spec
        self.background = list(background)
        self.after_batch: list[Callable[[bool], None]] = []  # called after every batch (ok or not)
        self.on_stop: list[Callable[[], Awaitable[None]]] = []  # closes what the composition root opened
        # Held by work outside batches that must finish before partitions move (and before a stop).
        self.revoke_guard = Guard()
        self.assignment_epoch = 0  # bumped on every revocation: a cached document may be gone
        self._tasks: list[asyncio.Task] = []
        self.common = common
        self.settings = settings
        self.clock = clock or make_clock(common.clock)
        if hasattr(self.clock, "caught_up"):
            self.clock.caught_up = self._caught_up
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.mongo = AsyncMongoClient(common.mongo_url, tz_aware=True, serverSelectionTimeoutMS=10_000)
        self.db = self.mongo[common.db_prefix + (settings.database or spec.name)]
        if spec.make_store is not None:
            self.store = spec.make_store(self.db, spec.codec)
        else:
            self.store = StateStore(self.db[spec.state_collection], codec=spec.codec)
        self.turns = turns = StoreTurns(common.store_turns_file)
        self.store.turns = turns
        self.metrics.watch_cache(spec.name, self.store)
        self.publisher = KafkaPublisher(common)
        self.broker = make_broker(common, spec.name, self.registry)
        physical = [common.topic(t) for t in spec.consumes]
        self._home_topic = physical[0]
        self.pipeline = Pipeline(
            service=spec.name,
            domain=spec.domain,
            registry=registry_for(*spec.consumes, max_bytes=common.max_message_bytes),
            registries={common.topic(t): registry_for(t, max_bytes=common.max_message_bytes) for t in spec.consumes},
            store=self.store,
            publisher=self.publisher,
            clock=self.clock,
            topic_name=common.topic,
            dedup_window=common.dedup_window,
            retry_attempts=common.retry_attempts,
            retry_base_delay_s=common.retry_base_delay_s,
            failpoint=common.failpoint,
            metrics=self.metrics,
            # Wall time needs no marks: it does not come from the events.
            clock_marks=ClockMarks(self.db["clock_marks"], turns) if hasattr(self.clock, "expect_sources") else None,
        )
        self.group_id = common.group(settings.group_id or f"crm-{spec.name}")
        self.subscriber = subscribe_batches(
            self.broker,
            physical,
            group_id=self.group_id,
            settings=common,
            handle=self.pipeline.handle,
            lock=self.pipeline.lock,
            on_revoke=self._on_revoke,
            on_assign=self._on_assign,
            on_outcome=self._batch_outcome,
            revoke_guard=self.revoke_guard,
        )
        self._lag: list[tuple[str, int, int]] = []
        self.registry.register(LagCollector(spec.name, lambda: self._lag))
        self._wake = asyncio.Event()
        self.http = make_server(
            make_app(
                self.registry,
                self.readiness,
                routes(self) if callable(routes) else routes,
                before_scrape=self._refresh_lag,
            ),
            settings.http_host,
            settings.http_port,
        )
        self._started = False
        self._failing = False
        self._stop = asyncio.Event()
        self._warm_needed = False  # set by an assignment; the next batch or sweep fills the cache
        self._reassigning = False  # from a revocation to the next assignment
        self.pipeline.before_batch = self._warm_cache

    async def _refresh_lag(self) -> None:
        self._lag = await consumer_lag(self.subscriber)
        self.metrics.clock_time.labels(self.spec.name).set(self.clock.now().timestamp())

    def _caught_up(self, source: tuple[str, int]) -> bool:
        """Whether this partition has nothing left to read (as of the last fetch's high watermark)."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None:
            return False
        tp = TopicPartition(*source)
        try:
            high = consumer.highwater(tp)
        except (AssertionError, KeyError):
            return True  # no longer assigned: it must not hold time back
        if high is None:
            return False  # not fetched yet: unknown, so it holds time back
        last = self.pipeline.last_offsets.get(source)
        if last is not None:
            return last + 1 >= high
        # Nothing handed to us yet: caught up only if the consumer's position is already at the end.
        position = _fetch_position(consumer, tp)
        return position is not None and position >= high

    def _on_revoke(self) -> None:
        self.assignment_epoch += 1
        self._reassigning = True
        self.store.drop_cache()

    def _on_assign(self) -> None:
        self._reassigning = False
        self.store.schedule.stale = True
        self._warm_needed = True
        forget = getattr(self.clock, "forget_sources", None)
        if forget is not None:
            forget()
        expect = getattr(self.clock, "expect_sources", None)
        consumer = getattr(self.subscriber, "consumer", None)
        if expect is not None and consumer is not None:
            assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            expect(assigned)
            self.pipeline.clock_to_seed = assigned

    async def _warm_cache(self) -> None:
        """After an assignment, cache the owned customers' documents in one scan. Caller holds the pipeline lock."""
        if not self._warm_needed or not self.owned_partitions():
            return
        epoch, started = self.assignment_epoch, time.monotonic()
        n = await with_backoff(
            lambda: self.store.warm(self.owns),
            attempts=self.common.retry_attempts,
            base_delay=self.common.retry_base_delay_s,
            what="cache warm-up",
        )
        if self.assignment_epoch != epoch:
            # Revoked meanwhile (a rebalance that outwaited the lock): what was read may not be ours.
            self.store.complete = False
            return
        self._warm_needed = False
        if n is None:
            log.info("cache warm-up: the owned documents exceed the cache; customers are read when needed")
        else:
            log.info("cache warm-up: %d documents in %.2fs", n, time.monotonic() - started)

    def partition_of(self, customer_id: str) -> int | None:
        """The partition the producer's partitioner puts this customer in (None before metadata).

        Consumed topics are co-partitioned (same partition count, range assignment),
        so the first topic decides for all.
        """
        consumer = getattr(self.subscriber, "consumer", None)
        parts = consumer.partitions_for_topic(self._home_topic) if consumer is not None else None
        if not parts:
            return None
        ordered = sorted(parts)
        return ordered[(murmur2(customer_id.encode()) & 0x7FFFFFFF) % len(ordered)]

    def owned_partitions(self) -> set[int]:
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None or self._reassigning:
            # Between a revocation and the next assignment the consumer still reports the old
            # partitions: work outside batches (notify's rounds) must not take them for ours.
            return set()
        return {tp.partition for tp in consumer.assignment() if tp.topic == self._home_topic}

    def owns(self, customer_id: str) -> bool:
        """Whether this replica owns the customer (its partition is assigned to us)."""
        p = self.partition_of(customer_id)
        return p is not None and p in self.owned_partitions()

    async def sweep_once(self) -> int:
        """Tick every owned customer whose due time has come (clock time); returns how many."""
        if not self.owned_partitions():
            # Nothing owned, or between a revocation and the next assignment: a schedule rebuilt
            # now would own nobody, and the assignment's own rebuild would be lost to it.
            return 0
        store, total = self.store, 0
        try:
            while True:
                async with self.pipeline.lock:
                    if self._failing:
                        # A failed batch waits for redelivery: its events are read (and may have
                        # moved the clock, watermarks a day at a time) but not applied yet.
                        break
                    await self.pipeline.seed_clock()
                    await self._warm_cache()
                    if store.schedule.stale:
                        epoch = self.assignment_epoch
                        n = await store.rebuild_schedule(self.owns)
                        if self.assignment_epoch != epoch:
                            # Revoked during the scan (a rebalance that outwaited the lock): part of
                            # it was judged by the old assignment. Start over at the next pass.
                            store.drop_cache()
                            break
                        log.info("schedule rebuilt: %d customers owned", n)
                        if flushed := await self.pipeline.flush_outboxes(self.owns):
                            log.warning("published %d events a crash had left in stored outboxes", flushed)
                    ids = store.schedule.pop_due(self.clock.now(), self.common.batch_max_records)
                    if not ids:
                        break
                    await self.pipeline.sweep(ids, self.clock.now())
                total += len(ids)
        except Exception:
            # Popped customers lost their due time; the next pass rebuilds the schedule from the store.
            store.schedule.stale = True
            raise
        self.metrics.last_sweep.labels(self.spec.name).set(time.time())
        return total

    async def _sweep_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.common.sweep_interval_s)
            self._wake.clear()
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed; retrying at the next interval")

    def _batch_outcome(self, ok: bool) -> None:
        self._failing = not ok
        for hook in self.after_batch:
            hook(ok)
        # Under event time the clock moves with the batches: sweep as soon as something fell due,
        # so a fast replay does not leave birthdays and follow-ups a day behind.
        nxt = self.store.schedule.next_due()
        if nxt is not None and nxt <= self.clock.now():
            self._wake.set()

    def readiness(self) -> tuple[bool, dict]:
        """Not ready before start, or while batches fail (a store or broker outage being retried)."""
        consumer = getattr(self.subscriber, "consumer", None)
        ready = self._started and consumer is not None and not self._failing
        return ready, {
            "service": self.spec.name,
            "partitions": len(consumer.assignment()) if consumer else 0,
            "failing": self._failing,
        }

    async def start(self) -> None:
        self.turns.check()
        await self.mongo.admin.command("ping")
        for collection, models in self.spec.indexes.items():
            if models:
                await self.db[collection].create_indexes(models)
        if self.common.create_topics:
            await ensure_topics(self.common)
        await check_copartitioned(self.common, [self.common.topic(t) for t in self.spec.consumes])
        await self.publisher.start()
        await self.broker.start()
        self._started = True
        if hasattr(self.spec.domain, "tick"):
            self._tasks.append(asyncio.create_task(self._sweep_loop(), name="sweep"))
        for job in self.background:
            self._tasks.append(asyncio.create_task(job(self), name=getattr(job, "__name__", "background")))
        self.metrics.up.labels(self.spec.name).set(1)
        log.info(
            "%s started: consuming %s as group %s, http on %s:%d",
            self.spec.name,
            ", ".join(self.spec.consumes),
            self.group_id,
            self.settings.http_host,
            self.settings.http_port,
        )

    async def stop(self) -> None:
        self.metrics.up.labels(self.spec.name).set(0)
        self._started = False
        # Let guarded work (e.g. messages being sent) finish and record before it is cancelled.
        try:
            await asyncio.wait_for(self.revoke_guard.acquire(), GUARDED_STOP_S)
            guarded = True
        except TimeoutError:
            log.warning("stopping while guarded work still runs after %.0fs", GUARDED_STOP_S)
            guarded = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if guarded:
            self.revoke_guard.release()  # the broker's stop revokes partitions, which takes it
        with contextlib.suppress(Exception):
            await self.broker.stop()
        with contextlib.suppress(Exception):
            await self.publisher.stop()
        for close in self.on_stop:
            with contextlib.suppress(Exception):
                await close()
        await self.mongo.close()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; then stop consuming, finish the batch in flight, close."""
        logs.configure(self.spec.name, self.common.log_level, self.common.log_json)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        http_task = asyncio.create_task(self.http.serve(), name="http")
        try:
            await self.start()
            await self._stop.wait()
        finally:
            log.info("%s stopping", self.spec.name)
            await self.stop()
            self.http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, 5)


def _fetch_position(consumer, tp: TopicPartition) -> int | None:
    """The consumer's position without awaiting (aiokafka only offers the awaitable `position()`).

    Reads aiokafka's partition state, as `position()` itself does; aiokafka is pinned below 0.15.
    """
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return state.position if state is not None and state.has_valid_position else None
    except (AttributeError, KeyError):
        return None
