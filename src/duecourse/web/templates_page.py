"""The Templates page (SPEC §7): list with channel/tone filters, the editor with its variables help,
and a preview against an account or sample values. Rules live in duecourse.messaging.service."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import or_, select

from duecourse.errors import Conflict, ValidationFailed
from duecourse.ledger.models import Account
from duecourse.messaging import rendering
from duecourse.messaging import service as messaging
from duecourse.messaging.models import Channel, Template
from duecourse.messaging.schemas import TemplateIn
from duecourse.pagination import PageParams
from duecourse.strategies.models import Tone
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.scope import scoped
from duecourse.tenancy.settings import PAYMENT_LINK_SAMPLE, fill_payment_link
from duecourse.web.core import CsrfForm, PageRoute, Web, WebPage, field_errors, page_requires, pydantic_errors, query_url

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 25
ACCOUNT_CHOICES = 25
FORM_FIELDS = ("name", "channel", "tone", "language", "subject", "body_text", "body_html", "variant_of_id")
VARIABLE_HELP = {
    "debtor_name": "The account's name",
    "balance": "Outstanding balance, e.g. 1250.00",
    "currency": "ISO code of the account's currency",
    "carrying_invoice_number": "Number of the oldest open invoice",
    "carrying_invoice_amount": "Total of that invoice",
    "carrying_invoice_due_date": "Its due date (YYYY-MM-DD)",
    "days_overdue": "Days since that due date",
    "payment_link": "The payment link of Settings → Rules → Messages, filled in for the account",
    "unsubscribe_link": "One-click unsubscribe link",
    "organization_name": "Your organization's name",
}


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


@router.get("/templates")
def templates_list(
    web: WebPage,
    channel: str | None = Query(None),
    tone: str | None = Query(None),
    q: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    channel_f = channel if channel in {c.value for c in Channel} else None
    tone_f = tone if tone in {t.value for t in Tone} else None
    search = (q or "").strip()[:200] or None
    page = messaging.list_templates(
        web.session, organization_id=web.principal.organization_id,
        params=PageParams(limit=PAGE_SIZE, cursor=cursor), channel=channel_f, tone=tone_f, search=search,
    )
    items: list[Template] = page["items"]
    base_ids = {t.variant_of_id for t in items if t.variant_of_id}
    bases = dict(web.session.execute(
        select(Template.id, Template.name).where(Template.organization_id == web.principal.organization_id,
                                                 Template.id.in_(base_ids))
    ).all()) if base_ids else {}
    params = {"channel": channel_f, "tone": tone_f, "q": search}
    return web.render(
        "templates/list.html", active="templates", templates=items, bases=bases,
        channels=[c.value for c in Channel], tones=[t.value for t in Tone],
        channel=channel_f or "", tone=tone_f or "", q=search or "",
        next_url=query_url("/templates", **params, cursor=page["next_cursor"]) if page["next_cursor"] else None,
        first_url=query_url("/templates", **params) if cursor else None,
    )


# --- the editor ----------------------------------------------------------------------------------


def _values_of(template: Template | None) -> dict[str, str]:
    if template is None:
        return {"channel": "email", "tone": "standard"}
    return {f: _enum_value(getattr(template, f)) if getattr(template, f) is not None else "" for f in FORM_FIELDS}


def _form_values(form: Any) -> dict[str, str]:
    return {f: str(form.get(f) or "") for f in FORM_FIELDS}


def _template_in(values: dict[str, str]) -> TemplateIn:
    """The form as the API's TemplateIn. Subject and HTML are email-only fields (hidden for other
    channels), so they are dropped for the other channels, as the service does on a channel switch."""
    email = values["channel"] == Channel.email.value
    data: dict[str, Any] = {
        "name": values["name"],
        "channel": values["channel"],
        "tone": values["tone"] or Tone.standard.value,
        "language": values["language"].strip() or None,
        "subject": (values["subject"] or None) if email else None,
        "body_text": values["body_text"].replace("\r\n", "\n"),
        "body_html": (values["body_html"].replace("\r\n", "\n") or None) if email else None,
        "variant_of_id": values["variant_of_id"] or None,
    }
    try:
        return TemplateIn.model_validate(data)
    except ValidationError as exc:
        raise pydantic_errors(exc) from None


def _base_choices(web: Web, exclude_id: int | None) -> list[Template]:
    """Templates that can be a base of a tone variant: the organization's templates that are not variants."""
    stmt = scoped(Template, web.principal.organization_id).where(Template.variant_of_id.is_(None))
    if exclude_id is not None:
        stmt = stmt.where(Template.id != exclude_id)
    return list(web.session.scalars(stmt.order_by(Template.channel, Template.name).limit(500)))


