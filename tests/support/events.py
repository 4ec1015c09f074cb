"""Shop events as objects, for pure domain tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from contracts.shop import PurchaseCompleted, PurchaseCompletedData, PurchaseLine

T0 = datetime(1997, 1, 10, 12, tzinfo=UTC)


def ev(cls, data, at=T0, cid="c1"):
    return cls(event_id=uuid.uuid4(), occurred_at=at, producer="t", customer_id=cid, data=data)


def buy(order="o1", total="30.00", at=T0, lines=None, cid="c1"):
    lines = lines or [PurchaseLine(sku="a", category="rock", quantity=1, unit_price=total)]
    return ev(
        PurchaseCompleted,
        PurchaseCompletedData(order_id=order, store_id="s", channel="online", currency="USD", total=total, lines=lines),
        at,
        cid,
    )
