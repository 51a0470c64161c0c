"""Accounts, invoices, payments and promises to pay (SPEC §2, §6). Services never commit.

Every lookup is scoped to the caller's organization (another organization's object is "not found").
Every change that can move a derived value (balance, carrying invoice, status at zero balance, tab)
ends with :func:`duecourse.ledger.derived.refresh_accounts` for the accounts it touched, and every
change to invoices or payments first runs the allocation (:mod:`duecourse.ledger.allocation`).

Account time zone: ``Account.timezone`` stores only an explicit choice; NULL means "the organization's
time zone", so an account follows its organization when that changes. The API shows the effective
zone (``timezone``) and whether it is the default (``timezone_is_default``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import delete, false, func, or_, select, true
from sqlalchemy.orm import Session

from duecourse.engine.models import ExecutionLogEntry, Interaction
from duecourse.errors import Conflict, FieldError, ValidationFailed
from duecourse.events import service as events
from duecourse.ledger import allocation, derived
from duecourse.ledger.models import (
    Account,
    AccountStatus,
    AccountTag,
    CollectionTab,
    Invoice,
    InvoiceStatus,
    Payment,
    PaymentAllocation,
    PaymentSource,
    Promise,
    PromiseSource,
    PromiseStatus,
)
from duecourse.ledger.schemas import AccountIn, InvoiceIn, PaymentIn, PromiseIn
from duecourse.pagination import PageParams, paginate
from duecourse.tenancy.models import Organization
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.service import get_organization, get_settings
from duecourse.validation import currency_places, money

# ---------------------------------------------------------------- shared helpers


def format_money(value: Decimal | None, currency: str) -> str | None:
    """An amount as a string with the currency's minor units (``"120.50"``, ``"1000"`` for JPY)."""
    if value is None:
        return None
    q = value.quantize(Decimal(1).scaleb(-currency_places(currency)))
    return str(q if q == value else value)


def local_today(timezone: str, now: datetime) -> date:
    return now.astimezone(ZoneInfo(timezone)).date()


def refresh(session: Session, *, organization_id: int, account_ids: Sequence[int], now: datetime) -> None:
    """Recompute the derived values of some accounts (balance, carrying invoice, status at zero, tab)."""
    derived.refresh_accounts(
        session,
        organization_id=organization_id,
        exclusions=get_settings(session, organization_id).exclusions,
        now=now,
        account_ids=list(account_ids),
    )


def _lock_accounts(session: Session, account_ids: Sequence[int]) -> None:
    """Serialize money movements per account (PostgreSQL row locks; SQLite serializes writers anyway)."""
    session.execute(select(Account.id).where(Account.id.in_(list(account_ids))).with_for_update())


def _checked_money(
    errors: list[FieldError], field: str, value: Decimal | None, currency: str, *, positive: bool = False
) -> Decimal | None:
    if value is None:
        return None
    try:
        return money(value, currency, allow_zero=not positive)
    except ValueError as exc:
        errors.append(FieldError(field, str(exc)))
        return None


def _raise(errors: list[FieldError]) -> None:
    if errors:
        raise ValidationFailed("; ".join(f"{e.field}: {e.message}" for e in errors), errors)


def _resolve_account(
    session: Session, *, organization_id: int, account_id: int | None, account_external_id: str | None
) -> Account:
    """The account a body refers to; unknown or another organization's: 422 on that field."""
    if account_id is not None and account_external_id is not None:
        raise ValidationFailed.on("account_external_id", "give either account_id or account_external_id, not both")
    if account_id is None and account_external_id is None:
        raise ValidationFailed.on("account_id", "is required (or give account_external_id)")
    if account_id is not None:
        account = session.get(Account, account_id)
        if account is None or account.organization_id != organization_id:
            raise ValidationFailed.on("account_id", "no such account")
        return account
    account = session.scalar(
        scoped(Account, organization_id).where(Account.external_id == account_external_id)
    )
    if account is None:
        raise ValidationFailed.on("account_external_id", "no account with this external_id")
    return account


# ---------------------------------------------------------------- accounts

