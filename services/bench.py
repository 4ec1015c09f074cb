"""`crm bench`: throughput, latency, store and memory figures on the embedded stack, in one run.

Every figure comes from this run on this machine, so the ratios between them hold even on a
shared, noisy machine. Phases (each on its own topics, databases and Redis keys):

  kafka passthrough   raw aiokafka: consume a batch, produce it on, on the same broker
  store ceiling       raw bulk upserts by _id, batches of the pipeline's size, same MongoDB; then
                      by 4 clients at once, and by 4 clients taking turns as the services do
  e2e                 the four services as processes; the CDNOW replay of the first N customers
                      at full speed; done when profile, loyalty and churn have consumed every
                      shop event (lag 0). Store writes and peak RSS per service come from here.
  naive               the same shop events through what a FastStream tutorial would write: one
                      message at a time, find_one + update_one per consuming service, one
                      confirmed publish per derived event
  latency             wall clock; new customers' first purchases offered at half the e2e rate;
                      purchase to thank-you message (NotificationSent.latency_ms)
  full replay         the whole CDNOW master file at --speed max through all four services,
                      then loyalty's audit of every account (skipped with --quick)
  soak                a fixed population buying at half the e2e rate for --soak-seconds (wall
                      clock): RSS growth per service after the warm-up, lag over time
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

from contracts import watermark as wm
from services.runtime.turns import StoreTurns
from services.stack import dashboard
from services.stack.secrets import fresh
from services.stack.servers import Stack, StackError, StackSettings, read_pid
from services.stack.supervisor import Child, Supervisor

SERVICES = ("profile", "loyalty", "churn", "notify")
SHOP_CONSUMERS = ("profile", "loyalty", "churn")
BATCH = 500  # the pipeline's batch_max_records default: the store ceiling uses the same size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    """The four services as OS processes on one namespace of the bench stack."""

    def __init__(self, stack: Stack, state, namespace: str, clock: str, env: dict | None = None):
        self.namespace = namespace
        self.env = {
            **state.env(),
            **fresh(),
            "CRM_TOPIC_PREFIX": f"{namespace}.",
            "CRM_DB_PREFIX": f"{namespace}_",
            "CRM_REDIS_PREFIX": f"crm-bench:{namespace}:",
            "CRM_CLOCK": clock,
            "CRM_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.ports = {name: _free_port() for name in SERVICES}
        children = [
            Child(
                f"bench-{name}",
                [sys.executable, "-m", f"services.{name}"],
                {**self.env, f"CRM_{name.upper()}_HTTP_PORT": str(port)},
            )
            for name, port in self.ports.items()
        ]
        self.supervisor = Supervisor(
            SimpleNamespace(run_dir=stack.run_dir, log_dir=stack.log_dir), children, log=lambda _m: None
        )

    def common(self):
        from services.runtime.settings import CommonSettings

        return CommonSettings(
            kafka_bootstrap=self.env["CRM_KAFKA_BOOTSTRAP"],
            mongo_url=self.env["CRM_MONGO_URL"],
            topic_prefix=self.env["CRM_TOPIC_PREFIX"],
            db_prefix=self.env["CRM_DB_PREFIX"],
        )

    def snapshot(self) -> dashboard.Snapshot:
        return dashboard.parse(dashboard.scrape(self.ports))

    async def start(self) -> None:
        from services.runtime.kafka import ensure_topics

        await ensure_topics(self.common())
        self.supervisor.start_all()
        await self.wait(lambda s: not s.down and all(s.ready.get(n) and s.partitions.get(n) for n in SERVICES), 120)

    async def wait(self, done: Callable[[dashboard.Snapshot], bool], limit_s: float) -> dashboard.Snapshot:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            snap = await asyncio.to_thread(self.snapshot)
            if done(snap):
                return snap
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{self.namespace}: not done in {limit_s:.0f}s; logs in var/bench/log/")

    async def settle(self, limit_s: float, quiet_s: float = 5.0) -> dashboard.Snapshot:
        """Until nothing is left to read and no counter moved for quiet_s."""
        deadline, since, last = time.monotonic() + limit_s, None, None
        while time.monotonic() < deadline:
            snap = await asyncio.to_thread(self.snapshot)
            if snap.caught_up() and snap.counters() == last:
                since = since or time.monotonic()
                if time.monotonic() - since >= quiet_s:
                    return snap
            else:
                since = None
            last = snap.counters()
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{self.namespace}: did not settle in {limit_s:.0f}s")

    def rss_peak_mb(self) -> dict[str, float]:
        return self._proc_status_mb("VmHWM:")

    def rss_mb(self) -> dict[str, float]:
        return self._proc_status_mb("VmRSS:")

    def _proc_status_mb(self, field: str) -> dict[str, float]:
        out = {}
        for child in self.supervisor.children:
            try:
                status = Path(f"/proc/{child.proc.pid}/status").read_text()
            except (OSError, AttributeError):
                continue
            for line in status.splitlines():
                if line.startswith(field):
                    out[child.name.removeprefix("bench-")] = round(int(line.split()[1]) / 1024, 1)
        return out

    def pids(self) -> dict[str, int]:
        return {c.name.removeprefix("bench-"): c.proc.pid for c in self.supervisor.children if c.proc is not None}

    def stop(self) -> None:
        self.supervisor.stop_all()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (/proc/PID/stat), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _cpu_used(before: dict[str, float | None], after: dict[str, float | None], seconds: float) -> dict:
    """Cores each process used on average over `seconds` (1.0 = one core all the time)."""
    return {
        name: round((after[name] - b) / seconds, 3)
        for name, b in before.items()
        if b is not None and after.get(name) is not None
    }


def _shop_stream(customers: int) -> list:
    """(day, event) in event-time order, as the replay plays them."""
    from services.replay.cdnow import events, first_customers, read_master

    return list(events(first_customers(read_master(), customers)))


async def _publish(common, events, rate: float | None = None) -> float:
    """Publish the events (at `rate` per second, or as fast as acknowledged); returns the seconds taken."""
    from services.runtime.broker import KafkaPublisher

    publisher = KafkaPublisher(common)
    await publisher.start()
    started = time.monotonic()
    try:
        chunk = 100 if rate else BATCH
        for i in range(0, len(events), chunk):
            part = events[i : i + chunk]
            await publisher.send_many([(common.topic(e.TOPIC), e.key(), e.to_bytes(), ()) for e in part])
            if rate:
                delay = started + (i + len(part)) / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    finally:
        await publisher.stop()
    return time.monotonic() - started


# -- phases ---------------------------------------------------------------------------------------------


async def kafka_passthrough(bootstrap: str, events: list, log) -> float:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    ns = f"bench-pass-{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=False)
    await producer.start()
    try:
        futures = [await producer.send(f"{ns}.in", e.to_bytes(), key=e.key()) for e in events]
        await asyncio.gather(*futures)
        consumer = AIOKafkaConsumer(
            f"{ns}.in",
            bootstrap_servers=bootstrap,
            group_id=ns,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        moved, started = 0, time.monotonic()
        try:
            while moved < len(events):
                batch = await consumer.getmany(timeout_ms=1000, max_records=BATCH)
                records = [r for rs in batch.values() for r in rs]
                futures = [await producer.send(f"{ns}.out", r.value, key=r.key) for r in records]
                await asyncio.gather(*futures)
                if records:
                    await consumer.commit()
                moved += len(records)
            seconds = time.monotonic() - started
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    log(f"kafka passthrough: {moved:,} messages consumed and produced in {seconds:.1f}s")
    return moved / seconds


async def store_ceiling(mongo_url: str, sample: list[dict], ops: int, log, clients: int = 1, turns=None) -> float:
    """Bulk upserts by _id per second, `ops` in all, written by `clients` connections at once
    (each with `turns()`, a fresh StoreTurns, around every request when given). The connections
    are this one process's: the store sees what four services would send it, but the writers
    share one interpreter, which four service processes do not."""
    from pymongo import AsyncMongoClient, ReplaceOne

    async def writer(k: int, client) -> None:
        coll = client[db]["docs"]
        take = turns() if turns is not None else StoreTurns()
        end = (k + 1) * share
        for i in range(k * share, end, BATCH):
            docs = [{**sample[(i + j) % len(sample)], "_id": f"c{i + j}"} for j in range(min(BATCH, end - i))]
            requests = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
            async with take.turn():
                await coll.bulk_write(requests, ordered=False)

    db, share = f"bench_ceiling_{uuid.uuid4().hex[:6]}", ops // clients
    connections = [AsyncMongoClient(mongo_url) for _ in range(clients)]
    try:
        for c in connections:
            await c.admin.command("ping")
        started = time.monotonic()
        await asyncio.gather(*(writer(k, c) for k, c in enumerate(connections)))
        seconds = time.monotonic() - started
        await connections[0].drop_database(db)
    finally:
        for c in connections:
            await c.close()
    how = "" if clients == 1 else f", {clients} clients at once" + (" taking turns" if turns else "")
    log(f"store ceiling: {share * clients:,} bulk upserts by _id in {seconds:.1f}s{how}")
    return share * clients / seconds


async def naive(state, events: list, log) -> float:
    """The tutorial version: per message, for each consuming service a find_one and an update_one,
    then one confirmed publish of a derived event. No batching, no cache, no outbox."""
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker
    from pymongo import AsyncMongoClient

    ns = f"bench-naive-{uuid.uuid4().hex[:6]}"
    client = AsyncMongoClient(state.mongo_url)
    dbs = {s: client[f"{ns}_{s}"]["customers"] for s in SHOP_CONSUMERS}
    # Without FastStream's per-message log lines: they would slow the baseline down, not ours.
    broker = KafkaBroker(state.kafka_bootstrap, logger=None)
    done = asyncio.Event()
    count = 0

    @broker.subscriber(
        f"{ns}.shop.purchases",
        f"{ns}.shop.interactions",
        group_id=ns,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.ACK,
    )
    async def handle(body: dict) -> None:
        nonlocal count
        cid = body["customer_id"]
        for service, coll in dbs.items():
            doc = await coll.find_one({"_id": cid}) or {"events": 0}
            await coll.update_one(
                {"_id": cid},
                {
                    "$set": {"events": doc["events"] + 1, "last": body["occurred_at"]},
                    "$push": {"seen": body["event_id"]},
                },
                upsert=True,
            )
            derived = {"type": f"{service}.updated", "customer_id": cid, "cause": body["event_id"]}
            await broker.publish(derived, f"{ns}.crm.{service}", key=cid.encode())
        count += 1
        if count >= len(events):
            done.set()

    await broker.start()
    try:
        from services.runtime.settings import CommonSettings

        common = CommonSettings(kafka_bootstrap=state.kafka_bootstrap, topic_prefix=f"{ns}.")
        started = time.monotonic()
        await _publish(common, events)
        await asyncio.wait_for(done.wait(), timeout=1800)
        seconds = time.monotonic() - started
    finally:
        await broker.stop()
        for service in SHOP_CONSUMERS:
            await client.drop_database(f"{ns}_{service}")
        await client.close()
    log(f"naive: {len(events):,} events in {seconds:.1f}s")
    return len(events) / seconds


async def e2e(stack, state, stream: list, log) -> dict:
    from services.replay.player import play

    fleet = Fleet(stack, state, f"bench-e2e-{uuid.uuid4().hex[:6]}", "event")
    try:
        # Inside the try: a start that times out or is interrupted has already spawned the services.
        await fleet.start()
        common = fleet.common()
        shop = len(stream)
        # Where the two cores go while the phase runs: the services, the store, the broker, this process.
        servers = {n: read_pid(stack.run_dir / f"{n}.pid") for n in ("mongo", "kafka")}
        procs = {**fleet.pids(), **{n: pid for n, pid in servers.items() if pid}, "bench": os.getpid()}
        cpu_before = {n: _cpu_seconds(pid) for n, pid in procs.items()}
        started = time.monotonic()
        # As `crm up --replay cdnow --speed max` plays them: day by day, with the shop topics'
        # watermarks. Without them the event clock moved with whichever partition was behind, so
        # W (writes per event) depended on how the partitions happened to interleave.
        await play(common, stream, seconds_per_day=None)

        def consumed_all(s: dashboard.Snapshot) -> bool:
            return all(s.consumed.get(n, 0) >= shop and s.partitions.get(n) for n in SHOP_CONSUMERS) and all(
                s.lag.get(n, 1) == 0 for n in SHOP_CONSUMERS
            )

        await fleet.wait(consumed_all, 3600)
        seconds = time.monotonic() - started
        cpu = _cpu_used(cpu_before, {n: _cpu_seconds(pid) for n, pid in procs.items()}, seconds)
        log(f"e2e: {shop:,} shop events through profile, loyalty and churn in {seconds:.1f}s")
        snap = await fleet.settle(3600)
        settled = time.monotonic() - started  # before the scrape and sampling below, which are the bench's own
        log(f"e2e: every service settled (notify included) after {settled:.1f}s")
        samples = await _samples(fleet)
        writes, batches = _store_writes(samples), _batches(samples)
        sample = await _sample_docs(state.mongo_url, fleet.namespace)
        return {
            "seconds": seconds,
            "events": shop,
            "events_per_s": shop / seconds,
            "settled_seconds": settled,
            "consumed": dict(snap.consumed),
            "writes": writes,
            "batches": batches,
            "rss_mb_peak": fleet.rss_peak_mb(),
            "cpu_cores": cpu,
            "sample": sample,
        }
    finally:
        fleet.stop()


async def _samples(fleet: Fleet) -> dict[str, list]:
    """Every sample of each service's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    async with httpx.AsyncClient() as client:
        for name, port in fleet.ports.items():
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            out[name] = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    return out


