"""The loyalty service on the real embedded stack: earning, refunds, redemptions, a referral across
partitions, the read API and the audit; then the CDNOW master replay, audited, and played again."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.loyalty.app import build
from services.loyalty.audit import run_audit
from services.loyalty.settings import LoyaltySettings
from services.runtime.broker import consumer_lag
from services.runtime.clock import EventClock
from tests.support.backends import free_port
from tests.support.hosts import RunningService
from tests.support.kafka import eventually, produce, purchase, read_topic, registered, shop_event

TOKEN = "loyalty-token-0123456789"
T0 = datetime(1997, 2, 3, 12, tzinfo=UTC)


class Running(RunningService):
    def __init__(self, common):
        common = common.model_copy(update={"sweep_interval_s": 0.2})
        settings = LoyaltySettings(http_port=free_port(), api_token=TOKEN)
        super().__init__(build(common, settings, clock=EventClock()), common, TOKEN)

    async def send(self, topic: str, events: list[dict], times: int = 1) -> None:
        msgs = [(e["customer_id"].encode(), json.dumps(e).encode(), None) for e in events for _ in range(times)]
        await produce(self.common.kafka_bootstrap, self.common.topic(topic), msgs)

    async def account(self, cid: str) -> dict:
        r = await self.api.get(f"/accounts/{cid}")
        return r.json() if r.status_code == 200 else {}

    async def caught_up(self) -> bool:
        if self.host.pipeline.lock.locked():
            # A batch or a sweep is running: a sweep pops its customers from the schedule before it
            # writes them, so the schedule alone would say "nothing due" while their writes are on the way.
            return False
        lag = await consumer_lag(self.host.subscriber)
        nxt = self.host.store.schedule.next_due()
        return bool(lag) and all(n == 0 for _, _, n in lag) and (nxt is None or nxt > self.host.clock.now())


def at(days: float) -> str:
    return (T0 + timedelta(days=days)).isoformat()


async def test_earn_refund_redeem_and_a_referral_across_partitions(common):
    async with Running(common) as n:
        await n.send(
            "shop.interactions",
            [registered("ref-old", occurred_at=at(0)), registered("ref-new", occurred_at=at(0), referred_by="ref-old")],
        )
        first = purchase("ref-new", total="150.00", order_id="o-1", occurred_at=at(1))
        await n.send("shop.purchases", [first], times=3)  # delivered three times
        refund = shop_event(
            "PurchaseRefunded",
            "ref-new",
            {"order_id": "o-1", "refund_id": "rf-1", "currency": "USD", "amount": "30.00"},
            occurred_at=at(2),
        )
        await n.send("shop.purchases", [refund, refund])
        redemption = shop_event(
            "PointsRedemptionRequested",
            "ref-new",
            {"redemption_id": "rd-1", "points": 300, "reward": "free-shipping"},
            occurred_at=at(3),
        )
        too_much = shop_event(
            "PointsRedemptionRequested",
            "ref-new",
            {"redemption_id": "rd-2", "points": 900, "reward": "voucher-10"},
            occurred_at=at(3),
        )
        await n.send("shop.interactions", [redemption, redemption, too_much])

        async def settled():
            a, b = await n.account("ref-new"), await n.account("ref-old")
            done = a.get("entries_total") == 5 and b.get("balance") == 200
            return (a, b) if done else None

        new, old = await eventually(settled)
        # 150 USD x 1 = 150, first purchase 100, referral welcome 100; Silver from then on.
        # A refund of 30 of 150 takes 30 of the order's 150 points back; 300 redeemed.
        kinds = [(e["kind"], e["points"], e["balance"]) for e in new["entries"]]
        assert kinds == [
            ("earn", 150, 150),
            ("earn", 100, 250),
            ("earn", 100, 350),
            ("reverse", -30, 320),
            ("redeem", -300, 20),
        ]
        assert new["balance"] == 20 and new["debt"] == 0
        assert new["tier"] == "Silver" and new["progress"]["next_tier"] == "Gold"
        assert new["progress"]["qualifying"] == "120.00" and new["progress"]["needed"] == "180.00"
        # First to expire, first spent: all three lots expire together and were earned the same day, so
        # they go by id (not by arrival, which differs from run to run); one is left with 20.
        assert [(lot["remaining"], lot["expires_on"]) for lot in new["lots"]] == [(20, "1998-02-04")]
        assert old["tier"] == "Member" and old["entries"][0]["reason"] == "referral: ref-new made a first purchase"

        events = [json.loads(r.value) for r in await read_topic(
            n.common.kafka_bootstrap, n.common.topic("crm.loyalty"), expect=11, settle=1.5)]  # fmt: skip
        types = sorted(
            (e["type"], e["customer_id"], e["data"].get("points"), e["data"].get("reason"))
            for e in events
            if e["type"] in ("PointsEarned", "PointsReversed", "PointsRedeemed", "RedemptionRejected")
        )
        assert types == sorted(
            [
                ("PointsEarned", "ref-new", 150, "purchase: 150.00 USD x 1"),
                ("PointsEarned", "ref-new", 100, "first purchase bonus"),
                ("PointsEarned", "ref-new", 100, "referral: welcome bonus (referred by ref-old)"),
                ("PointsEarned", "ref-old", 200, "referral: ref-new made a first purchase"),
                ("PointsReversed", "ref-new", 30, None),
                ("PointsRedeemed", "ref-new", 300, None),
                ("RedemptionRejected", "ref-new", 900, "insufficient_balance"),
            ]
        )
        tiers = sorted((e["customer_id"], e["data"]["to_tier"]) for e in events if e["type"] == "TierChanged")
        assert tiers == [("ref-new", "Member"), ("ref-new", "Silver"), ("ref-old", "Member")]
        care = await read_topic(n.common.kafka_bootstrap, n.common.topic("crm.care"), expect=1, settle=1.0)
        (upgrade,) = [json.loads(r.value) for r in care]
        assert upgrade["data"]["kind"] == "tier_upgrade" and upgrade["data"]["template_data"]["tier"] == "Silver"

        report = await run_audit(n.common)
        assert (report.accounts, report.discrepancies) == (2, {})
        assert (await n.api.get("/accounts/nobody")).status_code == 404
        async with httpx.AsyncClient() as anon:
            assert (await anon.get(f"http://127.0.0.1:{n.settings.http_port}/accounts/ref-new")).status_code == 401
        metrics = (await n.api.get("/metrics")).text
        assert 'crm_loyalty_points_total{kind="earned"} 550.0' in metrics
        assert 'crm_loyalty_points_total{kind="redeemed"} 300.0' in metrics


@pytest.mark.slow
async def test_cdnow_master_replay_audits_clean_and_a_second_replay_changes_nothing(common):
    from services.replay.cdnow import events, first_customers, read_master
    from services.replay.player import play

    stream = list(events(read_master()))
    async with Running(common) as n:
        sent = await play(n.common, stream, seconds_per_day=None)
        assert sent == len(stream)
        await eventually(n.caught_up, timeout=600, interval=2.0)
        first = await run_audit(n.common)
        assert first.discrepancies == {}
        assert first.accounts == 23_570
        fingerprint = await _fingerprint(n)
        loyalty_events = await _count(n, "crm.loyalty")

        # Again, the first 1,000 customers' part of it (all of it took another 90 s for the same
        # point: every event is recognised; nothing is earned, expired or published twice).
        await play(n.common, events(first_customers(read_master(), 1000)), seconds_per_day=None)
        await eventually(n.caught_up, timeout=600, interval=2.0)
        again = await run_audit(n.common)
        assert again.as_dict() == first.as_dict()
        assert await _fingerprint(n) == fingerprint
        assert await _count(n, "crm.loyalty") == loyalty_events
    print(
        f"\nCDNOW master: {first.accounts} accounts, {first.entries} entries, "
        f"{first.points_outstanding} points outstanding, {loyalty_events} loyalty events"
    )


async def _fingerprint(n: Running) -> str:
    h = hashlib.sha256()
    docs = n.host.db["accounts"].find({}, {"s": 1}).sort("_id", 1)
    async for d in docs:
        h.update(json.dumps([d["_id"], d.get("s")], sort_keys=True, default=str).encode())
    return h.hexdigest()


async def _count(n: Running, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    from services.runtime.kafka import assign_whole_topic

    consumer = AIOKafkaConsumer(bootstrap_servers=n.common.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await assign_whole_topic(consumer, n.common.topic(topic))
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
        return sum(ends[p] - starts[p] for p in parts)
    finally:
        await consumer.stop()
