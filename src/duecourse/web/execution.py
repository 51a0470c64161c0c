"""The Execution page (SPEC §8, seed 000): KPIs, the queue table, Pause/Resume, Enqueue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import select

from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.engine.enqueue import enqueue
from duecourse.engine import kpis
from duecourse.engine.kpis import engine_kpis
from duecourse.engine.models import QueueItem, QueueStatus
from duecourse.errors import ValidationFailed
from duecourse.ledger.models import Account
from duecourse.pagination import PageParams, paginate
from duecourse.strategies.models import Strategy
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.service import update_settings
from duecourse.web.charts import daily_lines
from duecourse.web.core import CsrfForm, PageRoute, Web, WebPage, page_requires, query_url

router = APIRouter(route_class=PageRoute)
EngineOperator = Annotated[Web, page_requires(Permission.operate_engine)]
PAGE_SIZE = 25


def _int_or_none(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValidationFailed.on(name, "must be a number") from None


def _live_context(web: Web, status: str | None, campaign: str | None, cursor: str | None) -> dict[str, Any]:
    """KPIs and one page of the queue (newest first), with the names the table shows."""
    org_id = web.principal.organization_id
    status_filter = status if status in {s.value for s in QueueStatus} else None
    campaign_id = _int_or_none(campaign, "campaign")
    stmt = scoped(QueueItem, org_id)
    if status_filter:
        stmt = stmt.where(QueueItem.status == status_filter)
    if campaign_id is not None:
        stmt = stmt.where(QueueItem.campaign_id == campaign_id)
    page = paginate(web.session, stmt, QueueItem.id, PageParams(limit=PAGE_SIZE, cursor=cursor), lambda q: q,
                    descending=True)
    items: list[QueueItem] = page["items"]
    names = _names(web, items)
    return {
        "kpis": engine_kpis(web.session, organization_id=org_id, now=web.now()),
        "items": items,
        "names": names,
        "status": status_filter or "",
        "campaign": campaign_id or "",
        "statuses": [s.value for s in QueueStatus],
        "next_url": query_url("/execution", status=status_filter, campaign=campaign_id, cursor=page["next_cursor"])
        if page["next_cursor"] else None,
        "first_url": query_url("/execution", status=status_filter, campaign=campaign_id) if cursor else None,
        "live_url": query_url("/execution/live", status=status_filter, campaign=campaign_id, cursor=cursor),
    }


def _names(web: Web, items: list[QueueItem]) -> dict[str, dict[int, Any]]:
    """Account, strategy and campaign names of one page of items: three small lookups."""
    org_id = web.principal.organization_id

    def lookup(model: Any, ids: set[int], *cols: Any) -> dict[int, Any]:
        if not ids:
            return {}
        rows = web.session.execute(
            select(model.id, *cols).where(model.organization_id == org_id, model.id.in_(ids))
        ).all()
        return {r[0]: (r[1:] if len(cols) > 1 else r[1]) for r in rows}

    return {
        "accounts": lookup(Account, {i.account_id for i in items}, Account.name, Account.external_id),
        "strategies": lookup(Strategy, {i.strategy_id for i in items if i.strategy_id}, Strategy.name),
        "campaigns": lookup(Campaign, {i.campaign_id for i in items if i.campaign_id}, Campaign.name),
    }


@router.get("/execution")
def execution_page(
    web: WebPage,
    status: str | None = Query(None),
    campaign: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    campaigns = web.session.scalars(
        scoped(Campaign, web.principal.organization_id).order_by(Campaign.name)
    ).all()
    daily = kpis.daily_outcomes(web.session, organization_id=web.principal.organization_id, now=web.now())
    return web.render(
        "execution/page.html",
        active="execution",
        daily_chart=daily_lines(daily["days"]),
        campaigns=campaigns,
        enqueueable=[c for c in campaigns if c.status == CampaignStatus.active],
        **_live_context(web, status, campaign, cursor),
    )


@router.get("/execution/live")
def execution_live(
    web: WebPage,
    status: str | None = Query(None),
    campaign: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    """The auto-refreshed part of the page: KPIs, engine state and the queue table."""
    return web.render("execution/_live.html", **_live_context(web, status, campaign, cursor))


def _set_paused(web: Web, paused: bool) -> None:
    update_settings(web.session, principal=web.principal, patch={"automation": {"engine_paused": paused}}, now=web.now())


@router.post("/execution/pause")
def pause(form: CsrfForm, web: EngineOperator) -> Response:
    _set_paused(web, True)
    return web.redirect("/execution", "Automation paused: nothing is dispatched; pending items stay pending.", "info")


@router.post("/execution/resume")
def resume(form: CsrfForm, web: EngineOperator) -> Response:
    _set_paused(web, False)
    return web.redirect("/execution", "Automation resumed.")


@router.post("/execution/enqueue")
def enqueue_now(form: CsrfForm, web: EngineOperator) -> Response:
    campaign_id = _int_or_none(str(form.get("campaign_id") or ""), "campaign_id")
    label = "all eligible accounts"
    if campaign_id is not None:
        label = "campaign " + repr(get_owned(web.session, Campaign, campaign_id, web.principal.organization_id,
                                             "Campaign").name)
    result = enqueue(web.session, organization_id=web.principal.organization_id, now=web.now(),
                     campaign_id=campaign_id, cause="manual_enqueue")
    if result.paused:
        return web.redirect("/execution", "Automation is paused: nothing was enqueued. Resume it first.", "error")
    return web.redirect(
        "/execution",
        f"Enqueued {label}: {result.enqueued} item{'s' if result.enqueued != 1 else ''} added"
        f" ({result.assigned} newly assigned, {result.skipped} skipped).",
    )
