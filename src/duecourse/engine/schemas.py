from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from duecourse.engine.models import Outcome, Sentiment


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class QueueItemOut(_Out):
    id: int
    account_id: int
    strategy_id: int | None
    campaign_id: int | None
    case_number: int
    stage_index: int
    action: str
    scheduled_at: datetime
    status: str
    attempt: int
    max_attempts: int
    is_callback: bool
    tone: str | None
    error: str | None
    reason: str | None
    provider_ref: str | None
    sent_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime


class InteractionOut(_Out):
    id: int
    account_id: int
    queue_item_id: int | None
    strategy_id: int | None
    campaign_id: int | None
    stage_index: int | None
    channel: str
    direction: str
    status: str
    provider_ref: str | None
    outcome: str | None
    promise_amount: Decimal | None
    promise_date: date | None
    callback_at: datetime | None
    sentiment: str | None
    willingness: int | None
    summary: str | None
    transcript: str | None
    is_manual: bool
    user_id: int | None
    occurred_at: datetime
    created_at: datetime


class TaskOut(_Out):
    id: int
    account_id: int
    queue_item_id: int | None
    kind: str
    status: str
    stage_index: int | None
    assigned_user_id: int | None
    due_at: datetime | None
    outcome: str | None
    note: str | None
    created_at: datetime
    completed_at: datetime | None


class ExecutionLogOut(_Out):
    id: int
    account_id: int
    at: datetime
    event: str
    case_number: int | None
    stage_index: int | None
    queue_item_id: int | None
    reason: str | None
    cause: str | None
    details: dict[str, Any] | None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ItemRef(_In):
    queue_item_id: int | None = None
    provider_ref: str | None = Field(None, max_length=255)

    @model_validator(mode="after")
    def _one(self) -> _ItemRef:
        if (self.queue_item_id is None) == (self.provider_ref is None):
            raise ValueError("give exactly one of queue_item_id and provider_ref")
        return self


class DeliveryIn(_ItemRef):
    status: Literal["delivered", "bounced", "failed", "undelivered"]
    error: str | None = Field(None, max_length=2000)


class CallFields(_In):
    outcome: Outcome | None = None
    promise_amount: Decimal | None = Field(None, gt=0, max_digits=18, decimal_places=4)
    promise_date: date | None = None
    callback_at: datetime | None = None
    sentiment: Sentiment | None = None
    willingness: int | None = Field(None, ge=1, le=5)
    summary: str | None = Field(None, max_length=10_000)
    transcript: str | None = Field(None, max_length=200_000)

    @model_validator(mode="after")
    def _needs(self) -> CallFields:
        if self.outcome == Outcome.promise_to_pay and (self.promise_amount is None or self.promise_date is None):
            raise ValueError("promise_to_pay needs promise_amount and promise_date")
        if self.outcome == Outcome.callback_requested and self.callback_at is None:
            raise ValueError("callback_requested needs callback_at")
        if self.callback_at is not None and self.callback_at.tzinfo is None:
            raise ValueError("callback_at needs a time zone (e.g. 2026-03-02T15:00:00Z)")
        return self


class CallOutcomeIn(CallFields, _ItemRef):
    failed: bool = Field(False, description="The call never connected (a delivery failure)")

    @model_validator(mode="after")
    def _outcome_or_failed(self) -> CallOutcomeIn:
        if not self.failed and self.outcome is None:
            raise ValueError("give an outcome, or failed: true")
        return self


class TaskOutcomeIn(CallFields):
    note: str | None = Field(None, max_length=10_000)
