"""REST routes for accounts, invoices, payments and promises to pay (SPEC §2, §6). Thin: rules live in service.py."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.engine.outcomes import promise_cancelled, promise_made
from duecourse.ledger import service
from duecourse.ledger.models import Account, AccountStatus, CollectionTab, InvoiceStatus, PromiseStatus
from duecourse.ledger.schemas import (
    AccountIn,
    AccountOut,
    AccountPage,
    AccountPatch,
    BlockIn,
    ExecutionLogPage,
    InteractionPage,
    InvoiceIn,
    InvoiceOut,
    InvoicePage,
    InvoicePatch,
    PaymentIn,
    PaymentOut,
    PaymentPage,
    PromiseIn,
    PromiseOut,
    PromisePage,
    TabCounts,
)
from duecourse.pagination import PageParams
from duecourse.tenancy.principal import Permission, Principal

router = APIRouter()
ManageAccounts = requires(Permission.manage_accounts)
RecordPayments = requires(Permission.record_payments)
Page = Annotated[PageParams, Depends()]

# ---------------------------------------------------------------- accounts

accounts = APIRouter(tags=["accounts"])


@accounts.get("/accounts", response_model=AccountPage, summary="List accounts (filters, cursor pagination)")
def list_accounts(
    principal: Reader,
    session: DbSession,
    clock: AppClock,
    page: Page,
    external_id: Annotated[str | None, Query(description="Exact external id")] = None,
    status: AccountStatus | None = None,
    collection_tab: Annotated[CollectionTab | None, Query(description="One auto-collection tab's list (SPEC §6)")] = None,
    campaign_id: int | None = None,
    strategy_id: int | None = None,
    tag: str | None = None,
    blocked: bool | None = None,
    min_balance: Annotated[str | None, Query(description="Outstanding balance at least this amount")] = None,
    max_balance: Annotated[str | None, Query(description="Outstanding balance at most this amount")] = None,
    min_days_overdue: int | None = None,
    max_days_overdue: int | None = None,
    q: Annotated[str | None, Query(max_length=200, description="Substring of name, email or external id (any case)")] = None,
) -> Any:
    return service.list_accounts(
        session,
        organization_id=principal.organization_id,
        page=page,
        now=clock.now(),
        external_id=external_id,
        status=status,
        collection_tab=collection_tab,
        campaign_id=campaign_id,
        strategy_id=strategy_id,
        tag=tag,
        blocked=blocked,
        min_balance=min_balance,
        max_balance=max_balance,
        min_days_overdue=min_days_overdue,
        max_days_overdue=max_days_overdue,
        q=q,
    )


@accounts.post("/accounts", response_model=AccountOut, status_code=201, summary="Create an account")
def create_account(
    body: AccountIn, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts
) -> Any:
    account = service.create_account(session, organization_id=principal.organization_id, data=body, now=clock.now())
    return service.account_view(session, account, now=clock.now())


@accounts.get("/accounts/{account_id}", response_model=AccountOut)
def get_account(account_id: int, principal: Reader, session: DbSession, clock: AppClock) -> Any:
    account = service.get_account(session, organization_id=principal.organization_id, account_id=account_id)
    return service.account_view(session, account, now=clock.now())


@accounts.patch("/accounts/{account_id}", response_model=AccountOut, summary="Change an account (partial)")
def patch_account(
    account_id: int, body: AccountPatch, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts
) -> Any:
    account = service.update_account(
        session,
        organization_id=principal.organization_id,
        account_id=account_id,
        changes=body.model_dump(exclude_unset=True),
        now=clock.now(),
    )
    return service.account_view(session, account, now=clock.now())


@accounts.delete("/accounts/{account_id}", status_code=204, summary="Delete an account with its invoices and payments")
def delete_account(account_id: int, session: DbSession, principal: Principal = ManageAccounts) -> Response:
    service.delete_account(session, organization_id=principal.organization_id, account_id=account_id)
    return Response(status_code=204)


@accounts.post("/accounts/{account_id}/block", response_model=AccountOut, summary="Block an account (reason required)")
def block_account(
    account_id: int, body: BlockIn, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts
) -> Any:
    account = service.block_account(
        session, organization_id=principal.organization_id, account_id=account_id, reason=body.reason, now=clock.now()
    )
    return service.account_view(session, account, now=clock.now())


@accounts.post("/accounts/{account_id}/unblock", response_model=AccountOut, summary="Unblock an account")
def unblock_account(account_id: int, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Any:
    account = service.unblock_account(
        session, organization_id=principal.organization_id, account_id=account_id, now=clock.now()
    )
    return service.account_view(session, account, now=clock.now())


@accounts.get(
    "/accounts/{account_id}/execution-log", response_model=ExecutionLogPage, summary="The account's execution log, newest first"
)
def account_execution_log(account_id: int, principal: Reader, session: DbSession, page: Page) -> Any:
    return service.list_execution_log(
        session, organization_id=principal.organization_id, account_id=account_id, page=page
    )


@accounts.get(
    "/accounts/{account_id}/interactions", response_model=InteractionPage, summary="The account's interactions, newest first"
)
def account_interactions(account_id: int, principal: Reader, session: DbSession, page: Page) -> Any:
    return service.list_interactions(session, organization_id=principal.organization_id, account_id=account_id, page=page)


@accounts.get("/auto-collection/tabs", response_model=TabCounts, summary="Accounts per auto-collection tab (SPEC §6)")
def auto_collection_tabs(principal: Reader, session: DbSession) -> Any:
    return service.tab_counts(session, organization_id=principal.organization_id)


# ---------------------------------------------------------------- invoices

invoices = APIRouter(tags=["invoices"])


@invoices.get("/invoices", response_model=InvoicePage, summary="List invoices (filters, cursor pagination)")
def list_invoices(
    principal: Reader,
    session: DbSession,
    page: Page,
    account_id: int | None = None,
    status: InvoiceStatus | None = None,
    disputed: bool | None = None,
    due_before: Annotated[date | None, Query(description="Due strictly before this date")] = None,
    due_after: Annotated[date | None, Query(description="Due strictly after this date")] = None,
    q: Annotated[str | None, Query(max_length=100, description="Substring of the invoice number (any case)")] = None,
) -> Any:
    return service.list_invoices(
        session,
        organization_id=principal.organization_id,
        page=page,
        account_id=account_id,
        status=status,
        disputed=disputed,
        due_before=due_before,
        due_after=due_after,
        q=q,
    )


@invoices.post("/invoices", response_model=InvoiceOut, status_code=201, summary="Create an invoice")
def create_invoice(body: InvoiceIn, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Any:
    invoice = service.create_invoice(session, organization_id=principal.organization_id, data=body, now=clock.now())
    return service.invoice_view(invoice)


@invoices.get("/invoices/{invoice_id}", response_model=InvoiceOut)
def get_invoice(invoice_id: int, principal: Reader, session: DbSession) -> Any:
    return service.invoice_view(
        service.get_invoice(session, organization_id=principal.organization_id, invoice_id=invoice_id)
    )


@invoices.patch("/invoices/{invoice_id}", response_model=InvoiceOut, summary="Change an invoice (partial; status void voids it)")
def patch_invoice(
    invoice_id: int, body: InvoicePatch, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts
) -> Any:
    invoice = service.update_invoice(
        session,
        organization_id=principal.organization_id,
        invoice_id=invoice_id,
        changes=body.model_dump(exclude_unset=True),
        now=clock.now(),
    )
    return service.invoice_view(invoice)


@invoices.delete("/invoices/{invoice_id}", status_code=204, summary="Delete an invoice (its payments become credit)")
def delete_invoice(invoice_id: int, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Response:
    service.delete_invoice(session, organization_id=principal.organization_id, invoice_id=invoice_id, now=clock.now())
    return Response(status_code=204)


@invoices.post("/invoices/{invoice_id}/dispute", response_model=InvoiceOut, summary="Mark an invoice disputed")
def dispute_invoice(invoice_id: int, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Any:
    invoice = service.set_invoice_disputed(
        session, organization_id=principal.organization_id, invoice_id=invoice_id, disputed=True, now=clock.now()
    )
    return service.invoice_view(invoice)


@invoices.post("/invoices/{invoice_id}/undispute", response_model=InvoiceOut, summary="Clear an invoice's dispute")
def undispute_invoice(invoice_id: int, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Any:
    invoice = service.set_invoice_disputed(
        session, organization_id=principal.organization_id, invoice_id=invoice_id, disputed=False, now=clock.now()
    )
    return service.invoice_view(invoice)


# ---------------------------------------------------------------- payments

payments = APIRouter(tags=["payments"])


@payments.get("/payments", response_model=PaymentPage, summary="List payments (filters, cursor pagination)")
def list_payments(
    principal: Reader,
    session: DbSession,
    page: Page,
    account_id: int | None = None,
    since: Annotated[date | None, Query(description="Paid on or after this date")] = None,
    until: Annotated[date | None, Query(description="Paid on or before this date")] = None,
) -> Any:
    return service.list_payments(
        session, organization_id=principal.organization_id, page=page, account_id=account_id, since=since, until=until
    )


@payments.post("/payments", response_model=PaymentOut, status_code=201, summary="Record a payment (allocated at once)")
def create_payment(body: PaymentIn, session: DbSession, clock: AppClock, principal: Principal = RecordPayments) -> Any:
    payment = service.create_payment(session, organization_id=principal.organization_id, data=body, now=clock.now())
    return service.payment_views(session, [payment])[0]


@payments.get("/payments/{payment_id}", response_model=PaymentOut)
def get_payment(payment_id: int, principal: Reader, session: DbSession) -> Any:
    payment = service.get_payment(session, organization_id=principal.organization_id, payment_id=payment_id)
    return service.payment_views(session, [payment])[0]


@payments.delete("/payments/{payment_id}", status_code=204, summary="Delete a payment (reverses its allocations; managers)")
def delete_payment(payment_id: int, session: DbSession, clock: AppClock, principal: Principal = ManageAccounts) -> Response:
    # Not agents (SPEC §1: they record payments): deleting one reopens the debt it paid, and the
    # engine would resume dunning a debtor who has paid.
    service.delete_payment(session, organization_id=principal.organization_id, payment_id=payment_id, now=clock.now())
    return Response(status_code=204)


# ---------------------------------------------------------------- promises

promises = APIRouter(tags=["promises"])


@promises.get("/promises", response_model=PromisePage, summary="List promises to pay")
def list_promises(
    principal: Reader,
    session: DbSession,
    page: Page,
    account_id: int | None = None,
    status: PromiseStatus | None = None,
) -> Any:
    return service.list_promises(
        session, organization_id=principal.organization_id, page=page, account_id=account_id, status=status
    )


@promises.post("/promises", response_model=PromiseOut, status_code=201, summary="Record a promise to pay")
def create_promise(body: PromiseIn, session: DbSession, clock: AppClock, principal: Principal = RecordPayments) -> Any:
    promise = service.create_promise(
        session,
        organization_id=principal.organization_id,
        data=body,
        now=clock.now(),
        created_by_user_id=principal.user_id,
    )
    account = session.get(Account, promise.account_id)
    promise_made(session, account=account, promise=promise, now=clock.now())  # §4.8: contact holds
    return service.promise_view(promise)


@promises.get("/promises/{promise_id}", response_model=PromiseOut)
def get_promise(promise_id: int, principal: Reader, session: DbSession) -> Any:
    return service.promise_view(
        service.get_promise(session, organization_id=principal.organization_id, promise_id=promise_id)
    )


@promises.post("/promises/{promise_id}/cancel", response_model=PromiseOut, summary="Cancel a pending promise")
def cancel_promise(promise_id: int, session: DbSession, clock: AppClock, principal: Principal = RecordPayments) -> Any:
    promise = service.cancel_promise(
        session, organization_id=principal.organization_id, promise_id=promise_id, now=clock.now()
    )
    promise_cancelled(session, account=session.get(Account, promise.account_id), promise=promise, now=clock.now())
    return service.promise_view(promise)


for _sub in (accounts, invoices, payments, promises):
    router.include_router(_sub)
