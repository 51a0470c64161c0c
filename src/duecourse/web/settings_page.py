"""The Settings page (SPEC §4.7, §4.10, §7, §1): tabs for the organization's rules (automation,
dispatch rules, exclusions, outcomes, messages), channels and their credentials, users, API keys and
outbound webhook subscriptions. Everyone may look; only administrators change anything (the server refuses
403). Every rule lives in the services: tenancy.service, channels.config and events.service."""

from __future__ import annotations

import typing
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from duecourse.channels import config as channel_config
from duecourse.channels.secrets import key_from_settings, mask
from duecourse.channels.webhooks import SIGNATURE_HEADER
from duecourse.errors import Conflict, FieldError, ValidationFailed
from duecourse.events import service as events
from duecourse.pagination import PageParams
from duecourse.tenancy import audit
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Role
from duecourse.tenancy.principal import Permission
from duecourse.tenancy.schemas import ApiKeyIn, UserIn
from duecourse.tenancy.settings import (
    ALL_DAYS,
    FREQUENCY_KEYS,
    HOURS_KEYS,
    PAYMENT_LINK_PLACEHOLDERS,
    PAYMENT_LINK_SAMPLE,
    fill_payment_link,
)
from duecourse.web.core import CsrfForm, PageRoute, Web, WebPage, field_errors, page_requires, pydantic_errors

router = APIRouter(route_class=PageRoute)

TABS = (
    ("general", "Rules", "/settings"),
    ("channels", "Channels", "/settings/channels"),
    ("users", "Users", "/settings/users"),
    ("api_keys", "API keys", "/settings/api-keys"),
    ("webhooks", "Webhooks", "/settings/webhooks"),
)
PROVIDER_LABELS = {"sandbox": "Sandbox (nothing leaves duecourse)", "smtp": "SMTP server",
                   "twilio": "Twilio-compatible API", "voice_http": "AI voice agent (HTTP)"}
ROLES = [r.value for r in Role]


def _key(web: Web) -> str:
    return key_from_settings(web.request.app.state.settings)


def _render(web: Web, template: str, tab: str, status_code: int = 200, **ctx: Any) -> Response:
    return web.render(template, status_code=status_code, active="settings", tabs=TABS, tab=tab,
                      admin=web.can(Permission.manage_settings), role_options=[(r, r.capitalize()) for r in ROLES],
                      **ctx)


def _clean_message(message: str) -> str:
    return message.removeprefix("Value error, ")


def _errors(exc: ValidationFailed | Conflict) -> dict[str, str]:
    return {k: _clean_message(v) for k, v in field_errors(exc).items()}


# --- rules: automation, dispatch, exclusions, outcomes, messages ------------------------------------


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = value
    return out


def _render_general(web: Web, typed: dict[str, Any] | None = None, errors: dict[str, str] | None = None,
                    section: str | None = None, status_code: int = 200) -> Response:
    current = tenancy.get_settings(web.session, web.principal.organization_id)
    values = _flat(current.model_dump(mode="json"), "", {})
    values.update(typed or {})
    return _render(
        web, "settings/general.html", "general", status_code=status_code, v=values, errors=errors or {},
        section=section, frequency_keys=FREQUENCY_KEYS, hours_keys=HOURS_KEYS, days=ALL_DAYS,
        payment_link_example=fill_payment_link(current.messages.payment_link, PAYMENT_LINK_SAMPLE)
        if current.messages.payment_link else None,
        payment_link_placeholders=[(k, meaning, PAYMENT_LINK_SAMPLE[k])
                                   for k, meaning in PAYMENT_LINK_PLACEHOLDERS.items()],
    )


@router.get("/settings")
def settings_page(web: WebPage) -> Response:
    return _render_general(web)


def _text(form: FormData, name: str) -> str:
    return str(form.get(name) or "").strip()


def _optional(form: FormData, name: str) -> str | None:
    return _text(form, name) or None


def _check(form: FormData, name: str) -> bool:
    return form.get(name) in ("1", "on", "true")


