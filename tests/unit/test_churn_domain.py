"""The churn service's pure core: signals, bands with hysteresis, reasons, the ladder, time-driven checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.crm import ProfileUpdated, ProfileUpdatedData
from contracts.shop import (
    CustomerErasureRequested,
    CustomerErasureRequestedData,
    InteractionRecorded,
    InteractionRecordedData,
)
from services.churn import bgnbd
from services.churn.assess import Assessor, BandRules, band_for
from services.churn.bootstrap import bootstrap_model
from services.churn.domain import ChurnDomain, history
from services.churn.model import auc
from services.churn.signals import History, compute
from tests.support.churn_reference import reference_compute
from tests.support.events import T0, buy, ev

MODEL = bootstrap_model()
RULES = BandRules()


def monthly(n: int = 8):
    return [buy(order=f"o{i}", total="25.00", at=T0 + timedelta(days=30 * i)) for i in range(n)]


def run(domain, events):
    state, out = None, []
    for e in events:
        state, derived = domain.apply(state, e, e.occurred_at)
        out.extend(derived)
    return state, out


def follow_the_clock(domain, state, start, days):
    """Tick whenever `due` says so, as the service's sweep does, until `days` have passed."""
    out, now, end = [], start, start + timedelta(days=days)
    while True:
        now = max(domain.due(state, now), now)
        if now > end:
            return state, out
        state, derived = domain.tick(state, "c1", now)
        out.extend((now, e) for e in derived)
        now += timedelta(minutes=1)


# -- signals and the model --------------------------------------------------------------------


def test_signals_recency_cadence_and_windows():
    h = History(
        first=date(1997, 1, 1),
        purchase_days=4,
        spend={date(1997, 1, 1): 10.0, date(1997, 2, 1): 20.0, date(1997, 4, 1): 30.0, date(1997, 6, 1): 40.0},
        complaints=(date(1997, 5, 1), date(1996, 6, 1), date(1997, 7, 2)),
        low_scores=(date(1997, 8, 1),),
    )
    s = compute(h, date(1997, 7, 1), MODEL.params, 50.0)
    assert s.recency_days == 30
    assert s.cadence_days == pytest.approx(151 / 3)
    assert s.repeat_purchases == 3
    # Apr 1 is 91 days back: the recent window is the last 90 days, the previous one the 90 before.
    assert (s.recent_purchases, s.previous_purchases) == (1, 2)
    assert s.recent_spend == 40.0 and s.previous_spend == 50.0
    # The 1996 one is older than 180 days; the July 2 one and the low score (read early, from
    # another topic) had not happened yet on the day judged.
    assert (s.complaints, s.low_scores) == (1, 0)
    assert 0 < s.p_alive < 1 and s.expected_purchases > 0


def test_one_time_buyers_are_measured_against_the_typical_gap():
    h = History(first=date(1997, 1, 1), purchase_days=1, spend={date(1997, 1, 1): 10.0})
    s = compute(h, date(1997, 3, 2), MODEL.params, 40.0)
    assert s.cadence_days is None and s.usual_gap_days == 40.0 and s.recency_ratio == pytest.approx(60 / 40)


days_1997 = st.integers(0, 600).map(lambda n: date(1997, 1, 1) + timedelta(days=n))