def _render_form(web: Web, template: Template | None, values: dict[str, str], errors: dict[str, str],
                 status_code: int = 200, preview: dict[str, Any] | None = None, preview_error: str | None = None,
                 preview_account: str = "") -> Response:
    samples = dict(rendering.SAMPLE_CONTEXT)
    link = tenancy.get_settings(web.session, web.principal.organization_id).messages.payment_link
    samples["payment_link"] = (fill_payment_link(link, PAYMENT_LINK_SAMPLE) if link
                               else "Not configured yet: messages using it are not sent")
    ctx: dict[str, Any] = {
        "tpl": template,
        "values": values,
        "errors": errors,
        "channel_options": [("email", "Email"), ("sms", "SMS"), ("whatsapp", "WhatsApp"), ("voice", "Voice (call script)")],
        "tone_options": [(t.value, t.value.capitalize()) for t in Tone],
        "bases": _base_choices(web, template.id if template else None),
        "variables": [(v, VARIABLE_HELP.get(v, ""), samples.get(v, "")) for v in rendering.VARIABLES],
        "editable": web.can(Permission.manage_templates),
        "preview": preview,
        "preview_error": preview_error,
        "preview_account": preview_account,
        "accounts": [],
        "variants": [],
        "used_by": [],
    }
    if template is not None:
        ctx["accounts"] = web.session.execute(
            select(Account.id, Account.external_id, Account.name)
            .where(Account.organization_id == web.principal.organization_id)
            .order_by(Account.id).limit(ACCOUNT_CHOICES)
        ).all()
        ctx["variants"] = list(web.session.scalars(select(Template).where(Template.variant_of_id == template.id)))
        ctx["used_by"] = messaging.strategies_using(web.session, organization_id=web.principal.organization_id,
                                                    template_id=template.id)
    return web.render("templates/form.html", status_code=status_code, active="templates", **ctx)


@router.get("/templates/new")
def new_template(web: WebPage, variant_of: str | None = Query(None)) -> Response:
    web.require(Permission.manage_templates)
    values = _values_of(None)
    if variant_of and variant_of.isdigit():
        base = messaging.get_template(web.session, organization_id=web.principal.organization_id,
                                      template_id=int(variant_of))
        values = {**_values_of(base), "name": f"{base.name} (variant)", "variant_of_id": str(base.id),
                  "tone": "empathetic" if _enum_value(base.tone) != "empathetic" else "firm"}
    return _render_form(web, None, values, {})


@router.post("/templates/new")
def create_template(form: CsrfForm, web: Web = page_requires(Permission.manage_templates)) -> Response:
    values = _form_values(form)
    try:
        template = messaging.create_template(web.session, organization_id=web.principal.organization_id,
                                             data=_template_in(values), now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        return _render_form(web, None, values, field_errors(exc), status_code=422)
    return web.redirect(f"/templates/{template.id}", f"Template {template.name!r} created.")


def _resolve_account(web: Web, text: str) -> int | None:
    """An account of the organization by external id, or by numeric id."""
    text = text.strip()
    conditions = [Account.external_id == text]
    if text.isdigit():
        conditions.append(Account.id == int(text))
    rows = web.session.execute(
        select(Account.id, Account.external_id).where(
            Account.organization_id == web.principal.organization_id, or_(*conditions)
        ).limit(2)
    ).all()
    for row in rows:  # an external id match wins over an id match
        if row[1] == text:
            return row[0]
    return rows[0][0] if rows else None


@router.get("/templates/{template_id}")
def edit_template(
    template_id: int, web: WebPage, preview: str | None = Query(None), account: str | None = Query(None)
) -> Response:
    template = messaging.get_template(web.session, organization_id=web.principal.organization_id,
                                      template_id=template_id)
    result = None
    problem = None
    account_text = (account or "").strip()
    if preview is not None:
        account_id = None
        if account_text:
            account_id = _resolve_account(web, account_text)
            if account_id is None:
                problem = f"No account with id or external id {account_text!r}."
        if problem is None:
            try:
                result = messaging.preview(web.session, organization_id=web.principal.organization_id,
                                           template_id=template.id, account_id=account_id, now=web.now())
            except ValidationFailed as exc:
                problem = "; ".join(f"{k}: {v}" if k else v for k, v in field_errors(exc).items())
        if result is not None:
            result["account_label"] = account_text or None
    return _render_form(web, template, _values_of(template), {}, preview=result, preview_error=problem,
                        preview_account=account_text)


@router.post("/templates/{template_id}")
def update_template(template_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_templates)) -> Response:
    template = messaging.get_template(web.session, organization_id=web.principal.organization_id,
                                      template_id=template_id)
    values = _form_values(form)
    try:
        data = _template_in(values)
        messaging.update_template(web.session, organization_id=web.principal.organization_id,
                                  template_id=template.id, values=data.model_dump(), now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        template = messaging.get_template(web.session, organization_id=web.principal.organization_id,
                                          template_id=template_id)
        return _render_form(web, template, values, field_errors(exc), status_code=422)
    return web.redirect(f"/templates/{template.id}", "Template saved.")


@router.post("/templates/{template_id}/delete")
def delete_template(template_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_templates)) -> Response:
    template = messaging.get_template(web.session, organization_id=web.principal.organization_id,
                                      template_id=template_id)
    name = template.name
    try:
        messaging.delete_template(web.session, organization_id=web.principal.organization_id, template_id=template_id)
    except Conflict as exc:
        return web.redirect(f"/templates/{template_id}", f"Not deleted: {exc.message}.", "error")
    return web.redirect("/templates", f"Template {name!r} deleted.")
