"""The loyalty ledger as plain functions: rules, refunds, lots and expiry, tiers, referrals, and its invariants."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.crm import PointsEarned, ReferralQualified
from contracts.shop import (
    CustomerRegistered,
    CustomerRegisteredData,
    PointsRedemptionRequested,
    PointsRedemptionRequestedData,
    PurchaseCompleted,
    PurchaseCompletedData,
    PurchaseLine,
    PurchaseRefunded,
    PurchaseRefundedData,
)
from services.loyalty.app import account_view
from services.loyalty.domain import (
    LoyaltyDomain,
    add_months,
    archived,
    audit,
    close_pages,
    next_seq,
    page_first_seq,
    page_id,
)
from services.loyalty.rules import Campaign, Rules, RulesError, Tier, load_rules

T0 = datetime(1997, 1, 10, 12, tzinfo=UTC)


def rules(**kw) -> Rules:
    base = {
        "points_per_unit": {"USD": Decimal(1)},
        "category_multipliers": {"jazz": Decimal("1.5")},
        "first_purchase_bonus": 0,
        "expiry_months": 12,
        "expiring_notice_days": 7,
        "expiring_notice_min_points": 50,
        "review_days": 30,
        "downgrade_grace_days": 30,
        "tiers": [
            Tier(name="Member", threshold=Decimal(0)),
            Tier(name="Silver", threshold=Decimal(100), multiplier=Decimal("1.1"), perks=["free shipping"]),
            Tier(name="Gold", threshold=Decimal(300), multiplier=Decimal("1.25")),
        ],
        "rewards": {"voucher": 50, "small": 25},
        "referrer_bonus": 200,
        "referee_bonus": 100,
    }
    return Rules(**(base | kw))


def buy(order="o1", total="40.00", at=T0, category="rock", cid="c1", lines=None):
    lines = lines or [PurchaseLine(sku="cd", category=category, quantity=1, unit_price=Decimal(total))]
    return PurchaseCompleted(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="shop",
        customer_id=cid,
        data=PurchaseCompletedData(
            order_id=order, store_id="s", channel="online", currency="USD", total=Decimal(total), lines=lines
        ),
    )


def refund(order="o1", amount="10.00", refund_id="r1", at=T0, cid="c1"):
    return PurchaseRefunded(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="shop",
        customer_id=cid,
        data=PurchaseRefundedData(order_id=order, refund_id=refund_id, currency="USD", amount=Decimal(amount)),
    )


def redeem(points=50, rid="x1", reward="voucher", at=T0, cid="c1"):
    return PointsRedemptionRequested(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="shop",
        customer_id=cid,
        data=PointsRedemptionRequestedData(redemption_id=rid, points=points, reward=reward),
    )


def register(cid="c1", at=T0, **kw):
    return CustomerRegistered(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="shop",
        customer_id=cid,
        data=CustomerRegisteredData(name="A", **kw),
    )


def run(domain, events, state=None):
    out = []
    for ev in events:
        state, derived = domain.apply(state, ev, ev.occurred_at)
        out.extend(derived)
    return state, out


def test_rules_evaluate_category_tier_campaign_birthday_and_first_purchase_bonus():
    r = rules(
        first_purchase_bonus=100,
        birthday_month_multiplier=Decimal(2),
        campaigns=[Campaign(name="Spring", start=date(1997, 3, 1), end=date(1997, 3, 7), multiplier=Decimal(2))],
    )
    d = LoyaltyDomain(r)
    jazz = [
        PurchaseLine(sku="a", category="jazz", quantity=2, unit_price=Decimal("10.00")),
        PurchaseLine(sku="b", category="rock", quantity=1, unit_price=Decimal("20.00")),
    ]
    state, out = run(d, [register(birthday=date(1970, 6, 15)), buy(total="40.00", lines=jazz)])
    earned = [(e.data.points, e.data.reason) for e in out if e.type == "PointsEarned"]
    assert earned == [(50, "purchase: 40.00 USD x 1"), (100, "first purchase bonus")]  # 20x1.5 + 20
    # Silver from here (spend 40 + 80 >= 100): x1.1 next time; a campaign week doubles.
    state, out = run(d, [buy("o2", "80.00", at=datetime(1997, 2, 1, tzinfo=UTC))], state)
    assert state["tier"] == "Silver"
    state, out = run(d, [buy("o3", "10.00", at=datetime(1997, 3, 3, tzinfo=UTC))], state)
    assert [e.data.points for e in out if e.type == "PointsEarned"] == [22]  # 10 x 1.1 x 2
    # Birthday month (June): x2.
    state, out = run(d, [buy("o4", "10.00", at=datetime(1997, 6, 20, tzinfo=UTC))], state)
    (e,) = [e for e in out if e.type == "PointsEarned"]
    assert e.data.points == 22 and "birthday month x 2" in e.data.reason
    assert audit(state) == []


def test_an_unknown_currency_is_refused_with_a_reason():
    d = LoyaltyDomain(rules())
    ev = buy()
    bad = ev.model_copy(update={"data": ev.data.model_copy(update={"currency": "JPY"})})
    with pytest.raises(ValueError, match="no earning rule for currency JPY"):
        d.apply(None, bad, T0)


def test_refunds_reverse_proportionally_and_can_leave_a_negative_balance():
    d = LoyaltyDomain(rules())
    state, _ = run(d, [buy("o1", "40.00")])
    assert state["balance"] == 40
    state, out = run(d, [refund("o1", "10.00", "r1")], state)
    assert [(e.type, e.data.points, e.data.balance) for e in out] == [("PointsReversed", 10, 30)]
    state, out = run(d, [refund("o1", "10.00", "r1")], state)  # the same refund again
    assert out == [] and state["balance"] == 30
    state, _ = run(d, [redeem(25, reward="small")], state)
    assert state["balance"] == 5
    state, out = run(d, [refund("o1", "30.00", "r2")], state)  # the rest of the order
    assert [(e.data.points, e.data.balance) for e in out] == [(30, -25)]
    assert state["debt"] == 25 and audit(state) == []
    # The next points pay the debt off first.
    state, _ = run(d, [buy("o2", "40.00", at=T0 + timedelta(days=1))], state)
    assert state["balance"] == 15 and state["debt"] == 0 and sum(x["remaining"] for x in state["lots"]) == 15
    assert audit(state) == []


def test_lots_are_spent_first_to_expire_first_and_expire_with_a_notice():
    d = LoyaltyDomain(rules(expiry_months=1))
    state, _ = run(d, [buy("o1", "60.00"), buy("o2", "70.00", at=T0 + timedelta(days=10))])
    state, _ = run(d, [redeem(50, at=T0 + timedelta(days=11))], state)
    assert [(x["points"], x["remaining"]) for x in state["lots"]] == [(60, 10), (70, 70)]
    # Seven days before the second lot expires: a notice (the first lot's 10 points are too few).
    notice_day = datetime(1997, 2, 13, tzinfo=UTC)
    assert d.due(state, T0) == datetime(1997, 2, 10, tzinfo=UTC)  # the first lot's expiry
    state, out = d.tick(state, "c1", datetime(1997, 2, 10, tzinfo=UTC))
    assert [(e.type, e.data.points, e.data.balance) for e in out] == [("PointsExpired", 10, 70)]
    state, out = d.tick(state, "c1", notice_day)
    assert [(e.type, e.data.kind, e.data.template_data["points"]) for e in out] == [
        ("CareRequested", "points_expiring", 70)
    ]
    state, out = d.tick(state, "c1", datetime(1997, 2, 20, tzinfo=UTC))
    assert [(e.type, e.data.points, e.data.balance) for e in out] == [("PointsExpired", 70, 0)]
    assert state["lots"] == [] and audit(state) == []
    again, out = d.tick(state, "c1", datetime(1997, 2, 21, tzinfo=UTC))
    assert out == [] and again is state


def test_tier_up_at_once_down_only_after_warning_and_grace():
    d = LoyaltyDomain(rules())
    state, out = run(d, [buy("o1", "120.00")])
    assert [(e.data.from_tier, e.data.to_tier) for e in out if e.type == "TierChanged"] == [
        (None, "Member"),
        ("Member", "Silver"),
    ]
    (care,) = [e for e in out if e.type == "CareRequested"]
    assert care.data.kind == "tier_upgrade" and care.data.template_data["perks"] == ["free shipping"]
    # A year later the spend has left the window: the review warns, the grace period passes, then down.
    review = datetime.fromisoformat(state["next_review"])
    state, out = d.tick(state, "c1", review)
    assert out == []  # still within 12 months
    later, seen = datetime(1998, 2, 20, tzinfo=UTC), []
    while (due := d.due(state, later)) <= later and state["downgrade"] is None:
        state, out = d.tick(state, "c1", due)
        seen.extend(e for e in out if e.type == "CareRequested" and e.data.kind == "tier_downgrade_warning")
    (warning,) = seen
    assert warning.data.template_data["tier"] == "Silver" and state["tier"] == "Silver"
    assert datetime(1998, 1, 10, tzinfo=UTC) <= warning.occurred_at < datetime(1998, 2, 10, tzinfo=UTC)
    grace_end = datetime.fromisoformat(state["downgrade"]["at"])
    # Buying again before the grace ends keeps the tier.
    kept, _ = run(d, [buy("o2", "150.00", at=grace_end - timedelta(days=1))], state)
    assert kept["downgrade"] is None and kept["tier"] == "Silver"
    state, out = d.tick(state, "c1", grace_end)
    assert [(e.data.from_tier, e.data.to_tier, e.data.reason) for e in out] == [
        ("Silver", "Member", "downgrade after the grace period")
    ]
    assert state["next_review"] is None


def test_a_referral_rewards_both_customers_once():
    d = LoyaltyDomain(rules())
    state, _ = run(d, [register("new", referred_by="old")])
    state, out = run(
        d, [buy("o1", "10.00", cid="new"), buy("o2", "10.00", cid="new", at=T0 + timedelta(days=1))], state
    )
    earned = [(e.data.points, e.data.reason) for e in out if e.type == "PointsEarned"]
    assert (100, "referral: welcome bonus (referred by old)") in earned
    (qualified,) = [e for e in out if isinstance(e, ReferralQualified)]
    assert qualified.customer_id == "old" and qualified.data.referee_id == "new"
    referrer, out = run(d, [qualified, qualified])
    assert [(e.data.points, e.data.reason) for e in out if e.type == "PointsEarned"] == [
        (200, "referral: new made a first purchase")
    ]
    assert referrer["balance"] == 200 and audit(referrer) == []
    # Referring oneself, or naming a referrer after the first purchase, earns nothing.
    _, out = run(d, [register("me", referred_by="me"), buy("o9", "10.00", cid="me")])
    assert not any(isinstance(e, ReferralQualified) for e in out)


def test_redemptions_are_rejected_with_a_reason():
    d = LoyaltyDomain(rules())
    state, _ = run(d, [buy("o1", "60.00")])
    requests = [
        redeem(50, "x1"),
        redeem(50, "x1"),
        redeem(50, "x2", reward="yacht"),
        redeem(40, "x4"),
        redeem(50, "x3"),
    ]
    state, out = run(d, requests, state)
    assert [(e.type, getattr(e.data, "reason", None)) for e in out] == [
        ("PointsRedeemed", None),
        ("RedemptionRejected", "duplicate_redemption_id"),
        ("RedemptionRejected", "unknown_reward"),
        ("RedemptionRejected", "unknown_reward"),  # the voucher costs 50, not 40
        ("RedemptionRejected", "insufficient_balance"),
    ]
    assert state["balance"] == 10 and audit(state) == []


def test_the_rules_file_is_checked_with_clear_errors(tmp_path):
    assert load_rules().tiers[0].name == "Member"  # the shipped deploy/config/loyalty.toml
    bad = tmp_path / "rules.toml"
    bad.write_text('points_per_unit = {usd = 1}\n[[tiers]]\nname = "Gold"\nthreshold = 5\n')
    with pytest.raises(RulesError, match="first tier \\(Gold\\) must have threshold 0"):
        load_rules(bad)
    with pytest.raises(RulesError, match="not found"):
        load_rules(tmp_path / "missing.toml")


def test_months_are_added_on_the_calendar():
    assert add_months(date(1997, 1, 31), 1) == date(1997, 2, 28)
    assert add_months(date(1997, 11, 15), 14) == date(1999, 1, 15)
    assert add_months(date(1997, 3, 1), -13) == date(1996, 2, 1)


# -- properties -----------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("buy"), st.integers(1, 30_000)),
        st.tuples(st.just("refund"), st.integers(1, 40_000)),
        st.tuples(st.just("redeem"), st.integers(1, 400)),
        st.tuples(st.just("wait"), st.integers(1, 200)),
    ),
    max_size=40,
)


def _events(plan):
    """A timeline of shop events from a plan; refunds name an earlier order (or none)."""
    at, orders, out, n = T0, [], [], 0
    for op, x in plan:
        n += 1
        if op == "wait":
            at += timedelta(days=x)
            out.append(("tick", at))
            continue
        if op == "buy":
            orders.append(f"o{n}")
            out.append(("event", buy(f"o{n}", f"{x / 100:.2f}", at=at)))
        elif op == "refund":
            order = orders[x % len(orders)] if orders else "none"
            out.append(("event", refund(order, f"{x / 100:.2f}", f"r{n}", at=at)))
        else:
            out.append(("event", redeem(x, f"x{n}", at=at)))
    return out


def _catch_up(d, state, until):
    while state is not None and (due := d.due(state, until)) is not None and due <= until:
        state, _ = d.tick(state, "c1", due)
    return state


def _play(d, timeline, duplicate: bool, eager: bool = False):
    state = None
    for kind, item in timeline:
        if kind == "tick":
            state = _catch_up(d, state, item)
            continue
        if eager:  # the sweep ran right up to this event (a lagging sweep is the default)
            state = _catch_up(d, state, item.occurred_at)
        state, _ = d.apply(state, item, item.occurred_at)
        if duplicate:  # redelivered (beyond the pipeline's event-id window)
            state, _ = d.apply(state, item, item.occurred_at)
    return state


def _catalogue_play(plan):
    """A domain whose catalogue prices reward `vN` at N points, and the plan's timeline with each
    redemption asking for the reward at its price (so only the balance can refuse it)."""
    d = LoyaltyDomain(rules(rewards={f"v{n}": n for n in range(1, 401)}, expiry_months=3))
    timeline = [
        (k, e.model_copy(update={"data": e.data.model_copy(update={"reward": f"v{e.data.points}"})}))
        if k == "event" and isinstance(e, PointsRedemptionRequested)
        else (k, e)
        for k, e in _events(plan)
    ]
    return d, timeline


@settings(max_examples=150, deadline=None)
@given(ops)
def test_balance_is_the_sum_of_entries_and_redelivery_changes_nothing(plan):
    d, timeline = _catalogue_play(plan)
    once = _play(d, timeline, duplicate=False)
    twice = _play(d, timeline, duplicate=True)
    eager = _play(d, timeline, duplicate=False, eager=True)
    if once is None:
        return
    # Ticking early or late makes no difference to the books once time has caught up.
    end = max(e.occurred_at for k, e in timeline if k == "event") if any(k == "event" for k, _ in timeline) else T0
    assert _catch_up(d, eager, end)["entries"] == _catch_up(d, once, end)["entries"]
    assert audit(once) == []
    assert once["balance"] == sum(e["points"] for e in once["entries"])
    assert twice == once
    redeemed = sum(-e["points"] for e in once["entries"] if e["kind"] == "redeem")
    assert redeemed <= sum(e["points"] for e in once["entries"] if e["kind"] == "earn")


def _play_paged(d, timeline, size: int):
    """`_play`, with the account's full pages closed after every step, as the store does."""
    state, pages = None, []

    def close(st):
        st, closed = close_pages(st, size, "c1")
        assert [pid for pid, _ in closed] == archived(st)["pages"][len(pages) :]  # listed in order
        pages.extend(entries for _, entries in closed)
        return st

    for kind, item in timeline:
        if kind == "tick":
            while state is not None and (due := d.due(state, item)) is not None and due <= item:
                state = close(d.tick(state, "c1", due)[0])
            continue
        state = close(d.apply(state, item, item.occurred_at)[0])
    return state, pages


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(1, 6))
def test_closing_ledger_pages_changes_no_book_and_the_pages_audit_clean(plan, size):
    d, timeline = _catalogue_play(plan)
    whole = _play(d, timeline, duplicate=False)
    paged, pages = _play_paged(d, timeline, size)
    if whole is None:
        return
    assert [e for page in pages for e in page] + paged["entries"] == whole["entries"]
    assert all(len(page) == size for page in pages) and len(paged["entries"]) < size
    for key in ("balance", "debt", "lots", "orders", "tier", "held"):
        assert paged[key] == whole[key], key
    assert audit(paged, pages) == [] and audit(paged) == []
    assert archived(paged)["entries"] == len(whole["entries"]) - len(paged["entries"])
    if pages:  # a page lost, or one entry changed, is found
        assert audit(paged, pages[1:]) != []
        changed = [dict(e) for e in pages[0]]
        changed[0]["points"] += 1
        assert audit(paged, [changed, *pages[1:]]) != []