_NOT_NULL_ACCOUNT_FIELDS = (
    "external_id",
    "name",
    "currency",
    "tags",
    "opt_out_email",
    "opt_out_sms",
    "opt_out_whatsapp",
    "opt_out_voice",
    "blocked",
    "paused",
    "on_stop",
)


def _external_id_taken(session: Session, model: Any, organization_id: int, external_id: str, exclude_id: int | None = None) -> bool:
    stmt = select(model.id).where(model.organization_id == organization_id, model.external_id == external_id)
    if exclude_id is not None:
        stmt = stmt.where(model.id != exclude_id)
    return session.scalar(stmt.limit(1)) is not None


def _set_tags(session: Session, account: Account, tags: list[str]) -> None:
    session.execute(delete(AccountTag).where(AccountTag.account_id == account.id))
    session.add_all(AccountTag(account_id=account.id, tag=t, organization_id=account.organization_id) for t in tags)


def create_account(session: Session, *, organization_id: int, data: AccountIn, now: datetime) -> Account:
    """Create an account; currency defaults to the organization's base currency, the time zone to the organization's."""
    errors: list[FieldError] = []
    if data.blocked and not data.blocked_reason:
        errors.append(FieldError("blocked_reason", "is required when the account is blocked"))
    if not data.blocked and data.blocked_reason:
        errors.append(FieldError("blocked_reason", "only a blocked account has a reason"))
    _raise(errors)
    if _external_id_taken(session, Account, organization_id, data.external_id):
        raise Conflict("An account with this external_id already exists", [FieldError("external_id", "already exists")])
    org = get_organization(session, organization_id)
    values = data.model_dump(exclude={"tags"})
    values["currency"] = data.currency or org.base_currency
    account = Account(organization_id=organization_id, **values, created_at=now, updated_at=now)
    session.add(account)
    session.flush()
    _set_tags(session, account, data.tags)
    refresh(session, organization_id=organization_id, account_ids=[account.id], now=now)
    return account


def get_account(session: Session, *, organization_id: int, account_id: int) -> Account:
    return get_owned(session, Account, account_id, organization_id, "Account")


def update_account(
    session: Session, *, organization_id: int, account_id: int, changes: dict[str, Any], now: datetime
) -> Account:
    """Partial update of the fields a person may set; the engine's and derived fields are not writable."""
    account = get_account(session, organization_id=organization_id, account_id=account_id)
    errors = [FieldError(k, "must not be null") for k in _NOT_NULL_ACCOUNT_FIELDS if k in changes and changes[k] is None]
    _raise(errors)

    blocked = changes.get("blocked", account.blocked)
    if "blocked_reason" in changes:
        reason = changes["blocked_reason"]
    elif "blocked" in changes and changes["blocked"] and not account.blocked:
        reason = None  # a new block needs its own reason
    else:
        reason = account.blocked_reason
    if blocked and not reason:
        errors.append(FieldError("blocked_reason", "is required when the account is blocked"))
    if not blocked:
        if changes.get("blocked_reason"):
            errors.append(FieldError("blocked_reason", "only a blocked account has a reason"))
        reason = None

    if "currency" in changes and changes["currency"] != account.currency:
        has_money = any(
            session.scalar(select(model.id).where(model.account_id == account.id).limit(1)) is not None
            for model in (Invoice, Payment, Promise)
        )
        if has_money:
            errors.append(
                FieldError("currency", "cannot change: the account has invoices, payments or promises in " + account.currency)
            )
    _raise(errors)
    if "external_id" in changes and _external_id_taken(
        session, Account, organization_id, changes["external_id"], exclude_id=account.id
    ):
        raise Conflict("An account with this external_id already exists", [FieldError("external_id", "already exists")])

    for key, value in changes.items():
        if key not in ("tags", "blocked_reason"):
            if key in ("email", "phone", "whatsapp") and value != getattr(account, key):
                setattr(account, f"{key}_invalid", False)  # a new address gets a new chance
            setattr(account, key, value)
    account.blocked_reason = reason
    account.updated_at = now
    if "tags" in changes:
        _set_tags(session, account, changes["tags"])
    refresh(session, organization_id=organization_id, account_ids=[account.id], now=now)
    return account


