"""One place for configuration: every setting is read from a ``PAGECAST_`` environment variable."""

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DSN_PREFIXES = ("postgres://", "postgresql://", "postgresql+psycopg://")


def normalize_database_url(url: str) -> str:
    """Return ``url`` as a SQLAlchemy psycopg 3 URL; accepts ``postgres://`` (Supabase) and ``postgresql://``."""
    for prefix in _DSN_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    raise ValueError(
        "PAGECAST_DATABASE_URL must start with postgres://, postgresql:// or postgresql+psycopg://"
    )


class Settings(BaseSettings):
    """pagecast configuration (environment variables prefixed ``PAGECAST_``)."""

    model_config = SettingsConfigDict(env_prefix="PAGECAST_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="Postgres DSN; unset starts an embedded server under HOME."
    )
    home: Path = Field(default=Path(".pagecast"), description="Local state: embedded pgdata, logs.")
    graph_api_url: str = "https://graph.facebook.com"
    graph_api_version: str = "v25.0"
    lease_seconds: int = Field(default=120, ge=5)
    max_stalled_runs: int = Field(
        default=5, ge=1, description="Runs in a row without progress before a job is given up."
    )
    stall_backoff_seconds: float = Field(
        default=30.0, ge=0, description="Wait before restarting a job after a run without progress."
    )
    default_concurrency: int = Field(default=50, ge=1, le=1000)
    default_rate_per_second: float = Field(default=20.0, gt=0, le=300)
    chunk_size: int = Field(default=200, ge=1, le=10_000)
    parallel_chunks: int = Field(default=4, ge=1, le=64, description="Chunks in flight per run.")
    shard_size: int = Field(
        default=50_000, ge=100, description="Jobs larger than this are sent by parallel child runs."
    )
    child_pickup_seconds: float = Field(
        default=90.0,
        ge=1,
        description="A large job's run sends a range itself when its child run has not started by then.",
    )
    chunk_task_limit: int = Field(
        default=16, ge=1, description="Chunk tasks in flight across all runs (a Prefect tag limit)."
    )
    statement_timeout_seconds: float = Field(
        default=30.0, ge=0, description="Longest statement pagecast runs (0: no limit)."
    )
    lock_timeout_seconds: float = Field(
        default=10.0, ge=0, description="Longest wait for a row lock (0: no limit)."
    )
    db_retry_seconds: float = Field(
        default=60.0,
        ge=0,
        description="How long a run retries an unreachable database before it stops sending.",
    )
    send_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for a Send API answer; a call without one is recorded unknown.",
    )
    outage_pause_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a page's Send API may fail every call before its jobs pause.",
    )
    sweep_interval_seconds: int = Field(
        default=60,
        ge=5,
        description="How often the scheduled sweep deployment runs (set by make deploy).",
    )
    webhook_verify_token: SecretStr | None = Field(
        default=None, description="The token Meta's webhook verification request must carry."
    )
    webhook_max_body_bytes: int = Field(
        default=1_000_000, ge=1_000, description="Largest webhook body accepted (413 above)."
    )
    opt_out_keywords: str = Field(
        default="STOP,UNSUBSCRIBE",
        description="Comma-separated messages (any case) that opt a contact out of broadcasts.",
    )
    api_cors_origins: str = Field(
        default="",
        description="Comma-separated origins allowed to call the HTTP job API from a browser.",
    )
    notify_url: str | None = Field(default=None, description="Webhook for job summaries.")
    app_secret: SecretStr | None = Field(
        default=None,
        description="The Meta app's secret: appsecret_proof on calls, webhook signatures.",
    )

    @field_validator("database_url")
    @classmethod
    def _normalize_url(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else None

    @field_validator("graph_api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


def page_token_from_env(page_id: str) -> str | None:
    """``PAGECAST_PAGE_ACCESS_TOKEN__<PAGE_ID>``, else ``PAGECAST_PAGE_ACCESS_TOKEN``, else ``None``."""
    return os.environ.get(f"PAGECAST_PAGE_ACCESS_TOKEN__{page_id}") or os.environ.get(
        "PAGECAST_PAGE_ACCESS_TOKEN"
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
