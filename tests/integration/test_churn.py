"""The churn service on the real embedded stack, under event time: drift by time alone, the ladder once, a win-back."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx

from contracts.crm import ProfileUpdated, ProfileUpdatedData, TierChanged, TierChangedData
from services.churn.app import build
from services.churn.settings import ChurnSettings
from services.runtime.clock import EventClock
from tests.support.backends import free_port
from tests.support.kafka import encode, eventually, produce, purchase, read_topic, shop_event

TOKEN = "churn-token-0123456789"
START = datetime(1997, 1, 6, 15, tzinfo=UTC)


async def _send(common, topic: str, events: list[dict]) -> None:
    await produce(
        common.kafka_bootstrap, common.topic(topic), [(e["customer_id"].encode(), encode(e), None) for e in events]
    )


def _crm_event(cls, producer: str, cid: str, at: datetime, data) -> dict:
    ev = cls(event_id=uuid.uuid4(), occurred_at=at, producer=producer, customer_id=cid, data=data)
    return json.loads(ev.to_bytes())


def _vip_profile(cid: str, at: datetime) -> dict:
    return _crm_event(ProfileUpdated, "profile", cid, at,
                      ProfileUpdatedData(value_tier="vip", top_categories=["jazz", "classical"]))  # fmt: skip


def _gold_member(cid: str, at: datetime) -> dict:
    return _crm_event(TierChanged, "loyalty", cid, at,
                      TierChangedData(from_tier="Silver", to_tier="Gold", reason="upgrade"))  # fmt: skip


async def test_a_monthly_customer_who_stops_is_escalated_once_per_step_then_won_back(common):
    settings = ChurnSettings(http_port=free_port(), api_token=TOKEN, refit_min_customers=10_000)
    common = common.model_copy(update={"sweep_interval_s": 0.2})
    host = build(common, settings, clock=EventClock())
    http = asyncio.create_task(host.http.serve())
    await host.start()
    try:
        cid = "cust-monthly-1"
        buys = [
            purchase(cid, total="25.00", occurred_at=(START + timedelta(days=30 * i)).isoformat()) for i in range(8)
        ]
        await _send(common, "crm.profile", [_vip_profile(cid, START)])
        await _send(common, "crm.tiers", [_gold_member(cid, START)])  # loyalty's tier, on its own topic
        await _send(common, "shop.purchases", buys)
        last = START + timedelta(days=30 * 7)
        api = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        seen = await eventually(lambda: _purchase_days(api, cid, 8))
        assert seen["risk"]["band"] == "low" and seen["value_tier"] == "vip" and seen["loyalty_tier"] == "Gold"

        # Nothing more from this customer. Time moves on through another customer's page views,
        # four event days at a time, slowly enough for the sweeps to see each day come.
        for k in range(1, 36):
            at = (last + timedelta(days=4 * k)).isoformat()
            await _send(
                common,
                "shop.interactions",
                [shop_event("InteractionRecorded", "ticker", {"kind": "page_view", "channel": "web"}, occurred_at=at)],
            )
            await asyncio.sleep(0.25)

        retention = await read_topic(common.kafka_bootstrap, common.topic("crm.retention"), expect=3, settle=3.0)
        steps = sorted((json.loads(r.value)["type"], json.loads(r.value)["data"].get("step")) for r in retention)
        assert steps == [("RetentionRequested", 1), ("RetentionRequested", 2), ("RetentionTaskCreated", None)]
        by_step = {json.loads(r.value)["data"].get("step", 3): json.loads(r.value) for r in retention}
        care, offer = by_step[1]["data"], by_step[2]["data"]
        assert care["kind"] == "care" and care["template_data"]["recommendations"] == ["jazz", "classical"]
        # VIP 20 %, and 3 more for a Gold member of the loyalty programme.
        assert offer["kind"] == "offer" and offer["template_data"]["offer_percent"] == 23
        assert offer["template_data"]["loyalty_tier"] == "Gold"
        assert care["band"] in ("high", "lost")
        assert any("usual gap of 30 days" in r for r in care["reasons"]), care["reasons"]
        # Crossed by time alone: the care step is dated by the event clock, long after the last purchase.
        cared_at = datetime.fromisoformat(by_step[1]["occurred_at"])
        assert last + timedelta(days=60) < cared_at < last + timedelta(days=130)
        offered_at = datetime.fromisoformat(by_step[2]["occurred_at"])
        assert timedelta(days=14) <= offered_at - cared_at < timedelta(days=14 + 5)

        churn = await read_topic(common.kafka_bootstrap, common.topic("crm.churn"), expect=2, settle=1.0)
        # While the purchases came monthly, the day one was due could read "medium" until it came;
        # after the last one the customer climbs by time alone.
        after = [
            json.loads(r.value) for r in churn if datetime.fromisoformat(json.loads(r.value)["occurred_at"]) > last
        ]
        bands = [(e["data"]["from_band"], e["data"]["to_band"]) for e in after]
        assert bands[:2] == [("low", "medium"), ("medium", "high")]

        view = (await api.get(f"/customers/{cid}")).json()
        assert view["ladder"]["step"] == 3 and view["risk"]["band"] in ("high", "lost")
        assert view["signals"]["cadence_days"] == 30.0
        assert view["waiting"] == []  # every event has been applied
        assert (await api.get("/customers/nobody")).status_code == 404
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}") as anon:
            assert (await anon.get("/models")).status_code == 401

        # The customer comes back.
        back = purchase(cid, total="40.00", occurred_at=(last + timedelta(days=4 * 36)).isoformat())
        await _send(common, "shop.purchases", [back, back])  # delivered twice
        won = await eventually(lambda: _won_back(common))
        assert len(won) == 1
        assert won[0]["data"]["ladder_step"] == 3 and won[0]["data"]["order_id"] == back["data"]["order_id"]
        assert won[0]["causation_id"] == back["event_id"]
        metrics = (await api.get("/metrics")).text
        assert 'crm_churn_won_back_total{step="3"} 1.0' in metrics
        assert 'crm_churn_winback_rate{step="3"} 1.0' in metrics
        await api.aclose()
    finally:
        await host.stop()
        host.http.should_exit = True
        await http


async def _purchase_days(api: httpx.AsyncClient, cid: str, n: int) -> dict | None:
    r = await api.get(f"/customers/{cid}")
    view = r.json() if r.status_code == 200 else {}
    return view if (view.get("signals") or {}).get("repeat_purchases") == n - 1 else None


async def _won_back(common) -> list[dict]:
    records = await read_topic(common.kafka_bootstrap, common.topic("crm.churn"), expect=10, timeout=2.0, settle=0.5)
    return [json.loads(r.value) for r in records if json.loads(r.value)["type"] == "CustomerWonBack"]
