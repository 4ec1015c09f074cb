"""The profile service on the real embedded stack: care moments exactly once, encryption, erasure, read API."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.fernet import Fernet
from pymongo import AsyncMongoClient

from services.profile.app import build
from services.profile.settings import ProfileSettings
from services.runtime.clock import EventClock
from tests.support.backends import free_port
from tests.support.kafka import care_kinds, encode, eventually, produce, purchase, read_topic, registered, shop_event

TOKEN = "test-token-0123456789"


@pytest.fixture
async def profile(common):
    """A running profile service (HTTP included) and its settings."""
    settings = ProfileSettings(
        http_port=free_port(),
        encryption_keys=Fernet.generate_key().decode(),
        lookup_key="lookup-key-for-tests-0123456789",
        api_token=TOKEN,
    )
    host = build(common, settings)
    http = asyncio.create_task(host.http.serve())
    await host.start()
    try:
        yield host
    finally:
        await host.stop()
        host.http.should_exit = True
        await http


def _api(host) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{host.settings.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}
    )


async def _dump(common) -> list[dict]:
    """Every document of the profile database, as a support engineer's mongodump would see it."""
    client = AsyncMongoClient(common.mongo_url)
    try:
        db = client[f"{common.db_prefix}profile"]
        out = []
        for name in await db.list_collection_names():
            out.extend([d async for d in db[name].find()])
        return out
    finally:
        await client.close()


async def _send(common, topic: str, events: list[dict], times: int = 1) -> None:
    msgs = [(e["customer_id"].encode(), encode(e), None) for e in events for _ in range(times)]
    await produce(common.kafka_bootstrap, common.topic(topic), msgs)


async def test_care_requests_exactly_once_under_redelivery(common, profile):
    cid = "cust-care-1"
    reg = registered(cid)
    buy = purchase(cid, total="42.50")
    complaint = shop_event("InteractionRecorded", cid, {"kind": "complaint", "channel": "phone", "ticket_id": "T-9"})
    # Every input delivered twice, as after a producer retry or a consumer crash.
    await _send(common, "shop.interactions", [reg], times=2)
    await _send(common, "shop.purchases", [buy], times=2)
    await _send(common, "shop.interactions", [complaint], times=2)

    care = await read_topic(common.kafka_bootstrap, common.topic("crm.care"), expect=3, settle=3.0)
    assert care_kinds(care) == ["complaint_acknowledgement", "first_purchase_thanks", "welcome"]
    assert len({r.value for r in care}) == 3
    by_kind = {json.loads(r.value)["data"]["kind"]: json.loads(r.value) for r in care}
    assert by_kind["first_purchase_thanks"]["data"]["template_data"]["order_id"] == buy["data"]["order_id"]
    assert by_kind["complaint_acknowledgement"]["data"]["purpose"] == "transactional"
    assert by_kind["welcome"]["causation_id"] == reg["event_id"]

    async with _api(profile) as api:
        view = (await eventually(lambda: _complaint_seen(api, cid))).json()
        assert view["contact"]["email"] == f"{cid}@example.com"
        assert view["purchases"]["orders"] == 1
        assert view["spend"]["USD"]["net"] == "42.50"
        assert view["complaints"]["open"] == ["T-9"]
        assert view["segment"] == "New" and view["lifecycle_stage"] == "new"
        assert view["consent"]["sms"]["granted"] is True
        found = await api.get("/customers", params={"email": f"{cid.upper()}@example.com"})
        assert found.status_code == 200 and found.json()["customer_id"] == cid
        assert (await api.get("/customers", params={"phone": "+8613800000001"})).status_code == 404
        assert (await api.get("/customers/nobody")).status_code == 404
        segments = (await api.get("/segments")).json()
        assert segments["segments"] == {"New": 1}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{profile.settings.http_port}") as anon:
        assert (await anon.get(f"/customers/{cid}")).status_code == 401
        assert (await anon.get("/segments")).status_code == 401

    # crm.profile: one snapshot per change, never one per redelivery; the changes of segment and
    # stage on crm.segments, once each.
    prof = await read_topic(common.kafka_bootstrap, common.topic("crm.profile"), expect=2, settle=2.0)
    assert [json.loads(r.value)["type"] for r in prof] == ["ProfileUpdated", "ProfileUpdated"]
    changes = await read_topic(common.kafka_bootstrap, common.topic("crm.segments"), expect=2, settle=1.0)
    assert sorted(json.loads(r.value)["type"] for r in changes) == ["LifecycleStageChanged", "SegmentChanged"]

    # Nothing readable at rest: no e-mail, phone or name anywhere in the database.
    dump = json.dumps(await _dump(common), default=str)
    for secret in (f"{cid}@example.com", "+8613800138000", "8613800138000", "Li Wei"):
        assert secret not in dump


async def _complaint_seen(api, cid):
    r = await api.get(f"/customers/{cid}")
    return r if r.status_code == 200 and r.json()["complaints"]["total"] == 1 else None


