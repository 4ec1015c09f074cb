"""The customer 360 as a pure function: state + event -> new state + derived events.

No I/O and no clock reads: `now` is passed in (event time during replays), the
RFM breakpoints are a value held by the domain object and swapped by the
service when a new version is computed. The state is a JSON-able dict; its
contact fields are plaintext here and encrypted by the store codec.
"""

from __future__ import annotations

import hashlib
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from contracts import Event, derive, scheduled
from contracts.crm import (
    CareRequested,
    CareRequestedData,
    CustomerErased,
    CustomerErasedData,
    LifecycleStageChanged,
    LifecycleStageChangedData,
    ProfileUpdated,
    ProfileUpdatedData,
    SegmentChanged,
    SegmentChangedData,
)
from contracts.shop import (
    ConsentChanged,
    CustomerErasureRequested,
    CustomerRegistered,
    CustomerRegisteredData,
    CustomerUpdated,
    InteractionRecorded,
    PurchaseCompleted,
    PurchaseRefunded,
)
from services.profile import lifecycle, rfm
from services.profile.moments import end_of_local_day, next_greeting
from services.runtime.held import first_due, hold, split_ready

PRODUCER = "profile"
ZERO = Decimal(0)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class ProfileRules:
    followup_days: float = 3.0
    followup_min_gap_days: float = 30.0
    followup_expiry_days: float = 7.0
    birthday_hour: int = 9
    top_categories: int = 3
    lifecycle: lifecycle.LifecycleRules = field(default_factory=lifecycle.LifecycleRules)
    interaction_windows: tuple[int, ...] = (7, 30, 90)
    recent_events: int = 10
    orders_kept: int = 200
    consent_history_kept: int = 50
    # Value of one unit in the currency of the shared cut points (rfm._against).
    currency_rates: dict[str, Decimal] = field(default_factory=lambda: dict(rfm.DEFAULT_RATES))


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    # The domain must not touch its input (the caller keeps it if we fail); a pickle
    # round trip copies these plain dicts several times faster than copy.deepcopy.
    return pickle.loads(pickle.dumps(state, pickle.HIGHEST_PROTOCOL))


def new_state() -> dict[str, Any]:
    return {
        "registered_at": None,
        "contact": {},
        "profile": {"locale": "en", "timezone": "UTC", "preferred_channel": "email"},
        "consent": {},
        "consent_history": [],
        "purchases": {"first": None, "last": None, "orders": 0, "days": 0, "recent_days": []},
        "spend": {},
        "categories": {},
        "orders": {},
        "interactions": {"daily": {}, "totals": {}},
        "complaints": {"open": [], "total": 0},
        "survey": {"last": None, "sum": 0, "count": 0, "last_at": None},
        "rfm": None,
        "value_tier": None,
        "stage": None,
        "care": {"welcomed": False, "thanked": False, "followup": None, "last_followup": None, "greeted_year": None},
        "due": {},
        "recent": [],
        "erased_at": None,
    }


def _new_spend() -> dict[str, Any]:
    return {"gross": "0", "refunded": "0", "orders": 0, "refunded_orders": 0}


# -- reading the state -------------------------------------------------------


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _zone(state: dict[str, Any]) -> ZoneInfo:
    return ZoneInfo((state.get("profile") or {}).get("timezone") or "UTC")


def local_ordinal(state: dict[str, Any], moment: datetime) -> int:
    """The customer's local day of `moment`, as purchase days are counted."""
    return moment.astimezone(_zone(state)).toordinal()


def primary_currency(state: dict[str, Any]) -> str | None:
    spend = state["spend"]
    if not spend:
        return None
    return max(spend, key=lambda c: (spend[c]["orders"], Decimal(spend[c]["gross"])))


def net_spend(state: dict[str, Any], currency: str | None) -> Decimal:
    if currency is None or currency not in state["spend"]:
        return ZERO
    s = state["spend"][currency]
    return max(Decimal(s["gross"]) - Decimal(s["refunded"]), ZERO)


def top_categories(state: dict[str, Any], k: int) -> list[str]:
    cats = state["categories"]
    ranked = sorted(cats, key=lambda c: (-cats[c]["n"], -sum(float(v) for v in cats[c]["s"].values()), c))
    return ranked[:k]


def days_since_last(state: dict[str, Any], now: datetime) -> float | None:
    last = _ts(state["purchases"]["last"])
    return None if last is None else max((now - last).total_seconds() / 86400, 0.0)


def cadence(state: dict[str, Any], rules: ProfileRules) -> float:
    p = state["purchases"]
    first, last = _ts(p["first"]), _ts(p["last"])
    if first is None or last is None:
        return rules.lifecycle.default_cadence_days
    # Local days, as `days` counts them: two purchases on two local days of one UTC date are a day apart.
    first_day, last_day = local_ordinal(state, first), local_ordinal(state, last)
    return lifecycle.cadence_days(first_day, last_day, p["days"], rules.lifecycle)


