"""Delivery: the wake-up index in Redis, and rounds that send what is due and record the outcomes.

The system of record for every pending message is the customer's document in
MongoDB (its jobs, and `due`: when the earliest one needs attention). Redis
holds only the index of due times, one sorted set per partition:

    <prefix>notify:wake:<partition>          member: customer id, score: due (epoch seconds, clock time)
    <prefix>notify:wake:<partition>:built    present once the set was rebuilt from MongoDB

Every store write records the new due times, which are flushed to Redis after
the write. A partition whose marker is missing (Redis lost its data, or was
never built) and every newly assigned partition are rebuilt from one
projection scan of MongoDB; so a Redis loss delays messages, it never drops
one, and the jobs' status in MongoDB keeps a message from going out twice.

A round (under the pipeline lock, so it never races a batch for the same
customer) takes the customers that are due, lets the domain move their
waiting and deferred jobs on, sends every queued job, records the outcomes,
writes once and publishes. A stop or a revocation waiting for the round makes
it start no new send and let go once what it sent is recorded. A crash between
a provider's acceptance and the write can repeat the round's messages sent so
far: the e-mail carries the same Message-ID and the SMS the same idempotency
key, so a provider that honours them (the embedded SMS gateway does) drops the
repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pymongo.asynchronous.database import AsyncDatabase
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.notify.channels import AddressError, ChannelSender, DeliveryError, Outgoing, RejectedError
from services.notify.domain import Failed, Job, NotifyDomain, Sent, contact_of, message_context
from services.notify.links import LinkSigner
from services.notify.render import Renderer, RenderError
from services.runtime.clock import WallClock
from services.runtime.crypto import LookupHasher
from services.runtime.lookups import LookupStateStore
from services.runtime.pipeline import BatchResult
from services.runtime.records import DeadLetter, Record
from services.runtime.statestore import Codec, CustomerDoc, Schedule, with_backoff

log = logging.getLogger(__name__)


class RecordingSchedule(Schedule):
    """The in-memory schedule, also remembering which due times changed since the last flush."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: dict[str, datetime | None] = {}

    def set(self, cid: str, when: datetime | None) -> None:
        super().set(cid, when)
        self.changes[cid] = when

    def clear(self) -> None:
        super().clear()
        self.changes.clear()  # the documents hold them; the next owner rebuilds from there


class NotifyStore(LookupStateStore):
    def __init__(self, db: AsyncDatabase, codec: Codec | None, hasher: LookupHasher):
        super().__init__(db["customers"], db["contact_lookup"], hasher, codec)
        self.schedule = RecordingSchedule()

    async def due_times(self) -> list[tuple[str, datetime]]:
        """Every customer with pending work and when (one projection scan)."""
        return [(d["_id"], d["due"]) async for d in self.collection.find({"due": {"$ne": None}}, {"due": 1})]


