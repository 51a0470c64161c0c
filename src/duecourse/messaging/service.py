"""Message templates (SPEC §7): validation at save time, usage checks, preview. Services never commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from duecourse.engine.timing import local_date
from duecourse.errors import Conflict, FieldError, ValidationFailed
from duecourse.ledger.models import Account, Invoice
from duecourse.messaging import rendering
from duecourse.messaging.models import Channel, Template
from duecourse.messaging.schemas import TemplateIn
from duecourse.pagination import PageParams, paginate
from duecourse.strategies.models import Stage, Strategy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.scope import get_owned, scoped
from duecourse.tenancy.service import get_settings
from duecourse.tenancy.settings import PAYMENT_LINK_SAMPLE, fill_payment_link
from duecourse.validation import currency_places

FIELDS = ("name", "channel", "tone", "language", "subject", "body_text", "body_html", "variant_of_id")
NULLABLE = ("language", "subject", "body_html", "variant_of_id")
EMAIL_ONLY = ("subject", "body_html")


def get_template(session: Session, *, organization_id: int, template_id: int) -> Template:
    return get_owned(session, Template, template_id, organization_id, "Template")


def list_templates(
    session: Session,
    *,
    organization_id: int,
    params: PageParams,
    channel: str | None = None,
    tone: str | None = None,
    search: str | None = None,
) -> dict[str, Any]:
    stmt = scoped(Template, organization_id)
    if channel is not None:
        stmt = stmt.where(Template.channel == channel)
    if tone is not None:
        stmt = stmt.where(Template.tone == tone)
    if search:
        escaped = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Template.name.ilike(f"%{escaped}%", escape="\\"))
    return paginate(session, stmt, Template.id, params, lambda t: t)


def _validate(data: dict[str, Any]) -> None:
    """Channel rules, then each text's syntax, variables and a trial render (SPEC §7: errors at save time)."""
    errors: list[FieldError] = []
    channel = Channel(data["channel"])
    if not (data["body_text"] or "").strip():
        errors.append(FieldError("body_text", "is required"))
    if channel == Channel.email:
        if not (data["subject"] or "").strip():
            errors.append(FieldError("subject", "is required for an email template"))
    else:
        for f in EMAIL_ONLY:
            if data[f] is not None:
                errors.append(FieldError(f, f"is only for email templates, not {channel.value}"))
    if errors:
        raise ValidationFailed(
            "Invalid template: " + "; ".join(f"{e.field}: {e.message}" for e in errors), errors
        )
    for f, html in (("subject", False), ("body_text", False), ("body_html", True)):
        if data[f] is not None:
            errors += rendering.check(data[f], f, html=html)
    if errors:
        raise ValidationFailed(
            "Invalid template: " + "; ".join(f"{e.field}: {e.message}" for e in errors), errors
        )


def _check_name(session: Session, *, organization_id: int, name: str, template_id: int | None) -> None:
    stmt = scoped(Template, organization_id, Template.id).where(func.lower(Template.name) == func.lower(name))
    if template_id is not None:
        stmt = stmt.where(Template.id != template_id)
    if session.scalar(stmt.limit(1)) is not None:
        raise Conflict(
            f"A template named {name!r} already exists",
            [FieldError("name", "is already used by another template")],
        )


def _check_variant(session: Session, *, organization_id: int, data: dict[str, Any], template_id: int | None) -> None:
    """A tone variant names a base template of the organization, on the same channel, with another
    tone; the base is not itself a variant, and it has one variant per tone."""
    base_id = data.get("variant_of_id")
    if base_id is None:
        return
    base = session.scalar(scoped(Template, organization_id).where(Template.id == base_id))
    problem = None
    if base is None:
        problem = f"template {base_id} not found"
    elif template_id is not None and base.id == template_id:
        problem = "a template cannot be a variant of itself"
    elif base.variant_of_id is not None:
        problem = f"template {base_id} is itself a variant; name its base template ({base.variant_of_id})"
    elif Channel(data["channel"]) != base.channel:
        problem = f"the base template is for {base.channel.value}, this one for {Channel(data['channel']).value}"
    elif str(data["tone"]) == str(base.tone.value if hasattr(base.tone, "value") else base.tone):
        problem = f"the base template already has the {data['tone']} tone; a variant has another"
    elif template_id is not None and session.scalar(
        select(Template.id).where(Template.variant_of_id == template_id).limit(1)
    ) is not None:
        problem = "this template has variants of its own; it cannot become a variant"
    if problem is None:
        clash = select(Template.name).where(Template.variant_of_id == base_id, Template.tone == str(data["tone"]))
        if template_id is not None:
            clash = clash.where(Template.id != template_id)
        taken = session.scalar(clash.limit(1))
        if taken is not None:
            problem = f"template {taken!r} is already the {data['tone']} variant of template {base_id}"
    if problem:
        raise ValidationFailed("Invalid template: variant_of_id: " + problem, [FieldError("variant_of_id", problem)])