@settings(max_examples=80, deadline=None)
@given(
    spend=st.dictionaries(days_1997, st.floats(0.01, 500.0) | st.integers(1, 300), min_size=1, max_size=12),
    touches=st.dictionaries(days_1997, st.integers(1, 3), max_size=6),
    complaints=st.lists(days_1997, max_size=4),
    low_scores=st.lists(days_1997, max_size=4),
    trimmed=st.integers(0, 3),  # purchase days trimmed from `spend` (older than the kept history)
    probes=st.lists(days_1997, min_size=1, max_size=6),
)
def test_one_timeline_scores_every_day_as_the_reference_does_to_the_bit(
    spend, touches, complaints, low_scores, trimmed, probes
):
    """A band search asks one Timeline about many days: each answer must be what the straightforward
    computation (tests/support/churn_reference.py) gives for that day alone, every field and type."""
    first = min(spend) - timedelta(days=30 * trimmed)
    h = History(
        first=first,
        purchase_days=len(spend) + trimmed,
        spend=spend,
        touches=touches,
        complaints=tuple(complaints),
        low_scores=tuple(low_scores),
    )
    timeline = MODEL.timeline(h)
    dates = [*spend, *touches, *complaints, *low_scores]
    edges = [d + timedelta(days=n) for d in dates for n in (-1, 0, 89, 90, 179, 180, 181)]
    for day in [*probes, *edges, first - timedelta(days=3)]:
        got = timeline.at(day)
        want = reference_compute(h, day, MODEL.params, MODEL.typical_gap_days)
        for name in want.__dataclass_fields__:
            g, w = getattr(got, name), getattr(want, name)
            assert (g, type(g)) == (w, type(w)), (name, day)
    assert compute(h, probes[0], MODEL.params, MODEL.typical_gap_days) == timeline.at(probes[0])


def test_as_of_forgets_what_came_later():
    h = History(
        first=date(1997, 1, 1),
        purchase_days=3,
        spend={date(1997, 1, 1): 1.0, date(1997, 3, 1): 2.0, date(1997, 5, 1): 3.0},
    )
    past = h.as_of(date(1997, 3, 31))
    assert past.purchase_days == 2 and past.last == date(1997, 3, 1)
    assert h.as_of(date(1996, 12, 31)).first is None


@pytest.mark.parametrize(
    "x,t_x,T", [(0, 0.0, 0.0), (0, 0.0, 1e-9), (300, 38.9, 39.0), (5000, 100.0, 100.0), (1, 0.0, 500.0)]
)
def test_bgnbd_quantities_stay_finite_in_the_hard_corners(x, t_x, T):
    p = MODEL.params
    for value in (
        bgnbd.p_alive(p, x, t_x, T),
        bgnbd.expected_purchases(p, 13, x, t_x, T),
        bgnbd.p_no_purchase(p, 13, x, t_x, T),
    ):
        assert math.isfinite(value) and value >= 0
    assert 0 <= bgnbd.p_no_purchase(p, 13, x, t_x, T) <= 1


def test_auc_counts_ties_half_and_orders_correctly():
    assert auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert auc([0.5, 0.5], [1, 0]) == 0.5


# -- bands ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rise,ratio,previous,band",
    [
        (0.0, 0.0, None, "low"),
        (0.7, 0.5, None, "medium"),
        (1.5, 0.5, None, "medium"),  # not overdue yet: never high
        (1.5, 1.2, "medium", "high"),
        (2.5, 3.0, "high", "lost"),
        (0.9, 3.0, "high", "high"),  # within the hysteresis margin below high's entry (1.0)
        (0.7, 3.0, "high", "medium"),
        (0.3, 3.0, "high", "low"),
        (0.45, 3.0, "medium", "medium"),
    ],
)
def test_band_thresholds_and_hysteresis(rise, ratio, previous, band):
    assert band_for(rise, ratio, previous, RULES) == band


@given(st.lists(st.floats(0, 3), min_size=2, max_size=40))
def test_bands_do_not_flap_on_small_wobbles(rises):
    """A rise that wobbles by less than the hysteresis margin changes band at most once per direction."""
    base = rises[0]
    band, changes = None, 0
    for r in rises:
        wobble = base + (r % RULES.hysteresis) * 0.99 - RULES.hysteresis / 2
        new = band_for(wobble, 5.0, band, RULES)
        changes += band is not None and new != band
        band = new
    assert changes <= 1


def test_band_rules_are_validated():
    with pytest.raises(ValueError):
        BandRules(medium=1.0, high=0.5)


# -- the domain --------------------------------------------------------------------------------


