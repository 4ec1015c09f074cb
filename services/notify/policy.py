"""The contact policy as pure functions: consent, channel choice, quiet hours, frequency caps.

Applied in this order for every request and channel decision (dedup on
(request id, channel) happens before, in the service): consent, channel,
quiet hours (marketing only), caps (marketing only). Each outcome carries a
reason, so every decision can be recorded and explained.

Transactional requests (e.g. a complaint acknowledgement) follow the same
consent rule as marketing: a channel the customer has not consented to is never
used. They skip quiet hours and caps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Channel = Literal["email", "sms"]
CHANNELS: tuple[Channel, ...] = ("email", "sms")


@dataclass(frozen=True)
class Contact:
    """Notify's projection of one customer (from crm.profile and its own delivery outcomes)."""

    email: str | None = None
    phone: str | None = None
    consents: dict[str, bool] = field(default_factory=dict)
    preferred_channel: Channel = "email"
    timezone: str = "UTC"
    locale: str = "en"
    unreachable: frozenset[str] = frozenset()  # channels whose address failed permanently

    def address(self, channel: str) -> str | None:
        return self.email if channel == "email" else self.phone

    def usable(self, channel: str) -> bool:
        return bool(self.consents.get(channel)) and bool(self.address(channel)) and channel not in self.unreachable


@dataclass(frozen=True)
class QuietHours:
    start: time = time(21, 0)
    end: time = time(9, 0)

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError("quiet hours need a start different from their end (use no window instead)")


@dataclass(frozen=True)
class Caps:
    per_day: int = 1
    per_week: int = 3


@dataclass(frozen=True)
class Decision:
    action: Literal["send", "defer", "suppress"]
    channel: Channel | None
    reason: str
    not_before: datetime | None = None


def choose_channel(contact: Contact) -> tuple[Channel | None, str]:
    """The preferred channel if consented and reachable, else the other one, else none (with why)."""
    other: Channel = "sms" if contact.preferred_channel == "email" else "email"
    for channel in (contact.preferred_channel, other):
        if contact.usable(channel):
            reason = "preferred channel" if channel == contact.preferred_channel else _fallback_reason(contact)
            return channel, reason
    if not any(contact.consents.get(c) for c in CHANNELS):
        return None, "no consent on any channel"
    return None, "no consented channel with a reachable address"


def _fallback_reason(contact: Contact) -> str:
    p = contact.preferred_channel
    if not contact.consents.get(p):
        return f"fallback: no consent for {p}"
    if p in contact.unreachable:
        return f"fallback: {p} unreachable"
    return f"fallback: no {p} address"


def quiet_until(now: datetime, tz: str, quiet: QuietHours) -> datetime | None:
    """When the customer's quiet window ends, if `now` falls in it (local time, DST-aware); else None."""
    zone = _zone(tz)
    local = now.astimezone(zone)
    t = local.time()
    crosses_midnight = quiet.start > quiet.end
    inside = (t >= quiet.start or t < quiet.end) if crosses_midnight else (quiet.start <= t < quiet.end)
    if not inside:
        return None
    day = local.date() if (not crosses_midnight or t < quiet.end) else local.date() + timedelta(days=1)
    # Local wall time -> aware datetime; a non-existent time (DST gap) resolves forward with fold=0.
    opens = datetime.combine(day, quiet.end, tzinfo=zone)
    return opens.astimezone(now.tzinfo)


def over_cap(sent: Iterable[datetime], now: datetime, caps: Caps) -> str | None:
    """A reason if one more marketing message now would exceed a cap (rolling 24 hours / 7 days)."""
    sent = list(sent)
    # No upper bound: a message queued by a batch after this round read its `now` still counts.
    day = sum(1 for t in sent if now - timedelta(days=1) < t)
    week = sum(1 for t in sent if now - timedelta(days=7) < t)
    if day >= caps.per_day:
        return f"frequency cap: {day} marketing message(s) in the last 24 hours (limit {caps.per_day})"
    if week >= caps.per_week:
        return f"frequency cap: {week} marketing message(s) in the last 7 days (limit {caps.per_week})"
    return None


def decide(
    purpose: Literal["transactional", "marketing"],
    contact: Contact,
    now: datetime,
    sent_marketing: dict[str, list[datetime]],
    *,
    quiet: QuietHours | None = QuietHours(),
    caps: Caps = Caps(),
) -> Decision:
    channel, why = choose_channel(contact)
    if channel is None:
        return Decision("suppress", None, why)
    if purpose == "transactional":
        return Decision("send", channel, f"transactional; {why}")
    if quiet is not None and (opens := quiet_until(now, contact.timezone, quiet)) is not None:
        return Decision("defer", channel, f"quiet hours in {contact.timezone}", not_before=opens)
    if (capped := over_cap(sent_marketing.get(channel, []), now, caps)) is not None:
        return Decision("suppress", channel, capped)
    return Decision("send", channel, why)


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (KeyError, ValueError):
        return ZoneInfo("UTC")
