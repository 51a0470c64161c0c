"""Read access to the engine's records: queue items, interactions, agent tasks, the execution log.

These rows are written only by engine actions (each a transaction that also logs itself); the
execution log is append-only. The API therefore reads them; it does not edit or delete them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from duecourse.campaigns.models import Campaign
from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.engine import kpis, outcomes
from duecourse.engine.enqueue import enqueue
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem, QueueStatus, Task, TaskStatus
from duecourse.engine.outcomes import CallReport
from duecourse.engine.simulate import MAX_DAYS, simulate
from duecourse.engine.schemas import (
    CallFields,
    CallOutcomeIn,
    DeliveryIn,
    ExecutionLogOut,
    InteractionOut,
    QueueItemOut,
    TaskOut,
    TaskOutcomeIn,
)
from duecourse.errors import ValidationFailed
from duecourse.pagination import Page, PageParams, paginate
from duecourse.strategies.models import ActionType
from duecourse.tenancy.principal import Permission, Principal
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.service import update_settings

router = APIRouter(tags=["engine records"])


def _equal(stmt: Any, *pairs: tuple[Any, Any]) -> Any:
    """Add ``column = value`` for every filter the caller gave."""
    for column, value in pairs:
        if value is not None:
            stmt = stmt.where(column == value)
    return stmt


@router.get("/queue-items", response_model=Page[QueueItemOut], summary="The execution queue, filtered")
def list_queue_items(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    status: QueueStatus | None = None,
    campaign_id: int | None = None,
    strategy_id: int | None = None,
    account_id: int | None = None,
    action: ActionType | None = None,
    scheduled_before: datetime | None = None,
    scheduled_after: datetime | None = None,
) -> Any:
    stmt = _equal(
        scoped(QueueItem, principal.organization_id),
        (QueueItem.status, status),
        (QueueItem.campaign_id, campaign_id),
        (QueueItem.strategy_id, strategy_id),
        (QueueItem.account_id, account_id),
        (QueueItem.action, action),
    )
    if scheduled_before is not None:
        stmt = stmt.where(QueueItem.scheduled_at < scheduled_before)
    if scheduled_after is not None:
        stmt = stmt.where(QueueItem.scheduled_at >= scheduled_after)
    return paginate(session, stmt, QueueItem.id, page, QueueItemOut.model_validate)


@router.get("/queue-items/{item_id}", response_model=QueueItemOut)
def get_queue_item(item_id: int, principal: Reader, session: DbSession) -> Any:
    return get_owned(session, QueueItem, item_id, principal.organization_id, "Queue item")


@router.get("/interactions", response_model=Page[InteractionOut], summary="Interactions of the organization")
def list_interactions(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    account_id: int | None = None,
    campaign_id: int | None = None,
    channel: ActionType | None = None,
    since: datetime | None = Query(None, description="occurred at or after"),
) -> Any:
    stmt = _equal(
        scoped(Interaction, principal.organization_id),
        (Interaction.account_id, account_id),
        (Interaction.campaign_id, campaign_id),
        (Interaction.channel, channel),
    )
    if since is not None:
        stmt = stmt.where(Interaction.occurred_at >= since)
    return paginate(session, stmt, Interaction.id, page, InteractionOut.model_validate)


@router.get("/interactions/{interaction_id}", response_model=InteractionOut)
def get_interaction(interaction_id: int, principal: Reader, session: DbSession) -> Any:
    return get_owned(session, Interaction, interaction_id, principal.organization_id, "Interaction")


@router.get("/tasks", response_model=Page[TaskOut], summary="Agents' call and escalation tasks")
def list_tasks(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    status: TaskStatus | None = None,
    kind: ActionType | None = None,
    account_id: int | None = None,
    assigned_user_id: int | None = None,
) -> Any:
    stmt = _equal(
        scoped(Task, principal.organization_id),
        (Task.status, status),
        (Task.kind, kind),
        (Task.account_id, account_id),
        (Task.assigned_user_id, assigned_user_id),
    )
    return paginate(session, stmt, Task.id, page, TaskOut.model_validate)


@router.get("/tasks/{task_id}", response_model=TaskOut)
def get_task(task_id: int, principal: Reader, session: DbSession) -> Any:
    return get_owned(session, Task, task_id, principal.organization_id, "Task")


@router.get("/execution-log", response_model=Page[ExecutionLogOut], summary="The execution log (SPEC §4.9), newest first")
def list_execution_log(
    principal: Reader,
    session: DbSession,
    page: PageParams = Depends(),
    account_id: int | None = None,
    event: str | None = None,
) -> Any:
    stmt = _equal(
        scoped(ExecutionLogEntry, principal.organization_id),
        (ExecutionLogEntry.account_id, account_id),
        (ExecutionLogEntry.event, event),
    )
    return paginate(session, stmt, ExecutionLogEntry.id, page, ExecutionLogOut.model_validate, descending=True)


Operator = requires(Permission.operate_engine)


class EnqueueIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    campaign_id: int | None = Field(None, description="One campaign's accounts; omit for all eligible accounts")


@router.get("/engine/kpis", summary="Execution KPIs (SPEC §8): pending, processing, completed/failed/skipped today")
def engine_kpis(principal: Reader, session: DbSession, clock: AppClock) -> dict[str, Any]:
    return kpis.engine_kpis(session, organization_id=principal.organization_id, now=clock.now())


@router.get("/engine/daily-outcomes", summary="Sent, delivered, failed, promises and payments per day (organization's days)")
def daily_outcomes(
    principal: Reader, session: DbSession, clock: AppClock, days: int = Query(30, ge=1, le=90)
) -> dict[str, Any]:
    return kpis.daily_outcomes(session, organization_id=principal.organization_id, now=clock.now(), days=days)


def _set_paused(session: Any, principal: Principal, paused: bool, now: Any) -> dict[str, Any]:
    settings = update_settings(session, principal=principal, patch={"automation": {"engine_paused": paused}}, now=now)
    return {"engine_paused": settings.automation.engine_paused}


@router.post("/engine/pause", summary="Pause Automation: nothing is dispatched; pending items stay pending")
def pause_engine(session: DbSession, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    return _set_paused(session, principal, True, clock.now())


@router.post("/engine/resume", summary="Resume Automation")
def resume_engine(session: DbSession, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    return _set_paused(session, principal, False, clock.now())


@router.post("/engine/enqueue", summary="Enqueue now: all eligible accounts, or one campaign's")
def enqueue_now(body: EnqueueIn, session: DbSession, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    if body.campaign_id is not None:
        get_owned(session, Campaign, body.campaign_id, principal.organization_id, "Campaign")
    result = enqueue(
        session, organization_id=principal.organization_id, now=clock.now(), campaign_id=body.campaign_id, cause="manual_enqueue"
    )
    return result.as_dict()


Worker = requires(Permission.work_tasks)


def _report(body: CallFields, failed: bool = False) -> CallReport:
    return CallReport(
        outcome=body.outcome, failed=failed, promise_amount=body.promise_amount, promise_date=body.promise_date,
        callback_at=body.callback_at, sentiment=body.sentiment, willingness=body.willingness,
        summary=body.summary, transcript=body.transcript,
    )


@router.post("/outcomes/delivery", summary="Report a delivery status (delivered, bounced, failed, undelivered)")
def report_delivery(body: DeliveryIn, session: DbSession, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    result = outcomes.record_delivery(
        session, organization_id=principal.organization_id, now=clock.now(), status=body.status,
        queue_item_id=body.queue_item_id, provider_ref=body.provider_ref, error=body.error,
    )
    return {"result": result}


@router.post("/outcomes/call", summary="Report a voice call's outcome (SPEC §4.8)")
def report_call(body: CallOutcomeIn, session: DbSession, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    result = outcomes.record_call_outcome(
        session, organization_id=principal.organization_id, now=clock.now(), report=_report(body, body.failed),
        queue_item_id=body.queue_item_id, provider_ref=body.provider_ref,
    )
    return {"result": result}


@router.post("/tasks/{task_id}/outcome", response_model=TaskOut, summary="Log an agent task's outcome; completes its stage")
def report_task(task_id: int, body: TaskOutcomeIn, session: DbSession, clock: AppClock, principal: Principal = Worker) -> Any:
    if body.outcome is None:
        raise ValidationFailed.on("outcome", "is required")
    return outcomes.record_task_outcome(
        session, organization_id=principal.organization_id, task_id=task_id, now=clock.now(), report=_report(body),
        note=body.note, user_id=principal.user_id,
    )


class SimulateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    days: int = Field(7, ge=1, le=MAX_DAYS, description="How many days ahead")
    strategy_id: int | None = None
    campaign_id: int | None = None


@router.post("/engine/simulate", summary="Safe mode: what the engine would do over the next days (changes nothing)")
def simulate_engine(body: SimulateIn, request: Request, clock: AppClock, principal: Principal = Operator) -> dict[str, Any]:
    return simulate(
        request.app.state.db, organization_id=principal.organization_id, start=clock.now(), days=body.days,
        strategy_id=body.strategy_id, campaign_id=body.campaign_id,
    )