def test_regular_purchases_never_put_a_customer_at_risk():
    state, out = run(ChurnDomain(MODEL), monthly())
    # Time passes between purchases: the day a purchase is due may read "medium" until it comes.
    assert {e.data.to_band for e in out if e.type == "ChurnRiskChanged"} <= {"low", "medium"}
    assert not [e for e in out if e.type != "ChurnRiskChanged"]
    assert state["risk"]["band"] == "low" and state["purchase_days"] == 8


def test_a_late_sweep_or_a_purchase_before_the_sweep_derives_what_a_punctual_sweep_does():
    """The ladder and bands walk the same path whenever the service gets to a customer."""
    d = ChurnDomain(MODEL)
    profile = ev(ProfileUpdated, ProfileUpdatedData(value_tier="vip", top_categories=["jazz"]), T0)
    state, _ = run(d, [profile, *monthly()])
    last = T0 + timedelta(days=210)
    punctual, steady = follow_the_clock(d, state, last, 300)
    late_state, late = d.tick(state, "c1", last + timedelta(days=300))
    assert [str(e.event_id) for e in late] == [str(e.event_id) for _, e in steady]
    assert late_state["risk"]["band"] == punctual["risk"]["band"]
    assert late_state["ladder"] == punctual["ladder"]
    # A purchase read before any sweep ran: the at-risk episode it ends is still recorded first.
    comeback = buy(order="back", total="25.00", at=last + timedelta(days=300))
    _, direct = d.apply(state, comeback, comeback.occurred_at)
    swept, before = d.tick(state, "c1", comeback.occurred_at - timedelta(hours=1))
    _, after = d.apply(swept, comeback, comeback.occurred_at)
    assert [str(e.event_id) for e in direct] == [str(e.event_id) for e in before + after]
    assert "CustomerWonBack" in [e.type for e in after]


def test_a_monthly_customer_who_stops_climbs_by_time_alone_one_step_each():
    d = ChurnDomain(MODEL)
    state, _ = run(
        d, [ev(ProfileUpdated, ProfileUpdatedData(value_tier="vip", top_categories=["jazz"]), T0), *monthly()]
    )
    last = T0 + timedelta(days=210)
    state, out = follow_the_clock(d, state, last, 400)
    kinds = [(e.type, getattr(e.data, "to_band", None) or getattr(e.data, "step", None)) for _, e in out]
    assert kinds == [
        ("ChurnRiskChanged", "medium"),
        ("ChurnRiskChanged", "high"),
        ("RetentionRequested", 1),
        ("RetentionRequested", 2),
        ("RetentionTaskCreated", None),
        ("ChurnRiskChanged", "lost"),
    ]
    when = {k: t for (t, e), k in zip(out, kinds, strict=True)}
    assert when[("RetentionRequested", 2)] - when[("RetentionRequested", 1)] == timedelta(days=14)
    high = next(e for _, e in out if getattr(e.data, "to_band", None) == "high")
    assert any("usual gap of 30 days" in r for r in high.data.reasons)
    assert len({e.event_id for _, e in out}) == len(out)


def test_non_vip_customers_get_no_account_manager_task_and_smaller_offers():
    d = ChurnDomain(MODEL)
    state, _ = run(d, [ev(ProfileUpdated, ProfileUpdatedData(value_tier="medium"), T0), *monthly()])
    _, out = follow_the_clock(d, state, T0 + timedelta(days=210), 200)
    types = [e.type for _, e in out]
    assert "RetentionTaskCreated" not in types
    offer = next(e for _, e in out if e.type == "RetentionRequested" and e.data.kind == "offer")
    assert offer.data.template_data["offer_percent"] == 10


