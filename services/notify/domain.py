"""Notify's pure core: the contact projection, each customer's pending requests, and every decision.

A request (CareRequested, RetentionRequested) becomes a job in the customer's state.
`decide` moves it on, always recording why:

    waiting  (no contact details known yet; a profile event may still be on its way)
    deferred (the requester's not_before, or quiet hours in the customer's timezone)
    queued   (a channel is chosen; the service sends it and reports back through `record`)
    -> NotificationSent / NotificationFailed / NotificationSuppressed

Sending is I/O and happens outside, between `queued` and `record`. Dedup is on
the request id (the pipeline drops a redelivered event; `done` remembers
(request, channel) pairs beyond its window), so a request is sent at most once
per channel; a permanent failure on one channel falls back to the other.

Frequency caps count marketing messages when they are queued, in the state
document: the decision that reads them is the one that writes them, in the
same bulk write, so a Redis loss cannot let an over-cap message through.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from contracts import Event
from contracts.crm import (
    CareRequested,
    CustomerErased,
    NotificationFailed,
    NotificationFailedData,
    NotificationSent,
    NotificationSentData,
    NotificationSuppressed,
    NotificationSuppressedData,
    ProfileUpdated,
    RetentionRequested,
)
from contracts.envelope import derive_from_ids
from services.notify.policy import Caps, Contact, QuietHours, decide

PRODUCER = "notify"
DONE_KEPT = 500  # (request, channel) pairs remembered beyond the pipeline's event-id window


@dataclass(frozen=True)
class NotifyRules:
    quiet: QuietHours | None = field(default_factory=QuietHours)
    caps: Caps = field(default_factory=Caps)
    # How long a request waits for the customer's contact details (a ProfileUpdated
    # on another topic may arrive a little later than the request it explains).
    contact_wait: timedelta = timedelta(hours=1)
    # A marketing message this much older than its request is no longer worth sending.
    marketing_max_age: timedelta = timedelta(days=7)


@dataclass(frozen=True)
class Sent:
    channel: str
    provider: str
    latency_ms: float | None = None


@dataclass(frozen=True)
class Failed:
    channel: str
    error: str
    permanent: bool  # False: transient errors outlasted every retry and provider
    unreachable: bool = False  # the address itself is wrong: the channel is not used again
    to: str | None = None  # the address it was sent to (unreachable marks only that one)


@dataclass(frozen=True)
class Job:
    """A queued job as the sender needs it (a read-only view of the stored dict)."""

    customer_id: str
    request_id: str
    kind: str
    purpose: str
    channel: str
    data: dict[str, Any] = field(default_factory=dict)


def new_state() -> dict[str, Any]:
    return {
        "profile": {"known": False},
        "contact": {},
        "unreachable": [],
        "marketing_sent": {"email": [], "sms": []},
        "jobs": {},
        "done": [],
    }


def contact_of(st: dict[str, Any]) -> Contact:
    p, c = st["profile"], st["contact"]
    return Contact(
        email=c.get("email"),
        phone=c.get("phone"),
        consents=dict(p.get("consents") or {}),
        preferred_channel=p.get("preferred_channel") or "email",
        timezone=p.get("timezone") or "UTC",
        locale=p.get("locale") or "en",
        unreachable=frozenset(st["unreachable"]),
    )


def _ts(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


class NotifyDomain:
    ERASING = (CustomerErased,)
    WANTED = (ProfileUpdated, CustomerErased, CareRequested, RetentionRequested)

    def __init__(self, rules: NotifyRules | None = None):
        self.rules = rules or NotifyRules()
        # Request ids whose message the delivery has handed to a provider and not recorded yet
        # (services/notify/delivery.py keeps it). Not state: after a restart nothing is out.
        self.in_flight: set[str] = set()

    # -- events ---------------------------------------------------------------
    def wants(self, event: Event) -> bool:
        # Account-manager tasks (RetentionTaskCreated) share crm.retention: nothing to send, so no
        # dedup entry and no write either.
        return isinstance(event, self.WANTED)

    def apply(self, state, event: Event, now: datetime):
        if isinstance(event, ProfileUpdated):
            if state and state.get("erased"):
                erased_at, registered = _ts(state.get("erased_at")), event.data.registered_at
                if erased_at is None or registered is None or registered <= erased_at:
                    # Of the erased registration: resent, or caused by an event profile read before
                    # the erasure (dated by that event, so maybe after the erasure request).
                    return state, []
                # A registration newer than the erasure: a new customer, who starts over here as in
                # profile.
                state = {**new_state(), "done": list(state.get("done", []))}
            st = _copy(state)
            self._project(st, event)
            out: list[Event] = []
            # New consent, addresses or channel preference: jobs not yet sent are decided again.
            self._revisit(st, event.customer_id, now, out, statuses=("waiting", "queued"))
            return st, out
        if isinstance(event, CustomerErased):
            return self._erase(state, event, now)
        if isinstance(event, CareRequested | RetentionRequested):
            return self._request(state, event, now)
        return state, []  # RetentionTaskCreated: work for an account manager, not a message

    def _project(self, st, ev: ProfileUpdated) -> None:
        d = ev.data
        p, c = st["profile"], st["contact"]
        for channel, value in (("email", d.email), ("phone", d.phone)):
            if c.get(channel) != value:
                # A new address gets a fresh chance.
                st["unreachable"] = [x for x in st["unreachable"] if x != ("sms" if channel == "phone" else channel)]
        st["contact"] = {"name": d.name, "email": d.email, "phone": d.phone}
        p.update(
            known=True,
            locale=d.locale,
            timezone=d.timezone,
            preferred_channel=d.preferred_channel,
            consents={"email": d.consents.email, "sms": d.consents.sms},
            value_tier=d.value_tier,
            top_categories=list(d.top_categories),
        )

    def _erase(self, state, ev: CustomerErased, now: datetime):
        st = new_state()
        st["erased"] = True
        st["erased_at"] = ev.occurred_at.isoformat()
        st["done"] = list((state or {}).get("done", []))
        # A job out with a provider is left to its outcome (`record`): suppressed now, it would be
        # announced as both suppressed and sent.
        out = [
            _suppressed(ev.customer_id, job, "customer erased", now)
            for job in ((state or {}).get("jobs") or {}).values()
            if job["rid"] not in self.in_flight
        ]
        return st, out

    def _request(self, state, ev: CareRequested | RetentionRequested, now: datetime):
        rid = str(ev.event_id)
        st = _copy(state)
        if rid in st["jobs"] or any(k.startswith(rid + ":") for k in st["done"]):
            return state, []  # a redelivery the pipeline's window no longer remembers
        d = ev.data
        kind = d.kind if isinstance(ev, CareRequested) else f"retention_{d.kind}"
        job = {
            "rid": rid,
            "kind": kind,
            "purpose": d.purpose,
            "topic": ev.TOPIC,
            "template_data": dict(d.template_data),
            "created": ev.occurred_at.isoformat(),
            "not_before": d.not_before.isoformat() if getattr(d, "not_before", None) else None,
            "not_after": d.not_after.isoformat() if getattr(d, "not_after", None) else None,
            "correlation_id": str(ev.root_id),
            "raw": ev.to_bytes().decode(),
            "status": "new",
            "channel": None,
            "reason": "",
            "wake": now.isoformat(),
            # When notify first saw it: the wait for contact details counts from here, not from
            # the request's own time, or a request read late (notify down for an hour) would be
            # suppressed at once although the profile is right behind it.
            "seen": now.isoformat(),
        }
        st["jobs"][rid] = job
        out: list[Event] = []
        self._decide(st, ev.customer_id, job, now, out)
        return st, out

    # -- time -----------------------------------------------------------------
    def revisit(self, state, customer_id: str, now: datetime):
        """Decide again every job whose time has come, queued ones included: right before a send,
        consent, quiet hours and caps are checked as they are now, not as they were when queued."""
        if not state or not any(_ts(j["wake"]) <= now for j in state["jobs"].values()):
            return state, []
        st = _copy(state)
        out: list[Event] = []
        self._revisit(st, customer_id, now, out, statuses=("waiting", "deferred", "queued"), due_only=True)
        if st["jobs"] == state["jobs"] and not out:
            return state, []
        return st, out

    def _revisit(self, st, cid, now: datetime, out: list[Event], *, statuses, due_only: bool = False) -> None:
        for job in list(st["jobs"].values()):
            if job["status"] not in statuses or (due_only and _ts(job["wake"]) > now):
                continue
            if not due_only and job["rid"] in self.in_flight:
                # Out already: its outcome decides. Suppressed now, it was announced as both
                # suppressed and sent (consent revoked during the send).
                continue
            if job["status"] != "queued":
                self._decide(st, cid, job, now, out)
                continue
            before, sent = dict(job), {k: list(v) for k, v in st["marketing_sent"].items()}
            _uncount(st, job, job["channel"])  # counted again if it is queued again
            self._decide(st, cid, job, now, out)
            still = st["jobs"].get(job["rid"]) is job  # not suppressed (which leaves the dict as it was)
            if still and job["status"] == "queued" and job["channel"] == before["channel"]:
                # Same decision: keep the job as it was, so nothing needs writing.
                job.clear()
                job.update(before)
                st["marketing_sent"] = sent

    def due(self, state, now: datetime) -> datetime | None:
        """When a job next needs attention: queued ones at once, the others at their wake time."""
        if not state or not state.get("jobs"):
            return None
        return min(_ts(j["wake"]) for j in state["jobs"].values())

    def queued(self, state, customer_id: str) -> list[Job]:
        if not state:
            return []
        return [
            Job(customer_id, j["rid"], j["kind"], j["purpose"], j["channel"], j)
            for j in state["jobs"].values()
            if j["status"] == "queued"
        ]

    # -- the decision ---------------------------------------------------------
    def _decide(self, st, cid: str, job: dict, now: datetime, out: list[Event]) -> None:
        rules = self.rules
        created = _ts(job["created"])
        if st.get("erased"):
            return self._suppress(st, cid, job, "customer erased", now, out)
        if not st["profile"].get("known"):
            until = max(created, _ts(job.get("seen")) or created) + rules.contact_wait
            if now < until:
                job.update(status="waiting", wake=until.isoformat(), reason="waiting for contact details")
                return None
            return self._suppress(st, cid, job, "no contact details known for this customer", now, out)
        not_before = _ts(job["not_before"])
        if not_before is not None and now < not_before:
            job.update(status="deferred", wake=not_before.isoformat(), reason="scheduled by the requester")
            return None
        not_after = _ts(job.get("not_after"))
        if not_after is not None and now > not_after:
            return self._suppress(st, cid, job, "expired: past the requester's deadline", now, out)
        if job["purpose"] == "marketing" and now - max(created, not_before or created) > rules.marketing_max_age:
            return self._suppress(st, cid, job, "expired: the moment for this message has passed", now, out)
        contact = contact_of(st)
        done = {k.split(":", 1)[1] for k in st["done"] if k.startswith(job["rid"] + ":")}
        if done:  # a channel already used for this request is not used again
            contact = Contact(**{**contact.__dict__, "unreachable": contact.unreachable | done})
        decision = decide(
            job["purpose"],
            contact,
            now,
            {ch: [_ts(t) for t in ts] for ch, ts in st["marketing_sent"].items()},
            quiet=rules.quiet,
            caps=rules.caps,
        )
        if decision.action == "suppress":
            return self._suppress(st, cid, job, decision.reason, now, out, channel=decision.channel)
        if decision.action == "defer":
            opens = decision.not_before.isoformat()
            job.update(status="deferred", wake=opens, hold_until=opens, reason=decision.reason)
            return None
        job.update(status="queued", channel=decision.channel, wake=now.isoformat(), reason=decision.reason)
        if job["purpose"] == "marketing":
            window = now - timedelta(days=7)
            kept = [t for t in st["marketing_sent"].get(decision.channel, []) if _ts(t) > window]
            st["marketing_sent"][decision.channel] = [*kept, now.isoformat()]
        return None

    def _suppress(self, st, cid, job, reason: str, now, out, *, channel: str | None = None) -> None:
        st["jobs"].pop(job["rid"], None)
        _remember(st, f"{job['rid']}:-")
        out.append(_suppressed(cid, job, reason, now, channel))

    # -- outcomes of a send ---------------------------------------------------
    @staticmethod
    def pending(state, job: Job) -> bool:
        """Whether the job is still queued on the channel it was sent on (nothing changed meanwhile)."""
        current = ((state or {}).get("jobs") or {}).get(job.request_id)
        return current is not None and current["status"] == "queued" and current["channel"] == job.channel

    def record(self, state, job: Job, outcome: Sent | Failed, now: datetime):
        """What a send came to. The job may have been decided again while it was being sent."""
        if not state:
            return state, []
        rid, cid = job.request_id, job.customer_id
        key = f"{rid}:{outcome.channel}"
        if isinstance(outcome, Sent):
            if key in state["done"]:
                return state, []  # recorded already
            st = _copy(state)
            # Whatever happened meanwhile, it was sent: the request is done, on every channel.
            current = st["jobs"].pop(rid, None)
            if current is not None and current["status"] == "queued" and current["channel"] != outcome.channel:
                _uncount(st, current, current["channel"])
            if job.purpose == "marketing":
                # It went out, so it counts against the cap, stamped when it was queued, even if a
                # decision made while it was out (quiet hours began, another channel) uncounted it.
                stamp = job.data["wake"]
                sent = st["marketing_sent"].get(outcome.channel, [])
                if stamp not in sent:
                    st["marketing_sent"][outcome.channel] = [*sent, stamp]
            _remember(st, key)
            data = NotificationSentData(
                request_id=rid,
                kind=job.kind,
                channel=outcome.channel,
                provider=outcome.provider,
                latency_ms=outcome.latency_ms,
            )
            return st, [_outcome(NotificationSent, cid, job.data, data, outcome.channel, now)]
        st = _copy(state)
        out: list[Event] = []
        # Only while the refused address is still the customer's: a correction that came in while
        # the message to the old one was out must not be marked unreachable by the old one's bounce
        # (the job is decided again below, and goes to the new address).
        replaced = outcome.to is not None and outcome.to != contact_of(st).address(outcome.channel)
        if outcome.unreachable and not replaced and outcome.channel not in st["unreachable"]:
            st["unreachable"] = [*st["unreachable"], outcome.channel]
        data = NotificationFailedData(
            request_id=rid,
            kind=job.kind,
            channel=outcome.channel,
            error=outcome.error[:200],
            permanent=outcome.permanent,
        )
        out.append(_outcome(NotificationFailed, cid, job.data, data, outcome.channel, now))
        if not self.pending(state, job):
            if st.get("erased") and rid not in st["jobs"]:
                # Erased while it was out (the erasure left it to its outcome), and it did not go.
                _remember(st, f"{rid}:-")
                out.append(_suppressed(cid, job.data, "customer erased", now))
            return st, out  # decided again meanwhile: that decision stands
        job = st["jobs"][rid]
        _uncount(st, job, outcome.channel)
        data = NotificationFailedData(
            request_id=rid,
            kind=job["kind"],
            channel=outcome.channel,
            error=outcome.error[:200],
            permanent=outcome.permanent,
        )
        if outcome.unreachable:
            # The address is wrong: try the customer's other channel (or the same one, where the
            # address has been replaced since).
            self._decide(st, cid, job, now, out)
        else:
            st["jobs"].pop(rid)  # dead-lettered by the service; a replay of it is a new attempt
        return st, out


def message_context(state: dict[str, Any], job: Job) -> dict[str, Any]:
    """What a template sees: the requester's data, then the customer's name, tier and categories."""
    p, c = state["profile"], state["contact"]
    data = dict(job.data.get("template_data") or {})
    ctx = {
        "name": c.get("name"),
        "value_tier": p.get("value_tier"),
        "top_categories": p.get("top_categories") or [],
        "locale": p.get("locale") or "en",
        "timezone": p.get("timezone") or "UTC",
        **{k: v for k, v in data.items() if v is not None},
    }
    ctx.setdefault("tier", data.get("loyalty_tier") or data.get("tier") or p.get("value_tier"))
    # The customer's language and zone as they are now: a requester's copy (profile puts its locale
    # in every request) is as old as the request, and a follow-up goes out days later.
    for key in ("locale", "timezone"):
        if p.get(key):
            ctx[key] = p[key]
    return ctx


def _copy(state) -> dict[str, Any]:
    if state is None:
        return new_state()
    return {
        **state,
        "profile": dict(state["profile"]),
        "contact": dict(state["contact"]),
        "unreachable": list(state["unreachable"]),
        "marketing_sent": {k: list(v) for k, v in state["marketing_sent"].items()},
        "jobs": {k: dict(v) for k, v in state["jobs"].items()},
        "done": list(state["done"]),
    }


def _remember(st, key: str) -> None:
    st["done"] = [*st["done"], key][-DONE_KEPT:]


def _uncount(st, job: dict, channel: str) -> None:
    """A marketing message that was not delivered does not use up the customer's cap."""
    if job["purpose"] != "marketing":
        return
    sent = st["marketing_sent"].get(channel, [])
    if job["wake"] in sent:
        sent = list(sent)
        sent.remove(job["wake"])
        st["marketing_sent"][channel] = sent


def _outcome(cls, cid: str, job: dict, data, discriminator: str, now: datetime) -> Event:
    return derive_from_ids(
        cls,
        uuid.UUID(job["rid"]),
        uuid.UUID(job["correlation_id"]),
        cid,
        data,
        producer=PRODUCER,
        occurred_at=now,
        discriminator=discriminator,
    )


def _suppressed(cid: str, job: dict, reason: str, now: datetime, channel: str | None = None) -> Event:
    data = NotificationSuppressedData(request_id=job["rid"], kind=job["kind"], reason=reason[:200], channel=channel)
    return _outcome(NotificationSuppressed, cid, job, data, "suppressed", now)
