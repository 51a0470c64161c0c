"""The Campaigns screens (SPEC §5, seed 001): the list, the create and edit forms, and the detail page
(status badge, lifecycle buttons, progress bar, KPI cards, the accounts table, Enqueue, membership).

Every rule lives in :mod:`duecourse.campaigns.service` (which transitions are allowed, what pausing
cancels, what the KPIs count, who may join) and :func:`duecourse.engine.enqueue.enqueue`; this module
turns form fields into the service's inputs and its errors into messages beside the fields.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from duecourse.campaigns import service
from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.campaigns.schemas import CampaignIn, MembershipAdd
from duecourse.engine.enqueue import enqueue
from duecourse.errors import Conflict, ValidationFailed
from duecourse.ledger.models import Account, AccountStatus, CollectionTab
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
LIST_SIZE = 20
MEMBERS_SIZE = 25
FORM_KEYS = ("name", "objective", "strategy_id", "start_date", "end_date")
FILTER_KEYS = ("collection_tab", "status", "tag", "min_balance", "max_balance", "min_days_overdue")
MAX_PASTED_IDS = 10_000

# Lifecycle buttons: (action, label, service transition, button class). "Resume" is the
# paused -> active transition; each is shown only when the service's TRANSITIONS allow it.
LIFECYCLE = (
    ("activate", "Activate", "activate", "btn-success"),
    ("resume", "Resume", "activate", "btn-success"),
    ("pause", "Pause", "pause", "btn-warning"),
    ("complete", "Complete", "complete", ""),
)
DONE = {"activate": "Campaign activated.", "resume": "Campaign resumed.",
        "pause": "Campaign paused: its pending queue items were cancelled.", "complete": "Campaign completed."}


def lifecycle_actions(status: CampaignStatus) -> list[tuple[str, str, str]]:
    """The buttons a campaign in ``status`` shows: (action, label, css class)."""
    out = []
    for action, label, transition, css in LIFECYCLE:
        allowed, _target = service.TRANSITIONS[transition]
        if status not in allowed:
            continue
        if action == "activate" and status == CampaignStatus.paused:
            continue  # from paused the same transition is called Resume
        if action == "resume" and status != CampaignStatus.paused:
            continue
        out.append((action, label, css))
    return out


def _strategy_options(web: Web) -> list[tuple[str, str]]:
    rows = web.session.execute(
        scoped(Strategy, web.principal.organization_id, Strategy.id, Strategy.name, Strategy.active)
        .order_by(Strategy.name)
    ).all()
    return [("", "— No strategy yet —")] + [(str(i), name + ("" if active else " (inactive)")) for i, name, active in rows]


def _strategy_names(web: Web, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(
        web.session.execute(
            scoped(Strategy, web.principal.organization_id, Strategy.id, Strategy.name).where(Strategy.id.in_(ids))
        ).all()
    )


def _text(form: FormData, key: str) -> str:
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


# --- list ----------------------------------------------------------------------------------------


@router.get("/campaigns")
def campaign_list(
    web: WebPage,
    q: str | None = Query(None, max_length=200),
    status: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    org_id = web.principal.organization_id
    status_filter = status if status in {s.value for s in CampaignStatus} else None
    page = service.list_campaigns(
        web.session, organization_id=org_id, params=PageParams(limit=LIST_SIZE, cursor=cursor),
        status=status_filter, search=q,
    )
    kpis = service.kpis_for(web.session, organization_id=org_id, campaign_ids=[c.id for c in page["items"]])
    rows = [{"c": c, "kpis": kpis[c.id]} for c in page["items"]]
    filters = {"q": q or "", "status": status_filter or ""}
    return web.render(
        "campaigns/list.html",
        active="campaigns",
        rows=rows,
        strategies=_strategy_names(web, {c.strategy_id for c in page["items"] if c.strategy_id}),
        statuses=[s.value for s in CampaignStatus],
        filters=filters,
        next_url=query_url("/campaigns", **filters, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=query_url("/campaigns", **filters) if cursor else None,
    )


# --- create and edit -----------------------------------------------------------------------------


def _form_values(form: FormData) -> dict[str, str]:
    return {k: _text(form, k) for k in FORM_KEYS}


def _campaign_in(values: dict[str, str]) -> CampaignIn:
    """The typed strings as the API's body; pydantic errors come back with the API's field paths."""
    data: dict[str, Any] = {
        "name": values["name"],
        "objective": values["objective"],
        "strategy_id": None,
        "start_date": values["start_date"] or None,
        "end_date": values["end_date"] or None,
    }
    if values["strategy_id"]:
        data["strategy_id"] = int(values["strategy_id"]) if values["strategy_id"].isdigit() else values["strategy_id"]
    try:
        return CampaignIn.model_validate(data)
    except ValidationError as exc:
        raise pydantic_errors(exc) from None


def _render_form(web: Web, campaign: Campaign | None, values: dict[str, str], errors: dict[str, str],
                 status_code: int = 200) -> Response:
    return web.render(
        "campaigns/form.html",
        status_code=status_code,
        active="campaigns",
        campaign=campaign,
        values=values,
        errors=errors,
        strategy_options=_strategy_options(web),
    )


@router.get("/campaigns/new")
def new_campaign(web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    return _render_form(web, None, {k: "" for k in FORM_KEYS}, {})


@router.post("/campaigns/new")
def create_campaign(form: CsrfForm, web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    values = _form_values(form)
    try:
        campaign = service.create_campaign(web.session, principal=web.principal, data=_campaign_in(values),
                                           now=web.now())
    except (ValidationFailed, Conflict) as exc:
        return _render_form(web, None, values, field_errors(exc), status_code=exc.status_code)
    return web.redirect(f"/campaigns/{campaign.id}", f"Campaign {campaign.name!r} created as a draft.")


def _get(web: Web, campaign_id: int) -> Campaign:
    return service.get_campaign(web.session, organization_id=web.principal.organization_id, campaign_id=campaign_id)


@router.get("/campaigns/{campaign_id}/edit")
def edit_campaign(campaign_id: int, web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    c = _get(web, campaign_id)
    values = {
        "name": c.name, "objective": c.objective or "", "strategy_id": str(c.strategy_id or ""),
        "start_date": c.start_date.isoformat() if c.start_date else "",
        "end_date": c.end_date.isoformat() if c.end_date else "",
    }
    return _render_form(web, c, values, {})


@router.post("/campaigns/{campaign_id}/edit")
def save_campaign(campaign_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    c = _get(web, campaign_id)
    values = _form_values(form)
    try:
        data = _campaign_in(values)
        service.update_campaign(web.session, principal=web.principal, campaign_id=c.id, values=data.model_dump(),
                                now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        return _render_form(web, _get(web, campaign_id), values, field_errors(exc), status_code=exc.status_code)
    return web.redirect(f"/campaigns/{c.id}", "Campaign saved.")


# --- detail --------------------------------------------------------------------------------------


def _render_detail(
    web: Web,
    campaign_id: int,
    cursor: str | None = None,
    add_values: dict[str, Any] | None = None,
    add_errors: dict[str, str] | None = None,
    add_mode: str = "ids",
    status_code: int = 200,
) -> Response:
    org_id = web.principal.organization_id
    c = _get(web, campaign_id)
    kpis = service.kpis(web.session, organization_id=org_id, campaign_id=c.id)
    members = service.list_members(web.session, organization_id=org_id, campaign_id=c.id,
                                   params=PageParams(limit=MEMBERS_SIZE, cursor=cursor))
    base = f"/campaigns/{c.id}"
    return web.render(
        "campaigns/detail.html",
        status_code=status_code,
        active="campaigns",
        campaign=c,
        strategy_name=_strategy_names(web, {c.strategy_id} if c.strategy_id else set()).get(c.strategy_id or 0),
        actions=lifecycle_actions(c.status),
        kpis=kpis,
        members=members["items"],
        next_url=query_url(base, cursor=members["next_cursor"]) + "#accounts" if members["next_cursor"] else None,
        first_url=base + "#accounts" if cursor else None,
        tab_options=[("", "Any tab")] + [(t.value, t.value.replace("_", "-").title()) for t in CollectionTab],
        status_options=[("", "Any status")] + [(s.value, s.value.replace("_", " ").capitalize()) for s in AccountStatus],
        add_values=add_values or {},
        add_errors=add_errors or {},
        add_mode=add_mode,
        can_add=c.status != CampaignStatus.completed,
    )


@router.get("/campaigns/{campaign_id}")
def campaign_detail(campaign_id: int, web: WebPage, cursor: str | None = Query(None)) -> Response:
    return _render_detail(web, campaign_id, cursor)


@router.post("/campaigns/{campaign_id}/delete")
def delete_campaign(campaign_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    name = _get(web, campaign_id).name
    service.delete_campaign(web.session, principal=web.principal, campaign_id=campaign_id, now=web.now())
    return web.redirect("/campaigns", f"Campaign {name!r} deleted: its accounts were unassigned and their pending"
                                      " items cancelled.")


@router.post("/campaigns/{campaign_id}/enqueue")
def enqueue_campaign(campaign_id: int, form: CsrfForm, web: Web = page_requires(Permission.operate_engine)) -> Response:
    c = _get(web, campaign_id)
    back = f"/campaigns/{c.id}"
    if c.status != CampaignStatus.active:
        return web.redirect(back, f"Only an active campaign can enqueue; this one is {c.status.value}.", "error")
    result = enqueue(web.session, organization_id=web.principal.organization_id, now=web.now(), campaign_id=c.id,
                     cause="manual_enqueue")
    if result.paused:
        return web.redirect(back, "Automation is paused: nothing was enqueued. Resume it first.", "error")
    n = result.enqueued
    message = (f"Enqueued campaign {c.name!r}: {n} item{'s' if n != 1 else ''} added"
               f" ({result.assigned} newly assigned, {result.skipped} skipped).")
    if n == 0:
        message += (" Nothing was due: the accounts are already queued or not eligible, or today is outside"
                    " the campaign's dates.")
    return web.redirect(back, message, "success" if n else "info")


@router.post("/campaigns/{campaign_id}/{action}")
def lifecycle(campaign_id: int, action: str, form: CsrfForm,
              web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    transition = {a: t for a, _label, t, _css in LIFECYCLE}.get(action)
    if transition is None:
        raise ValidationFailed.on("action", f"unknown action {action!r}")
    if action == "resume" and _get(web, campaign_id).status != CampaignStatus.paused:
        raise Conflict("only a paused campaign can be resumed")
    try:
        service.transition(web.session, principal=web.principal, campaign_id=campaign_id, action=transition,
                           now=web.now())
    except Conflict as exc:  # e.g. activating without a strategy: say why on the campaign's page
        web.session.rollback()
        return web.redirect(f"/campaigns/{campaign_id}", exc.message[:1].upper() + exc.message[1:] + ".", "error")
    return web.redirect(f"/campaigns/{campaign_id}", DONE[action])


# --- membership ----------------------------------------------------------------------------------


def _pasted_ids(text: str) -> list[str]:
    """External ids pasted one per line, or separated by commas, semicolons or spaces."""
    for sep in ",;\t":
        text = text.replace(sep, "\n")
    return list(dict.fromkeys(part.strip() for line in text.splitlines() for part in line.split(" ") if part.strip()))


def _filter_body(values: dict[str, str]) -> dict[str, Any]:
    flt: dict[str, Any] = {}
    for key in FILTER_KEYS:
        raw = values.get(f"filter.{key}", "")
        if raw == "":
            continue
        if key == "min_days_overdue":
            flt[key] = int(raw) if raw.lstrip("-").isdigit() else raw
        else:
            flt[key] = raw
    return flt


def _result_message(result: dict[str, Any]) -> str:
    added = result["added"]
    msg = f"{added} account{'s' if added != 1 else ''} added"
    if result["moved"]:
        msg += f" ({result['moved']} moved from another campaign)"
    if result["already_members"]:
        msg += f"; {result['already_members']} already in this campaign"
    return msg + f". The campaign has {result['total_accounts']} accounts."


@router.post("/campaigns/{campaign_id}/accounts/add")
def add_accounts(campaign_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    c = _get(web, campaign_id)
    mode = "filter" if _text(form, "mode") == "filter" else "ids"
    values: dict[str, Any] = {"external_ids": form.get("external_ids") or "", "move": bool(form.get("move"))}
    values.update({f"filter.{k}": _text(form, f"filter.{k}") for k in FILTER_KEYS})
    not_found: list[str] = []
    try:
        if mode == "ids":
            ids = _pasted_ids(str(values["external_ids"]))
            if not ids:
                raise ValidationFailed.on("external_ids", "paste at least one external id")
            if len(ids) > MAX_PASTED_IDS:
                raise ValidationFailed.on("external_ids", f"at most {MAX_PASTED_IDS} ids at a time")
            found = set(
                web.session.scalars(
                    scoped(Account, web.principal.organization_id, Account.external_id)
                    .where(Account.external_id.in_(ids))
                )
            )
            not_found = [i for i in ids if i not in found]
            if not found:
                raise ValidationFailed.on("external_ids", "none of these external ids was found: "
                                          + _shown(not_found))
            body = {"external_ids": [i for i in ids if i in found]}
        else:
            body = {"filter": _filter_body(values)}
            if not body["filter"]:
                raise ValidationFailed.on("filter", "give at least one criterion")
        try:
            data = MembershipAdd.model_validate({**body, "move": values["move"]})
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        result = service.add_accounts(web.session, principal=web.principal, campaign_id=c.id, body=data,
                                      now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        errors = field_errors(exc)
        return _render_detail(web, campaign_id, add_values=values, add_errors=errors, add_mode=mode,
                              status_code=exc.status_code)
    message = _result_message(result)
    if not_found:
        message += f" Not found ({len(not_found)}): {_shown(not_found)}."
        return web.redirect(f"/campaigns/{c.id}", message, "info")
    return web.redirect(f"/campaigns/{c.id}", message)


def _shown(ids: list[str], limit: int = 30) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@router.post("/campaigns/{campaign_id}/accounts/{account_id}/remove")
def remove_account(campaign_id: int, account_id: int, form: CsrfForm,
                   web: Web = page_requires(Permission.manage_campaigns)) -> Response:
    name = web.session.scalar(
        scoped(Account, web.principal.organization_id, Account.name).where(Account.id == account_id)
    )
    service.remove_accounts(web.session, principal=web.principal, campaign_id=campaign_id, account_ids=[account_id],
                            now=web.now())
    return web.redirect(f"/campaigns/{campaign_id}", f"{name or 'The account'} was removed from the campaign.")

