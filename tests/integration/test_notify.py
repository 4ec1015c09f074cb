"""The notify service on the real embedded stack, delivering to a real SMTP server and the SMS gateway.

Each scenario ends with the exact set of .eml files and SMS lines, parsed and checked.
Event time drives the clock, so quiet hours happen when the events say it is night.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from cryptography.fernet import Fernet

from contracts.crm import (
    CareRequested,
    CareRequestedData,
    ChannelConsents,
    ProfileUpdated,
    ProfileUpdatedData,
    RetentionRequested,
    RetentionRequestedData,
)
from services.notify.app import build
from services.notify.delivery import WakeIndex
from services.notify.settings import NotifySettings
from services.runtime.cache import Cache
from services.runtime.clock import EventClock
from services.stack.sinks import read_mail, read_sms, sms_server, start_smtp
from tests.support.backends import free_port
from tests.support.hosts import RunningService
from tests.support.kafka import eventually, produce, read_topic

TOKEN = "notify-token-0123456789"
INBOUND = "inbound-token-0123456789"
SHANGHAI = ZoneInfo("Asia/Shanghai")
DAY1 = datetime(1997, 3, 3, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai


class Sinks:
    def __init__(self, tmp: Path):
        self.mail_dir = tmp / "mail"
        self.sms_file = tmp / "sms.jsonl"
        self.smtp_port, self.sms_port = free_port(), free_port()
        self.refusals = 0  # SMTP DATA commands to refuse with 451 before accepting
        self.slow = None  # an async function the server awaits before taking each message

    def accept(self, _envelope):
        if self.refusals > 0:
            self.refusals -= 1
            return "451 4.3.0 temporarily unable to accept, try again"
        return self.slow() if self.slow is not None else None

    def mail(self) -> list[EmailMessage]:
        return read_mail(self.mail_dir)

    def sms(self) -> list[dict]:
        return read_sms(self.sms_file)


@pytest.fixture
async def sinks(tmp_path):
    s = Sinks(tmp_path)
    smtp = await start_smtp("127.0.0.1", s.smtp_port, s.mail_dir, accept=s.accept)
    gateway = sms_server("127.0.0.1", s.sms_port, s.sms_file)
    task = asyncio.create_task(gateway.serve())
    await eventually(lambda: asyncio.sleep(0, gateway.started))
    yield s
    gateway.should_exit = True
    await task
    smtp.close()
    await smtp.wait_closed()


def settings_for(sinks: Sinks, **kw) -> NotifySettings:
    values = {
        "http_port": free_port(),
        "api_token": TOKEN,
        "encryption_keys": Fernet.generate_key().decode(),
        "lookup_key": "lookup-key-0123456789",
        "link_key": "link-key-0123456789",
        "inbound_token": INBOUND,
        "email_primary": f"smtp://127.0.0.1:{sinks.smtp_port}",
        "sms_primary": f"http://127.0.0.1:{sinks.sms_port}/messages",
        "send_base_delay_s": 0.05,
        **kw,
    }
    values["public_url"] = f"http://127.0.0.1:{values['http_port']}"
    return NotifySettings(**values)


class Running(RunningService):
    def __init__(self, common, settings: NotifySettings):
        common = common.model_copy(update={"sweep_interval_s": 0.2})
        super().__init__(build(common, settings, clock=EventClock()), common, TOKEN)

    async def send(self, *events, times: int = 1) -> None:
        msgs = [(e.TOPIC, e.key(), e.to_bytes()) for e in events for _ in range(times)]
        for topic in dict.fromkeys(t for t, _, _ in msgs):
            await produce(
                self.common.kafka_bootstrap,
                self.common.topic(topic),
                [(k, v, None) for t, k, v in msgs if t == topic],
            )

    async def view(self, cid: str) -> dict:
        r = await self.api.get(f"/customers/{cid}")
        return r.json() if r.status_code == 200 else {}

    async def profile(self, cid: str, at: datetime, **kw) -> None:
        """Publish a profile snapshot and wait until notify has it (requests on other topics race it)."""
        ev = profile(cid, at, **kw)
        await self.send(ev)
        want = kw.get("consents", {"email": True, "sms": True})

        async def seen():
            v = await self.view(cid)
            return v.get("known") and all(v["channels"][c]["consent"] == want[c] for c in want)

        await eventually(seen)

    async def notifications(self, expect: int, settle: float = 1.0) -> list[dict]:
        topic = self.common.topic("crm.notifications")
        records = await read_topic(self.common.kafka_bootstrap, topic, expect=expect, timeout=20, settle=settle)
        return [json.loads(r.value) for r in records]


def profile(cid: str, at: datetime, *, email: str | None = None, phone="+8613800000001", **kw) -> ProfileUpdated:
    consents = kw.pop("consents", {"email": True, "sms": True})
    data = {
        "name": "王芳",
        "email": email or f"{cid}@example.com",
        "phone": phone,
        "locale": "zh-CN",
        "timezone": "Asia/Shanghai",
        "preferred_channel": "sms",
        "consents": ChannelConsents(**consents),
        **kw,
    }
    return ProfileUpdated(
        event_id=uuid.uuid4(), occurred_at=at, producer="profile", customer_id=cid, data=ProfileUpdatedData(**data)
    )


def care(cid: str, at: datetime, kind="first_purchase_thanks", purpose="transactional", **data) -> CareRequested:
    return CareRequested(
        event_id=uuid.uuid4(),
        occurred_at=at,
        producer="profile",
        customer_id=cid,
        data=CareRequestedData(kind=kind, purpose=purpose, template_data=data),
    )


async def test_channel_choice_consent_and_dedup_end_to_end(common, sinks):
    async with Running(common, settings_for(sinks)) as n:
        # A zh-CN customer who prefers SMS gets a Chinese SMS.
        await n.profile("fang", DAY1)
        first = care("fang", DAY1, order_id="o-100", total="25.00", currency="USD")
        await n.send(first)
        await eventually(lambda: asyncio.sleep(0, len(sinks.sms()) == 1))

        # After revoking SMS, the next message goes by e-mail.
        day2 = DAY1 + timedelta(days=1)
        await n.profile("fang", day2, consents={"email": True, "sms": False})
        ack = care("fang", day2, kind="complaint_acknowledgement", ticket_id="T-7")
        await n.send(ack)
        await eventually(lambda: asyncio.sleep(0, len(sinks.mail()) == 1))

        # After revoking both, nothing is sent and a NotificationSuppressed says why.
        day3 = day2 + timedelta(days=1)
        await n.profile("fang", day3, consents={"email": False, "sms": False})
        silent = care("fang", day3, kind="complaint_acknowledgement", ticket_id="T-8")
        await n.send(silent)

        # A request delivered three times sends once.
        await n.profile("bob", day3, locale="en", preferred_channel="email", name="Bob", phone="+14155550100")
        thrice = care("bob", day3, order_id="o-200", total="9.99", currency="USD")
        await n.send(thrice, times=3)

        events = await n.notifications(expect=4, settle=2.0)
        outcomes = sorted((e["type"], e["data"]["request_id"], e["data"].get("channel")) for e in events)
        assert outcomes == sorted(
            [
                ("NotificationSent", str(first.event_id), "sms"),
                ("NotificationSent", str(ack.event_id), "email"),
                ("NotificationSuppressed", str(silent.event_id), None),
                ("NotificationSent", str(thrice.event_id), "email"),
            ]
        )
        suppressed = next(e for e in events if e["type"] == "NotificationSuppressed")
        assert suppressed["data"]["reason"] == "no consent on any channel"

        # Exactly these messages went out.
        (sms,) = sinks.sms()
        assert sms["to"] == "+8613800000001" and sms["customer_id"] == "fang"
        assert sms["request_id"] == str(first.event_id)
        assert sms["body"] == "感谢您的首次购买（订单 o-100），王芳！"
        mails = {m["X-CRM-Request-ID"]: m for m in sinks.mail()}
        assert set(mails) == {str(ack.event_id), str(thrice.event_id)}
        zh, en = mails[str(ack.event_id)], mails[str(thrice.event_id)]
        assert zh["To"] == "fang@example.com" and str(zh["Subject"]) == "我们已收到您的反馈（T-7）"
        assert zh.get_body(("plain",)).get_content().strip().startswith("王芳：")
        assert "T-7" in zh.get_body(("html",)).get_content()
        assert en["To"] == "bob@example.com" and str(en["Subject"]) == "Thank you for your first order"
        assert "o-200" in en.get_body(("plain",)).get_content()
        assert en["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert en["Message-ID"] == f"<{thrice.event_id}.email@crm.notify>"

        # One-click unsubscribe (RFC 8058): a POST to the link publishes the opt-out for the profile.
        url = en["List-Unsubscribe"].strip().strip("<>")  # a long header is folded
        async with httpx.AsyncClient() as anon:
            page = await anon.get(url)  # a GET only shows the button, which posts back to the link itself
            assert page.status_code == 200 and "<form method='post'>" in page.text
            assert (
                await anon.post(url.replace("t=", "t=x"), data={"List-Unsubscribe": "One-Click"})
            ).status_code == 400
            assert (await anon.post(url, data={"List-Unsubscribe": "One-Click"})).status_code == 200
            # An inbound SMS "退订" opts the sender's number out of SMS.
            inbound = f"http://127.0.0.1:{n.settings.http_port}/sms/inbound"
            assert (await anon.post(inbound, json={"from": "+8613800000001", "body": "退订"})).status_code == 401
            # Twilio's webhook form, as a gateway would post it.
            stop = {"From": "+8613800000001", "Body": " 退订 ", "MessageSid": "SM0001"}
            r = await anon.post(inbound, params={"token": INBOUND}, data=stop)
            assert r.json() == {"action": "opted_out", "customer_id": "fang"}
        consent = await read_topic(
            n.common.kafka_bootstrap, n.common.topic("shop.interactions"), expect=2, timeout=10, settle=0.5
        )
        changes = sorted(
            (e["customer_id"], e["data"]["channel"], e["data"]["granted"], e["data"]["source"])
            for e in (json.loads(r.value) for r in consent)
        )
        assert changes == [("bob", "email", False, "one_click_unsubscribe"), ("fang", "sms", False, "sms_stop")]
        metrics = (await n.api.get("/metrics")).text
        assert 'crm_notify_notifications_total{channel="email",kind="first_purchase_thanks",outcome="sent"} 1.0' in (
            metrics
        )


async def test_quiet_hours_defer_marketing_to_09h_local_and_survive_a_redis_loss(common, sinks):
    async with Running(common, settings_for(sinks)) as n:
        night = datetime(1997, 3, 3, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai
        await n.profile("mei", night - timedelta(minutes=5), preferred_channel="email")
        offer = RetentionRequested(
            event_id=uuid.uuid4(),
            occurred_at=night,
            producer="churn",
            customer_id="mei",
            data=RetentionRequestedData(
                step=2,
                kind="offer",
                band="high",
                template_data={"offer_percent": 15, "offer_valid_until": "1997-04-02"},
            ),
        )
        await n.send(offer)

        async def deferred():
            v = await n.view("mei")
            return [p for p in v.get("pending", []) if p["status"] == "deferred"]

        (pending,) = await eventually(deferred)
        assert pending["reason"] == "quiet hours in Asia/Shanghai"
        assert datetime.fromisoformat(pending["wake"]).astimezone(SHANGHAI).hour == 9
        await asyncio.sleep(1.0)
        assert sinks.mail() == []

        # Redis loses everything notify kept there; MongoDB still holds the deferred message.
        cache = Cache(n.common, "notify")
        assert await cache.delete_own_keys() >= 1
        await cache.close()

        # Time moves on through another customer's events: 09:00:30 in Shanghai.
        morning = datetime(1997, 3, 4, 1, 0, 30, tzinfo=UTC)
        await n.send(profile("ticker", morning))
        await eventually(lambda: asyncio.sleep(0, len(sinks.mail()) == 1))
        (sent,) = [e for e in await n.notifications(expect=1, settle=1.5) if e["type"] == "NotificationSent"]
        (mail,) = sinks.mail()
        assert mail["X-CRM-Request-ID"] == str(offer.event_id) and str(mail["Subject"]) == "专属优惠：15% 折扣"
        local = datetime.fromisoformat(sent["occurred_at"]).astimezone(SHANGHAI)
        assert (local.date().isoformat(), local.hour) == ("1997-03-04", 9), local
        assert mail["Date"].datetime.astimezone(SHANGHAI).hour == 9
        assert (await n.view("mei"))["marketing_sent"]["email"]  # counted against the cap


async def test_an_smtp_server_that_fails_twice_then_accepts_delivers_once(common, sinks):
    sinks.refusals = 2
    async with Running(common, settings_for(sinks)) as n:
        await n.profile("lin", DAY1, preferred_channel="email")
        req = care("lin", DAY1, order_id="o-9")
        await n.send(req)
        events = await n.notifications(expect=1, settle=2.0)
        assert [(e["type"], e["data"]["channel"]) for e in events] == [("NotificationSent", "email")]
        (mail,) = sinks.mail()
        assert mail["X-CRM-Request-ID"] == str(req.event_id)
        assert sinks.refusals == 0
        metrics = (await n.api.get("/metrics")).text
        assert (
            f'crm_notify_send_retries_total{{channel="email",provider="smtp://127.0.0.1:{sinks.smtp_port}"}} 2.0'
            in (metrics)
        )


async def test_a_stop_during_a_delivery_round_sends_nothing_twice(common, sinks, monkeypatch):
    # A round of twelve e-mails, one at a time, each taking the SMTP server 0.5 s, outlasts the time
    # a stop waits for it (shortened to 3 s here; 12 s in service). The stop must not cancel the
    # round with messages sent and their outcomes unwritten: the next start would send them again.
    monkeypatch.setattr("services.runtime.service.GUARDED_STOP_S", 3.0)
    accepting = asyncio.Event()

    async def slow():
        accepting.set()
        await asyncio.sleep(0.5)

    sinks.slow = slow
    settings = settings_for(sinks, send_concurrency=1)
    customers = [f"stop-{i}" for i in range(12)]
    async with Running(common, settings) as n:
        for cid in customers:
            await n.profile(cid, DAY1, preferred_channel="email")
        await n.send(*(care(cid, DAY1, order_id=f"o-{cid}") for cid in customers))
        await asyncio.wait_for(accepting.wait(), 30)
    first = len(sinks.mail())
    assert 1 <= first < len(customers)  # stopped mid-round
    async with Running(common, settings) as n:
        events = await n.notifications(expect=len(customers), settle=2.0)
    # By event id: the new owner republishes outcomes left in stored outboxes (at least once).
    sent = {e["event_id"]: e["customer_id"] for e in events if e["type"] == "NotificationSent"}
    assert sorted(sent.values()) == sorted(customers)
    mailed = [m["To"] for m in sinks.mail()]
    assert sorted(mailed) == sorted(f"{cid}@example.com" for cid in customers)


async def test_an_internationalised_address_is_mailed_with_smtputf8(common, sinks):
    async with Running(common, settings_for(sinks)) as n:
        await n.profile("fang", DAY1, email="王芳@例子.中国", preferred_channel="email")
        await n.send(care("fang", DAY1, order_id="o-1"))
        events = await n.notifications(expect=1, settle=2.0)
    assert [(e["type"], e["data"]["channel"]) for e in events] == [("NotificationSent", "email")]
    (mail,) = sinks.mail()
    assert mail["To"] == "王芳@例子.中国"  # as UTF-8 (RFC 6532), not RFC 2047 words


async def test_a_round_goes_on_while_one_partition_has_a_backlog(common):
    # Six partitions share a round of twelve: two each. One partition's backlog of forty must make
    # the round go on at once, not wait a sweep interval for every two of them.
    cache = Cache(common, "notify-index-test")
    index = WakeIndex(cache.redis, cache.key("wake") + ":")
    try:
        due = DAY1 - timedelta(minutes=1)
        await index.apply({f"c-{i}": due for i in range(40)}, lambda _cid: 0)
        ids, more = await index.due(set(range(6)), DAY1, 12)
        assert len(ids) == 2 and more
        await index.apply({cid: None for cid in [f"c-{i}" for i in range(39)]}, lambda _cid: 0)
        ids, more = await index.due(set(range(6)), DAY1, 12)
        assert ids == ["c-39"] and not more
    finally:
        await cache.delete_own_keys()
        await cache.close()


async def test_failover_to_the_secondary_and_fallback_after_an_invalid_address(common, sinks):
    dead = free_port()  # nothing listens: connection refused, a transient error
    settings = settings_for(
        sinks,
        email_primary=f"smtp://127.0.0.1:{dead}",
        email_secondary=f"smtp://127.0.0.1:{sinks.smtp_port}",
        sms_primary=f"twilio+http://AC0001:secret@127.0.0.1:{sinks.sms_port}?from=%2B15550001111",
        send_attempts=2,
    )
    async with Running(common, settings) as n:
        await n.profile("ana", DAY1, preferred_channel="email", locale="en")
        via_secondary = care("ana", DAY1, order_id="o-1")
        await n.send(via_secondary)
        # An address the SMTP server refuses (550): the customer's SMS is used instead.
        await n.profile("kai", DAY1, preferred_channel="email", email="kai@shop.invalid", phone="+8613800000009")
        bounced = care("kai", DAY1, order_id="o-2")
        await n.send(bounced)

        events = await n.notifications(expect=3, settle=2.0)
        got = sorted((e["type"], e["customer_id"], e["data"]["channel"], e["data"].get("provider")) for e in events)
        gateway = f"twilio+http://127.0.0.1:{sinks.sms_port}"
        assert got == [
            ("NotificationFailed", "kai", "email", None),
            ("NotificationSent", "ana", "email", f"smtp://127.0.0.1:{sinks.smtp_port}"),
            ("NotificationSent", "kai", "sms", gateway),
        ]
        failed = next(e for e in events if e["type"] == "NotificationFailed")
        assert failed["data"]["permanent"] is True and "550" in failed["data"]["error"]
        assert [m["To"] for m in sinks.mail()] == ["ana@example.com"]
        (sms,) = sinks.sms()  # through Twilio's form API
        assert (sms["to"], sms["from"], sms["request_id"]) == ("+8613800000009", "+15550001111", str(bounced.event_id))
        assert sms["body"] == "感谢您的首次购买（订单 o-2），王芳！"
        view = await n.view("kai")
        assert view["channels"]["email"]["unreachable"] is True


async def test_exhausted_retries_dead_letter_the_request_and_a_replay_after_the_fix_sends_once(common, sinks):
    from services.runtime.deadletters import list_dead_letters, replay_dead_letters

    broken = settings_for(sinks, sms_primary=f"http://127.0.0.1:{free_port()}/messages", send_attempts=2)
    async with Running(common, broken) as n:
        await n.profile("yu", DAY1)
        req = care("yu", DAY1, order_id="o-3")
        await n.send(req)
        (failed,) = await n.notifications(expect=1, settle=1.0)
        assert failed["type"] == "NotificationFailed" and failed["data"]["permanent"] is False
        assert (await n.view("yu"))["channels"]["sms"]["unreachable"] is False  # the gateway was down, not the number
        (dead,) = await eventually(lambda: list_dead_letters(n.common, "crm.care"))
        assert dead.reason.startswith("delivery failed on sms: sms: every provider failed")
        assert json.loads(dead.value)["event_id"] == str(req.event_id)
    assert sinks.sms() == []

    # The gateway is fixed (notify restarts with the right URL); the dead letter is replayed.
    async with Running(common, settings_for(sinks, encryption_keys=broken.encryption_keys)) as n:
        assert await replay_dead_letters(n.common, "crm.care") == 1
        await eventually(lambda: asyncio.sleep(0, len(sinks.sms()) == 1))
        events = await n.notifications(expect=2, settle=1.5)
        # The failure may be published again by the restarted service (an outbox entry not yet
        # trimmed); its id is the same, so a consumer sees one failure and one send.
        unique = {e["event_id"]: e["type"] for e in events}
        assert sorted(unique.values()) == ["NotificationFailed", "NotificationSent"]
    (sms,) = sinks.sms()
    assert (sms["customer_id"], sms["request_id"]) == ("yu", str(req.event_id))


async def test_the_profile_stays_the_source_of_truth_for_consent(common, sinks):
    """Profile and notify together: a registration's welcome by SMS, an SMS STOP that reaches the
    profile as ConsentChanged and comes back as its snapshot, then a complaint acknowledged by e-mail."""
    from services.profile.app import build as build_profile
    from services.profile.settings import ProfileSettings
    from tests.support.kafka import registered, shop_event

    profile_settings = ProfileSettings(
        http_port=free_port(), encryption_keys=Fernet.generate_key().decode(), lookup_key="p" * 32, api_token=TOKEN
    )
    async with Running(common, settings_for(sinks)) as n:
        prof = build_profile(n.common, profile_settings, clock=EventClock())
        await prof.start()
        try:
            cid = "reg-1"
            at = DAY1.isoformat()
            await produce(
                n.common.kafka_bootstrap,
                n.common.topic("shop.interactions"),
                [(cid.encode(), json.dumps(registered(cid, occurred_at=at, phone="+8613900000001")).encode(), None)],
            )
            await eventually(lambda: asyncio.sleep(0, len(sinks.sms()) == 1))
            (welcome,) = sinks.sms()
            assert welcome["body"] == "欢迎，Li Wei！您的账户已开通。" and welcome["to"] == "+8613900000001"

            async with httpx.AsyncClient() as anon:
                inbound = f"http://127.0.0.1:{n.settings.http_port}/sms/inbound"
                stop = {"from": "+8613900000001", "body": "STOP", "id": "in-1"}
                r = await anon.post(inbound, headers={"Authorization": f"Bearer {INBOUND}"}, json=stop)
                assert r.json() == {"action": "opted_out", "customer_id": cid}

            async def sms_revoked():
                v = await n.view(cid)
                return v and not v["channels"]["sms"]["consent"] and v["channels"]["email"]["consent"]

            await eventually(sms_revoked)  # the profile published its new snapshot
            complaint = shop_event(
                "InteractionRecorded",
                cid,
                {"kind": "complaint", "channel": "phone", "ticket_id": "T-42"},
                occurred_at=(DAY1 + timedelta(hours=1)).isoformat(),
            )
            await produce(
                n.common.kafka_bootstrap,
                n.common.topic("shop.interactions"),
                [(cid.encode(), json.dumps(complaint).encode(), None)],
            )
            await eventually(lambda: asyncio.sleep(0, len(sinks.mail()) == 1))
            events = await n.notifications(expect=2, settle=1.5)
            assert sorted((e["data"]["kind"], e["data"]["channel"]) for e in events) == [
                ("complaint_acknowledgement", "email"),
                ("welcome", "sms"),
            ]
        finally:
            await prof.stop()
    (mail,) = sinks.mail()
    assert mail["To"] == f"{cid}@example.com" and str(mail["Subject"]) == "我们已收到您的反馈（T-42）"
    assert len(sinks.sms()) == 1
