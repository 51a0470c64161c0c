"""Outbound events (SPEC §7): per-organization webhook subscriptions and their delivery log.

Events are a transactional outbox: :func:`duecourse.events.service.emit` writes one
``event_deliveries`` row per matching subscription in the caller's transaction, so an event exists
if and only if the change that caused it committed. A delivery pass (``deliver_due``) claims due rows
as leases, posts them outside any transaction and records the result.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import Base, BigId, UTCDateTime
from duecourse.db.columns import pk, str_enum, utc_timestamp


class DeliveryStatus(StrEnum):
    pending = "pending"  # due at next_attempt_at
    processing = "processing"  # claimed by a worker; next_attempt_at is the lease's end
    delivered = "delivered"  # the receiver answered 2xx
    failed = "failed"  # every attempt failed (or the subscription was disabled)


class EventSubscription(Base):
    """Where an organization wants its events posted, and which ones.

    ``secret_encrypted`` holds the signing secret (``whsec_…``), encrypted with the process's
    encryption key (:mod:`duecourse.channels.secrets`); ``secret_masked`` is what the API shows of it.
    """

    __tablename__ = "event_subscriptions"
    __table_args__ = (
        # emit(): one indexed lookup of the organization's active subscriptions.
        Index("ix_event_subscriptions_org_active", "organization_id", "active"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    url: Mapped[str] = mapped_column(String(2000), nullable=False)
    description: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    event_types: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    secret_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    secret_masked: Mapped[str] = mapped_column(String(16), nullable=False)
    secret_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()


class EventDelivery(Base):
    """One event for one subscription: the outbox row and its delivery log.

    ``attempt_log`` keeps every attempt (time, HTTP status or error, duration, a response excerpt);
    ``attempts`` counts the attempts of the current retry schedule (a manual redelivery restarts it).
    """

    __tablename__ = "event_deliveries"
    __table_args__ = (
        # The claim path: status IN ('pending', 'processing') AND next_attempt_at <= now.
        Index("ix_event_deliveries_due", "status", "next_attempt_at"),
        Index("ix_event_deliveries_org", "organization_id", "id"),
        Index("ix_event_deliveries_subscription", "subscription_id", "id"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    subscription_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("event_subscriptions.id", ondelete="CASCADE"), nullable=False
    )
    event_id: Mapped[str] = mapped_column(String(40), nullable=False)
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[DeliveryStatus] = mapped_column(
        str_enum(DeliveryStatus, "event_delivery_status"), nullable=False, default=DeliveryStatus.pending
    )
    attempts: Mapped[int] = mapped_column(SmallInteger, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False, default=list)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()