def block_account(session: Session, *, organization_id: int, account_id: int, reason: str, now: datetime) -> Account:
    """Block an account (SPEC §6: it moves to the Blocked tab and is never dispatched to)."""
    return update_account(
        session,
        organization_id=organization_id,
        account_id=account_id,
        changes={"blocked": True, "blocked_reason": reason},
        now=now,
    )


def unblock_account(session: Session, *, organization_id: int, account_id: int, now: datetime) -> Account:
    return update_account(
        session, organization_id=organization_id, account_id=account_id, changes={"blocked": False}, now=now
    )


def delete_account(session: Session, *, organization_id: int, account_id: int) -> None:
    """Delete an account with its invoices, payments, promises and engine history (database cascades;
    the execution log has no foreign keys, so its entries are deleted here)."""
    account = get_account(session, organization_id=organization_id, account_id=account_id)
    session.execute(delete(ExecutionLogEntry).where(ExecutionLogEntry.account_id == account.id))
    session.delete(account)
    session.flush()
    session.expire_all()


def list_accounts(
    session: Session,
    *,
    organization_id: int,
    page: PageParams,
    now: datetime,
    external_id: str | None = None,
    status: AccountStatus | None = None,
    collection_tab: CollectionTab | None = None,
    campaign_id: int | None = None,
    strategy_id: int | None = None,
    tag: str | None = None,
    blocked: bool | None = None,
    min_balance: str | None = None,
    max_balance: str | None = None,
    min_days_overdue: int | None = None,
    max_days_overdue: int | None = None,
    q: str | None = None,
) -> dict[str, Any]:
    """One page of accounts, oldest id first. Each filter is an indexed or row-local SQL condition;
    with ``collection_tab`` the page is a range scan of ``ix_accounts_org_tab_id``; nothing is counted."""
    errors: list[FieldError] = []
    bounds: dict[str, Decimal] = {}
    for name, raw in (("min_balance", min_balance), ("max_balance", max_balance)):
        if raw is not None:
            try:
                bounds[name] = money(raw)
            except ValueError as exc:
                errors.append(FieldError(name, str(exc)))
    _raise(errors)
    org = get_organization(session, organization_id)

    stmt = scoped(Account, organization_id)
    if external_id is not None:
        stmt = stmt.where(Account.external_id == external_id)
    if status is not None:
        stmt = stmt.where(Account.status == AccountStatus(status).value)
    if collection_tab is not None:
        stmt = stmt.where(Account.collection_tab == CollectionTab(collection_tab).value)
    if campaign_id is not None:
        stmt = stmt.where(Account.campaign_id == campaign_id)
    if strategy_id is not None:
        stmt = stmt.where(Account.strategy_id == strategy_id)
    if tag is not None:
        stmt = stmt.where(
            Account.id.in_(
                select(AccountTag.account_id).where(AccountTag.organization_id == organization_id, AccountTag.tag == tag)
            )
        )
    if blocked is not None:
        stmt = stmt.where(Account.blocked == (true() if blocked else false()))
    if "min_balance" in bounds:
        stmt = stmt.where(Account.balance >= bounds["min_balance"])
    if "max_balance" in bounds:
        stmt = stmt.where(Account.balance <= bounds["max_balance"])
    if min_days_overdue is not None or max_days_overdue is not None:
        overdue = derived.days_overdue_expr(session, organization_id=organization_id, org_timezone=org.timezone, now=now)
        if min_days_overdue is not None:
            stmt = stmt.where(overdue >= min_days_overdue)
        if max_days_overdue is not None:
            stmt = stmt.where(overdue <= max_days_overdue)
    if q and q.strip():
        term = q.strip()
        stmt = stmt.where(
            or_(
                Account.name.icontains(term, autoescape=True),
                Account.email.icontains(term, autoescape=True),
                Account.external_id.icontains(term, autoescape=True),
            )
        )
    result = paginate(session, stmt, Account.id, page, lambda a: a)
    result["items"] = account_views(session, result["items"], org=org, now=now)
    return result


