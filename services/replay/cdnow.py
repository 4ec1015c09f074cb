"""CDNOW purchases (1997-1998) as shop events: registrations with synthetic contact data, then purchases.

Deterministic: the same file gives the same events with the same ids, so a
second replay is recognised by every consumer and changes nothing.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from contracts.shop import (
    Consents,
    CustomerRegistered,
    CustomerRegisteredData,
    PurchaseCompleted,
    PurchaseCompletedData,
    PurchaseLine,
)

NAMESPACE = uuid.UUID("0c2d3b1a-77e4-4f38-9a43-6a1e2f9c5d01")
CATEGORIES = ("rock", "pop", "jazz", "classical", "country", "soundtrack", "hip-hop", "electronic")
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / "cdnow" / "CDNOW_master.txt"
CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class CdnowPurchase:
    customer: str
    day: date
    cds: int
    dollars: Decimal
    line_no: int


def read_master(path: Path = DEFAULT_PATH) -> list[CdnowPurchase]:
    """Rows of CDNOW_master.txt (header line, then: id, YYYYMMDD, number of CDs, dollar value)."""
    out = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 4 or not parts[0].isdigit():
                continue
            cid, ymd, cds, dollars = parts
            out.append(
                CdnowPurchase(
                    cid,
                    date(int(ymd[:4]), int(ymd[4:6]), int(ymd[6:])),
                    int(cds),
                    Decimal(dollars).quantize(CENT),
                    line_no,
                )
            )
    return out


def _rng(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))


def customer_id(cdnow_id: str) -> str:
    return f"cdnow-{cdnow_id}"


@functools.cache
def _faker(locale: str):
    from faker import Faker

    return Faker(locale)


def registration(cdnow_id: str, first_day: date) -> CustomerRegistered:
    """A synthetic but plausible customer: zh-CN or en, with a realistic share of opt-outs."""
    rng = _rng("customer", cdnow_id)
    chinese = rng.random() < 0.5
    fake = _faker("zh_CN" if chinese else "en_US")
    fake.seed_instance(int(cdnow_id))
    if chinese:
        phone = f"+861{rng.choice('3456789')}{rng.randrange(10**9):09d}"
        tz, locale = rng.choice(["Asia/Shanghai", "Asia/Shanghai", "Asia/Hong_Kong"]), "zh-CN"
    else:
        phone = f"+1{rng.randrange(201, 990)}{rng.randrange(10**7):07d}"
        tz = rng.choice(["America/New_York", "America/Chicago", "America/Los_Angeles", "Europe/London"])
        locale = "en"
    birthday = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 55))
    data = CustomerRegisteredData(
        name=fake.name(),
        email=f"customer{cdnow_id}@example.{rng.choice(['com', 'net', 'org'])}",
        phone=phone,
        birthday=birthday,
        locale=locale,
        timezone=tz,
        preferred_channel="sms" if rng.random() < (0.6 if chinese else 0.3) else "email",
        consents=Consents(email=rng.random() < 0.85, sms=rng.random() < 0.7),
    )
    at = datetime.combine(first_day, time(8, 0), tzinfo=UTC)
    return CustomerRegistered(
        event_id=uuid.uuid5(NAMESPACE, f"registered/{cdnow_id}"),
        occurred_at=at,
        producer="cdnow-replay",
        customer_id=customer_id(cdnow_id),
        data=data,
    )


def purchase_event(p: CdnowPurchase) -> PurchaseCompleted:
    rng = _rng("purchase", p.line_no)
    lines = []
    if p.cds > 0:
        unit = (p.dollars / p.cds).quantize(CENT, ROUND_HALF_UP)
        remaining = p.dollars
        for i in range(p.cds):
            price = remaining if i == p.cds - 1 else min(unit, remaining)
            remaining -= price
            lines.append(
                PurchaseLine(
                    sku=f"cd-{rng.randrange(100000):05d}", category=rng.choice(CATEGORIES), quantity=1, unit_price=price
                )
            )
    # Noon plus a per-row offset keeps same-day purchases of one customer in file order.
    at = datetime.combine(p.day, time(12, 0), tzinfo=UTC) + timedelta(seconds=p.line_no % 3600)
    return PurchaseCompleted(
        event_id=uuid.uuid5(NAMESPACE, f"purchase/{p.line_no}"),
        occurred_at=at,
        producer="cdnow-replay",
        customer_id=customer_id(p.customer),
        data=PurchaseCompletedData(
            order_id=f"cdnow-{p.line_no}",
            store_id="cdnow-web",
            channel="online",
            currency="USD",
            total=p.dollars,
            lines=lines,
        ),
    )


def events(purchases: list[CdnowPurchase]) -> Iterator[tuple[date, CustomerRegistered | PurchaseCompleted]]:
    """(day, event) in event-time order: each customer registers on the day of their first purchase."""
    registered: set[str] = set()
    for p in sorted(purchases, key=lambda x: (x.day, x.line_no)):
        if p.customer not in registered:
            registered.add(p.customer)
            yield p.day, registration(p.customer, p.day)
        yield p.day, purchase_event(p)