def _store_writes(samples: dict[str, list]) -> dict[str, dict[str, float]]:
    """Documents written per service, by cause ("events": batches; "time": sweeps, notify's rounds)."""
    out: dict[str, dict[str, float]] = {}
    for name, found in samples.items():
        causes = out[name] = {"events": 0.0, "time": 0.0}
        for sample in found:
            if sample.name == "crm_store_writes_total":
                causes[sample.labels["cause"]] = causes.get(sample.labels["cause"], 0.0) + sample.value
    return out


def _batches(samples: dict[str, list]) -> dict[str, dict[str, float]]:
    """Consumed batches per service and their mean size: every batch costs the store a round trip
    or more whatever its size, so small batches spend the store's time on overhead."""
    out: dict[str, dict[str, float]] = {}
    for name, found in samples.items():
        n = sum(x.value for x in found if x.name == "crm_batch_size_count")
        records = sum(x.value for x in found if x.name == "crm_batch_size_sum")
        out[name] = {"batches": n, "records_per_batch": round(records / n, 1) if n else 0.0}
    return out


async def _sample_docs(mongo_url: str, ns: str) -> list[dict]:
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(mongo_url)
    try:
        docs = []
        for db, coll in (("profile", "customers"), ("loyalty", "accounts"), ("churn", "customers")):
            docs += [d async for d in client[f"{ns}_{db}"][coll].find({}).limit(200)]
        return docs
    finally:
        await client.close()