def tab_counts(session: Session, *, organization_id: int) -> dict[str, int]:
    """Accounts per auto-collection tab (SPEC §6): one GROUP BY over the indexed tab column."""
    rows = session.execute(
        select(Account.collection_tab, func.count())
        .where(Account.organization_id == organization_id, Account.collection_tab.is_not(None))
        .group_by(Account.collection_tab)
    ).all()
    counts = {tab.value: 0 for tab in CollectionTab}
    for tab, n in rows:
        counts[CollectionTab(tab).value] = n
    return counts


def account_views(session: Session, accounts: Sequence[Account], *, org: Organization, now: datetime) -> list[dict[str, Any]]:
    """API shape of accounts, with tags (one query for the page) and days overdue from each local today."""
    ids = [a.id for a in accounts]
    tags: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for account_id, tag in session.execute(
            select(AccountTag.account_id, AccountTag.tag).where(AccountTag.account_id.in_(ids)).order_by(AccountTag.tag)
        ):
            tags[account_id].append(tag)
    out = []
    for a in accounts:
        tz = a.timezone or org.timezone
        out.append(
            {
                "id": a.id,
                "external_id": a.external_id,
                "name": a.name,
                "email": a.email,
                "phone": a.phone,
                "whatsapp": a.whatsapp,
                "timezone": tz,
                "timezone_is_default": a.timezone is None,
                "language": a.language,
                "currency": a.currency,
                "score": a.score,
                "tags": tags[a.id],
                "opt_out_email": a.opt_out_email,
                "opt_out_sms": a.opt_out_sms,
                "opt_out_whatsapp": a.opt_out_whatsapp,
                "opt_out_voice": a.opt_out_voice,
                "email_invalid": a.email_invalid,
                "phone_invalid": a.phone_invalid,
                "whatsapp_invalid": a.whatsapp_invalid,
                "blocked": a.blocked,
                "blocked_reason": a.blocked_reason,
                "paused": a.paused,
                "on_stop": a.on_stop,
                "status": a.status,
                "strategy_id": a.strategy_id,
                "campaign_id": a.campaign_id,
                "campaign_joined_at": a.campaign_joined_at,
                "case_number": a.case_number,
                "case_opened_at": a.case_opened_at,
                "case_anchor_date": a.case_anchor_date,
                "case_invoice_id": a.case_invoice_id,
                "case_next_stage": a.case_next_stage,
                "case_prev_completed_at": a.case_prev_completed_at,
                "case_retry_count": a.case_retry_count,
                "case_sequence_finished": a.case_sequence_finished,
                "callback_at": a.callback_at,
                "balance": format_money(a.balance, a.currency),
                "gross_open": format_money(a.gross_open, a.currency),
                "carrying_invoice_id": a.carrying_invoice_id,
                "carrying_due_date": a.carrying_due_date,
                "days_overdue": derived.days_overdue(local_today(tz, now), a.carrying_due_date),
                "collection_tab": a.collection_tab,
                "last_interaction_at": a.last_interaction_at,
                "created_at": a.created_at,
                "updated_at": a.updated_at,
            }
        )
    return out


def account_view(session: Session, account: Account, *, now: datetime) -> dict[str, Any]:
    org = get_organization(session, account.organization_id)
    return account_views(session, [account], org=org, now=now)[0]


def list_execution_log(session: Session, *, organization_id: int, account_id: int, page: PageParams) -> dict[str, Any]:
    """The account's execution log (SPEC §4.9), newest first."""
    account = get_account(session, organization_id=organization_id, account_id=account_id)
    stmt = scoped(ExecutionLogEntry, organization_id).where(ExecutionLogEntry.account_id == account.id)
    return paginate(session, stmt, ExecutionLogEntry.id, page, lambda e: e, descending=True)


def list_interactions(session: Session, *, organization_id: int, account_id: int, page: PageParams) -> dict[str, Any]:
    """The account's interactions (SPEC §4.8), newest first."""
    account = get_account(session, organization_id=organization_id, account_id=account_id)
    stmt = scoped(Interaction, organization_id).where(Interaction.account_id == account.id)

    def view(i: Interaction) -> dict[str, Any]:
        return {
            **{c: getattr(i, c) for c in _INTERACTION_FIELDS},
            "promise_amount": format_money(i.promise_amount, account.currency),
        }

    return paginate(session, stmt, Interaction.id, page, view, descending=True)


