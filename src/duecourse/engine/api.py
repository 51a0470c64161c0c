"""Read access to the engine's records: queue items, interactions, agent tasks, the execution log.

These rows are written only by engine actions (each a transaction that also logs itself); the
execution log is append-only. The API therefore reads them; it does not edit or delete them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query

from duecourse.deps import DbSession, Reader
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem, QueueStatus, Task, TaskStatus
from duecourse.engine.schemas import ExecutionLogOut, InteractionOut, QueueItemOut, TaskOut
from duecourse.pagination import Page, PageParams, paginate
from duecourse.strategies.models import ActionType
from duecourse.tenancy.scope import get_owned, scoped

router = APIRouter(tags=["engine records"])


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
    stmt = scoped(QueueItem, principal.organization_id)
    for col, val in (
        (QueueItem.status, status),
        (QueueItem.campaign_id, campaign_id),
        (QueueItem.strategy_id, strategy_id),
        (QueueItem.account_id, account_id),
        (QueueItem.action, action),
    ):
        if val is not None:
            stmt = stmt.where(col == val)
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
    stmt = scoped(Interaction, principal.organization_id)
    for col, val in ((Interaction.account_id, account_id), (Interaction.campaign_id, campaign_id), (Interaction.channel, channel)):
        if val is not None:
            stmt = stmt.where(col == val)
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
    stmt = scoped(Task, principal.organization_id)
    for col, val in ((Task.status, status), (Task.kind, kind), (Task.account_id, account_id), (Task.assigned_user_id, assigned_user_id)):
        if val is not None:
            stmt = stmt.where(col == val)
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
    stmt = scoped(ExecutionLogEntry, principal.organization_id)
    if account_id is not None:
        stmt = stmt.where(ExecutionLogEntry.account_id == account_id)
    if event is not None:
        stmt = stmt.where(ExecutionLogEntry.event == event)
    return paginate(session, stmt, ExecutionLogEntry.id, page, ExecutionLogOut.model_validate, descending=True)