def _new_customer(cid: str, now: datetime):
    from contracts.shop import CustomerRegistered, CustomerRegisteredData

    return CustomerRegistered(
        event_id=uuid.uuid4(),
        occurred_at=now,
        producer="bench",
        customer_id=cid,
        data=CustomerRegisteredData(
            name="Bench Customer", email=f"{cid}@example.com", consents={"email": True, "sms": False}
        ),
    )


def _purchase(cid: str, now: datetime, order_id: str, total: str = "25.00"):
    from contracts.shop import PurchaseCompleted, PurchaseCompletedData, PurchaseLine

    return PurchaseCompleted(
        event_id=uuid.uuid4(),
        occurred_at=now,
        producer="bench",
        customer_id=cid,
        data=PurchaseCompletedData(
            order_id=order_id,
            store_id="bench",
            channel="online",
            currency="USD",
            total=Decimal(total),
            lines=[PurchaseLine(sku="cd-1", category="rock", quantity=1, unit_price=Decimal(total))],
        ),
    )


def _survey(cid: str, now: datetime, score: int):
    from contracts.shop import InteractionRecorded, InteractionRecordedData

    return InteractionRecorded(
        event_id=uuid.uuid4(),
        occurred_at=now,
        producer="bench",
        customer_id=cid,
        data=InteractionRecordedData(kind="survey", channel="web", score=score),
    )


