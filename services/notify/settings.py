"""Notify settings: environment variables with the prefix `CRM_NOTIFY_` (see README.md and docs/notify.md)."""

from __future__ import annotations

from datetime import time, timedelta

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.notify.domain import NotifyRules
from services.notify.policy import Caps, QuietHours
from services.runtime.settings import ServiceSettings


class NotifySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_NOTIFY_", extra="ignore")

    http_port: int = 8104
    group_id: str = "crm-notify"
    database: str = "notify"

    # Contact details are encrypted at rest (Fernet keys, comma-separated to rotate) and found
    # by keyed hash (the inbound SMS webhook looks a phone number up). `crm keys` makes both.
    encryption_keys: SecretStr = SecretStr("")
    lookup_key: SecretStr = SecretStr("")
    # Signs one-click unsubscribe links (at least 16 characters).
    link_key: SecretStr = SecretStr("")
    # Where customers reach notify's HTTP port (the unsubscribe links point here).
    public_url: str = "http://127.0.0.1:8104"
    # Bearer token (or ?token=) the SMS gateway presents on the inbound webhook; empty disables it.
    inbound_token: SecretStr = SecretStr("")

    # Providers, one URL each (see services/notify/channels.py); the secondary takes over when
    # the primary keeps failing transiently. The defaults are the embedded stack's.
    email_primary: SecretStr = SecretStr("smtp://127.0.0.1:2525")
    email_secondary: SecretStr = SecretStr("")
    email_from: str = "Customer Care <care@shop.example>"
    sms_primary: SecretStr = SecretStr("http://127.0.0.1:2526/messages")
    sms_secondary: SecretStr = SecretStr("")

    send_attempts: int = Field(3, ge=1, le=10, description="tries per provider on transient errors")
    send_base_delay_s: float = Field(0.5, ge=0, description="exponential backoff base (full jitter)")
    send_max_delay_s: float = Field(10.0, ge=0)
    send_timeout_s: float = Field(10.0, gt=0)
    send_concurrency: int = Field(16, ge=1, le=256)
    round_size: int = Field(200, ge=1, le=5000, description="customers taken per delivery round")

    # The contact policy.
    quiet_hours: bool = True
    quiet_start: time = time(21, 0)
    quiet_end: time = time(9, 0)
    cap_per_day: int = Field(1, ge=0, description="marketing messages per customer and channel, rolling 24 h")
    cap_per_week: int = Field(3, ge=0, description="... rolling 7 days")
    contact_wait_minutes: float = Field(60.0, ge=0, description="a request waits this long for contact details")
    marketing_max_age_days: float = Field(7.0, gt=0, description="older marketing requests are suppressed")

    @field_validator("link_key")
    @classmethod
    def _long_enough(cls, v: SecretStr) -> SecretStr:
        if v.get_secret_value() and len(v.get_secret_value()) < 16:
            raise ValueError("CRM_NOTIFY_LINK_KEY must be at least 16 characters (use `crm keys`)")
        return v

    @model_validator(mode="after")
    def _policy(self) -> NotifySettings:
        self.rules()  # quiet hours with start == end raise a clear error here
        return self

    def rules(self) -> NotifyRules:
        return NotifyRules(
            quiet=QuietHours(self.quiet_start, self.quiet_end) if self.quiet_hours else None,
            caps=Caps(per_day=self.cap_per_day, per_week=self.cap_per_week),
            contact_wait=timedelta(minutes=self.contact_wait_minutes),
            marketing_max_age=timedelta(days=self.marketing_max_age_days),
        )
