"""Payment allocation (SPEC §2), set-based: a few statements for any number of accounts.

Rules:

1. A payment that names an invoice settles that invoice first, up to its unpaid amount (several
   payments naming one invoice settle it in payment order: ``paid_on``, then id).
2. Everything else settles the account's open, undisputed invoices oldest-first by
   ``(due_date, number, id)``, consuming payments in the order ``(paid_on, id)``.
3. An invoice whose ``amount_paid`` reaches its total becomes ``paid``.
4. What cannot be allocated stays on the payment as ``unallocated`` (a credit); every run consumes
   the remaining credit of every payment in scope, so a credit settles invoices that arrive later.

Technique: each side is laid out as consecutive intervals on a per-account line with running sums
(``SUM() OVER (PARTITION BY account_id ORDER BY …)``): payment *p* covers ``[p_end - p_remaining, p_end)``,
invoice *i* covers ``[i_end - i_unpaid, i_end)``. An allocation is the overlap of a payment interval and
an invoice interval of the same account: ``min(ends) - max(starts)`` where positive (written with CASE,
the same on both databases). The payments' intervals and then the overlaps are materialized in
per-connection temporary tables, and applied with one UPDATE … FROM per table. Amounts are the stored
integer units throughout, so every sum is exact. Measured on this project's test machine: 1,000,000
accounts, 2,000,000 invoices, 500,000 payments, allocated and refreshed in one call: about 30 s on
SQLite and 2-3 min on PostgreSQL (the row writes dominate).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    MetaData,
    Select,
    Table,
    and_,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.ledger.models import Invoice, InvoiceStatus, Payment, PaymentAllocation

AccountIds = Select[Any] | Sequence[int] | None

# Per-connection scratch table; rows never outlive the call that wrote them.
_tmp = Table(
    "dc_allocation_batch",
    MetaData(),
    Column("payment_id", BigInteger, nullable=False),
    Column("invoice_id", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("known_pair", Boolean, nullable=False),
)
_COLUMNS_DDL = (
    "(payment_id BIGINT NOT NULL, invoice_id BIGINT NOT NULL, amount BIGINT NOT NULL, known_pair BOOLEAN NOT NULL)"
)
# The payments' intervals, indexed by account: joining two window-function subqueries directly is a
# hash join on PostgreSQL but a nested loop over both on SQLite (no statistics), quadratic at scale.
_pay = Table(
    "dc_allocation_payments",
    MetaData(),
    Column("account_id", BigInteger, nullable=False),
    Column("payment_id", BigInteger, nullable=False),
    Column("p_start", BigInteger, nullable=False),
    Column("p_end", BigInteger, nullable=False),
)
_PAY_DDL = "(account_id BIGINT NOT NULL, payment_id BIGINT NOT NULL, p_start BIGINT NOT NULL, p_end BIGINT NOT NULL)"


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _prepare_scratch(session: Session) -> None:
    suffix = " ON COMMIT DELETE ROWS" if _dialect(session) == "postgresql" else ""
    for table, ddl in ((_tmp, _COLUMNS_DDL), (_pay, _PAY_DDL)):
        session.execute(text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {table.name} {ddl}{suffix}"))
        session.execute(delete(table))
    session.execute(text(f"CREATE INDEX IF NOT EXISTS ix_{_pay.name} ON {_pay.name} (account_id, p_end)"))


def _account_scope(column: ColumnElement[Any], account_ids: AccountIds) -> ColumnElement[bool]:
    if account_ids is None:
        return true()
    if isinstance(account_ids, Sequence) and not account_ids:
        return false()
    return column.in_(account_ids)


def _least(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((a < b, a), else_=b)


def _greatest(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((a > b, a), else_=b)


def _apply_batch(session: Session, *, organization_id: int, now: datetime) -> int:
    """Add the batch to payment_allocations, invoices.amount_paid/status and payments.unallocated.

    Returns the number of allocations in the batch."""
    made = session.scalar(select(func.count()).select_from(_tmp)) or 0
    if not made:
        return 0
    if _dialect(session) == "postgresql":
        session.execute(text(f"ANALYZE {_tmp.name}"))  # a temp table has no statistics otherwise
    same_pair = and_(PaymentAllocation.payment_id == _tmp.c.payment_id, PaymentAllocation.invoice_id == _tmp.c.invoice_id)
    # A pair can recur (e.g. an invoice's total raised after a payment settled it): add to its row.
    # Known pairs are marked first: an INSERT … WHERE NOT EXISTS on the table being filled makes
    # PostgreSQL rescan its growing heap per row when the table started empty (quadratic).
    session.execute(update(_tmp).where(exists().where(same_pair)).values(known_pair=True))
    session.execute(
        update(PaymentAllocation)
        .where(same_pair, _tmp.c.known_pair == true())
        .values(amount=PaymentAllocation.amount + _tmp.c.amount)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        insert(PaymentAllocation).from_select(
            ["payment_id", "invoice_id", "organization_id", "amount"],
            select(_tmp.c.payment_id, _tmp.c.invoice_id, literal(organization_id), _tmp.c.amount).where(
                _tmp.c.known_pair == false()
            ),
        )
    )
    per_invoice = (
        select(_tmp.c.invoice_id, func.sum(_tmp.c.amount).label("amount")).group_by(_tmp.c.invoice_id).subquery()
    )
    new_paid = Invoice.amount_paid + per_invoice.c.amount
    session.execute(
        update(Invoice)
        .where(Invoice.id == per_invoice.c.invoice_id)
        .values(
            amount_paid=new_paid,
            status=case((new_paid >= Invoice.total, literal(InvoiceStatus.paid.value)), else_=Invoice.status),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    per_payment = (
        select(_tmp.c.payment_id, func.sum(_tmp.c.amount).label("amount")).group_by(_tmp.c.payment_id).subquery()
    )
    session.execute(
        update(Payment)
        .where(Payment.id == per_payment.c.payment_id)
        .values(unallocated=Payment.unallocated - per_payment.c.amount)
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(_tmp))
    return made


def _explicit_batch(organization_id: int, account_ids: AccountIds) -> Select[Any]:
    """Rule 1: payments naming an open invoice of their account, in payment order per invoice."""
    unpaid = Invoice.total - Invoice.amount_paid
    ranked = (
        select(
            Payment.id.label("payment_id"),
            Payment.invoice_id.label("invoice_id"),
            Payment.unallocated.label("remaining"),
            unpaid.label("unpaid"),
            (
                func.sum(Payment.unallocated).over(
                    partition_by=Payment.invoice_id, order_by=(Payment.paid_on, Payment.id), rows=(None, 0)
                )
                - Payment.unallocated
            ).label("before"),
        )
        .join(Invoice, Invoice.id == Payment.invoice_id)
        .where(
            Payment.organization_id == organization_id,
            _account_scope(Payment.account_id, account_ids),
            Payment.unallocated > 0,
            Invoice.account_id == Payment.account_id,
            Invoice.status == InvoiceStatus.open.value,
            Invoice.total > Invoice.amount_paid,
        )
        .subquery()
    )
    room = ranked.c.unpaid - ranked.c.before
    return select(ranked.c.payment_id, ranked.c.invoice_id, _least(ranked.c.remaining, room), false()).where(
        ranked.c.before < ranked.c.unpaid
    )


def _fill_payment_intervals(session: Session, organization_id: int, account_ids: AccountIds) -> None:
    """Each payment's remaining credit as ``[p_start, p_end)`` on its account's line, in ``(paid_on, id)`` order."""
    p_end = func.sum(Payment.unallocated).over(
        partition_by=Payment.account_id, order_by=(Payment.paid_on, Payment.id), rows=(None, 0)
    )
    laid_out = (
        select(
            Payment.account_id.label("account_id"),
            Payment.id.label("payment_id"),
            Payment.unallocated.label("remaining"),
            p_end.label("p_end"),
        )
        .where(
            Payment.organization_id == organization_id,
            _account_scope(Payment.account_id, account_ids),
            Payment.unallocated > 0,
        )
        .subquery()
    )
    session.execute(
        insert(_pay).from_select(
            ["account_id", "payment_id", "p_start", "p_end"],
            select(laid_out.c.account_id, laid_out.c.payment_id, laid_out.c.p_end - laid_out.c.remaining, laid_out.c.p_end),
        )
    )
    if _dialect(session) == "postgresql":
        session.execute(text(f"ANALYZE {_pay.name}"))


def _oldest_first_batch(organization_id: int, account_ids: AccountIds) -> Select[Any]:
    """Rule 2: overlaps of the payments' and the invoices' running-sum intervals, per account."""
    unpaid = Invoice.total - Invoice.amount_paid
    inv = (
        select(
            Invoice.id.label("invoice_id"),
            Invoice.account_id.label("account_id"),
            unpaid.label("unpaid"),
            func.sum(unpaid)
            .over(
                partition_by=Invoice.account_id,
                order_by=(Invoice.due_date, Invoice.number, Invoice.id),
                rows=(None, 0),
            )
            .label("i_end"),
        )
        .where(
            Invoice.organization_id == organization_id,
            _account_scope(Invoice.account_id, account_ids),
            Invoice.status == InvoiceStatus.open.value,
            Invoice.disputed == false(),
            Invoice.total > Invoice.amount_paid,
        )
        .subquery()
    )
    i_start = inv.c.i_end - inv.c.unpaid
    overlap = _least(_pay.c.p_end, inv.c.i_end) - _greatest(_pay.c.p_start, i_start)
    return select(_pay.c.payment_id, inv.c.invoice_id, overlap, false()).select_from(
        inv.join(
            _pay,
            and_(_pay.c.account_id == inv.c.account_id, _pay.c.p_end > i_start, _pay.c.p_start < inv.c.i_end),
        )
    )


def allocate_payments(
    session: Session,
    *,
    organization_id: int,
    account_ids: AccountIds,
    now: datetime,
    refresh: bool = True,
) -> int:
    """Apply every payment's remaining credit in scope to invoices (rules in the module docstring).

    ``account_ids``: a list of ids, a ``SELECT`` of account ids (preferred for large sets: it stays in
    the database), or ``None`` for the whole organization. With ``refresh`` (the default) the
    accounts' derived values are recomputed afterwards (``derived.refresh_accounts``: balance,
    carrying invoice, resolution at zero balance, tab). Returns the number of allocations made.
    Never commits.
    """
    session.flush()
    _prepare_scratch(session)
    cols = ["payment_id", "invoice_id", "amount", "known_pair"]
    session.execute(insert(_tmp).from_select(cols, _explicit_batch(organization_id, account_ids)))
    created = _apply_batch(session, organization_id=organization_id, now=now)
    _fill_payment_intervals(session, organization_id, account_ids)
    session.execute(insert(_tmp).from_select(cols, _oldest_first_batch(organization_id, account_ids)))
    session.execute(delete(_pay))
    created += _apply_batch(session, organization_id=organization_id, now=now)
    if refresh:
        _refresh(session, organization_id=organization_id, account_ids=account_ids, now=now)
    else:
        session.expire_all()
    return created


def release_allocations(
    session: Session,
    *,
    organization_id: int,
    now: datetime,
    payment_ids: Sequence[int] | Select[Any] | None = None,
    invoice_ids: Sequence[int] | Select[Any] | None = None,
) -> None:
    """Undo the allocations of some payments or of some invoices: the invoices owe that money again
    (a ``paid`` invoice falls back to ``open``) and the payments get it back as credit.

    Used before deleting a payment, and before deleting or voiding an invoice (its payments become
    credit that ``allocate_payments`` can place elsewhere).
    """
    if (payment_ids is None) == (invoice_ids is None):
        raise ValueError("give exactly one of payment_ids and invoice_ids")
    session.flush()
    cond = [PaymentAllocation.organization_id == organization_id]
    if payment_ids is not None:
        cond.append(PaymentAllocation.payment_id.in_(payment_ids))
    if invoice_ids is not None:
        cond.append(PaymentAllocation.invoice_id.in_(invoice_ids))

    per_invoice = (
        select(PaymentAllocation.invoice_id, func.sum(PaymentAllocation.amount).label("amount"))
        .where(*cond)
        .group_by(PaymentAllocation.invoice_id)
        .subquery()
    )
    # amount_paid may have been lowered by hand since; never below zero.
    remaining = Invoice.amount_paid - per_invoice.c.amount
    new_paid = case((remaining < 0, literal(0, type_=Invoice.amount_paid.type)), else_=remaining)
    session.execute(
        update(Invoice)
        .where(Invoice.id == per_invoice.c.invoice_id)
        .values(
            amount_paid=new_paid,
            status=case(
                (
                    and_(Invoice.status == InvoiceStatus.paid.value, new_paid < Invoice.total),
                    literal(InvoiceStatus.open.value),
                ),
                else_=Invoice.status,
            ),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    per_payment = (
        select(PaymentAllocation.payment_id, func.sum(PaymentAllocation.amount).label("amount"))
        .where(*cond)
        .group_by(PaymentAllocation.payment_id)
        .subquery()
    )
    session.execute(
        update(Payment)
        .where(Payment.id == per_payment.c.payment_id)
        .values(unallocated=Payment.unallocated + per_payment.c.amount)
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(PaymentAllocation).where(*cond).execution_options(synchronize_session=False))
    session.expire_all()


def _refresh(session: Session, *, organization_id: int, account_ids: AccountIds, now: datetime) -> None:
    from duecourse.ledger.derived import refresh_accounts
    from duecourse.tenancy.service import get_settings

    refresh_accounts(
        session,
        organization_id=organization_id,
        exclusions=get_settings(session, organization_id).exclusions,
        now=now,
        account_ids=account_ids,
    )