def test_a_purchase_after_the_ladder_started_is_a_win_back_once():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    state, _ = follow_the_clock(d, state, T0 + timedelta(days=210), 110)
    assert state["ladder"]["step"] >= 1
    back = buy(order="back", at=T0 + timedelta(days=330))
    state2, out = d.apply(state, back, back.occurred_at)
    won = [e for e in out if e.type == "CustomerWonBack"]
    assert len(won) == 1 and won[0].data.ladder_step == state["ladder"]["step"] and won[0].data.order_id == "back"
    assert state2["ladder"]["step"] == 0 and state2["risk"]["band"] in ("low", "medium")
    # The ladder is reset: the next purchase is no second win-back.
    _, again = d.apply(state2, buy(order="next", at=back.occurred_at + timedelta(days=1)), back.occurred_at)
    assert not [e for e in again if e.type == "CustomerWonBack"]


def test_an_order_resent_under_a_new_event_id_counts_once_and_wins_nobody_back():
    d = ChurnDomain(MODEL)
    orders = monthly()
    state, _ = run(d, orders)
    state, _ = follow_the_clock(d, state, T0 + timedelta(days=210), 110)
    assert state["ladder"]["step"] >= 1
    last = orders[-1]
    resent = buy(order=last.data.order_id, total="25.00", at=last.occurred_at)  # a new event id
    assert resent.event_id != last.event_id
    after, out = d.apply(state, resent, T0 + timedelta(days=320))
    assert not [e for e in out if e.type in ("CustomerWonBack", "ChurnRiskChanged")]
    assert after["spend"] == state["spend"] and after["ladder"] == state["ladder"]


def test_an_event_read_after_the_sweep_moved_the_band_does_not_move_it_back():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    state, _ = follow_the_clock(d, state, T0 + timedelta(days=210), 110)
    assert state["ladder"]["step"] >= 1 and state["risk"]["band"] in ("high", "lost")
    on = datetime.combine(date.fromisoformat(state["risk"]["on"]), time(12), tzinfo=UTC)
    view = ev(InteractionRecorded, InteractionRecordedData(kind="page_view", channel="web"), on - timedelta(days=50))
    after, out = d.apply(state, view, on)
    assert [e.type for e in out if e.type == "ChurnRiskChanged"] == []
    assert after["risk"]["band"] == state["risk"]["band"]
    # A purchase from before the ladder started, read only now, is no win-back.
    old = buy(order="late", at=datetime.fromisoformat(state["ladder"]["at_risk_since"]) - timedelta(days=1))
    _, out = d.apply(state, old, on)
    assert [e.type for e in out if e.type == "CustomerWonBack"] == []


def test_complaints_and_low_scores_raise_the_risk_with_their_reason():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly(3))
    at = T0 + timedelta(days=61)
    calm = d.model.score(d.model.signals(history(state), at.date()))
    complaint = ev(InteractionRecorded, InteractionRecordedData(kind="complaint", channel="phone", ticket_id="t1"), at)
    survey = ev(InteractionRecorded, InteractionRecordedData(kind="survey", channel="web", score=1), at)
    state2, _ = d.apply(state, complaint, at)
    state3, _ = d.apply(state2, survey, at)
    assert state3["risk"]["score"] > calm
    assert state3["risk"]["band"] == "medium"  # not overdue: never high on complaints alone
    assert any("complaint" in r for r in state3["risk"]["reasons"])
    assert any("low survey score" in r for r in state3["risk"]["reasons"])


def test_erased_customers_are_never_contacted_again():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    state, _ = d.apply(
        state,
        ev(
            CustomerErasureRequested,
            CustomerErasureRequestedData(request_id="r1", reason="customer request"),
            T0 + timedelta(days=211),
        ),
        T0,
    )
    _, out = follow_the_clock(d, state, T0 + timedelta(days=211), 300)
    assert not [e for _, e in out if e.type.startswith("Retention")]


def test_the_domain_never_changes_its_input():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    frozen = copy.deepcopy(state)
    d.apply(state, buy(order="x", at=T0 + timedelta(days=400)), T0 + timedelta(days=400))
    d.tick(state, "c1", T0 + timedelta(days=400))
    assert state == frozen


