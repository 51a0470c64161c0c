"""The Auto Collection screen (SPEC §6, seed 003): the five tabs with their counts and accounts,
Pause/Resume Automation (the organization-wide engine pause of §4.7), Block and Unblock.

Accounts move between tabs only through the engine and the rules (:mod:`duecourse.ledger.derived`);
a person can only block or unblock one (:func:`duecourse.ledger.service.block_account`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from duecourse.errors import ValidationFailed
from duecourse.ledger import service as ledger
from duecourse.ledger.models import CollectionTab
from duecourse.ledger.schemas import BlockIn
from duecourse.pagination import PageParams
from duecourse.strategies.models import Strategy
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.scope import scoped
from duecourse.tenancy.service import get_settings, update_settings
from duecourse.web.core import CsrfForm, PageRoute, Web, WebPage, field_errors, page_requires, pydantic_errors, query_url

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 25
BASE = "/auto-collection"

TABS = (
    (CollectionTab.outstanding.value, "Outstanding",
     "Balance outstanding, not blocked, and no strategy: they don't meet any strategy's rules yet."),
    (CollectionTab.scheduled.value, "Scheduled",
     "Assigned to a strategy; nothing dispatched yet. Messages go out automatically."),
    (CollectionTab.engaged.value, "Engaged",
     "Receiving automated reminders and follow-ups, or waiting on a callback or a promise."),
    (CollectionTab.follow_up.value, "Follow-Up",
     "Every stage ran and the balance is still unpaid: review them or pass them to a collection agency."),
    (CollectionTab.blocked.value, "Blocked",
     "Excluded from automated outreach, by hand or by an exclusion rule."),
)
TAB_KEYS = {t for t, _label, _help in TABS}


def _tab(value: str | None) -> str:
    return value if value in TAB_KEYS else CollectionTab.outstanding.value


def _back(form: FormData) -> str:
    value = form.get("return_to")
    if isinstance(value, str) and value.startswith(BASE) and not value.startswith("//"):
        return value
    return BASE


def _render(
    web: Web,
    tab: str,
    cursor: str | None,
    *,
    block_errors: dict[int, str] | None = None,
    block_values: dict[int, str] | None = None,
    status_code: int = 200,
) -> Response:
    org_id = web.principal.organization_id
    page = ledger.list_accounts(
        web.session, organization_id=org_id, page=PageParams(limit=PAGE_SIZE, cursor=cursor), now=web.now(),
        collection_tab=CollectionTab(tab),
    )
    accounts: list[dict[str, Any]] = page["items"]
    strategy_ids = {a["strategy_id"] for a in accounts if a["strategy_id"]}
    strategies = (
        dict(web.session.execute(
            scoped(Strategy, org_id, Strategy.id, Strategy.name).where(Strategy.id.in_(strategy_ids))
        ).all())
        if strategy_ids else {}
    )
    return web.render(
        "auto_collection/page.html",
        status_code=status_code,
        active="auto_collection",
        tabs=TABS,
        tab=tab,
        tab_help={t: h for t, _label, h in TABS}[tab],
        counts=ledger.tab_counts(web.session, organization_id=org_id),
        accounts=accounts,
        strategies=strategies,
        engine_paused=get_settings(web.session, org_id).automation.engine_paused,
        next_url=query_url(BASE, tab=tab, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=query_url(BASE, tab=tab) if cursor else None,
        return_to=query_url(BASE, tab=tab, cursor=cursor),
        block_errors=block_errors or {},
        block_values=block_values or {},
    )


@router.get("/auto-collection")
def auto_collection_page(web: WebPage, tab: str | None = Query(None), cursor: str | None = Query(None)) -> Response:
    return _render(web, _tab(tab), cursor)


def _set_paused(web: Web, paused: bool) -> None:
    update_settings(web.session, principal=web.principal, patch={"automation": {"engine_paused": paused}}, now=web.now())


@router.post("/auto-collection/pause")
def pause(form: CsrfForm, web: Web = page_requires(Permission.operate_engine)) -> Response:
    _set_paused(web, True)
    return web.redirect(_back(form), "Automation paused: no messages are sent until it is resumed.", "info")


@router.post("/auto-collection/resume")
def resume(form: CsrfForm, web: Web = page_requires(Permission.operate_engine)) -> Response:
    _set_paused(web, False)
    return web.redirect(_back(form), "Automation resumed.")


@router.post("/auto-collection/accounts/{account_id}/block")
def block(account_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_accounts)) -> Response:
    raw = form.get("reason")
    reason = raw.strip() if isinstance(raw, str) else ""
    back = _back(form)
    try:
        try:
            body = BlockIn.model_validate({"reason": reason})
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        account = ledger.block_account(web.session, organization_id=web.principal.organization_id,
                                       account_id=account_id, reason=body.reason, now=web.now())
    except ValidationFailed as exc:
        web.session.rollback()
        errors = field_errors(exc)
        message = errors.get("reason") or next(iter(errors.values()))
        query = parse_qs(urlsplit(back).query)
        return _render(
            web, _tab((query.get("tab") or [None])[0]), (query.get("cursor") or [None])[0],
            block_errors={account_id: f"Reason {message}" if message == "is required" else message},
            block_values={account_id: reason}, status_code=422,
        )
    return web.redirect(back, f"{account.name} blocked: it moved to the Blocked tab.")


@router.post("/auto-collection/accounts/{account_id}/unblock")
def unblock(account_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_accounts)) -> Response:
    account = ledger.unblock_account(web.session, organization_id=web.principal.organization_id,
                                     account_id=account_id, now=web.now())
    web.session.refresh(account)  # the tab is recomputed set-based
    tab = account.collection_tab.value if account.collection_tab else None
    where = f" It is now in {dict((t, label) for t, label, _h in TABS)[tab]}." if tab else ""
    return web.redirect(_back(form), f"{account.name} unblocked.{where}")