def snapshot(state: dict[str, Any], rules: ProfileRules) -> dict[str, Any] | None:
    """What crm.profile carries; ProfileUpdated goes out only when this changes."""
    if state is None or state.get("erased_at") or not state.get("registered_at"):
        return None
    c, p = state["contact"], state["profile"]
    return {
        "name": c.get("name"),
        "email": c.get("email"),
        "phone": c.get("phone"),
        "locale": p["locale"],
        "timezone": p["timezone"],
        "preferred_channel": p["preferred_channel"],
        "consents": {ch: bool(state["consent"].get(ch, {}).get("granted")) for ch in ("email", "sms")},
        "birthday": p.get("birthday"),
        "top_categories": top_categories(state, rules.top_categories),
        "value_tier": state["value_tier"],
        "registered_at": state["registered_at"],
    }


def window_counts(state: dict[str, Any], now: datetime, windows: tuple[int, ...]) -> dict[str, dict[str, int]]:
    """Interactions per kind over the last N days, for each window."""
    today = now.astimezone(_zone(state)).date()
    out: dict[str, dict[str, int]] = {}
    for kind, days in state["interactions"]["daily"].items():
        out[kind] = {
            f"{w}d": sum(n for d, n in days.items() if (today - date.fromisoformat(d)).days < w) for w in windows
        }
    return out


