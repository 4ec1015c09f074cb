"""The profile's pure core: RFM scoring, segments, lifecycle, birthdays across timezones, refund netting."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.shop import (
    ConsentChanged,
    ConsentChangedData,
    Consents,
    CustomerErasureRequested,
    CustomerErasureRequestedData,
    CustomerRegistered,
    CustomerRegisteredData,
    CustomerUpdated,
    CustomerUpdatedData,
    InteractionRecorded,
    InteractionRecordedData,
    PurchaseLine,
    PurchaseRefunded,
    PurchaseRefundedData,
)
from services.profile import domain as domain_module
from services.profile import lifecycle, rfm
from services.profile.domain import ProfileDomain, net_spend, top_categories
from services.profile.moments import birthday_in, greeting_time, next_greeting
from tests.support.events import T0, buy
from tests.support.events import ev as _ev


def reg(at=T0, **kw):
    fields = {"name": "Ann", "email": "ann@example.com", "timezone": "UTC", "consents": Consents(email=True), **kw}
    return _ev(CustomerRegistered, CustomerRegisteredData(**fields), at)


def refund(order="o1", amount="10.00", refund_id="r1", at=T0):
    return _ev(
        PurchaseRefunded, PurchaseRefundedData(order_id=order, refund_id=refund_id, currency="USD", amount=amount), at
    )


def run(domain, events, now=None, state=None):
    out = []
    for e in events:
        state, derived = domain.apply(state, e, now or e.occurred_at)
        out.extend(derived)
    return state, out


def kinds(events):
    return [e.data.kind for e in events if e.type == "CareRequested"]


# -- RFM ------------------------------------------------------------------------

BP = rfm.Breakpoints(
    version=3,
    computed_at=None,
    customers=1000,
    recency_days=(20, 60, 150, 300),
    frequency=(1, 1, 2, 4),
    monetary={"USD": (20, 40, 80, 200)},
    tiers={"USD": (40, 150, 600)},
)


def test_a_minority_currency_is_not_judged_by_another_currencys_cut_points():
    bp = BP.__class__(**{**BP.__dict__, "monetary": {**BP.monetary, "*": (25, 60, 150, 400)},
                         "tiers": {**BP.tiers, "*": (60, 250, 1000)}})  # fmt: skip
    # 5,000 JPY (about 33 USD) among USD buyers: no rate, no verdict, instead of M=5 and VIP.
    assert rfm.monetary_score(Decimal(5000), "JPY", bp, {}) == 3
    assert rfm.value_tier(Decimal(5000), "JPY", bp, {}) is None
    # With a rate it is judged in USD against the shared cut points.
    rates = {"USD": Decimal(1), "JPY": Decimal("0.0067")}
    assert rfm.monetary_score(Decimal(5000), "JPY", bp, rates) == 2  # 33.5 USD
    assert rfm.value_tier(Decimal(5000), "JPY", bp, rates) == "low"
    # A base where no currency has cut points of its own (a new one, or EUR only) shares them as before.
    assert rfm.monetary_score(Decimal(70), "EUR", rfm.BOOTSTRAP, {}) == 3
    assert rfm.value_tier(Decimal(300), "EUR", rfm.BOOTSTRAP, {}) == "high"
    assert rfm.monetary_score(Decimal(70), "USD", bp, {}) == 3  # its own cut points
    # Without shared cut points, the bootstrap's (tiers have three, scores four).
    assert rfm.value_tier(Decimal(5000), "JPY", BP, rates) == "low"


@pytest.mark.parametrize(
    ("days", "score"), [(0, 5), (20, 5), (20.5, 4), (60, 4), (61, 3), (150, 3), (151, 2), (300, 2), (301, 1)]
)
def test_recency_score_falls_once_the_days_exceed_a_breakpoint(days, score):
    assert rfm.recency_score(days, BP) == score


def test_ties_at_a_breakpoint_go_to_the_lower_frequency_score():
    # Half the base bought once: all of them are F=1, not spread over F=1..3.
    assert [rfm.frequency_score(n, BP) for n in (1, 2, 3, 4, 5)] == [1, 3, 4, 4, 5]


def test_monetary_uses_the_currency_breakpoints_and_falls_back_to_the_bootstrap():
    assert rfm.monetary_score(Decimal("250"), "USD", BP) == 5
    assert rfm.monetary_score(Decimal("10"), "USD", BP) == 1
    assert rfm.monetary_score(Decimal("70"), "EUR", BP) == 3  # "*" (bootstrap) cut points 25/60/150/400


@pytest.mark.parametrize(
    ("r", "f", "m", "name"),
    [
        (5, 5, 5, "Champions"),
        (5, 1, 5, "New"),
        (4, 1, 1, "Promising"),
        (4, 4, 4, "Loyal"),
        (5, 2, 3, "Potential Loyalist"),
        (3, 2, 2, "Needs Attention"),
        (2, 4, 3, "At Risk"),
        (1, 5, 5, "Can't Lose"),
        (2, 1, 1, "Hibernating"),
        (1, 1, 2, "Lost"),
        (3, 1, 1, "Needs Attention"),
    ],
)
def test_segment_grid(r, f, m, name):
    assert rfm.segment(r, f, m) == name


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5))
def test_every_score_combination_has_one_of_the_ten_segments(r, f, m):
    assert rfm.segment(r, f, m) in rfm.SEGMENTS


def test_value_tiers_follow_the_population_percentiles():
    assert [rfm.value_tier(Decimal(x), "USD", BP) for x in ("0", "39", "40", "149.99", "150", "600")] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "vip",
    ]


def test_breakpoints_are_population_quintiles_and_need_enough_customers():
    rows = [
        rfm.PopulationRow(days_since_last=i, purchase_days=1 + i % 3, currency="USD", net_spend=i * 10.0)
        for i in range(100)
    ]
    bp = rfm.compute_breakpoints(rows, version=4, now=T0, min_customers=100)
    assert bp is not None and bp.version == 4 and bp.customers == 100
    assert bp.recency_days == (19.8, 39.6, 59.4, 79.2)
    assert bp.monetary["USD"] == (198.0, 396.0, 594.0, 792.0)
    assert bp.tiers["USD"][2] == pytest.approx(940.5)
    assert rfm.Breakpoints.from_doc(bp.to_doc()) == bp
    assert rfm.compute_breakpoints(rows[:99], version=5, now=T0, min_customers=100) is None


def test_recency_cut_points_come_from_repeat_buyers_gaps_once_history_is_long_enough():
    rows = [
        rfm.PopulationRow(days_since_last=300 + i, purchase_days=2, currency="USD", net_spend=10.0, mean_gap_days=i)
        for i in range(1, 101)
    ]
    grown = rfm.compute_breakpoints(rows, version=1, now=T0, history_days=400, min_history_days=180)
    # Gaps of 1..100 days, not days since last purchase (300..400): "recent" is the shop's rhythm.
    assert grown.recency_days == (20.8, 40.6, 60.4, 80.2)
    young = rfm.compute_breakpoints(rows, version=1, now=T0, history_days=30, min_history_days=180)
    assert young.recency_days == rfm.BOOTSTRAP.recency_days


# -- lifecycle --------------------------------------------------------------------

RULES = lifecycle.LifecycleRules()


@pytest.mark.parametrize(
    ("days", "since", "cadence", "stage"),
    [
        (0, None, 90, "new"),
        (1, 5, 90, "new"),
        (2, 5, 10, "growing"),
        (6, 5, 10, "mature"),
        (6, 61, 10, "declining"),  # 2x cadence is 20 days, but never before 60
        (6, 59, 10, "mature"),
        (3, 181, 30, "lost"),
        (3, 121, 60, "declining"),
        (3, 241, 60, "lost"),
    ],
)
def test_lifecycle_stage_relative_to_own_cadence(days, since, cadence, stage):
    assert lifecycle.stage(days, since, cadence, RULES) == stage


def test_cadence_is_the_mean_gap_between_purchase_days():
    assert lifecycle.cadence_days(100, 130, 4, RULES) == 10
    assert lifecycle.cadence_days(100, 100, 1, RULES) == RULES.default_cadence_days


def test_time_alone_moves_a_customer_to_declining_then_lost():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy()])
    assert state["stage"] == "new"
    changes = []
    for day in range(1, 400):
        now = T0 + timedelta(days=day)
        due = d.due(state)
        if due is not None and due <= now:
            state, out = d.tick(state, "c1", now)
            changes += [(day, e.data.to_stage) for e in out if e.type == "LifecycleStageChanged"]
    assert changes == [(181, "declining"), (361, "lost")]  # one purchase: default cadence 90 days


# -- birthdays ---------------------------------------------------------------------


def test_feb_29_birthdays_are_celebrated_on_feb_28_in_common_years():
    assert birthday_in(1997, date(1972, 2, 29)) == date(1997, 2, 28)
    assert birthday_in(2000, date(1972, 2, 29)) == date(2000, 2, 29)


@pytest.mark.parametrize(
    ("tz", "utc_hour", "utc_day"),
    [("Asia/Shanghai", 1, 14), ("America/Los_Angeles", 17, 14), ("Pacific/Kiritimati", 19, 13), ("UTC", 9, 14)],
)
def test_greeting_is_at_nine_local_time(tz, utc_hour, utc_day):
    at = greeting_time(date(1980, 3, 14), 1997, tz).astimezone(UTC)
    assert (at.day, at.hour) == (utc_day, utc_hour)


def test_next_greeting_waits_for_next_year_once_sent_or_once_the_day_is_over():
    bday = date(1980, 3, 14)
    assert next_greeting(bday, "UTC", None, datetime(1997, 3, 14, 20, tzinfo=UTC)).year == 1997  # still the day
    assert next_greeting(bday, "UTC", None, datetime(1997, 3, 15, 0, 1, tzinfo=UTC)).year == 1998
    assert next_greeting(bday, "UTC", 1997, datetime(1997, 3, 14, 8, tzinfo=UTC)).year == 1998


def test_birthday_greeting_once_a_year_in_the_customers_timezone():
    d = ProfileDomain()
    state, _ = run(d, [reg(birthday=date(1972, 2, 29), timezone="Asia/Shanghai")])
    sent = []
    now = T0
    while now < datetime(1999, 1, 1, tzinfo=UTC):
        now += timedelta(hours=1)
        if d.due(state) <= now:
            state, out = d.tick(state, "c1", now)
            sent += [e for e in out if e.type == "CareRequested"]
    assert [e.data.not_before.astimezone(UTC).isoformat() for e in sent] == [
        "1997-02-28T01:00:00+00:00",
        "1998-02-28T01:00:00+00:00",
    ]
    assert len({e.event_id for e in sent}) == 2


# -- purchases, refunds, care ------------------------------------------------------------


def test_refunds_are_netted_proportionally_and_never_exceed_the_order():
    d = ProfileDomain()
    lines = [
        PurchaseLine(sku="a", category="rock", quantity=1, unit_price="30.00"),
        PurchaseLine(sku="b", category="jazz", quantity=1, unit_price="10.00"),
    ]
    state, _ = run(d, [reg(), buy(total="40.00", lines=lines), refund(amount="20.00")])
    assert net_spend(state, "USD") == Decimal("20.00")
    assert Decimal(state["categories"]["rock"]["s"]["USD"]) == Decimal("15.00")
    assert Decimal(state["categories"]["jazz"]["s"]["USD"]) == Decimal("5.00")
    assert state["spend"]["USD"]["refunded_orders"] == 0
    state, _ = d.apply(state, refund(amount="20.00"), T0)  # same refund id again: ignored
    assert net_spend(state, "USD") == Decimal("20.00")
    state, _ = d.apply(state, refund(amount="500.00", refund_id="r2"), T0)  # capped at what is left
    assert net_spend(state, "USD") == Decimal("0")
    assert state["spend"]["USD"]["refunded_orders"] == 1


def test_care_moments_and_no_resend_for_the_same_order():
    d = ProfileDomain()
    complaint = _ev(InteractionRecorded, InteractionRecordedData(kind="complaint", channel="web", ticket_id="T1"))
    state, out = run(d, [reg(), buy(), buy(), complaint])  # second buy(): same order id, new event id
    assert kinds(out) == ["welcome", "first_purchase_thanks", "complaint_acknowledgement"]
    assert state["purchases"]["orders"] == 1
    assert {e.data.purpose for e in out if e.type == "CareRequested"} == {"transactional"}


def test_satisfaction_follow_up_after_n_days_and_after_a_resolved_ticket():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy()])
    state, out = d.tick(state, "c1", T0 + timedelta(days=2))
    assert kinds(out) == []
    state, out = d.tick(state, "c1", T0 + timedelta(days=3, minutes=1))
    assert kinds(out) == ["satisfaction_follow_up"]
    assert out[0].data.not_before == T0 + timedelta(days=3)
    # A second purchase within the 30-day gap asks nothing; a resolved ticket always does.
    state, _ = d.apply(state, buy("o2", at=T0 + timedelta(days=5)), T0 + timedelta(days=5))
    assert "followup" not in state["due"]
    resolved = _ev(
        InteractionRecorded,
        InteractionRecordedData(kind="complaint", channel="web", ticket_id="T1", ticket_status="resolved"),
        T0 + timedelta(days=6),
    )
    state, _ = d.apply(state, resolved, T0 + timedelta(days=6))
    state, out = d.tick(state, "c1", T0 + timedelta(days=9, minutes=1))
    assert kinds(out) == ["satisfaction_follow_up"] and out[0].data.template_data["reason"] == "ticket"


def test_profile_updated_only_when_the_snapshot_changes():
    d = ProfileDomain()
    state, out = run(d, [reg(), buy("o1", "10.00"), buy("o2", "10.00", at=T0 + timedelta(hours=1))])
    assert [e.type for e in out].count("ProfileUpdated") == 2  # registration; top categories appear
    state, out = d.apply(state, buy("o3", "50.00", at=T0 + timedelta(hours=2)), T0 + timedelta(hours=2))
    assert [e.data.value_tier for e in out if e.type == "ProfileUpdated"] == ["medium"]
    consent = _ev(ConsentChanged, ConsentChangedData(channel="sms", granted=True, source="sms-keyword"))
    state, out = d.apply(state, consent, T0)
    assert [e.type for e in out] == ["ProfileUpdated"] and out[0].data.consents.sms is True
    assert state["consent_history"][-1]["source"] == "sms-keyword"


def test_segment_changed_only_on_transitions():
    d = ProfileDomain(breakpoints=BP)
    events = [reg()] + [buy(f"o{i}", at=T0 + timedelta(days=i)) for i in range(5)]
    state, out = run(d, events)
    moves = [(e.data.from_segment, e.data.to_segment) for e in out if e.type == "SegmentChanged"]
    assert moves == [(None, "New"), ("New", "Potential Loyalist"), ("Potential Loyalist", "Champions")]
    assert top_categories(state, 3) == ["rock"]


def test_erasure_drops_personal_data_keeps_aggregates_and_is_announced():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy()])
    erase = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q1", reason="asked"))
    state, out = d.apply(state, erase, T0)
    assert [e.type for e in out] == ["CustomerErased"]
    assert state["contact"] == {} and state["consent_history"] == [] and state["recent"] == []
    assert net_spend(state, "USD") == Decimal("30.00")
    # Later events never bring back care requests or snapshots for an erased customer.
    state, out = d.apply(state, buy("o9"), T0 + timedelta(days=1))
    assert [e.type for e in out if e.type in ("CareRequested", "ProfileUpdated")] == []


def test_a_consent_or_registration_read_late_does_not_undo_a_newer_one():
    d = ProfileDomain()
    revoke = _ev(
        ConsentChanged, ConsentChangedData(channel="email", granted=False, source="link"), T0 + timedelta(days=2)
    )
    grant = _ev(ConsentChanged, ConsentChangedData(channel="email", granted=True, source="web"), T0 + timedelta(days=1))
    moved = _ev(CustomerUpdated, CustomerUpdatedData(email="ann@example.org"), T0 + timedelta(days=3))
    state, _ = run(d, [reg(), revoke, grant, moved])
    assert state["consent"]["email"]["granted"] is False
    assert [h["at"] for h in state["consent_history"]] == sorted(h["at"] for h in state["consent_history"])
    assert len(state["consent_history"]) == 4  # email and sms at registration, then the late grant, then the revocation
    # The registration resent (a new event id, its old time): neither consent nor the new address go back.
    state, out = d.apply(state, reg(), T0 + timedelta(days=4))
    assert state["consent"]["email"]["granted"] is False and state["contact"]["email"] == "ann@example.org"
    assert [e.type for e in out if e.type == "ProfileUpdated"] == []


def test_a_revocation_that_confirms_an_earlier_one_still_outranks_a_grant_read_late():
    d = ProfileDomain()
    day = timedelta(days=1)
    unsubscribe = _ev(ConsentChanged, ConsentChangedData(channel="email", granted=False, source="link"), T0 + 2 * day)
    grant = _ev(ConsentChanged, ConsentChangedData(channel="email", granted=True, source="web"), T0 + day)
    # Registered without e-mail consent, unsubscribed again two days later; a grant dated between
    # the two is read last. The unsubscribe is the newest statement: it stands.
    state, _ = run(d, [reg(consents=Consents(email=False)), unsubscribe], now=T0 + 3 * day)
    state, _ = d.apply(state, grant, T0 + 3 * day)
    in_force = state["consent"]["email"]
    assert (in_force["granted"], in_force["at"], in_force["confirmed_by"]) == (
        False,
        (T0 + 2 * day).isoformat(),
        "link",
    )
    # The history keeps the statements that changed something, the late grant in its place.
    assert [(h["at"], h["granted"]) for h in state["consent_history"] if h["channel"] == "email"] == [
        (T0.isoformat(), False),
        ((T0 + day).isoformat(), True),
    ]


def test_an_update_that_clears_the_timezone_locale_or_channel_sets_the_registration_defaults():
    d = ProfileDomain()
    state, _ = run(
        d, [reg(timezone="Asia/Shanghai", locale="zh-CN", preferred_channel="sms", birthday=date(1980, 3, 1))]
    )
    cleared = _ev(
        CustomerUpdated,
        CustomerUpdatedData(email="new@example.com", timezone=None, locale=None, preferred_channel=None),
        T0 + timedelta(days=1),
    )
    state, _ = d.apply(state, cleared, T0 + timedelta(days=1))
    p = state["profile"]
    assert (p["timezone"], p["locale"], p["preferred_channel"]) == ("UTC", "en", "email")
    assert state["contact"]["email"] == "new@example.com"
    state, out = d.apply(state, buy("o1", at=T0 + timedelta(days=2)), T0 + timedelta(days=2))
    assert "first_purchase_thanks" in kinds(out)


def test_a_ticket_is_acknowledged_once_and_followed_up_once_per_resolution():
    d = ProfileDomain()
    day = timedelta(days=1)

    def about(ticket, at, status=None):
        data = InteractionRecordedData(kind="complaint", channel="web", ticket_id=ticket, ticket_status=status)
        return _ev(InteractionRecorded, data, at)

    state, out = run(d, [reg(), about("T1", T0 + day), about("T1", T0 + 2 * day)])
    assert kinds(out) == ["welcome", "complaint_acknowledgement"] and state["complaints"]["total"] == 2
    state, _ = run(d, [about("T1", T0 + 3 * day, "resolved")], state=state)
    state, out = d.tick(state, "c1", T0 + 7 * day)
    assert kinds(out) == ["satisfaction_follow_up"]
    state, _ = run(d, [about("T1", T0 + 8 * day, "resolved")], state=state)  # the resolution resent
    state, out = d.tick(state, "c1", T0 + 12 * day)
    assert kinds(out) == []
    # Reopened: acknowledged again, and its next resolution is followed up again.
    state, out = run(d, [about("T1", T0 + 40 * day), about("T1", T0 + 41 * day, "resolved")], state=state)
    assert kinds(out) == ["complaint_acknowledgement"]
    state, out = d.tick(state, "c1", T0 + 45 * day)
    assert kinds(out) == ["satisfaction_follow_up"]


def test_a_registration_after_an_erasure_is_cared_for_as_a_new_customer():
    d = ProfileDomain()
    day = timedelta(days=1)
    erase = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q", reason="asked"), T0 + 30 * day)
    state, _ = run(d, [reg(birthday=date(1980, 1, 20)), buy("o1", at=T0 + day)])
    state, greeted = d.tick(state, "c1", T0 + 20 * day)  # greeted for the 1997 birthday
    state, _ = run(d, [erase], state=state)
    again = reg(at=T0 + 60 * day, birthday=date(1990, 3, 15))
    state, out = run(d, [again, buy("o7", at=T0 + 61 * day)], state=state)
    assert kinds(out) == ["welcome", "first_purchase_thanks"]
    assert state["registered_at"] == again.occurred_at.isoformat()
    _, out = d.tick(state, "c1", T0 + 65 * day)  # 15 March 1997: their own birthday, this year
    (greeting,) = [e for e in out if e.type == "CareRequested" and e.data.kind == "birthday_greeting"]
    # Not the erased customer's 1997 greeting again: notify would drop the same id as a redelivery.
    assert greeting.event_id not in {e.event_id for e in greeted}


def test_a_refund_of_an_order_no_longer_kept_still_reduces_spend_once():
    d = ProfileDomain(domain_module.ProfileRules(orders_kept=2))
    state, _ = run(d, [reg(), buy("o1", total="100.00"), buy("o2", total="10.00"), buy("o3", total="10.00")])
    assert "o1" not in state["orders"]
    state, _ = run(d, [refund("o1", "100.00", "r1", at=T0 + timedelta(hours=1))] * 2, state=state)
    assert net_spend(state, "USD") == Decimal("20.00")


def test_an_update_with_a_null_name_keeps_the_name():
    d = ProfileDomain()
    state, _ = run(d, [reg(), _ev(CustomerUpdated, CustomerUpdatedData(name=None), T0 + timedelta(days=1))])
    assert state["contact"]["name"] == "Ann"


def test_after_erasure_later_events_bring_back_no_personal_data_and_orders_count_once():
    d = ProfileDomain()
    complaint = InteractionRecordedData(kind="complaint", channel="web", ticket_id="T-ann-1")
    state, _ = run(d, [reg(), buy("o1"), refund("o1", "5.00", "r1", at=T0 + timedelta(hours=1))])
    erase = _ev(
        CustomerErasureRequested, CustomerErasureRequestedData(request_id="q1", reason="asked"), T0 + timedelta(days=1)
    )
    state, _ = d.apply(state, erase, erase.occurred_at)
    later = T0 + timedelta(days=2)
    events = [buy("o2", at=later), buy("o1", at=T0), refund("o1", "5.00", "r1", at=later),
              _ev(InteractionRecorded, complaint, later), reg(at=T0)]  # fmt: skip
    state, out = run(d, events, state=state)
    text = repr(state)
    for personal in ("o1", "o2", "r1", "T-ann-1", "ann@example.com", "Ann"):
        assert f"'{personal}'" not in text, personal
    assert state["purchases"]["orders"] == 2 and net_spend(state, "USD") == Decimal("55.00")  # o1 and o2, r1 once
    assert state["erased_at"] is not None and state["recent"] == [] and state["complaints"]["total"] == 1
    assert [e.type for e in out if e.type in ("CareRequested", "ProfileUpdated")] == []
    # A second erasure request: still counted once.
    again = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q2", reason="asked"), later)
    state, _ = run(d, [again, buy("o1", at=T0)], state=state)
    assert state["purchases"]["orders"] == 2
    # A new registration, after the erasure, starts over; the old orders still count once.
    state, out = d.apply(state, reg(at=T0 + timedelta(days=5)), T0 + timedelta(days=5))
    assert state["erased_at"] is None and state["contact"]["email"] == "ann@example.com"
    state, _ = run(d, [buy("o2", at=later), refund("o1", "5.00", "r1", at=later)], state=state)
    assert state["purchases"]["orders"] == 2 and net_spend(state, "USD") == Decimal("55.00")


def test_events_ahead_of_the_clock_wait_and_are_applied_in_event_time_order():
    d = ProfileDomain()
    state, _ = run(d, [reg(at=T0 - timedelta(hours=1))])
    clock = T0 - timedelta(minutes=1)  # the interactions partition holds the clock back
    text = "Ann Lee, 555-0100, says the CD arrived damaged"
    complaint = _ev(InteractionRecorded, InteractionRecordedData(kind="complaint", channel="web", ticket_id="T1",
                                                                 text=text), T0 + timedelta(days=1))  # fmt: skip
    state, out = d.apply(state, buy("o1"), clock)
    assert out == [] and state["purchases"]["orders"] == 0 and d.due(state) == T0  # waits for the clock
    state, _ = d.apply(state, complaint, clock)
    assert "damaged" not in repr(state) and len(state["held"]) == 2  # the free text is not kept
    # Once the clock has passed both, in their order: the thank-you, then the complaint cancels
    # the follow-up the purchase planned.
    state, out = d.tick(state, "c1", T0 + timedelta(days=5))
    assert state["held"] == [] and state["purchases"]["orders"] == 1 and state["complaints"]["open"] == ["T1"]
    assert kinds(out) == ["first_purchase_thanks", "complaint_acknowledgement"]


def test_a_new_customer_s_first_event_gives_the_same_events_whether_it_waited_or_not():
    d = ProfileDomain()
    purchase = buy("o1")
    _, direct = d.apply(None, purchase, T0)
    held, nothing = d.apply(None, purchase, T0 - timedelta(minutes=1))
    _, released = d.tick(held, "c1", T0 + timedelta(hours=1))
    assert nothing == [] and [e.event_id for e in released] == [e.event_id for e in direct]
    assert all(e.causation_id == purchase.event_id for e in released)


def test_an_erasure_does_not_wait_and_applies_what_waits_after_it_without_care():
    d = ProfileDomain()
    state, _ = run(d, [reg(at=T0 - timedelta(hours=1))])
    clock = T0  # the other topic holds the clock back
    erase = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q1", reason="asked"),
                T0 + timedelta(days=5))  # fmt: skip
    for event in (buy("o1", at=T0 + timedelta(days=2)), buy("o2", at=T0 + timedelta(days=6))):
        state, _ = d.apply(state, event, clock)
    state, out = d.apply(state, erase, clock)
    assert [e.type for e in out] == ["CustomerErased"] and state["erased_at"] is not None
    assert state["held"] == [] and state["purchases"]["orders"] == 2 and state["contact"] == {}
    assert "'o1'" not in repr(state) and "'o2'" not in repr(state)
    assert datetime.fromisoformat(state["as_of"]) <= clock  # nothing judged past the clock


def test_a_waiting_event_that_cannot_be_applied_is_recorded_and_holds_nothing_back(monkeypatch):
    told = []
    d = ProfileDomain(on_unapplied=lambda *what: told.append(what))
    state, _ = run(d, [reg(at=T0 - timedelta(hours=1))])
    clock = T0 - timedelta(minutes=1)
    bad = _ev(InteractionRecorded, InteractionRecordedData(kind="complaint", channel="web", ticket_id="BAD"), T0)
    for event in (bad, buy("o1", at=T0 + timedelta(hours=1))):
        state, _ = d.apply(state, event, clock)
    # A stored entry of a type this version no longer reads.
    state = {**state, "held": [[T0.isoformat(), "e-old", "LoyaltyCardScanned", "{}"], *state["held"]]}
    real = ProfileDomain._interaction

    def broken(self, st, ev, now, out):
        if ev.data.ticket_id == "BAD":
            raise ValueError("a bug for this event")
        real(self, st, ev, now, out)

    monkeypatch.setitem(domain_module._HANDLERS, InteractionRecorded, broken)
    state, out = d.tick(state, "c1", T0 + timedelta(days=1))
    assert state["held"] == [] and state["purchases"]["orders"] == 1 and "first_purchase_thanks" in kinds(out)
    assert [u[2:] for u in state["unapplied"]] == [
        ["LoyaltyCardScanned", "KeyError: 'LoyaltyCardScanned'"],
        ["InteractionRecorded", "ValueError: a bug for this event"],
    ]
    assert told == [("LoyaltyCardScanned", "e-old", "KeyError: 'LoyaltyCardScanned'"),
                    ("InteractionRecorded", str(bad.event_id), "ValueError: a bug for this event")]  # fmt: skip
    erase = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q1", reason="asked"),
                T0 + timedelta(days=2))  # fmt: skip
    state, _ = d.apply(state, erase, erase.occurred_at)
    assert "unapplied" not in state  # its errors may quote ids


def test_a_customer_erased_before_ids_were_flagged_keeps_counting_orders_once():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy("o1")])
    erase = _ev(
        CustomerErasureRequested, CustomerErasureRequestedData(request_id="q1", reason="asked"), T0 + timedelta(days=1)
    )
    state, _ = d.apply(state, erase, erase.occurred_at)
    legacy = {k: v for k, v in state.items() if k != "ids_digested"}  # as stored by an earlier version
    later = T0 + timedelta(days=2)
    again = _ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="q2", reason="asked"), later)
    for st0 in (legacy, state):
        st, _ = run(d, [again, buy("o1", at=T0)], state=st0)
        assert st["purchases"]["orders"] == 1
        st, _ = run(d, [reg(at=T0 + timedelta(days=5)), buy("o1", at=T0)], state=st)
        assert st["purchases"]["orders"] == 1 and "'o1'" not in repr(st["orders"])


def test_no_satisfaction_follow_up_for_a_returned_order_or_during_a_complaint():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy("o1"), refund("o1", "30.00", "r1", at=T0 + timedelta(days=1))])
    assert state["care"]["followup"] is None
    _, out = d.tick(state, "c1", T0 + timedelta(days=4))
    assert "satisfaction_follow_up" not in kinds(out)
    complaint = _ev(InteractionRecorded, InteractionRecordedData(kind="complaint", channel="web", ticket_id="T1"),
                    T0 + timedelta(days=40, hours=1))  # fmt: skip
    state, _ = run(d, [buy("o2", at=T0 + timedelta(days=40)), complaint], state=state)
    _, out = d.tick(state, "c1", T0 + timedelta(days=44))
    assert "satisfaction_follow_up" not in kinds(out)


def test_an_event_read_after_a_sweep_moved_the_stage_does_not_move_it_back():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy("o1"), buy("o2", at=T0 + timedelta(days=10))])
    swept, moved = T0 + timedelta(days=10), []
    while not moved:  # the sweep, at each due time, until the stage moves by time alone
        swept = max(d.due(state, swept), swept + timedelta(seconds=1))
        state, out = d.tick(state, "c1", swept)
        moved = [(e.data.from_stage, e.data.to_stage) for e in out if e.type == "LifecycleStageChanged"]
        assert swept < T0 + timedelta(days=400)
    late = _ev(
        InteractionRecorded, InteractionRecordedData(kind="page_view", channel="web"), swept - timedelta(hours=2)
    )
    state, out = d.apply(state, late, swept)
    assert [e.type for e in out if e.type in ("LifecycleStageChanged", "SegmentChanged")] == []
    _, out = d.tick(state, "c1", swept + timedelta(hours=1))
    assert [e.type for e in out if e.type in ("LifecycleStageChanged", "SegmentChanged")] == []


def test_apply_never_mutates_its_input_and_tick_returns_the_same_state_when_idle():
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy()])
    frozen = copy.deepcopy(state)
    d.apply(state, buy("o2"), T0)
    assert state == frozen
    same, out = d.tick(state, "c1", T0 + timedelta(hours=1))
    assert same is state and out == []


def test_tick_never_mutates_its_input_when_it_changes_the_state():
    """Follow-up, birthday greeting, segment, stage and tier move in one tick; the input stays as it was."""
    d = ProfileDomain()
    state, _ = run(d, [reg(birthday=date(1972, 3, 10)), buy(), buy("o2", at=T0 + timedelta(days=3))])
    frozen = copy.deepcopy(state)
    later = T0 + timedelta(days=400)
    ticked, out = d.tick(state, "c1", later)
    assert state == frozen
    assert ticked != state and {"CareRequested", "LifecycleStageChanged"} <= {e.type for e in out}
    assert ticked["care"]["greeted_year"] is not None and ticked["stage"] != state["stage"]


def test_a_greeting_reached_late_is_still_requested_with_its_deadline():
    """Whether a sweep ran on the day or days later, the same request (id, time, deadline) is made."""
    d = ProfileDomain()
    state, _ = run(d, [reg(birthday=date(1972, 3, 10), timezone="Asia/Shanghai")])
    on_day, punctual = d.tick(state, "c1", datetime(1997, 3, 10, 2, tzinfo=UTC))
    days_later, late = d.tick(state, "c1", datetime(1997, 3, 20, tzinfo=UTC))
    greet = [e for e in punctual if e.type == "CareRequested"]
    assert [e.event_id for e in greet] == [e.event_id for e in late if e.type == "CareRequested"]
    assert greet[0].data.not_after == datetime(1997, 3, 11, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert d.due(on_day) == d.due(days_later)


def test_an_event_is_judged_at_its_own_time_when_the_clock_is_past_it():
    # Under a replay the clock may stand up to a day past a batch's events (the batch's last watermark).
    d = ProfileDomain()
    state, _ = run(d, [reg(), buy()])
    data = InteractionRecordedData(kind="survey", channel="web", score=4)
    survey = _ev(InteractionRecorded, data, T0 + timedelta(days=179, hours=20))
    on_time = d.apply(state, survey, survey.occurred_at)
    late_clock = d.apply(state, survey, survey.occurred_at + timedelta(hours=10))
    assert on_time[0] == late_clock[0]
    assert [(e.type, e.event_id) for e in on_time[1]] == [(e.type, e.event_id) for e in late_clock[1]]
    assert on_time[0]["stage"] != "declining"  # 180 days after the purchase: by the clock, not yet by the event


def test_the_service_logs_and_counts_what_could_not_be_applied(caplog):
    from prometheus_client import CollectorRegistry

    from services.profile.app import UnappliedEvents

    registry, unapplied = CollectorRegistry(), UnappliedEvents()
    unapplied.register(registry)
    unapplied("InteractionRecorded", "e1", "ValueError: a bug")
    assert registry.get_sample_value("crm_profile_events_unapplied_total", {"type": "InteractionRecorded"}) == 1
    assert "e1 could not be applied" in caplog.text


def test_a_refund_of_an_order_not_known_takes_nothing_from_spend_until_its_purchase_comes():
    d = ProfileDomain()
    hour = timedelta(hours=1)
    # Dated an hour before its order: applied first in event time, then netted from the order.
    state, _ = run(d, [reg(), refund("o1", "30.00", "r1", at=T0), buy("o1", total="30.00", at=T0 + hour)])
    assert net_spend(state, "USD") == 0 and state["spend"]["USD"]["refunded_orders"] == 1
    assert state["care"]["followup"] is None  # no survey about a returned order
    # The same refund resent under a new event id is not counted again.
    state, _ = run(d, [refund("o1", "30.00", "r1", at=T0)], state=state)
    assert Decimal(state["spend"]["USD"]["refunded"]) == Decimal("30.00")
    # A refund of an order from before the CRM went live does not hide what was bought since.
    state, _ = run(d, [reg(), buy("o2", total="30.00"), refund("old", "500.00", "r9", at=T0 + hour)])
    assert net_spend(state, "USD") == Decimal("30.00")
    # One in another currency than its order's, read before that order: not counted when it comes.
    eur = _ev(PurchaseRefunded, PurchaseRefundedData(order_id="o5", refund_id="r5", currency="EUR", amount="30.00"), T0)
    state, _ = run(d, [reg(), eur, buy("o5", total="30.00", at=T0 + hour)])
    assert net_spend(state, "USD") == Decimal("30.00") and "EUR" not in state["spend"]


def test_cadence_counts_the_customers_local_days():
    d = ProfileDomain()
    # 19:00 and 01:00 in Tokyo: two local days, one UTC date.
    tokyo = reg(at=datetime(2024, 1, 1, tzinfo=UTC), timezone="Asia/Tokyo")
    state, _ = run(d, [tokyo, buy("a", at=datetime(2024, 1, 1, 10, tzinfo=UTC)),
                       buy("b", at=datetime(2024, 1, 1, 16, tzinfo=UTC))])  # fmt: skip
    assert state["purchases"]["days"] == 2
    assert domain_module.cadence(state, d.rules) == 1.0
