"""API shapes of strategies, their stages, performance and audit log (SPEC §3).

Inputs forbid unknown fields (a typo is a 422, not a silently ignored value). Shape and range
rules live here; rules that need the database or several fields at once (trigger, stage timing,
templates, activation) live in :mod:`duecourse.strategies.service` so they also apply to PATCH.
Stage indexes are 0-based everywhere (``stages[0]`` is the first stage), matching the JSON array,
``Stage.position``, ``accounts.case_next_stage`` and ``queue_items.stage_index``.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator

from duecourse.strategies.models import (
    MAX_STAGES,
    WEEKDAYS,
    ActionType,
    FirstActionLogic,
    MultiStageHandling,
    StrategyType,
    TimingType,
    Tone,
    TriggerType,
)
from duecourse.validation import money

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DEFAULT_AUTOMATION_DAYS: list[Weekday] = ["mon", "tue", "wed", "thu", "fri"]
_HHMM = re.compile(r"^(?:[01]\d|2[0-3]):[0-5]\d$")

MIN_STAGE_DAYS = -365
MAX_STAGE_DAYS = 3650

StrictInt = Annotated[int, Field(strict=True)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
Priority = Annotated[int, Field(strict=True, ge=-1_000_000, le=1_000_000)]
TriggerDays = Annotated[int, Field(strict=True, ge=0, le=MAX_STAGE_DAYS)]
Hours = Annotated[int, Field(strict=True, ge=1, le=24 * 30)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _amount(value: Any) -> Decimal | None:
    """An exact, positive amount given as a string or a JSON number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError("must be a decimal amount, as a string or a number")
    return money(value, allow_zero=False)


def _hhmm(value: str | None) -> str | None:
    if value is not None and not _HHMM.match(value):
        raise ValueError("must be a 24-hour time as HH:MM, e.g. 07:30")
    return value


def _days(value: list[str] | None) -> list[str] | None:
    """Deduplicated, in week order (mon..sun)."""
    if value is None:
        return None
    return [d for d in WEEKDAYS if d in set(value)]


class StageIn(Strict):
    action_type: ActionType
    timing_type: TimingType
    days: Annotated[int, Field(strict=True, ge=MIN_STAGE_DAYS, le=MAX_STAGE_DAYS)]
    template_id: StrictInt | None = None
    tone: Tone = Tone.standard
    max_retries: Annotated[int, Field(strict=True, ge=0, le=5)] | None = Field(
        default=None, description="voice and whatsapp stages only (default 2)"
    )
    retry_delay_hours: Hours | None = Field(
        default=None, description="voice and whatsapp stages only (default 24)"
    )
    step_timeout_hours: Hours | None = Field(
        default=None, description="voice and whatsapp stages only (default 24)"
    )
    note: str | None = Field(default=None, max_length=1000)


class _StrategyFields(Strict):
    @field_validator("trigger_amount", mode="before", check_fields=False)
    @classmethod
    def _trigger_amount(cls, v: Any) -> Decimal | None:
        return _amount(v)

    @field_validator("automation_time", check_fields=False)
    @classmethod
    def _automation_time(cls, v: str | None) -> str | None:
        return _hhmm(v)

    @field_validator("automation_days", check_fields=False)
    @classmethod
    def _automation_days(cls, v: list[str] | None) -> list[str] | None:
        return _days(v)


class StrategyIn(_StrategyFields):
    """A whole strategy: the body of POST (create) and PUT (full update; stages in their new order)."""

    name: Name
    description: Description
    type: StrategyType = StrategyType.standard
    active: bool | None = Field(
        default=None,
        description="POST: inactive unless true. PUT: unchanged unless given (activation is checked)",
    )
    multi_stage_handling: MultiStageHandling = MultiStageHandling.run_all_in_order
    first_action_logic: FirstActionLogic = FirstActionLogic.standard
    trigger_type: TriggerType
    trigger_days: TriggerDays | None = None
    trigger_amount: Decimal | None = Field(default=None, description="exact amount in the base currency, > 0")
    priority: Priority = 100
    automation_time: str = Field(default="07:00", description="HH:MM, organization time zone")
    automation_days: list[Weekday] = Field(
        default_factory=lambda: list(DEFAULT_AUTOMATION_DAYS), min_length=1
    )
    stages: list[StageIn] = Field(min_length=1, max_length=MAX_STAGES)


class StrategyPatch(_StrategyFields):
    """Top-level fields only; stages change through PUT."""

    name: Name | None = None
    description: Description | None = None
    type: StrategyType | None = None
    active: bool | None = None
    multi_stage_handling: MultiStageHandling | None = None
    first_action_logic: FirstActionLogic | None = None
    trigger_type: TriggerType | None = None
    trigger_days: TriggerDays | None = None
    trigger_amount: Decimal | None = None
    priority: Priority | None = None
    automation_time: str | None = None
    automation_days: list[Weekday] | None = Field(default=None, min_length=1)


def money_out(value: Decimal | None) -> str | None:
    """Stored amounts have 4 places; show 2 unless the extra places carry something."""
    if value is None:
        return None
    two = value.quantize(Decimal("0.01"))
    return str(two if two == value else value.normalize())


class StageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    position: int
    action_type: ActionType
    timing_type: TimingType
    days: int
    offset: int = Field(description="days from the case's anchor date (SPEC §3 Offsets)")
    template_id: int | None
    tone: Tone
    max_retries: int | None
    retry_delay_hours: int | None
    step_timeout_hours: int | None
    note: str | None


class StrategyOut(BaseModel):
    id: int
    name: str
    description: str
    type: StrategyType
    active: bool
    multi_stage_handling: MultiStageHandling
    first_action_logic: FirstActionLogic
    trigger_type: TriggerType
    trigger_days: int | None
    trigger_amount: Decimal | None
    priority: int
    automation_time: str
    automation_days: list[str]
    stages: list[StageOut]
    created_at: datetime
    updated_at: datetime
    created_by: str
    last_run_at: datetime | None

    @field_serializer("trigger_amount")
    def _ser_amount(self, v: Decimal | None) -> str | None:
        return money_out(v)


class StrategyListItem(StrategyOut):
    open_cases: int
    avg_days_open: float | None


class StrategyPage(BaseModel):
    items: list[StrategyListItem]
    next_cursor: str | None = None


class FunnelStage(BaseModel):
    position: int
    action_type: ActionType
    count: int


class PerformanceOut(BaseModel):
    strategy_id: int
    created_at: datetime
    created_by: str
    active: bool
    open_cases: int
    avg_days_open: float | None
    last_run_at: datetime | None
    next_run_at: datetime | None
    emails_sent_14d: int
    funnel: list[FunnelStage]
    sequence_completed: int
    warnings: list[str]
