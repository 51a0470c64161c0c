"""Engine state (SPEC §4): queue items, interactions, agent tasks, the execution log, scheduler claims.

The case itself lives on the account row (``Account.case_*``) because every engine pass is a
set-based statement over accounts; keeping the case there avoids a join over millions of rows.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import Base, BigId, Money, UTCDateTime
from duecourse.db.columns import pk, str_enum, tenant_of_account, utc_timestamp
from duecourse.strategies.models import ActionType


class QueueStatus(StrEnum):
    """SPEC §4.6."""

    pending = "pending"
    processing = "processing"
    completed = "completed"
    failed = "failed"
    skipped = "skipped"
    cancelled = "cancelled"


LIVE_QUEUE_STATUSES = (QueueStatus.pending, QueueStatus.processing)
LIVE_ITEM_PREDICATE = "status IN ('pending', 'processing')"
LIVE_ITEM_INDEX = "uq_queue_items_live_account_stage"


class SkipReason(StrEnum):
    """SPEC §4.7."""

    opt_out = "opt_out"
    no_contact_info = "no_contact_info"
    frequency_limit = "frequency_limit"
    outside_hours = "outside_hours"
    not_eligible = "not_eligible"
    superseded = "superseded"


class QueueItem(Base):
    __tablename__ = "queue_items"
    __table_args__ = (
        # SPEC §4.5: at most one live item per account and stage. A constraint, not a check-then-insert.
        Index(
            LIVE_ITEM_INDEX,
            "account_id",
            "stage_index",
            unique=True,
            sqlite_where=text(LIVE_ITEM_PREDICATE),
            postgresql_where=text(LIVE_ITEM_PREDICATE),
        ),
        # The claim's order (due first, a case's stages in order): a claim reads its batch off the
        # index and stops, instead of sorting every due item.
        Index("ix_queue_items_due", "status", "scheduled_at", "stage_index", "id"),
        Index("ix_queue_items_org_status", "organization_id", "status", "scheduled_at"),
        # Partial: most items belong to no campaign (trigger-based assignment), and every item is
        # written three times (enqueued, claimed, finished), each time into every index it is in.
        Index("ix_queue_items_campaign", "campaign_id", "status", sqlite_where=text("campaign_id IS NOT NULL"),
              postgresql_where=text("campaign_id IS NOT NULL")),
        Index("ix_queue_items_account", "account_id", "case_number", "stage_index"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    strategy_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("strategies.id", ondelete="SET NULL"))
    campaign_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="SET NULL"))
    case_number: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    stage_index: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    action: Mapped[ActionType] = mapped_column(str_enum(ActionType, "action_type"), nullable=False)
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    status: Mapped[QueueStatus] = mapped_column(
        str_enum(QueueStatus, "queue_status"), nullable=False, default=QueueStatus.pending
    )
    attempt: Mapped[int] = mapped_column(SmallInteger, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(SmallInteger, nullable=False, default=3)
    retry_of_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("queue_items.id", ondelete="SET NULL"))
    # The enqueue pass that created the item, so the pass can log exactly its own inserts.
    batch_id: Mapped[str | None] = mapped_column(String(32))
    is_callback: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    tone: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(String(64))
    provider_ref: Mapped[str | None] = mapped_column(String(255))
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A delivery report that arrived after the provider accepted the message but before the
    # dispatch was recorded; applied as soon as it is (§4.8).
    early_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()


class InteractionStatus(StrEnum):
    queued = "queued"
    sent = "sent"
    delivered = "delivered"
    failed = "failed"
    bounced = "bounced"
    answered = "answered"
    completed = "completed"
    received = "received"


class Direction(StrEnum):
    outbound = "outbound"
    inbound = "inbound"


class Outcome(StrEnum):
    """SPEC §4.8."""

    promise_to_pay = "promise_to_pay"
    callback_requested = "callback_requested"
    refused = "refused"
    dispute = "dispute"
    wrong_party = "wrong_party"
    paid_claimed = "paid_claimed"
    no_answer = "no_answer"
    dropped = "dropped"


class Sentiment(StrEnum):
    positive = "positive"
    neutral = "neutral"
    negative = "negative"
    hostile = "hostile"
    crisis = "crisis"


class Interaction(Base):
    __tablename__ = "interactions"
    __table_args__ = (
        Index("ix_interactions_account", "account_id", "occurred_at"),
        Index("ix_interactions_org_time", "organization_id", "occurred_at"),
        Index("ix_interactions_campaign", "campaign_id", "occurred_at", sqlite_where=text("campaign_id IS NOT NULL"),
              postgresql_where=text("campaign_id IS NOT NULL")),
        Index("ix_interactions_provider_ref", "provider_ref"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    # Where the interaction came from. No foreign keys: every dispatched message writes a row here,
    # and on PostgreSQL each key costs the row a trigger call and a share lock on the row it names
    # (the same strategy row for every worker). The services that delete a strategy, a campaign or
    # a user clear these references themselves (``engine.references``); queue items go
    # only with their account, whose interactions go too.
    queue_item_id: Mapped[int | None] = mapped_column(BigId)
    strategy_id: Mapped[int | None] = mapped_column(BigId)
    campaign_id: Mapped[int | None] = mapped_column(BigId)
    stage_index: Mapped[int | None] = mapped_column(SmallInteger)
    channel: Mapped[ActionType] = mapped_column(str_enum(ActionType, "action_type"), nullable=False)
    direction: Mapped[Direction] = mapped_column(str_enum(Direction, "direction"), nullable=False)
    status: Mapped[InteractionStatus] = mapped_column(str_enum(InteractionStatus, "interaction_status"), nullable=False)
    provider_ref: Mapped[str | None] = mapped_column(String(255))
    # Where an outbound message went (the account's address then): a bounce reported days later
    # flags the address only if the account still has it.
    address: Mapped[str | None] = mapped_column(String(320))
    outcome: Mapped[Outcome | None] = mapped_column(str_enum(Outcome, "outcome"))
    promise_amount: Mapped[Decimal | None] = mapped_column(Money)
    promise_date: Mapped[date | None] = mapped_column(Date)
    callback_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sentiment: Mapped[Sentiment | None] = mapped_column(str_enum(Sentiment, "sentiment"))
    willingness: Mapped[int | None] = mapped_column(SmallInteger)
    summary: Mapped[str | None] = mapped_column(Text)
    transcript: Mapped[str | None] = mapped_column(Text)
    is_manual: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    user_id: Mapped[int | None] = mapped_column(BigId)  # no foreign key: see queue_item_id
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_at: Mapped[datetime] = utc_timestamp()


class TaskStatus(StrEnum):
    open = "open"
    done = "done"
    cancelled = "cancelled"


class Task(Base):
    """A human agent's work item for a ``phone_call`` or ``escalation`` stage (SPEC §4.8)."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_org_status", "organization_id", "status", "id"),
        UniqueConstraint("queue_item_id", name="uq_tasks_queue_item_id"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    queue_item_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("queue_items.id", ondelete="SET NULL"))
    kind: Mapped[ActionType] = mapped_column(str_enum(ActionType, "action_type"), nullable=False)
    status: Mapped[TaskStatus] = mapped_column(str_enum(TaskStatus, "task_status"), nullable=False, default=TaskStatus.open)
    stage_index: Mapped[int | None] = mapped_column(SmallInteger)
    assigned_user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id", ondelete="SET NULL"))
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = utc_timestamp()
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ExecutionLogEntry(Base):
    """SPEC §4.9: per account, append-only; every engine event with its time and cause.

    No foreign keys: the log is the largest table and is written in bulk (an enqueue pass over a
    million accounts writes two million entries), and on PostgreSQL each foreign key costs a trigger
    call per inserted row, about 70 % of such an insert. Entries are only ever written by the engine
    for accounts it has just read, and :func:`duecourse.ledger.service.delete_account` deletes an
    account's entries with it.
    """

    __tablename__ = "execution_log"
    __table_args__ = (Index("ix_execution_log_account", "account_id", "id"),)

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(BigId, nullable=False, index=True)
    account_id: Mapped[int] = mapped_column(BigId, nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)
    case_number: Mapped[int | None] = mapped_column(Integer)
    stage_index: Mapped[int | None] = mapped_column(SmallInteger)
    queue_item_id: Mapped[int | None] = mapped_column(BigId)
    reason: Mapped[str | None] = mapped_column(String(64))
    cause: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class SchedulerClaim(Base):
    """One row per (organization, job, slot): the first scheduler to insert it does the work (SPEC §4.10)."""

    __tablename__ = "scheduler_claims"
    __table_args__ = (UniqueConstraint("organization_id", "job", "slot", name="uq_scheduler_claims_slot"),)

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    job: Mapped[str] = mapped_column(String(64), nullable=False)
    slot: Mapped[str] = mapped_column(String(64), nullable=False)
    claimed_by: Mapped[str] = mapped_column(String(100), nullable=False)
    claimed_at: Mapped[datetime] = utc_timestamp()