def test_a_due_time_in_the_past_is_walked_at_once_then_lies_ahead_and_nothing_is_due_before_a_purchase():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    now = T0 + timedelta(days=1000)
    assert d.due(state, now) < now  # nobody swept this customer for years: due at once
    state, out = d.tick(state, "c1", now)
    assert [e.data.to_band for e in out if e.type == "ChurnRiskChanged"][-1] == "lost"
    assert d.due(state, now) > now
    again, out = d.tick(state, "c1", now)
    assert out == [] and again is state
    fresh, _ = d.apply(None, ev(ProfileUpdated, ProfileUpdatedData(value_tier="low"), T0), T0)
    assert d.due(fresh, T0) is None


def test_a_refit_ignores_purchases_newer_than_its_day_and_learns_from_the_base():
    from services.churn.model import fit

    base = date(1997, 1, 1)
    histories = {}
    for i in range(300):
        gap = 20 + i % 60
        days = [base + timedelta(days=k * gap) for k in range(1 + (i % 7)) if k * gap < 300]
        histories[f"c{i}"] = History(first=days[0], purchase_days=len(days), spend={d: 10.0 for d in days})
    for i in range(20):  # silent between the split and `today`, back after it
        days = [base, base + timedelta(days=50 + i), base + timedelta(days=250)]
        histories[f"late{i}"] = History(first=days[0], purchase_days=3, spend={d: 10.0 for d in days})
    today = base + timedelta(days=200)  # some histories go on after it, as in a service whose clock lags
    model = fit(histories, today, min_customers=100)
    assert model is not None and model.fitted_on == today.isoformat()
    assert model.params.customers == 320 and model.train_customers == 320
    assert 0 < model.train_positive_rate < 1 and model.train_auc > 0.5
    assert fit(histories, today, min_customers=1000) is None
    # The same fit as from the histories cut at its day: nothing after `today` labels it either.
    cut = fit({c: h.as_of(today) for c, h in histories.items()}, today, min_customers=100)
    assert cut is not None and cut.train_positive_rate == model.train_positive_rate
    assert cut.to_doc()["features"] == model.to_doc()["features"]


def test_remembered_band_changes_are_those_of_the_model_in_use():
    d = ChurnDomain(MODEL)
    state, _ = run(d, monthly())
    first = d.due(state)
    assert d.due(state) == first == ChurnDomain(MODEL).due(state)
    # A refit whose weights are three times larger: risk rises faster, the band changes earlier.
    riskier = dataclasses.replace(MODEL, weights=tuple(3 * w for w in MODEL.weights))
    d.model = riskier
    assert d.due(state) == ChurnDomain(riskier).due(state) != first


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=200), max_size=4),
    st.lists(st.integers(min_value=1, max_value=500 * 24), max_size=12),
)
def test_sweeps_at_any_extra_moments_derive_what_punctual_sweeps_do(buys, complaints, extra_hours):
    """A sweep comes whenever the service gets to it (a rebalance, a restart, another customer's due
    time in the same partition): where the walk stands in between must not change its path."""
    d = ChurnDomain(MODEL)
    events = [buy(order=f"o{i}", total="25.00", at=T0 + timedelta(days=day)) for i, day in enumerate(sorted(set(buys)))]
    events += [
        ev(
            InteractionRecorded,
            InteractionRecordedData(kind="complaint", channel="phone"),
            T0 + timedelta(days=day, hours=1),
        )
        for day in complaints
    ]
    events.sort(key=lambda e: e.occurred_at)
    start = events[-1].occurred_at
    state = None
    for e in events:  # punctually swept up to each event
        state, _ = d.apply(state, e, e.occurred_at)
    _, punctual = follow_the_clock(d, state, start, 500)
    out = []
    for h in [*sorted(extra_hours), 500 * 24]:
        state, derived = d.tick(state, "c1", start + timedelta(hours=h))
        out.extend(derived)
    assert [(str(e.event_id), e.occurred_at) for e in out] == [(str(e.event_id), e.occurred_at) for _, e in punctual]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=8),
    # One interaction a day at most: events at the very same time are ordered by id when held and
    # by offset when not, and a shop's clock does not give two interactions the same microsecond.
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=300), st.sampled_from(["complaint", "survey"])),
        max_size=5,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_the_read_order_across_topics_does_not_change_what_is_derived(buys, touches, rng):
    """Purchases and interactions come on two topics, read in any interleaving; `now` is the low
    watermark (the older of the two topics' newest times read, until a topic is done)."""
    purchases = [buy(order=f"o{i}", total="25.00", at=T0 + timedelta(days=d)) for i, d in enumerate(sorted(set(buys)))]
    interactions = sorted(
        (
            ev(
                InteractionRecorded,
                InteractionRecordedData(kind=kind, channel="web", score=1 if kind == "survey" else None),
                T0 + timedelta(days=d, hours=3),
            )
            for d, kind in touches
        ),
        key=lambda e: e.occurred_at,
    )
    end = T0 + timedelta(days=700)

    def replay(streams):
        d, state, out = ChurnDomain(MODEL), None, []
        newest = {name: T0 - timedelta(days=1) for name, s in streams.items() if s}
        while any(streams.values()):
            name = (
                rng.choice([n for n, s in streams.items() if s])
                if streams is not ordered
                else min((n for n, s in streams.items() if s), key=lambda n: streams[n][0].occurred_at)
            )
            event = streams[name].pop(0)
            newest[name] = event.occurred_at
            if not streams[name]:
                newest.pop(name)  # read to its end: it no longer holds time back
            now = min(newest.values(), default=end)
            state, derived = d.apply(state, event, max(now, T0))
            out += derived
        state, derived = d.tick(state, "c1", end)
        return state, [(e.type, str(e.event_id), e.occurred_at) for e in out + derived]

    ordered = {"purchases": list(purchases), "interactions": list(interactions)}
    expected_state, expected = replay(ordered)
    state, derived = replay({"purchases": list(purchases), "interactions": list(interactions)})
    assert derived == expected
    assert state == expected_state and state["held"] == []


