"""The loyalty ledger, pure: state + event -> new state + derived events. No I/O.

An account is an append-only list of entries, each with a reason, the event that
caused it and the running balance, plus the lots the points live in:

    balance == sum(entry.points) == sum(lot.remaining) - debt      (checked by `audit`)

Points are earned into a lot that expires `expiry_months` later; redemptions and
refund reversals spend the first-to-expire lots first (a reversal takes from its own
order's lot first). A reversal larger than what is left makes the balance negative:
the shortfall is `debt`, paid off by the next points earned, never an error.

Besides the pipeline's dedup on event ids, every business key is applied once:
an order earns once, a refund reverses once, a redemption id is used once, a
referral rewards once; so the ledger never depends on redelivery.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from contracts import Event
from contracts.crm import (
    CareRequested,
    CareRequestedData,
    PointsEarned,
    PointsEarnedData,
    PointsExpired,
    PointsExpiredData,
    PointsRedeemed,
    PointsRedeemedData,
    PointsReversed,
    PointsReversedData,
    RedemptionRejected,
    RedemptionRejectedData,
    ReferralQualified,
    ReferralQualifiedData,
    TierChanged,
    TierChangedData,
)
from contracts.envelope import derive, derive_from_ids, derived_id, scheduled
from contracts.shop import (
    CustomerErasureRequested,
    CustomerRegistered,
    CustomerUpdated,
    PointsRedemptionRequested,
    PurchaseCompleted,
    PurchaseRefunded,
)
from services.loyalty.rules import Rules
from services.runtime.held import first_due, hold, take_ready

PRODUCER = "loyalty"
KEPT_KEYS = 1000  # refund and redemption ids remembered for dedup
REJECTED_KEPT = 50


class LedgerRejection(ValueError):
    """A ledger event that cannot be applied to this account (its currency, its order's currency).

    Raised while the event itself is applied, it is dead-lettered with the reason. Found only later
    (an event that waited for the event clock, a refund that waited for its purchase), it is kept
    in the account's `rejected` list instead, and the ledger goes on: one bad event must not stop
    every later one of the customer."""


def new_state() -> dict[str, Any]:
    return {
        "profile": {"birthday": None, "timezone": "UTC", "referred_by": None},
        "balance": 0,
        "debt": 0,
        "entries": [],
        "lots": [],
        "orders": {},
        "refunds": [],
        "redemptions": [],
        "spend": [],  # [day, amount, points] of purchases (+) and refunds (-) in the qualifying window
        "tier": None,
        "downgrade": None,  # {"warned_at", "at", "to"} while a downgrade is pending
        "next_review": None,
        "purchases": 0,
        "referral_rewarded": False,  # the referee's bonus
        "handed_over": False,  # the referrer's reward (`_hand_over`)
        "first_seen": None,  # the first purchase read, before it is applied
        "referees_rewarded": [],
        "first_purchase": None,
        "pending_refunds": {},
        "birthday_year": None,
        "notified_lots": [],
        "held": [],  # ledger events waiting for the event clock (see `apply`)
        # Ledger events refused after they were accepted (`LedgerRejection`): [time, id, type, reason].
        "rejected": [],
        "erased": False,
        "archived": nothing_archived(),  # the entries moved to ledger pages (`close_pages`)
    }


def nothing_archived() -> dict[str, Any]:
    """What an account has moved out to ledger pages: the ids of its pages in order, how many entries
    they hold, the running balance after the last of them, and their points by kind."""
    return {"pages": [], "entries": 0, "balance": 0, "points": {}}


_NONE_ARCHIVED = nothing_archived()  # read only: accounts stored before pages existed lack the key


def archived(state: dict[str, Any]) -> dict[str, Any]:
    return state.get("archived") or _NONE_ARCHIVED


def next_seq(state: dict[str, Any]) -> int:
    return archived(state)["entries"] + len(state["entries"]) + 1


def page_id(customer_id: str, entries: list[dict[str, Any]]) -> str:
    """A ledger page's `_id`: the customer, the first sequence number, and a digest of the entries.

    One customer's pages are one `_id` range, in order (a customer id has no space: printable ASCII,
    contracts.types.CustomerId). The digest makes a page that differs (written by a replica that
    lost the customer's partition but was still writing, or before a crash by a run that read
    the events in another order) another document, never an overwrite of the page the account lists.
    """
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return f"{customer_id} {entries[0]['seq']:09d} {digest}"


def page_first_seq(page: str) -> int:
    return int(page.split(" ")[1])


def close_pages(
    state: dict[str, Any], size: int, customer_id: str
) -> tuple[dict[str, Any], list[tuple[str, list[dict[str, Any]]]]]:
    """Move the oldest entries out of the account, `size` at a time, while it holds `size` or more.

    The account keeps what the domain needs (balance, lots, orders) and at most `size - 1` entries,
    so its document and its cached copy do not grow with every entry; the entries moved out are
    written as ledger pages, `(id, entries)`, before the account is. Returns the state unchanged
    and no pages when there is nothing to close.
    """
    entries = state["entries"]
    if len(entries) < size:
        return state, []
    n = len(entries) - len(entries) % size
    pages = [(page_id(customer_id, entries[i : i + size]), entries[i : i + size]) for i in range(0, n, size)]
    done = archived(state)
    points = dict(done["points"])
    for e in entries[:n]:
        points[e["kind"]] = points.get(e["kind"], 0) + e["points"]
    st = dict(state)
    st["entries"] = entries[n:]
    st["archived"] = {
        "pages": [*done["pages"], *(pid for pid, _ in pages)],
        "entries": done["entries"] + n,
        "balance": entries[n - 1]["balance"],
        "points": points,
    }
    return st, pages


def _copy(state) -> dict[str, Any]:
    if state is None:
        return new_state()
    st = dict(state)
    for k in ("entries", "refunds", "redemptions", "spend", "referees_rewarded", "notified_lots"):
        st[k] = list(state[k])
    st["lots"] = [dict(lot) for lot in state["lots"]]
    # Orders are copied on write (`_order`): an account keeps every order, and copying them all
    # for every event and tick was the largest single cost of the domain (a CDNOW replay, profiled).
    st["orders"] = dict(state["orders"])
    st["pending_refunds"] = {k: list(v) for k, v in state["pending_refunds"].items()}
    st["profile"] = dict(state["profile"])
    st["downgrade"] = dict(state["downgrade"]) if state["downgrade"] else None
    return st


def _order(st, order_id: str) -> dict[str, Any]:
    """The order, copied into this state before it is changed (the input state stays as it was)."""
    order = st["orders"][order_id] = dict(st["orders"][order_id])
    return order


def _day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()


def _at(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def add_months(day: date, months: int) -> date:
    m = day.month - 1 + months
    year, month = day.year + m // 12, m % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _zone(tz: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(tz or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


class LoyaltyDomain:
    ERASING = (CustomerErasureRequested,)

    def __init__(self, rules: Rules):
        self.rules = rules

    def wants(self, event: Event) -> bool:
        # Complaints, surveys and consent changes come on the same topic and change no account:
        # each would cost a dedup entry and a document write.
        return isinstance(event, HANDLED)

    # -- events ---------------------------------------------------------------
    def apply(self, state, event: Event, now: datetime):
        st = _copy(state)
        out: list[Event] = []
        # Joined: the earlier of registration and first purchase, whichever topic was read first.
        if isinstance(event, CustomerRegistered | PurchaseCompleted) and (
            st.get("joined") is None or event.occurred_at < datetime.fromisoformat(st["joined"])
        ):
            st["joined"] = event.occurred_at.isoformat()
        if isinstance(event, CustomerRegistered | CustomerUpdated):
            known = st["profile"]["birthday"] is not None
            self._profile(st, event)
            if not known and st["profile"]["birthday"] is not None:
                self._late_birthday(st, event, now, out)
            if st["tier"] is None:
                self._join(st, event, out)
            self._hand_over(st, event, out)
            if st.get("first_purchase") and not st["referral_rewarded"]:
                self._referee_reward(st, event, out)  # the registration came after the first purchase
        elif isinstance(event, WAITING):
            self._check(st, event)  # refused now, with the reason, rather than after waiting
            if isinstance(event, PurchaseCompleted):
                self._hand_over(st, event, out)
            if event.occurred_at > now:
                # Under event time, a ledger event (or a referrer's reward) waits until the clock
                # has passed it (every partition read that far): purchases, redemptions and rewards
                # travel on different topics, and whether a redemption is covered, and which lots
                # it empties, must not depend on which topic was read first (seen after a kill -9:
                # a redemption read after the next months' purchases and expiry). Under the wall
                # clock nothing waits.
                st["held"] = hold(st.get("held"), event)
                return st, out
            self._release(st, event.customer_id, event.occurred_at, out)
            self._ledger_event(st, event, out)
        elif isinstance(event, CustomerErasureRequested):
            # The ledger is a financial record and stays (pseudonymous); personal data goes.
            st["profile"] = {"birthday": None, "timezone": "UTC", "referred_by": None}
            st["erased"] = True
        else:
            return state, []
        return st, out

    def _profile(self, st, ev) -> None:
        d, p = ev.data, st["profile"]
        if d.birthday is not None:
            p["birthday"] = d.birthday.isoformat()
        if d.timezone is not None:
            p["timezone"] = d.timezone
        # A referral counts only when stated before the first purchase (in event time: the two
        # come on different topics), and never by oneself.
        first = st.get("first_seen") or st.get("first_purchase")
        if (
            d.referred_by
            and d.referred_by != ev.customer_id
            and (first is None or ev.occurred_at <= datetime.fromisoformat(first["at"]))
        ):
            p["referred_by"] = d.referred_by

    def _join(self, st, ev: Event, out) -> None:
        first = self.rules.tiers[0].name
        st["tier"] = first
        out.append(
            derive(
                TierChanged,
                ev,
                TierChangedData(from_tier=None, to_tier=first, reason="joined the programme"),
                producer=PRODUCER,
            )
        )

    def _purchase(self, st, ev: PurchaseCompleted, out) -> None:
        d = ev.data
        if d.order_id in st["orders"]:
            return  # earned already (a redelivery beyond the event-id window, or a resent order)
        exact, why, plain = self._rate(st, ev)  # before anything changes: it may refuse the order
        if st["tier"] is None:
            self._join(st, ev, out)
        points = int(exact.to_integral_value(rounding=ROUND_FLOOR))
        day = _day(ev.occurred_at)
        st["orders"][d.order_id] = {
            "total": str(d.total), "currency": d.currency, "points": points, "reversed": 0, "expired": 0,
            "refunded": "0", "lot": None, "at": ev.occurred_at.isoformat(),
            # Rated before the birthday was known (the registration may come later, on another topic):
            # the exact points without it, to add the birthday month's share exactly if it applies.
            "unrated_birthday": str(plain) if st["profile"]["birthday"] is None else None,
        }  # fmt: skip
        st["purchases"] += 1
        self._add_spend(st, day, d.total, d.currency, points)
        if points:
            lot = self._earn(st, ev, points, why, d.order_id, out)
            st["orders"][d.order_id]["lot"] = lot
        if st["purchases"] == 1:
            st["first_purchase"] = {
                "at": ev.occurred_at.isoformat(),
                "order_id": d.order_id,
                "event_id": str(ev.event_id),
            }
            if self.rules.first_purchase_bonus:
                self._earn(st, ev, self.rules.first_purchase_bonus, "first purchase bonus", d.order_id, out, "first")
            self._hand_over(st, ev, out)  # done when it was read, unless it waited in an account stored before that
            self._referee_reward(st, ev, out)
        for pending in st["pending_refunds"].pop(d.order_id, []):
            # A refund that came before its purchase (another topic, or a purchase replayed from
            # the dead-letter topic) is applied now; one that does not fit the order is refused, not the order.
            try:
                self._reverse(st, ev.customer_id, d.order_id, pending, out)
            except LedgerRejection as exc:
                when = datetime.fromisoformat(pending["at"])
                _reject(st, when, pending["cause"], PurchaseRefunded.__name__, str(exc))
        self._upgrade(st, ev, out)

    def _late_birthday(self, st, ev: Event, now: datetime, out) -> None:
        """Orders rated before the registration was read get the birthday-month bonus they would
        have had if it had come first (registrations and purchases travel on different topics):
        less the share refunded since, and nothing where the order's points have expired."""
        mult = self.rules.birthday_month_multiplier
        for order_id in [k for k, o in st["orders"].items() if o.get("unrated_birthday") is not None]:
            order = _order(st, order_id)
            plain, order["unrated_birthday"] = order["unrated_birthday"], None
            if mult == 1 or order["points"] <= 0 or not self._birthday_month(st, datetime.fromisoformat(order["at"])):
                continue
            extra = int((Decimal(plain) * mult).to_integral_value(rounding=ROUND_FLOOR)) - order["points"]
            if extra <= 0:
                continue
            order["points"] += extra
            # The refunds so far would have taken back their share of the extra too.
            total = Decimal(order["total"])
            due = Decimal(order["points"]) * Decimal(order["refunded"]) / total if total > 0 else Decimal(0)
            back = max(int(due.to_integral_value(rounding=ROUND_HALF_UP)) - order["reversed"], 0)
            order["reversed"] += back
            credit = extra - back
            if credit <= 0:
                continue
            bought = _day(datetime.fromisoformat(order["at"]))
            expires = add_months(bought, self.rules.expiry_months)
            # Judged by the clock, not by the registration's own (usually earlier) time: read after
            # the order's lot expired, the credit would be a lot born expired, and a notice about it.
            if _day(max(ev.occurred_at, now)) >= expires:
                order["expired"] += credit  # they would have expired with the order's lot
                continue
            self._add_spend(st, bought, Decimal(0), order["currency"], credit)
            reason = f"birthday month x {mult} (registration read after the purchase)"
            lot = next((x for x in st["lots"] if x["id"] == order["lot"]), None)
            if lot is None or st["debt"]:
                # Into a lot of their own that expires with the order's points, not a year from now.
                tag = f"birthday/{order_id}"
                self._earn(st, ev, credit, reason, order_id, out, tag, expires=expires, order=order_id)
                continue
            # Into the order's own lot: the same lots (and so the same expiry and notices) as if
            # the registration had been read first.
            lot["points"] += credit
            lot["remaining"] += credit
            entry = self._entry(st, ev, credit, "earn", reason, order_id)
            data = PointsEarnedData(order_id=order_id, reason=reason, points=credit, balance=entry["balance"],
                                    expires_on=date.fromisoformat(lot["expires_on"]))  # fmt: skip
            out.append(derive(PointsEarned, ev, data, producer=PRODUCER, discriminator=f"birthday/{order_id}"))

    def _add_spend(self, st, day: date, amount: Decimal, currency: str, points: int) -> None:
        # Spend counts in the tier currency; others are converted at the ratio of their earning rates.
        amount = self.rules.in_tier_currency(amount, currency)
        # Only the qualifying window (and a month more) is kept: older rows never count again.
        since = add_months(day, -self.rules.qualifying_months - 1).isoformat()
        st["spend"] = [row for row in st["spend"] if row[0] > since] + [[day.isoformat(), str(amount), points]]

    def points_for(self, st, ev: PurchaseCompleted) -> tuple[int, str]:
        """Points an order earns, and how they were computed (the entry's reason)."""
        total, why, _ = self._rate(st, ev)
        return int(total.to_integral_value(rounding=ROUND_FLOOR)), why

    def _rate(self, st, ev: PurchaseCompleted) -> tuple[Decimal, str, Decimal]:
        """Exact points (before rounding down), the reason, and the exact points without the birthday month."""
        r, d = self.rules, ev.data
        rate = r.points_per_unit.get(d.currency)
        if rate is None:
            raise _unrated(d.currency)
        day = _day(ev.occurred_at)
        lines = [(ln.category, ln.unit_price * ln.quantity) for ln in d.lines]
        gross = sum((amount for _, amount in lines), Decimal(0))
        if not lines or gross <= 0:
            lines, gross = [("", d.total)], d.total
        base = Decimal(0)
        campaigns: set[str] = set()
        for category, amount in lines:
            mult = r.category_multipliers.get(category, Decimal(1))
            running = [c for c in r.campaigns if c.applies(day, category)]
            best = max(running, key=lambda c: c.multiplier, default=None)
            if best is not None:
                campaigns.add(best.name)
            base += amount * rate * mult * (best.multiplier if best else Decimal(1))
        # Discounts and fees: the lines scaled to the total, multiplied before dividing. Scaling each
        # line by total/gross first (1/3, rounded to 28 digits) made a whole 10 come out 9.99..., 9 points.
        base = base * d.total / gross if gross else Decimal(0)
        tier = r.tier(st["tier"])
        why = [f"{d.total} {d.currency} x {rate}"]
        total = plain = base * tier.multiplier
        if tier.multiplier != 1:
            why.append(f"{tier.name} x {tier.multiplier}")
        if self._birthday_month(st, ev.occurred_at):
            total *= r.birthday_month_multiplier
            why.append(f"birthday month x {r.birthday_month_multiplier}")
        why.extend(f"campaign {name}" for name in sorted(campaigns))
        return total, "purchase: " + ", ".join(why), plain

    def _birthday_month(self, st, at: datetime) -> bool:
        bday = st["profile"]["birthday"]
        if not bday:
            return False
        return at.astimezone(_zone(st["profile"]["timezone"])).month == date.fromisoformat(bday).month

    def _refund(self, st, ev: PurchaseRefunded, out) -> None:
        d = ev.data
        if d.refund_id in st["refunds"]:
            return
        st["refunds"] = [*st["refunds"], d.refund_id][-KEPT_KEYS:]
        refund = {"refund_id": d.refund_id, "amount": str(d.amount), "currency": d.currency,
                  "at": ev.occurred_at.isoformat(), "cause": str(ev.event_id), "root": str(ev.root_id)}  # fmt: skip
        if d.order_id not in st["orders"]:
            st["pending_refunds"].setdefault(d.order_id, []).append(refund)
            return  # applied when the purchase arrives
        self._reverse(st, ev.customer_id, d.order_id, refund, out)

    def _reverse(self, st, cid: str, order_id: str, refund: dict, out) -> None:
        order = _order(st, order_id)
        if refund["currency"] != order["currency"]:
            raise _mismatch(refund["refund_id"], refund["currency"], order_id, order["currency"])
        total, before = Decimal(order["total"]), Decimal(order["refunded"])
        refunded = min(Decimal(refund["amount"]), max(total - before, Decimal(0)))  # never more than the order
        order["refunded"] = str(before + refunded)
        at = datetime.fromisoformat(refund["at"])
        # The share of the order's points due back so far, minus what already went back (no drift
        # across several partial refunds); points of the order that expired are not taken twice.
        due = Decimal(order["points"]) * (before + refunded) / total if total > 0 else Decimal(0)
        target = int(due.to_integral_value(rounding=ROUND_HALF_UP))
        points = min(target - order["reversed"], order["points"] - order["reversed"] - order["expired"])
        # Qualifying spend and points both go down (`qualify_by = "points"` counted refunded orders),
        # dated by the order, not the refund: both leave the qualifying window together, or the
        # refund would go on counting against later purchases after its order had left it.
        self._add_spend(st, _day(datetime.fromisoformat(order["at"])), -refunded, order["currency"], -max(points, 0))
        if points <= 0:
            return
        order["reversed"] += points
        self._spend(st, points, first_lot=order["lot"])
        cause = uuid.UUID(refund["cause"])
        reason = f"refund {refund['refund_id']} of order {order_id}"
        entry = self._entry_at(st, at, str(cause), -points, "reverse", reason, order_id)
        data = PointsReversedData(
            order_id=order_id, refund_id=refund["refund_id"], points=points, balance=entry["balance"]
        )
        root = uuid.UUID(refund["root"])
        out.append(derive_from_ids(PointsReversed, cause, root, cid, data, producer=PRODUCER, occurred_at=at))

    def _redeem(self, st, ev: PointsRedemptionRequested, out) -> None:
        d = ev.data
        reason = None
        if d.redemption_id in st["redemptions"]:
            reason = "duplicate_redemption_id"
        elif self.rules.rewards.get(d.reward) != d.points:
            reason = "unknown_reward"  # not in the catalogue, or not at that price
        elif d.points > st["balance"]:
            reason = "insufficient_balance"
        if reason is not None:
            data = RedemptionRejectedData(
                redemption_id=d.redemption_id, reward=d.reward, points=d.points, reason=reason
            )
            out.append(derive(RedemptionRejected, ev, data, producer=PRODUCER))
            return
        st["redemptions"] = [*st["redemptions"], d.redemption_id][-KEPT_KEYS:]
        self._spend(st, d.points)
        entry = self._entry(st, ev, -d.points, "redeem", f"reward {d.reward}", d.redemption_id)
        data = PointsRedeemedData(
            redemption_id=d.redemption_id, reward=d.reward, points=d.points, balance=entry["balance"]
        )
        out.append(derive(PointsRedeemed, ev, data, producer=PRODUCER))

    # -- referrals -------------------------------------------------------------
    def _referee_reward(self, st, ev: Event, out) -> None:
        """Called at the first purchase, or at a registration read after it (`ev` is then that)."""
        referrer = st["profile"]["referred_by"]
        if not referrer or st["referral_rewarded"] or not st["first_purchase"]:
            return
        st["referral_rewarded"] = True
        first = st["first_purchase"]
        if self.rules.referee_bonus:
            why = f"referral: welcome bonus (referred by {referrer})"
            self._earn(st, _as_of(ev, first), self.rules.referee_bonus, why, first["order_id"], out, "referee")

    def _hand_over(self, st, ev: Event, out) -> None:
        """The referrer's reward, sent when the referee's first purchase is read, not when it is applied.

        The referrer's account is another customer's document, so the reward travels as an event
        (crm.referrals). A purchase waits in `held` until the event clock has passed it; sent only
        then, the reward reached the referrer long after its later ledger events (docs/loyalty.md,
        "Referrals")."""
        if isinstance(ev, PurchaseCompleted) and not st.get("first_seen") and not st["first_purchase"]:
            st["first_seen"] = {"at": ev.occurred_at.isoformat(), "order_id": ev.data.order_id,
                                "event_id": str(ev.event_id)}  # fmt: skip
        referrer = st["profile"]["referred_by"]
        # Accounts from before the hand-over moved here handed over with the referee's bonus.
        if not referrer or st.get("handed_over", st["referral_rewarded"]):
            return
        first = st.get("first_seen") or st["first_purchase"]
        if not first:
            return
        st["handed_over"] = True
        # A registration read after the first purchase: the reward is the purchase's all the same
        # (time, event ids), as if the registration had come first.
        ev = _as_of(ev, first)
        out.append(
            derive(
                ReferralQualified,
                ev,
                ReferralQualifiedData(referee_id=ev.customer_id, order_id=first["order_id"]),
                producer=PRODUCER,
            ).model_copy(update={"customer_id": referrer})
        )

    def _referrer_reward(self, st, ev: ReferralQualified, out) -> None:
        referee = ev.data.referee_id
        if referee in st["referees_rewarded"] or referee == ev.customer_id:
            return
        st["referees_rewarded"] = [*st["referees_rewarded"], referee]
        if st["tier"] is None:
            self._join(st, ev, out)
        if self.rules.referrer_bonus:
            self._earn(st, ev, self.rules.referrer_bonus, f"referral: {referee} made a first purchase", referee, out)

    # -- tiers -----------------------------------------------------------------
    def qualifying(self, st, today: date) -> Decimal:
        # ISO dates compare as strings do: no row's date is parsed (this runs for every purchase).
        since = add_months(today, -self.rules.qualifying_months).isoformat()
        col = 1 if self.rules.qualify_by == "spend" else 2
        return sum((Decimal(str(row[col])) for row in st["spend"] if row[0] > since), Decimal(0))

    def _upgrade(self, st, ev: Event, out) -> None:
        today = _day(ev.occurred_at)
        target = self.rules.tier_for(self.qualifying(st, today))
        if self.rules.rank(target.name) > self.rules.rank(st["tier"]):
            self._change_tier(st, ev.customer_id, target.name, "upgrade", today, ev.occurred_at, out, cause=ev)
        elif st["downgrade"] and self.rules.rank(target.name) >= self.rules.rank(st["tier"]):
            st["downgrade"] = None  # back above the line before the grace ran out

    def _change_tier(self, st, cid, to: str, why: str, today: date, at: datetime, out, *, cause: Event | None):
        frm = st["tier"]
        st["tier"], st["downgrade"] = to, None
        # Only a tier above the first can go down: only those are reviewed.
        if self.rules.rank(to) == 0:
            st["next_review"] = None
        elif st["next_review"] is None:
            st["next_review"] = (at + timedelta(days=self.rules.review_days)).isoformat()
        qual = self.qualifying(st, today)
        data = TierChangedData(from_tier=frm, to_tier=to, reason=why, qualifying_spend=f"{qual:.2f}")
        if cause is not None:
            ev = derive(TierChanged, cause, data, producer=PRODUCER, discriminator=to)
        else:
            ev = scheduled(TierChanged, cid, data, producer=PRODUCER, occasion=f"tier/{at.isoformat()}/{to}",
                           occurred_at=at)  # fmt: skip
        out.append(ev)
        if why == "upgrade":
            tier = self.rules.tier(to)
            out.append(self._care(ev, "tier_upgrade", {"tier": to, "perks": list(tier.perks)}))

    # -- time ------------------------------------------------------------------
    def tick(self, state, customer_id: str, now: datetime):
        if not state or (state["tier"] is None and not state.get("held")):
            return state, []
        st = _copy(state)
        out: list[Event] = []
        self._release(st, customer_id, now, out)
        if st["tier"] is not None:
            self._catch_up(st, customer_id, now, out)
        if not out and st == state:
            return state, []
        return st, out

    def _ledger_event(self, st, event: Event, out) -> None:
        # Whatever fell due before this event (expiring-points notices, expiry, tier reviews,
        # birthdays) happens first, as of this event's time, whether or not the time-driven
        # sweep got there: the ledger is a function of the events, not of when sweeps ran.
        if st["tier"] is not None:
            self._catch_up(st, event.customer_id, event.occurred_at, out)
        if isinstance(event, PurchaseCompleted):
            self._purchase(st, event, out)
        elif isinstance(event, PurchaseRefunded):
            self._refund(st, event, out)
        elif isinstance(event, ReferralQualified):
            self._referrer_reward(st, event, out)
        else:
            self._redeem(st, event, out)

    def _release(self, st, customer_id: str, now: datetime, out) -> None:
        """Apply the held ledger events the clock has passed, in event-time order."""
        st["held"], ready = take_ready(st.get("held"), now, LEDGER_BY_NAME)
        for event in ready:
            try:
                self._check(st, event)
            except LedgerRejection as exc:  # e.g. the rules file lost the currency while it waited
                _reject(st, event.occurred_at, str(event.event_id), event.type, str(exc))
                continue
            self._ledger_event(st, event, out)

    def _check(self, st, event: Event) -> None:
        """What can be known before a ledger event is applied: raises LedgerRejection."""
        if not isinstance(event, PurchaseCompleted | PurchaseRefunded):
            return
        d = event.data
        order = st["orders"].get(d.order_id) if isinstance(event, PurchaseRefunded) else None
        if order is not None and order["currency"] != d.currency:
            raise _mismatch(d.refund_id, d.currency, d.order_id, order["currency"])
        if d.currency not in self.rules.points_per_unit:
            raise _unrated(d.currency)

    def _catch_up(self, st, customer_id: str, now: datetime, out) -> None:
        """Everything due up to `now`, each judged as of its own due time, however late we get to it."""
        today = _day(now)
        for _ in range(48):  # reviews, a downgrade after them, yearly birthdays
            before = len(out), st["next_review"], st["downgrade"], st["birthday_year"]
            # The notice (days before expiry) first: a clock that jumped past both still sends it.
            self._expiring_notice(st, customer_id, today, out)
            self._expire(st, customer_id, today, out)
            self._review(st, customer_id, now, out)
            self._birthday(st, customer_id, now, out)
            if (len(out), st["next_review"], st["downgrade"], st["birthday_year"]) == before:
                break

    def due(self, state, now: datetime | None = None) -> datetime | None:
        if not state:
            return None
        if state["tier"] is None:
            return first_due(state.get("held"))
        # Called for every event and tick: the earliest ISO date string is the earliest date, and
        # only that one is parsed.
        held = first_due(state.get("held"))
        times = [] if held is None else [held]
        live = [lot for lot in state["lots"] if lot["remaining"] > 0]
        if live:
            times.append(_at(date.fromisoformat(min(lot["expires_on"] for lot in live))))
        notified = set(state["notified_lots"])
        notice = [lot for lot in live if self._notice_pending(lot, notified)]
        if notice:
            times.append(self._notice_at(min(notice, key=lambda lot: lot["expires_on"])))
        if state["next_review"]:
            times.append(datetime.fromisoformat(state["next_review"]))
        if state["downgrade"]:
            times.append(datetime.fromisoformat(state["downgrade"]["at"]))
        bday = self._next_birthday_month(state, now)
        if bday is not None:
            times.append(bday)
        return min(times) if times else None

    def _expire(self, st, cid: str, today: date, out) -> None:
        # ISO dates compare as strings do, so nothing is parsed for the lots that are not due.
        day = today.isoformat()
        due = sorted((lot for lot in st["lots"] if lot["remaining"] > 0 and lot["expires_on"] <= day), key=_fifo)
        # An order's points live in its own lot, and a late birthday credit may live in another
        # (marked with the order): what either loses to expiry, a later refund must not take again.
        by_lot = {o["lot"]: k for k, o in st["orders"].items() if o["lot"] is not None} if due else {}
        for lot in due:
            points, lot["remaining"] = lot["remaining"], 0
            order_id = by_lot.get(lot["id"]) or lot.get("order")
            if order_id in st["orders"]:
                _order(st, order_id)["expired"] += points  # a later refund does not take them twice
            at = _at(date.fromisoformat(lot["expires_on"]))
            cause = uuid.uuid5(uuid.NAMESPACE_URL, f"loyalty/{cid}/lot/{lot['id']}")
            entry = self._entry_at(st, at, str(cause), -points, "expire", f"lot {lot['id']} expired", lot["id"])
            data = PointsExpiredData(lot_id=lot["id"], points=points, balance=entry["balance"])
            out.append(scheduled(PointsExpired, cid, data, producer=PRODUCER, occasion=f"expire/{lot['id']}",
                                 occurred_at=at))  # fmt: skip
        st["lots"] = [lot for lot in st["lots"] if lot["remaining"] > 0]

    def _notice_pending(self, lot, notified: set[str]) -> bool:
        return (
            lot["remaining"] >= max(self.rules.expiring_notice_min_points, 1)
            and self.rules.expiring_notice_days > 0
            and lot["id"] not in notified
        )

    def _notice_at(self, lot) -> datetime:
        return _at(date.fromisoformat(lot["expires_on"]) - timedelta(days=self.rules.expiring_notice_days))

    def _expiring_notice(self, st, cid: str, today: date, out) -> None:
        # A notice is due when the lot expires within the notice period (ISO dates compare as strings).
        until = (today + timedelta(days=self.rules.expiring_notice_days)).isoformat()
        notified = set(st["notified_lots"])
        for lot in sorted((x for x in st["lots"] if x["expires_on"] <= until), key=_fifo):
            if not self._notice_pending(lot, notified):
                continue
            st["notified_lots"] = [*st["notified_lots"], lot["id"]][-KEPT_KEYS:]
            at = self._notice_at(lot)
            data = CareRequestedData(
                kind="points_expiring",
                purpose="marketing",
                template_data={"points": lot["remaining"], "expires_on": lot["expires_on"], "tier": st["tier"]},
            )
            out.append(scheduled(CareRequested, cid, data, producer=PRODUCER, occasion=f"expiring/{lot['id']}",
                                 occurred_at=at))  # fmt: skip

    def _review(self, st, cid: str, now: datetime, out) -> None:
        today = _day(now)
        pending = st["downgrade"]
        if pending and datetime.fromisoformat(pending["at"]) <= now:
            # Judged as of the moment it was due, whenever the sweep gets to it.
            target = self.rules.tier_for(self.qualifying(st, _day(datetime.fromisoformat(pending["at"]))))
            if self.rules.rank(target.name) < self.rules.rank(st["tier"]):
                self._change_tier(st, cid, target.name, "downgrade after the grace period", today,
                                  datetime.fromisoformat(pending["at"]), out, cause=None)  # fmt: skip
            st["downgrade"] = None
        review = st["next_review"]
        if review is None or datetime.fromisoformat(review) > now:
            return
        at = datetime.fromisoformat(review)
        st["next_review"] = (at + timedelta(days=self.rules.review_days)).isoformat()
        if st["downgrade"] and datetime.fromisoformat(st["downgrade"]["at"]) <= at:
            return  # the pending downgrade is decided first (next round of the catch-up loop)
        today = _day(at)
        target = self.rules.tier_for(self.qualifying(st, today))
        if self.rules.rank(target.name) >= self.rules.rank(st["tier"]) or st["downgrade"]:
            return
        when = at + timedelta(days=self.rules.downgrade_grace_days)
        st["downgrade"] = {"warned_at": at.isoformat(), "at": when.isoformat(), "to": target.name}
        needed = self.rules.tier(st["tier"]).threshold - self.qualifying(st, today)
        data = CareRequestedData(
            kind="tier_downgrade_warning",
            purpose="marketing",
            template_data={"tier": st["tier"], "review_on": _day(when).isoformat(), "needed": f"{needed:.2f}"},
        )
        occasion = f"downgrade-warning/{at.isoformat()}"
        out.append(scheduled(CareRequested, cid, data, producer=PRODUCER, occasion=occasion, occurred_at=at))

    def _next_birthday_month(self, st, now: datetime | None) -> datetime | None:
        bday = st["profile"]["birthday"]
        if not bday or now is None:
            return None
        zone = _zone(st["profile"]["timezone"])
        month = date.fromisoformat(bday).month
        if st["birthday_year"] is not None:
            year = st["birthday_year"] + 1
        else:
            # The first birthday month counted is the one the customer joined in, or the next one:
            # from the join time (an event's), not from when the service got to it.
            since = datetime.fromisoformat(st["joined"]) if st.get("joined") else now
            local = since.astimezone(zone)
            year = local.year + (1 if month < local.month else 0)
        return datetime.combine(date(year, month, 1), time(9), tzinfo=zone).astimezone(UTC)

    def _birthday(self, st, cid: str, now: datetime, out) -> None:
        at = self._next_birthday_month(st, now)
        if at is None or at > now:
            return
        year = at.astimezone(_zone(st["profile"]["timezone"])).year
        st["birthday_year"] = year
        # Sent however late we get here, dated when it was due: notify judges whether it is too old
        # to go out (marketing max age), so the decision does not depend on this service's pace.
        if st.get("joined") and datetime.fromisoformat(st["joined"]) > at:
            at = datetime.fromisoformat(st["joined"])  # joined during the birthday month
        mult = self.rules.birthday_month_multiplier
        data = CareRequestedData(
            kind="birthday_bonus",
            purpose="marketing",
            template_data={"multiplier": f"{mult.normalize():f}", "tier": st["tier"], "balance": st["balance"]},
        )
        out.append(scheduled(CareRequested, cid, data, producer=PRODUCER, occasion=f"birthday-bonus/{year}",
                             occurred_at=at))  # fmt: skip

    # -- the ledger --------------------------------------------------------------
    def _earn(
        self,
        st,
        ev: Event,
        points: int,
        reason: str,
        ref: str,
        out,
        tag: str = "",
        expires: date | None = None,
        order: str | None = None,
    ) -> str:
        day = _day(ev.occurred_at)
        # From the cause, not from a counter: the same lot whatever was expired or spent before.
        lot_id = f"{day.isoformat()}/{derived_id(ev.event_id, 'lot', tag or 'earn').hex[:12]}"
        expires = expires or add_months(day, self.rules.expiry_months)
        pay = min(st["debt"], points)  # a negative balance is paid off first
        st["debt"] -= pay
        if points > pay:  # a lot fully used to pay the debt holds nothing (and would be pruned later)
            lot = {"id": lot_id, "earned_on": day.isoformat(), "expires_on": expires.isoformat(), "points": points,
                   "remaining": points - pay, "seq": next_seq(st)}  # fmt: skip
            if order is not None:
                lot["order"] = order  # a late birthday credit's own lot: its expiry counts for the order
            st["lots"].append(lot)
        entry = self._entry(st, ev, points, "earn", reason, ref)
        data = PointsEarnedData(
            order_id=ref if isinstance(ev, PurchaseCompleted | CustomerRegistered | CustomerUpdated) else None,
            reason=reason[:200],
            points=points,
            balance=entry["balance"],
            expires_on=expires,
        )
        out.append(derive(PointsEarned, ev, data, producer=PRODUCER, discriminator=tag or "earn"))
        return lot_id

    def _spend(self, st, points: int, first_lot: str | None = None) -> None:
        """Take points from the lots, the given lot first, then first-to-expire first; the rest is debt."""
        lots = sorted(st["lots"], key=lambda x: (x["id"] != first_lot, *_fifo(x)))
        left = points
        for lot in lots:
            if left == 0:
                break
            take = min(lot["remaining"], left)
            lot["remaining"] -= take
            left -= take
        st["debt"] += left
        st["lots"] = [lot for lot in st["lots"] if lot["remaining"] > 0]

    def _entry(self, st, ev: Event, points: int, kind: str, reason: str, ref: str) -> dict:
        return self._entry_at(st, ev.occurred_at, str(ev.event_id), points, kind, reason, ref)

    @staticmethod
    def _entry_at(st, at: datetime, cause: str, points: int, kind: str, reason: str, ref: str) -> dict:
        st["balance"] += points
        entry = {
            "seq": next_seq(st),
            "at": at.isoformat(),
            "kind": kind,
            "points": points,
            "balance": st["balance"],
            "reason": reason,
            "cause": cause,
            "ref": ref,
        }
        st["entries"].append(entry)
        return entry

    def _care(self, cause: Event, kind: str, template: dict) -> Event:
        data = CareRequestedData(kind=kind, purpose="marketing", template_data=template)
        return derive(CareRequested, cause, data, producer=PRODUCER, discriminator=kind)


