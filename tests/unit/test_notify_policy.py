"""Notify's contact policy: consent, channel fallback, quiet hours across timezones and midnight, caps."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from services.notify.policy import Caps, Contact, QuietHours, choose_channel, decide, over_cap, quiet_until

BOTH = {"email": True, "sms": True}


def contact(**kw) -> Contact:
    fields = {"email": "a@example.com", "phone": "+8613800000000", "consents": dict(BOTH), **kw}
    return Contact(**fields)


@pytest.mark.parametrize(
    "kw,channel,reason",
    [
        ({"preferred_channel": "sms"}, "sms", "preferred channel"),
        (
            {"preferred_channel": "sms", "consents": {"email": True, "sms": False}},
            "email",
            "fallback: no consent for sms",
        ),
        ({"preferred_channel": "sms", "unreachable": frozenset({"sms"})}, "email", "fallback: sms unreachable"),
        ({"preferred_channel": "email", "email": None}, "sms", "fallback: no email address"),
        ({"consents": {}}, None, "no consent on any channel"),
        ({"consents": {"sms": True}, "phone": None}, None, "no consented channel with a reachable address"),
    ],
)
def test_channel_choice_and_fallback(kw, channel, reason):
    assert choose_channel(contact(**kw)) == (channel, reason)


@pytest.mark.parametrize(
    "utc,tz,opens",
    [
        (
            datetime(1997, 3, 1, 15, 0, tzinfo=UTC),
            "Asia/Shanghai",
            datetime(1997, 3, 2, 1, 0, tzinfo=UTC),
        ),  # 23:00 local
        (
            datetime(1997, 3, 1, 17, 30, tzinfo=UTC),
            "Asia/Shanghai",
            datetime(1997, 3, 2, 1, 0, tzinfo=UTC),
        ),  # 01:30 local
        (datetime(1997, 3, 1, 2, 0, tzinfo=UTC), "Asia/Shanghai", None),  # 10:00 local
        (datetime(1997, 3, 1, 0, 59, tzinfo=UTC), "Asia/Shanghai", datetime(1997, 3, 1, 1, 0, tzinfo=UTC)),  # 08:59
        (datetime(1997, 3, 1, 1, 0, tzinfo=UTC), "Asia/Shanghai", None),  # 09:00 sharp: open
        (datetime(1997, 3, 1, 13, 0, tzinfo=UTC), "Asia/Shanghai", datetime(1997, 3, 2, 1, 0, tzinfo=UTC)),  # 21:00
        (datetime(1997, 3, 1, 12, 59, tzinfo=UTC), "Asia/Shanghai", None),  # 20:59 local
        (datetime(1997, 7, 1, 3, 0, tzinfo=UTC), "America/New_York", datetime(1997, 7, 1, 13, 0, tzinfo=UTC)),  # EDT
        (datetime(1997, 1, 1, 3, 0, tzinfo=UTC), "America/New_York", datetime(1997, 1, 1, 14, 0, tzinfo=UTC)),  # EST
        (datetime(1997, 3, 1, 22, 0, tzinfo=UTC), "UTC", datetime(1997, 3, 2, 9, 0, tzinfo=UTC)),
    ],
)
def test_quiet_hours_in_the_customers_timezone(utc, tz, opens):
    assert quiet_until(utc, tz, QuietHours()) == opens


def test_a_window_that_does_not_cross_midnight():
    q = QuietHours(start=time(1, 0), end=time(6, 0))
    assert quiet_until(datetime(1997, 3, 1, 3, tzinfo=UTC), "UTC", q) == datetime(1997, 3, 1, 6, tzinfo=UTC)
    assert quiet_until(datetime(1997, 3, 1, 7, tzinfo=UTC), "UTC", q) is None


ZONES = ["Asia/Shanghai", "Europe/Berlin", "America/Los_Angeles", "Australia/Lord_Howe", "UTC"]


@given(
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
    st.sampled_from(ZONES),
)
# 21:00 PDT on the night Los Angeles went back to PST: quiet for 13 hours, not 12.
@example(datetime(2000, 10, 29, 4, 0, tzinfo=UTC), "America/Los_Angeles")
def test_quiet_hours_always_end_within_thirteen_hours_at_nine_local(now, tz):
    opens = quiet_until(now, tz, QuietHours())
    if opens is not None:
        # The window is 12 hours of local time; a night when the clocks go back is an hour longer.
        assert now < opens <= now + timedelta(hours=13)
        assert quiet_until(opens, tz, QuietHours()) is None


def test_caps_per_rolling_day_and_week():
    now = datetime(1997, 3, 10, 12, tzinfo=UTC)
    caps = Caps(per_day=1, per_week=3)
    assert over_cap([], now, caps) is None
    assert "24 hours" in over_cap([now - timedelta(hours=23)], now, caps)
    assert over_cap([now - timedelta(hours=25)], now, caps) is None
    week = [now - timedelta(days=d) for d in (2, 4, 6)]
    assert "7 days" in over_cap(week, now, caps)
    assert over_cap([*week[:2], now - timedelta(days=8)], now, caps) is None


def test_marketing_waits_for_the_window_then_respects_caps_transactional_goes_through():
    night = datetime(1997, 3, 1, 15, tzinfo=UTC)  # 23:00 in Shanghai
    c = contact(timezone="Asia/Shanghai", preferred_channel="sms")
    d = decide("marketing", c, night, {})
    assert (d.action, d.channel, d.not_before) == ("defer", "sms", datetime(1997, 3, 2, 1, tzinfo=UTC))
    assert decide("transactional", c, night, {}).action == "send"
    morning = d.not_before
    assert decide("marketing", c, morning, {}).action == "send"
    capped = decide("marketing", c, morning, {"sms": [morning - timedelta(hours=2)]})
    assert capped.action == "suppress" and capped.reason.startswith("frequency cap")
    # Caps are per channel: e-mail is not capped by SMS sends, but the preferred channel is still chosen.
    assert decide("marketing", c, morning, {"email": [morning]}).action == "send"


def test_no_consent_suppresses_marketing_and_transactional_alike():
    c = contact(consents={})
    for purpose in ("marketing", "transactional"):
        d = decide(purpose, c, datetime(1997, 3, 1, 3, tzinfo=UTC), {})
        assert (d.action, d.channel, d.reason) == ("suppress", None, "no consent on any channel")


def test_a_message_queued_after_the_round_read_its_clock_still_counts():
    """A round reads `now` before it takes the lock; a batch may queue a message stamped later."""
    now = datetime(1997, 3, 3, 9, tzinfo=UTC)
    assert "24 hours" in over_cap([now + timedelta(milliseconds=5)], now, Caps(per_day=1, per_week=3))
