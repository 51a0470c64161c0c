"""The Accounts pages (SPEC §2, §4.8, §4.9, §8): the searchable list and the account detail.

The detail shows the account's header (status, tab, balance, contacts with opt-outs and invalid
flags), its invoices with the carrying one marked, payments, promises, interactions, open agent
tasks and the *Strategy Execution* card (the execution log, newest first). Allowed roles record a
payment and block or unblock the account. Every rule lives in :mod:`duecourse.ledger.service`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select

from duecourse.campaigns.models import Campaign
from duecourse.engine.models import Task, TaskStatus
from duecourse.errors import Conflict, ValidationFailed
from duecourse.ledger import service
from duecourse.ledger.models import AccountStatus, CollectionTab
from duecourse.ledger.schemas import BlockIn, PaymentIn
from duecourse.pagination import PageParams
from duecourse.strategies.models import Strategy
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.scope import scoped
from duecourse.web.core import (
    CsrfForm,
    PageRoute,
    Web,
    WebPage,
    field_errors,
    page_requires,
    pydantic_errors,
    query_url,
)

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 25
LOG_PAGE_SIZE = 20
INTERACTIONS_PAGE_SIZE = 10
PAYMENT_FIELDS = ("amount", "paid_on", "reference")
BLOCK_FIELDS = ("reason",)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None


def _enum_or_none(enum: Any, value: str | None) -> Any:
    return enum(value) if value in {e.value for e in enum} else None


def _names(web: Web, model: Any, ids: set[int]) -> dict[int, str]:
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    rows = web.session.execute(
        select(model.id, model.name).where(model.organization_id == web.principal.organization_id, model.id.in_(ids))
    ).all()
    return {r[0]: r[1] for r in rows}


def _form_errors(exc: ValidationFailed | Conflict, fields: tuple[str, ...]) -> dict[str, str]:
    """The error map of one form: fields it does not show go to the banner at its top."""
    errors = field_errors(exc)
    out = {k: v for k, v in errors.items() if k in fields}
    other = [f"{k}: {v}" if k else v for k, v in errors.items() if k not in fields]
    if other:
        out[""] = "; ".join(other)
    return out


# ---------------------------------------------------------------- list


@router.get("/accounts")
def accounts_page(
    web: WebPage,
    q: str | None = Query(None),
    tab: str | None = Query(None),
    status: str | None = Query(None),
    strategy: str | None = Query(None),
    campaign: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    org_id = web.principal.organization_id
    filters = {
        "q": (q or "").strip()[:200],
        "tab": _enum_or_none(CollectionTab, tab),
        "status": _enum_or_none(AccountStatus, status),
        "strategy": _int_or_none(strategy),
        "campaign": _int_or_none(campaign),
    }
    page = service.list_accounts(
        web.session,
        organization_id=org_id,
        page=PageParams(limit=PAGE_SIZE, cursor=cursor),
        now=web.now(),
        status=filters["status"],
        collection_tab=filters["tab"],
        campaign_id=filters["campaign"],
        strategy_id=filters["strategy"],
        q=filters["q"] or None,
    )
    items = page["items"]
    strategies = web.session.scalars(scoped(Strategy, org_id).order_by(Strategy.name)).all()
    campaigns = web.session.scalars(scoped(Campaign, org_id).order_by(Campaign.name)).all()
    params = {k: (v.value if hasattr(v, "value") else v) for k, v in filters.items()}
    return web.render(
        "accounts/list.html",
        active="accounts",
        items=items,
        filters=params,
        tabs=[t.value for t in CollectionTab],
        statuses=[s.value for s in AccountStatus],
        strategies=strategies,
        campaigns=campaigns,
        strategy_names={s.id: s.name for s in strategies},
        next_url=query_url("/accounts", **params, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=query_url("/accounts", **params) if cursor else None,
    )


# ---------------------------------------------------------------- detail


def _detail_context(web: Web, account_id: int, log_cursor: str | None, int_cursor: str | None) -> dict[str, Any]:
    org_id = web.principal.organization_id
    account = service.get_account(web.session, organization_id=org_id, account_id=account_id)
    view = service.account_view(web.session, account, now=web.now())
    invoices = service.list_invoices(
        web.session, organization_id=org_id, page=PageParams(limit=200, cursor=None), account_id=account.id
    )["items"]
    invoices.sort(key=lambda i: (i["due_date"], i["number"]))
    payments = service.list_payments(
        web.session, organization_id=org_id, page=PageParams(limit=200, cursor=None), account_id=account.id
    )["items"]
    payments.reverse()  # newest first
    promises = service.list_promises(
        web.session, organization_id=org_id, page=PageParams(limit=200, cursor=None), account_id=account.id
    )["items"]
    promises.reverse()
    interactions = service.list_interactions(
        web.session, organization_id=org_id, account_id=account.id,
        page=PageParams(limit=INTERACTIONS_PAGE_SIZE, cursor=int_cursor),
    )
    log = service.list_execution_log(
        web.session, organization_id=org_id, account_id=account.id, page=PageParams(limit=LOG_PAGE_SIZE, cursor=log_cursor)
    )
    tasks = web.session.scalars(
        scoped(Task, org_id).where(Task.account_id == account.id, Task.status == TaskStatus.open).order_by(Task.id)
    ).all()
    base = f"/accounts/{account.id}"
    carrying = next((i for i in invoices if i["id"] == view["carrying_invoice_id"]), None)
    return {
        "account": view,
        "invoices": invoices,
        "carrying": carrying,
        "payments": payments,
        "promises": promises,
        "interactions": interactions["items"],
        "int_next_url": query_url(base, log_cursor=log_cursor, int_cursor=interactions["next_cursor"]) + "#interactions"
        if interactions["next_cursor"] else None,
        "int_first_url": query_url(base, log_cursor=log_cursor) + "#interactions" if int_cursor else None,
        "log": log["items"],
        "log_next_url": query_url(base, int_cursor=int_cursor, log_cursor=log["next_cursor"]) + "#execution"
        if log["next_cursor"] else None,
        "log_first_url": query_url(base, int_cursor=int_cursor) + "#execution" if log_cursor else None,
        "tasks": tasks,
        "strategy_name": _names(web, Strategy, {view["strategy_id"]}).get(view["strategy_id"]),
        "campaign_name": _names(web, Campaign, {view["campaign_id"]}).get(view["campaign_id"]),
        "today": service.local_today(view["timezone"], web.now()).isoformat(),
        "payment_values": {},
        "payment_errors": {},
        "block_values": {},
        "block_errors": {},
    }


@router.get("/accounts/{account_id}")
def account_page(
    account_id: int,
    web: WebPage,
    log_cursor: str | None = Query(None),
    int_cursor: str | None = Query(None),
) -> Response:
    return web.render("accounts/detail.html", active="accounts", **_detail_context(web, account_id, log_cursor, int_cursor))


def _rerender(web: Web, account_id: int, **extra: Any) -> Response:
    """The detail page again (status 422) after a refused form: the request's changes are dropped."""
    web.session.rollback()
    ctx = _detail_context(web, account_id, None, None)
    ctx.update(extra)
    return web.render("accounts/detail.html", status_code=422, active="accounts", **ctx)


