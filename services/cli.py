"""The `crm` command: embedded stack, running everything, dead letters, contracts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from services.churn.transactions import FORMATS
from services.runtime.kafka import TopicNotFound
from services.stack.servers import Stack, StackError, StackSettings


def _stack() -> Stack:
    return Stack(StackSettings())


def cmd_stack(args: argparse.Namespace) -> int:
    stack = _stack()
    if args.action == "up":
        state = stack.up()
        print(f"stack ready: kafka {state.kafka_bootstrap}, mongo {state.mongo_url}, redis {state.redis_url}")
        _ensure_topics(state)
    elif args.action == "down":
        from services.stack.supervisor import stop_services

        stop_services(stack)
        stack.down()
        print("stack stopped")
    else:
        for name, status, url in stack.status():
            print(f"{name:8} {status:22} {url}")
    return 0


def _ensure_topics(state) -> None:
    from services.runtime.kafka import ensure_topics, partition_counts
    from services.runtime.settings import CommonSettings

    common = CommonSettings(kafka_bootstrap=state.kafka_bootstrap)
    created = asyncio.run(ensure_topics(common))
    if created:
        counts = asyncio.run(partition_counts(common, created))
        print(f"created {len(created)} topics with {', '.join(map(str, sorted(set(counts.values()))))} partitions")


async def _empty_store(state, services) -> list[str]:
    """Drop the services' databases (and, on the embedded Redis only, our keys); returns the databases dropped."""
    import redis.asyncio as redis
    from pymongo import AsyncMongoClient

    from services.runtime.cache import delete_keys
    from services.runtime.settings import CommonSettings

    common = CommonSettings(kafka_bootstrap=state.kafka_bootstrap, mongo_url=state.mongo_url, redis_url=state.redis_url)
    if not common.db_prefix:
        return []  # without our prefix a database name could be anyone's
    # As the service host names them (`CRM_<SERVICE>_DATABASE` overrides the service's name).
    names = [common.db_prefix + (os.environ.get(f"CRM_{name.upper()}_DATABASE") or name) for name in services]
    client = AsyncMongoClient(common.mongo_url, serverSelectionTimeoutMS=10_000)
    try:
        present = set(await client.list_database_names())
        dropped = [name for name in names if name in present]
        for name in dropped:
            await client.drop_database(name)
    finally:
        await client.close()
    if state.redis_embedded and common.redis_prefix:
        # A shared Redis keeps its keys: ours there are only hints rebuilt from the store.
        r = redis.Redis.from_url(common.redis_url)
        try:
            await delete_keys(r, common.redis_prefix)
        finally:
            await r.aclose()
    return dropped


async def _topic_count(bootstrap: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    from services.runtime.kafka import client_options
    from services.runtime.settings import CommonSettings

    admin = AIOKafkaAdminClient(**client_options(CommonSettings(kafka_bootstrap=bootstrap)), request_timeout_ms=10_000)
    await admin.start()
    try:
        return len(await admin.list_topics())
    finally:
        await admin.close()


def _speed(value: str) -> float | None:
    """Seconds of wall time per day of event time: `--speed 1` is one day per second, `max` is no waiting."""
    if value == "max":
        return None
    try:
        days_per_second = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--speed takes days per second (e.g. 1, 7, 0.5) or 'max', not {value!r}"
        ) from None
    if days_per_second <= 0:
        raise argparse.ArgumentTypeError("--speed must be positive")
    return 1.0 / days_per_second


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


class _Replay(threading.Thread):
    """Plays CDNOW in its own event loop while the supervisor keeps the services alive."""

    def __init__(self, common, seconds_per_day: float | None, customers: int | None = None):
        super().__init__(name="replay", daemon=True)
        self.common = common
        self.seconds_per_day = seconds_per_day
        self.customers = customers
        self.sent = 0
        self.day = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._stop = None
        self._loop = None

    def run(self) -> None:
        from services.replay.cdnow import events, first_customers, read_master
        from services.replay.player import play

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def progress(day, sent):
                self.day, self.sent = day, sent

            await play(
                self.common,
                events(first_customers(read_master(), self.customers)),
                seconds_per_day=self.seconds_per_day,
                progress=progress,
                stop=self._stop,
            )

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the supervisor loop
            self.error = exc
        finally:
            self.finished.set()

    def stop(self) -> None:
        if self.finished.is_set() or self._loop is None or self._stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing left to stop
            self._loop.call_soon_threadsafe(self._stop.set)


