"""The `crm up` view: /metrics texts folded into one snapshot, rendered as tables, and the 'caught up' rule."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from rich.console import Console

from services.stack import dashboard


def _service_text(name: str, consumed: int, lag: int | None, ready: bool = True, extra=None) -> str:
    """Exposition text built by prometheus_client, with the metric names the services register."""
    registry = CollectorRegistry()
    Counter("crm_events_consumed", "", ["service", "topic", "type"], registry=registry).labels(
        name, "shop.purchases", "PurchaseCompleted"
    ).inc(consumed)
    Gauge("crm_service_ready", "", ["service"], registry=registry).labels(name).set(1 if ready else 0)
    if lag is not None:
        g = Gauge("crm_consumer_lag", "", ["service", "topic", "partition"], registry=registry)
        g.labels(name, "shop.purchases", "0").set(lag)
        g.labels(name, "shop.purchases", "1").set(0)
    if extra:
        extra(registry)
    return generate_latest(registry).decode()


def _notify_extras(registry):
    c = Counter("crm_notify_notifications_total", "", ["channel", "kind", "outcome"], registry=registry)
    c.labels("email", "welcome", "sent").inc(7)
    c.labels("email", "thank_you", "sent").inc(3)
    c.labels("sms", "welcome", "suppressed").inc(2)
    Counter("crm_dead_letters", "", ["service", "topic"], registry=registry).labels("notify", "crm.care").inc(1)


def _profile_extras(registry):
    g = Gauge("crm_profile_customers", "", ["dimension", "value"], registry=registry)
    g.labels("segments", "champions").set(12)
    g.labels("stages", "active").set(40)


def test_parse_sums_across_labels_and_marks_silent_services_down():
    snap = dashboard.parse(
        {
            "profile": _service_text("profile", 100, 5, extra=_profile_extras),
            "notify": _service_text("notify", 30, 0, extra=_notify_extras),
            "churn": None,
        }
    )
    assert snap.consumed == {"profile": 100, "notify": 30}
    assert snap.lag == {"profile": 5, "notify": 0}
    assert snap.partitions == {"profile": 2, "notify": 2}
    assert snap.notifications == {("email", "sent"): 10, ("sms", "suppressed"): 2}
    assert snap.dead_letters == {("notify", "crm.care"): 1}
    assert snap.profile["segments"] == {"champions": 12}
    assert snap.down == ["churn"]
    assert not snap.caught_up()


def test_caught_up_needs_every_service_ready_assigned_and_without_lag():
    ok = {"a": _service_text("a", 10, 0), "b": _service_text("b", 10, 0)}
    assert dashboard.parse(ok).caught_up()
    assert not dashboard.parse({**ok, "b": _service_text("b", 10, 3)}).caught_up()
    assert not dashboard.parse({**ok, "b": _service_text("b", 10, 0, ready=False)}).caught_up()
    # Answering /metrics before owning any partition is not 'no lag'.
    assert not dashboard.parse({**ok, "b": _service_text("b", 0, None)}).caught_up()


def test_rates_per_service_and_a_restart_does_not_go_negative():
    before = dashboard.parse({"a": _service_text("a", 100, 0), "b": _service_text("b", 500, 0)})
    after = dashboard.parse({"a": _service_text("a", 300, 0), "b": _service_text("b", 20, 0)})
    assert dashboard.rates(before, after, 2.0) == {"a": 100.0, "b": 0.0}
    assert dashboard.rates(None, after, 2.0) == {}


def test_render_shows_the_figures():
    snap = dashboard.parse(
        {
            "profile": _service_text("profile", 1234, 56, extra=_profile_extras),
            "notify": _service_text("notify", 30, 0, extra=_notify_extras),
            "churn": None,
        }
    )
    console = Console(record=True, width=120)
    console.print(dashboard.render(snap, {"profile": 42.0}, "replay: 9 events"))
    out = console.export_text()
    assert "replay: 9 events" in out
    assert "1,234" in out and "56" in out and "42" in out
    assert "champions" in out and "active" in out
    assert "down" in out  # churn
    assert "notify ← crm.care: 1" in out
    line = dashboard.status_line(snap, {"profile": 42.0}, "replay: 9 events")
    assert "42 events/s" in line and "sent 10" in line and "dead letters 1" in line and "down: churn" in line


def test_customer_counts_are_summed_over_the_replicas_that_own_them():
    texts = {}
    for label, (champions, gold, high) in {"profile-0": (12, 3, 1), "profile-1": (5, 2, 4)}.items():
        registry = CollectorRegistry()
        segments = Gauge("crm_profile_customers", "", ["dimension", "value"], registry=registry)
        segments.labels("segments", "champions").set(champions)
        Gauge("crm_loyalty_accounts", "", ["tier"], registry=registry).labels("Gold").set(gold)
        Gauge("crm_churn_customers", "", ["band"], registry=registry).labels("high").set(high)
        texts[label] = generate_latest(registry).decode()
    snap = dashboard.parse(texts)
    assert snap.profile["segments"] == {"champions": 17}
    assert snap.loyalty_tiers == {"Gold": 5} and snap.risk_bands == {"high": 5}


def test_plain_status_lines_keep_coming_while_exit_when_done_waits(monkeypatch, capsys):
    """`crm up --exit-when-done` scrapes every half second (force) while the services settle; off a
    terminal the status line must still come every `every` seconds, with rates over that span."""
    from services import cli

    clock = {"now": 1000.0, "consumed": 0}
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(
        dashboard, "scrape", lambda ports: {"profile": _service_text("profile", clock["consumed"], lag=0)}
    )
    view = cli._View({"profile": 1}, live=None, every=10.0)
    view.tick("replay: done")  # the first line
    for _ in range(60):  # 30 s of forced scrapes, 100 events a second
        clock["now"] += 0.5
        clock["consumed"] += 50
        view.tick("replay: done", force=True)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 4, lines  # at 0, 10, 20 and 30 s
    assert "| 100 events/s |" in lines[-1], lines[-1]  # over the last 10 s, not the last half second
