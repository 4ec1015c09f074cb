"""Profile settings: environment variables with the prefix `CRM_PROFILE_` (see README.md)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class ProfileSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_PROFILE_", extra="ignore")

    http_port: int = 8101
    group_id: str = "crm-profile"
    database: str = "profile"

    # Fernet keys (urlsafe base64, 32 bytes), comma-separated: the first encrypts, all decrypt,
    # so a key is rotated by putting a new one first. `crm keys` prints a fresh one.
    encryption_keys: SecretStr = SecretStr("")
    # HMAC key for e-mail / phone lookups, so the store never holds a searchable plaintext.
    lookup_key: SecretStr = SecretStr("")

    followup_days: float = Field(3.0, gt=0, description="satisfaction follow-up this many days after")
    followup_min_gap_days: float = Field(30.0, ge=0, description="at most one follow-up per customer in this span")
    followup_expiry_days: float = Field(7.0, gt=0, description="a follow-up more overdue than this is dropped")
    birthday_hour: int = Field(9, ge=0, le=23)
    top_categories: int = Field(3, ge=1, le=20)

    rfm_refresh_days: float = Field(7.0, gt=0, description="recompute RFM breakpoints after this much clock time")
    rfm_refresh_min_wall_s: float = Field(30.0, ge=0, description="...and no more often than this (replays)")
    rfm_min_customers: int = Field(100, ge=5, description="population needed before breakpoints are computed")
    rfm_min_history_days: float = Field(180.0, ge=0, description="purchase history needed for recency cut points")
    value_tier_quantiles: tuple[float, float, float] = (0.40, 0.75, 0.95)
    # What one unit of each currency is worth in USD, the currency of the shared cut points: used
    # for a currency with too few buyers for cut points of its own (JSON, e.g. {"USD":1,"JPY":0.0067}).
    currency_rates: dict[str, Decimal] = Field(default_factory=lambda: {"USD": Decimal(1)})

    default_cadence_days: float = Field(90.0, gt=0)
    mature_min_days: int = Field(5, ge=2)
    declining_factor: float = Field(2.0, gt=0)
    declining_min_days: float = Field(60.0, ge=0)
    lost_factor: float = Field(4.0, gt=0)
    lost_min_days: float = Field(180.0, ge=0)

    @field_validator("value_tier_quantiles")
    @classmethod
    def _ascending(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not (0 < v[0] < v[1] < v[2] < 1):
            raise ValueError("value_tier_quantiles must be three ascending numbers between 0 and 1")
        return v

    @field_validator("lost_factor")
    @classmethod
    def _lost_after_declining(cls, v: float, info) -> float:
        if v <= info.data.get("declining_factor", 0):
            raise ValueError("lost_factor must be larger than declining_factor")
        return v