def _differs(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    # Top categories that only swap places are not worth a message to every consumer.
    if old is None:
        return True
    return {**new, "top_categories": set(new["top_categories"])} != {
        **old,
        "top_categories": set(old["top_categories"]),
    }


CONTACT_FIELDS = ("name", "email", "phone")
PROFILE_FIELDS = ("birthday", "gender", "locale", "timezone", "preferred_channel", "referred_by")
PRUNED_ORDERS_KEPT = 1000  # keys of orders no longer kept, so that their refunds still count
TICKETS_KEPT = 50  # resolved ticket ids remembered, so a resent resolution plans no second follow-up
# What an update that clears these fields sets them to: a registration's own defaults.
REGISTRATION_DEFAULTS = {
    name: CustomerRegisteredData.model_fields[name].default for name in ("locale", "timezone", "preferred_channel")
}


def _newer_fields(st: dict[str, Any], at: datetime, names) -> list[str]:
    """The fields an event of time `at` may set: those no newer registration or update has set.
    Records their time (`details_at`), so one read late does not undo a newer change."""
    seen = st.setdefault("details_at", {})
    stamp = at.isoformat()
    fresh = [n for n in names if n not in seen or _ts(seen[n]) <= at]
    st["details_at"] = {**seen, **dict.fromkeys(fresh, stamp)}
    return fresh


def _not_before_last(state: dict[str, Any], when: datetime) -> datetime:
    """`when`, or the time of the state's last evaluation if that is later (`as_of`)."""
    last = _ts(state.get("as_of"))
    return last if last is not None and last > when else when


def _digest(value: str) -> str:
    return "#" + hashlib.sha256(value.encode()).hexdigest()[:24]


def _ids_digested(st: dict[str, Any]) -> bool:
    # `erased_at` too: a customer erased before `ids_digested` existed has no flag.
    return bool(st.get("ids_digested") or st.get("erased_at"))


def _order_key(st: dict[str, Any], order_id: str) -> str:
    """How an order (or refund) id is kept: as it is, or only as a digest once the customer was erased."""
    return _digest(order_id) if _ids_digested(st) else order_id


def _net_refund(st, order: dict[str, Any], refund_key: str, amount: Decimal, currency: str, order_id: str) -> Decimal:
    """Net a refund from a kept order (capped at what is left of it, proportionally from its
    categories); the amount that counts."""
    total = Decimal(order["t"])
    amount = min(amount, max(total - Decimal(order["r"]), ZERO))  # a refund never exceeds what was paid
    order["refunds"].append(refund_key)
    if total > 0 and order["c"] == currency:
        share = amount / total
        for cat, cat_amount in order["cats"].items():
            c = st["categories"].get(cat)
            if c is not None and currency in c["s"]:
                c["s"][currency] = str(max(Decimal(c["s"][currency]) - Decimal(cat_amount) * share, ZERO))
    was_open = Decimal(order["r"]) < total
    order["r"] = str(Decimal(order["r"]) + amount)
    if was_open and Decimal(order["r"]) >= total:
        of_order = st["spend"][order["c"]]
        of_order["refunded_orders"] = of_order.get("refunded_orders", 0) + 1
        # No satisfaction survey about an order the customer returned.
        _drop_purchase_followup(st, order_id)
    return amount


def _drop_followup(st: dict[str, Any]) -> None:
    st["care"]["followup"] = None
    st["due"].pop("followup", None)


def _drop_purchase_followup(st: dict[str, Any], order_id: str | None = None) -> None:
    """Cancel a pending purchase follow-up (about this order only, when one is given)."""
    f = st["care"]["followup"]
    if f is not None and f["reason"] == "purchase" and order_id in (None, f["ref"]):
        _drop_followup(st)


# -- the domain ----------------------------------------------------------------


class ProfileDomain:
    ERASING = (CustomerErasureRequested,)

    def __init__(
        self,
        rules: ProfileRules | None = None,
        breakpoints: rfm.Breakpoints = rfm.BOOTSTRAP,
        on_unapplied: Callable[[str, str, str], None] = lambda _type, _event_id, _error: None,
    ):
        self.rules = rules or ProfileRules()
        self.breakpoints = breakpoints
        # Told (type, event id, error) of a waiting event that could not be applied: the
        # composition root logs and counts it, as the pipeline does with a dead letter.
        self.on_unapplied = on_unapplied

    # The pipeline's entry points ------------------------------------------------

    def apply(self, state, event: Event, now: datetime):
        """Apply one event as of `now` (the clock). What waits and fell due by the event's time
        must have been released by `tick` first: the pipeline does so (CATCH_UP_BEFORE_EVENTS)."""
        if type(event) not in _HANDLERS:
            return state, []  # e.g. redemption requests: loyalty's business
        before = state or new_state()
        if isinstance(event, WAITING) and event.occurred_at > now:
            # Under event time, purchases, refunds and interactions wait until the clock has passed
            # them (every partition read that far), and `tick` applies them in event-time order:
            # they travel on two topics, and a follow-up depends on their order (a complaint
            # cancels the one a purchase before it planned, not one planned after it). The fault
            # test's clean run varied in just this way: a complaint read after a later purchase
            # cancels that purchase's follow-up. Under the wall clock only an event dated in the
            # future waits (until then).
            return {**before, "held": hold(before.get("held"), _to_hold(event))}, []
        st, out = self._apply(before, event, now)
        if isinstance(event, CustomerErasureRequested) and st.get("held"):
            # An erasure does not wait (personal data must go when asked), and what waits is applied
            # right after it, as of the same time: counted, with digested ids, asking for no care
            # (the thank-you for a purchase made just before is not sent). No order id read before
            # the erasure waits in the erased customer's state, and nothing runs past the clock.
            waiting, st = st["held"], {**st, "held": []}
            for at, event_id, name, body in waiting:
                st, after = self._apply_waiting(st, at, event_id, name, body, now)
                out += after
        return st, out

    def _apply(self, before: dict[str, Any], event: Event, now: datetime):
        handler = _HANDLERS[type(event)]
        # Judged as of the event's own time when the clock is past it: a batch's clock already
        # stands where its last watermark put it (up to a day on), and recency, stage and segment
        # must not depend on where a batch happened to end. Never before the last evaluation,
        # though: an event read late (after a sweep moved the stage on) would move it back, and
        # the next sweep forward again, each time with an event to every consumer.
        now = _not_before_last(before, min(now, event.occurred_at))
        st = _clone(before)
        out: list[Event] = []
        handler(self, st, event, now, out)
        if not isinstance(event, CustomerErasureRequested):
            self._evaluate(
                st,
                before,
                now,
                out,
                lambda cls, data, disc: derive(cls, event, data, producer=PRODUCER, discriminator=disc),
            )
        st["as_of"] = now.isoformat()
        return st, out

    # The runtime runs `tick` as of an event's time (never past the clock) before applying it: a
    # follow-up or greeting that fell due comes before the purchase that follows it, however late
    # the sweep.
    CATCH_UP_BEFORE_EVENTS = True

    def tick(self, state: dict[str, Any], customer_id: str, now: datetime):
        held = state.get("held")
        if held and first_due(held) <= now:
            return self._release(state, customer_id, now)
        return self._tick(state, customer_id, now)

    def _release(self, state: dict[str, Any], customer_id: str, until: datetime):
        """Apply the waiting events up to `until`, oldest first, each after the time-driven work
        due before it and as of its own time."""
        rest, ready = split_ready(state.get("held"), until)
        st = {**state, "held": rest}
        out: list[Event] = []
        for at, event_id, name, body in ready:
            when = datetime.fromisoformat(at)
            due = self.due(st)
            if due is not None and due <= when:
                st, due_before = self._tick(st, customer_id, when)
                out += due_before
            st, applied = self._apply_waiting(st, at, event_id, name, body, when)
            out += applied
        st, due_after = self._tick(st, customer_id, until)
        return st, out + due_after

    def _apply_waiting(self, st: dict[str, Any], at: str, event_id: str, name: str, body: str, now: datetime):
        """Apply a waiting event. One that fails is recorded in `unapplied` and skipped: read, it
        would have been dead-lettered; waiting, it must not hold back every later one for good."""
        try:
            return self._apply(st, HELD_BY_NAME[name].model_validate_json(body), now)
        except Exception as exc:  # a bug, or a type or contract this version no longer reads
            # The first line only: a validation error's later lines quote the event's values.
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            self.on_unapplied(name, event_id, error)
            unapplied = [*st.get("unapplied", []), [at, event_id, name, error]][-UNAPPLIED_KEPT:]
            return {**st, "unapplied": unapplied}, []

    def _tick(self, state: dict[str, Any], customer_id: str, now: datetime):
        # Not a deep copy: a tick changes only `care` and `due` in place and replaces the scores,
        # tier and stage, so the rest (orders, history) is shared with the input. Most ticks
        # change nothing, and the deep copy of a long history was the sweep's largest cost.
        st = {**state, "care": dict(state["care"]), "due": dict(state["due"])}
        now = _not_before_last(state, now)
        out: list[Event] = []
        if not st.get("erased_at"):
            self._due_followup(st, customer_id, now, out)
            self._due_birthday(st, customer_id, now, out)

        def make(cls, data, disc):
            return scheduled(
                cls, customer_id, data, producer=PRODUCER, occasion=f"{disc}@{now.isoformat()}", occurred_at=now
            )

        self._evaluate(st, state, now, out, make)
        if not out and st == state:
            return state, []  # nothing to write: `as_of` stays where the last change put it
        st["as_of"] = now.isoformat()
        return st, out

    def due(self, state: dict[str, Any], now: datetime | None = None) -> datetime | None:
        """The earliest of: follow-up, birthday greeting, and the next recency threshold (from the
        current breakpoints, so it is computed here rather than stored)."""
        times = [datetime.fromisoformat(v) for v in (state.get("due") or {}).values() if v]
        held = first_due(state.get("held"))
        if held is not None:
            times.append(held)
        recency = self._recency_due(state)
        if recency is not None:
            times.append(recency)
        return min(times) if times else None

    # Event handlers (mutate the clone) --------------------------------------------

    def _registered(self, st, ev: CustomerRegistered, now, out) -> None:
        d = ev.data
        erased = _ts(st.get("erased_at"))
        if erased is not None and ev.occurred_at <= erased:
            return  # a resend of the registration the erasure was about: only a new one starts over
        if erased is not None:
            # A new person as far as care goes: welcomed, thanked for their first purchase and
            # greeted on their own birthday, whatever the erased registration had been sent.
            st["erased_at"] = None
            st["details_at"] = {}
            st["ids_digested"] = True  # the orders kept from before are digests
            st["registered_at"] = None
            st["care"] = new_state()["care"]
        first_time = st["registered_at"] is None
        st["registered_at"] = st["registered_at"] or ev.occurred_at.isoformat()
        # Field by field, unless a newer event already set it (a registration resent after an update).
        fresh = _newer_fields(st, ev.occurred_at, (*CONTACT_FIELDS, *PROFILE_FIELDS))
        values = {"name": d.name, "email": d.email, "phone": d.phone,
                  "birthday": d.birthday.isoformat() if d.birthday else None, "gender": d.gender,
                  "locale": d.locale, "timezone": d.timezone, "preferred_channel": d.preferred_channel,
                  "referred_by": d.referred_by}  # fmt: skip
        for name in fresh:
            (st["contact"] if name in CONTACT_FIELDS else st["profile"])[name] = values[name]
        for channel in ("email", "sms"):
            self._set_consent(st, channel, getattr(d.consents, channel), ev.occurred_at, "registration")
        self._remember(st, ev, f"registered ({d.locale}, {d.timezone})")
        self._plan_birthday(st, ev.occurred_at)  # from the event's time: the same plan whenever it is read
        if first_time and not st["care"]["welcomed"]:
            st["care"]["welcomed"] = True
            out.append(self._care(ev, "welcome", "transactional", st))

    def _updated(self, st, ev: CustomerUpdated, now, out) -> None:
        if st.get("erased_at"):
            return
        d = ev.data
        for name in _newer_fields(st, ev.occurred_at, sorted(d.model_fields_set)):
            value = getattr(d, name)
            if value is None and name in REGISTRATION_DEFAULTS:
                value = REGISTRATION_DEFAULTS[name]  # cleared: back to what a registration without it gets
            if value is None and name == "name":
                continue  # a customer keeps a name: null changes nothing
            if name in CONTACT_FIELDS:
                st["contact"][name] = value
            elif name == "birthday":
                st["profile"]["birthday"] = value.isoformat() if value else None
            else:
                st["profile"][name] = value
        self._remember(st, ev, "details updated: " + ", ".join(sorted(d.model_fields_set)))
        self._plan_birthday(st, ev.occurred_at)

    def _consent(self, st, ev: ConsentChanged, now, out) -> None:
        if st.get("erased_at"):
            return
        d = ev.data
        self._set_consent(st, d.channel, d.granted, ev.occurred_at, d.source)
        self._remember(st, ev, f"{d.channel} consent {'granted' if d.granted else 'revoked'} via {d.source}")

    def _purchase(self, st, ev: PurchaseCompleted, now, out) -> None:
        d = ev.data
        key = _order_key(st, d.order_id)
        if key in st["orders"]:
            return  # the same order under a new event id: a shop resend, counted once
        p = st["purchases"]
        at = ev.occurred_at
        p["orders"] += 1
        if p["first"] is None or at < _ts(p["first"]):
            p["first"] = at.isoformat()
        if p["last"] is None or at > _ts(p["last"]):
            p["last"] = at.isoformat()
        day = at.astimezone(_zone(st)).date().isoformat()
        if day not in p["recent_days"]:
            p["days"] += 1
            p["recent_days"] = sorted([*p["recent_days"], day])[-400:]
        spend = st["spend"].setdefault(d.currency, _new_spend())
        spend["gross"] = str(Decimal(spend["gross"]) + d.total)
        spend["orders"] += 1
        by_cat: dict[str, Decimal] = {}
        for line in d.lines:
            amount = line.unit_price * line.quantity
            by_cat[line.category] = by_cat.get(line.category, ZERO) + amount
            cat = st["categories"].setdefault(line.category, {"n": 0, "s": {}})
            cat["n"] += line.quantity
            cat["s"][d.currency] = str(Decimal(cat["s"].get(d.currency, "0")) + amount)
        st["orders"][key] = {
            "t": str(d.total),
            "c": d.currency,
            "cats": {k: str(v) for k, v in by_cat.items()},
            "r": "0",
            "refunds": [],
        }
        for refund_key, amount, currency in st.get("loose_refunds", {}).pop(key, ()):
            if currency != d.currency:
                continue  # not this order's money: not counted (noted when it was read)
            # Refunded before it was bought (dated so): netted now, as if it had come after.
            applied = _net_refund(st, st["orders"][key], refund_key, Decimal(amount), currency, d.order_id)
            refunded = st["spend"].setdefault(currency, _new_spend())
            refunded["refunded"] = str(Decimal(refunded["refunded"]) + applied)
        if len(st["orders"]) > self.rules.orders_kept:
            pruned = next(iter(st["orders"]))
            del st["orders"][pruned]
            # Its amount stays in spend: a later refund of it is still taken from spend.
            st["pruned_orders"] = [*st.get("pruned_orders", ()), pruned][-PRUNED_ORDERS_KEPT:]
        self._remember(st, ev, f"order {d.order_id}: {sum(x.quantity for x in d.lines)} items, {d.total} {d.currency}")
        if st.get("erased_at"):
            return
        template = {"order_id": d.order_id, "total": str(d.total), "currency": d.currency}
        if not st["care"]["thanked"]:
            st["care"]["thanked"] = True
            out.append(self._care(ev, "first_purchase_thanks", "transactional", st, template))
        order = st["orders"].get(key)
        if order is None or Decimal(order["r"]) < Decimal(order["t"]):  # no survey about a returned order
            self._plan_followup(st, ev, at, "purchase", d.order_id, force=False)

    def _refund(self, st, ev: PurchaseRefunded, now, out) -> None:
        d = ev.data
        order_key, refund_key = _order_key(st, d.order_id), _order_key(st, d.refund_id)
        order = st["orders"].get(order_key)
        amount = d.amount
        if order is None and order_key in st.get("pruned_orders", ()):
            # An order counted long ago and no longer kept: its refund reduces spend only, once.
            if refund_key in st.get("pruned_refunds", ()):
                return
            st["pruned_refunds"] = [*st.get("pruned_refunds", ()), refund_key][-PRUNED_ORDERS_KEPT:]
        elif order is not None:
            if refund_key in order["refunds"]:
                return
            if order["c"] != d.currency:
                # Not this order's money: netting it would mark the order refunded and refund a
                # currency the customer never paid in. Noted, not counted.
                self._remember(
                    st, ev, f"refund {d.refund_id} in {d.currency} of order {d.order_id} in {order['c']}: not counted"
                )
                return
            amount = _net_refund(st, order, refund_key, amount, d.currency, d.order_id)
        else:
            # An order this profile does not know: bought before the CRM went live (or more than
            # `orders_kept` orders ago), or dated after its refund. Its amount is not in spend, so
            # the refund takes nothing from it; kept once per refund id, it is netted from the
            # order if its purchase comes after all.
            loose = st.setdefault("loose_refunds", {})
            if not any(r[0] == refund_key for r in loose.get(order_key, ())):
                loose[order_key] = [*loose.get(order_key, ()), [refund_key, str(amount), d.currency]]
                while len(loose) > self.rules.orders_kept:
                    del loose[next(iter(loose))]
                self._remember(st, ev, f"refund {d.refund_id} on order {d.order_id} (not known): {amount} {d.currency}")
            return
        spend = st["spend"].setdefault(d.currency, _new_spend())
        spend["refunded"] = str(Decimal(spend["refunded"]) + amount)
        self._remember(st, ev, f"refund {d.refund_id} on order {d.order_id}: {amount} {d.currency}")

    def _interaction(self, st, ev: InteractionRecorded, now, out) -> None:
        d = ev.data
        inter = st["interactions"]
        day = ev.occurred_at.astimezone(_zone(st)).date()
        horizon = max(self.rules.interaction_windows)
        daily = inter["daily"].setdefault(d.kind, {})
        daily[day.isoformat()] = daily.get(day.isoformat(), 0) + 1
        for kind_days in inter["daily"].values():
            for old in [k for k in kind_days if (day - date.fromisoformat(k)).days >= horizon]:
                del kind_days[old]
        inter["totals"][d.kind] = inter["totals"].get(d.kind, 0) + 1
        if d.kind == "survey" and d.score is not None:
            s = st["survey"]
            s["last"], s["sum"], s["count"], s["last_at"] = (
                d.score,
                s["sum"] + d.score,
                s["count"] + 1,
                ev.occurred_at.isoformat(),
            )
        ticket = d.ticket_id or str(ev.event_id)
        complaints = st["complaints"]
        if d.ticket_status == "resolved":
            complaints["open"] = [t for t in complaints["open"] if t != ticket]
            # One follow-up per resolution: a resolution sent again (or another message about a
            # ticket resolved already) asks nothing more. A ticket first seen resolved (opened in
            # another system) gets its follow-up.
            resolved = complaints.setdefault("resolved", [])
            if not st.get("erased_at") and ticket not in resolved:
                complaints["resolved"] = [*resolved, ticket][-TICKETS_KEPT:]
                self._plan_followup(st, ev, ev.occurred_at, "ticket", ticket, force=True)
        elif d.kind == "complaint":
            complaints["total"] += 1
            # No "how did we do?" while a complaint is open: the ticket's resolution plans one.
            _drop_purchase_followup(st)
            if ticket not in complaints["open"] and not st.get("erased_at"):
                # Acknowledged once, when the ticket opens (again, after a resolution): further
                # messages about an open ticket are part of the same conversation.
                complaints["open"].append(ticket)
                complaints["resolved"] = [t for t in complaints.get("resolved", []) if t != ticket]
                out.append(self._care(ev, "complaint_acknowledgement", "transactional", st, {"ticket_id": ticket}))
        self._remember(st, ev, f"{d.kind} via {d.channel}" + (f" (score {d.score})" if d.score else ""))

    def _erase(self, st, ev: CustomerErasureRequested, now, out) -> None:
        """Personal data goes; anonymous aggregates (spend, categories, scores) stay."""
        st["contact"] = {}
        st["profile"] = {"locale": "en", "timezone": "UTC", "preferred_channel": "email"}
        st["consent"] = {}
        st["consent_history"] = []
        st["recent"] = []
        # Order and refund ids go; their digests stay, so a resent order is still counted once
        # (and stay digests for good: after a new registration too). Digested once only.
        if not _ids_digested(st):
            st["orders"] = {
                _digest(k): {**v, "refunds": [_digest(r) for r in v["refunds"]]} for k, v in st["orders"].items()
            }
            st["loose_refunds"] = {
                _digest(k): [[_digest(r), amount, cur] for r, amount, cur in v]
                for k, v in st.get("loose_refunds", {}).items()
            }
            for ids in ("pruned_orders", "pruned_refunds"):
                st[ids] = [_digest(k) for k in st.get(ids, ())]
            st["ids_digested"] = True
        st["details_at"] = {}
        st["complaints"]["open"] = []
        st["complaints"]["resolved"] = []
        st["care"]["followup"] = None
        st["due"] = {}
        st.pop("unapplied", None)  # their errors may quote ids
        st["erased_at"] = ev.occurred_at.isoformat()
        out.append(derive(CustomerErased, ev, CustomerErasedData(request_id=ev.data.request_id), producer=PRODUCER))

    # Helpers -------------------------------------------------------------------------

    def _care(self, ev: Event, kind: str, purpose: str, st, template: dict | None = None, **kw) -> Event:
        data = {"locale": st["profile"]["locale"], "top_categories": top_categories(st, self.rules.top_categories)}
        data.update(template or {})
        return derive(
            CareRequested,
            ev,
            CareRequestedData(kind=kind, purpose=purpose, template_data=data, **kw),
            producer=PRODUCER,
            discriminator=kind,
        )

    def _set_consent(self, st, channel: str, granted: bool, at: datetime, source: str) -> None:
        current = st["consent"].get(channel)
        entry = {"channel": channel, "granted": granted, "at": at.isoformat(), "source": source}
        if current is not None and at < _ts(current["at"]):
            # Older than the statement in force (read late, or a resent registration): it goes into
            # the history, in time order, and must not undo a newer revocation or grant.
            if entry not in st["consent_history"]:
                history = sorted([*st["consent_history"], entry], key=lambda h: _ts(h["at"]))
                st["consent_history"] = history[-self.rules.consent_history_kept :]
            return
        if current is not None and current["granted"] == granted:
            if at > _ts(current["at"]):
                # A newer statement that says the same moves the consent's time: a revocation that
                # confirms an earlier one must still outrank a grant dated between them and read
                # late. The history keeps the statement that made the change (its evidence).
                st["consent"][channel] = {**current, "at": at.isoformat(), "confirmed_by": source}
            return
        st["consent"][channel] = {"granted": granted, "at": at.isoformat(), "source": source}
        st["consent_history"] = [*st["consent_history"], entry][-self.rules.consent_history_kept :]

    def _remember(self, st, ev: Event, summary: str) -> None:
        if st.get("erased_at"):
            return  # the recent events name orders and tickets: none are kept after erasure
        st["recent"] = [*st["recent"], {"at": ev.occurred_at.isoformat(), "type": ev.type, "summary": summary}][
            -self.rules.recent_events :
        ]

    def _plan_followup(self, st, ev: Event, at: datetime, reason: str, ref: str, *, force: bool) -> None:
        care = st["care"]
        if not force:
            last = _ts(care["last_followup"])
            if care["followup"] is not None:
                return
            if last is not None and at - last < timedelta(days=self.rules.followup_min_gap_days):
                return
        due = at + timedelta(days=self.rules.followup_days)
        care["followup"] = {"due": due.isoformat(), "cause": str(ev.event_id), "reason": reason, "ref": ref}
        st["due"]["followup"] = due.isoformat()

    def _due_followup(self, st, customer_id: str, now: datetime, out) -> None:
        f = st["care"]["followup"]
        if f is None or _ts(f["due"]) > now:
            return
        due = _ts(f["due"])
        _drop_followup(st)
        st["care"]["last_followup"] = due.isoformat()
        if now - due > timedelta(days=self.rules.followup_expiry_days):
            return  # asking about a purchase weeks later does more harm than good
        data = CareRequestedData(
            kind="satisfaction_follow_up",
            purpose="marketing",
            template_data={
                "locale": st["profile"]["locale"],
                "reason": f["reason"],
                "ref": f["ref"],
                "top_categories": top_categories(st, self.rules.top_categories),
            },
            not_before=due,
        )
        out.append(
            scheduled(
                CareRequested,
                customer_id,
                data,
                producer=PRODUCER,
                occasion="satisfaction_follow_up",
                occurred_at=due,
                cause=uuid.UUID(f["cause"]),
            )
        )

    def _plan_birthday(self, st, now: datetime) -> None:
        bday = st["profile"].get("birthday")
        if not bday or st.get("erased_at"):
            st["due"].pop("birthday", None)
            return
        at = next_greeting(
            date.fromisoformat(bday),
            st["profile"]["timezone"],
            st["care"]["greeted_year"],
            now,
            self.rules.birthday_hour,
        )
        st["due"]["birthday"] = at.isoformat()

    def _due_birthday(self, st, customer_id: str, now: datetime, out) -> None:
        at = _ts(st["due"].get("birthday"))
        if at is None or at > now:
            return
        year = at.year
        st["care"]["greeted_year"] = year
        # Requested however late this runs (a restart, a sweep that came after the next event):
        # the request says until when a greeting makes sense, and notify does not send it after.
        data = CareRequestedData(
            kind="birthday_greeting",
            purpose="marketing",
            template_data={
                "locale": st["profile"]["locale"],
                "top_categories": top_categories(st, self.rules.top_categories),
            },
            not_before=at,
            not_after=end_of_local_day(at),
        )
        # A registration after an erasure is a new customer: their greeting of a year the erased one
        # was greeted in must not share its id (notify would drop it as a redelivery).
        again = f"{st['registered_at']}/" if st.get("ids_digested") and st.get("registered_at") else ""
        occasion = f"birthday/{again}{year}"
        out.append(scheduled(CareRequested, customer_id, data, producer=PRODUCER, occasion=occasion, occurred_at=at))
        self._plan_birthday(st, at)

    def _evaluate(self, st, before, now: datetime, out, make) -> None:
        """Recompute scores, tier and stage; emit only what changed."""
        rules, bp = self.rules, self.breakpoints
        since = days_since_last(st, now)
        cur = primary_currency(st)
        old_rfm = before.get("rfm") if before else None
        if since is not None and cur is not None:
            s = rfm.score(since, st["purchases"]["days"], net_spend(st, cur), cur, bp, rules.currency_rates)
            if old_rfm is None or (old_rfm["r"], old_rfm["f"], old_rfm["m"]) != (s.r, s.f, s.m):
                # The version says which breakpoints produced these scores; a new version that
                # scores the customer the same changes nothing (and costs no write).
                st["rfm"] = {"r": s.r, "f": s.f, "m": s.m, "segment": s.segment, "version": s.version}
        st["value_tier"] = (
            rfm.value_tier(net_spend(st, cur), cur, bp, rules.currency_rates) if st["registered_at"] or cur else None
        )
        cad = cadence(st, rules)
        st["stage"] = lifecycle.stage(st["purchases"]["days"], since, cad, rules.lifecycle)
        if st.get("erased_at"):
            return
        new_rfm = st["rfm"]
        if new_rfm and (old_rfm is None or old_rfm["segment"] != new_rfm["segment"]):
            out.append(
                make(
                    SegmentChanged,
                    SegmentChangedData(
                        from_segment=old_rfm["segment"] if old_rfm else None,
                        to_segment=new_rfm["segment"],
                        recency_score=new_rfm["r"],
                        frequency_score=new_rfm["f"],
                        monetary_score=new_rfm["m"],
                        breakpoints_version=new_rfm["version"],
                    ),
                    new_rfm["segment"],
                )
            )
        old_stage = before.get("stage") if before else None
        if st["stage"] != old_stage:
            out.append(
                make(
                    LifecycleStageChanged,
                    LifecycleStageChangedData(from_stage=old_stage, to_stage=st["stage"]),
                    st["stage"],
                )
            )
        snap = snapshot(st, rules)
        if snap is not None and _differs(snap, snapshot(before, rules)):
            out.append(make(ProfileUpdated, ProfileUpdatedData(**snap), "snapshot"))

    def _recency_due(self, st) -> datetime | None:
        last = _ts(st["purchases"]["last"])
        if last is None:
            return None
        # Measured from the last purchase: the thresholds still ahead of the current scores.
        r = (st.get("rfm") or {}).get("r")
        # R = 5 - (cut points already exceeded), so the next drop comes at cut point 5 - R.
        cuts = list(self.breakpoints.recency_days[5 - r :] if r else self.breakpoints.recency_days)
        stage = st.get("stage")
        limits = list(lifecycle.thresholds(cadence(st, self.rules), self.rules.lifecycle))
        if stage == "declining":
            limits = limits[1:]
        elif stage == "lost":
            limits = []
        candidates = [*cuts, *limits]
        if not candidates:
            return None
        # A second past the threshold: the scores change only once the days exceed it.
        return last + timedelta(days=min(candidates), seconds=1)


# What waits in `held` for the event clock (see `apply`). Registrations, updates and consent
# changes do not: the first two carry name, e-mail and phone, which the state keeps only
# encrypted, and each of their fields (and each channel's consent) keeps the newest statement by
# its time. Nor do erasures: personal data goes when asked.
WAITING = (PurchaseCompleted, PurchaseRefunded, InteractionRecorded)
HELD_BY_NAME = {cls.__name__: cls for cls in WAITING}
UNAPPLIED_KEPT = 20  # the newest waiting events that could not be applied, kept for the read API


def _to_hold(event: Event) -> Event:
    """The event as it waits: an interaction's free text (which may name people) is not used
    here, so it is not stored."""
    if isinstance(event, InteractionRecorded) and event.data.text is not None:
        return event.model_copy(update={"data": event.data.model_copy(update={"text": None})})
    return event


_HANDLERS = {
    CustomerRegistered: ProfileDomain._registered,
    CustomerUpdated: ProfileDomain._updated,
    ConsentChanged: ProfileDomain._consent,
    PurchaseCompleted: ProfileDomain._purchase,
    PurchaseRefunded: ProfileDomain._refund,
    InteractionRecorded: ProfileDomain._interaction,
    CustomerErasureRequested: ProfileDomain._erase,
}
