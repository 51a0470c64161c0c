"""Email's own endpoints (SPEC §7): the unsubscribe page, the bounce webhook, the SMTP check.

* ``GET /unsubscribe/{token}`` shows a confirmation page; ``POST /unsubscribe/{token}`` opts the
  account out of the token's channel. The POST is also RFC 8058 one-click unsubscribe: mail clients
  post ``List-Unsubscribe=One-Click`` to the ``List-Unsubscribe`` URL with no cookie, so the token
  alone authorizes it (it is signed with the process's secret key and names organization, account
  and channel). A GET never changes anything, so link scanners that open every URL do no harm.
* ``POST /api/v1/webhooks/{organization_id}/email/bounce``: bounces in duecourse's own signed
  contract (:mod:`duecourse.channels.webhooks`), idempotent by event id. A hard bounce is a delivery
  failure (§4.8); a soft bounce is only written to the execution log.
* ``POST /api/v1/channels/email/check``: tries the stored SMTP configuration (connect, TLS, login).
"""

from __future__ import annotations

from html import escape
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update

from duecourse.channels import config as channel_config
from duecourse.channels import webhooks
from duecourse.channels.api import _key, org_secret, signed_event
from duecourse.channels.links import read_unsubscribe_token
from duecourse.channels.secrets import SecretsUnreadable
from duecourse.deps import AppClock, DbSession, requires
from duecourse.engine import outcomes
from duecourse.engine.cases import log_event
from duecourse.engine.models import QueueItem
from duecourse.errors import NotFound
from duecourse.ledger.models import Account
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Permission, Principal

router = APIRouter(tags=["inbound webhooks"])
# Mounted at the root, not under /api/v1: the unsubscribe page debtors open.
public_router = APIRouter(include_in_schema=False)
Admin = requires(Permission.manage_settings)

OPT_OUT_CHANNELS = ("email", "sms", "whatsapp", "voice")
_CHANNEL_WORDS = {"email": "emails", "sms": "text messages", "whatsapp": "WhatsApp messages", "voice": "calls"}
# The token is in the URL: keep it out of caches, referrers and search engines.
_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}


# --- unsubscribe -----------------------------------------------------------------------------------


def _page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;"
        "line-height:1.5;color:#222}button{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}</style>"
        f"</head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status_code, headers=_PAGE_HEADERS)


def _not_found() -> HTMLResponse:
    return _page("Link not valid", "<p>This unsubscribe link is not valid. Please use the link from the most "
                 "recent message you received.</p>", 404)


def _target(request: Request, session: Any, token: str) -> tuple[Account, Organization, str] | None:
    """The account, organization and channel a genuine token names; None for a forged or stale one."""
    target = read_unsubscribe_token(request.app.state.settings.secret_key, token)
    if target is None or target.channel not in OPT_OUT_CHANNELS:
        return None
    account = session.scalar(
        select(Account).where(Account.id == target.account_id, Account.organization_id == target.organization_id)
    )
    org = session.get(Organization, target.organization_id)
    if account is None or org is None:
        return None
    return account, org, target.channel


@public_router.get("/unsubscribe/{token}")
def unsubscribe_page(token: str, request: Request, session: DbSession) -> HTMLResponse:
    """The confirmation page; changes nothing (mail scanners open links)."""
    found = _target(request, session, token)
    if found is None:
        return _not_found()
    account, org, channel = found
    words = _CHANNEL_WORDS[channel]
    if getattr(account, f"opt_out_{channel}"):
        return _page("You are unsubscribed", f"<p>You no longer receive {words} from {escape(org.name)}.</p>")
    return _page(
        "Unsubscribe",
        f"<p>Stop receiving {words} from {escape(org.name)} about this account?</p>"
        f"<form method=\"post\" action=\"/unsubscribe/{escape(token, quote=True)}\">"
        "<input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">"
        "<button type=\"submit\">Unsubscribe</button></form>",
    )


