"""Value types shared by every contract: money, timestamps, identifiers.

Strictness lives here so that every event gets it the same way: money arrives
as a decimal *string* (a JSON float would already have lost precision), and
timestamps must carry an offset (a naive time is ambiguous across shops in
different timezones).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, PlainSerializer, StringConstraints

# Active ISO 4217 alphabetic codes (funds and precious metals excluded).
# A word list reads better than 180 quoted strings.
ISO_4217 = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN
    BZD CAD CDF CHF CLP CNY COP CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
    GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD
    KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO
    NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL
    SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UYW UZS VED VES VND
    VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG ZWL""".split()  # noqa: SIM905
)

_DECIMAL_RE = re.compile(r"^-?\d{1,15}(\.\d{1,6})?$")
_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")


def _decimal_from_string(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, str):
        raise ValueError('money must be a decimal string such as "12.30", not a JSON number')
    if not _DECIMAL_RE.match(value):
        raise ValueError(f"{value!r} is not a plain decimal string (digits, optional point, up to 6 decimals)")
    try:
        return Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise ValueError(f"{value!r} is not a decimal") from exc


def _timestamp_from_string(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("timestamps are ISO 8601 strings with an offset, e.g. 2026-11-22T10:00:00+08:00")
    return value


def _currency(value: str) -> str:
    if value not in ISO_4217:
        raise ValueError(f"{value!r} is not an ISO 4217 currency code")
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    # OSError: a folder of the zone database ("Europe") is no zone, and it
    # must fail validation like any other bad name, not escape it and stop the partition.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"{value!r} is not an IANA timezone name") from exc
    return value


def _date_from_string(value: Any) -> Any:
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}$", value):
        raise ValueError("dates are strings in the form YYYY-MM-DD")
    return value


# Serialised back as a string so that no consumer ever sees a float.
Money = Annotated[
    Decimal,
    BeforeValidator(_decimal_from_string),
    Field(ge=0, json_schema_extra={"type": "string", "pattern": _DECIMAL_RE.pattern}),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json"),
]
SignedMoney = Annotated[
    Decimal,
    BeforeValidator(_decimal_from_string),
    Field(json_schema_extra={"type": "string", "pattern": _DECIMAL_RE.pattern}),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json"),
]
Currency = Annotated[str, StringConstraints(min_length=3, max_length=3), AfterValidator(_currency)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_from_string)]
CalendarDate = Annotated[date, BeforeValidator(_date_from_string)]
TimezoneName = Annotated[str, StringConstraints(max_length=64), AfterValidator(_timezone)]
Phone = Annotated[str, StringConstraints(pattern=_E164_RE.pattern)]
Email = Annotated[
    str,
    StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
]
CustomerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
ShortText = Annotated[str, StringConstraints(max_length=200)]
LongText = Annotated[str, StringConstraints(max_length=4000)]
Locale = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")]
Channel = Annotated[str, StringConstraints(pattern=r"^(sms|email)$")]