def variant_for(session: Session, template: Template, tone: str | None) -> Template:
    """The template to send for ``tone``: the base's variant with that tone, else the base itself."""
    if not tone or tone == (template.tone.value if hasattr(template.tone, "value") else template.tone):
        return template
    variant = session.scalar(select(Template).where(Template.variant_of_id == template.id, Template.tone == tone))
    return variant or template


def strategies_using(session: Session, *, organization_id: int, template_id: int) -> list[str]:
    """Names of the strategies with a stage that uses the template."""
    return list(
        session.scalars(
            select(Strategy.name)
            .join(Stage, Stage.strategy_id == Strategy.id)
            .where(Strategy.organization_id == organization_id, Stage.template_id == template_id)
            .distinct()
            .order_by(Strategy.name)
        )
    )


def create_template(session: Session, *, organization_id: int, data: TemplateIn, now: datetime) -> Template:
    values = data.model_dump()
    _validate(values)
    _check_name(session, organization_id=organization_id, name=values["name"], template_id=None)
    _check_variant(session, organization_id=organization_id, data=values, template_id=None)
    template = Template(organization_id=organization_id, created_at=now, updated_at=now, **values)
    session.add(template)
    session.flush()
    return template


def update_template(
    session: Session, *, organization_id: int, template_id: int, values: dict[str, Any], now: datetime
) -> Template:
    """Apply a full (PUT: every field) or partial (PATCH: the fields sent) change.

    Switching a template away from email drops its subject and HTML body unless they are sent.
    A template used by a strategy stage cannot change channel (the stage would no longer match).
    """
    template = get_template(session, organization_id=organization_id, template_id=template_id)
    nulls = [k for k, v in values.items() if v is None and k not in NULLABLE]
    if nulls:
        raise ValidationFailed("Invalid template", [FieldError(k, "must not be null") for k in nulls])
    merged = {f: getattr(template, f) for f in FIELDS}
    if values.get("channel") not in (None, template.channel) and values["channel"] != Channel.email:
        for f in EMAIL_ONLY:
            if f not in values:
                merged[f] = None
    merged.update(values)
    _validate(merged)
    if "name" in values:
        _check_name(session, organization_id=organization_id, name=merged["name"], template_id=template.id)
    _check_variant(session, organization_id=organization_id, data=merged, template_id=template.id)
    if merged["channel"] != template.channel or merged["tone"] != template.tone:
        variants = session.scalars(select(Template.name).where(Template.variant_of_id == template.id)).all()
        if variants and merged["channel"] != template.channel:
            raise Conflict(
                "The template has tone variants (" + ", ".join(repr(n) for n in variants) + "); its channel cannot change",
                [FieldError("channel", "template has variants")],
            )
    if merged["channel"] != template.channel:
        used = strategies_using(session, organization_id=organization_id, template_id=template.id)
        if used:
            raise Conflict(
                "The template is used by strategy "
                + ", ".join(repr(n) for n in used)
                + f"; its channel cannot change from {template.channel.value}",
                [FieldError("channel", "template in use by a strategy stage")],
            )
    changed = False
    for f in FIELDS:
        if getattr(template, f) != merged[f]:
            setattr(template, f, merged[f])
            changed = True
    if changed:
        template.updated_at = now
    return template


def delete_template(session: Session, *, organization_id: int, template_id: int) -> None:
    template = get_template(session, organization_id=organization_id, template_id=template_id)
    variants = session.scalars(select(Template.name).where(Template.variant_of_id == template.id)).all()
    if variants:
        raise Conflict(
            "The template has tone variants: " + ", ".join(repr(n) for n in variants) + "; delete or detach them first"
        )
    used = strategies_using(session, organization_id=organization_id, template_id=template.id)
    if used:
        raise Conflict(
            "The template is used by strategy "
            + ", ".join(repr(n) for n in used)
            + "; change those stages first"
        )
    session.delete(template)
    session.flush()


PAYMENT_LINK_NOT_CONFIGURED = (
    "uses payment_link, but the payment link is not configured; set it on the Settings page "
    "(Rules tab, Messages section) or through PATCH /api/v1/settings as messages.payment_link"
)
PAYMENT_LINK_PREVIEW_WARNING = (
    "No payment link is configured: this preview shows a stand-in link. Real messages using payment_link "
    "will fail (template_error) until a payment link is configured on the Settings page (Rules tab, Messages section)."
)


def preview_links(external_id: str) -> tuple[str, str]:
    """Stand-ins for previews only: the payment link when the organization has none configured, and
    the unsubscribe link the channel layer creates at dispatch (it carries a per-message token)."""
    return (
        f"https://example.invalid/pay/{external_id}",
        f"https://example.invalid/unsubscribe/{external_id}",
    )


