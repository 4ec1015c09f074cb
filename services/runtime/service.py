"""Hosting one service: store, broker, pipeline, HTTP, signals. Each service's app.py composes this."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, IndexModel
from starlette.routing import BaseRoute

from contracts import registry_for
from services.runtime import logs
from services.runtime.broker import KafkaPublisher, consumer_lag, make_broker, subscribe_batches
from services.runtime.clock import Clock, make_clock
from services.runtime.http import make_app, make_server
from services.runtime.kafka import ensure_topics
from services.runtime.metrics import LagCollector, PipelineMetrics
from services.runtime.pipeline import Domain, Pipeline
from services.runtime.settings import CommonSettings, ServiceSettings
from services.runtime.statestore import StateStore

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    """What a service is: its name, what it consumes, its pure domain and its store layout."""

    name: str
    consumes: Sequence[str]
    domain: Domain
    indexes: dict[str, list[IndexModel]] = field(default_factory=dict)
    state_collection: str = "customers"


class ServiceHost:
    def __init__(
        self,
        spec: ServiceSpec,
        common: CommonSettings,
        settings: ServiceSettings,
        clock: Clock | None = None,
        routes: Sequence[BaseRoute] = (),
    ):
        self.spec = spec
        self.common = common
        self.settings = settings
        self.clock = clock or make_clock(common.clock)
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.mongo = AsyncMongoClient(common.mongo_url, tz_aware=True, serverSelectionTimeoutMS=10_000)
        self.db = self.mongo[common.db_prefix + (settings.database or spec.name)]
        self.store = StateStore(self.db[spec.state_collection])
        self.publisher = KafkaPublisher(common)
        self.broker = make_broker(common, spec.name, self.registry)
        physical = [common.topic(t) for t in spec.consumes]
        self.pipeline = Pipeline(
            service=spec.name,
            domain=spec.domain,
            registry=registry_for(*spec.consumes, max_bytes=common.max_message_bytes),
            store=self.store,
            publisher=self.publisher,
            clock=self.clock,
            topic_name=common.topic,
            dedup_window=common.dedup_window,
            retry_attempts=common.retry_attempts,
            retry_base_delay_s=common.retry_base_delay_s,
            failpoint=common.failpoint,
            metrics=self.metrics,
        )
        self.group_id = common.group(settings.group_id or f"crm-{spec.name}")
        self.subscriber = subscribe_batches(
            self.broker,
            physical,
            group_id=self.group_id,
            settings=common,
            handle=self.pipeline.handle,
            lock=self.pipeline.lock,
            on_revoke=self.store.drop_cache,
            on_outcome=self._batch_outcome,
        )
        self._lag: list[tuple[str, int, int]] = []
        self.registry.register(LagCollector(spec.name, lambda: self._lag))
        self.http = make_server(
            make_app(self.registry, self.readiness, routes, before_scrape=self._refresh_lag),
            settings.http_host,
            settings.http_port,
        )
        self._started = False
        self._failing = False
        self._stop = asyncio.Event()

    async def _refresh_lag(self) -> None:
        self._lag = await consumer_lag(self.subscriber)

    def _batch_outcome(self, ok: bool) -> None:
        self._failing = not ok

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
        await self.mongo.admin.command("ping")
        for collection, models in self.spec.indexes.items():
            if models:
                await self.db[collection].create_indexes(models)
        if self.common.create_topics:
            await ensure_topics(self.common)
        await self.publisher.start()
        await self.broker.start()
        self._started = True
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
        with contextlib.suppress(Exception):
            await self.broker.stop()
        with contextlib.suppress(Exception):
            await self.publisher.stop()
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