@public_router.post("/unsubscribe/{token}")
def unsubscribe(token: str, request: Request, session: DbSession, clock: AppClock) -> HTMLResponse:
    """Opt the account out of the token's channel: the page's button and RFC 8058 one-click POST
    (body ``List-Unsubscribe=One-Click``) alike. No cookie or CSRF token: the signed token is the
    authorization. Unsubscribing twice changes nothing the second time."""
    found = _target(request, session, token)
    if found is None:
        return _not_found()
    account, org, channel = found
    column = getattr(Account, f"opt_out_{channel}")
    now = clock.now()
    changed = session.execute(
        update(Account)
        .where(Account.id == account.id, Account.organization_id == org.id, column.is_(False))
        .values({column: True, Account.updated_at: now})
        .execution_options(synchronize_session=False)
    ).rowcount
    if changed:
        session.refresh(account)
        log_event(session, account, at=now, event="opted_out", reason="unsubscribe_link", cause="debtor",
                  details={"channel": channel})
    return _page("You are unsubscribed",
                 f"<p>You will no longer receive {_CHANNEL_WORDS[channel]} from {escape(org.name)}.</p>")


# --- bounce webhook --------------------------------------------------------------------------------


class BounceEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=200)
    message_id: str = Field(min_length=1, max_length=255, description="The Message-ID duecourse sent (its provider_ref)")
    recipient: str | None = Field(None, max_length=320)
    type: Literal["hard", "soft"]
    reason: str | None = Field(None, max_length=2000)


def _provider_ref(message_id: str) -> str:
    """``<id@domain>`` and ``id@domain`` name the same message; the queue stores the bare form."""
    return message_id.strip().removeprefix("<").removesuffix(">").strip()


@router.post("/webhooks/{organization_id}/email/bounce",
             summary="Email bounce (signed; idempotent by event id); a hard bounce is a delivery failure")
async def bounce_webhook(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> dict[str, Any]:
    now = clock.now()
    event = await signed_event(request, BounceEvent, secret=org_secret(request, session, organization_id, now), now=now)
    ref = _provider_ref(event.message_id)
    if not ref:
        raise webhooks.BadWebhook("message_id: empty")
    if not webhooks.receive_once(session, organization_id=organization_id, source="email_bounce", event_id=event.id, now=now):
        return {"result": "duplicate"}
    error = "; ".join(p for p in (f"{event.type} bounce", event.recipient, event.reason) if p)[:2000]
    if event.type == "hard":
        try:
            result = outcomes.record_delivery(session, organization_id=organization_id, now=now, status="bounced",
                                              provider_ref=ref, error=error)
        except NotFound:
            raise webhooks.BadWebhook("unknown message: no email was sent with that message_id") from None
        return {"result": result}
    item = session.scalar(
        select(QueueItem).where(QueueItem.organization_id == organization_id, QueueItem.provider_ref == ref)
        .order_by(QueueItem.id.desc()).limit(1)
    )
    if item is None:
        raise webhooks.BadWebhook("unknown message: no email was sent with that message_id")
    account = session.get(Account, item.account_id)
    assert account is not None
    log_event(session, account, at=now, event="soft_bounce", stage_index=item.stage_index, queue_item_id=item.id,
              reason="soft_bounce", cause="bounce_webhook",
              details={k: v for k, v in (("recipient", event.recipient), ("error", event.reason)) if v})
    return {"result": "logged"}


# --- SMTP check ------------------------------------------------------------------------------------


class CheckOut(BaseModel):
    ok: bool
    error: str | None = None


@router.post("/channels/email/check", response_model=CheckOut, tags=["channels"],
             summary="Try the stored SMTP configuration: connect, TLS, log in")
def check_email(request: Request, session: DbSession, principal: Principal = Admin) -> Any:
    from duecourse.channels.smtp import check_connection

    config = channel_config.get_config(session, organization_id=principal.organization_id, channel="email")
    if config is None or config.provider != "smtp":
        return {"ok": False, "error": "email is not configured for SMTP (it uses the sandbox); PUT /api/v1/channels/email first"}
    try:
        secrets = channel_config.read_secrets(config, _key(request))
    except SecretsUnreadable as exc:
        return {"ok": False, "error": str(exc)}
    error = check_connection(dict(config.settings), secrets, request.app.state.settings.provider_timeout_seconds)
    return {"ok": error is None, "error": error}
