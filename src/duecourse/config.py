"""Process-wide settings, read from ``DUECOURSE_*`` environment variables (or a ``.env`` file).

Per-organization settings (automation, dispatch rules, exclusions) live in the database:
see :mod:`duecourse.tenancy.settings`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUECOURSE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///duecourse.db",
        description="SQLAlchemy URL. SQLite file by default; postgresql+psycopg://user@host/db in production.",
    )
    secret_key: str = Field(
        default="change-me-in-production",
        description="Signs session cookies and CSRF tokens. Set a long random value in production.",
    )
    encryption_key: str | None = Field(
        default=None,
        description="Encrypts provider credentials at rest (a Fernet key, or any long random text). "
        "Defaults to a key derived from secret_key; set it separately to rotate one without the other.",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="The address debtors and providers reach this app at: unsubscribe links and "
        "provider callbacks are built on it.",
    )
    provider_timeout_seconds: float = Field(
        default=10.0, description="Longest wait for a provider (SMTP, messaging API, voice service) per send."
    )
    dispatch_batch: int = Field(
        default=1000, ge=1, le=10_000,
        description="Queue items a worker claims and handles in one transaction. Larger batches cost "
        "fewer statements per message; at most 100 of a batch's messages go to network providers "
        "(sent one after another before the batch is recorded), the others wait for the next batch.",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    debug: bool = False
    sql_echo: bool = False
    session_max_age_seconds: int = 60 * 60 * 12
    page_size_max: int = 500

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        raw = self.database_url.split("///", 1)[-1]
        return None if raw in ("", ":memory:") else Path(raw)


@lru_cache
def get_settings() -> Settings:
    return Settings()