_INTERACTION_FIELDS = ["id", "account_id", "queue_item_id", "strategy_id", "campaign_id", "stage_index", "channel", "direction", "status", "provider_ref", "outcome", "promise_date", "callback_at", "sentiment", "willingness", "summary", "transcript", "is_manual", "user_id", "occurred_at", "created_at"]


# ---------------------------------------------------------------- invoices


def _invoice_rules(
    errors: list[FieldError], *, account: Account, currency: str | None, total: Decimal | None, amount_paid: Decimal | None,
    issue_date: date, due_date: date,
) -> None:
    if currency is not None and currency != account.currency:
        errors.append(FieldError("currency", f"must be the account's currency ({account.currency})"))
    if total is not None and amount_paid is not None and amount_paid > total:
        errors.append(FieldError("amount_paid", "must not exceed total"))
    if due_date < issue_date:
        errors.append(FieldError("due_date", "must not be before issue_date"))


def _settled_status(status: InvoiceStatus, total: Decimal, amount_paid: Decimal) -> InvoiceStatus:
    """An open invoice whose paid amount reaches its total is paid; a paid one that owes again is open."""
    if status == InvoiceStatus.open and amount_paid >= total:
        return InvoiceStatus.paid
    return status


def create_invoice(session: Session, *, organization_id: int, data: InvoiceIn, now: datetime) -> Invoice:
    """Create an invoice in its account's currency; existing credit on the account settles it at once."""
    account = _resolve_account(
        session, organization_id=organization_id, account_id=data.account_id, account_external_id=data.account_external_id
    )
    errors: list[FieldError] = []
    total = _checked_money(errors, "total", data.total, account.currency)
    paid = _checked_money(errors, "amount_paid", data.amount_paid, account.currency)
    _invoice_rules(
        errors, account=account, currency=data.currency, total=total, amount_paid=paid,
        issue_date=data.issue_date, due_date=data.due_date,
    )
    _raise(errors)
    assert total is not None and paid is not None
    if _external_id_taken(session, Invoice, organization_id, data.external_id):
        raise Conflict("An invoice with this external_id already exists", [FieldError("external_id", "already exists")])
    _lock_accounts(session, [account.id])
    invoice = Invoice(
        organization_id=organization_id,
        account_id=account.id,
        external_id=data.external_id,
        number=data.number,
        currency=account.currency,
        total=total,
        amount_paid=paid,
        issue_date=data.issue_date,
        due_date=data.due_date,
        status=_settled_status(InvoiceStatus(data.status), total, paid),
        disputed=data.disputed,
        created_at=now,
        updated_at=now,
    )
    session.add(invoice)
    session.flush()
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[account.id], now=now)
    return invoice


def get_invoice(session: Session, *, organization_id: int, invoice_id: int) -> Invoice:
    return get_owned(session, Invoice, invoice_id, organization_id, "Invoice")


