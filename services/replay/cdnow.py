"""CDNOW purchases (1997-1998) as shop events: registrations with synthetic contact data, then purchases,
with sparse seeded interactions mixed in so that every feature is exercised:

    referrals  5% of new customers name an earlier customer as their referrer
    refunds    2% of purchases, 3-20 days later, partial or full
    complaints 1% of purchases, 1-5 days later, half of them resolved a few days after
    surveys    3% of purchases, 5-10 days later, scores 1-5
    redemptions 1% of purchases: a voucher-5 (500 points, the default catalogue) the next day;
                accepted or refused for the balance, both paths occur
    consent    0.5% of purchases: an opt-out of one channel a week later

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

from contracts import Event
from contracts.shop import (
    ConsentChanged,
    ConsentChangedData,
    Consents,
    CustomerRegistered,
    CustomerRegisteredData,
    InteractionRecorded,
    InteractionRecordedData,
    PointsRedemptionRequested,
    PointsRedemptionRequestedData,
    PurchaseCompleted,
    PurchaseCompletedData,
    PurchaseLine,
    PurchaseRefunded,
    PurchaseRefundedData,
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


def first_customers(purchases: list[CdnowPurchase], n: int | None) -> list[CdnowPurchase]:
    """The purchases of the n lowest customer ids (all of them for None): a smaller, still complete history."""
    if n is None:
        return purchases
    keep = set(sorted({int(p.customer) for p in purchases})[:n])
    return [p for p in purchases if int(p.customer) in keep]


def _rng(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))


def customer_id(cdnow_id: str) -> str:
    return f"cdnow-{cdnow_id}"


@functools.cache
def _faker(locale: str):
    from faker import Faker

    return Faker(locale)


def registration(cdnow_id: str, first_day: date, referred_by: str | None = None) -> CustomerRegistered:
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
        referred_by=referred_by,
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


def events(purchases: list[CdnowPurchase], extras: bool = True) -> Iterator[tuple[date, Event]]:
    """(day, event) in event-time order: each customer registers on the day of their first purchase."""
    stream: list[tuple[date, int, Event]] = []
    registered: list[str] = []
    known: set[str] = set()
    for p in sorted(purchases, key=lambda x: (x.day, x.line_no)):
        if p.customer not in known:
            known.add(p.customer)
            rng = _rng("referral", p.customer)
            referrer = customer_id(rng.choice(registered)) if extras and registered and rng.random() < 0.05 else None
            registered.append(p.customer)
            stream.append((p.day, len(stream), registration(p.customer, p.day, referrer)))
        purchase = purchase_event(p)
        stream.append((p.day, len(stream), purchase))
        if extras:
            stream.extend((e.occurred_at.date(), len(stream) + i, e) for i, e in enumerate(interactions(p, purchase)))
    # Within a day by time too: the player promises time order on every partition (watermarks).
    stream.sort(key=lambda x: (x[0], x[2].occurred_at, x[1]))
    for day, _, event in stream:
        yield day, event


def interactions(p: CdnowPurchase, purchase: PurchaseCompleted) -> list[Event]:
    """The seeded extras that follow one purchase (see the module docstring)."""
    rng = _rng("extras", p.line_no)
    cid, order = purchase.customer_id, purchase.data.order_id
    out: list[Event] = []

    def at(days: int, hour: int) -> datetime:
        return datetime.combine(p.day + timedelta(days=days), time(hour, 0), tzinfo=UTC) + timedelta(
            seconds=p.line_no % 3600
        )

    def ev(cls, kind: str, when: datetime, data) -> Event:
        return cls(
            event_id=uuid.uuid5(NAMESPACE, f"{kind}/{p.line_no}"),
            occurred_at=when,
            producer="cdnow-replay",
            customer_id=cid,
            data=data,
        )

    if rng.random() < 0.02 and p.dollars > 0:
        share = Decimal(1) if rng.random() < 0.5 else Decimal(rng.randrange(30, 100)) / 100
        amount = (p.dollars * share).quantize(CENT, ROUND_HALF_UP)
        data = PurchaseRefundedData(order_id=order, refund_id=f"rf-{p.line_no}", currency="USD", amount=amount)
        out.append(ev(PurchaseRefunded, "refund", at(rng.randrange(3, 21), 15), data))
    if rng.random() < 0.01:
        ticket = f"T-{p.line_no}"
        opened = rng.randrange(1, 6)
        data = InteractionRecordedData(kind="complaint", channel="phone", ticket_id=ticket, ticket_status="open",
                                       text="The CD arrived damaged.")  # fmt: skip
        out.append(ev(InteractionRecorded, "complaint", at(opened, 10), data))
        if rng.random() < 0.5:
            done = InteractionRecordedData(
                kind="complaint", channel="phone", ticket_id=ticket, ticket_status="resolved"
            )
            out.append(ev(InteractionRecorded, "resolved", at(opened + rng.randrange(1, 5), 16), done))
    if rng.random() < 0.03:
        score = rng.choices([1, 2, 3, 4, 5], weights=[1, 1, 2, 4, 4])[0]
        data = InteractionRecordedData(kind="survey", channel="email", score=score)
        out.append(ev(InteractionRecorded, "survey", at(rng.randrange(5, 11), 11), data))
    if rng.random() < 0.01:
        data = PointsRedemptionRequestedData(redemption_id=f"rd-{p.line_no}", points=500, reward="voucher-5")
        out.append(ev(PointsRedemptionRequested, "redeem", at(1, 14), data))
    if rng.random() < 0.005:
        data = ConsentChangedData(channel=rng.choice(["email", "sms"]), granted=False, source="preference_centre")
        out.append(ev(ConsentChanged, "consent", at(7, 9), data))
    return out
