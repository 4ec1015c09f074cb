"""The four services as OS processes on one test namespace, as `crm up` runs them, for fault tests.

A fleet has its own SMTP server and SMS gateway (so its messages can be counted), its own topics,
databases and Redis keys, and the supervisor that restarts a killed process. `outcome()` reads what
a run ended with: ledgers, profile aggregates, risk bands and the messages customers received.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from services.bench import read_events
from services.stack import dashboard
from services.stack.secrets import fresh
from services.stack.servers import start_process
from services.stack.sinks import read_mail
from services.stack.supervisor import Child, Supervisor
from tests.support.backends import Backend, free_port

NAMES = ("profile", "loyalty", "churn", "notify")


CHURN_HISTORY = ("first", "purchase_days", "spend", "touches", "complaints", "low_scores")


@dataclass
class Outcome:
    loyalty: dict[str, dict]  # customer -> the account's balances (see _ledger)
    profile: dict[str, tuple]  # customer -> (orders, spend, categories, stage, consent)
    bands: dict[str, str | None]
    emails: Counter  # request id -> copies received by the SMTP server
    email_ids: dict[str, set[str]] = field(default_factory=dict)  # request id -> Message-IDs seen
    clocks: dict[str, str] = field(default_factory=dict)  # service -> its clock at the end
    churn: dict[str, dict] = field(default_factory=dict)  # customer -> churn's history (CHURN_HISTORY)
    about: dict[str, str] = field(default_factory=dict)  # request id -> customer and subject (for messages)
    requests: dict[str, str] = field(default_factory=dict)  # care and retention requests made (id -> what)
    outcomes: dict[str, list[str]] = field(default_factory=dict)  # request id -> notify's outcomes
    namespace: str = ""  # the run's topic prefix (to read its topics again when a comparison fails)
    sms: Counter = field(default_factory=Counter)  # request id -> lines at the gateway (it dedups by idempotency key)
    # Customers per segment, tier and band: summed over the replicas' gauges, and scanned from the stores.
    gauges: dict[str, dict] = field(default_factory=dict)
    stored_counts: dict[str, dict] = field(default_factory=dict)
    # `crm loyalty audit` over every account and its closed ledger pages; how many pages there are.
    ledger_problems: dict[str, list[str]] = field(default_factory=dict)
    ledger_pages: int = 0

    @property
    def messages(self) -> set[str]:
        return set(self.emails) | set(self.sms)


class Fleet:
    def __init__(self, backend: Backend, namespace: str, var: Path, replicas: int = 1, env: dict | None = None):
        self.namespace, self.var = namespace, var
        self.common_env = {
            "CRM_KAFKA_BOOTSTRAP": backend.kafka_bootstrap,
            "CRM_MONGO_URL": backend.mongo_url,
            "CRM_REDIS_URL": backend.redis_url,
            "CRM_TOPIC_PREFIX": f"{namespace}.",
            "CRM_DB_PREFIX": f"{namespace}_",
            "CRM_REDIS_PREFIX": f"crm-test:{namespace}:",
            "CRM_CLOCK": "event",
            "CRM_LOG_JSON": "true",
            # A killed member is noticed after this long; the survivors take its partitions over.
            "CRM_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "CRM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            # Small ledger pages, so that kills and rebalances also land while accounts close pages
            # (these customers have a handful of entries each, the default page holds 50).
            "CRM_LOYALTY_LEDGER_PAGE_ENTRIES": "10",
            **fresh(),
            **({"CRM_STORE_TURNS_FILE": backend.store_turns_file} if backend.store_turns_file else {}),
            **(env or {}),
        }
        self.smtp_port, self.sms_port = free_port(), free_port()
        self.common_env["CRM_NOTIFY_EMAIL_PRIMARY"] = f"smtp://127.0.0.1:{self.smtp_port}"
        self.common_env["CRM_NOTIFY_SMS_PRIMARY"] = f"http://127.0.0.1:{self.sms_port}/messages"
        self.ports: dict[str, int] = {}
        children = []
        for name in NAMES:
            for i in range(replicas):
                label = f"{name}-{i}"
                self.ports[label] = free_port()
                env = {**self.common_env, f"CRM_{name.upper()}_HTTP_PORT": str(self.ports[label])}
                children.append(Child(label, [sys.executable, "-m", f"services.{name}"], env))
        dirs = SimpleNamespace(run_dir=var / "run", log_dir=var / "log")
        self.supervisor = Supervisor(dirs, children, log=lambda _m: None)
        self.sinks: list[subprocess.Popen] = []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self.kills: Counter = Counter()
        self.kill_log: list[tuple[float, str]] = []
        self.trace: list[tuple[int, dict]] = []

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        sink = [sys.executable, "-m", "services.stack.sinks"]
        for name, argv in (
            ("smtp", [*sink, "smtp", "--port", str(self.smtp_port), "--dir", str(self.var / "mail")]),
            ("sms", [*sink, "sms", "--port", str(self.sms_port), "--file", str(self.var / "sms.jsonl")]),
        ):
            self.sinks.append(start_process(name, argv, run_dir=self.var / "run", log_dir=self.var / "log"))
        self.supervisor.start_all()
        self._poller.start()

    def _poll(self) -> None:
        started, last = time.monotonic(), 0.0
        while not self._stop.is_set():
            self.supervisor.poll()
            time.sleep(0.2)
            if time.monotonic() - last >= 1:
                # Each service's clock over the run: read when a comparison fails.
                last = time.monotonic()
                clocks = dashboard.parse(dashboard.scrape(dict(self.ports), timeout=0.5)).clock  # retire() edits it
                self.trace.append(
                    (
                        round(last - started),
                        {s: datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for s, t in clocks.items()},
                    )
                )

    def kill(self, label: str) -> None:
        child = next(c for c in self.supervisor.children if c.name == label)
        if child.proc is not None and child.proc.poll() is None:
            os.kill(child.proc.pid, signal.SIGKILL)
            self.kills[label.rsplit("-", 1)[0]] += 1
            self.kill_log.append((round(time.monotonic(), 1), label))

    def retire(self, label: str) -> None:
        """Kill a replica for good: the supervisor forgets it, its group rebalances to the others."""
        child = next(c for c in self.supervisor.children if c.name == label)
        self.supervisor.children.remove(child)
        if child.proc is not None:
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            self.kills[label.rsplit("-", 1)[0]] += 1
            del self.ports[label]

    def snapshot(self) -> dashboard.Snapshot:
        return dashboard.parse(dashboard.scrape(self.ports))

    def wait_settled(self, timeout: float, quiet_s: float = 8.0) -> dashboard.Snapshot:
        """Until every process is ready, owns partitions, has no lag, and no counter moved for quiet_s."""
        deadline = time.monotonic() + timeout
        since, last = None, None
        while time.monotonic() < deadline:
            snap = self.snapshot()
            # Replicas: a process may own nothing after a rebalance; the group's lag is what counts.
            ok = not snap.down and all(snap.ready.get(s) for s in snap.services) and snap.total_lag == 0
            ok = ok and all(any(snap.partitions.get(s) for s in snap.services if s.startswith(n)) for n in NAMES)
            if ok and snap.counters() == last:
                if since is not None and time.monotonic() - since >= quiet_s:
                    return snap
                since = since or time.monotonic()
            else:
                since = None
            last = snap.counters() if ok else None
            time.sleep(1)
        raise AssertionError(f"not settled in {timeout:.0f}s: {self.snapshot()}\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for path in sorted((self.var / "log").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    def stop(self) -> None:
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(5)
        self.supervisor.stop_all()
        for proc in self.sinks:
            proc.terminate()
            proc.wait(10)

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the run ended with -----------------------------------------------------------------
    async def outcome(self) -> Outcome:
        from pymongo import AsyncMongoClient

        from services.churn.store import ChurnStore
        from services.loyalty.domain import audit
        from services.loyalty.store import LoyaltyStore
        from services.profile.store import ProfileStore

        client = AsyncMongoClient(self.common_env["CRM_MONGO_URL"])
        try:
            prefix = self.common_env["CRM_DB_PREFIX"]
            loyalty = {}
            async for d in client[f"{prefix}loyalty"]["accounts"].find({}, {"s": 1}):
                loyalty[d["_id"]] = _ledger(d.get("s"))
            accounts = LoyaltyStore(client[f"{prefix}loyalty"])
            ledger_problems, ledger_pages = {}, 0
            async for cid, state in accounts.accounts():
                pages = await accounts.closed_pages(state)
                ledger_pages += len(pages)
                if problems := audit(state, pages):
                    ledger_problems[cid] = problems
            profile = {}
            fields = {f"s.{f}": 1 for f in ("purchases", "spend", "categories", "stage", "consent")}
            async for d in client[f"{prefix}profile"]["customers"].find({}, fields):
                s = d.get("s") or {}
                purchases = s.get("purchases") or {}
                profile[d["_id"]] = (
                    purchases.get("orders"),
                    purchases.get("first"),
                    purchases.get("last"),
                    json.dumps(s.get("spend"), sort_keys=True, default=str),
                    json.dumps(s.get("categories"), sort_keys=True, default=str),
                    s.get("stage"),
                    json.dumps(s.get("consent"), sort_keys=True, default=str),
                )
            bands, history = {}, {}
            async for d in client[f"{prefix}churn"]["customers"].find({}, {"s": 1}):
                st = d.get("s") or {}
                bands[d["_id"]] = (st.get("risk") or {}).get("band")
                # What the bands are computed from: every purchase and interaction counted once.
                history[d["_id"]] = {k: st.get(k) for k in CHURN_HISTORY}
            stored_counts = {
                "profile": await ProfileStore(client[f"{prefix}profile"], None, None).counts(),  # type: ignore[arg-type]
                "loyalty": {"tier": await LoyaltyStore(client[f"{prefix}loyalty"]).tiers()},
                "churn": {"bands": (await ChurnStore(client[f"{prefix}churn"]).counts())["bands"]},
            }
        finally:
            await client.close()
        emails: Counter = Counter()
        about: dict[str, str] = {}
        email_ids: dict[str, set[str]] = {}
        for message in read_mail(self.var / "mail"):
            request = message["X-CRM-Request-ID"]
            emails[request] += 1
            about[request] = f"{message['X-CRM-Customer-ID']} {message['Date']} e-mail {message['Subject']}"
            email_ids.setdefault(request, set()).add(message["Message-ID"])
        sms: Counter = Counter()
        path = self.var / "sms.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            sent = json.loads(line)
            sms[sent["request_id"]] += 1
            about[sent["request_id"]] = f"{sent['customer_id']} sms {sent['body'][:60]}"
        snap = self.snapshot()
        clocks = {s: datetime.fromtimestamp(t, UTC).isoformat() for s, t in snap.clock.items()}

        def ints(counts: dict[str, float]) -> dict[str, int]:
            return {k: int(v) for k, v in counts.items()}

        gauges = {
            "profile": {dim: ints(values) for dim, values in snap.profile.items()},
            "loyalty": {"tier": ints(snap.loyalty_tiers)},
            "churn": {"bands": ints(snap.risk_bands)},
        }
        return Outcome(
            loyalty,
            profile,
            bands,
            emails,
            email_ids=email_ids,
            clocks=clocks,
            about=about,
            sms=sms,
            churn=history,
            gauges=gauges,
            stored_counts=stored_counts,
            ledger_problems=ledger_problems,
            ledger_pages=ledger_pages,
            namespace=self.namespace,
        )


def _ledger(state: dict | None) -> dict | None:
    """An account's balances: what the customer has, owes and will lose when. Entries are not
    compared one by one: events of two topics (a registration, a purchase, a referral reward) reach
    the ledger in either order, and the entries then differ in order or split (a birthday bonus
    added when a late registration is read) while the balances are the same."""
    if state is None:
        return None
    expiring: dict[str, int] = {}
    for lot in state["lots"]:
        expiring[lot["expires_on"]] = expiring.get(lot["expires_on"], 0) + lot["remaining"]
    by_kind: dict[str, int] = dict((state.get("archived") or {}).get("points") or {})  # closed pages
    for entry in state["entries"]:
        by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0) + entry["points"]
    return {
        "balance": state["balance"],
        "debt": state["debt"],
        "tier": state["tier"],
        "downgrade": state["downgrade"],
        "expiring": {k: v for k, v in sorted(expiring.items()) if v},
        "points_by_kind": by_kind,
        "birthday_year": state.get("birthday_year"),
        "notified_lots": len(state.get("notified_lots") or []),
    }


async def read_topic(fleet: Fleet, topic: str) -> list[dict]:
    """Every event on one of the fleet's topics, from the beginning."""
    return await read_events(fleet.common_env["CRM_KAFKA_BOOTSTRAP"], f"{fleet.namespace}.{topic}")


