"""Derived values of accounts (SPEC §2, §6), kept in SQL, set-based.

``balance`` (open, undisputed, unpaid), ``gross_open`` (the same including disputed invoices),
the carrying invoice and its due date, and the auto-collection tab are stored on the account row
so that listing and filtering a million accounts is an index lookup. They are recomputed here,
in a few statements over any set of accounts, whenever invoices, payments, flags, statuses or the
exclusion settings change. Nothing here loops over accounts in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from sqlalchemy import (
    Integer,
    Select,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.engine.log import cancel_open_tasks, cancel_pending, log_accounts
from duecourse.engine.models import QueueItem, QueueStatus
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


def excluded_expr(
    exclusions: ExclusionSettings,
    *,
    balance: ColumnElement[Any] | None = None,
    gross_open: ColumnElement[Any] | None = None,
) -> ColumnElement[bool]:
    """True for accounts an exclusion rule puts in the Blocked tab (SPEC §6).

    ``balance`` / ``gross_open`` replace the stored columns (the single-pass refresh passes the
    values it is about to write)."""
    bal = Account.balance if balance is None else balance
    gross = Account.gross_open if gross_open is None else gross_open
    rules: list[ColumnElement[bool]] = []
    if exclusions.min_balance > 0:
        per_currency = exclusions.min_balance_by_currency  # (empty without exchange rates)
        rules.append(or_(
            *[and_(Account.currency == c, bal < t) for c, t in per_currency.items()],
            and_(Account.currency.not_in(list(per_currency)), bal < exclusions.min_balance),
        ) if per_currency else bal < exclusions.min_balance)
    if exclusions.excluded_tags:
        rules.append(
            exists().where(AccountTag.account_id == Account.id, AccountTag.tag.in_(exclusions.excluded_tags))
        )
    if exclusions.exclude_only_disputed:
        rules.append(and_(bal <= 0, gross > 0))
    return or_(*rules) if rules else false()


# The account columns ``tab_expr`` reads (besides the account's tags).
TAB_INPUTS = frozenset({"gross_open", "balance", "blocked", "strategy_id", "status"})


def tab_expr(
    exclusions: ExclusionSettings,
    *,
    balance: ColumnElement[Any] | None = None,
    gross_open: ColumnElement[Any] | None = None,
    status: ColumnElement[Any] | None = None,
    strategy_id: ColumnElement[Any] | None = None,
) -> ColumnElement[Any]:
    """The auto-collection tab (SPEC §6) as one SQL expression over the account row (the keyword
    arguments replace the stored columns of the same name)."""
    gross = Account.gross_open if gross_open is None else gross_open
    st = Account.status if status is None else status
    strategy = Account.strategy_id if strategy_id is None else strategy_id
    return case(
        (gross <= 0, null()),
        (
            or_(Account.blocked == true(), excluded_expr(exclusions, balance=balance, gross_open=gross_open)),
            literal(CollectionTab.blocked.value),
        ),
        (strategy.is_(None), literal(CollectionTab.outstanding.value)),
        (st == AccountStatus.pending_contact.value, literal(CollectionTab.scheduled.value)),
        (st.in_([s.value for s in ENGAGED_STATUSES]), literal(CollectionTab.engaged.value)),
        (st == AccountStatus.sequence_completed.value, literal(CollectionTab.follow_up.value)),
        else_=literal(CollectionTab.outstanding.value),
    )


def refresh_tabs(session: Session, *, organization_id: int, exclusions: ExclusionSettings, account_ids: AccountIds = None) -> None:
    """Recompute ``collection_tab`` (after a status, flag or exclusion-settings change)."""
    tab = tab_expr(exclusions)
    session.execute(
        update(Account)
        .where(_in_scope(organization_id, account_ids), Account.collection_tab.is_distinct_from(tab))
        .values(collection_tab=tab)
        .execution_options(synchronize_session=False)
    )


def _ranked_invoices(organization_id: int, account_ids: AccountIds) -> Any:
    """One row per account with open invoices in scope: balance, gross_open, carrying invoice and
    its due date (window functions over the open invoices; see :func:`refresh_balances`)."""
    unpaid = Invoice.total - Invoice.amount_paid
    carries = and_(Invoice.disputed == false(), Invoice.total > Invoice.amount_paid)
    in_scope = [Invoice.organization_id == organization_id, Invoice.status == InvoiceStatus.open.value]
    if account_ids is not None:
        in_scope.append(Invoice.account_id.in_(account_ids))
    per_account = Invoice.account_id
    ranked = (
        select(
            Invoice.account_id.label("account_id"),
            func.sum(case((Invoice.disputed == false(), unpaid), else_=0)).over(partition_by=per_account).label("balance"),
            func.sum(unpaid).over(partition_by=per_account).label("gross_open"),
            case((carries, Invoice.id), else_=null()).label("invoice_id"),
            case((carries, Invoice.due_date), else_=null()).label("due_date"),
            func.row_number()
            .over(
                partition_by=per_account,
                # the carrying invoice (SPEC §2): oldest due date, then lowest number, among those that carry
                order_by=(case((carries, 0), else_=1), Invoice.due_date, Invoice.number, Invoice.id),
            )
            .label("rn"),
        )
        .where(*in_scope)
        .subquery()
    )
    return select(ranked).where(ranked.c.rn == 1).subquery()


def refresh_accounts_single_pass(
    session: Session,
    *,
    organization_id: int,
    exclusions: ExclusionSettings,
    now: datetime,
    account_ids: AccountIds = None,
) -> bool:
    """:func:`refresh_accounts` in one UPDATE, when it can be: balances, carrying invoice, status
    transitions and tab computed together, writing only the accounts whose values change.

    It applies only when no account in scope has a case or a pending queue item (an import of new
    accounts, for one): then resolving needs no cancellation and no execution-log entry. Returns
    False, having changed nothing, otherwise (the caller runs :func:`refresh_accounts`).

    PostgreSQL only (on SQLite it also returns False): SQLite's plan for the UPDATE … FROM over
    the outer join of accounts and the window subquery was far slower than the separate passes
    (a million accounts: minutes instead of seconds)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.flush()
    scope = _in_scope(organization_id, account_ids)
    quiet = (AccountStatus.resolved.value, AccountStatus.unassigned.value)
    if session.execute(select(literal(1)).where(scope, Account.status.not_in(quiet)).limit(1)).first():
        return False
    pending = select(literal(1)).where(
        QueueItem.organization_id == organization_id,
        QueueItem.status == QueueStatus.pending.value,
        QueueItem.account_id.in_(select(Account.id).where(scope)) if account_ids is not None else true(),
    )
    if session.execute(pending.limit(1)).first():
        return False

    ranked = _ranked_invoices(organization_id, account_ids)
    acc = Account.__table__.alias("scope_accounts")
    scope_a = acc.c.organization_id == organization_id
    if account_ids is not None:
        scope_a = and_(scope_a, acc.c.id.in_(account_ids))
    new = (
        select(
            acc.c.id.label("account_id"),
            func.coalesce(ranked.c.balance, 0).label("balance"),
            func.coalesce(ranked.c.gross_open, 0).label("gross_open"),
            ranked.c.invoice_id.label("invoice_id"),
            ranked.c.due_date.label("due_date"),
        )
        .select_from(acc.outerjoin(ranked, ranked.c.account_id == acc.c.id))
        .where(scope_a)
        .subquery()
    )
    status_type = Account.__table__.c.status.type
    resolve = and_(new.c.balance <= 0, Account.status != AccountStatus.resolved.value)
    reopen = and_(new.c.balance > 0, Account.status == AccountStatus.resolved.value)
    moves = or_(resolve, reopen)
    status = case(
        (resolve, literal(AccountStatus.resolved.value, status_type)),
        (reopen, literal(AccountStatus.unassigned.value, status_type)),
        else_=Account.status,
    )
    strategy = case((reopen, null()), else_=Account.strategy_id)
    tab = tab_expr(exclusions, balance=new.c.balance, gross_open=new.c.gross_open, status=status, strategy_id=strategy)
    session.execute(
        update(Account)
        .where(
            Account.id == new.c.account_id,
            or_(
                Account.balance != new.c.balance,
                Account.gross_open != new.c.gross_open,
                Account.carrying_invoice_id.is_distinct_from(new.c.invoice_id),
                Account.carrying_due_date.is_distinct_from(new.c.due_date),
                moves,
                Account.collection_tab.is_distinct_from(tab),
            ),
        )
        .values(
            balance=new.c.balance,
            gross_open=new.c.gross_open,
            carrying_invoice_id=new.c.invoice_id,
            carrying_due_date=new.c.due_date,
            status=status,
            strategy_id=strategy,
            case_next_stage=case((moves, null()), else_=Account.case_next_stage),
            callback_at=case((resolve, null()), else_=Account.callback_at),
            case_anchor_date=case((reopen, null()), else_=Account.case_anchor_date),
            case_invoice_id=case((reopen, null()), else_=Account.case_invoice_id),
            case_sequence_finished=case((reopen, false()), else_=Account.case_sequence_finished),
            collection_tab=tab,
            updated_at=case((moves, literal(now, Account.__table__.c.updated_at.type)), else_=Account.updated_at),
        )
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return True


def refresh_balances(session: Session, *, organization_id: int, account_ids: AccountIds = None) -> None:
    """Recompute balance, gross_open, carrying invoice and its due date from the invoices.

    One pass over the open invoices in scope with window functions gives one row per account (no
    join between derived tables, whose plans SQLite gets wrong without statistics); two UPDATEs then
    write only the accounts whose values change, so a whole-organization refresh of a large
    portfolio costs reads, not a rewrite of every account row and its indexes.
    """
    new = _ranked_invoices(organization_id, account_ids)

    # Accounts with no open invoice left: zero, no carrying invoice.
    has_open = exists().where(Invoice.account_id == Account.id, Invoice.status == InvoiceStatus.open.value)
    session.execute(
        update(Account)
        .where(
            _in_scope(organization_id, account_ids),
            or_(
                Account.balance != 0,
                Account.gross_open != 0,
                Account.carrying_invoice_id.is_not(None),
                Account.carrying_due_date.is_not(None),
            ),
            ~has_open,
        )
        .values(balance=0, gross_open=0, carrying_invoice_id=None, carrying_due_date=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Account)
        .where(
            Account.id == new.c.account_id,
            or_(
                Account.balance != new.c.balance,
                Account.gross_open != new.c.gross_open,
                Account.carrying_invoice_id.is_distinct_from(new.c.invoice_id),
                Account.carrying_due_date.is_distinct_from(new.c.due_date),
            ),
        )
        .values(
            balance=new.c.balance,
            gross_open=new.c.gross_open,
            carrying_invoice_id=new.c.invoice_id,
            carrying_due_date=new.c.due_date,
        )
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
    cancel_pending(
        session,
        organization_id=organization_id,
        which=QueueItem.account_id.in_(to_resolve),
        now=now,
        reason="resolved",
        cause="balance_zero",
    )
    cancel_open_tasks(session, organization_id=organization_id, accounts=to_resolve, now=now, reason="resolved")
    # An account that never had a case (no debt since it was loaded) resolves silently.
    in_collection = and_(Account.id.in_(to_resolve), Account.status != AccountStatus.unassigned.value)
    from duecourse.events.service import accounts_resolved  # events reads the ledger's tables

    accounts_resolved(session, organization_id=organization_id, which=in_collection, now=now)
    log_accounts(
        session,
        where=in_collection,
        at=now,
        event="resolved",
        reason="balance_zero",
        cause="payment_or_invoice_change",
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


@lru_cache(maxsize=1)
def _zone_names() -> tuple[str, ...]:
    return tuple(sorted(available_timezones()))


@lru_cache(maxsize=128)
def _local_dates(slot: datetime) -> tuple[tuple[date, tuple[str, ...]], ...]:
    """Every IANA zone grouped by its local date at ``slot``, largest group first."""
    groups: dict[date, list[str]] = {}
    for zone in _zone_names():
        groups.setdefault(slot.astimezone(ZoneInfo(zone)).date(), []).append(zone)
    return tuple(sorted(((d, tuple(z)) for d, z in groups.items()), key=lambda g: -len(g[1])))


def local_today_expr(
    session: Session, *, organization_id: int, org_timezone: str, now: datetime
) -> ColumnElement[Any]:
    """Today's date in each account's own time zone, as a SQL expression (SPEC §4.11).

    A NULL ``Account.timezone`` means the organization's. At any instant the world's zones span at
    most three local dates, so this is a CASE over the zone names grouped by their date, built from
    the zone database rather than by scanning the accounts (which would read every row of a large
    portfolio on each call). Filters and sorts on days overdue stay in SQL on both databases.
    """
    # Every UTC offset is a multiple of 15 minutes, so local dates only change on those boundaries.
    now_utc = now.astimezone(UTC)
    slot = now_utc.replace(minute=now_utc.minute - now_utc.minute % 15, second=0, microsecond=0)
    groups = _local_dates(slot)
    org_today = now.astimezone(ZoneInfo(org_timezone)).date()
    (common_date, _), minority = groups[0], groups[1:]
    whens: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = [(Account.timezone.is_(None), literal(org_today))]
    whens += [(Account.timezone.in_(zones), literal(d)) for d, zones in minority]
    return case(*whens, else_=literal(common_date))


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