async def _offer(common, rate: float, seconds: float, make: Callable[[datetime], list], every=None) -> int:
    """Publish what `make(now)` returns, paced at `rate` events per second, for `seconds`.
    `every` (if given) is awaited about once a second with the elapsed seconds."""
    from services.runtime.broker import KafkaPublisher

    publisher = KafkaPublisher(common)
    await publisher.start()
    sent, started, ticked = 0, time.monotonic(), 0
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            events = make(datetime.now(UTC))
            await publisher.send_many([(common.topic(e.TOPIC), e.key(), e.to_bytes(), ()) for e in events])
            sent += len(events)
            if every is not None and int(elapsed) > ticked:
                ticked = int(elapsed)
                await every(elapsed)
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await publisher.stop()
    return sent


async def latency(stack, state, rate: float, seconds: float, log) -> dict:
    """New customers register and buy at `rate` shop events per second; purchase to thank-you message."""
    fleet = Fleet(stack, state, f"bench-lat-{uuid.uuid4().hex[:6]}", "wall")
    try:
        await fleet.start()
        common = fleet.common()

        def newcomer(now: datetime) -> list:
            cid = f"bench-{uuid.uuid4().hex[:12]}"
            return [_new_customer(cid, now), _purchase(cid, now, f"o-{cid}")]

        sent = await _offer(common, rate, seconds, newcomer)
        await fleet.settle(1800)
        samples = await _latencies(common, "first_purchase_thanks")
        log(f"latency: {sent:,} events offered at {rate:.0f}/s for {seconds:.0f}s; {len(samples):,} thank-you messages")
        return {"offered_events_per_s": rate, "messages": len(samples), "samples_ms": samples}
    finally:
        fleet.stop()


