"""Set-based writers of the execution log (SPEC §4.9), and the cancellation of queue items and of
agent tasks.

Each writer is one ``INSERT … SELECT`` so an action over a million accounts logs in one statement.
Call the log writer *before* the statement that changes the rows it selects, in the same
transaction, so both see the same set. On PostgreSQL, :func:`change_and_log` does both in one
statement (the change's ``RETURNING`` feeds the log), which saves reading the rows twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, literal, null, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate
from sqlalchemy.sql.elements import ColumnElement

from duecourse.db.dialect import dialect_name
from duecourse.engine.models import ExecutionLogEntry, QueueItem, QueueStatus, Task, TaskStatus
from duecourse.ledger.models import Account

_COLUMNS = ["organization_id", "account_id", "at", "event", "case_number", "stage_index", "queue_item_id", "reason", "cause", "details"]


def _details(details: dict[str, Any] | ColumnElement[Any] | None) -> ColumnElement[Any]:
    if details is None:
        return null()
    if isinstance(details, dict):
        return literal(details, type_=ExecutionLogEntry.details.type)
    return details


def log_accounts(
    session: Session,
    *,
    where: ColumnElement[bool],
    at: datetime,
    event: str,
    cause: str | None = None,
    reason: str | None = None,
    stage_index: int | ColumnElement[Any] | None = None,
    details: dict[str, Any] | ColumnElement[Any] | None = None,
) -> None:
    """One log entry per account matching ``where``."""
    stage: Any = null() if stage_index is None else (literal(stage_index) if isinstance(stage_index, int) else stage_index)
    session.execute(
        insert(ExecutionLogEntry).from_select(
            _COLUMNS,
            select(
                Account.organization_id,
                Account.id,
                literal(at, type_=ExecutionLogEntry.at.type),
                literal(event),
                Account.case_number,
                stage,
                null(),
                literal(reason) if reason is not None else null(),
                literal(cause) if cause is not None else null(),
                _details(details),
            ).where(where),
        )
    )


def log_items(
    session: Session,
    *,
    where: ColumnElement[bool],
    at: datetime,
    event: str,
    cause: str | None = None,
    reason: str | ColumnElement[Any] | None = None,
    details: dict[str, Any] | ColumnElement[Any] | None = None,
) -> None:
    """One log entry per queue item matching ``where``."""
    reason_expr: Any = null() if reason is None else (literal(reason) if isinstance(reason, str) else reason)
    session.execute(
        insert(ExecutionLogEntry).from_select(
            _COLUMNS,
            select(
                QueueItem.organization_id,
                QueueItem.account_id,
                literal(at, type_=ExecutionLogEntry.at.type),
                literal(event),
                QueueItem.case_number,
                QueueItem.stage_index,
                QueueItem.id,
                reason_expr,
                literal(cause) if cause is not None else null(),
                _details(details),
            ).where(where),
        )
    )


def can_change_and_log(session: Session) -> bool:
    """Whether :func:`change_and_log` is available (PostgreSQL's data-modifying ``WITH``)."""
    return dialect_name(session) == "postgresql"


def change_and_log(
    session: Session,
    change: ReturningInsert[Any] | ReturningUpdate[Any],
    *,
    at: datetime,
    event: str,
    cause: str | None = None,
    reason: str | None = None,
) -> int:
    """Run ``change`` and log one entry per row it wrote, in one statement (PostgreSQL only).

    ``change`` returns, in this order: ``organization_id``, ``account_id``, ``case_number``,
    ``stage_index`` and, for queue items, their ``id``. Returns the number of rows changed (= entries
    written).
    """
    rows = change.cte("changed")
    c = list(rows.c)
    if len(c) == 4:
        c.append(null())
    stmt = insert(ExecutionLogEntry).from_select(
        _COLUMNS,
        select(
            c[0],
            c[1],
            literal(at, type_=ExecutionLogEntry.at.type),
            literal(event),
            c[2],
            c[3],
            c[4],
            literal(reason) if reason is not None else null(),
            literal(cause) if cause is not None else null(),
            null(),
        ),
    )
    return session.execute(stmt.execution_options(preserve_rowcount=True)).rowcount or 0


def cancel_pending(
    session: Session,
    *,
    organization_id: int,
    which: ColumnElement[bool],
    now: datetime,
    reason: str,
    cause: str,
    details: dict[str, Any] | None = None,
) -> int:
    """Cancel the organization's pending queue items matching ``which``, each logged with its reason
    (SPEC §4.6 ``cancelled``: nothing is withdrawn silently). Returns how many."""
    cond = and_(QueueItem.organization_id == organization_id, QueueItem.status == QueueStatus.pending.value, which)
    log_items(session, where=cond, at=now, event="cancelled", cause=cause, reason=reason, details=details)
    result = session.execute(
        update(QueueItem)
        .where(cond)
        .values(status=QueueStatus.cancelled.value, reason=reason, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def cancel_open_tasks(
    session: Session,
    *,
    organization_id: int,
    accounts: Any,
    now: datetime,
    reason: str,
    kinds: tuple[str, ...] = ("phone_call", "escalation"),
) -> int:
    """Cancel the open agent tasks (``kinds``) of ``accounts`` (a SELECT of account ids, or ids), each
    logged as ``task_cancelled`` with its reason: an agent must not call a debtor who has paid, or
    whose case has started again or waits for a promise. Returns how many."""
    cond = and_(Task.organization_id == organization_id, Task.status == TaskStatus.open.value,
                Task.kind.in_(kinds), Task.account_id.in_(accounts))
    session.execute(insert(ExecutionLogEntry).from_select(_COLUMNS, select(
        Task.organization_id, Task.account_id, literal(now, type_=ExecutionLogEntry.at.type), literal("task_cancelled"),
        select(Account.case_number).where(Account.id == Task.account_id).scalar_subquery(), Task.stage_index,
        Task.queue_item_id, literal(reason), null(), null(),
    ).where(cond)))
    result = session.execute(
        update(Task).where(cond).values(status=TaskStatus.cancelled.value, completed_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0