def test_an_account_stored_before_ledger_pages_reads_as_one_with_none():
    d = LoyaltyDomain(rules())
    state, _ = d.apply(None, buy("o1", "30.00"), T0)
    old = {k: v for k, v in state.items() if k != "archived"}
    assert audit(old) == [] and next_seq(old) == len(state["entries"]) + 1
    state, _ = d.apply(old, buy("o2", "40.00", at=T0 + timedelta(days=1)), T0 + timedelta(days=1))
    assert [e["seq"] for e in state["entries"]] == list(range(1, len(state["entries"]) + 1))
    closed, pages = close_pages(state, 2, "c1")
    assert len(pages) == len(state["entries"]) // 2 and audit(closed, [e for _, e in pages]) == []


def test_a_page_id_names_the_customer_and_first_entry_and_differs_when_the_entries_do():
    d = LoyaltyDomain(rules())
    state, _ = d.apply(None, buy("o1", "30.00"), T0)
    state, _ = d.apply(state, buy("o2", "40.00", at=T0 + timedelta(days=1)), T0 + timedelta(days=1))
    _, [(pid, entries)] = close_pages(state, 2, "c-7")
    assert pid.startswith("c-7 000000001 ") and page_first_seq(pid) == 1
    assert close_pages(state, 2, "c-7")[1][0][0] == pid  # written again: the same document
    other = [{**entries[0], "points": entries[0]["points"] + 1}, *entries[1:]]
    assert page_id("c-7", other) != pid  # another run's page: never an overwrite