SOAK_CUSTOMERS = 2000
SOAK_WARMUP_S = 60.0  # imports, connection pools and every customer's document cached: not growth
SOAK_SAMPLE_S = 10.0


async def soak(stack, state, rate: float, seconds: float, log) -> dict:
    """A fixed population buys (90 %) and answers surveys (10 %) at `rate` events per second.

    The population is fixed so that memory should level off: every customer's document is cached
    after the warm-up, and what grows after it (beyond their dedup windows) is a leak. RSS (VmRSS)
    and the lag summed over the services are sampled every 10 s.
    """
    import random

    fleet = Fleet(stack, state, f"bench-soak-{uuid.uuid4().hex[:6]}", "wall")
    try:
        await fleet.start()
        common = fleet.common()
        rng = random.Random(7)
        ids = [f"soak-{i:05d}" for i in range(SOAK_CUSTOMERS)]
        now = datetime.now(UTC)
        await _publish(common, [_new_customer(cid, now) for cid in ids])
        await fleet.settle(600)
        orders = iter(range(10**9))

        def activity(now: datetime) -> list:
            cid = rng.choice(ids)
            if rng.random() < 0.9:
                return [_purchase(cid, now, f"soak-{next(orders)}", f"{rng.randint(5, 120)}.00")]
            return [_survey(cid, now, rng.randint(1, 5))]

        samples: list[dict] = []

        async def sample(elapsed: float) -> None:
            if samples and elapsed - samples[-1]["t"] < SOAK_SAMPLE_S:
                return
            snap = await asyncio.to_thread(fleet.snapshot)
            cache = {name: round(b / 2**20, 1) for name, b in snap.cache_bytes.items()}
            samples.append(
                {"t": round(elapsed, 1), "rss_mb": fleet.rss_mb(), "cache_mb": cache, "lag": sum(snap.lag.values())}
            )
            if len(samples) % 6 == 0:
                log(f"soak: {elapsed:.0f}s of {seconds:.0f}s, lag {samples[-1]['lag']}, RSS {samples[-1]['rss_mb']}")

        sent = await _offer(common, rate, seconds, activity, every=sample)
        await fleet.settle(1800)
    finally:
        fleet.stop()
    return summarize_soak(samples, rate, seconds, sent)


