"""Loyalty settings: environment variables with the prefix `CRM_LOYALTY_` (see README.md and docs/loyalty.md).

The programme's rules (earning, expiry, tiers, rewards, referrals, campaigns) live in a
TOML file, `deploy/config/loyalty.toml` unless `CRM_LOYALTY_RULES_FILE` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.loyalty.rules import DEFAULT_RULES, Rules, load_rules
from services.runtime.settings import ServiceSettings


class LoyaltySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_LOYALTY_", extra="ignore")

    http_port: int = 8102
    group_id: str = "crm-loyalty"
    database: str = "loyalty"
    rules_file: Path = DEFAULT_RULES
    # An account keeps fewer than this many ledger entries; older ones move to ledger pages of this
    # size (docs/loyalty.md, "Ledger pages"), so no document grows with a customer's whole history.
    ledger_page_entries: int = Field(50, ge=10, le=10_000)

    def rules(self) -> Rules:
        return load_rules(self.rules_file)
