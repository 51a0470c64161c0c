"""Named case transitions (SPEC §4.2, §4.8), each writing its execution-log entry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from duecourse.engine import dispatch_rows
from duecourse.engine.models import ExecutionLogEntry
from duecourse.engine.timing import local_date
from duecourse.ledger.derived import refresh_tabs
from duecourse.ledger.models import Account, AccountStatus
from duecourse.tenancy.service import get_settings


def log_event(
    session: Session,
    account: Account,
    *,
    at: datetime,
    event: str,
    stage_index: int | None = None,
    queue_item_id: int | None = None,
    reason: str | None = None,
    cause: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    rows = session.info.get(dispatch_rows.KEY)
    if rows is not None:
        # Inside a dispatch batch: a plain row, inserted with the batch's others (dispatch_rows).
        rows.log.append(dispatch_rows.log_row(
            organization_id=account.organization_id, account_id=account.id, at=at, event=event,
            case_number=account.case_number, stage_index=stage_index, queue_item_id=queue_item_id,
            reason=reason, cause=cause, details=details,
        ))
        return
    session.add(
        ExecutionLogEntry(
            organization_id=account.organization_id,
            account_id=account.id,
            at=at,
            event=event,
            case_number=account.case_number,
            stage_index=stage_index,
            queue_item_id=queue_item_id,
            reason=reason,
            cause=cause,
            details=details,
        )
    )


def advance(session: Session, account: Account, *, completed_stage: int, stage_count: int, org_tz: str, now: datetime,
            cause: str, keep_adjustment: bool = False) -> None:
    """The stage is done: the case moves to the next stage, or the sequence is completed (§4.1).

    An adjustment of the next stage's delay and tone (adaptive timing after a call, the immediate
    next stage after a delivery failure, §4.8) applies to that one stage only: advancing clears it,
    unless the caller has just set it for the stage it advances to (``keep_adjustment``)."""
    nxt = completed_stage + 1
    if account.status == AccountStatus.callback_pending:
        # Whatever completed the stage (a delivery failure of the return call, say) ends the
        # callback too; otherwise its expiry would advance the case a second time.
        account.status = AccountStatus.in_auto_management
        account.callback_at = None
    # (Cleared only when set: every attribute write is tracked, and a dispatch advances thousands.)
    if not keep_adjustment:
        if account.case_next_delay_days is not None:
            account.case_next_delay_days = None
        if account.case_tone_override is not None:
            account.case_tone_override = None
    account.case_next_stage = nxt
    account.case_prev_completed_at = now
    account.case_prev_completed_on = local_date(now, org_tz)
    if account.case_retry_count != 0:
        account.case_retry_count = 0
    account.updated_at = now
    if nxt >= stage_count:
        account.case_sequence_finished = True
        account.status = AccountStatus.sequence_completed
        log_event(session, account, at=now, event="sequence_completed", stage_index=completed_stage, cause=cause)
    else:
        if account.status in (AccountStatus.pending_contact, AccountStatus.promise_overdue):
            account.status = AccountStatus.in_auto_management
        log_event(session, account, at=now, event="advanced", stage_index=nxt, cause=cause)
    refresh_account_tab(session, account)


def refresh_account_tab(session: Session, account: Account) -> None:
    """Recompute the account's auto-collection tab (§6). Inside :func:`tabs_refreshed_at_end` the
    accounts are collected and refreshed together, in one statement per organization."""
    deferred = session.info.get("deferred_tab_refresh")
    if deferred is not None:
        deferred.setdefault(account.organization_id, set()).add(account.id)
        return
    session.flush()
    exclusions = get_settings(session, account.organization_id).exclusions
    refresh_tabs(session, organization_id=account.organization_id, exclusions=exclusions, account_ids=[account.id])


def pending_tab_refresh(session: Session) -> dict[int, set[int]] | None:
    """Inside :func:`tabs_refreshed_at_end`: the accounts (per organization) whose tab it will refresh.
    A writer that sets their tab in its own ``UPDATE`` removes them (``dispatch_rows``)."""
    return session.info.get("deferred_tab_refresh")


@contextmanager
def tabs_refreshed_at_end(session: Session) -> Iterator[None]:
    """Batch the tab refreshes of the block (a dispatch batch touches hundreds of accounts)."""
    session.info["deferred_tab_refresh"] = deferred = {}
    try:
        yield
    finally:
        session.info.pop("deferred_tab_refresh", None)
    dispatch_rows.write_pending(session)
    session.flush()
    for organization_id, ids in deferred.items():
        if not ids:
            continue
        exclusions = get_settings(session, organization_id).exclusions
        refresh_tabs(session, organization_id=organization_id, exclusions=exclusions, account_ids=sorted(ids))