def update_invoice(
    session: Session, *, organization_id: int, invoice_id: int, changes: dict[str, Any], now: datetime
) -> Invoice:
    """Partial update. Voiding releases the invoice's payments as credit; the account is re-allocated."""
    invoice = get_invoice(session, organization_id=organization_id, invoice_id=invoice_id)
    account = get_account(session, organization_id=organization_id, account_id=invoice.account_id)
    errors = [FieldError(k, "must not be null") for k, v in changes.items() if v is None]
    _raise(errors)
    total = _checked_money(errors, "total", changes.get("total", invoice.total), account.currency)
    paid = _checked_money(errors, "amount_paid", changes.get("amount_paid", invoice.amount_paid), account.currency)
    _invoice_rules(
        errors, account=account, currency=changes.get("currency"), total=total, amount_paid=paid,
        issue_date=changes.get("issue_date", invoice.issue_date), due_date=changes.get("due_date", invoice.due_date),
    )
    if paid is not None and "amount_paid" in changes and changes.get("status") != InvoiceStatus.void.value:
        # What payments recorded in duecourse settled is part of amount_paid; writing a lower figure
        # (what the ERP knows) would make the debtor owe money they paid, and strand the payments.
        allocated = session.scalar(
            select(func.coalesce(func.sum(PaymentAllocation.amount), 0)).where(PaymentAllocation.invoice_id == invoice.id)
        ) or Decimal(0)
        if paid < allocated:
            errors.append(FieldError(
                "amount_paid", f"must be at least {Decimal(allocated).quantize(Decimal(1).scaleb(-currency_places(account.currency)))} "
                f"{account.currency}: that much was paid by payments "
                "recorded in duecourse (delete or correct those payments instead)"))
    _raise(errors)
    assert total is not None and paid is not None
    if "external_id" in changes and _external_id_taken(
        session, Invoice, organization_id, changes["external_id"], exclude_id=invoice.id
    ):
        raise Conflict("An invoice with this external_id already exists", [FieldError("external_id", "already exists")])
    _lock_accounts(session, [account.id])

    status = InvoiceStatus(changes.get("status", invoice.status))
    if status == InvoiceStatus.void and invoice.status != InvoiceStatus.void:
        allocation.release_allocations(session, organization_id=organization_id, invoice_ids=[invoice.id], now=now)
        paid = invoice.amount_paid if "amount_paid" not in changes else paid
    if "status" not in changes and status == InvoiceStatus.paid and paid < total:
        status = InvoiceStatus.open  # it owes again after its total or paid amount changed
    for key in ("external_id", "number", "issue_date", "due_date", "disputed"):
        if key in changes:
            setattr(invoice, key, changes[key])
    invoice.total = total
    invoice.amount_paid = paid
    invoice.status = _settled_status(status, total, paid)
    invoice.updated_at = now
    session.flush()
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[account.id], now=now)
    return invoice


def set_invoice_disputed(
    session: Session, *, organization_id: int, invoice_id: int, disputed: bool, now: datetime
) -> Invoice:
    """Mark or clear a dispute; a disputed invoice is never dunned and leaves the balance (SPEC §2)."""
    invoice = get_invoice(session, organization_id=organization_id, invoice_id=invoice_id)
    _lock_accounts(session, [invoice.account_id])
    if invoice.disputed != disputed:
        invoice.disputed = disputed
        invoice.updated_at = now
    session.flush()
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[invoice.account_id], now=now)
    return invoice


def delete_invoice(session: Session, *, organization_id: int, invoice_id: int, now: datetime) -> None:
    """Delete an invoice; what its payments had settled becomes credit, re-allocated at once."""
    invoice = get_invoice(session, organization_id=organization_id, invoice_id=invoice_id)
    account_id = invoice.account_id
    _lock_accounts(session, [account_id])
    allocation.release_allocations(session, organization_id=organization_id, invoice_ids=[invoice.id], now=now)
    session.execute(delete(Invoice).where(Invoice.id == invoice.id))
    # carrying_invoice_id is recomputed by the refresh that allocate_payments ends with. A case
    # opened on this invoice keeps pointing at it (no foreign key): it no longer matches the
    # carrying invoice, so the case restarts on the new one (§4.2) and its old items are withdrawn.
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[account_id], now=now)


def list_invoices(
    session: Session,
    *,
    organization_id: int,
    page: PageParams,
    account_id: int | None = None,
    status: InvoiceStatus | None = None,
    disputed: bool | None = None,
    due_before: date | None = None,
    due_after: date | None = None,
    q: str | None = None,
) -> dict[str, Any]:
    stmt = scoped(Invoice, organization_id)
    if account_id is not None:
        stmt = stmt.where(Invoice.account_id == account_id)
    if status is not None:
        stmt = stmt.where(Invoice.status == InvoiceStatus(status).value)
    if disputed is not None:
        stmt = stmt.where(Invoice.disputed == (true() if disputed else false()))
    if due_before is not None:
        stmt = stmt.where(Invoice.due_date < due_before)
    if due_after is not None:
        stmt = stmt.where(Invoice.due_date > due_after)
    if q and q.strip():
        stmt = stmt.where(Invoice.number.icontains(q.strip(), autoescape=True))
    return paginate(session, stmt, Invoice.id, page, invoice_view)