def _text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


@router.post("/accounts/{account_id}/payments")
def record_payment(account_id: int, form: CsrfForm, web: Web = page_requires(Permission.record_payments)) -> Response:
    org_id = web.principal.organization_id
    account = service.get_account(web.session, organization_id=org_id, account_id=account_id)
    values = {name: _text(form, name) for name in PAYMENT_FIELDS}
    try:
        try:
            body = PaymentIn(
                account_id=account.id,
                amount=values["amount"] or None,
                paid_on=values["paid_on"] or None,
                reference=values["reference"] or None,
                source="agent",
            )
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        payment = service.create_payment(web.session, organization_id=org_id, data=body, now=web.now())
    except (ValidationFailed, Conflict) as exc:
        return _rerender(web, account_id, payment_values=values, payment_errors=_form_errors(exc, PAYMENT_FIELDS))
    amount = service.format_money(payment.amount, payment.currency)
    return web.redirect(f"/accounts/{account.id}", f"Payment of {amount} {payment.currency} recorded.")


@router.post("/accounts/{account_id}/block")
def block(account_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_accounts)) -> Response:
    values = {"reason": _text(form, "reason")}
    try:
        try:
            body = BlockIn(reason=values["reason"])
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        service.block_account(
            web.session, organization_id=web.principal.organization_id, account_id=account_id, reason=body.reason,
            now=web.now(),
        )
    except ValidationFailed as exc:
        errors = _form_errors(exc, BLOCK_FIELDS)
        if "blocked_reason" in field_errors(exc):
            errors["reason"] = field_errors(exc)["blocked_reason"]
            errors.pop("", None)
        return _rerender(web, account_id, block_values=values, block_errors=errors)
    return web.redirect(f"/accounts/{account_id}", "Account blocked: nothing will be sent to it.", "info")


@router.post("/accounts/{account_id}/unblock")
def unblock(account_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_accounts)) -> Response:
    service.unblock_account(web.session, organization_id=web.principal.organization_id, account_id=account_id,
                            now=web.now())
    return web.redirect(f"/accounts/{account_id}", "Account unblocked.")
