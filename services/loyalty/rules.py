"""The programme's rules: earning, expiry, tiers, rewards, referrals. A TOML file, validated at start-up.

`deploy/config/loyalty.toml` is the default; `CRM_LOYALTY_RULES_FILE` points elsewhere. Every
mistake is reported with its place in the file (pydantic), before the service consumes anything.
"""

from __future__ import annotations

import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "config" / "loyalty.toml"


class RulesError(ValueError):
    """The rules file is missing or invalid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
    name: str = Field(min_length=1, max_length=40)
    threshold: Decimal = Field(ge=0, description="qualifying spend (or points) over the rolling window")
    multiplier: Decimal = Field(Decimal(1), gt=0)
    perks: list[str] = Field(default_factory=list)


class Campaign(_Strict):
    name: str
    start: date
    end: date  # inclusive
    multiplier: Decimal = Field(gt=0)
    categories: list[str] = Field(default_factory=list, description="empty: every category")

    @model_validator(mode="after")
    def _ordered(self) -> Campaign:
        if self.end < self.start:
            raise ValueError(f"campaign {self.name!r} ends ({self.end}) before it starts ({self.start})")
        return self

    def applies(self, day: date, category: str) -> bool:
        return self.start <= day <= self.end and (not self.categories or category in self.categories)


Rate = Annotated[Decimal, Field(ge=0, le=10_000)]
Days = Annotated[int, Field(ge=0, le=3650)]


class Rules(_Strict):
    points_per_unit: dict[str, Rate] = Field(description="base points per unit of each currency earned in")
    # Tier thresholds are amounts in this currency; spend in others converts at the ratio of the rates.
    tier_currency: str = "USD"
    category_multipliers: dict[str, Rate] = Field(default_factory=dict)
    campaigns: list[Campaign] = Field(default_factory=list)
    first_purchase_bonus: int = Field(0, ge=0)
    birthday_month_multiplier: Decimal = Field(Decimal(1), ge=1)
    expiry_months: int = Field(12, ge=1, le=120)
    expiring_notice_days: Days = 7
    expiring_notice_min_points: int = Field(50, ge=0, description="smaller amounts expire without a message")
    qualify_by: Literal["spend", "points"] = "spend"
    qualifying_months: int = Field(12, ge=1, le=120)
    review_days: int = Field(30, ge=1, le=3650, description="how often a customer's tier is reviewed for a downgrade")
    downgrade_grace_days: Days = Field(30, description="between the warning and the downgrade")
    tiers: list[Tier]
    referrer_bonus: int = Field(0, ge=0)
    referee_bonus: int = Field(0, ge=0)
    rewards: dict[str, int] = Field(default_factory=dict, description="reward code -> points it costs")
    recent_entries: int = Field(20, ge=1, description="entries shown by the read API")

    @model_validator(mode="after")
    def _consistent(self) -> Rules:
        if not self.tiers:
            raise ValueError("at least one tier is needed")
        thresholds = [t.threshold for t in self.tiers]
        if thresholds != sorted(thresholds) or len(set(thresholds)) != len(thresholds):
            raise ValueError("tiers must be listed from the lowest threshold up, each higher than the last")
        if thresholds[0] != 0:
            raise ValueError(f"the first tier ({self.tiers[0].name}) must have threshold 0: everyone starts there")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        for code, points in self.rewards.items():
            if points <= 0:
                raise ValueError(f"reward {code!r} must cost more than 0 points")
        for currency in self.points_per_unit:
            if len(currency) != 3 or not currency.isupper():
                raise ValueError(f"{currency!r} is not an ISO 4217 currency code")
        if not self.points_per_unit.get(self.tier_currency):
            raise ValueError(f"tier_currency {self.tier_currency} needs a rate above 0 in points_per_unit")
        return self

    def in_tier_currency(self, amount: Decimal, currency: str) -> Decimal:
        if currency == self.tier_currency:
            return amount
        rate = self.points_per_unit.get(currency, Decimal(0))
        return (amount * rate / self.points_per_unit[self.tier_currency]).quantize(Decimal("0.01"))

    def tier(self, name: str | None) -> Tier:
        return next((t for t in self.tiers if t.name == name), self.tiers[0])

    def tier_for(self, qualifying: Decimal) -> Tier:
        # Negative when a refund in the window is for a purchase before it: the first tier.
        return [t for t in self.tiers if t.threshold <= max(qualifying, Decimal(0))][-1]

    def next_tier(self, name: str) -> Tier | None:
        i = [t.name for t in self.tiers].index(self.tier(name).name)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None

    def rank(self, name: str | None) -> int:
        return [t.name for t in self.tiers].index(self.tier(name).name)


def load_rules(path: Path | None = None) -> Rules:
    path = path or DEFAULT_RULES
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RulesError(f"loyalty rules file not found: {path} (set CRM_LOYALTY_RULES_FILE)") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path} is not valid TOML: {exc}") from None
    try:
        return Rules.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise RulesError(f"{path} is invalid: {problems}") from None