def invoice_view(i: Invoice) -> dict[str, Any]:
    return {
        "id": i.id,
        "account_id": i.account_id,
        "external_id": i.external_id,
        "number": i.number,
        "currency": i.currency,
        "total": format_money(i.total, i.currency),
        "amount_paid": format_money(i.amount_paid, i.currency),
        "unpaid": format_money(max(i.total - i.amount_paid, Decimal(0)), i.currency),
        "issue_date": i.issue_date,
        "due_date": i.due_date,
        "status": i.status,
        "disputed": i.disputed,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
    }


# ---------------------------------------------------------------- payments


def create_payment(
    session: Session, *, organization_id: int, data: PaymentIn, now: datetime, source: str | None = None
) -> Payment:
    """Record a payment and allocate it: its named invoice first, then the oldest open invoices; the rest is credit."""
    account = _resolve_account(
        session, organization_id=organization_id, account_id=data.account_id, account_external_id=data.account_external_id
    )
    errors: list[FieldError] = []
    amount = _checked_money(errors, "amount", data.amount, account.currency, positive=True)
    if data.currency is not None and data.currency != account.currency:
        errors.append(FieldError("currency", f"must be the account's currency ({account.currency})"))
    today = local_today(account.timezone or get_organization(session, organization_id).timezone, now)
    paid_on = data.paid_on or today
    if paid_on > today:
        errors.append(FieldError("paid_on", "must not be in the future"))
    invoice_id: int | None = None
    if data.invoice_id is not None and data.invoice_external_id is not None:
        errors.append(FieldError("invoice_external_id", "give either invoice_id or invoice_external_id, not both"))
    elif data.invoice_id is not None or data.invoice_external_id is not None:
        field = "invoice_id" if data.invoice_id is not None else "invoice_external_id"
        cond = (
            Invoice.id == data.invoice_id if data.invoice_id is not None else Invoice.external_id == data.invoice_external_id
        )
        invoice_id = session.scalar(
            scoped(Invoice, organization_id, Invoice.id).where(cond, Invoice.account_id == account.id)
        )
        if invoice_id is None:
            errors.append(FieldError(field, "no such invoice on this account"))
    _raise(errors)
    assert amount is not None
    external_id = data.external_id or f"pay_{uuid.uuid4().hex}"
    if _external_id_taken(session, Payment, organization_id, external_id):
        raise Conflict("A payment with this external_id already exists", [FieldError("external_id", "already exists")])
    _lock_accounts(session, [account.id])
    payment = Payment(
        organization_id=organization_id,
        account_id=account.id,
        invoice_id=invoice_id,
        external_id=external_id,
        amount=amount,
        currency=account.currency,
        paid_on=paid_on,
        source=PaymentSource(source or data.source),
        reference=data.reference,
        unallocated=amount,
        created_at=now,
    )
    session.add(payment)
    session.flush()
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[account.id], now=now)
    events.payment_recorded(session, payment=payment, account=account, now=now)
    return payment


def get_payment(session: Session, *, organization_id: int, payment_id: int) -> Payment:
    return get_owned(session, Payment, payment_id, organization_id, "Payment")


def delete_payment(session: Session, *, organization_id: int, payment_id: int, now: datetime) -> None:
    """Delete a payment: the invoices it settled owe that amount again (other credit is re-applied)."""
    payment = get_payment(session, organization_id=organization_id, payment_id=payment_id)
    account_id = payment.account_id
    _lock_accounts(session, [account_id])
    allocation.release_allocations(session, organization_id=organization_id, payment_ids=[payment.id], now=now)
    session.execute(delete(Payment).where(Payment.id == payment.id))
    allocation.allocate_payments(session, organization_id=organization_id, account_ids=[account_id], now=now)


def list_payments(
    session: Session,
    *,
    organization_id: int,
    page: PageParams,
    account_id: int | None = None,
    since: date | None = None,
    until: date | None = None,
) -> dict[str, Any]:
    stmt = scoped(Payment, organization_id)
    if account_id is not None:
        stmt = stmt.where(Payment.account_id == account_id)
    if since is not None:
        stmt = stmt.where(Payment.paid_on >= since)
    if until is not None:
        stmt = stmt.where(Payment.paid_on <= until)
    result = paginate(session, stmt, Payment.id, page, lambda p: p)
    result["items"] = payment_views(session, result["items"])
    return result


