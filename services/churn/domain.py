"""Churn as a pure function: state + event (or the passing of time) -> new state + derived events.

The state keeps a bounded history (purchase days with spend, interaction days,
complaints, low survey scores), the last assessment, and where the customer
stands on the retention ladder. The risk model is a value held by the domain
object and swapped by the service when a refit is adopted.

Risk rises with time alone, so `due` looks ahead: it finds the first day on
which the band would change if nothing happened (probing forward, then
bisecting), and the day the next ladder step is due; the sweep ticks the
customer then. Between checks nothing is computed or written.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from contracts import Event, derive, scheduled
from contracts.crm import (
    ChurnRiskChanged,
    ChurnRiskChangedData,
    CustomerErased,
    CustomerWonBack,
    CustomerWonBackData,
    ProfileUpdated,
    ProfileUpdatedData,
    RetentionRequested,
    RetentionRequestedData,
    RetentionTaskCreated,
    RetentionTaskCreatedData,
    TierChanged,
)
from contracts.shop import CustomerErasureRequested, InteractionRecorded, PurchaseCompleted
from services.churn.assess import AT_RISK, Assessment, Assessor, BandRules
from services.churn.model import RiskModel
from services.churn.signals import ISSUE_DAYS, WINDOW_DAYS, History
from services.runtime.held import first_due, hold, take_ready

PRODUCER = "churn"
# The events whose order matters (see `ChurnDomain.apply`); held by type name until the clock passes them.
ORDERED = (PurchaseCompleted, InteractionRecorded, ProfileUpdated, TierChanged)
ORDERED_BY_NAME = {cls.__name__: cls for cls in ORDERED}
LOW_SCORE = 2  # survey scores at or below this count as dissatisfaction (1-5 scale)
PROBE_DAYS = (1, 2, 4, 8, 16, 32, 60)  # how far ahead `due` looks for a band change; 60 days at most


@dataclass(frozen=True)
class LadderRules:
    offer_after_days: float = 14.0
    task_after_days: float = 7.0
    offer_percent: dict[str, int] = field(default_factory=lambda: {"vip": 20, "high": 15, "medium": 10, "low": 5})
    offer_tier_bonus: dict[str, int] = field(default_factory=lambda: {"Platinum": 5, "Gold": 3, "Silver": 1})
    offer_valid_days: int = 30
    history_days: int = 400


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return pickle.loads(pickle.dumps(state, pickle.HIGHEST_PROTOCOL))


def new_state() -> dict[str, Any]:
    return {
        "first": None,
        "purchase_days": 0,
        "spend": {},
        "touches": {},
        "complaints": [],
        "low_scores": [],
        "value_tier": None,
        "loyalty_tier": None,
        "top_categories": [],
        "erased": False,
        "risk": None,  # {"score", "band", "since", "reasons", "p_alive", "expected_purchases_90d", "on"}
        "ladder": {"step": 0, "episode": 0, "at_risk_since": None, "step_at": None},
        "held": [],  # events the clock has not passed yet (services/runtime/held.py)
        "orders": [],  # digests of the last ORDERS_KEPT order ids: a resent order counts once
    }


def history(st: dict[str, Any]) -> History:
    return History(
        first=date.fromisoformat(st["first"]) if st["first"] else None,
        purchase_days=st["purchase_days"],
        spend={date.fromisoformat(d): v for d, v in st["spend"].items()},
        touches={date.fromisoformat(d): n for d, n in st["touches"].items()},
        complaints=tuple(date.fromisoformat(d) for d in st["complaints"]),
        low_scores=tuple(date.fromisoformat(d) for d in st["low_scores"]),
    )


ORDERS_KEPT = 100
# Due points walked by one catch-up (band changes and ladder steps; about two a month at most).
CATCH_UP_STEPS = 64
# Remembered next band changes, by a 64-bit hash of what they depend on (about 150 bytes each;
# keeping the keys themselves and an Assessor per history held 28 MB for 16,000 of them in a soak).
# Cleared when full. Assessors are kept only for the few histories walked last.
BAND_CHANGE_MEMO = 200_000
ASSESSORS_KEPT = 64


def _digest(value: str) -> str:
    """How an order or ticket id is kept: pseudonymous, enough to recognise it again."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _trim(st: dict[str, Any], today: date, keep_days: int) -> None:
    """Keep `keep_days` of history, and the newest older purchase day (recency at an earlier split needs it).

    Never what an assessment still reads: the baseline is scored at the last purchase day and a
    refit scores WINDOW_DAYS before its day, each looking two windows (and ISSUE_DAYS) back. Trimmed
    by a later, unrelated interaction, a complaint the baseline counted moved the band."""
    last = max(st["spend"]) if st["spend"] else today.isoformat()
    scored = min(date.fromisoformat(last), today - timedelta(days=WINDOW_DAYS))
    # Bounded all the same: a customer who stopped buying years ago but keeps interacting would
    # otherwise keep every interaction for good.
    needed = max(scored - timedelta(days=max(ISSUE_DAYS, 2 * WINDOW_DAYS)), today - timedelta(days=2 * keep_days))
    cutoff = min(today - timedelta(days=keep_days), needed).isoformat()
    old = sorted(d for d in st["spend"] if d < cutoff)
    for d in old[:-1]:
        del st["spend"][d]
    st["touches"] = {d: n for d, n in st["touches"].items() if d >= cutoff}
    issue_cutoff = needed.isoformat()
    st["complaints"] = [d for d in st["complaints"] if d >= issue_cutoff]
    if st.get("open_tickets"):
        st["open_tickets"] = {t: d for t, d in st["open_tickets"].items() if d >= issue_cutoff}
    st["low_scores"] = [d for d in st["low_scores"] if d >= issue_cutoff]