LEDGER_EVENTS = (PurchaseCompleted, PurchaseRefunded, PointsRedemptionRequested)
# What waits in `held` for the event clock: the ledger events and the referrers' rewards.
WAITING = (*LEDGER_EVENTS, ReferralQualified)
HANDLED = (*WAITING, CustomerRegistered, CustomerUpdated, CustomerErasureRequested)
LEDGER_BY_NAME = {cls.__name__: cls for cls in WAITING}


def _fifo(lot: dict) -> tuple:
    """First to expire first; among lots expiring together, the first earned; then by id.

    Not by arrival (`seq`): two lots of one day (a purchase's points and a referral reward that came
    on another topic) arrive in either order, and which one a redemption empties decides which
    one's expiry notice is due (seen in the kill -9 test).
    """
    return lot["expires_on"], lot["earned_on"], lot["id"]


def audit(state: dict[str, Any], pages: list[list[dict[str, Any]]] | None = None) -> list[str]:
    """What is wrong with one account (empty: the books balance). `pages` are its closed ledger
    pages in order; None checks the account alone, from the running balance its pages ended with."""
    problems = []
    done = archived(state)
    if pages is not None:
        moved = [e for page in pages for e in page]
        problems += _audit_entries(moved, 1, 0, "archived ")
        points: dict[str, int] = {}
        for e in moved:
            points[e["kind"]] = points.get(e["kind"], 0) + e["points"]
        if (len(pages), len(moved)) != (len(done["pages"]), done["entries"]):
            problems.append(
                f"{len(pages)} ledger pages with {len(moved)} entries, the account lists {len(done['pages'])} "
                f"with {done['entries']}"
            )
        elif moved and moved[-1]["balance"] != done["balance"]:
            problems.append(f"the pages end at balance {moved[-1]['balance']}, the account carries {done['balance']}")
        if points != done["points"]:
            problems.append(f"the pages hold {points} points by kind, the account counts {done['points']}")
    if sum(done["points"].values()) != done["balance"]:
        problems.append(f"archived points by kind sum to {sum(done['points'].values())}, not {done['balance']}")
    problems += _audit_entries(state["entries"], done["entries"] + 1, done["balance"], "")
    total = done["balance"] + sum(e["points"] for e in state["entries"])
    if state["balance"] != total:
        problems.append(f"balance {state['balance']} but entries sum to {total}")
    in_lots = sum(lot["remaining"] for lot in state["lots"])
    if in_lots - state["debt"] != state["balance"]:
        problems.append(f"lots hold {in_lots} and debt is {state['debt']}, but the balance is {state['balance']}")
    if any(lot["remaining"] < 0 for lot in state["lots"]) or state["debt"] < 0:
        problems.append("a lot or the debt is negative")
    return problems


