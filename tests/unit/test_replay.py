"""The CDNOW replay turns the real file into valid, deterministic shop events."""

from __future__ import annotations

from decimal import Decimal

from contracts import registry_for
from services.replay.cdnow import DEFAULT_PATH, events, read_master

REGISTRY = registry_for("shop.purchases", "shop.interactions")


def test_master_file_is_read_completely():
    rows = read_master(DEFAULT_PATH)
    assert len(rows) == 69_659
    assert len({r.customer for r in rows}) == 23_570


def test_events_are_valid_deterministic_and_registration_comes_first():
    rows = [r for r in read_master(DEFAULT_PATH) if int(r.customer) <= 200]
    first = list(events(rows))
    second = list(events(rows))
    assert [e.event_id for _, e in first] == [e.event_id for _, e in second]
    seen: set[str] = set()
    days = [d for d, _ in first]
    assert days == sorted(days)
    for _, event in first:
        # Every event passes the same strict validation shops are held to.
        parsed = REGISTRY.parse(event.to_bytes(), event.key())
        assert parsed == event
        if event.type == "CustomerRegistered":
            seen.add(event.customer_id)
            assert event.data.referred_by is None or event.data.referred_by in seen  # an earlier customer
        else:
            assert event.customer_id in seen, f"a {event.type} before its customer registered"
        if event.type == "PurchaseCompleted":
            assert sum((line.unit_price * line.quantity for line in event.data.lines), Decimal(0)) == event.data.total
    assert len(seen) == 200
    # The extras are sparse but there.
    kinds = {e.type for _, e in first}
    assert {"PurchaseRefunded", "InteractionRecorded", "PointsRedemptionRequested"} <= kinds
    assert any(e.type == "CustomerRegistered" and e.data.referred_by for _, e in first)


def test_events_are_in_time_order_within_each_day_too():
    # The player promises time order on every partition (its watermarks rely on it).
    rows = [r for r in read_master(DEFAULT_PATH) if int(r.customer) <= 300]
    times = [e.occurred_at for _, e in events(rows)]
    assert times == sorted(times)