def _checked(st: dict[str, Any]) -> date:
    """The last day on which the band is known not to move (the last assessment, or later)."""
    risk = st["risk"]
    on = date.fromisoformat(risk["on"])
    return max(on, date.fromisoformat(risk["checked"])) if risk.get("checked") else on


def _newest_day(st: dict[str, Any], day: date) -> date:
    """Trim against the newest day the history holds, not the clock: the same events then keep
    the same history in whatever order (and at whatever clock time) they were read."""
    newest = max([*st["spend"], *st["touches"]], default=day.isoformat())
    return max(day, date.fromisoformat(newest))


def _not_before_last(st: dict[str, Any], when: datetime) -> datetime:
    """`when`, or the start of the day of the last assessment if that is later: an event read after
    the sweep had moved the band on is assessed there, not on its own day, which would move the
    band back (and the next sweep forward again, each time with an event)."""
    if st["risk"] is None:
        return when
    last = _midnight(date.fromisoformat(st["risk"]["on"]))
    return last if last > when else when


def _day(t: datetime) -> date:
    return t.astimezone(UTC).date()


class ChurnDomain:
    ERASING = (CustomerErasureRequested, CustomerErased)

    def __init__(self, model: RiskModel, bands: BandRules | None = None, ladder: LadderRules | None = None):
        self._band_changes: dict[int, datetime | None] = {}
        self._assessors: OrderedDict[tuple, Assessor] = OrderedDict()  # by history: the baseline once
        self.model = model
        self.bands = bands or BandRules()
        self.ladder = ladder or LadderRules()

    @property
    def model(self) -> RiskModel:
        return self._model

    @model.setter
    def model(self, model: RiskModel) -> None:
        # Remembered band changes were found with the old model's scores.
        self._model = model
        self._band_changes, self._assessors = {}, OrderedDict()

    def wants(self, event: Event) -> bool:
        # Registrations and customer updates, consent changes, redemption requests and refunds share
        # the shop topics: each would cost a dedup entry and a document write that changes nothing.
        return isinstance(event, ORDERED + self.ERASING)

    # --- events -------------------------------------------------------------------------------
    # Events are applied in event-time order, once the clock (the low watermark of every input
    # partition under event time) has passed them; until then they wait in the state (`held`).
    # Purchases and interactions come on two topics and the profile and tier updates on two more,
    # and nothing orders reads across topics (after a restart, one topic's backlog may be read
    # weeks ahead of another's). The walk of bands and ladder steps depends on the path, so the
    # order is made the events' own. An event is assessed at its own time, not the clock's.

    def apply(self, state: dict[str, Any] | None, event: Event, now: datetime):
        if isinstance(event, self.ERASING):
            st = _clone(state) if state else new_state()
            # No personal data is kept here; what is left is pseudonymous behaviour. An erased
            # customer is never contacted again, so the ladder stops for good. Held events may
            # carry free text (an interaction's): they go too.
            st["erased"] = True
            st["top_categories"] = []
            st["ladder"]["step"] = 0
            st["held"] = []
            return st, []
        if not isinstance(event, ORDERED):
            return state, []
        st = _clone(state) if state else new_state()
        if not st.get("held") and event.occurred_at <= now:
            return st, self._handle(st, event)  # the common case: nothing waits, nothing to order
        st["held"] = hold(st.get("held"), _without_personal_data(event))
        # Not past the event itself: later events of this batch may still come for this customer
        # (a batch is applied in time order); the sweep releases the rest.
        return st, self._release(st, event.customer_id, min(now, event.occurred_at))

    def _handle(self, st: dict[str, Any], event: Event) -> list[Event]:
        """Apply one event to `st` (a copy), after the time-driven work that fell due before it."""
        # What fell due before the event happens first, as of its own time: a step due before a new
        # value or loyalty tier uses the tier in force then, whether or not a sweep got there first.
        before = self._catch_up(st, event.customer_id, event.occurred_at)
        if isinstance(event, ProfileUpdated):
            st["value_tier"] = event.data.value_tier
            st["top_categories"] = list(event.data.top_categories)
            return before
        if isinstance(event, TierChanged):
            st["loyalty_tier"] = event.data.to_tier
            return before
        if isinstance(event, PurchaseCompleted):
            return before + self._purchase(st, event)
        return before + self._interaction(st, event)

    def _release(self, st: dict[str, Any], cid: str, until: datetime) -> list[Event]:
        """Apply the held events the clock has passed, oldest first."""
        derived: list[Event] = []
        st["held"], ready = take_ready(st.get("held"), until, ORDERED_BY_NAME)
        for event in ready:
            derived += self._handle(st, event)
        return derived

    def _purchase(self, st: dict[str, Any], event: PurchaseCompleted) -> list[Event]:
        # The same order under a new event id (a shop resend): counted once, as profile and loyalty
        # do. Counted twice, it doubled the day's spend and "won back" a customer who had not come.
        digest = _digest(event.data.order_id)
        if digest in st.get("orders", ()):
            return []
        st["orders"] = [*st.get("orders", ()), digest][-ORDERS_KEPT:]
        day = _day(event.occurred_at)
        key = day.isoformat()
        if key not in st["spend"]:
            st["purchase_days"] += 1
        st["spend"][key] = st["spend"].get(key, 0.0) + float(event.data.total)
        if st["first"] is None or key < st["first"]:
            st["first"] = key
        derived: list[Event] = []
        ladder = st["ladder"]
        since = datetime.fromisoformat(ladder["at_risk_since"]) if ladder["step"] > 0 else None
        # A purchase from before the customer was at risk (read late) is no win-back.
        if since is not None and not st["erased"] and event.occurred_at >= since:
            derived.append(
                derive(
                    CustomerWonBack,
                    event,
                    CustomerWonBackData(
                        ladder_step=ladder["step"],
                        days_at_risk=max((event.occurred_at - since).total_seconds() / 86400, 0.0),
                        order_id=event.data.order_id,
                    ),
                    producer=PRODUCER,
                )
            )
            ladder.update(step=0, at_risk_since=None, step_at=None)
        _trim(st, _newest_day(st, day), self.ladder.history_days)
        derived += self._reassess(st, event.customer_id, _not_before_last(st, event.occurred_at), cause=event)
        if ladder["step"] > 0 and st["risk"]["band"] not in AT_RISK:
            # A purchase read late, dated before the customer was judged at risk, that takes them out
            # of risk: the episode was a mistake of the missing purchase, not a win-back. Ended, so a
            # later drift starts a new one with its own first step.
            ladder.update(step=0, at_risk_since=None, step_at=None)
        return derived

    def _interaction(self, st: dict[str, Any], event: InteractionRecorded) -> list[Event]:
        key = _day(event.occurred_at).isoformat()
        st["touches"][key] = st["touches"].get(key, 0) + 1
        self._complaint(st, event.data, key)
        if event.data.score is not None and event.data.score <= LOW_SCORE:
            st["low_scores"].append(key)
        _trim(st, _newest_day(st, _day(event.occurred_at)), self.ladder.history_days)
        return self._reassess(st, event.customer_id, _not_before_last(st, event.occurred_at), cause=event)

    @staticmethod
    def _complaint(st: dict[str, Any], d, day: str) -> None:
        """Open complaints count, once per ticket: a ticket's resolution takes its complaint back
        out, and more messages about an open ticket add none. Tickets are kept as digests."""
        tickets = st.setdefault("open_tickets", {})
        ticket = _digest(d.ticket_id) if d.ticket_id else None
        if d.ticket_status == "resolved":
            opened = tickets.pop(ticket, None) if ticket else None
            if opened in st["complaints"]:
                st["complaints"].remove(opened)
        elif d.kind == "complaint" and (ticket is None or ticket not in tickets):
            st["complaints"].append(day)
            if ticket is not None:
                tickets[ticket] = day

    # --- time ---------------------------------------------------------------------------------

    def tick(self, state: dict[str, Any], customer_id: str, now: datetime):
        if state.get("first") is None and not state.get("held"):
            return state, []
        st = _clone(state)
        derived = self._release(st, customer_id, now)
        derived += self._catch_up(st, customer_id, now)
        return (st, derived) if derived or st != state else (state, [])

    def _catch_up(self, st: dict[str, Any], cid: str, until: datetime) -> list[Event]:
        """Band changes and ladder steps that fell due up to `until`, each as of its own due time.

        A sweep that runs late (a restart, a clock that jumped with a big batch) or an event that
        arrives before the sweep got there must not skip a band or a step: the bands' hysteresis
        makes the outcome depend on the path, so the path is walked at the due times, which
        depend on the events only.
        """
        derived: list[Event] = []
        if st.get("first") is None or st["risk"] is None:
            return derived
        for _ in range(CATCH_UP_STEPS):
            at = self._walk_due(st)
            if at is None or at > until:
                # Nothing moves up to `until`. Not remembered as checked: the next search would then
                # start from the day of this call (a sweep's or an event's), and bands that are not
                # monotone in time can be found on another day from another start.
                break
            # The band alone first: most due points move nothing, and an assessment with its
            # reasons costs several times as much.
            band = self._assessor(st, _history_key(st)).band(_day(at), st["risk"]["band"])
            if self._changes(st, band, at):
                derived += self._reassess(st, cid, at, cause=None)
            else:
                st["risk"]["checked"] = max(_day(at), _checked(st)).isoformat()
        return derived

    def due(self, state: dict[str, Any], now: datetime | None = None) -> datetime | None:
        """The next moment the band or the ladder would move, after the last day already checked.

        From the state alone, not from `now`: a due time in the past (events read late, a sweep
        that did not run) makes the sweep walk there at once instead of skipping the way. A held
        event is due at its own time.
        """
        walk, first = self._walk_due(state), first_due(state.get("held"))
        return min((t for t in (walk, first) if t is not None), default=None)

    def _walk_due(self, state: dict[str, Any]) -> datetime | None:
        if state.get("first") is None or state["risk"] is None:
            return None
        times = [self._next_band_change(state, _checked(state))]
        step_due = self._next_step_due(state)
        if step_due is not None:
            times.append(step_due)
        return min(t for t in times if t is not None)

    # --- the assessment and the ladder ---------------------------------------------------------

    def _assessment(self, st: dict[str, Any], now: datetime) -> Assessment:
        previous = st["risk"]["band"] if st["risk"] else None
        return self._assessor(st, _history_key(st)).assess(_day(now), previous)

    def _assessor(self, st: dict[str, Any], hkey: tuple) -> Assessor:
        """One per history, kept for the few walked last: its baseline costs a full assessment."""
        assessor = self._assessors.get(hkey)
        if assessor is None:
            assessor = self._assessors[hkey] = Assessor(self.model, history(st), self.bands)
            if len(self._assessors) > ASSESSORS_KEPT:
                self._assessors.popitem(last=False)
        else:
            self._assessors.move_to_end(hkey)
        return assessor

    def _changes(self, st: dict[str, Any], band: str, now: datetime) -> bool:
        if st["risk"] is None or band != st["risk"]["band"]:
            return True
        due = self._next_step_due(st)
        return due is not None and due <= now and band in AT_RISK

    def _reassess(self, st: dict[str, Any], cid: str, now: datetime, *, cause: Event | None) -> list[Event]:
        """Record the current assessment in `st` (a copy) and return what it leads to."""
        if st["first"] is None:
            return []
        a = self._assessment(st, now)
        previous = st["risk"]["band"] if st["risk"] else None
        derived: list[Event] = []
        since, changes = (st["risk"]["since"], st["risk"].get("changes", 0)) if st["risk"] else (None, 0)
        if a.band != previous:
            since, changes = now.isoformat(), changes + 1
            if previous is not None or a.band != "low":
                data = ChurnRiskChangedData(
                    from_band=previous,
                    to_band=a.band,
                    risk_score=round(a.score, 4),
                    p_alive=round(a.signals.p_alive, 4),
                    reasons=a.reasons,
                )
                derived.append(self._event(ChurnRiskChanged, cid, data, now, cause, f"band/{changes}"))
        st["risk"] = {
            "score": round(a.score, 4),
            "band": a.band,
            "since": since,
            "reasons": a.reasons,
            "p_alive": round(a.signals.p_alive, 4),
            "expected_purchases_90d": round(a.signals.expected_purchases, 4),
            "on": _day(now).isoformat(),
            "changes": changes,  # band transitions so far: makes time-caused event ids unique
        }
        derived += self._climb(st, cid, a, now, cause)
        return derived

    def _climb(self, st: dict[str, Any], cid: str, a: Assessment, now: datetime, cause: Event | None) -> list[Event]:
        ladder = st["ladder"]
        if st["erased"] or a.band not in AT_RISK:
            return []
        derived: list[Event] = []
        if ladder["step"] == 0:
            ladder.update(step=1, episode=ladder["episode"] + 1, at_risk_since=now.isoformat(), step_at=now.isoformat())
            derived.append(self._retention(st, cid, a, now, cause, kind="care"))
        elif (due := self._next_step_due(st)) is not None and due <= now:
            ladder.update(step=ladder["step"] + 1, step_at=now.isoformat())
            if ladder["step"] == 2:
                derived.append(self._retention(st, cid, a, now, cause, kind="offer"))
            else:
                data = RetentionTaskCreatedData(risk_score=round(a.score, 4), value_tier="vip", reasons=a.reasons)
                derived.append(self._event(RetentionTaskCreated, cid, data, now, cause, self._occasion(st)))
        return derived

    def _next_step_due(self, st: dict[str, Any]) -> datetime | None:
        ladder = st["ladder"]
        if st["erased"] or ladder["step"] == 0 or ladder["step_at"] is None:
            return None
        if st["risk"] is None or st["risk"]["band"] not in AT_RISK:
            return None  # the ladder waits while the customer is not at risk
        step_at = datetime.fromisoformat(ladder["step_at"])
        if ladder["step"] == 1:
            return step_at + timedelta(days=self.ladder.offer_after_days)
        if ladder["step"] == 2 and st["value_tier"] == "vip":
            return step_at + timedelta(days=self.ladder.task_after_days)
        return None

    def _retention(self, st, cid: str, a: Assessment, now: datetime, cause, *, kind: str) -> Event:
        template: dict[str, Any] = {"top_categories": st["top_categories"], "recommendations": st["top_categories"]}
        if kind == "offer":
            percent = self.ladder.offer_percent.get(st["value_tier"] or "low", 0)
            percent += self.ladder.offer_tier_bonus.get(st["loyalty_tier"] or "", 0)
            template |= {
                "offer_percent": min(percent, 100),
                "offer_valid_until": (_day(now) + timedelta(days=self.ladder.offer_valid_days)).isoformat(),
                "loyalty_tier": st["loyalty_tier"],
            }
        data = RetentionRequestedData(
            step=st["ladder"]["step"],
            kind=kind,
            band=a.band,
            value_tier=st["value_tier"],
            reasons=a.reasons,
            template_data=template,
        )
        return self._event(RetentionRequested, cid, data, now, cause, self._occasion(st))

    @staticmethod
    def _occasion(st) -> str:
        return f"retention/{st['ladder']['episode']}/{st['ladder']['step']}"

    @staticmethod
    def _event(cls, cid: str, data, now: datetime, cause: Event | None, occasion: str) -> Event:
        if cause is not None:
            return derive(cls, cause, data, producer=PRODUCER, discriminator=occasion, occurred_at=now)
        return scheduled(cls, cid, data, producer=PRODUCER, occasion=occasion, occurred_at=now)

    def _next_band_change(self, st: dict[str, Any], start: date) -> datetime | None:
        """The first day after `start` on which the band would differ if nothing happened (at most 60 days on).

        Remembered by content: the same state is asked again by the runtime after every change, by
        the next event's catch-up and by the sweep, and each answer costs a dozen assessments. The
        key is a hash (a collision between two of a process's states is about 1 in 10^19).
        """
        hkey = _history_key(st)
        key = hash((st["risk"]["band"], start, hkey))
        if key in self._band_changes:
            return self._band_changes[key]
        if len(self._band_changes) >= BAND_CHANGE_MEMO:
            self._band_changes.clear()
        at = self._band_changes[key] = self._probe_band_change(st, start, hkey)
        return at

    def _probe_band_change(self, st: dict[str, Any], start: date, hkey: tuple) -> datetime | None:
        band = st["risk"]["band"]
        assessor = self._assessor(st, hkey)

        def differs(days: int) -> bool:
            return assessor.band(start + timedelta(days=days), band) != band

        lo = 0
        for hi in PROBE_DAYS:
            if differs(hi):
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if differs(mid) else (mid, hi)
                return _midnight(start + timedelta(days=hi))
            lo = hi
        # Nothing within the horizon: look again then (a refit or the windows may change things).
        return _midnight(start + timedelta(days=PROBE_DAYS[-1]))


def _without_personal_data(event: Event) -> Event:
    """What churn needs of a held event: it keeps no contact details or free text, even for a while."""
    if isinstance(event, ProfileUpdated):
        data = ProfileUpdatedData(value_tier=event.data.value_tier, top_categories=event.data.top_categories)
        return event.model_copy(update={"data": data})
    if isinstance(event, InteractionRecorded) and event.data.text is not None:
        return event.model_copy(update={"data": event.data.model_copy(update={"text": None})})
    return event


def _history_key(st: dict[str, Any]) -> tuple:
    """Everything of the state that the band's course in time depends on, besides band and day."""
    return (
        st["first"],
        st["purchase_days"],
        tuple(sorted(st["spend"].items())),
        tuple(sorted(st["touches"].items())),
        tuple(st["complaints"]),
        tuple(st["low_scores"]),
    )


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(0), tzinfo=UTC)
