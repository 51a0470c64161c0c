from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict


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
