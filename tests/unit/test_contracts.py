"""The shop-facing contract: strict where shops must be strict, clear about why a message is refused."""

from __future__ import annotations

import json
import uuid
from typing import get_args

import pytest
from pydantic import BaseModel

from contracts import EVENTS_BY_TOPIC, InvalidMessage, derive, derived_id, registry_for
from contracts.crm import CareRequested, CareRequestedData, LifecycleStageChanged, LifecycleStageChangedData
from contracts.generate import drift
from contracts.shop import PurchaseCompleted

PURCHASES = registry_for("shop.purchases")
INTERACTIONS = registry_for("shop.interactions")

GOOD = {
    "event_id": "0b7f2a8e-2d3c-4c5a-9a0e-1f2b3c4d5e6f",
    "type": "PurchaseCompleted",
    "schema_version": 1,
    "occurred_at": "2026-11-22T10:00:00+08:00",
    "producer": "shop-42",
    "customer_id": "c-123",
    "data": {
        "order_id": "o-1",
        "store_id": "s-1",
        "channel": "online",
        "currency": "CNY",
        "total": "123.45",
        "lines": [{"sku": "a", "category": "cd", "quantity": 1, "unit_price": "12.30"}],
    },
}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def mutate(path: str, value):
    doc = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def test_valid_purchase_round_trips_with_money_as_strings():
    event = PURCHASES.parse(raw(GOOD), b"c-123")
    assert isinstance(event, PurchaseCompleted)
    assert str(event.data.total) == "123.45"
    back = json.loads(event.to_bytes())
    assert back["data"]["total"] == "123.45" and back["data"]["lines"][0]["unit_price"] == "12.30"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (mutate("data.total", 123.45), "decimal string"),
        (mutate("data.total", "-1.00"), "greater than or equal to 0"),
        (mutate("data.total", "1e3"), "plain decimal"),
        (mutate("data.lines.0.quantity", -1), "greater than or equal to 0"),
        (mutate("data.lines.0.quantity", "1"), "valid integer"),
        (mutate("data.currency", "XYZ"), "ISO 4217"),
        (mutate("occurred_at", "2026-11-22T10:00:00"), "timezone"),
        (mutate("occurred_at", 1763805600), "ISO 8601"),
        (mutate("event_id", "not-a-uuid"), "event_id"),
        (mutate("customer_id", KeyError), "customer_id: Field required"),
        (mutate("data.order_id", KeyError), "data.order_id: Field required"),
        (mutate("data.coupon", "X"), "data.coupon: Extra inputs are not permitted"),
        (mutate("schema_version", 2), "unsupported schema_version 2"),
        (mutate("schema_version", "1"), "schema_version must be an integer"),
        (mutate("type", "PurchaseTeleported"), "unknown event type 'PurchaseTeleported'"),
        (mutate("data.channel", "telepathy"), "data.channel"),
    ],
)
def test_invalid_purchases_are_refused_with_a_readable_reason(doc, reason):
    with pytest.raises(InvalidMessage) as exc:
        PURCHASES.parse(raw(doc), b"c-123")
    assert reason in exc.value.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (None, "tombstone"),
        (b" " * 1_000_001, "exceeds the limit"),
    ],
)
def test_unparseable_bytes_are_refused(payload, reason):
    with pytest.raises(InvalidMessage) as exc:
        PURCHASES.parse(payload, b"c-123")
    assert reason in exc.value.reason


def test_key_must_match_customer_id():
    with pytest.raises(InvalidMessage, match="disagrees with customer_id"):
        PURCHASES.parse(raw(GOOD), b"c-999")