def _section_patch(section: str, form: FormData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings patch of one section's form, and what was typed (to show again on an error)."""
    if section == "automation":
        a = {
            "auto_enqueue": _check(form, "automation.auto_enqueue"),
            "scheduler_interval_minutes": _text(form, "automation.scheduler_interval_minutes"),
            "engine_paused": _check(form, "automation.engine_paused"),
        }
        return {"automation": a}, _flat(a, "automation", {})
    if section == "dispatch":
        freq = {k: {"per_day": _optional(form, f"dispatch.frequency_limits.{k}.per_day"),
                    "per_week": _optional(form, f"dispatch.frequency_limits.{k}.per_week")} for k in FREQUENCY_KEYS}
        hours = {k: {"start": _text(form, f"dispatch.allowed_hours.{k}.start"),
                     "end": _text(form, f"dispatch.allowed_hours.{k}.end"),
                     "days": [d for d in form.getlist(f"dispatch.allowed_hours.{k}.days") if isinstance(d, str)]}
                 for k in HOURS_KEYS}
        d = {"frequency_limits": freq, "allowed_hours": hours,
             "max_attempts": _text(form, "dispatch.max_attempts"),
             "retry_backoff_minutes": _text(form, "dispatch.retry_backoff_minutes")}
        typed = _flat(d, "dispatch", {})
        return {"dispatch": d}, typed
    if section == "exclusions":
        tags = [t.strip() for t in _text(form, "exclusions.excluded_tags").replace(";", ",").split(",") if t.strip()]
        e = {"min_balance": _text(form, "exclusions.min_balance"), "excluded_tags": tags,
             "exclude_only_disputed": _check(form, "exclusions.exclude_only_disputed")}
        return {"exclusions": e}, _flat(e, "exclusions", {})
    if section == "outcomes":
        o = {k: _text(form, f"outcomes.{k}") for k in (
            "callback_expiry_hours", "promise_grace_days", "adaptive_positive_factor", "adaptive_negative_factor")}
        s = {"simulate_outcomes": _check(form, "sandbox.simulate_outcomes"), "seed": _text(form, "sandbox.seed")}
        typed = _flat(o, "outcomes", {})
        _flat(s, "sandbox", typed)
        return {"outcomes": o, "sandbox": s}, typed
    if section == "messages":
        msg = {"payment_link": _optional(form, "messages.payment_link")}  # empty: not configured
        return {"messages": msg}, _flat(msg, "messages", {})
    raise ValidationFailed.on("section", "unknown settings section")


SECTION_TITLES = {"automation": "Automation", "dispatch": "Dispatch rules", "exclusions": "Exclusions",
                  "outcomes": "Outcomes and simulation", "messages": "Messages"}


@router.post("/settings/rules/{section}")
def save_section(section: str, form: CsrfForm, web: Web = page_requires(Permission.manage_settings)) -> Response:
    if section not in SECTION_TITLES:
        raise ValidationFailed.on("section", "unknown settings section")
    patch, typed = _section_patch(section, form)
    try:
        tenancy.update_settings(web.session, principal=web.principal, patch=patch, now=web.now())
    except ValidationFailed as exc:
        web.session.rollback()
        return _render_general(web, typed, _errors(exc), section=section, status_code=422)
    return web.redirect(f"/settings#{section}", f"{SECTION_TITLES[section]} saved.")


# --- channels ---------------------------------------------------------------------------------------


def _field_specs(provider: str) -> list[dict[str, Any]]:
    """The provider's settings as form fields, from its pydantic model (channels.config.PROVIDERS)."""
    model = channel_config.PROVIDERS[provider][0]
    specs = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        choices = None
        kind = "text"
        if typing.get_origin(annotation) is typing.Literal:
            choices = list(typing.get_args(annotation))
        elif annotation is int or int in args:
            kind = "number"
        specs.append({
            "name": name,
            "label": name.replace("_", " ").capitalize().replace("Sid", "SID").replace("url", "URL"),
            "required": info.is_required(),
            "default": None if info.is_required() or info.default is None else info.default,
            "choices": choices,
            "type": kind,
            "hint": info.description,
        })
    return specs


def _channel_cards(web: Web, typed: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    key = _key(web)
    cards = []
    for channel in channel_config.MESSAGING_CHANNELS:
        config = channel_config.get_config(web.session, organization_id=web.principal.organization_id, channel=channel)
        shown = channel_config.describe(config, channel, key)
        providers = []
        for provider in channel_config.CHANNEL_PROVIDERS[channel]:
            _, secret_names, required = channel_config.PROVIDERS[provider]
            providers.append({
                "name": provider,
                "label": PROVIDER_LABELS.get(provider, provider),
                "fields": _field_specs(provider),
                "secrets": [{"name": s, "required": s in required,
                             "masked": shown["secrets"].get(s) if shown["provider"] == provider else None,
                             "generated": s in channel_config.GENERATED_SECRETS.get(provider, ())}
                            for s in secret_names],
            })
        values = {"provider": shown["provider"], **{f"settings.{k}": v for k, v in shown["settings"].items()}}
        values.update((typed or {}).get(channel, {}))
        cards.append({"channel": channel, "shown": shown, "providers": providers, "form": values})
    return cards


def _render_channels(web: Web, *, typed: dict[str, dict[str, Any]] | None = None, errors: dict[str, dict[str, str]] | None = None,
                     generated: dict[str, dict[str, str]] | None = None, rotated: str | None = None,
                     status_code: int = 200) -> Response:
    admin = web.can(Permission.manage_settings)
    inbound: dict[str, Any] = {"urls": _inbound_urls(web), "header": SIGNATURE_HEADER, "secret": None}
    if admin:
        secret = rotated or channel_config.inbound_secret(
            web.session, organization_id=web.principal.organization_id, key=_key(web), now=web.now())
        inbound["secret"] = rotated or mask(secret)
        inbound["rotated"] = rotated is not None
    return _render(web, "settings/channels.html", "channels", status_code=status_code,
                   cards=_channel_cards(web, typed), errors=errors or {}, generated=generated or {}, inbound=inbound)


def _inbound_urls(web: Web) -> dict[str, str]:
    base = f"{web.request.app.state.settings.public_url.rstrip('/')}/api/v1/webhooks/{web.principal.organization_id}"
    return {"delivery": f"{base}/delivery", "payments": f"{base}/payments", "email_bounce": f"{base}/email/bounce",
            "twilio_status": f"{base}/twilio/status", "twilio_inbound": f"{base}/twilio/inbound",
            "voice_outcome": f"{base}/voice/outcome"}


@router.get("/settings/channels")
def channels_page(web: WebPage) -> Response:
    return _render_channels(web)


@router.post("/settings/channels/inbound/rotate")
def rotate_inbound(form: CsrfForm, web: Web = page_requires(Permission.manage_settings)) -> Response:
    secret = channel_config.rotate_inbound_secret(
        web.session, organization_id=web.principal.organization_id, key=_key(web), now=web.now())
    audit.record(web.session, principal=web.principal, at=web.now(), entity_type="channel", entity_id=None,
                 action="rotate_secret", description="Inbound webhook signing secret rotated")
    return _render_channels(web, rotated=secret)


@router.post("/settings/channels/{channel}")
def save_channel(channel: str, form: CsrfForm, web: Web = page_requires(Permission.manage_settings)) -> Response:
    if channel not in channel_config.CHANNEL_PROVIDERS:
        raise ValidationFailed.on("channel", f"unknown channel {channel!r}")
    provider = _text(form, "provider")
    settings: dict[str, Any] = {}
    secrets: dict[str, str | None] = {}
    typed: dict[str, Any] = {"provider": provider}
    if provider in channel_config.PROVIDERS:
        _, secret_names, _ = channel_config.PROVIDERS[provider]
        for spec in _field_specs(provider):
            raw = _text(form, f"{provider}.settings.{spec['name']}")
            typed[f"settings.{spec['name']}"] = raw
            if raw:
                settings[spec["name"]] = raw
        for name in secret_names:
            raw = str(form.get(f"{provider}.secrets.{name}") or "")
            if raw:  # empty = keep the stored secret; the page never shows a secret back
                secrets[name] = raw
    key = _key(web)
    org_id = web.principal.organization_id
    before = channel_config.describe(channel_config.get_config(web.session, organization_id=org_id, channel=channel),
                                     channel, key)
    try:
        config, generated = channel_config.put_config(
            web.session, organization_id=org_id, channel=channel, provider=provider, settings=settings,
            secrets=secrets, key=key, now=web.now(),
        )
    except ValidationFailed as exc:
        web.session.rollback()
        return _render_channels(web, typed={channel: typed}, errors={channel: _errors(exc)}, status_code=422)
    after = channel_config.describe(config, channel, key)
    changes = {f: (before[f], after[f]) for f in ("provider", "settings", "secrets") if before[f] != after[f]}
    audit.record_changes(web.session, principal=web.principal, at=web.now(), entity_type="channel",
                         entity_id=config.id, changes=changes, description_prefix=f"Channel {channel}")
    if generated:
        return _render_channels(web, generated={channel: generated})
    return web.redirect(f"/settings/channels#channel-{channel}", f"{channel.capitalize()} channel saved.")


# --- users ------------------------------------------------------------------------------------------


def _render_users(web: Web, *, values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
                  status_code: int = 200) -> Response:
    users = tenancy.list_users(web.session, organization_id=web.principal.organization_id) \
        if web.can(Permission.manage_users) else []
    return _render(web, "settings/users.html", "users", status_code=status_code, users=users, roles=ROLES,
                   values=values or {"role": "agent"}, errors=errors or {}, can_manage=web.can(Permission.manage_users))


@router.get("/settings/users")
def users_page(web: WebPage) -> Response:
    return _render_users(web)


@router.post("/settings/users")
def create_user(form: CsrfForm, web: Web = page_requires(Permission.manage_users)) -> Response:
    values = {k: _text(form, k) for k in ("email", "name", "role")}
    try:
        try:
            body = UserIn.model_validate({**values, "password": str(form.get("password") or "")})
        except ValidationError as exc:
            raise pydantic_errors(exc) from None
        user = tenancy.create_user(web.session, organization_id=web.principal.organization_id, email=body.email,
                                   password=body.password, role=body.role, name=body.name, now=web.now())
    except (ValidationFailed, Conflict) as exc:
        web.session.rollback()
        return _render_users(web, values=values, errors=_errors(exc), status_code=422)
    return web.redirect("/settings/users", f"User {user.email} created with the {user.role.value} role.")


def _change_user(web: Web, user_id: int, changes: dict[str, Any], done: str) -> Response:
    try:
        user = tenancy.update_user(web.session, principal=web.principal, user_id=user_id, changes=changes,
                                   now=web.now())
    except ValidationFailed as exc:
        return web.redirect("/settings/users", exc.fields[0].message.capitalize() + "." if exc.fields else exc.message,
                            "error")
    return web.redirect("/settings/users", f"{user.email} {done}.")


@router.post("/settings/users/{user_id}/role")
def change_role(user_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_users)) -> Response:
    role = _text(form, "role")
    if role not in ROLES:
        raise ValidationFailed.on("role", "choose one of: " + ", ".join(ROLES))
    return _change_user(web, user_id, {"role": role}, f"is now {role}")


@router.post("/settings/users/{user_id}/active")
def set_active(user_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_users)) -> Response:
    active = _check(form, "active")
    return _change_user(web, user_id, {"active": active}, "reactivated" if active else "deactivated")