def test_held_events_keep_no_personal_data_and_erasure_drops_them():
    d = ChurnDomain(MODEL)
    early = T0 - timedelta(days=1)  # the clock has not reached the events yet: they wait
    snapshot = ev(
        ProfileUpdated,
        ProfileUpdatedData(name="Quill", email="quill@example.com", value_tier="vip", top_categories=["jazz"]),
        T0,
    )
    note = ev(InteractionRecorded, InteractionRecordedData(kind="feedback", channel="web", text="call me soon"), T0)
    state, out = d.apply(None, snapshot, early)
    state, out = d.apply(state, note, early)
    assert out == [] and len(state["held"]) == 2
    # Words that no event id or timestamp can contain (a random UUID once held "555").
    assert "quill" not in json.dumps(state).lower() and "call me" not in json.dumps(state)
    assert d.due(state) == T0  # released when the clock gets there
    released, _ = d.tick(state, "c1", T0)
    assert released["held"] == [] and released["value_tier"] == "vip" and released["touches"]
    erasure = ev(CustomerErasureRequested, CustomerErasureRequestedData(request_id="r1", reason="asked"), T0)
    erased, _ = d.apply(state, erasure, early)
    assert erased["held"] == [] and erased["erased"]


def test_a_late_purchase_that_takes_a_customer_out_of_risk_ends_the_episode():
    d = ChurnDomain(bootstrap_model())
    tier = ev(ProfileUpdated, ProfileUpdatedData(value_tier="medium", top_categories=["jazz"]), T0)
    state, _ = run(d, [tier, *monthly()])
    last = T0 + timedelta(days=210)
    state, _ = follow_the_clock(d, state, last, 100)
    assert state["ladder"]["step"] >= 1  # the care step went out
    since = datetime.fromisoformat(state["ladder"]["at_risk_since"])
    # Read now, dated before the customer was judged at risk: no win-back, and the episode is over.
    state, out = d.apply(
        state, buy(order="late", total="25.00", at=since - timedelta(days=2)), last + timedelta(days=100)
    )
    assert state["risk"]["band"] == "low" and state["ladder"]["step"] == 0
    assert not [e for e in out if e.type == "CustomerWonBack"]
    # The next drift starts a new episode with its own first step, the care.
    _, out = follow_the_clock(d, state, last + timedelta(days=100), 200)
    steps = [e.data.kind for _, e in out if e.type == "RetentionRequested"]
    assert steps and steps[0] == "care"


