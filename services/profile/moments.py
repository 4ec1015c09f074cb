"""When the care moments happen: birthdays in the customer's own timezone, follow-ups after N days."""

from __future__ import annotations

import calendar
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


def birthday_in(year: int, birthday: date) -> date:
    """The day a birthday is celebrated in `year`: 29 February falls back to 28 February in common years."""
    if birthday.month == 2 and birthday.day == 29 and not calendar.isleap(year):
        return date(year, 2, 28)
    return birthday.replace(year=year)


def greeting_time(birthday: date, year: int, tz: str, hour: int = 9) -> datetime:
    """`hour`:00 local time on the customer's birthday in `year`, as an aware datetime."""
    return datetime.combine(birthday_in(year, birthday), time(hour), tzinfo=ZoneInfo(tz))


def next_greeting(birthday: date, tz: str, after_year: int | None, now: datetime, hour: int = 9) -> datetime:
    """The next greeting not yet sent: this year's if its local day has not ended, else next year's.

    `after_year` is the last year already greeted (None if never), so a greeting
    is never due twice for one year.
    """
    local_year = now.astimezone(ZoneInfo(tz)).year
    year = local_year if after_year is None else max(local_year, after_year + 1)
    while True:
        at = greeting_time(birthday, year, tz, hour)
        if after_year is not None and year <= after_year:
            year += 1
            continue
        if now < end_of_local_day(at):
            return at
        year += 1


def end_of_local_day(moment: datetime) -> datetime:
    """Midnight after `moment`, in `moment`'s timezone: a greeting still makes sense until then."""
    next_day = moment.date() + timedelta(days=1)
    return datetime.combine(next_day, time(0), tzinfo=moment.tzinfo)