def cmd_up(args: argparse.Namespace) -> int:
    from services.stack.supervisor import SERVICES, Supervisor, available_services

    stack = _stack()
    names = available_services()
    state = stack.up()
    # The embedded broker keeps nothing between runs: a store left by an earlier run would hold
    # customers, clocks and watermarks of a stream that is gone, and the new replay would first
    # sweep them all (an earlier run's 11,000 accounts stalled a 200-customer replay).
    fresh_broker = asyncio.run(_topic_count(state.kafka_bootstrap)) == 0
    _ensure_topics(state)
    if args.replay and fresh_broker and (dropped := asyncio.run(_empty_store(state, SERVICES))):
        print(f"a new replay on an empty broker: emptied the previous run's store ({', '.join(dropped)})")
    from services.stack.secrets import local_secrets

    extra_env = local_secrets(stack.var)
    if args.replay:
        extra_env["CRM_CLOCK"] = "event"
    live = None
    if sys.stdout.isatty() and not args.plain:
        from rich.console import Console
        from rich.live import Live

        # Supervisor messages print above the live tables (rich redirects stdout while live).
        live = Live(console=Console(), refresh_per_second=2, transient=False)
    elif not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "120")  # rich's tables in logs and pipes: wide enough for the panels
    supervisor = Supervisor.for_services(stack, state, names, extra_env=extra_env)
    stop = False

    def on_signal(signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start_all()
    if not names:
        print("no service packages found yet; the stack runs alone")
    replay = None
    if args.replay:
        from services.runtime.settings import CommonSettings

        replay = _Replay(CommonSettings(kafka_bootstrap=state.kafka_bootstrap), args.speed, args.customers)
        replay.start()
        pace = "as fast as possible" if args.speed is None else f"{1 / args.speed:g} day(s)/s"
        print(f"replaying CDNOW ({pace}{f', first {args.customers:,} customers' if args.customers else ''})")
    print("running; Ctrl-C stops everything")
    ports = {n: int(os.environ.get(f"CRM_{n.upper()}_HTTP_PORT", SERVICES[n])) for n in names}
    started = time.monotonic()
    code = 0
    settled, last_counters = 0, None
    view = _View(ports, live, every=1.0 if live else 10.0)
    if live:
        live.start()
    try:
        while not stop:
            supervisor.poll()
            time.sleep(0.5)
            snap = view.tick(_headline(replay, started))
            if replay is None or not replay.finished.is_set():
                continue
            if replay.error is not None:
                print(f"replay failed: {replay.error!r}", file=sys.stderr)
                code = 1
                break
            if not args.exit_when_done:
                continue
            # Caught up: every service is ready with nothing left to read, and no counter moved for
            # a few seconds (lag counts fetched, not finished, messages: the last batch may still run).
            snap = view.tick(_headline(replay, started), force=True)
            settled = settled + 1 if snap.caught_up() and snap.counters() == last_counters else 0
            last_counters = snap.counters()
            if settled >= 6:
                if live:
                    live.stop()
                    live = None
                _summary(replay.sent, time.monotonic() - started, snap, ports, stack)
                break
    finally:
        if live:
            live.stop()
        print("\nstopping")
        try:
            if replay is not None:
                replay.stop()
                replay.finished.wait(10)
            supervisor.stop_all()
        finally:
            stack.down()
    return code


def _headline(replay: _Replay | None, started: float) -> str:
    elapsed = f"{time.monotonic() - started:,.0f}s"
    if replay is None:
        return f"running {elapsed}"
    done = " (all published)" if replay.finished.is_set() else ""
    return f"replay: {replay.sent:,} events published, event day {replay.day or '-'}{done}, {elapsed}"


class _View:
    """Scrapes the services' /metrics now and then; shows tables when live, a status line otherwise."""

    def __init__(self, ports: dict[str, int], live, every: float):
        self.ports, self.live, self.every = ports, live, every
        self.last: tuple[float, object] | None = None
        # The last status line's snapshot: `--exit-when-done` scrapes every half second while it
        # waits for the services to settle, and the lines must keep coming every `every` seconds.
        self.shown: tuple[float, object] | None = None
        self.snap = None

    def tick(self, headline: str, force: bool = False):
        from services.stack import dashboard

        now = time.monotonic()
        if not force and self.last is not None and now - self.last[0] < self.every:
            return self.snap
        snap = dashboard.parse(dashboard.scrape(self.ports))
        if self.live is not None:
            self.live.update(dashboard.render(snap, _rates(self.last, snap, now), headline))
        elif self.shown is None or now - self.shown[0] >= self.every:
            print(dashboard.status_line(snap, _rates(self.shown, snap, now), headline), flush=True)
            self.shown = (now, snap)
        self.last, self.snap = (now, snap), snap
        return snap


def _rates(before: tuple[float, object] | None, snap, now: float):
    from services.stack import dashboard

    return dashboard.rates(before[1] if before else None, snap, now - before[0] if before else 0)


def _summary(sent: int, seconds: float, snap, ports: dict[str, int], stack: Stack) -> None:
    from rich.console import Console

    from services.stack import dashboard

    console = Console()
    console.print(
        dashboard.render(snap, {}, f"replay done: {sent:,} events in {seconds:,.0f}s, every service caught up")
    )
    console.print(f"\nlogs: {stack.log_dir}/<service>.log")
    if "notify" in ports:
        mails = len(list((stack.var / "mail").glob("*.eml")))
        sms_path = stack.var / "sms.jsonl"
        sms = sum(1 for _ in sms_path.open()) if sms_path.exists() else 0
        console.print(f"e-mail: {stack.var / 'mail'}/*.eml ({mails:,})   SMS: {sms_path} ({sms:,} lines)")
    for name, port in ports.items():
        console.print(f"{name}: http://127.0.0.1:{port}/metrics  (read API: see README, 'The crm command')")
    console.print(
        "customers: crm customer ID   segments: crm segments   ledger: crm loyalty audit   "
        "dead letters: crm dlq list shop.purchases (and the other topics read: shop.interactions, crm.profile, "
        "crm.tiers, crm.referrals, crm.care, crm.retention)"
    )


def cmd_dlq(args: argparse.Namespace) -> int:
    from services.runtime.deadletters import list_dead_letters, replay_dead_letters
    from services.runtime.settings import CommonSettings

    common = _settings_from_stack(CommonSettings)
    if args.action == "list":
        letters = asyncio.run(list_dead_letters(common, args.topic))
        if args.json:
            print(json.dumps([dl.summary() for dl in letters], indent=2))
        else:
            print(f"{len(letters)} dead letter(s) in {common.topic(args.topic)}.dlq")
            for dl in letters:
                s = dl.summary()
                print(
                    f"  [{s['dlq_partition']}@{s['dlq_offset']}] from {args.topic}[{s['source_partition']}]"
                    f"@{s['source_offset']} key={s['key']} by {s['consumer']}: {s['reason']}"
                )
    else:
        n = asyncio.run(replay_dead_letters(common, args.topic, from_beginning=args.from_beginning))
        print(f"replayed {n} dead letter(s) to {common.topic(args.topic)}")
    return 0


def _settings_from_stack(cls):
    """Settings from the environment, falling back to the running embedded stack's addresses."""
    import os

    from services.stack.servers import StackState

    state = StackState.load(_stack().state_file)
    overrides = {}
    if state:
        for key, value in state.env().items():
            if key not in os.environ:
                overrides[key.removeprefix("CRM_").lower()] = value
    return cls(**overrides)


def cmd_contracts(args: argparse.Namespace) -> int:
    from contracts import generate

    if args.action == "generate":
        for path in generate.generate():
            print(f"wrote {path}")
        return 0
    problems = generate.drift()
    for p in problems:
        print(f"drift: {p}")
    if problems:
        print("run `make contracts` and commit the result", file=sys.stderr)
    return 1 if problems else 0


def cmd_keys(_: argparse.Namespace) -> int:
    import secrets

    from cryptography.fernet import Fernet

    for service in ("PROFILE", "NOTIFY"):
        print(f"CRM_{service}_ENCRYPTION_KEYS={Fernet.generate_key().decode()}")
        print(f"CRM_{service}_LOOKUP_KEY={secrets.token_urlsafe(32)}")
    print(f"CRM_NOTIFY_LINK_KEY={secrets.token_urlsafe(32)}")
    print(f"CRM_NOTIFY_INBOUND_TOKEN={secrets.token_urlsafe(24)}")
    for service in ("PROFILE", "LOYALTY", "CHURN", "NOTIFY"):
        print(f"CRM_{service}_API_TOKEN={secrets.token_urlsafe(24)}")
    return 0


def _profile_api():
    """An HTTP client for the profile read API: CRM_PROFILE_URL, token from the env or var/secrets.env."""
    import httpx

    from services.stack.secrets import setting

    port = os.environ.get("CRM_PROFILE_HTTP_PORT", "8101")
    base = os.environ.get("CRM_PROFILE_URL", f"http://127.0.0.1:{port}")
    token = setting("CRM_PROFILE_API_TOKEN", _stack().var) or ""
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _get(path: str, params: dict | None = None):
    import httpx

    try:
        with _profile_api() as api:
            r = api.get(path, params=params)
    except httpx.HTTPError as exc:
        print(f"the profile service does not answer ({exc}); is `crm up` running?", file=sys.stderr)
        return None
    if r.status_code == 401:
        print("unauthorised: set CRM_PROFILE_API_TOKEN to the profile service's token", file=sys.stderr)
        return None
    if r.status_code == 404:
        print(r.json().get("error", "not found"), file=sys.stderr)
        return None
    if r.status_code != 200:
        print(f"the profile service answered {r.status_code}: {r.text[:200]}", file=sys.stderr)
        return None
    return r.json()


def cmd_customer(args: argparse.Namespace) -> int:
    from services.profile.render import render_customer

    if args.email or args.phone:
        view = _get("/customers", {"email": args.email} if args.email else {"phone": args.phone})
    elif args.customer_id:
        view = _get(f"/customers/{args.customer_id}")
    else:
        print("give a customer id, --email or --phone", file=sys.stderr)
        return 2
    if view is None:
        return 1
    if args.json:
        print(json.dumps(view, indent=2, ensure_ascii=False))
    else:
        render_customer(view)
    return 0


def cmd_segments(args: argparse.Namespace) -> int:
    from services.profile.render import render_segments

    counts = _get("/segments")
    if counts is None:
        return 1
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        render_segments(counts)
    return 0


def _date(value: str):
    from datetime import date

    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, not {value!r}") from None


def cmd_loyalty(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from services.loyalty.audit import run_audit
    from services.runtime.settings import CommonSettings

    report = asyncio.run(run_audit(_settings_from_stack(CommonSettings), args.database))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"{report.accounts:,} accounts, {report.entries:,} ledger entries, "
            f"{report.points_outstanding:,} points outstanding, {report.negative_balances:,} negative balances"
        )
        print(f"{report.ledger_pages:,} ledger pages, {report.unlisted_pages:,} pages no account lists (never read)")
        print(f"discrepancies: {len(report.discrepancies)} account(s)")
        for cid, problems in list(report.discrepancies.items())[:20]:
            print(f"  {cid}: {'; '.join(problems)}")
    return 1 if report.discrepancies else 0


def cmd_churn(args: argparse.Namespace) -> int:
    from services.churn.backtest import BacktestError
    from services.churn.bgnbd import FitError
    from services.churn.transactions import TransactionsError, read_purchases

    try:
        purchases = read_purchases(args.transactions, args.format)
        if not any(p.day <= args.calibration_end for p in purchases):
            raise BacktestError(f"no customer bought on or before {args.calibration_end}")
        return {"fit": _churn_fit, "score": _churn_score, "backtest": _churn_backtest}[args.churn_command](
            args, purchases
        )
    except (OSError, TransactionsError, BacktestError, FitError) as exc:
        print(f"crm churn: {exc}", file=sys.stderr)
        return 2


def _churn_fit(args: argparse.Namespace, purchases) -> int:
    from services.churn import bgnbd
    from services.churn.transactions import summarise

    customers = summarise(purchases, args.calibration_end)
    params = bgnbd.fit([c.x for c in customers], [c.t_x for c in customers], [c.T for c in customers])
    if args.json:
        print(json.dumps(params.as_dict()))
    else:
        print(
            f"BG/NBD on {params.customers:,} customers (calibration to {args.calibration_end}, weeks): "
            f"r={params.r:.4f} alpha={params.alpha:.4f} a={params.a:.4f} b={params.b:.4f} "
            f"log-likelihood={params.log_likelihood:.2f}"
        )
    return 0


def _churn_score(args: argparse.Namespace, purchases) -> int:
    from collections import Counter

    from services.churn.assess import BANDS
    from services.churn.backtest import score_file, write_scores
    from services.churn.settings import ChurnSettings

    print("fitting the risk model on the calibration period...", file=sys.stderr)
    model, scored = score_file(purchases, args.calibration_end, ChurnSettings().band_rules())
    write_scores(args.out, model, scored)
    bands = Counter(s.assessment.band for s in scored)
    print(
        f"wrote {len(scored):,} scores to {args.out} (model fitted on {model.fitted_on}; "
        + ", ".join(f"{b} {bands.get(b, 0):,}" for b in BANDS)
        + ")"
    )
    return 0


def _churn_backtest(args: argparse.Namespace, purchases) -> int:
    from services.churn.backtest import backtest
    from services.churn.settings import ChurnSettings

    print("fitting on the calibration period and scoring the holdout...", file=sys.stderr)
    r = backtest(purchases, args.calibration_end, args.observation_end, ChurnSettings().band_rules())
    if args.json:
        print(json.dumps(r.as_dict()))
        return 0
    print(
        f"calibration to {r.calibration_end}, holdout to {r.observation_end}: {r.customers:,} customers, "
        f"{r.churned:,} ({r.churned / r.customers:.1%}) without a repeat purchase in the holdout"
    )
    print(f"precision and recall: each method flags its top {r.flagged:,} (the risk score's high and lost bands)")
    print(f"{'method':28} {'AUC':>7} {'precision':>10} {'recall':>8}")
    for m in r.methods:
        mark = "  <- best BG/NBD quantity" if m.name == r.best_bgnbd else ""
        print(f"{m.name:28} {m.auc:7.4f} {m.precision:10.3f} {m.recall:8.3f}{mark}")
    print(f"holdout purchase days: predicted {r.predicted_purchases:,.0f} (BG/NBD), actual {r.actual_purchases:,}")
    print(f"{'calibration repeats':>20} {'customers':>10} {'predicted':>10} {'actual':>8}")
    for row in r.by_frequency:
        print(f"{row['x']:>20} {row['customers']:>10,} {row['predicted']:>10.2f} {row['actual']:>8.2f}")
    return 0


def _soak_seconds(text: str) -> float:
    """0 (no soak) or long enough for RSS and lag samples (one every 10 s)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value != 0 and value < 10:
        raise argparse.ArgumentTypeError(f"{text}: use 0 (no soak) or at least 10 seconds")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from services import bench

    # Started in the background from a script, a process inherits SIGINT ignored, and `kill -INT`
    # did nothing to a bench. With Python's handler, it stops through its clean-up (services, then
    # servers) and exits 130, as from a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    result = bench.run(
        args.customers, args.naive_events, args.latency_seconds, args.quick, log=log, soak_s=args.soak_seconds
    )
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
        log(f"wrote {args.json}")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm", description="CRM event backbone")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or show the embedded servers")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("up", help="run the stack and every service until Ctrl-C")
    p.add_argument("--replay", choices=["cdnow"], help="play a data set as live shop traffic")
    p.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        metavar="DAYS_PER_S",
        help="event days per wall-clock second (default 1), or 'max'",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop after the replay has been published and every service has caught up; print a summary",
    )
    p.add_argument(
        "--customers", type=_positive_int, metavar="N", help="replay only the first N CDNOW customers (by id)"
    )
    p.add_argument("--plain", action="store_true", help="status lines instead of the live tables (default off a TTY)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("bench", help="measure throughput, latency, store use and memory on the embedded stack")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    p.add_argument("--customers", type=_positive_int, default=3000, help="CDNOW customers in the workload")
    p.add_argument("--naive-events", type=_positive_int, default=3000, help="events through the naive baseline")
    p.add_argument("--latency-seconds", type=float, default=30.0, help="how long load is offered for latency")
    p.add_argument(
        "--quick",
        action="store_true",
        help="skip the full CDNOW master replay (cdnow_replay_seconds, loyalty audit)",
    )
    p.add_argument(
        "--soak-seconds",
        type=_soak_seconds,
        default=0.0,
        metavar="S",
        help="also offer half the measured capacity for S seconds and report RSS growth and lag (make bench: 600)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("dlq", help="list or replay dead letters of a topic")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("topic", help="the source topic, e.g. shop.purchases")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--from-beginning", action="store_true", help="replay every dead letter again")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("customer", help="show a customer's 360 view (profile read API)")
    p.add_argument("customer_id", nargs="?")
    p.add_argument("--email", help="find the customer by e-mail instead")
    p.add_argument("--phone", help="find the customer by phone (E.164) instead")
    p.add_argument("--json", action="store_true", help="print the raw JSON view")
    p.set_defaults(func=cmd_customer)

    p = sub.add_parser("segments", help="customers per RFM segment, lifecycle stage and value tier")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_segments)

    p = sub.add_parser("loyalty", help="loyalty ledger tools")
    loyalty = p.add_subparsers(dest="loyalty_command", required=True)
    q = loyalty.add_parser("audit", help="check every account and its ledger pages: balance = entries = lots - debt")
    q.add_argument("--json", action="store_true")
    q.add_argument(
        "--database",
        default=os.environ.get("CRM_LOYALTY_DATABASE") or "loyalty",
        help="the loyalty database name, after CRM_DB_PREFIX (default: CRM_LOYALTY_DATABASE, else loyalty)",
    )
    p.set_defaults(func=cmd_loyalty)

    p = sub.add_parser("churn", help="churn model tools on a transaction file")
    churn = p.add_subparsers(dest="churn_command", required=True)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--transactions", type=Path, required=True, help="the purchase file")
    data.add_argument("--format", choices=list(FORMATS), required=True)
    data.add_argument("--calibration-end", type=_date, required=True, help="last day of the calibration period")
    q = churn.add_parser(
        "fit", parents=[data], help="fit BG/NBD (r, alpha, a, b) by maximum likelihood; time unit weeks"
    )
    q.add_argument("--json", action="store_true", help='print {"r","alpha","a","b","log_likelihood","customers"}')
    q = churn.add_parser("score", parents=[data], help="score every customer at the calibration end, write a CSV")
    q.add_argument("--out", type=Path, required=True, help="the CSV to write")
    q = churn.add_parser("backtest", parents=[data], help="risk score vs recency vs BG/NBD on a holdout period")
    q.add_argument("--observation-end", type=_date, required=True, help="last day of the holdout period")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_churn)

    p = sub.add_parser("keys", help="print fresh keys and tokens for the services")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("contracts", help="generate or check the AsyncAPI document and JSON Schemas")
    p.add_argument("action", choices=["generate", "check"])
    p.set_defaults(func=cmd_contracts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackError as exc:
        print(f"crm: {exc}", file=sys.stderr)
        return 2
    except TopicNotFound as exc:
        print(f"crm: {exc}; is the stack up (`crm stack status`) and CRM_KAFKA_BOOTSTRAP right?", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