def test_interaction_events_validate_their_own_rules():
    base = {**GOOD, "type": "InteractionRecorded"}
    survey = {**base, "data": {"kind": "survey", "channel": "web", "score": 6}}
    with pytest.raises(InvalidMessage, match="less than or equal to 5"):
        INTERACTIONS.parse(raw(survey))
    no_score = {**base, "data": {"kind": "survey", "channel": "web"}}
    with pytest.raises(InvalidMessage, match="needs a score"):
        INTERACTIONS.parse(raw(no_score))
    reg = {
        **GOOD,
        "type": "CustomerRegistered",
        "data": {
            "name": "Li Lei",
            "email": "li@example.com",
            "phone": "+8613800000000",
            "birthday": "2000-02-29",
            "locale": "zh-CN",
            "timezone": "Asia/Shanghai",
            "preferred_channel": "sms",
            "consents": {"email": True, "sms": False},
        },
    }
    assert INTERACTIONS.parse(raw(reg)).data.birthday.isoformat() == "2000-02-29"
    for tz in ("Mars/Olympus", "Europe", "Etc", "America"):  # folders of the zone database too
        bad_tz = {**reg, "data": {**reg["data"], "timezone": tz}}
        with pytest.raises(InvalidMessage, match="IANA"):
            INTERACTIONS.parse(raw(bad_tz))
    bad_phone = {**reg, "data": {**reg["data"], "phone": "13800000000"}}
    with pytest.raises(InvalidMessage, match=r"data\.phone"):
        INTERACTIONS.parse(raw(bad_phone))
    empty_update = {**GOOD, "type": "CustomerUpdated", "data": {}}
    with pytest.raises(InvalidMessage, match="at least one field"):
        INTERACTIONS.parse(raw(empty_update))


def test_crm_events_tolerate_fields_added_later():
    care = registry_for("crm.care")
    doc = {
        **GOOD,
        "type": "CareRequested",
        "data": {"kind": "welcome", "purpose": "transactional", "added_in_a_later_release": 1},
    }
    assert care.parse(raw(doc)).data.kind == "welcome"


def test_derived_events_have_ids_that_depend_only_on_their_cause():
    cause = PURCHASES.parse(raw(GOOD))
    data = CareRequestedData(kind="first_purchase_thanks", purpose="transactional")
    a = derive(CareRequested, cause, data, producer="profile")
    b = derive(CareRequested, cause, data, producer="profile")
    other = derive(CareRequested, cause, data, producer="profile", discriminator="again")
    assert a.event_id == b.event_id == derived_id(uuid.UUID(GOOD["event_id"]), "CareRequested", "")
    assert other.event_id != a.event_id
    assert a.causation_id == cause.event_id and a.correlation_id == cause.event_id
    assert a.key() == b"c-123"
    # A grandchild keeps the original shop event as its correlation id.
    grandchild = derive(CareRequested, a, data, producer="notify")
    assert grandchild.correlation_id == cause.event_id and grandchild.causation_id == a.event_id


def test_committed_asyncapi_and_json_schemas_match_the_models():
    assert drift() == [], "run `make contracts` and commit the result"


def _models(model: type[BaseModel]):
    yield model
    for f in model.model_fields.values():
        for arg in (f.annotation, *get_args(f.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _models(arg)


def test_every_nullable_field_has_a_default_so_what_is_published_parses_again():
    """Events are written without null fields (exclude_none); a nullable field without a
    default would make consumers dead-letter what the producer just published."""
    missing = [
        f"{m.__name__}.{name}"
        for events in EVENTS_BY_TOPIC.values()
        for event in events
        for m in _models(event)
        for name, f in m.model_fields.items()
        if f.is_required() and type(None) in get_args(f.annotation)
    ]
    assert missing == []


def test_a_first_lifecycle_stage_round_trips():
    ev = LifecycleStageChanged(
        event_id=uuid.uuid4(),
        occurred_at="1997-01-01T00:00:00Z",
        producer="profile",
        customer_id="c1",
        data=LifecycleStageChangedData(from_stage=None, to_stage="new"),
    )
    parsed = registry_for("crm.segments").parse(ev.to_bytes(), b"c1")
    assert parsed.data.from_stage is None


def test_every_event_type_names_the_topic_it_is_registered_on():
    # A service publishes to its event's TOPIC, and its readers accept the types registered on
    # that topic: the two must agree, or the events are dead-lettered as unknown.
    for topic, models in EVENTS_BY_TOPIC.items():
        for model in models:
            assert topic == model.TOPIC, (model.__name__, model.TOPIC, topic)
