from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import Base, BigId
from duecourse.db.columns import pk, tenant_of_account, utc_timestamp


class SandboxMessage(Base):
    """The sandbox provider's outbox: every message that would have been sent (SPEC §7)."""

    __tablename__ = "sandbox_outbox"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_sandbox_outbox_idempotency_key"),
        Index("ix_sandbox_outbox_org", "organization_id", "id"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(100), nullable=False)
    provider_ref: Mapped[str] = mapped_column(String(100), nullable=False)
    channel: Mapped[str] = mapped_column(String(16), nullable=False)
    to: Mapped[str] = mapped_column(String(320), nullable=False)
    subject: Mapped[str | None] = mapped_column(String(500))
    body_text: Mapped[str] = mapped_column(Text, nullable=False)
    body_html: Mapped[str | None] = mapped_column(Text)
    tone: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = utc_timestamp()


class ChannelConfig(Base):
    """Which provider an organization uses for a channel, and its settings (SPEC §7).

    ``settings`` holds what may be shown; ``secrets_encrypted`` holds credentials, encrypted with the
    process's encryption key (:mod:`duecourse.channels.secrets`), never returned by the API.
    ``channel`` is a messaging channel (email, sms, whatsapp, voice) or ``inbound``: the signing
    secret of the organization's own inbound webhooks (bounces, call outcomes, payments).
    """

    __tablename__ = "channel_configs"
    __table_args__ = (UniqueConstraint("organization_id", "channel", name="uq_channel_configs_org_channel"),)

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
    channel: Mapped[str] = mapped_column(String(16), nullable=False)
    provider: Mapped[str] = mapped_column(String(16), nullable=False)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    secrets_encrypted: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()


class WebhookReceipt(Base):
    """One row per inbound webhook event handled: a replay of the same event id changes nothing (§7)."""

    __tablename__ = "webhook_receipts"
    __table_args__ = (UniqueConstraint("organization_id", "source", "event_id", name="uq_webhook_receipts_event"),)

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    event_id: Mapped[str] = mapped_column(String(200), nullable=False)
    received_at: Mapped[datetime] = utc_timestamp()