# --- API keys ---------------------------------------------------------------------------------------


def _render_keys(web: Web, *, created: Any = None, values: dict[str, str] | None = None,
                 errors: dict[str, str] | None = None, status_code: int = 200) -> Response:
    keys = tenancy.list_api_keys(web.session, organization_id=web.principal.organization_id) \
        if web.can(Permission.manage_users) else []
    return _render(web, "settings/api_keys.html", "api_keys", status_code=status_code, keys=list(reversed(keys)),
                   roles=ROLES, created=created, values=values or {"role": "manager"}, errors=errors or {},
                   can_manage=web.can(Permission.manage_users))


@router.get("/settings/api-keys")
def api_keys_page(web: WebPage) -> Response:
    return _render_keys(web)


@router.post("/settings/api-keys")
def create_api_key(form: CsrfForm, web: Web = page_requires(Permission.manage_users)) -> Response:
    values = {k: _text(form, k) for k in ("name", "role")}
    try:
        body = ApiKeyIn.model_validate(values)
    except ValidationError as exc:
        return _render_keys(web, values=values, errors=field_errors(pydantic_errors(exc)), status_code=422)
    created = tenancy.create_api_key(web.session, organization_id=web.principal.organization_id, name=body.name,
                                     role=body.role, now=web.now(), created_by_user_id=web.principal.user_id)
    # The key is shown in this answer only (it is stored as a hash): no redirect.
    return _render_keys(web, created=created)