def summarize_soak(samples: list[dict], rate: float, seconds: float, sent: int) -> dict:
    """RSS growth per service from the first sample after the warm-up to the last; lag over time.

    Lag counts as bounded when the second half's peak is no higher than the first half's plus five
    seconds of offered load: a consumer falling behind shows a lag that keeps climbing.
    """
    after = [s for s in samples if s["t"] >= SOAK_WARMUP_S] or samples
    first, last = after[0], after[-1]
    growth = {
        name: round(100 * (last["rss_mb"][name] - mb) / mb, 1)
        for name, mb in first["rss_mb"].items()
        if name in last["rss_mb"] and mb
    }
    half = [s["lag"] for s in samples if s["t"] < seconds / 2] or [0]
    second = [s["lag"] for s in samples if s["t"] >= seconds / 2] or [0]
    return {
        "seconds": seconds,
        "offered_events_per_s": round(rate, 1),
        "events": sent,
        # What the publisher kept up with: below the offered rate when it fell behind (its sends
        # wait for the broker's acknowledgements on the same two cores).
        "sent_events_per_s": round(sent / seconds, 1) if seconds else None,
        "rss_mb_after_warmup": first["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_growth_percent": growth,
        "rss_growth_under_10_percent": all(g < 10 for g in growth.values()),
        # The packed state cache's part of it (crm_state_cache_bytes): the customers' history.
        "cache_mb_after_warmup": first.get("cache_mb"),
        "cache_mb_end": last.get("cache_mb"),
        # What grew beside that history (the goal above still counts all of it): a leak shows here.
        "rss_growth_beyond_cache_percent": _beyond_cache(first, last),
        "lag_max_first_half": max(half),
        "lag_max_second_half": max(second),
        "lag_end": samples[-1]["lag"] if samples else None,
        "lag_bounded": max(second) <= max(half) + 5 * rate,
        "samples": samples,
    }


def _beyond_cache(first: dict, last: dict) -> dict[str, float] | None:
    """Per service: RSS growth minus the packed cache's growth, as a share of RSS after the warm-up."""
    if not first.get("cache_mb") or not last.get("cache_mb"):
        return None
    out = {}
    for name, mb in first["rss_mb"].items():
        if mb and name in last["rss_mb"] and name in first["cache_mb"] and name in last["cache_mb"]:
            cache_growth = last["cache_mb"][name] - first["cache_mb"][name]
            out[name] = round(100 * (last["rss_mb"][name] - mb - cache_growth) / mb, 1)
    return out


async def read_events(bootstrap: str, topic: str, limit_s: float = 300.0) -> list[dict]:
    """Every event on a topic: each partition read from its start until its position reaches the
    high watermark that fetches report (and the end offset the broker lists, where it lists one).

    "Until a fetch comes back empty" can stop early on a busy machine, and the embedded broker's
    ListOffsets answers below the end (1 for a partition holding 250 records, measured), so neither
    alone tells the end; a reader that misses events makes a comparison report what never happened.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[dict] = []
    try:
        await consumer.topics()  # metadata, so that the topic's partitions are known
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            raise LookupError(f"topic {topic} does not exist")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        listed = await consumer.end_offsets(tps)
        deadline = time.monotonic() + limit_s

        async def behind() -> bool:
            for tp in tps:
                high = consumer.highwater(tp)
                if high is None or await consumer.position(tp) < max(high, listed[tp]):
                    return True
            return False

        while await behind():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end in {limit_s:.0f}s")
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            for records in batch.values():
                out.extend(json.loads(r.value) for r in records if not wm.is_watermark(r.headers))
    finally:
        await consumer.stop()
    return out


async def _latencies(common, kind: str) -> list[float]:
    return [
        e["data"]["latency_ms"]
        for e in await read_events(common.kafka_bootstrap, common.topic("crm.notifications"))
        if e["type"] == "NotificationSent" and e["data"]["kind"] == kind and e["data"].get("latency_ms")
    ]


async def full_replay(stack, state, log) -> tuple[float, dict]:
    """Seconds until every service settled, and loyalty's audit of the books after it."""
    from services.loyalty.audit import run_audit

    fleet = Fleet(stack, state, f"bench-full-{uuid.uuid4().hex[:6]}", "event")
    try:
        await fleet.start()
        from services.replay.cdnow import events, read_master
        from services.replay.player import play

        stream = list(events(read_master()))
        started = time.monotonic()
        # As `crm up --replay cdnow --speed max` plays it: day by day, with the shop topics' watermarks.
        sent = await play(fleet.common(), stream, seconds_per_day=None)
        log(f"full replay: {sent:,} events published in {time.monotonic() - started:.0f}s; waiting")
        await fleet.settle(7200, quiet_s=10)
        seconds = time.monotonic() - started
        log(f"full replay: every service caught up after {seconds:.0f}s")
        # The whole file's books, which the test suite checks on a part of it only (its time budget).
        audit = (await run_audit(fleet.common())).as_dict()
        audit["discrepancies"] = dict(list(audit["discrepancies"].items())[:20])  # the first few, to read
        found = audit["accounts_with_discrepancies"]
        log(
            f"full replay: loyalty audit of {audit['accounts']:,} accounts, {audit['entries']:,} entries: "
            + (f"WARNING: {found} accounts with discrepancies (the first in the JSON)" if found else "books clean")
        )
        return seconds, audit
    finally:
        fleet.stop()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(customers: int, naive_events: int, latency_s: float, quick: bool, log=print, soak_s: float = 0.0) -> dict:
    """Start a stack of its own (var/bench/, free ports), measure, stop it."""
    var = Path(os.environ.get("CRM_BENCH_VAR_DIR", "var/bench"))
    stack = Stack(
        StackSettings(
            var_dir=var,
            kafka_port=_free_port(),
            mongo_port=_free_port(),
            valkey_port=_free_port(),
            smtp_port=_free_port(),
            sms_port=_free_port(),
        ),
        log=lambda _m: None,
    )
    # Every process a bench starts, by pid file: its services first, then the servers (stopping
    # the servers under running services left those retrying against nothing).
    ours = (*(f"bench-{name}" for name in SERVICES), "sms", "smtp", "valkey", "mongo", "kafka")
    held = _only_bench(var)
    try:
        stack.down(ours)  # what an interrupted or killed bench left behind in var/bench
        # Every phase writes namespaces of its own, so nothing stored is worth keeping; the store of
        # an interrupted run (1.9 GB after a full replay) took longer to open than the start-up allows.
        for left in ("mongo", "mail"):
            shutil.rmtree(var / left, ignore_errors=True)
        (var / "sms.jsonl").unlink(missing_ok=True)
        try:
            state = stack.up()
            return asyncio.run(_measure(stack, state, customers, naive_events, latency_s, quick, log, soak_s))
        finally:
            stack.down(ours)
    finally:
        os.close(held)


def _only_bench(var: Path) -> int:
    """Hold var/bench.lock for the whole run: a second bench on the same directory would stop the
    first one's servers as leftovers of an interrupted run (and its own end would stop the
    second's). An flock, so a killed bench leaves nothing to clean up."""
    import fcntl

    var.mkdir(parents=True, exist_ok=True)
    fd = os.open(var / "bench.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StackError(
            f"another crm bench is running in {var}; wait for it, or give this one a directory of its own "
            f"(CRM_BENCH_VAR_DIR=var/bench2)"
        ) from None
    return fd


async def _measure(
    stack, state, customers: int, naive_events: int, latency_s: float, quick: bool, log, soak_s: float
) -> dict:
    stream = _shop_stream(customers)
    events = [event for _day, event in stream]
    log(f"workload: the first {customers:,} CDNOW customers, {len(events):,} shop events")
    passthrough = await kafka_passthrough(state.kafka_bootstrap, events, log)
    run_e2e = await e2e(stack, state, stream, log)
    sample = run_e2e.pop("sample")
    ceiling = await store_ceiling(state.mongo_url, sample, 20_000, log)
    # The services are four clients of one store: how the embedded store serves several at once,
    # and with the turns the services take (services/runtime/turns.py).
    turns_file = stack.run_dir / "bench-ceiling.turns"
    concurrent = {
        "4_clients": await store_ceiling(state.mongo_url, sample, 10_000, log, clients=4),
        "4_clients_taking_turns": await store_ceiling(
            state.mongo_url, sample, 10_000, log, clients=4, turns=lambda: StoreTurns(turns_file)
        ),
    }
    naive_rate = await naive(state, events[:naive_events], log)
    lat = await latency(stack, state, run_e2e["events_per_s"] / 2, latency_s, log)
    replay_s, replay_audit = (None, None) if quick else await full_replay(stack, state, log)
    soaked = await soak(stack, state, run_e2e["events_per_s"] / 2, soak_s, log) if soak_s > 0 else None
    purchases = sum(1 for e in events if e.type == "PurchaseCompleted")
    writes = {s: sum(run_e2e["writes"][s].values()) for s in SERVICES}
    writes_per_event = {s: writes[s] / max(run_e2e["consumed"].get(s, 0), 1) for s in SERVICES}
    # W: store writes per shop event across the services (notify's counted against the shop events
    # that caused its work, since it consumes derived events only).
    w = sum(writes.values()) / run_e2e["events"]
    e2e_rate = run_e2e["events_per_s"]
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform},
        "workload": {"customers": customers, "shop_events": run_e2e["events"], "purchases": purchases},
        "e2e_events_per_s": round(e2e_rate, 1),
        "e2e_settled_seconds": round(run_e2e["settled_seconds"], 1),
        "naive_events_per_s": round(naive_rate, 1),
        "naive_events": naive_events,
        "store_ceiling_ops_per_s": round(ceiling, 1),
        "store_concurrent_ops_per_s": {k: round(v, 1) for k, v in concurrent.items()},
        "kafka_passthrough_events_per_s": round(passthrough, 1),
        "latency_ms_p50": _round(_percentile(lat["samples_ms"], 50)),
        "latency_ms_p99": _round(_percentile(lat["samples_ms"], 99)),
        "latency_offered_events_per_s": round(lat["offered_events_per_s"], 1),
        "latency_messages": lat["messages"],
        "store_ops_per_1000_events": {s: round(v * 1000, 1) for s, v in writes_per_event.items()},
        # The same, split by what caused the writes: consumed events, or time (sweeps, notify's rounds).
        "store_ops_per_1000_events_by_cause": {
            s: {c: round(1000 * n / max(run_e2e["consumed"].get(s, 0), 1), 1) for c, n in run_e2e["writes"][s].items()}
            for s in SERVICES
        },
        "store_writes_per_shop_event_W": round(w, 3),
        "batches": run_e2e["batches"],
        "rss_mb_peak": run_e2e["rss_mb_peak"],
        # Cores used on average from the first event published until profile, loyalty and churn had
        # consumed the last (2.0 = both cores of this machine all the time).
        "e2e_cpu_cores": run_e2e["cpu_cores"],
        "cdnow_replay_seconds": None if replay_s is None else round(replay_s, 1),
        "cdnow_replay_loyalty_audit": replay_audit,
        "soak": soaked,
        "ratios": {
            "e2e_over_naive": round(e2e_rate / naive_rate, 2),
            "e2e_times_W_over_store_ceiling": round(e2e_rate * w / ceiling, 3),
        },
        "goals": {"e2e_over_naive": ">= 10", "e2e_times_W_over_store_ceiling": ">= 0.8"},
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
