"""Churn settings: environment variables with the prefix `CRM_CHURN_` (see README.md and docs/churn.md)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.churn.assess import BandRules
from services.churn.domain import LadderRules
from services.runtime.settings import ServiceSettings


class ChurnSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_CHURN_", extra="ignore")

    http_port: int = 8103
    group_id: str = "crm-churn"
    database: str = "churn"

    # Risk bands: how far the risk (log-odds of no purchase in the next 90 days) has risen since
    # the customer's last purchase day; high and lost also need the customer to be overdue.
    band_medium: float = Field(0.6, gt=0)
    band_high: float = Field(1.0, gt=0)
    band_lost: float = Field(2.0, gt=0)
    band_hysteresis: float = Field(0.2, ge=0, description="log-odds below a band's entry before leaving it")
    at_risk_min_ratio: float = Field(1.0, ge=0, description="high/lost only after this many usual gaps")

    # The retention ladder.
    offer_after_days: float = Field(14.0, gt=0, description="offer if still at risk this long after the care step")
    task_after_days: float = Field(7.0, ge=0, description="VIP: account-manager task this long after the offer")
    offer_percent_vip: int = Field(20, ge=0, le=100)
    offer_percent_high: int = Field(15, ge=0, le=100)
    offer_percent_medium: int = Field(10, ge=0, le=100)
    offer_percent_low: int = Field(5, ge=0, le=100)
    # Added for members of the loyalty programme's upper tiers (tier name: extra percent).
    offer_tier_bonus: dict[str, int] = Field(default_factory=lambda: {"Platinum": 5, "Gold": 3, "Silver": 1})
    offer_valid_days: int = Field(30, ge=1)

    # Model refits (event time), adopted by every replica through the store.
    refit_days: float = Field(30.0, gt=0, description="refit the model after this much clock time")
    refit_min_wall_s: float = Field(60.0, ge=0, description="...and no more often than this (replays)")
    refit_min_customers: int = Field(200, ge=20, description="customers with 90 days of history needed to fit")
    history_days: int = Field(400, ge=200, description="purchase and interaction days kept per customer")

    @model_validator(mode="after")
    def _ordered(self) -> ChurnSettings:
        self.band_rules()  # raises a clear error for thresholds out of order
        return self

    def band_rules(self) -> BandRules:
        return BandRules(
            medium=self.band_medium,
            high=self.band_high,
            lost=self.band_lost,
            hysteresis=self.band_hysteresis,
            at_risk_min_ratio=self.at_risk_min_ratio,
        )

    def ladder_rules(self) -> LadderRules:
        return LadderRules(
            offer_after_days=self.offer_after_days,
            task_after_days=self.task_after_days,
            offer_percent={
                "vip": self.offer_percent_vip,
                "high": self.offer_percent_high,
                "medium": self.offer_percent_medium,
                "low": self.offer_percent_low,
            },
            offer_tier_bonus=dict(self.offer_tier_bonus),
            offer_valid_days=self.offer_valid_days,
            history_days=self.history_days,
        )