@router.post("/settings/api-keys/{key_id}/revoke")
def revoke_api_key(key_id: int, form: CsrfForm, web: Web = page_requires(Permission.manage_users)) -> Response:
    row = tenancy.revoke_api_key(web.session, organization_id=web.principal.organization_id, key_id=key_id,
                                 now=web.now())
    return web.redirect("/settings/api-keys", f"API key {row.name!r} revoked.")


# --- outbound webhook subscriptions --------------------------------------------------------------------


def _render_webhooks(web: Web, *, created: dict[str, Any] | None = None, values: dict[str, Any] | None = None,
                     errors: dict[str, str] | None = None, status_code: int = 200) -> Response:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:  # an organization has a handful of subscriptions
        page = events.list_subscriptions(web.session, organization_id=web.principal.organization_id,
                                         params=PageParams(limit=100, cursor=cursor))
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    return _render(web, "settings/webhooks.html", "webhooks", status_code=status_code, subscriptions=items,
                   event_types=events.EVENT_TYPES, created=created,
                   values=values or {"event_types": [], "url": "", "description": ""}, errors=errors or {})


@router.get("/settings/webhooks")
def webhooks_page(web: WebPage) -> Response:
    return _render_webhooks(web)


@router.post("/settings/webhooks")
def create_subscription(form: CsrfForm, web: Web = page_requires(Permission.manage_settings)) -> Response:
    values = {"url": _text(form, "url"), "description": _text(form, "description")[:500],
              "event_types": [t for t in form.getlist("event_types") if isinstance(t, str)]}
    try:
        if not values["url"]:
            raise ValidationFailed("Invalid subscription", [FieldError("url", "is required")])
        sub, secret = events.create_subscription(
            web.session, organization_id=web.principal.organization_id, url=values["url"],
            event_types=values["event_types"], description=values["description"], key=_key(web), now=web.now())
    except ValidationFailed as exc:
        web.session.rollback()
        return _render_webhooks(web, values=values, errors=_errors(exc), status_code=422)
    audit.record(web.session, principal=web.principal, at=web.now(), entity_type="event_subscription",
                 entity_id=sub.id, action="created", description=f"Event subscription {sub.id} created for {sub.url}")
    return _render_webhooks(web, created=events.subscription_view(sub, secret))


@router.post("/settings/webhooks/{subscription_id}/delete")
def delete_subscription(subscription_id: int, form: CsrfForm,
                        web: Web = page_requires(Permission.manage_settings)) -> Response:
    events.delete_subscription(web.session, organization_id=web.principal.organization_id,
                               subscription_id=subscription_id)
    audit.record(web.session, principal=web.principal, at=web.now(), entity_type="event_subscription",
                 entity_id=subscription_id, action="deleted", description=f"Event subscription {subscription_id} deleted")
    return web.redirect("/settings/webhooks", "Subscription deleted.")
