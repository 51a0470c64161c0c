from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import Base, BigId
from duecourse.db.columns import pk, utc_timestamp


class SandboxMessage(Base):
    """The sandbox provider's outbox: every message that would have been sent (SPEC §7)."""

    __tablename__ = "sandbox_outbox"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_sandbox_outbox_idempotency_key"),
        Index("ix_sandbox_outbox_org", "organization_id", "id"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)
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
