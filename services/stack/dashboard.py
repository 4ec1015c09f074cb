"""The live view of `crm up`: what every service's /metrics says, as a few rich tables.

`parse` and `render` are pure (text in, tables out); `scrape` is the only I/O. The same
snapshot gives the summary printed by `--exit-when-done`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table
from rich.text import Text


@dataclass
class Snapshot:
    """Totals across the services at one moment. Missing services are listed in `down`."""

    consumed: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    published: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    lag: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dead_letters: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    ready: dict[str, bool] = field(default_factory=dict)
    profile: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    loyalty_tiers: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    points: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    risk_bands: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    notifications: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    clock: dict[str, float] = field(default_factory=dict)
    down: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    partitions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cache_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def total_lag(self) -> float:
        return sum(self.lag.values())

    def counters(self) -> tuple:
        """What changes while any service is still working (for 'has everything settled?')."""
        return (
            sorted(self.consumed.items()),
            sorted(self.published.items()),
            sorted(self.dead_letters.items()),
            sorted(self.notifications.items()),
        )

    def caught_up(self) -> bool:
        """Every service answers, is ready, owns partitions and has nothing left to read."""
        return (
            bool(self.services)
            and not self.down
            and all(self.ready.get(s) and self.partitions.get(s, 0) > 0 for s in self.services)
            and self.total_lag == 0
        )


def parse(texts: dict[str, str | None]) -> Snapshot:
    """Fold each service's exposition text into one snapshot; None means the service did not answer."""
    snap = Snapshot(services=list(texts))
    for service, text in texts.items():
        if text is None:
            snap.down.append(service)
            continue
        snap.lag[service] = 0.0
        snap.ready[service] = False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                _fold(snap, service, sample.name, sample.labels, sample.value)
    return snap


def _fold(snap: Snapshot, service: str, name: str, labels: dict[str, str], value: float) -> None:
    if name == "crm_events_consumed_total":
        snap.consumed[service] += value
    elif name == "crm_events_published_total":
        snap.published[service] += value
    elif name == "crm_consumer_lag":
        snap.lag[service] += value
        snap.partitions[service] += 1
    elif name == "crm_dead_letters_total":
        snap.dead_letters[(service, labels.get("topic", "?"))] += value
    elif name == "crm_clock_timestamp_seconds":
        snap.clock[service] = value
    elif name == "crm_state_cache_bytes":
        snap.cache_bytes[service] = value
    elif name == "crm_service_ready":
        snap.ready[service] = value == 1
    # Each replica counts the customers it owns: the totals are sums over the replicas.
    elif name == "crm_profile_customers":
        snap.profile[labels.get("dimension", "?")][labels.get("value", "?")] += value
    elif name == "crm_loyalty_accounts":
        snap.loyalty_tiers[labels.get("tier", "?")] += value
    elif name == "crm_loyalty_points_total":
        snap.points[labels.get("kind", "?")] += value
    elif name == "crm_churn_customers":
        snap.risk_bands[labels.get("band", "?")] += value
    elif name == "crm_notify_notifications_total":
        snap.notifications[(labels.get("channel", "?"), labels.get("outcome", "?"))] += value


def rates(before: Snapshot | None, after: Snapshot, seconds: float) -> dict[str, float]:
    """Events consumed per second per service between two snapshots (a restart's reset counts as 0)."""
    if before is None or seconds <= 0:
        return {}
    return {s: max(after.consumed[s] - before.consumed.get(s, 0.0), 0.0) / seconds for s in after.consumed}


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _counts(title: str, counts: dict[str, float], order: list[str] | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False, min_width=len(title))
    table.add_column(style="cyan")
    table.add_column(justify="right")
    keys = [k for k in (order or []) if k in counts] + sorted(k for k in counts if k not in (order or []))
    for key in keys:
        table.add_row(key, _n(counts[key]))
    if not keys:
        table.add_row("-", "")
    return table


RISK_ORDER = ["low", "medium", "high", "lost"]
TIER_ORDER = ["Member", "Silver", "Gold", "Platinum"]


def render(snap: Snapshot, per_second: dict[str, float], headline: str) -> Group:
    services = Table(title=headline, title_justify="left", expand=False)
    for column in ("service", "state", "events/s", "consumed", "published", "lag", "dead letters"):
        services.add_column(column, justify="left" if column in ("service", "state") else "right")
    names = snap.services
    for name in names:
        if name in snap.down:
            state = Text("down", style="red")
        elif snap.ready.get(name):
            state = Text("ready", style="green")
        else:
            state = Text("starting", style="yellow")
        dlq = sum(v for (s, _t), v in snap.dead_letters.items() if s == name)
        services.add_row(
            name,
            state,
            f"{per_second.get(name, 0.0):,.0f}",
            _n(snap.consumed.get(name, 0)),
            _n(snap.published.get(name, 0)),
            _n(snap.lag.get(name, 0)) if snap.partitions.get(name) else "?",
            Text(_n(dlq), style="red" if dlq else ""),
        )

    notifications = Table(title="notifications", title_justify="left", box=None, pad_edge=False, min_width=13)
    outcomes = sorted({o for (_c, o) in snap.notifications})
    notifications.add_column("channel", style="cyan")
    for outcome in outcomes:
        notifications.add_column(outcome, justify="right")
    for channel in sorted({c for (c, _o) in snap.notifications}):
        notifications.add_row(channel, *(_n(snap.notifications.get((channel, o), 0)) for o in outcomes))

    panels = Table.grid(padding=(1, 4))
    panels.add_row(
        _counts("RFM segments", snap.profile.get("segments", {})),
        _counts("lifecycle stages", snap.profile.get("stages", {})),
        _counts("value tiers", snap.profile.get("value_tiers", {})),
    )
    panels.add_row(
        _counts("loyalty tiers", snap.loyalty_tiers, TIER_ORDER),
        _counts("risk bands", snap.risk_bands, RISK_ORDER),
        notifications,
    )
    dead = [f"{s} ← {t}: {_n(v)}" for (s, t), v in sorted(snap.dead_letters.items()) if v]
    footer = Text("dead letters: " + ("; ".join(dead) + "  (crm dlq list TOPIC)" if dead else "none"))
    return Group(services, Text(""), panels, Text(""), footer)


def status_line(snap: Snapshot, per_second: dict[str, float], headline: str) -> str:
    """One line for logs and pipes, where a live screen makes no sense."""
    lag = " ".join(f"{s}={_n(v)}" for s, v in sorted(snap.lag.items()))
    sent = sum(v for (_c, o), v in snap.notifications.items() if o == "sent")
    dlq = sum(snap.dead_letters.values())
    eps = sum(per_second.values())
    down = f" down: {','.join(snap.down)}" if snap.down else ""
    return f"  {headline} | {eps:,.0f} events/s | lag {lag or '-'} | sent {_n(sent)} | dead letters {_n(dlq)}{down}"


def scrape(ports: dict[str, int], timeout: float = 2.0) -> dict[str, str | None]:
    # The standard library's client: httpx.get builds an SSL context (loading the CA bundle) for
    # every call, even for plain HTTP, which made the bench's 4-per-second polling the largest
    # CPU cost of its own process, taken from the services it measures (py-spy, e2e phase).
    from http.client import HTTPException
    from urllib.error import URLError
    from urllib.request import urlopen

    texts: dict[str, str | None] = {}
    for name, port in ports.items():
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
                texts[name] = response.read().decode() if response.status == 200 else None
        except (URLError, HTTPException, OSError, ValueError):
            texts[name] = None
    return texts