def test_the_birthday_bonus_message_goes_out_once_a_year_at_the_start_of_the_month():
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    state, _ = run(d, [register(birthday=date(1980, 6, 15), timezone="Asia/Shanghai")])
    june = datetime(1997, 6, 1, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
    assert d.due(state, T0) == june
    state, out = d.tick(state, "c1", june)
    assert [(e.data.kind, e.data.template_data["multiplier"]) for e in out] == [("birthday_bonus", "2")]
    assert out[0].occurred_at == june
    again, out = d.tick(state, "c1", june + timedelta(days=3))
    assert out == [] and again is state
    assert d.due(state, june) == datetime(1998, 6, 1, 1, 0, tzinfo=UTC)


def test_expired_points_are_neither_spent_nor_reversed_twice_whatever_the_sweep_did():
    d = LoyaltyDomain(rules())
    start, _ = run(d, [buy("o1", "100.00"), buy("o2", "110.00", at=datetime(1998, 1, 20, tzinfo=UTC))])
    late = datetime(1998, 2, 1, tzinfo=UTC)
    swept, _ = d.tick(start, "c1", late)  # o1's lot expired on 1998-01-10
    for state in (start, swept):
        after, _ = run(d, [refund("o1", "100.00", "r1", at=late)], state)
        assert after["balance"] == 121 and audit(after) == []  # o2: 110 x Silver 1.1; o1's points had expired
        _, out = run(d, [redeem(50, "x9", at=late)], after)
        assert [e.type for e in out if e.type.startswith(("Points", "Redemption"))][-1] == "PointsRedeemed"
    # A redemption against points that expired yesterday is refused even if no sweep ran.
    lone, _ = run(d, [buy("o1", "60.00")])
    _, out = run(d, [redeem(50, "x1", at=datetime(1998, 1, 11, tzinfo=UTC))], lone)
    # The expiring-points notice was due on 1998-01-03: it comes first, dated then.
    assert [e.type for e in out] == ["CareRequested", "PointsExpired", "RedemptionRejected"]
    assert out[0].data.kind == "points_expiring" and out[0].occurred_at == datetime(1998, 1, 3, tzinfo=UTC)


def test_time_driven_events_do_not_depend_on_when_the_sweeps_ran():
    """A service that got to a customer late (a restart, a clock jump) derives the same events."""
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    start, _ = run(d, [register(birthday=date(1980, 3, 15), timezone="Asia/Shanghai"), buy("o1", "60.00")])
    days = [datetime(1997, 3, 1, tzinfo=UTC) + timedelta(days=n) for n in range(0, 420, 1)]
    smooth, steady = start, []
    for day in days:
        smooth, out = d.tick(smooth, "c1", day)
        steady.extend(out)
    jumped, late = d.tick(start, "c1", days[-1])
    assert sorted(str(e.event_id) for e in late) == sorted(str(e.event_id) for e in steady)
    assert jumped == smooth
    kinds = [e.data.kind for e in late if e.type == "CareRequested"]
    assert kinds.count("birthday_bonus") == 2 and "points_expiring" in kinds  # March 1997 and March 1998


def test_refunds_add_up_without_drift_and_never_exceed_the_order():
    d = LoyaltyDomain(rules(points_per_unit={"USD": Decimal("1.5")}))
    state, _ = run(d, [buy("o1", "6.00")])  # 9 points
    state, out = run(d, [refund("o1", "1.00", f"r{i}") for i in range(3)], state)
    assert sum(e.data.points for e in out) == 5  # half the order: 4.5, rounded half up, once
    state, out = run(d, [refund("o1", "60.00", "r9"), refund("o1", "60.00", "r10")], state)
    assert sum(e.data.points for e in out) == 4 and state["orders"]["o1"]["refunded"] == "6.00"
    assert d.qualifying(state, T0.date()) == 0 and audit(state) == []
    other = refund("o1", "1.00", "r11")
    bad = other.model_copy(update={"data": other.data.model_copy(update={"currency": "EUR"})})
    fresh, _ = run(d, [buy("o2", "6.00")])
    with pytest.raises(ValueError, match="refund r11 is in EUR, order o1 in USD"):
        run(d, [buy("o1", "6.00"), bad], fresh)


def test_a_refund_before_its_purchase_is_applied_when_the_purchase_arrives():
    d = LoyaltyDomain(rules())
    state, out = run(d, [refund("o1", "10.00", "r1", at=T0 + timedelta(hours=1))])
    assert out == [] and state["balance"] == 0
    state, out = run(d, [buy("o1", "40.00")], state)
    assert [(e.type, e.data.points) for e in out if e.type.startswith("Points")] == [
        ("PointsEarned", 40),
        ("PointsReversed", 10),
    ]
    assert state["balance"] == 30 and audit(state) == []


def test_a_registration_read_after_the_first_purchase_still_pays_the_referral():
    d = LoyaltyDomain(rules())
    state, _ = run(d, [buy("o1", "10.00", cid="new", at=T0 + timedelta(hours=1))])
    state, out = run(d, [register("new", at=T0, referred_by="old")], state)
    assert [e.customer_id for e in out if isinstance(e, ReferralQualified)] == ["old"]
    assert state["balance"] == 10 + 100 and audit(state) == []
    # The same lots and events as when the registration is read first (their ids decide expiry notices).
    first = buy("o1", "10.00", cid="new", at=T0 + timedelta(days=3))
    joined = register("new", at=T0, referred_by="old")
    late, late_out = run(d, [first, joined])
    early, early_out = run(d, [joined, first])
    assert sorted((x["id"], x["earned_on"], x["remaining"]) for x in late["lots"]) == sorted(
        (x["id"], x["earned_on"], x["remaining"]) for x in early["lots"]
    )
    ids = {e.event_id for e in late_out if isinstance(e, ReferralQualified | PointsEarned)}
    assert ids == {e.event_id for e in early_out if isinstance(e, ReferralQualified | PointsEarned)}
    # Named only after the first purchase (in event time): no referral.
    state, _ = run(d, [buy("o1", "10.00", cid="late")])
    _, out = run(d, [register("late", at=T0 + timedelta(days=1), referred_by="old")], state)
    assert not any(isinstance(e, ReferralQualified) for e in out)


def test_tiers_and_expiry_ids_do_not_depend_on_how_often_the_sweep_runs():
    d = LoyaltyDomain(rules(qualifying_months=1, review_days=7, downgrade_grace_days=7))
    events = [buy("o1", "300.00"), buy("o2", "150.00", at=datetime(1997, 3, 20, tzinfo=UTC))]

    def play(step_days):
        state, out = None, []
        clock = T0
        for ev in events:
            while clock + timedelta(days=step_days) < ev.occurred_at and state is not None:
                clock += timedelta(days=step_days)
                state, derived = d.tick(state, "c1", clock)
                out += derived
            state, derived = d.apply(state, ev, ev.occurred_at)
            out += derived
        state, derived = d.tick(state, "c1", datetime(1998, 6, 1, tzinfo=UTC))
        return state, out + derived

    daily, daily_out = play(1)
    sparse, sparse_out = play(45)
    assert daily["tier"] == sparse["tier"] and daily["entries"] == sparse["entries"]
    ids = lambda out: sorted(str(e.event_id) for e in out if e.type in ("TierChanged", "PointsExpired"))  # noqa: E731
    assert ids(daily_out) == ids(sparse_out)


def test_points_that_only_pay_off_a_debt_leave_no_empty_lot_behind():
    # Found by the property test: an empty lot stayed, and a redelivery pruned it, so states differed.
    d = LoyaltyDomain(rules())
    events = [buy("o1", "100.00"), redeem(50, "x1", reward="voucher"), refund("o1", "69.50", "r1"), buy("o2", "0.91")]
    once, _ = run(d, events)
    twice, _ = run(d, [e for e in events for _ in range(2)])
    assert once["debt"] == 19 and once["lots"] == [] and once == twice and audit(once) == []


def test_a_registration_read_after_the_purchase_still_gives_the_birthday_month_points():
    """Registrations and purchases come on different topics, in either order."""
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    reg = register(birthday=date(1970, 1, 20), at=T0)
    order = buy("o1", "17.99", at=T0 + timedelta(hours=4))
    in_order, _ = run(d, [reg, order])
    late, out = run(d, [order, reg])
    assert late["balance"] == in_order["balance"] == 35  # floor(17.99 x 2), not 2 x floor(17.99)
    assert late["orders"]["o1"]["points"] == in_order["orders"]["o1"]["points"] == 35
    assert audit(late) == [] and audit(in_order) == []
    # The same lot (so the same expiry and expiring-points notices), not a second one.
    assert [(x["id"], x["points"], x["remaining"]) for x in late["lots"]] == [
        (x["id"], x["points"], x["remaining"]) for x in in_order["lots"]
    ]
    assert "registration read after the purchase" in [e for e in out if e.type == "PointsEarned"][-1].data.reason
    again, out = run(d, [reg], late)  # the same registration again: nothing more
    assert again["balance"] == late["balance"] and not [e for e in out if e.type == "PointsEarned"]


def test_lots_of_one_day_are_spent_in_the_same_order_whichever_arrived_first():
    # A purchase's points and a referral reward (another topic) of the same day come in either order.
    d = LoyaltyDomain(rules())
    _, out = run(d, [register("new", referred_by="c1"), buy("o0", "10.00", cid="new")])
    (qualified,) = [e for e in out if isinstance(e, ReferralQualified)]
    purchase = buy("o1", "60.00", at=qualified.occurred_at)
    spend = redeem(50, at=T0 + timedelta(days=1))
    a, _ = run(d, [purchase, qualified, spend])
    b, _ = run(d, [qualified, purchase, spend])
    assert {x["id"]: x["remaining"] for x in a["lots"]} == {x["id"]: x["remaining"] for x in b["lots"]}
    # And so the same lot's expiry notice is due.
    notice = datetime(1998, 1, 3, tzinfo=UTC)
    ids = [[e.event_id for e in d.tick(s, "c1", notice)[1]] for s in (a, b)]
    assert ids[0] == ids[1] and ids[0]


def test_ledger_events_wait_for_the_clock_and_end_as_if_read_in_event_order():
    """Purchases and redemptions travel on different topics; which is read first must not decide
    whether the balance covers a redemption or which lots it empties (seen in the kill -9 test: a
    redemption read after the next months' purchases, accepted in one run and refused in another)."""
    d = LoyaltyDomain(rules(expiry_months=1))
    buys = [buy(order=f"o{i}", total="100.00", at=T0 + timedelta(days=10 * i)) for i in range(6)]
    spend = redeem(points=50, reward="voucher", at=T0 + timedelta(days=25))
    end = T0 + timedelta(days=90)
    in_order, expected = run(d, sorted([*buys, spend], key=lambda e: e.occurred_at))
    in_order, more = d.tick(in_order, "c1", end)
    expected += more
    assert "PointsRedeemed" in [e.type for e in expected] and "PointsExpired" in [e.type for e in expected]

    # The redemption first, then the purchases, while the clock (the slowest partition) stays at T0.
    state, derived = None, []
    for ev in [spend, *buys]:
        state, o = d.apply(state, ev, T0)
        derived += o
    assert d.due(state, T0) == T0 + timedelta(days=10)  # the first purchase held is due
    view = account_view("c1", state, d, T0.date(), state["entries"])  # what the read API shows meanwhile
    assert view["balance"] == state["balance"] == 100  # the purchase at T0 only: the clock is there
    assert [w["type"][:9] for w in view["waiting"]] == ["PurchaseC"] * 2 + ["PointsRed"] + ["PurchaseC"] * 3
    assert view["waiting"][0]["occurred_at"] == (T0 + timedelta(days=10)).isoformat()
    state, o = d.tick(state, "c1", end)  # the sweep, once the clock has passed them all
    derived += o
    assert state["held"] == []
    assert [e.event_id for e in derived] == [e.event_id for e in expected]
    for key in ("balance", "entries", "lots", "orders", "tier"):
        assert state[key] == in_order[key], key

    # The purchases first, the clock still behind: nothing runs ahead of the redemption.
    state, derived = None, []
    for ev in [*buys, spend]:
        state, o = d.apply(state, ev, T0)
        derived += o
    state, o = d.tick(state, "c1", end)
    derived += o
    assert [e.event_id for e in derived] == [e.event_id for e in expected]
    assert state["entries"] == in_order["entries"]

    # An event the clock has reached releases the held ones before it, first.
    state, _ = d.apply(None, spend, T0)
    state, o = d.apply(state, buys[0], T0)
    state, o = d.apply(state, buys[3], buys[3].occurred_at)
    assert [e.type for e in o if e.type.startswith(("Points", "Redemption"))] == ["PointsRedeemed", "PointsEarned"]
    assert state["held"] == []


def test_a_held_redemption_of_a_customer_without_an_account_is_refused_when_released():
    d = LoyaltyDomain(rules())
    spend = redeem(points=50, reward="voucher", at=T0 + timedelta(days=1))
    state, out = d.apply(None, spend, T0)
    assert out == [] and d.due(state, T0) == spend.occurred_at
    state, out = d.tick(state, "c1", spend.occurred_at)
    assert [(e.type, e.data.reason) for e in out] == [("RedemptionRejected", "insufficient_balance")]
    assert d.due(state, spend.occurred_at) is None


def test_apply_and_tick_never_change_the_state_they_are_given():
    """Orders are copied on write only; every path that changes one must copy it first."""
    import copy

    from services.replay.cdnow import events, first_customers, read_master

    d = LoyaltyDomain(load_rules())
    states: dict = {}
    for _, ev in events(first_customers(read_master(), 400)):
        before = states.get(ev.customer_id)
        frozen = copy.deepcopy(before)
        after, _ = d.apply(before, ev, ev.occurred_at)
        assert before == frozen, f"apply changed its input state ({ev.type} of {ev.customer_id})"
        later = ev.occurred_at + timedelta(days=400)  # expiry, notices, reviews, birthdays
        frozen = copy.deepcopy(after)
        d.tick(after, ev.customer_id, later)
        assert after == frozen, f"tick changed its input state ({ev.customer_id})"
        states[ev.customer_id] = after


def test_loyalty_skips_the_interactions_that_change_no_account():
    from contracts.shop import ConsentChanged, ConsentChangedData, InteractionRecorded, InteractionRecordedData

    d = LoyaltyDomain(rules())
    common = {"event_id": uuid.uuid4(), "occurred_at": T0, "producer": "shop", "customer_id": "c1"}
    survey = InteractionRecorded(**common, data=InteractionRecordedData(kind="survey", channel="web", score=2))
    opt_out = ConsentChanged(**common, data=ConsentChangedData(channel="sms", granted=False, source="web"))
    assert not d.wants(survey) and not d.wants(opt_out)
    # Skipped, not lost: applying them would change nothing but the dedup window and cost a write.
    state, _ = d.apply(None, buy("o1", "30.00"), T0)
    assert d.apply(state, survey, T0) == (state, []) and d.apply(state, opt_out, T0) == (state, [])
    assert all(d.wants(e) for e in (buy(), refund(), redeem()))


def _in(currency: str, ev):
    return ev.model_copy(update={"data": ev.data.model_copy(update={"currency": currency})})


def test_a_discounted_order_earns_the_whole_points_of_its_total():
    """Lines of 10 and 20 (or three of 10) for a total of 10: 10 points, not 9.99... rounded down."""
    d = LoyaltyDomain(rules())
    two = [PurchaseLine(sku="a", category="rock", quantity=1, unit_price=Decimal(10)),
           PurchaseLine(sku="b", category="rock", quantity=1, unit_price=Decimal(20))]  # fmt: skip
    three = [PurchaseLine(sku="a", category="rock", quantity=3, unit_price=Decimal(10))]
    for lines in (two, three):
        state, _ = run(d, [buy("o1", "10.00", lines=lines)])
        assert state["balance"] == 10, lines


def test_a_bad_event_that_waited_for_the_clock_is_refused_and_the_ledger_goes_on():
    d = LoyaltyDomain(rules(points_per_unit={"USD": Decimal(1), "EUR": Decimal(1)}))
    # Refused on arrival, with the reason, instead of waiting: the pipeline dead-letters it.
    with pytest.raises(ValueError, match="no earning rule for currency JPY"):
        d.apply(None, _in("JPY", buy("o1", at=T0 + timedelta(days=1))), T0)
    # Ones that pass on arrival and fail when released (here: the rules lost their currency).
    state, _ = d.apply(None, _in("EUR", buy("o1", at=T0 + timedelta(days=1))), T0)
    state, _ = d.apply(state, _in("EUR", buy("o2", "30.00", at=T0 + timedelta(days=2))), T0)
    narrowed = LoyaltyDomain(rules())
    state, out = narrowed.tick(state, "c1", T0 + timedelta(days=3))
    assert out == [] and state["held"] == [] and state["balance"] == 0
    assert [r[2] for r in state["rejected"]] == ["PurchaseCompleted", "PurchaseCompleted"]
    assert "no earning rule for currency EUR" in state["rejected"][0][3]
    # Later purchases earn: nothing is stuck behind them.
    state, out = narrowed.apply(state, buy("o3", "25.00", at=T0 + timedelta(days=4)), T0 + timedelta(days=4))
    assert state["balance"] == 25 and audit(state) == []


def test_a_refund_in_another_currency_than_its_order_is_refused_not_the_order():
    d = LoyaltyDomain(rules(points_per_unit={"USD": Decimal(1), "EUR": Decimal(1)}))
    early = _in("EUR", refund("o1", "10.00", "r1"))
    state, _ = run(d, [early])  # its order is not known yet: it waits for it
    state, _ = run(d, [buy("o1", "40.00", at=T0 + timedelta(hours=1))], state)
    assert state["balance"] == 40 and state["orders"]["o1"]["reversed"] == 0
    assert state["rejected"][0][1:3] == [str(early.event_id), "PurchaseRefunded"]
    assert "refund r1 is in EUR, order o1 in USD" in state["rejected"][0][3]
    # Once the order is known, the same mismatch is refused on arrival (dead-lettered).
    with pytest.raises(ValueError, match="refund r2 is in EUR, order o1 in USD"):
        run(d, [_in("EUR", refund("o1", "10.00", "r2"))], state)
    assert audit(state) == []


def test_a_late_birthday_adds_nothing_to_a_refunded_order_or_to_expired_points():
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    bday = {"birthday": date(1970, 1, 20)}
    # A refunded order: as if the registration had come first, its doubled points went back too.
    state, _ = run(d, [buy("o1", "100.00"), refund("o1", "100.00", "r1", at=T0 + timedelta(days=1))])
    late, _ = run(d, [register(at=T0 + timedelta(days=2), **bday)], state)
    first, _ = run(d, [register(at=T0 - timedelta(days=1), **bday), buy("o1", "100.00"),
                       refund("o1", "100.00", "r1", at=T0 + timedelta(days=1))])  # fmt: skip
    assert late["balance"] == first["balance"] == 0 and audit(late) == []
    # Half refunded: half the extra.
    state, _ = run(d, [buy("o1", "100.00"), refund("o1", "50.00", "r1", at=T0 + timedelta(days=1))])
    late, _ = run(d, [register(at=T0 + timedelta(days=2), **bday)], state)
    assert late["balance"] == 100 and audit(late) == []
    # Points that expired (12 months) would have taken the extra with them; a later refund takes nothing.
    state, _ = run(d, [buy("o1", "100.00")])
    state, _ = d.tick(state, "c1", T0 + timedelta(days=400))
    assert state["balance"] == 0
    late, out = run(d, [register(at=T0 + timedelta(days=430), **bday)], state)
    assert late["balance"] == 0 and not [e for e in out if e.type == "PointsEarned"]
    after, _ = run(d, [refund("o1", "100.00", "r1", at=T0 + timedelta(days=440))], late)
    assert after["balance"] == 0 and after["debt"] == 0 and audit(after) == []


def test_a_late_birthday_credit_expires_with_its_order():
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    spend = [redeem(50, rid, at=T0 + timedelta(days=1)) for rid in ("x1", "x2")]
    state, _ = run(d, [buy("o1", "100.00"), *spend])
    assert state["lots"] == []  # the order's lot was spent
    late, _ = run(d, [register(at=T0 + timedelta(days=30), birthday=date(1970, 1, 20))], state)
    assert late["balance"] == 100
    assert [x["expires_on"] for x in late["lots"]] == [add_months(T0.date(), 12).isoformat()]


def test_a_refund_after_a_late_birthday_credit_expired_takes_those_points_once():
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    bday = {"birthday": date(1970, 1, 20)}
    spend = [redeem(50, rid, at=T0 + timedelta(days=1)) for rid in ("x1", "x2")]

    def expire_then_refund(state):
        state, _ = d.tick(state, "c1", T0 + timedelta(days=400))
        state, _ = run(d, [refund("o1", "100.00", "r1", at=T0 + timedelta(days=410))], state)
        return state["balance"], state["debt"], audit(state)

    first, _ = run(d, [register(at=T0 - timedelta(days=1), **bday), buy("o1", "100.00"), *spend])
    # Read after the order's lot was spent: the extra goes into a lot of its own, which expires.
    late, _ = run(d, [buy("o1", "100.00"), *spend, register(at=T0 + timedelta(days=30), **bday)])
    assert expire_then_refund(late) == expire_then_refund(first) == (-100, 100, [])


def test_a_registration_read_after_the_orders_points_expired_credits_nothing_that_expired():
    d = LoyaltyDomain(rules(birthday_month_multiplier=Decimal(2)))
    state, _ = run(d, [buy("o1", "100.00")])
    state, _ = d.tick(state, "c1", T0 + timedelta(days=400))
    # Registered the day before buying, read 400 days later: the extra would have expired with the
    # order's lot, so no lot born expired, no second expiry and no notice about it.
    reg = register(at=T0 - timedelta(days=1), birthday=date(1970, 1, 20))
    late, out = d.apply(state, reg, T0 + timedelta(days=400))
    assert late["balance"] == 0 and late["lots"] == []
    assert not [e for e in out if e.type == "PointsEarned"]
    after, out = d.tick(late, "c1", T0 + timedelta(days=401))
    assert not [e for e in out if e.type == "PointsExpired"]
    assert not [e for e in out if e.type == "CareRequested" and e.data.kind == "points_expiring"]
    assert [e["kind"] for e in after["entries"]] == ["earn", "expire"] and audit(after) == []


def test_a_refund_leaves_the_tier_window_with_its_order():
    d = LoyaltyDomain(rules())
    old = datetime(1997, 1, 10, 12, tzinfo=UTC)
    state, _ = run(
        d, [buy("o1", "400.00", at=old), refund("o1", "400.00", "r1", at=datetime(1997, 12, 20, tzinfo=UTC))]
    )
    assert d.qualifying(state, date(1997, 12, 21)) == 0  # while both are in the window
    state, _ = run(d, [buy("o2", "400.00", at=datetime(1998, 2, 1, 12, tzinfo=UTC))], state)
    # The refunded order of January 1997 no longer counts in March 1998, nor does its refund.
    assert d.qualifying(state, date(1998, 3, 1)) == 400
    _, out = d.tick(state, "c1", datetime(1998, 6, 1, tzinfo=UTC))
    assert not [e for e in out if e.type == "TierChanged"]


def test_qualifying_points_go_down_with_refunds():
    d = LoyaltyDomain(rules(qualify_by="points"))
    state, _ = run(d, [buy("o1", "400.00")])
    assert state["tier"] == "Gold" and d.qualifying(state, T0.date()) == 400
    state, _ = run(d, [refund("o1", "400.00", "r1", at=T0 + timedelta(days=1))], state)
    assert d.qualifying(state, (T0 + timedelta(days=1)).date()) == 0


def test_a_referral_is_handed_over_when_read_and_the_referrers_ledger_does_not_depend_on_when_it_came():
    d = LoyaltyDomain(rules())
    # The referee's first purchase is read while the clock is behind it: it waits, but the hand-over
    # goes at once (the service's watermark on crm.referrals promises it is out).
    state, _ = run(d, [register("new", referred_by="old")])
    first = buy("o1", "10.00", cid="new", at=T0 + timedelta(days=1))
    state, out = d.apply(state, first, T0)
    (handed,) = [e for e in out if isinstance(e, ReferralQualified)]
    assert state["held"] and not any(e.type == "PointsEarned" for e in out)
    assert (handed.customer_id, handed.data.referee_id, handed.occurred_at) == ("old", "new", first.occurred_at)
    state, out = d.tick(state, "new", first.occurred_at)  # released: the referee's bonus, no second hand-over
    assert not any(isinstance(e, ReferralQualified) for e in out)
    assert (100, "referral: welcome bonus (referred by old)") in [
        (e.data.points, e.data.reason) for e in out if e.type == "PointsEarned"
    ]

    # The referrer bought before the reward's date and asks for 50 points after it. The reward waits
    # like a ledger event: however late it is read, the ledger is the one of reading in time order.
    own = buy("o7", "10.00", cid="old", at=T0 + timedelta(hours=12))
    spend = redeem(50, "r1", at=T0 + timedelta(days=3), cid="old")
    joined = register("old")
    in_time, derived = run(d, [joined])
    in_time, o = run(d, [own, handed, spend], in_time)
    expected = ([e.event_id for e in derived + o], in_time["balance"], in_time["entries"])
    assert [e["reason"][:9] for e in in_time["entries"]] == ["purchase:", "referral:", "reward vo"]
    for order in ([own, handed, spend], [handed, spend, own], [spend, own, handed]):
        referrer, derived = run(d, [joined])
        for ev in order:
            referrer, o = d.apply(referrer, ev, T0)  # the clock behind all three
            derived += o
        assert referrer["balance"] == 0 and len(referrer["held"]) == 3
        referrer, o = d.tick(referrer, "old", spend.occurred_at)
        derived += o
        assert ([e.event_id for e in derived], referrer["balance"], referrer["entries"]) == expected
    # An account stored before hand-overs moved to the read keeps its word: no second reward.
    old = {**state, "first_seen": None}
    del old["handed_over"]
    _, out = d.apply(old, register("new", referred_by="old", at=T0 + timedelta(days=2)), T0)
    assert not any(isinstance(e, ReferralQualified) for e in out)