def test_a_tier_update_read_before_the_sweep_does_not_change_a_step_due_before_it():
    d = ChurnDomain(bootstrap_model())
    low = ev(ProfileUpdated, ProfileUpdatedData(value_tier="low", top_categories=["jazz"]), T0)
    state, _ = run(d, [low, *monthly()])
    now = T0 + timedelta(days=210)
    while state["ladder"]["step"] < 1:
        now = d.due(state, now)
        state, _ = d.tick(state, "c1", now)
    offer_due = d.due(state, now)
    vip = ev(
        ProfileUpdated, ProfileUpdatedData(value_tier="vip", top_categories=["jazz"]), offer_due + timedelta(days=3)
    )

    def offers(events):
        return [
            (e.occurred_at, e.data.template_data["offer_percent"]) for e in events if e.type == "RetentionRequested"
        ]

    punctual, first = d.tick(state, "c1", offer_due)
    punctual, then = d.apply(punctual, vip, vip.occurred_at)
    late, before = d.apply(state, vip, vip.occurred_at)  # read before the sweep reached the offer
    late, after = d.tick(late, "c1", vip.occurred_at)
    assert offers(first + then) == offers(before + after) and len(offers(before + after)) == 1


def test_an_open_complaint_counts_once_and_its_resolution_takes_it_back():
    d = ChurnDomain(bootstrap_model())
    day = timedelta(days=1)

    def about(ticket, at, status=None):
        data = InteractionRecordedData(kind="complaint", channel="web", ticket_id=ticket, ticket_status=status)
        return ev(InteractionRecorded, data, at)

    last = T0 + timedelta(days=210)
    state, _ = run(d, [*monthly(), about("TKT-42", last + day), about("TKT-42", last + 2 * day)])
    assert len(state["complaints"]) == 1 and "1 complaint in the last 180 days" in state["risk"]["reasons"]
    state, _ = d.apply(state, about("TKT-42", last + 3 * day, "resolved"), last + 3 * day)
    assert state["complaints"] == [] and not any("complaint" in r for r in state["risk"]["reasons"])
    assert "TKT-42" not in json.dumps(state)  # tickets are kept as digests


def test_a_later_interaction_trims_nothing_the_baseline_still_reads():
    d = ChurnDomain(bootstrap_model())
    quarterly = [buy(order=f"o{i}", total="25.00", at=T0 + timedelta(days=90 * i)) for i in range(5)]
    last = T0 + timedelta(days=360)
    complaint = ev(
        InteractionRecorded, InteractionRecordedData(kind="complaint", channel="phone"), last - timedelta(days=10)
    )
    state, _ = run(d, [*quarterly[:4], complaint, quarterly[4]])
    later = last + timedelta(days=175)
    view = ev(InteractionRecorded, InteractionRecordedData(kind="page_view", channel="web"), later)
    viewed, _ = d.apply(state, view, later)
    # The complaint is 185 days older than the page view, but the baseline, scored at the last
    # purchase, counts it: it stays, and the page view changes the history by its touch alone.
    assert viewed["complaints"] == state["complaints"] == [(last - timedelta(days=10)).date().isoformat()]
    untrimmed = copy.deepcopy(state)
    untrimmed["touches"][later.date().isoformat()] = 1
    for day in (later.date(), later.date() + timedelta(days=30)):
        a, b = (Assessor(MODEL, history(st), RULES).assess(day, None) for st in (viewed, untrimmed))
        assert (a.score, a.band, a.reasons) == (b.score, b.band, b.reasons)
