"""Derived values of accounts (SPEC §2, §6), kept in SQL, set-based.

``balance`` (open, undisputed, unpaid), ``gross_open`` (the same including disputed invoices),
the carrying invoice and its due date, and the auto-collection tab are stored on the account row
so that listing and filtering a million accounts is an index lookup. They are recomputed here,
in a few statements over any set of accounts, whenever invoices, payments, flags, statuses or the
exclusion settings change. Nothing here loops over accounts in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    Integer,
    Select,
    and_,
    case,
    exists,
    false,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.engine.models import ExecutionLogEntry, QueueItem, QueueStatus
from duecourse.ledger.models import (
    Account,
    AccountStatus,
    AccountTag,
    CollectionTab,
    Invoice,
    InvoiceStatus,
)
from duecourse.tenancy.settings import ExclusionSettings

AccountIds = Select[Any] | Sequence[int] | None

ENGAGED_STATUSES = (
    AccountStatus.in_auto_management,
    AccountStatus.callback_pending,
    AccountStatus.promise_pending,
    AccountStatus.promise_overdue,
)


def _in_scope(organization_id: int, account_ids: AccountIds) -> ColumnElement[bool]:
    cond = Account.organization_id == organization_id
    if account_ids is None:
        return cond
    return and_(cond, Account.id.in_(account_ids))


def excluded_expr(exclusions: ExclusionSettings) -> ColumnElement[bool]:
    """True for accounts an exclusion rule puts in the Blocked tab (SPEC §6)."""
    rules: list[ColumnElement[bool]] = []
    if exclusions.min_balance > 0:
        rules.append(Account.balance < exclusions.min_balance)
    if exclusions.excluded_tags:
        rules.append(
            exists().where(AccountTag.account_id == Account.id, AccountTag.tag.in_(exclusions.excluded_tags))
        )
    if exclusions.exclude_only_disputed:
        rules.append(and_(Account.balance <= 0, Account.gross_open > 0))
    return or_(*rules) if rules else false()


def tab_expr(exclusions: ExclusionSettings) -> ColumnElement[Any]:
    """The auto-collection tab (SPEC §6) as one SQL expression over the account row."""
    return case(
        (Account.gross_open <= 0, null()),
        (or_(Account.blocked == true(), excluded_expr(exclusions)), literal(CollectionTab.blocked.value)),
        (Account.strategy_id.is_(None), literal(CollectionTab.outstanding.value)),
        (Account.status == AccountStatus.pending_contact.value, literal(CollectionTab.scheduled.value)),
        (Account.status.in_([s.value for s in ENGAGED_STATUSES]), literal(CollectionTab.engaged.value)),
        (Account.status == AccountStatus.sequence_completed.value, literal(CollectionTab.follow_up.value)),
        else_=literal(CollectionTab.outstanding.value),
    )


def refresh_tabs(session: Session, *, organization_id: int, exclusions: ExclusionSettings, account_ids: AccountIds = None) -> None:
    """Recompute ``collection_tab`` (after a status, flag or exclusion-settings change)."""
    session.execute(
        update(Account)
        .where(_in_scope(organization_id, account_ids))
        .values(collection_tab=tab_expr(exclusions))
        .execution_options(synchronize_session=False)
    )


def refresh_balances(session: Session, *, organization_id: int, account_ids: AccountIds = None) -> None:
    """Recompute balance, gross_open, carrying invoice and its due date from the invoices."""
    unpaid = Invoice.total - Invoice.amount_paid
    open_undisputed = and_(Invoice.status == InvoiceStatus.open.value, Invoice.disputed == false())
    scope_ids = select(Account.id).where(_in_scope(organization_id, account_ids))

    sums = (
        select(
            Invoice.account_id.label("account_id"),
            func.coalesce(func.sum(case((open_undisputed, unpaid), else_=0)), 0).label("balance"),
            func.coalesce(func.sum(case((Invoice.status == InvoiceStatus.open.value, unpaid), else_=0)), 0).label(
                "gross_open"
            ),
        )
        .where(Invoice.organization_id == organization_id, Invoice.account_id.in_(scope_ids))
        .group_by(Invoice.account_id)
        .subquery()
    )
    ranked = (
        select(
            Invoice.account_id.label("account_id"),
            Invoice.id.label("invoice_id"),
            Invoice.due_date.label("due_date"),
            func.row_number()
            .over(partition_by=Invoice.account_id, order_by=(Invoice.due_date, Invoice.number, Invoice.id))
            .label("rn"),
        )
        .where(
            Invoice.organization_id == organization_id,
            Invoice.account_id.in_(scope_ids),
            open_undisputed,
            Invoice.total > Invoice.amount_paid,
        )
        .subquery()
    )
    carrying = select(ranked.c.account_id, ranked.c.invoice_id, ranked.c.due_date).where(ranked.c.rn == 1).subquery()

    # Reset, then fill from the aggregates: accounts without open invoices drop out of the joins.
    session.execute(
        update(Account)
        .where(_in_scope(organization_id, account_ids))
        .values(balance=0, gross_open=0, carrying_invoice_id=None, carrying_due_date=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Account)
        .where(Account.id == sums.c.account_id)
        .values(balance=sums.c.balance, gross_open=sums.c.gross_open)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Account)
        .where(Account.id == carrying.c.account_id)
        .values(carrying_invoice_id=carrying.c.invoice_id, carrying_due_date=carrying.c.due_date)
        .execution_options(synchronize_session=False)
    )


def apply_balance_transitions(session: Session, *, organization_id: int, now: datetime, account_ids: AccountIds = None) -> None:
    """SPEC §4.2: a zero balance resolves the account and cancels its pending items; money owed again
    on a resolved account reopens it as ``unassigned`` (the engine assigns it on its next run)."""
    scope = _in_scope(organization_id, account_ids)
    to_resolve = select(Account.id).where(
        scope, Account.balance <= 0, Account.status != AccountStatus.resolved.value
    )
    # Cancel live items of accounts about to resolve, and log both events, before flipping status.
    pending = select(QueueItem.id).where(
        QueueItem.organization_id == organization_id,
        QueueItem.account_id.in_(to_resolve),
        QueueItem.status == QueueStatus.pending.value,
    )
    session.execute(
        insert(ExecutionLogEntry).from_select(
            ["organization_id", "account_id", "at", "event", "case_number", "stage_index", "queue_item_id", "reason", "cause"],
            select(
                QueueItem.organization_id,
                QueueItem.account_id,
                literal(now, type_=ExecutionLogEntry.at.type),
                literal("cancelled"),
                QueueItem.case_number,
                QueueItem.stage_index,
                QueueItem.id,
                literal("resolved"),
                literal("balance_zero"),
            ).where(QueueItem.id.in_(pending)),
        )
    )
    session.execute(
        update(QueueItem)
        .where(QueueItem.id.in_(pending))
        .values(status=QueueStatus.cancelled.value, reason="resolved", finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        insert(ExecutionLogEntry).from_select(
            ["organization_id", "account_id", "at", "event", "case_number", "reason", "cause"],
            select(
                Account.organization_id,
                Account.id,
                literal(now, type_=ExecutionLogEntry.at.type),
                literal("resolved"),
                Account.case_number,
                literal("balance_zero"),
                literal("payment_or_invoice_change"),
            )
            # An account that never had a case (no debt since it was loaded) resolves silently.
            .where(Account.id.in_(to_resolve), Account.status != AccountStatus.unassigned.value),
        )
    )
    session.execute(
        update(Account)
        .where(Account.id.in_(to_resolve))
        .values(status=AccountStatus.resolved.value, case_next_stage=None, callback_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    # Reopen: a resolved account that owes money again starts over, unassigned.
    session.execute(
        update(Account)
        .where(scope, Account.balance > 0, Account.status == AccountStatus.resolved.value)
        .values(
            status=AccountStatus.unassigned.value,
            strategy_id=None,
            case_next_stage=None,
            case_anchor_date=None,
            case_invoice_id=None,
            case_sequence_finished=False,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def refresh_accounts(
    session: Session,
    *,
    organization_id: int,
    exclusions: ExclusionSettings,
    now: datetime,
    account_ids: AccountIds = None,
) -> None:
    """Everything derived, in order: balances and carrying invoice, status transitions, tab."""
    session.flush()
    refresh_balances(session, organization_id=organization_id, account_ids=account_ids)
    apply_balance_transitions(session, organization_id=organization_id, now=now, account_ids=account_ids)
    refresh_tabs(session, organization_id=organization_id, exclusions=exclusions, account_ids=account_ids)
    session.expire_all()


def local_today_expr(
    session: Session, *, organization_id: int, org_timezone: str, now: datetime
) -> ColumnElement[Any]:
    """Today's date in each account's own time zone, as a SQL expression (SPEC §4.11).

    One CASE over the few distinct time zones the organization's accounts use, so filters and
    sorts on days overdue stay in SQL on both databases.
    """
    zones = session.scalars(
        select(Account.timezone).where(Account.organization_id == organization_id, Account.timezone.is_not(None)).distinct()
    ).all()
    default = now.astimezone(ZoneInfo(org_timezone)).date()
    whens = [(Account.timezone == z, literal(now.astimezone(ZoneInfo(z)).date())) for z in zones]
    if not whens:
        return literal(default)
    return case(*whens, else_=literal(default))


def days_between_expr(session: Session, later: ColumnElement[Any], earlier: ColumnElement[Any]) -> ColumnElement[int]:
    """``later - earlier`` in whole days, on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return (later - earlier).cast(Integer)  # date - date is an integer in PostgreSQL
    return func.cast(func.julianday(later) - func.julianday(earlier), Integer)


def days_overdue_expr(session: Session, *, organization_id: int, org_timezone: str, now: datetime) -> ColumnElement[int]:
    """Days overdue of each account: its local today minus its carrying invoice's due date (NULL if none)."""
    return days_between_expr(
        session, local_today_expr(session, organization_id=organization_id, org_timezone=org_timezone, now=now), Account.carrying_due_date
    )


def days_overdue(today: date, due: date | None) -> int | None:
    return None if due is None else (today - due).days
