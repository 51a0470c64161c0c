"""API shapes of outbound-event subscriptions and their delivery log (SPEC §7, docs/events.md).

A subscription's signing secret appears in full only in the answer to its creation and to a
rotation; everywhere else ``secret`` is masked (never more than the last 4 characters).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from duecourse.events.models import DeliveryStatus

Url = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]
EventType = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscriptionIn(Strict):
    """A whole subscription: the body of POST and PUT."""

    url: Url = Field(description="http:// or https:// address that receives the POSTs")
    event_types: list[EventType] = Field(description="At least one of the event types in docs/events.md")
    description: Description = ""
    active: bool = True


class SubscriptionPatch(Strict):
    url: Url | None = None
    event_types: list[EventType] | None = None
    description: Description | None = None
    active: bool | None = None


class SubscriptionOut(BaseModel):
    id: int
    url: str
    description: str
    event_types: list[str]
    active: bool
    secret: str = Field(description="Masked, except in the answer to the creation and to a rotation")
    secret_rotated_at: datetime | None
    created_at: datetime
    updated_at: datetime


class SubscriptionPage(BaseModel):
    items: list[SubscriptionOut]
    next_cursor: str | None = None


class AttemptOut(BaseModel):
    at: datetime
    attempt: int | None = Field(None, description="Its number in its retry schedule (1 again after a redelivery)")
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None
    response: str | None = Field(None, description="The first characters of the receiver's answer")


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    subscription_id: int
    event_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int = Field(description="Attempts of the current retry schedule (a redelivery restarts it)")
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] = Field(description="The body that is posted")
    attempt_log: list[AttemptOut] = Field(description="Every attempt, oldest first")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None
