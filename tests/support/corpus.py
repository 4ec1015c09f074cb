"""Malformed shop messages, each with the topic it is sent to and a fragment of the reason it must be refused for."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.support.kafka import purchase, shop_event


@dataclass(frozen=True)
class Bad:
    name: str
    topic: str
    key: bytes | None
    value: bytes | None
    reason: str  # a fragment of the dead-letter reason


def _purchase(**changes) -> dict:
    ev = purchase("bad-1", total="10.00", order_id="o-bad")
    for path, value in changes.items():
        node = ev
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is _DROP:
            node.pop(leaf)
        else:
            node[leaf] = value
    return ev


_DROP = object()


def _j(ev) -> bytes:
    return json.dumps(ev).encode()


def _registration(**data) -> dict:
    base = {"name": "A", "email": "a@example.com", "phone": "+8613800000000", "timezone": "Asia/Shanghai"}
    return shop_event("CustomerRegistered", "bad-1", {**base, **data})


P, INT = "shop.purchases", "shop.interactions"
K = b"bad-1"


def corpus() -> list[Bad]:
    big = _purchase()
    big["data"]["lines"] = [{"sku": "x" * 100, "category": "rock", "quantity": 1, "unit_price": "1.00"}] * 30_000
    wrong_key = _purchase(customer_id="bad-2")
    return [
        Bad("invalid JSON", P, K, b'{"event_id": ', "invalid JSON"),
        Bad("empty bytes", P, K, b"", "invalid JSON"),
        Bad("tombstone", P, K, None, "tombstone"),
        Bad("JSON array", P, K, b"[1, 2]", "must be a JSON object, got list"),
        Bad("JSON string", P, K, b'"purchase"', "must be a JSON object, got str"),
        Bad("JSON number", P, K, b"42", "must be a JSON object, got int"),
        Bad("missing type", P, K, _j(_purchase(type=_DROP)), "missing or non-string field 'type'"),
        Bad("type not a string", P, K, _j(_purchase(type=7)), "missing or non-string field 'type'"),
        Bad("unknown type", P, K, _j(_purchase(type="PurchaseExploded")), "unknown event type 'PurchaseExploded'"),
        Bad("type of the other topic", P, K, _j(_registration()), "unknown event type 'CustomerRegistered'"),
        Bad("future schema_version", P, K, _j(_purchase(schema_version=2)), "unsupported schema_version 2"),
        Bad("schema_version as text", P, K, _j(_purchase(schema_version="1")), "schema_version must be an integer"),
        Bad("missing event_id", P, K, _j(_purchase(event_id=_DROP)), "event_id"),
        Bad("event_id not a UUID", P, K, _j(_purchase(event_id="abc")), "event_id"),
        Bad("missing occurred_at", P, K, _j(_purchase(occurred_at=_DROP)), "occurred_at"),
        Bad("naive timestamp", P, K, _j(_purchase(occurred_at="1997-01-01T10:00:00")), "occurred_at"),
        Bad("timestamp garbage", P, K, _j(_purchase(occurred_at="yesterday")), "occurred_at"),
        Bad("missing customer_id", P, K, _j(_purchase(customer_id=_DROP)), "customer_id"),
        Bad("customer_id with spaces", P, b"bad 1", _j(_purchase(customer_id="bad 1")), "customer_id"),
        Bad("customer_id too long", P, b"c" * 129, _j(_purchase(customer_id="c" * 129)), "customer_id"),
        Bad("key disagrees with customer_id", P, K, _j(wrong_key), "disagrees with customer_id 'bad-2'"),
        Bad("no key", P, None, _j(_purchase()), "no message key"),
        Bad("unknown envelope field", P, K, _j(_purchase(color="red")), "color"),
        Bad("missing data", P, K, _j(_purchase(data=_DROP)), "data"),
        Bad("data not an object", P, K, _j(_purchase(data=[1])), "data"),
        Bad("unknown data field", P, K, _j(_purchase(data__coupon="X")), "coupon"),
        Bad("missing order_id", P, K, _j(_purchase(data__order_id=_DROP)), "order_id"),
        Bad("negative money", P, K, _j(_purchase(data__total="-5.00")), "total"),
        Bad("float money", P, K, _j(_purchase(data__total=10.5)), "total"),
        Bad("money with 7 decimals", P, K, _j(_purchase(data__total="10.0000001")), "total"),
        Bad("money in exponent notation", P, K, _j(_purchase(data__total="1e3")), "total"),
        Bad("money not a number", P, K, _j(_purchase(data__total="ten")), "total"),
        Bad("money as boolean", P, K, _j(_purchase(data__total=True)), "total"),
        Bad("lowercase currency", P, K, _j(_purchase(data__currency="usd")), "currency"),
        Bad("unknown currency", P, K, _j(_purchase(data__currency="XYZ")), "currency"),
        Bad("channel not allowed", P, K, _j(_purchase(data__channel="telepathy")), "channel"),
        Bad("lines not a list", P, K, _j(_purchase(data__lines="cd")), "lines"),
        Bad(
            "negative quantity",
            P,
            K,
            _j(_purchase(data__lines=[{"sku": "a", "category": "rock", "quantity": -1, "unit_price": "1.00"}])),
            "quantity",
        ),
        Bad(
            "negative unit price",
            P,
            K,
            _j(_purchase(data__lines=[{"sku": "a", "category": "rock", "quantity": 1, "unit_price": "-1.00"}])),
            "unit_price",
        ),
        Bad(
            "negative refund",
            P,
            K,
            _j(
                shop_event(
                    "PurchaseRefunded",
                    "bad-1",
                    {"order_id": "o", "refund_id": "r", "currency": "USD", "amount": "-1.00"},
                )
            ),
            "amount",
        ),
        Bad("5 MB payload", P, K, _j(big), "exceeds the limit"),
        Bad("not UTF-8", P, K, b'{"type": "PurchaseCompleted", "x": "\xff\xfe"}', "not UTF-8"),
        Bad("Latin-1 bytes", INT, K, _j(_registration(name="Zoë")).replace(b"Zo\\u00eb", b"Zo\xeb"), "not UTF-8"),
        Bad("invalid e-mail", INT, K, _j(_registration(email="not-an-email")), "email"),
        Bad("phone not E.164", INT, K, _j(_registration(phone="138 0000 0000")), "phone"),
        Bad("unknown timezone", INT, K, _j(_registration(timezone="Mars/Olympus_Mons")), "timezone"),
        Bad("a zone database folder as timezone", INT, K, _j(_registration(timezone="Europe")), "timezone"),
        Bad(
            "consent on an unknown channel",
            INT,
            K,
            _j(shop_event("ConsentChanged", "bad-1", {"channel": "fax", "granted": False, "source": "x"})),
            "channel",
        ),
        Bad(
            "survey score out of range",
            INT,
            K,
            _j(shop_event("InteractionRecorded", "bad-1", {"kind": "survey", "channel": "web", "score": 9})),
            "score",
        ),
        Bad(
            "redemption of zero points",
            INT,
            K,
            _j(shop_event("PointsRedemptionRequested", "bad-1", {"redemption_id": "r", "points": 0, "reward": "v"})),
            "points",
        ),
    ]
