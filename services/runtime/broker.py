"""The broker factory and the batch subscriber every service uses.

FastStream consumes (batch subscriber, Prometheus middleware, AsyncAPI);
a plain AIOKafkaProducer publishes, because FastStream's publish takes
headers as `dict[str, str]` and a dead letter must carry the original header
bytes untouched.

At-least-once, explicitly:
- `auto_offset_reset="earliest"`: a new consumer group starts at the beginning, never skips.
- `AckPolicy.MANUAL`: FastStream's ACK commits a failed batch (it is lost) and
  NACK_ON_ERROR seeks back in a tight loop. Here the batch is acked only after
  it was processed; on failure we wait with exponential backoff, then nack
  (seek back to the batch start), so the same records come again.
- A rebalance listener waits for the batch in flight before partitions go,
  then drops the state cache (another consumer may own those customers now).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry

from services.runtime.kafka import client_options
from services.runtime.records import Record
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)


class KafkaPublisher:
    """Sends many keyed messages at once and waits for every acknowledgement."""

    def __init__(self, settings: CommonSettings):
        self.producer = AIOKafkaProducer(
            **client_options(settings),
            acks="all",
            linger_ms=5,
            # Tansu (the embedded broker) has no InitProducerId, so no idempotent producer;
            # consumers dedup on event_id instead.
            enable_idempotence=False,
            max_request_size=max(settings.max_message_bytes * 2, 1_048_576),
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def send_many(self, messages: Sequence[tuple[str, bytes | None, bytes | None, tuple]]) -> None:
        futures = [
            await self.producer.send(topic, value, key=key, headers=list(headers) or None)
            for topic, key, value, headers in messages
        ]
        await asyncio.gather(*futures)

    async def send_to_every_partition(self, topics: Sequence[str], value: bytes, headers: tuple) -> None:
        """One unkeyed copy of the message on every partition of each topic (a watermark, say)."""
        futures = []
        for topic in topics:
            for p in sorted(await self.producer.partitions_for(topic)):
                futures.append(await self.producer.send(topic, value, partition=p, headers=list(headers)))
        await asyncio.gather(*futures)


def make_broker(settings: CommonSettings, service: str, registry: CollectorRegistry) -> KafkaBroker:
    opts = client_options(settings)
    bootstrap = opts.pop("bootstrap_servers")
    security = None
    if settings.kafka_security_protocol != "PLAINTEXT":
        from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

        ssl_context = opts.get("ssl_context")
        user = settings.kafka_sasl_username or ""
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
        use_ssl = settings.kafka_security_protocol.endswith("SSL")
        if settings.kafka_security_protocol == "SSL":
            security = BaseSecurity(ssl_context=ssl_context, use_ssl=True)
        else:
            cls = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}[
                settings.kafka_sasl_mechanism
            ]
            security = cls(username=user, password=password, ssl_context=ssl_context, use_ssl=use_ssl)
    return KafkaBroker(
        bootstrap,
        security=security,
        client_id=f"crm-{service}",
        middlewares=[KafkaPrometheusMiddleware(registry=registry, app_name=service, metrics_prefix="crm_faststream")],
        logger=logging.getLogger(f"faststream.{service}"),
        # Its per-batch "Received"/"Processed" lines are noise at INFO; our metrics count batches.
        log_level=logging.DEBUG,
    )


async def _raw_decoder(msg):
    # Keep bytes: the pipeline validates them and dead-letters what fails.
    return msg.body


async def _header_safe_parser(records, original):
    # FastStream decodes header values as UTF-8 before the handler; a bad header
    # must reach the pipeline (and the DLQ) instead of failing the whole batch.
    clean = tuple(
        dataclasses.replace(r, headers=tuple((k, (v or b"").decode("utf-8", "replace").encode()) for k, v in r.headers))
        for r in records
    )
    message = await original(clean)
    message.raw_message = records
    return message


class _Rebalance(ConsumerRebalanceListener):
    def __init__(
        self,
        lock: asyncio.Lock,
        on_revoke: Callable[[], None],
        on_assign: Callable[[], None],
        timeout_s: float,
        guard: asyncio.Lock | None = None,
    ):
        self.lock = lock
        self.on_revoke = on_revoke
        self.on_assign = on_assign
        self.timeout_s = timeout_s
        self.guard = guard

    async def on_partitions_revoked(self, revoked):
        # Let the work in flight finish: the batch and its commit (the subscriber holds `lock`
        # across both), and whatever else holds `guard` (e.g. messages being sent).
        held: list[asyncio.Lock] = []
        # Each lock is waited for on its own: a guard that times out (a send that hangs) must not
        # skip the wait for the batch in flight, whose cache would otherwise be dropped under it.
        for lk in (self.guard, self.lock):
            if lk is None:
                continue
            try:
                await asyncio.wait_for(lk.acquire(), self.timeout_s)
                held.append(lk)
            except TimeoutError:
                log.warning(
                    "rebalance: work still running after %.0fs; its commit may fail and it will be redelivered",
                    self.timeout_s,
                )
        try:
            self.on_revoke()
        finally:
            for lk in reversed(held):
                lk.release()
        if revoked:
            log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    async def on_partitions_assigned(self, assigned):
        self.on_assign()
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


def subscribe_batches(
    broker: KafkaBroker,
    topics: Sequence[str],
    *,
    group_id: str,
    settings: CommonSettings,
    handle: Callable[[list[Record]], Awaitable[object]],
    lock: asyncio.Lock,
    on_revoke: Callable[[], None],
    on_assign: Callable[[], None] = lambda: None,
    on_outcome: Callable[[bool], None] = lambda _ok: None,
    revoke_guard: asyncio.Lock | None = None,
):
    """Register the at-least-once batch subscriber; returns it (its `.consumer` exists after start).

    `lock` is held across processing and the offset commit, so a rebalance (which
    takes the same lock) never moves partitions between the two. `on_outcome` hears
    whether each batch succeeded (readiness follows it).
    """
    attempt = 0

    async def handler(bodies: list, msg: KafkaMessage) -> None:
        nonlocal attempt
        records = [
            Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp or 0)
            for r in msg.raw_message
        ]
        async with lock:
            try:
                await handle(records)
            except Exception:
                failed = True
                log.exception("batch of %d records failed (attempt %d)", len(records), attempt + 1)
            else:
                failed = False
                try:
                    await msg.ack()
                except KafkaError as exc:
                    # Partitions moved during the batch: the new owner gets it again and dedups.
                    log.warning("offset commit failed (%s); the partition's owner will get the batch again", exc)
        on_outcome(not failed)
        if not failed:
            attempt = 0
            return
        # Back off outside the lock, so a rebalance is not held up by the wait.
        attempt += 1
        delay = min(settings.retry_base_delay_s * 2 ** min(attempt, 10), 30.0)
        log.warning("redelivering the batch in %.1fs", delay)
        await asyncio.sleep(delay)
        try:
            await msg.nack()
        except KafkaError as exc:
            # The partitions were revoked meanwhile: nothing was committed, the new owner starts at the batch.
            log.warning("could not rewind (%s); the partition's new owner will get the batch", exc)

    sub = broker.subscriber(
        *topics,
        batch=True,
        group_id=group_id,
        auto_offset_reset="earliest",
        max_records=settings.batch_max_records,
        batch_timeout_ms=settings.batch_timeout_ms,
        ack_policy=AckPolicy.MANUAL,
        listener=_Rebalance(lock, on_revoke, on_assign, timeout_s=60.0, guard=revoke_guard),
        # Range assignment gives one consumer the same partition number of every topic it reads
        # (the topics are co-partitioned by customer id), so one customer's events from
        # shop.purchases and shop.interactions meet in one process and one cache.
        partition_assignment_strategy=(RangePartitionAssignor,),
        decoder=_raw_decoder,
        parser=_header_safe_parser,
        max_partition_fetch_bytes=max(settings.max_message_bytes * 2, 1_048_576),
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
    )
    sub(handler)
    return sub


async def consumer_lag(sub) -> list[tuple[str, int, int]]:
    """(topic, partition, lag) for the partitions this consumer owns."""
    consumer = getattr(sub, "consumer", None)
    if consumer is None:
        return []
    out = []
    with contextlib.suppress(KafkaError, AssertionError):
        parts = sorted(consumer.assignment())
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            pos = await consumer.position(tp)
            # The embedded broker's ListOffsets answers below the end (1 for a partition of 250
            # records, measured); the high watermark of the last fetch does not.
            end = max(ends[tp], consumer.highwater(tp) or 0)
            out.append((tp.topic, tp.partition, max(end - pos, 0)))
    return out
