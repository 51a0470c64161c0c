from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, Integer, SmallInteger, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from duecourse.db.base import Base, BigId, Money, UTCDateTime
from duecourse.db.columns import pk, str_enum, utc_timestamp

MAX_STAGES = 10
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class StrategyType(StrEnum):
    standard = "standard"
    intensive = "intensive"
    vip = "vip"
    high_risk = "high_risk"


class MultiStageHandling(StrEnum):
    run_all_in_order = "run_all_in_order"
    skip_to_latest = "skip_to_latest"
    one_per_run = "one_per_run"


class FirstActionLogic(StrEnum):
    standard = "standard"
    contextualized = "contextualized"


class TriggerType(StrEnum):
    days_overdue = "days_overdue"
    amount_threshold = "amount_threshold"


class ActionType(StrEnum):
    email = "email"
    sms = "sms"
    whatsapp = "whatsapp"
    voice = "voice"
    phone_call = "phone_call"
    escalation = "escalation"
    place_on_stop = "place_on_stop"


MESSAGING_ACTIONS = (ActionType.email, ActionType.sms, ActionType.whatsapp)
RETRYABLE_ACTIONS = (ActionType.voice, ActionType.whatsapp)


class TimingType(StrEnum):
    days_from_trigger = "days_from_trigger"
    days_from_previous = "days_from_previous"


class Tone(StrEnum):
    standard = "standard"
    firm = "firm"
    empathetic = "empathetic"


class Strategy(Base):
    __tablename__ = "strategies"
    __table_args__ = (
        UniqueConstraint("organization_id", "name", name="uq_strategies_org_name"),
        Index("ix_strategies_org_active", "organization_id", "active", "priority"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    type: Mapped[StrategyType] = mapped_column(str_enum(StrategyType, "strategy_type"), nullable=False)
    description: Mapped[str] = mapped_column(String(1000), nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    multi_stage_handling: Mapped[MultiStageHandling] = mapped_column(
        str_enum(MultiStageHandling, "multi_stage_handling"), nullable=False
    )
    first_action_logic: Mapped[FirstActionLogic] = mapped_column(
        str_enum(FirstActionLogic, "first_action_logic"), nullable=False
    )
    trigger_type: Mapped[TriggerType] = mapped_column(str_enum(TriggerType, "trigger_type"), nullable=False)
    trigger_days: Mapped[int | None] = mapped_column(Integer)
    trigger_amount: Mapped[Decimal | None] = mapped_column(Money)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=100)
    automation_time: Mapped[str] = mapped_column(String(5), nullable=False, default="07:00")
    automation_days: Mapped[str] = mapped_column(String(27), nullable=False, default="mon,tue,wed,thu,fri")
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()
    created_by_user_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("users.id", ondelete="SET NULL"))
    created_by: Mapped[str] = mapped_column(String(320), nullable=False, default="system")
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    stages: Mapped[list[Stage]] = relationship(
        back_populates="strategy", order_by="Stage.position", cascade="all, delete-orphan", lazy="selectin"
    )


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (
        UniqueConstraint("strategy_id", "position", name="uq_stages_strategy_position"),
        CheckConstraint("max_retries IS NULL OR (max_retries >= 0 AND max_retries <= 5)", name="max_retries_range"),
    )

    id: Mapped[int] = pk()
    strategy_id: Mapped[int] = mapped_column(BigId, ForeignKey("strategies.id", ondelete="CASCADE"), nullable=False)
    position: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    action_type: Mapped[ActionType] = mapped_column(str_enum(ActionType, "action_type"), nullable=False)
    timing_type: Mapped[TimingType] = mapped_column(str_enum(TimingType, "timing_type"), nullable=False)
    days: Mapped[int] = mapped_column(Integer, nullable=False)
    template_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("templates.id", ondelete="RESTRICT"))
    tone: Mapped[Tone] = mapped_column(str_enum(Tone, "tone"), nullable=False, default=Tone.standard)
    max_retries: Mapped[int | None] = mapped_column(SmallInteger)
    retry_delay_hours: Mapped[int | None] = mapped_column(Integer)
    step_timeout_hours: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)

    strategy: Mapped[Strategy] = relationship(back_populates="stages")
