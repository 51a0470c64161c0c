from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
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


class AccountStatus(StrEnum):
    """SPEC §4.1."""

    unassigned = "unassigned"
    pending_contact = "pending_contact"
    in_auto_management = "in_auto_management"
    callback_pending = "callback_pending"
    promise_pending = "promise_pending"
    promise_overdue = "promise_overdue"
    sequence_completed = "sequence_completed"
    resolved = "resolved"


CONTACTABLE_STATUSES = (
    AccountStatus.pending_contact,
    AccountStatus.in_auto_management,
    AccountStatus.promise_overdue,
)


class CollectionTab(StrEnum):
    """SPEC §6: the auto-collection tab of an account with money outstanding."""

    outstanding = "outstanding"
    scheduled = "scheduled"
    engaged = "engaged"
    follow_up = "follow_up"
    blocked = "blocked"


class InvoiceStatus(StrEnum):
    open = "open"
    paid = "paid"
    void = "void"


class PromiseStatus(StrEnum):
    pending = "pending"
    kept = "kept"
    broken = "broken"
    cancelled = "cancelled"


class PromiseSource(StrEnum):
    voice_call = "voice_call"
    agent = "agent"
    portal = "portal"
    api = "api"


class PaymentSource(StrEnum):
    api = "api"
    import_ = "import"
    agent = "agent"
    webhook = "webhook"


class Account(Base):
    """A debtor. Also carries the engine's case state (SPEC §4.2) and the derived values of §2/§6.

    The derived columns (``balance``, ``gross_open``, ``carrying_*``, ``collection_tab``) are kept by
    :func:`duecourse.ledger.derived.refresh_accounts`, set-based, whenever invoices, payments or the
    account's state change, so listing and filtering a million accounts stays an index lookup.
    """

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("organization_id", "external_id", name="uq_accounts_org_external_id"),
        # Partial indexes (both databases): every query through them names a tab, a strategy or a
        # campaign (``=``, ``IN``, or ``IS NOT NULL``), and the accounts without one -- all of a
        # freshly imported portfolio -- then cost no index entries on insert or on the refresh
        # that follows an invoice import.
        Index(
            "ix_accounts_org_tab_id",
            "organization_id",
            "collection_tab",
            "id",
            postgresql_where=text("collection_tab IS NOT NULL"),
            sqlite_where=text("collection_tab IS NOT NULL"),
        ),
        Index("ix_accounts_org_status_id", "organization_id", "status", "id"),
        Index(
            "ix_accounts_strategy_stage",
            "strategy_id",
            "case_next_stage",
            postgresql_where=text("strategy_id IS NOT NULL"),
            sqlite_where=text("strategy_id IS NOT NULL"),
        ),
        Index(
            "ix_accounts_campaign_id",
            "campaign_id",
            postgresql_where=text("campaign_id IS NOT NULL"),
            sqlite_where=text("campaign_id IS NOT NULL"),
        ),
        CheckConstraint("score IS NULL OR (score >= 0 AND score <= 100)", name="score_range"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    external_id: Mapped[str] = mapped_column(String(100), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(20))
    whatsapp: Mapped[str | None] = mapped_column(String(20))
    timezone: Mapped[str | None] = mapped_column(String(64))
    language: Mapped[str | None] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    score: Mapped[int | None] = mapped_column(SmallInteger)
    opt_out_email: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    opt_out_sms: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    opt_out_whatsapp: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    opt_out_voice: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    contact_flags: Mapped[str | None] = mapped_column(String(200))
    # Set by the engine when a provider says the address does not exist; cleared when it changes.
    email_invalid: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=text("false"))
    phone_invalid: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=text("false"))
    whatsapp_invalid: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=text("false"))
    blocked: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    blocked_reason: Mapped[str | None] = mapped_column(String(500))
    paused: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    on_stop: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    status: Mapped[AccountStatus] = mapped_column(
        str_enum(AccountStatus, "account_status"), nullable=False, default=AccountStatus.unassigned
    )
    strategy_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("strategies.id", ondelete="SET NULL"))
    campaign_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("campaigns.id", ondelete="SET NULL"))
    campaign_joined_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Case state (SPEC §4.2), one open case per account.
    case_number: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    case_opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The organization-local date the case (or its current round) opened: a stage never falls due
    # by chaining from a date before its case existed.
    case_opened_on: Mapped[date | None] = mapped_column(Date)
    case_anchor_date: Mapped[date | None] = mapped_column(Date)
    # No foreign key (like carrying_invoice_id): the invoice the case was opened on. When it is no
    # longer the carrying invoice (paid, voided, deleted), the case restarts on the new one (§4.2).
    case_invoice_id: Mapped[int | None] = mapped_column(BigId)
    case_next_stage: Mapped[int | None] = mapped_column(SmallInteger)
    case_prev_completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The organization-local date the previous stage completed on: days_from_previous counts from it.
    case_prev_completed_on: Mapped[date | None] = mapped_column(Date)
    case_retry_count: Mapped[int] = mapped_column(SmallInteger, nullable=False, default=0)
    case_sequence_finished: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The next stage's delay in days after adaptive timing (SPEC §4.8); NULL = the strategy's own.
    case_next_delay_days: Mapped[int | None] = mapped_column(SmallInteger)
    case_tone_override: Mapped[str | None] = mapped_column(String(16))
    callback_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Derived (see class docstring).
    balance: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    gross_open: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    # Derived, recomputed by derived.refresh_accounts after every invoice change (deletes included),
    # so no foreign key: its checks cost bulk imports time, and unindexed they made every invoice
    # delete scan the accounts table for ON DELETE SET NULL.
    carrying_invoice_id: Mapped[int | None] = mapped_column(BigId)
    carrying_due_date: Mapped[date | None] = mapped_column(Date)
    collection_tab: Mapped[CollectionTab | None] = mapped_column(str_enum(CollectionTab, "collection_tab"))

    last_interaction_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()


