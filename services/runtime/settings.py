"""Settings shared by every service (prefix `CRM_`) and the base of per-service settings.

Every field is an environment variable; README.md has the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_", extra="ignore")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    # A consumer that stops heartbeating for this long is dropped from its group. A new
    # group member waits about half of it before the first assignment (Tansu).
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)
    # Prepended to every topic name: lets several environments (or test runs) share one cluster.
    topic_prefix: str = ""
    topic_partitions: int = Field(6, ge=1)
    # Copies of each partition when the services create their topics (CRM_CREATE_TOPICS); 1 suits
    # a single broker (the embedded one), a production cluster wants 3.
    topic_replication_factor: int = Field(1, ge=1)
    create_topics: bool = True

    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    # Prepended to each service's database name (crm_profile, crm_loyalty, ...).
    db_prefix: str = "crm_"
    # Set for the embedded store only: the services on this machine take turns at it, one request
    # at a time, through an flock on this file (services/runtime/turns.py says why).
    store_turns_file: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key this system writes starts with this; nothing else in Redis is touched.
    redis_prefix: str = "crm:"

    clock: Literal["wall", "event"] = "wall"
    log_level: str = "INFO"
    log_json: bool = True

    batch_max_records: int = Field(500, ge=1, le=10_000)
    batch_timeout_ms: int = Field(100, ge=1)
    max_message_bytes: int = Field(1_000_000, ge=1024)
    # Store and publish steps are tried this many times within a batch, with exponential backoff;
    # then the batch fails and is delivered again (services/runtime/broker.py). Bad messages are
    # dead-lettered at once, without retries.
    retry_attempts: int = Field(4, ge=1)
    retry_base_delay_s: float = Field(0.2, ge=0)
    # Event ids remembered per customer for dedup (the most recent ones).
    dedup_window: int = Field(2000, ge=10)
    # How often (wall seconds) a service checks for customers whose time-driven work is due.
    sweep_interval_s: float = Field(1.0, gt=0)
    # Fault injection for tests ("after_store_write"): the process dies at that point.
    failpoint: str | None = None

    @field_validator("store_turns_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, v):
        return None if v == "" else v

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        """Consumer groups are namespaced like topics, so environments sharing a cluster stay apart."""
        return f"{self.topic_prefix}{name}"


class ServiceSettings(BaseSettings):
    """Per-service settings; subclasses set `env_prefix` (e.g. `CRM_PROFILE_`) and defaults."""

    model_config = SettingsConfigDict(extra="ignore")

    http_host: str = "127.0.0.1"
    http_port: int = 8100
    group_id: str = ""
    database: str = ""
    # Bearer token for the read API; empty disables the read API.
    api_token: SecretStr = SecretStr("")