def _audit_entries(entries: list[dict[str, Any]], seq: int, running: int, what: str) -> list[str]:
    """Sequence numbers from `seq` on, each running balance the sum so far (from `running`)."""
    problems = []
    for i, e in enumerate(entries, seq):
        running += e["points"]
        if e["seq"] != i:
            problems.append(f"{what}entry {i} has sequence number {e['seq']}")
        if e["balance"] != running:
            problems.append(f"{what}entry {i}: running balance {e['balance']}, sum of entries so far {running}")
    return problems


def _as_of(ev: Event, first: dict) -> Event:
    """`ev` as the first purchase `first` (its event id and time), when `ev` is not that purchase."""
    if not first.get("event_id") or str(ev.event_id) == first["event_id"]:
        return ev
    return ev.model_copy(
        update={"event_id": uuid.UUID(first["event_id"]), "occurred_at": datetime.fromisoformat(first["at"])}
    )


def _unrated(currency: str) -> LedgerRejection:
    return LedgerRejection(f"no earning rule for currency {currency} (points_per_unit in the rules file)")


def _mismatch(refund_id: str, currency: str, order_id: str, order_currency: str) -> LedgerRejection:
    return LedgerRejection(f"refund {refund_id} is in {currency}, order {order_id} in {order_currency}")


def _reject(st, at: datetime, event_id: str, kind: str, reason: str) -> None:
    st["rejected"] = [*st.get("rejected", []), [at.astimezone(UTC).isoformat(), event_id, kind, reason]][
        -REJECTED_KEPT:
    ]