class AccountTag(Base):
    __tablename__ = "account_tags"
    __table_args__ = (Index("ix_account_tags_org_tag", "organization_id", "tag", "account_id"),)

    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    # No foreign key to organizations (like invoices and payments): see ``tenant_of_account``.
    organization_id: Mapped[int] = tenant_of_account()


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("organization_id", "external_id", name="uq_invoices_org_external_id"),
        Index("ix_invoices_account_open", "account_id", "status", "due_date", "number"),
        CheckConstraint("total >= 0", name="total_nonnegative"),
        CheckConstraint("amount_paid >= 0", name="paid_nonnegative"),
        CheckConstraint("due_date >= issue_date", name="due_after_issue"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    external_id: Mapped[str] = mapped_column(String(100), nullable=False)
    number: Mapped[str] = mapped_column(String(100), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    total: Mapped[Decimal] = mapped_column(Money, nullable=False)
    amount_paid: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    issue_date: Mapped[date] = mapped_column(Date, nullable=False)
    due_date: Mapped[date] = mapped_column(Date, nullable=False)
    status: Mapped[InvoiceStatus] = mapped_column(
        str_enum(InvoiceStatus, "invoice_status"), nullable=False, default=InvoiceStatus.open
    )
    disputed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        UniqueConstraint("organization_id", "external_id", name="uq_payments_org_external_id"),
        Index("ix_payments_account", "account_id", "paid_on"),
        CheckConstraint("amount > 0", name="amount_positive"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = tenant_of_account()
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    invoice_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("invoices.id", ondelete="SET NULL"))
    external_id: Mapped[str] = mapped_column(String(100), nullable=False)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    paid_on: Mapped[date] = mapped_column(Date, nullable=False)
    source: Mapped[PaymentSource] = mapped_column(str_enum(PaymentSource, "payment_source"), nullable=False)
    reference: Mapped[str | None] = mapped_column(String(200))
    unallocated: Mapped[Decimal] = mapped_column(Money, nullable=False, default=Decimal(0))
    created_at: Mapped[datetime] = utc_timestamp()


class PaymentAllocation(Base):
    """How much of a payment settled which invoice (oldest-first unless the payment names one)."""

    __tablename__ = "payment_allocations"

    payment_id: Mapped[int] = mapped_column(BigId, ForeignKey("payments.id", ondelete="CASCADE"), primary_key=True)
    invoice_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    # The payment's organization; no foreign key (see ``tenant_of_account``), the index stays.
    organization_id: Mapped[int] = mapped_column(BigId, nullable=False, index=True)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)


class Promise(Base):
    __tablename__ = "promises"
    __table_args__ = (
        Index("ix_promises_org_status_date", "organization_id", "status", "promised_date"),
        Index("ix_promises_account", "account_id"),
        CheckConstraint("amount > 0", name="amount_positive"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    promised_date: Mapped[date] = mapped_column(Date, nullable=False)
    status: Mapped[PromiseStatus] = mapped_column(
        str_enum(PromiseStatus, "promise_status"), nullable=False, default=PromiseStatus.pending
    )
    source: Mapped[PromiseSource] = mapped_column(str_enum(PromiseSource, "promise_source"), nullable=False)
    note: Mapped[str | None] = mapped_column(Text)
    interaction_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("interactions.id", ondelete="SET NULL"))
    created_by_user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = utc_timestamp()
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