async def churn_story(bootstrap: str, namespace: str, customer_id: str) -> list[str]:
    """What churn published about one customer, in order: band changes, retention steps, win-backs."""
    out = []
    for topic in ("crm.churn", "crm.retention"):
        for e in await read_events(bootstrap, f"{namespace}.{topic}"):
            if e["customer_id"] == customer_id:
                d = e["data"]
                what = f"{d.get('from_band')}->{d.get('to_band')}" if "to_band" in d else d.get("kind") or ""
                out.append(f"{e['occurred_at']} {e['type']} {what} {e['event_id'][:8]}")
    return sorted(out)


async def requests_and_outcomes(fleet: Fleet) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Care and retention requests made (id -> what), and notify's distinct outcomes per request."""
    made = {
        e["event_id"]: f"{e['customer_id']} {e['type']} {e['data'].get('kind')} step {e['data'].get('step')} "
        f"at {e['occurred_at']} by {e['producer']}"
        for t in ("crm.care", "crm.retention")
        for e in await read_topic(fleet, t)
    }
    outcomes: dict[str, dict[str, str]] = {}
    for e in await read_topic(fleet, "crm.notifications"):
        rid = e["data"].get("request_id")
        if rid and e["type"] in ("NotificationSent", "NotificationSuppressed", "NotificationFailed"):
            # By event id: an outcome published again after a crash (same id) is one outcome.
            what = f"{e['type']}: {e['data'].get('reason') or e['data'].get('channel') or ''}"
            outcomes.setdefault(rid, {})[e["event_id"]] = what
    return made, {rid: sorted(o.values()) for rid, o in outcomes.items()}


async def replay(fleet: Fleet, customers: int, seconds_per_day: float | None) -> int:
    from services.replay.cdnow import events, first_customers, read_master
    from services.replay.player import play
    from services.runtime.settings import CommonSettings

    common = CommonSettings(
        kafka_bootstrap=fleet.common_env["CRM_KAFKA_BOOTSTRAP"], topic_prefix=fleet.common_env["CRM_TOPIC_PREFIX"]
    )
    stream = list(events(first_customers(read_master(), customers)))
    return await play(common, stream, seconds_per_day=seconds_per_day)


async def ensure_topics(fleet: Fleet) -> None:
    from services.runtime.kafka import ensure_topics as create
    from services.runtime.settings import CommonSettings

    await create(
        CommonSettings(
            kafka_bootstrap=fleet.common_env["CRM_KAFKA_BOOTSTRAP"], topic_prefix=fleet.common_env["CRM_TOPIC_PREFIX"]
        )
    )


async def wait_settled(fleet: Fleet, timeout: float) -> dashboard.Snapshot:
    return await asyncio.to_thread(fleet.wait_settled, timeout)