def payment_link_for(
    link: str, *, external_id: str, invoice_number: str | None, balance: str, currency: str
) -> str:
    """The organization's payment link (messages.payment_link) filled in for one account."""
    return fill_payment_link(link, {
        "account_external_id": external_id,
        "invoice_number": invoice_number or "",
        "balance": balance,
        "currency": currency,
    })


_LOOK_UP: Any = object()  # account_context_for: the carrying invoice was not given


def account_context_for(
    session: Session, *, organization_id: int, account_id: int, now: datetime, unsubscribe_link: str | None = None,
    account: Account | None = None, org: Organization | None = None, preview: bool = False, invoice: Any = _LOOK_UP,
) -> dict[str, Any]:
    """The template variables for one account. The engine passes the account, organization and
    carrying invoice (anything with ``organization_id``, ``number``, ``total`` and ``due_date``, or
    None) it already holds; they must be the ones named by the ids and by the account.

    ``payment_link`` is the organization's payment link filled in for the account. Without one, a
    template that uses it fails to render (:data:`PAYMENT_LINK_NOT_CONFIGURED`), so no message goes
    out with a made-up link; previews (``preview=True``) show a stand-in instead."""
    if account is None or account.id != account_id or account.organization_id != organization_id:
        account = session.scalar(scoped(Account, organization_id).where(Account.id == account_id))
    if account is None:
        raise ValidationFailed.on("account_id", f"account {account_id} not found")
    if org is None or org.id != organization_id:
        org = session.get(Organization, organization_id)
    assert org is not None
    if invoice is _LOOK_UP:
        invoice = session.get(Invoice, account.carrying_invoice_id) if account.carrying_invoice_id is not None else None
    if invoice is not None and invoice.organization_id != organization_id:
        invoice = None
    today = local_date(now, account.timezone or org.timezone)
    places = currency_places(account.currency)
    link = get_settings(session, organization_id).messages.payment_link  # read once per session
    pay: Any
    if link is not None:
        pay = payment_link_for(
            link, external_id=account.external_id, invoice_number=invoice.number if invoice else None,
            balance=rendering.amount_text(account.balance, places), currency=account.currency,
        )
    elif preview:
        pay = preview_links(account.external_id)[0]
    else:
        pay = rendering.unavailable("payment_link", PAYMENT_LINK_NOT_CONFIGURED)
    return rendering.account_context(
        debtor_name=account.name,
        balance=account.balance,
        currency=account.currency,
        currency_places=places,
        invoice_number=invoice.number if invoice else None,
        invoice_amount=invoice.total if invoice else None,
        invoice_due_date=invoice.due_date if invoice else None,
        today=today,
        payment_link=pay,
        unsubscribe_link=unsubscribe_link or preview_links(account.external_id)[1],
        organization_name=org.name,
    )


def uses_variable(template: Template, name: str) -> bool:
    """Whether any of the template's texts refers to the variable ``name``."""
    return any(
        name in rendering.variables_used(source, html)
        for source, html in ((template.subject, False), (template.body_text, False), (template.body_html, True))
        if source
    )


def preview(
    session: Session, *, organization_id: int, template_id: int, account_id: int | None, now: datetime
) -> dict[str, Any]:
    """Render the template for an account of the organization, or for sample values (SPEC §7)."""
    template = get_template(session, organization_id=organization_id, template_id=template_id)
    link = get_settings(session, organization_id).messages.payment_link
    if account_id is None:
        org = session.get(Organization, organization_id)
        context = {**rendering.SAMPLE_CONTEXT, "organization_name": org.name if org else ""}
        if link is not None:
            context["payment_link"] = fill_payment_link(link, PAYMENT_LINK_SAMPLE)
    else:
        context = account_context_for(session, organization_id=organization_id, account_id=account_id, now=now,
                                      preview=True)
    try:
        subject = rendering.render(template.subject, context, field="subject") if template.subject else None
        text = rendering.render(template.body_text, context, field="body_text")
        html = (
            rendering.render(template.body_html, context, field="body_html", html=True)
            if template.body_html
            else None
        )
    except rendering.RenderError as exc:
        raise ValidationFailed.on(exc.field, exc.message) from None
    out: dict[str, Any] = {
        "channel": template.channel,
        "account_id": account_id,
        "subject": subject,
        "text": text,
        "html": html,
        "sms": None,
        "warnings": [],
    }
    if link is None and uses_variable(template, "payment_link"):
        out["warnings"].append(PAYMENT_LINK_PREVIEW_WARNING)
    if template.channel == Channel.sms:
        size = rendering.sms_size(text)
        out["sms"] = size.__dict__
        if size.segments > 1:
            warning = (
                f"{size.segments} SMS segments ({size.encoding}, {size.units} units): each segment is billed"
            )
            if size.encoding == "UCS-2":
                odd = sorted(
                    {c for c in text if c not in rendering.GSM7_BASIC and c not in rendering.GSM7_EXTENSION}
                )
                warning += "; characters outside GSM-7 (" + "".join(odd[:10]) + ") limit a segment to 70"
            out["warnings"].append(warning)
    return out