async def test_erasure_leaves_no_personal_data(common, profile):
    cid = "cust-erase-1"
    await _send(common, "shop.interactions", [registered(cid, name="Erin Example")])
    await _send(common, "shop.purchases", [purchase(cid, total="19.99")])
    async with _api(profile) as api:
        await eventually(lambda: _orders(api, cid, 1))
        await _send(
            common,
            "shop.interactions",
            [shop_event("CustomerErasureRequested", cid, {"request_id": "gdpr-1", "reason": "customer request"})],
        )
        erased = await read_topic(common.kafka_bootstrap, common.topic("crm.profile"), expect=3, settle=2.0)
        assert [
            json.loads(r.value)["data"]["request_id"] for r in erased if json.loads(r.value)["type"] == "CustomerErased"
        ] == ["gdpr-1"]
        view = (await eventually(lambda: _erased(api, cid))).json()
        assert view["contact"] == {"name": None, "email": None, "phone": None}
        assert view["spend"]["USD"]["net"] == "19.99"  # anonymous aggregates stay
        assert (await api.get("/customers", params={"email": f"{cid}@example.com"})).status_code == 404

    docs = await _dump(common)
    mine = [d for d in docs if d.get("_id") == cid or d.get("c") == cid]
    text = json.dumps(mine, default=str)
    for secret in (f"{cid}@example.com", "8613800138000", "Erin Example"):
        assert secret not in text
    assert "gAAAAA" not in text  # no Fernet token left either: not even ciphertext
    assert [d for d in docs if d.get("c") == cid] == []  # lookup entries gone
    assert all(not d.get("outbox") for d in mine)


async def _orders(api, cid, n):
    r = await api.get(f"/customers/{cid}")
    return r.status_code == 200 and r.json()["purchases"]["orders"] == n


async def _erased(api, cid):
    r = await api.get(f"/customers/{cid}")
    return r if r.status_code == 200 and r.json()["erased"] else None


async def test_birthday_greeting_at_nine_local_time_under_event_time(common):
    """A replay: event time drives the clock, the sweep greets at 09:00 Shanghai time (01:00 UTC)."""
    settings = ProfileSettings(
        http_port=free_port(), encryption_keys=Fernet.generate_key().decode(), lookup_key="x" * 32, api_token=TOKEN
    )
    common = common.model_copy(update={"sweep_interval_s": 0.2})
    host = build(common, settings, clock=EventClock())
    await host.start()
    try:
        cid = "cust-bday-1"
        start = datetime(1997, 3, 1, 12, tzinfo=UTC)
        await _send(
            common, "shop.interactions", [registered(cid, birthday="1972-03-02", occurred_at=start.isoformat())]
        )
        # Event time moves on (a page view the next afternoon); the greeting itself comes from the sweep.
        later = (start + timedelta(days=1, hours=2)).isoformat()
        view = shop_event("InteractionRecorded", cid, {"kind": "page_view", "channel": "web"}, occurred_at=later)
        await _send(common, "shop.interactions", [view])
        care = await read_topic(common.kafka_bootstrap, common.topic("crm.care"), expect=2, settle=2.0)
        greetings = [json.loads(r.value) for r in care if json.loads(r.value)["data"]["kind"] == "birthday_greeting"]
        assert len(greetings) == 1
        g = greetings[0]
        assert g["customer_id"] == cid
        assert datetime.fromisoformat(g["data"]["not_before"]) == datetime(1997, 3, 2, 1, tzinfo=UTC)
    finally:
        await host.stop()


async def test_the_population_scan_measures_gaps_in_the_customers_local_days(common):
    # What the RFM recency cut points are computed from, read from the real store: a Tokyo customer's
    # two purchases at 19:00 and 01:00 local are one local day apart, though on one UTC date.
    from services.profile.store import ProfileStore
    from services.runtime.crypto import LookupHasher

    client = AsyncMongoClient(common.mongo_url)
    try:
        db = client[common.db_prefix + "profile_population"]
        store = ProfileStore(db, None, LookupHasher("lookup-key-0123456789"))

        def doc(cid: str, tz: str, first: datetime, last: datetime) -> dict:
            purchases = {"first": first.isoformat(), "last": last.isoformat(), "days": 2, "orders": 2}
            spend = {"USD": {"gross": "50.00", "refunded": "0", "orders": 2, "refunded_orders": 0}}
            return {"_id": cid, "s": {"purchases": purchases, "spend": spend, "profile": {"timezone": tz}}}

        await db["customers"].insert_many([
            doc("tokyo", "Asia/Tokyo", datetime(2024, 1, 1, 10, tzinfo=UTC), datetime(2024, 1, 1, 16, tzinfo=UTC)),
            doc("utc", "UTC", datetime(2024, 1, 1, 10, tzinfo=UTC), datetime(2024, 1, 11, 10, tzinfo=UTC)),
        ])  # fmt: skip
        rows, _ = await store.population(datetime(2024, 2, 1, tzinfo=UTC))
        assert sorted(row.mean_gap_days for row in rows) == [1.0, 10.0]
    finally:
        await client.drop_database(common.db_prefix + "profile_population")
        await client.close()