def payment_views(session: Session, payments: Sequence[Payment]) -> list[dict[str, Any]]:
    ids = [p.id for p in payments]
    allocs: dict[int, list[tuple[int, Decimal]]] = {i: [] for i in ids}
    if ids:
        for payment_id, invoice_id, amount in session.execute(
            select(PaymentAllocation.payment_id, PaymentAllocation.invoice_id, PaymentAllocation.amount)
            .where(PaymentAllocation.payment_id.in_(ids))
            .order_by(PaymentAllocation.payment_id, PaymentAllocation.invoice_id)
        ):
            allocs[payment_id].append((invoice_id, amount))
    return [
        {
            "id": p.id,
            "account_id": p.account_id,
            "invoice_id": p.invoice_id,
            "external_id": p.external_id,
            "amount": format_money(p.amount, p.currency),
            "currency": p.currency,
            "paid_on": p.paid_on,
            "source": p.source,
            "reference": p.reference,
            "unallocated": format_money(p.unallocated, p.currency),
            "allocations": [{"invoice_id": i, "amount": format_money(a, p.currency)} for i, a in allocs[p.id]],
            "created_at": p.created_at,
        }
        for p in payments
    ]


# ---------------------------------------------------------------- promises


def create_promise(
    session: Session, *, organization_id: int, data: PromiseIn, now: datetime, created_by_user_id: int | None = None
) -> Promise:
    """Record a promise to pay (SPEC §2); its date may not lie before the account's local today."""
    account = _resolve_account(
        session, organization_id=organization_id, account_id=data.account_id, account_external_id=data.account_external_id
    )
    errors: list[FieldError] = []
    amount = _checked_money(errors, "amount", data.amount, account.currency, positive=True)
    today = local_today(account.timezone or get_organization(session, organization_id).timezone, now)
    if data.promised_date < today:
        errors.append(FieldError("promised_date", f"must not be in the past (the account's today is {today.isoformat()})"))
    _raise(errors)
    promise = Promise(
        organization_id=organization_id,
        account_id=account.id,
        amount=amount,
        currency=account.currency,
        promised_date=data.promised_date,
        status=PromiseStatus.pending,
        source=PromiseSource(data.source),
        note=data.note,
        created_by_user_id=created_by_user_id,
        created_at=now,
    )
    session.add(promise)
    session.flush()
    return promise


def get_promise(session: Session, *, organization_id: int, promise_id: int) -> Promise:
    return get_owned(session, Promise, promise_id, organization_id, "Promise")


def cancel_promise(session: Session, *, organization_id: int, promise_id: int, now: datetime) -> Promise:
    """Cancel a pending promise; a kept, broken or cancelled one is final (409)."""
    promise = get_promise(session, organization_id=organization_id, promise_id=promise_id)
    if promise.status != PromiseStatus.pending:
        raise Conflict(
            f"Only a pending promise can be cancelled; this one is {promise.status.value}",
            [FieldError("status", f"is {promise.status.value}")],
        )
    promise.status = PromiseStatus.cancelled
    promise.settled_at = now
    session.flush()
    return promise


def list_promises(
    session: Session,
    *,
    organization_id: int,
    page: PageParams,
    account_id: int | None = None,
    status: PromiseStatus | None = None,
) -> dict[str, Any]:
    stmt = scoped(Promise, organization_id)
    if account_id is not None:
        stmt = stmt.where(Promise.account_id == account_id)
    if status is not None:
        stmt = stmt.where(Promise.status == PromiseStatus(status).value)
    return paginate(session, stmt, Promise.id, page, promise_view)


def promise_view(p: Promise) -> dict[str, Any]:
    return {
        "id": p.id,
        "account_id": p.account_id,
        "amount": format_money(p.amount, p.currency),
        "currency": p.currency,
        "promised_date": p.promised_date,
        "status": p.status,
        "source": p.source,
        "note": p.note,
        "interaction_id": p.interaction_id,
        "created_by_user_id": p.created_by_user_id,
        "created_at": p.created_at,
        "settled_at": p.settled_at,
    }
