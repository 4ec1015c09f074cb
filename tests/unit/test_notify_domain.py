"""Notify's pure domain: requests become decisions, sends become outcomes, every one with its reason."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from contracts.crm import (
    CareRequested,
    CareRequestedData,
    ChannelConsents,
    CustomerErased,
    CustomerErasedData,
    ProfileUpdated,
    ProfileUpdatedData,
    RetentionRequested,
    RetentionRequestedData,
)
from services.notify.domain import Failed, NotifyDomain, NotifyRules, Sent, message_context

CID = "c-1"
# 12:00 in Shanghai.
NOON = datetime(1997, 3, 3, 4, 0, tzinfo=UTC)


def profile(at=NOON, *, email=True, sms=True, preferred="sms", locale="zh-CN", phone="+8613800000001", **kw):
    return ProfileUpdated(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="profile",
        customer_id=CID,
        data=ProfileUpdatedData(
            name="王芳",
            email="wang@example.com",
            phone=phone,
            locale=locale,
            timezone="Asia/Shanghai",
            preferred_channel=preferred,
            consents=ChannelConsents(email=email, sms=sms),
            **kw,
        ),
    )


def care(at=NOON, kind="first_purchase_thanks", purpose="transactional", **kw):
    return CareRequested(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="profile",
        customer_id=CID,
        data=CareRequestedData(kind=kind, purpose=purpose, template_data={"order_id": "o-1"}, **kw),
    )


def offer(at=NOON):
    return RetentionRequested(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="churn",
        customer_id=CID,
        data=RetentionRequestedData(step=2, kind="offer", band="high", template_data={"offer_percent": 15}),
    )


def run(domain, events, now=None):
    state, out = None, []
    for ev in events:
        state, derived = domain.apply(state, ev, now or ev.occurred_at)
        out.extend(derived)
    return state, out


def only_job(domain, state):
    (job,) = domain.queued(state, CID)
    return job


def test_a_transactional_request_goes_out_on_the_preferred_channel_once():
    d = NotifyDomain()
    req = care()
    state, out = run(d, [profile(), req])
    assert out == []
    job = only_job(d, state)
    assert (job.channel, job.kind, job.purpose) == ("sms", "first_purchase_thanks", "transactional")
    assert d.due(state, NOON) == NOON  # queued: due at once

    state, out = d.record(state, job, Sent("sms", "http://gw"), NOON)
    assert [e.type for e in out] == ["NotificationSent"]
    assert out[0].data.channel == "sms" and out[0].causation_id == req.event_id
    assert d.queued(state, CID) == [] and d.due(state, NOON) is None
    # The same request again (beyond the pipeline's event-id window) does nothing.
    again, out = d.apply(state, req, NOON)
    assert again is state and out == []
    # And a second record of the same outcome is ignored.
    assert d.record(state, job, Sent("sms", "x"), NOON) == (state, [])


def test_marketing_at_23h_local_waits_for_09h_and_transactional_does_not():
    d = NotifyDomain()
    late = datetime(1997, 3, 3, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai
    state, _ = run(d, [profile(), offer(late)])
    assert d.queued(state, CID) == []
    opens = datetime(1997, 3, 4, 1, 0, tzinfo=UTC)  # 09:00 local
    assert d.due(state, late) == opens
    (job,) = state["jobs"].values()
    assert job["status"] == "deferred" and job["reason"] == "quiet hours in Asia/Shanghai"

    same, out = d.revisit(state, CID, opens - timedelta(minutes=1))
    assert same is state and out == []
    state, out = d.revisit(state, CID, opens)
    job = only_job(d, state)
    assert job.kind == "retention_offer" and job.channel == "sms" and out == []

    state, _ = run(d, [profile(), care(late, kind="complaint_acknowledgement")])
    assert only_job(d, state).kind == "complaint_acknowledgement"


def test_frequency_caps_suppress_marketing_with_a_reason_but_not_transactional():
    d = NotifyDomain()
    state, _ = run(d, [profile(), offer()])
    job = only_job(d, state)
    state, _ = d.record(state, job, Sent("sms", "gw"), NOON)
    state, out = d.apply(state, offer(NOON + timedelta(hours=2)), NOON + timedelta(hours=2))
    assert [e.type for e in out] == ["NotificationSuppressed"]
    assert out[0].data.reason.startswith("frequency cap: 1 marketing message(s) in the last 24 hours")
    state, out = d.apply(state, care(NOON + timedelta(hours=3)), NOON + timedelta(hours=3))
    assert out == [] and only_job(d, state).kind == "first_purchase_thanks"


def test_a_request_waits_for_contact_details_then_is_decided():
    d = NotifyDomain(NotifyRules(contact_wait=timedelta(minutes=30)))
    state, out = run(d, [care()])
    assert out == [] and d.queued(state, CID) == []
    assert d.due(state, NOON) == NOON + timedelta(minutes=30)
    state, out = d.apply(state, profile(NOON + timedelta(minutes=1)), NOON + timedelta(minutes=1))
    assert only_job(d, state).channel == "sms"

    lonely, _ = run(d, [care()])
    lonely, out = d.revisit(lonely, CID, NOON + timedelta(minutes=30))
    assert [e.data.reason for e in out] == ["no contact details known for this customer"]
    assert lonely["jobs"] == {}


def test_consent_decides_the_channel_and_no_consent_suppresses():
    d = NotifyDomain()
    state, _ = run(d, [profile(sms=False), care()])
    assert only_job(d, state).channel == "email"
    state, out = run(d, [profile(sms=False, email=False), care()])
    assert [(e.type, e.data.reason) for e in out] == [("NotificationSuppressed", "no consent on any channel")]


def test_an_invalid_address_falls_back_to_the_other_channel_and_frees_the_cap():
    d = NotifyDomain()
    state, _ = run(d, [profile(), offer()])
    job = only_job(d, state)
    assert state["marketing_sent"]["sms"] == [NOON.isoformat()]
    state, out = d.record(state, job, Failed("sms", "invalid number", True, True), NOON)
    assert [(e.type, e.data.permanent) for e in out] == [("NotificationFailed", True)]
    assert state["unreachable"] == ["sms"] and state["marketing_sent"]["sms"] == []
    assert only_job(d, state).channel == "email"
    # A new phone number gets a fresh chance.
    state, _ = d.apply(state, profile(phone="+8613800000002"), NOON)
    assert state["unreachable"] == []


def test_exhausted_retries_drop_the_job_without_remembering_it_so_a_replay_retries():
    d = NotifyDomain()
    req = care()
    state, _ = run(d, [profile(), req])
    job = only_job(d, state)
    state, out = d.record(state, job, Failed("sms", "timeout", False), NOON)
    assert [(e.type, e.data.permanent) for e in out] == [("NotificationFailed", False)]
    assert state["jobs"] == {} and state["unreachable"] == []
    state, _ = d.apply(state, req, NOON + timedelta(minutes=5))
    assert only_job(d, state).request_id == str(req.event_id)


def test_erasure_suppresses_pending_messages_and_every_later_one():
    d = NotifyDomain()
    late = datetime(1997, 3, 3, 15, 0, tzinfo=UTC)
    state, _ = run(d, [profile(), offer(late)])
    erase = CustomerErased(
        event_id=uuid.uuid4(),
        occurred_at=late,
        producer="profile",
        customer_id=CID,
        data=CustomerErasedData(request_id="r-1"),
    )
    state, out = d.apply(state, erase, late)
    assert [e.data.reason for e in out] == ["customer erased"]
    assert state["contact"] == {} and state["erased"]
    state, out = d.apply(state, care(late), late)
    assert [e.data.reason for e in out] == ["customer erased"]
    # A snapshot of the erased registration brings nothing back: resent, or dated after the
    # erasure request by the event that caused it, read by profile before the erasure.
    for snapshot in (profile(NOON, registered_at=NOON), profile(late + timedelta(seconds=1), registered_at=NOON)):
        kept, out = d.apply(state, snapshot, late)
        assert out == [] and kept["erased"] and kept["contact"] == {}
    # A registration after the erasure starts over, in profile and here.
    again = late + timedelta(days=1)
    state, _ = d.apply(state, profile(again, registered_at=again), again)
    assert not state.get("erased") and state["contact"]["name"] == "王芳"
    state, out = d.apply(state, care(again), again)
    assert out == [] and only_job(d, state).kind == "first_purchase_thanks"


def test_an_erasure_while_a_message_is_out_leaves_it_to_its_outcome():
    d = NotifyDomain()
    erase = CustomerErased(
        event_id=uuid.uuid4(), occurred_at=NOON, producer="profile", customer_id=CID,
        data=CustomerErasedData(request_id="r-1"),
    )  # fmt: skip
    state, _ = run(d, [profile(), care()])
    job = only_job(d, state)
    d.in_flight.add(job.request_id)  # handed to the provider when the erasure is read
    state, out = d.apply(state, erase, NOON)
    assert out == [] and state["erased"] and state["contact"] == {}
    _, out = d.record(state, job, Sent("sms", "gw"), NOON)
    assert [e.type for e in out] == ["NotificationSent"]  # not also suppressed
    _, out = d.record(state, job, Failed("sms", "timeout", False), NOON)
    assert [(e.type, getattr(e.data, "reason", None)) for e in out] == [
        ("NotificationFailed", None),
        ("NotificationSuppressed", "customer erased"),
    ]
    d.in_flight.clear()


def test_the_wait_for_contact_details_counts_from_when_the_request_is_read():
    d = NotifyDomain(NotifyRules(contact_wait=timedelta(minutes=30)))
    read = NOON + timedelta(hours=2)  # notify was down for two hours
    state, out = d.apply(None, care(), read)
    assert out == [] and d.due(state, read) == read + timedelta(minutes=30)
    state, out = d.apply(state, profile(), read + timedelta(minutes=1))  # right behind it
    assert out == [] and only_job(d, state).channel == "sms"


def test_stale_marketing_is_not_sent():
    d = NotifyDomain(NotifyRules(marketing_max_age=timedelta(days=2)))
    state, out = run(d, [profile(), offer()], now=NOON + timedelta(days=3))
    assert state["jobs"] == {}
    assert [e.data.reason for e in out if e.type == "NotificationSuppressed"] == [
        "expired: the moment for this message has passed"
    ]


def test_the_template_sees_the_request_data_over_the_profile():
    d = NotifyDomain()
    state, _ = run(d, [profile(value_tier="vip", top_categories=["jazz"]), care()])
    ctx = message_context(state, only_job(d, state))
    assert ctx["name"] == "王芳" and ctx["order_id"] == "o-1" and ctx["top_categories"] == ["jazz"]
    assert ctx["tier"] == "vip" and ctx["locale"] == "zh-CN"


def test_the_message_speaks_the_customers_language_as_it_is_when_sent():
    d = NotifyDomain()
    req = care()
    req.data.template_data["locale"] = "zh-CN"  # the requester's copy, as profile sends it
    state, _ = run(d, [profile(), req])
    state, _ = d.apply(state, profile(locale="en"), NOON + timedelta(minutes=1))  # changed meanwhile
    assert message_context(state, only_job(d, state))["locale"] == "en"


def test_a_queued_job_is_decided_again_when_consent_changes_or_before_it_is_sent():
    d = NotifyDomain()
    state, _ = run(d, [profile(), offer()])
    assert only_job(d, state).channel == "sms"
    # Consent to SMS revoked before the send: the job moves to e-mail, the SMS cap slot is given back.
    state, out = d.apply(state, profile(sms=False), NOON)
    assert out == [] and only_job(d, state).channel == "email"
    assert state["marketing_sent"] == {"email": [NOON.isoformat()], "sms": []}

    # A marketing job still queued when quiet hours begin (a delayed send) waits for the morning.
    late = datetime(1997, 3, 3, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai
    state, out = d.revisit(state, CID, late)
    (job,) = state["jobs"].values()
    assert (job["status"], job["reason"]) == ("deferred", "quiet hours in Asia/Shanghai")
    assert state["marketing_sent"]["email"] == []


def test_a_send_that_raced_a_new_decision_is_still_recorded_once():
    d = NotifyDomain()
    state, _ = run(d, [profile(), care()])
    job = only_job(d, state)  # on SMS, being sent...
    moved, _ = d.apply(state, profile(sms=False), NOON)  # ...while consent to SMS is revoked
    assert only_job(d, moved).channel == "email"
    assert not d.pending(moved, job)
    done, out = d.record(moved, job, Sent("sms", "gw"), NOON)
    assert [e.type for e in out] == ["NotificationSent"] and done["jobs"] == {}
    # A failure of that old send does not undo the new decision.
    kept, out = d.record(moved, job, Failed("sms", "timeout", False), NOON)
    assert [e.type for e in out] == ["NotificationFailed"] and only_job(d, kept).channel == "email"


def test_a_request_past_its_deadline_is_not_sent_whatever_the_marketing_max_age():
    d = NotifyDomain(NotifyRules(marketing_max_age=timedelta(days=365)))
    late = care(kind="birthday_greeting", purpose="marketing", not_after=NOON + timedelta(hours=6))
    state, out = run(d, [profile(), late], now=NOON + timedelta(days=1))
    assert state["jobs"] == {}
    assert [e.data.reason for e in out if e.type == "NotificationSuppressed"] == [
        "expired: past the requester's deadline"
    ]
    on_time, out = run(d, [profile(), care(kind="birthday_greeting", purpose="marketing",
                                           not_after=NOON + timedelta(hours=6))], now=NOON)  # fmt: skip
    assert [j["status"] for j in on_time["jobs"].values()] == ["queued"]


def test_a_bounce_from_a_replaced_address_does_not_mark_the_new_one():
    d = NotifyDomain()
    state, _ = run(d, [profile(preferred="email"), care()])
    job = only_job(d, state)  # to wang@example.com, being sent...
    fixed = ProfileUpdated(**{**profile(preferred="email").model_dump(), "event_id": uuid.uuid4()})
    fixed = fixed.model_copy(update={"data": fixed.data.model_copy(update={"email": "fang@example.com"})})
    state, _ = d.apply(state, fixed, NOON)  # ...while the customer corrects the address
    state, out = d.record(
        state, job, Failed("email", "550 5.1.1 no such user", True, True, to="wang@example.com"), NOON
    )
    assert state["unreachable"] == []
    assert [e.type for e in out] == ["NotificationFailed"]
    assert only_job(d, state).channel == "email"  # decided again: to the corrected address
    # The same bounce for the address still on file marks it.
    state2, _ = run(d, [profile(preferred="email"), care()])
    state2, _ = d.record(state2, only_job(d, state2), Failed("email", "550", True, True, to="wang@example.com"), NOON)
    assert state2["unreachable"] == ["email"]


def test_a_marketing_message_sent_while_it_was_decided_again_still_counts_against_the_cap():
    d = NotifyDomain()
    at = datetime(1997, 3, 3, 12, 59, tzinfo=UTC)  # 20:59 in Shanghai
    state, _ = run(d, [profile(at=at), offer(at)])
    job = only_job(d, state)  # being sent when quiet hours begin...
    later = at + timedelta(minutes=2)
    state, _ = d.apply(state, profile(at=later), later)  # ...and a profile update decides it again
    assert [j["status"] for j in state["jobs"].values()] == ["deferred"] and state["marketing_sent"]["sms"] == []
    state, out = d.record(state, job, Sent("sms", "gw"), later)
    assert [e.type for e in out] == ["NotificationSent"] and state["jobs"] == {}
    assert state["marketing_sent"]["sms"] == [at.isoformat()]
    _, out = d.apply(state, offer(at + timedelta(hours=13)), at + timedelta(hours=13))  # 09:59 the next day
    assert [e.data.reason[:13] for e in out] == ["frequency cap"]


def test_a_suppressed_marketing_message_gives_its_cap_back():
    d = NotifyDomain()
    state, _ = run(
        d, [profile(), care(kind="birthday_greeting", purpose="marketing", not_after=NOON + timedelta(hours=1))]
    )
    assert state["marketing_sent"]["sms"] == [NOON.isoformat()]
    state, out = d.revisit(state, CID, NOON + timedelta(hours=2))  # not sent before its deadline
    assert [e.type for e in out] == ["NotificationSuppressed"] and state["jobs"] == {}
    assert state["marketing_sent"]["sms"] == []
    state, out = d.apply(state, offer(NOON + timedelta(hours=3)), NOON + timedelta(hours=3))
    assert out == [] and only_job(d, state).kind == "retention_offer"


def test_a_message_out_with_a_provider_is_left_to_its_outcome_when_consent_changes():
    d = NotifyDomain()
    state, _ = run(d, [profile(), care()])
    job = only_job(d, state)  # on SMS, handed to the provider...
    d.in_flight.add(job.request_id)
    state, out = d.apply(state, profile(sms=False), NOON)  # ...while consent to SMS is revoked
    assert out == [] and only_job(d, state).channel == "sms"
    state, out = d.record(state, job, Sent("sms", "gw"), NOON)
    assert [e.type for e in out] == ["NotificationSent"] and state["jobs"] == {}
    # Not out: decided again at once, as before.
    d.in_flight.clear()
    state, _ = run(d, [profile(), care()])
    state, out = d.apply(state, profile(sms=False, email=False), NOON)
    assert [e.type for e in out] == ["NotificationSuppressed"]
