"""Business and pipeline metrics (prefix `crm_`), in a registry owned by each service.

FastStream's Prometheus middleware adds message counts and latencies to the
same registry; consumer lag per partition, which it lacks, is computed here
at scrape time from the consumer's positions and high-water marks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class LagCollector(Collector):
    """Asks the consumer for (topic, partition, lag) on every scrape."""

    def __init__(self, service: str, source: Callable[[], Iterable[tuple[str, int, int]]]):
        self.service = service
        self.source = source

    def collect(self):
        g = GaugeMetricFamily(
            "crm_consumer_lag", "Messages not yet consumed, per partition", labels=["service", "topic", "partition"]
        )
        for topic, partition, lag in self.source():
            g.add_metric([self.service, topic, str(partition)], lag)
        yield g


class TallyCollector(Collector):
    """Customers per label from a store's tally (services.runtime.statestore.Tally), read at scrape
    time: no store access. Each replica reports the customers it owns; sum over instances for the
    totals. Nothing is reported until the tally has been counted since the last assignment.

    Labels are (dimension, value), or only the value when `dimension` picks one of the tally's.
    """

    def __init__(self, name: str, documentation: str, tally, *, dimension: str | None = None, label: str = ""):
        self.name, self.documentation = name, documentation
        self.tally, self.dimension = tally, dimension
        self.labels = [label] if dimension is not None else ["dimension", "value"]

    def collect(self):
        g = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for dim, values in (self.tally.snapshot() or {}).items():
            if self.dimension is None:
                for value, n in values.items():
                    g.add_metric([dim, value], n)
            elif dim == self.dimension:
                for value, n in values.items():
                    g.add_metric([value], n)
        yield g


class PipelineMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.consumed = Counter(
            "crm_events_consumed", "Valid events consumed", ["service", "topic", "type"], registry=registry
        )
        self.duplicates = Counter(
            "crm_events_duplicate", "Redelivered events ignored by dedup", ["service"], registry=registry
        )
        self.dead_letters = Counter(
            "crm_dead_letters", "Messages sent to a dead-letter topic", ["service", "topic"], registry=registry
        )
        self.published = Counter(
            "crm_events_published", "Derived events published", ["service", "topic", "type"], registry=registry
        )
        self.store_writes = Counter(
            "crm_store_writes",
            "Documents written to the store, by what caused the write (consumed events, or time: sweeps and "
            "notify's delivery rounds)",
            ["service", "cause"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "crm_batch_seconds",
            "Time to process one consumed batch",
            ["service"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = Histogram(
            "crm_batch_size",
            "Records per consumed batch",
            ["service"],
            registry=registry,
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
        )
        self.last_event_time = Gauge(
            "crm_last_event_timestamp_seconds",
            "Event time of the newest event consumed",
            ["service"],
            registry=registry,
        )
        self.clock_time = Gauge(
            "crm_clock_timestamp_seconds",
            "The service's clock: wall time, or under event time (replays) how far time has advanced",
            ["service"],
            registry=registry,
        )
        self.swept = Counter(
            "crm_sweep_customers", "Customers visited by time-driven sweeps", ["service"], registry=registry
        )
        self.last_sweep = Gauge(
            "crm_last_sweep_timestamp_seconds",
            "Wall time of the last completed sweep pass (stale means time-driven work has stopped)",
            ["service"],
            registry=registry,
        )
        self.up = Gauge("crm_service_ready", "1 when the service is ready", ["service"], registry=registry)
        self.cache_bytes = Gauge(
            "crm_state_cache_bytes",
            "Bytes of the customer documents cached packed between uses (documents in use not counted)",
            ["service"],
            registry=registry,
        )
        self.cache_documents = Gauge(
            "crm_state_cache_documents", "Customer documents in the state cache", ["service"], registry=registry
        )
        # Service-specific metrics derived from what a service publishes (e.g. win-backs per ladder step).
        self.on_derived: list[Callable[[Any], None]] = []

    def _observe_output(self, service: str, result, cause: str) -> None:
        for ev in result.derived:
            self.published.labels(service, ev.TOPIC, ev.type).inc()
            for listener in self.on_derived:
                listener(ev)
        if result.docs_written:
            self.store_writes.labels(service, cause).inc(result.docs_written)

    def observe_sweep(self, service: str, result, visited: int) -> None:
        self.swept.labels(service).inc(visited)
        self._observe_output(service, result, "time")

    def observe_batch(self, service: str, result, records, seconds: float) -> None:
        self.batch_seconds.labels(service).observe(seconds)
        self.batch_size.labels(service).observe(len(records))
        if result.duplicates:
            self.duplicates.labels(service).inc(result.duplicates)
        for (topic, etype), n in result.consumed_types.items():
            self.consumed.labels(service, topic, etype).inc(n)
        for dl in result.dead_letters:
            self.dead_letters.labels(service, dl.record.topic).inc()
        if result.newest_event_time is not None:
            self.last_event_time.labels(service).set(result.newest_event_time.timestamp())
        self._observe_output(service, result, "events")

    def watch_cache(self, service: str, store) -> None:
        """Export the size of `store`'s cache, read at each scrape."""
        self.cache_bytes.labels(service).set_function(lambda: store.packed_bytes)
        self.cache_documents.labels(service).set_function(lambda: len(store.cache))