class WakeIndex:
    def __init__(self, redis: Redis, prefix: str):
        self.redis = redis
        self.prefix = prefix  # e.g. "crm:notify:wake:"

    def key(self, partition: int) -> str:
        return f"{self.prefix}{partition}"

    async def unbuilt(self, partitions: set[int]) -> set[int]:
        pipe = self.redis.pipeline(transaction=False)
        ordered = sorted(partitions)
        for p in ordered:
            pipe.exists(self.key(p) + ":built")
        found = await pipe.execute()
        return {p for p, ok in zip(ordered, found, strict=True) if not ok}

    async def rebuild(self, partitions: set[int], entries: dict[int, list[tuple[str, datetime]]]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for p in partitions:
            pipe.delete(self.key(p))
            members = {cid: when.timestamp() for cid, when in entries.get(p, [])}
            for chunk in _chunks(list(members.items()), 1000):
                pipe.zadd(self.key(p), dict(chunk))
            pipe.set(self.key(p) + ":built", str(time.time()))
        await pipe.execute()

    async def apply(self, changes: dict[str, datetime | None], partition_of: Callable[[str], int | None]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for cid, when in changes.items():
            p = partition_of(cid)
            if p is None:
                continue
            if when is None:
                pipe.zrem(self.key(p), cid)
            else:
                pipe.zadd(self.key(p), {cid: when.timestamp()})
        await pipe.execute()

    async def due(self, partitions: set[int], now: datetime, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` due customers, an equal share from each partition (none starves the others),
        and whether a partition filled its share (it may have more: go on without waiting)."""
        share = max(1, -(-limit // max(len(partitions), 1)))
        pipe = self.redis.pipeline(transaction=False)
        for p in sorted(partitions):
            pipe.zrangebyscore(self.key(p), "-inf", now.timestamp(), start=0, num=share)
        out: list[str] = []
        full = False
        for got in await pipe.execute():
            out.extend(m.decode() if isinstance(m, bytes) else m for m in got)
            full = full or len(got) >= share
        return out, full

    async def size(self, partitions: set[int]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.zcard(self.key(p))
        return sum(await pipe.execute())


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Deliverer:
    """The delivery rounds of one replica (a background job of the service host).

    A round runs in three steps, all under the host's revoke guard, so partitions never move
    (and the service never stops) while messages are out and their outcomes unrecorded:

      1. under the pipeline lock: load the due customers, let the domain decide their jobs
         again (consent, quiet hours, caps as they are now), write, publish;
      2. without the pipeline lock (batches go on): render and send the queued jobs;
      3. under the pipeline lock: record the outcomes, write, publish, dead-letter.

    Outcomes that could not be written are kept and recorded first in the next round,
    so a store error after a send does not send again.
    """

    def __init__(
        self,
        domain: NotifyDomain,
        senders: dict[str, ChannelSender],
        renderer: Renderer,
        links: LinkSigner,
        index: WakeIndex,
        *,
        email_from: str,
        concurrency: int,
        round_size: int,
        interval_s: float,
        rebuild_interval_s: float = 600.0,
        metrics=None,
    ):
        self.domain = domain
        self.senders = senders
        self.renderer = renderer
        self.links = links
        self.index = index
        self.email_from = email_from
        self.concurrency = concurrency
        self.round_size = round_size
        self.interval_s = interval_s
        self.rebuild_interval_s = rebuild_interval_s
        self.metrics = metrics
        self.wake = asyncio.Event()
        self._rebuild_all = True
        self._last_rebuild = 0.0
        self._unrecorded: list[tuple[Job, Sent | Failed, datetime]] = []
        self.host = None

    # -- the loop --------------------------------------------------------------
    async def __call__(self, host) -> None:
        self.host = host
        host.after_batch.append(lambda ok: self.wake.set())
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval_s)
            self.wake.clear()
            try:
                while await self.round():
                    pass  # more were due: go on without waiting
            except (RedisError, OSError) as exc:
                # Deliveries wait; the documents keep every pending message.
                log.warning("delivery round failed (%s); the wake-up index is rebuilt when Redis answers", exc)
                self._rebuild_all = True
            except Exception:
                log.exception("delivery round failed; retrying at the next interval")

    async def round(self) -> bool:
        """One round; whether it made progress on a full set of due customers (so go on)."""
        host = self.host
        async with host.revoke_guard:
            parts = host.owned_partitions()
            if not parts:
                return False
            if host.store.schedule.stale:  # a new assignment: the previous owner may not have flushed
                async with host.pipeline.lock:
                    # Notify has no time-driven sweep, which does both of these for the other
                    # services: start the clock where the last owner left it (under event time,
                    # with no new events, messages left queued by a stop waited for the next event),
                    # and publish outcomes a crash left in stored outboxes (else they wait for the
                    # customer's next write, maybe for ever).
                    await host.pipeline.seed_clock()
                    if flushed := await host.pipeline.flush_outboxes(host.owns):
                        log.warning("published %d events a crash had left in stored outboxes", flushed)
                # Only now: a flush that failed is tried again by the next round.
                host.store.schedule.stale = False
                self._rebuild_all = True
            if time.monotonic() - self._last_rebuild > self.rebuild_interval_s:
                self._rebuild_all = True  # also heals a Redis that lost recent writes but kept the marker
            await self.flush()
            todo = parts if self._rebuild_all else await self.index.unbuilt(parts)
            if todo:
                await self.rebuild(todo)
                self._rebuild_all = False
            now = host.clock.now()
            ids, more = await self.index.due(parts, now, self.round_size)
            if ids or self._unrecorded:
                await self.process(ids, now)
                await self.flush()
            if self.metrics is not None:
                self.metrics.scheduled.set(await self.index.size(parts))
            # One partition's backlog (09:00 local in one busy zone) goes on at once too, not a
            # share per sweep interval.
            return more

    async def flush(self) -> None:
        schedule = self.host.store.schedule
        if not schedule.changes:
            return
        changes, schedule.changes = schedule.changes, {}
        try:
            await self.index.apply(changes, self.host.partition_of)
        except BaseException:
            schedule.changes = changes | schedule.changes  # newer values win
            raise

    async def rebuild(self, partitions: set[int]) -> None:
        """The partitions' index from MongoDB. Under the lock: no write may slip between scan and index."""
        host = self.host
        async with host.pipeline.lock:
            entries: dict[int, list[tuple[str, datetime]]] = {}
            for cid, when in await host.store.due_times():
                p = host.partition_of(cid)
                if p in partitions:
                    entries.setdefault(p, []).append((cid, when))
            await self.index.rebuild(partitions, entries)
        self._last_rebuild = time.monotonic()
        log.info(
            "wake-up index rebuilt for partitions %s: %d customers with pending messages",
            sorted(partitions),
            sum(len(v) for v in entries.values()),
        )

    # -- one round's work ----------------------------------------------------
    async def process(self, ids: list[str], now: datetime) -> None:
        host, domain = self.host, self.domain
        epoch = host.assignment_epoch
        async with host.pipeline.lock:
            result = BatchResult()
            dead: list[DeadLetter] = []
            earlier, self._unrecorded = self._unrecorded, []
            try:
                docs = await self._load([c for c in ids if host.owns(c)] + [j.customer_id for j, _, _ in earlier])
                self._record(docs, earlier, result, dead)
                for cid, doc in docs.items():
                    if doc.state is not None:
                        state, derived = domain.revisit(doc.state, cid, now)
                        doc.take(state, derived)
                        result.derived.extend(derived)
                jobs = [(doc, job) for cid, doc in docs.items() for job in domain.queued(doc.state, cid)]
                self._refresh_due(docs, ids, now)
                await self._write(docs, result, dead)
            except Exception:
                self._unrecorded = earlier + self._unrecorded
                raise
            domain.in_flight -= {job.request_id for job, _, _ in earlier}

        limit = asyncio.Semaphore(self.concurrency)

        async def send(doc: CustomerDoc, job: Job) -> Sent | Failed | None:
            async with limit:
                if host.revoke_guard.wanted:
                    # A stop or a rebalance waits for this round: what has not started stays queued
                    # for the next round (this replica's or the partition's next owner's), so the
                    # round ends with what it sent recorded, instead of being cancelled with the
                    # outcomes unwritten and those messages sent again.
                    return None
                if not domain.pending(doc.state, job):
                    # Decided again while it waited for a slot (an erasure, a consent change, a
                    # stop's successor): that decision stands, and it was announced by its batch.
                    return None
                # Out from here on: batches leave it to its outcome. The document as it is now
                # (the object batches update), so an address changed meanwhile is the one used.
                domain.in_flight.add(job.request_id)
                return await self.send(doc.state, job, now)

        out = {job.request_id for _, job in jobs}
        try:
            outcomes = await asyncio.gather(*(send(doc, job) for doc, job in jobs))
            await self._record_round(jobs, outcomes, ids, now, epoch)
        finally:
            # Outcomes not written yet stay out until the next round records them.
            domain.in_flight -= out - {job.request_id for job, _, _ in self._unrecorded}

    async def _record_round(self, jobs, outcomes, ids: list[str], now: datetime, epoch: int) -> None:
        host = self.host

        async with host.pipeline.lock:
            if host.assignment_epoch != epoch:  # only if a revocation outwaited the guard
                log.error("partitions moved while %d messages were out; their outcomes are not recorded", len(jobs))
                return
            result = BatchResult()
            dead: list[DeadLetter] = []
            recorded = [
                (job, outcome, now) for (_, job), outcome in zip(jobs, outcomes, strict=True) if outcome is not None
            ]
            docs = await self._load([job.customer_id for job, _, _ in recorded])
            self._record(docs, recorded, result, dead)
            self._refresh_due(docs, [], now)
            try:
                await self._write(docs, result, dead)
            except Exception:
                self._unrecorded.extend(recorded)  # recorded first next round; nothing is sent twice
                raise
        host.metrics.observe_sweep(host.spec.name, result, len(ids))
        if any(d.due is not None and d.due <= now for d in docs.values()):
            self.wake.set()  # e.g. a fallback to the other channel, queued just now

    async def _load(self, ids: list[str]) -> dict[str, CustomerDoc]:
        host = self.host
        return await with_backoff(
            lambda: host.store.load(list(dict.fromkeys(ids))),
            attempts=host.common.retry_attempts,
            base_delay=host.common.retry_base_delay_s,
            what="store read",
        )

    def _record(self, docs, recorded, result: BatchResult, dead: list[DeadLetter]) -> None:
        for job, outcome, at in recorded:
            doc = docs[job.customer_id]
            pending = self.domain.pending(doc.state, job)
            state, derived = self.domain.record(doc.state, job, outcome, at)
            doc.take(state, derived)
            result.derived.extend(derived)
            if isinstance(outcome, Failed) and not outcome.unreachable and pending:
                dead.append(self._dead_letter(doc, job, outcome))

    def _refresh_due(self, docs: dict[str, CustomerDoc], ids: list[str], now: datetime) -> None:
        for doc in docs.values():
            due = self.domain.due(doc.state, now)
            if due != doc.due:
                doc.due, doc.dirty = due, True
        # Every id taken from the index gets its true due time written back (even when
        # unchanged, or None for customers not ours), so a stale entry cannot come back forever.
        schedule = self.host.store.schedule
        for cid in ids:
            doc = docs.get(cid)
            schedule.changes[cid] = doc.due if doc is not None else None

    async def _write(self, docs, result: BatchResult, dead: list[DeadLetter]) -> None:
        host = self.host
        common = host.common
        if dead:
            # Before the write that drops the jobs: if this fails, the next round records them again.
            result.published += await host.pipeline.publish([], dead)
        result.docs_written = await with_backoff(
            lambda: host.store.save(docs.values()),
            attempts=common.retry_attempts,
            base_delay=common.retry_base_delay_s,
            what="store write",
        )
        result.published += await host.pipeline.publish(docs.values(), [])

    async def send(self, state: dict, job: Job, now: datetime) -> Sent | Failed:
        contact = contact_of(state)
        to = contact.address(job.channel)
        started = time.perf_counter()
        try:
            ctx = message_context(state, job)
            unsubscribe = self.links.unsubscribe_url(job.customer_id, "email") if job.channel == "email" else None
            opt_out = job.channel == "sms" and job.purpose == "marketing"
            r = self.renderer.render(job.kind, ctx["locale"], ctx, unsubscribe, sms_opt_out=opt_out)
            msg = Outgoing(
                channel=job.channel,
                to=to or "",
                customer_id=job.customer_id,
                request_id=job.request_id,
                subject=r.subject,
                text=r.text,
                html=r.html,
                sms=r.sms,
                sender=self.email_from,
                message_id=f"<{job.request_id}.{job.channel}@crm.notify>",
                unsubscribe_url=unsubscribe,
                sent_at=now,
            )
            provider = await self.senders[job.channel].send(msg)
        except AddressError as exc:
            return Failed(job.channel, str(exc), permanent=True, unreachable=True, to=to)
        except (RejectedError, RenderError) as exc:
            return Failed(job.channel, str(exc), permanent=True)
        except DeliveryError as exc:
            return Failed(job.channel, str(exc), permanent=False)
        except Exception as exc:  # a bug must not lose the message: it is dead-lettered for replay
            log.exception("sending %s failed", job.request_id)
            return Failed(job.channel, f"{type(exc).__name__}: {exc}", permanent=False)
        if self.metrics is not None:
            self.metrics.send_seconds.labels(job.channel).observe(time.perf_counter() - started)
        return Sent(job.channel, provider, self._latency_ms(job))

    def _latency_ms(self, job: Job) -> float | None:
        """From the originating event (or the moment the message was allowed out) to now, on the wall clock."""
        if not isinstance(self.host.clock, WallClock):
            return None  # event time (a replay): wall-clock latency from a 1997 event means nothing
        d = job.data
        starts = [datetime.fromisoformat(t) for t in (d.get("created"), d.get("not_before"), d.get("hold_until")) if t]
        ms = max((datetime.now(UTC) - max(starts)).total_seconds() * 1000, 0.0)
        if self.metrics is not None:
            self.metrics.e2e.labels(job.channel).observe(ms / 1000)
        return ms

    def _dead_letter(self, doc: CustomerDoc, job: Job, outcome: Failed) -> DeadLetter:
        # Forget the request's event id, so that replaying the dead letter is a new attempt.
        if job.request_id in doc.seen_set:
            doc.seen_set.discard(job.request_id)
            doc.seen = [e for e in doc.seen if e != job.request_id]
            doc.dirty = True
        topic = self.host.common.topic(job.data["topic"])
        rec = Record(topic, -1, -1, doc.customer_id.encode(), job.data["raw"].encode())
        return DeadLetter(rec, f"delivery failed on {job.channel}: {outcome.error}", "notify")
