"""Channel configuration, the sandbox outbox, and duecourse's own signed inbound webhooks (SPEC §7).

Adapter-specific webhooks (Twilio callbacks, the voice agent's outcomes, one-click unsubscribe)
live beside their adapters; the ones here follow duecourse's own contract
(:mod:`duecourse.channels.webhooks`) and are signed with the organization's inbound secret.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from duecourse.channels import config as channel_config
from duecourse.channels import webhooks
from duecourse.channels.models import SandboxMessage
from duecourse.channels.secrets import key_from_settings, mask
from duecourse.deps import AppClock, DbSession, Reader, requires
from duecourse.engine import outcomes
from duecourse.errors import NotFound
from duecourse.ledger import service as ledger
from duecourse.ledger.schemas import PaymentIn
from duecourse.pagination import Page, PageParams, paginate
from duecourse.tenancy import audit
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Permission, Principal

M = TypeVar("M", bound=BaseModel)
router = APIRouter(tags=["channels"])
hooks = APIRouter(tags=["inbound webhooks"])
Admin = requires(Permission.manage_settings)


class ChannelConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(description="sandbox | smtp (email) | twilio (sms, whatsapp) | voice_http (voice)")
    settings: dict[str, Any] = Field(default_factory=dict, description="The provider's settings (see docs/channels.md and docs/channels/)")
    secrets: dict[str, str | None] = Field(
        default_factory=dict, description="Credentials; one left out keeps its stored value, empty removes it"
    )


class ChannelConfigOut(BaseModel):
    channel: str
    provider: str
    settings: dict[str, Any]
    secrets: dict[str, str | None] = Field(description="Masked: never more than the last 4 characters")
    generated_secrets: dict[str, str] = Field(default_factory=dict, description="Secrets created now, shown this once")
    updated_at: datetime | None


def _key(request: Request) -> str:
    return key_from_settings(request.app.state.settings)


@router.get("/channels", response_model=list[ChannelConfigOut], summary="Every channel's provider and settings")
def list_channels(request: Request, principal: Reader, session: DbSession) -> Any:
    key = _key(request)
    return [
        channel_config.describe(channel_config.get_config(session, organization_id=principal.organization_id, channel=c), c, key)
        for c in channel_config.MESSAGING_CHANNELS
    ]


@router.get("/channels/{channel}", response_model=ChannelConfigOut, summary="One channel's provider and settings")
def get_channel(channel: str, request: Request, principal: Reader, session: DbSession) -> Any:
    channel_config._check_channel(channel)
    config = channel_config.get_config(session, organization_id=principal.organization_id, channel=channel)
    return channel_config.describe(config, channel, _key(request))


@router.put("/channels/{channel}", response_model=ChannelConfigOut, summary="Choose and configure a channel's provider")
def put_channel(
    channel: str, body: ChannelConfigIn, request: Request, session: DbSession, clock: AppClock, principal: Principal = Admin
) -> Any:
    key = _key(request)
    before = channel_config.describe(
        channel_config.get_config(session, organization_id=principal.organization_id, channel=channel)
        if channel in channel_config.CHANNEL_PROVIDERS else None, channel, key,
    )
    config, generated = channel_config.put_config(
        session, organization_id=principal.organization_id, channel=channel, provider=body.provider,
        settings=body.settings, secrets=body.secrets, key=key, now=clock.now(),
    )
    after = channel_config.describe(config, channel, key)
    changes = {f: (before[f], after[f]) for f in ("provider", "settings", "secrets") if before[f] != after[f]}
    audit.record_changes(
        session, principal=principal, at=clock.now(), entity_type="channel", entity_id=config.id,
        changes=changes, description_prefix=f"Channel {channel}",
    )
    return {**after, "generated_secrets": generated}


class InboundOut(BaseModel):
    signing_secret: str | None = Field(description="Masked, except right after a rotation")
    signature_header: str = webhooks.SIGNATURE_HEADER
    urls: dict[str, str]


def _inbound_urls(request: Request, organization_id: int) -> dict[str, str]:
    base = f"{request.app.state.settings.public_url.rstrip('/')}/api/v1/webhooks/{organization_id}"
    return {"delivery": f"{base}/delivery", "payments": f"{base}/payments"}


@router.get("/channels-inbound", response_model=InboundOut, summary="Where and how to send inbound webhooks")
def get_inbound(request: Request, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    secret = channel_config.inbound_secret(session, organization_id=principal.organization_id, key=_key(request), now=clock.now())
    return {"signing_secret": mask(secret), "urls": _inbound_urls(request, principal.organization_id)}


@router.post("/channels-inbound/rotate-secret", response_model=InboundOut, summary="New inbound signing secret (shown once)")
def rotate_inbound(request: Request, session: DbSession, clock: AppClock, principal: Principal = Admin) -> Any:
    secret = channel_config.rotate_inbound_secret(
        session, organization_id=principal.organization_id, key=_key(request), now=clock.now()
    )
    audit.record(session, principal=principal, at=clock.now(), entity_type="channel", entity_id=None,
                 action="rotate_secret", description="Inbound webhook signing secret rotated")
    return {"signing_secret": secret, "urls": _inbound_urls(request, principal.organization_id)}


class OutboxOut(BaseModel):
    id: int
    account_id: int
    channel: str
    to: str
    subject: str | None
    body_text: str
    body_html: str | None
    tone: str | None
    provider_ref: str
    created_at: datetime


@router.get("/sandbox/outbox", response_model=Page[OutboxOut], summary="What the sandbox provider would have sent, newest first")
def list_outbox(
    principal: Reader, session: DbSession, page: PageParams = Depends(),
    channel: Literal["email", "sms", "whatsapp", "voice"] | None = None, account_id: int | None = None,
) -> Any:
    stmt = select(SandboxMessage).where(SandboxMessage.organization_id == principal.organization_id)
    if channel is not None:
        stmt = stmt.where(SandboxMessage.channel == channel)
    if account_id is not None:
        stmt = stmt.where(SandboxMessage.account_id == account_id)
    return paginate(session, stmt, SandboxMessage.id, page, lambda m: OutboxOut.model_validate(m, from_attributes=True),
                    descending=True)


# --- duecourse's own signed inbound webhooks ---------------------------------------------------


async def signed_event(request: Request, model: type[M], *, secret: str, now: datetime) -> M:
    """A webhook in duecourse's own contract: signature checked (401), body parsed as ``model`` (400),
    before anything changes."""
    body = await request.body()
    data = webhooks.signed_json(secret, body, request.headers.get(webhooks.SIGNATURE_HEADER), now=now)
    return webhooks.parse_event(model, data)


def org_secret(request: Request, session: Any, organization_id: int, now: datetime) -> str:
    """The organization's inbound signing secret (404 for an unknown organization)."""
    if session.get(Organization, organization_id) is None:
        raise NotFound("No such organization")
    return channel_config.inbound_secret(session, organization_id=organization_id, key=_key(request), now=now)


class DeliveryEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=200)
    status: Literal["delivered", "bounced", "failed", "undelivered"]
    provider_ref: str | None = Field(None, max_length=255)
    queue_item_id: int | None = None
    error: str | None = Field(None, max_length=2000)


@hooks.post("/webhooks/{organization_id}/delivery", summary="Delivery report or bounce (signed; idempotent by event id)")
async def delivery_webhook(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> dict[str, Any]:
    now = clock.now()
    event = await signed_event(request, DeliveryEvent, secret=org_secret(request, session, organization_id, now), now=now)
    if event.provider_ref is None and event.queue_item_id is None:
        raise webhooks.BadWebhook("give provider_ref or queue_item_id")
    if not webhooks.receive_once(session, organization_id=organization_id, source="delivery", event_id=event.id, now=now):
        return {"result": "duplicate"}
    try:
        result = outcomes.record_delivery(
            session, organization_id=organization_id, now=now, status=event.status,
            queue_item_id=event.queue_item_id, provider_ref=event.provider_ref, error=event.error,
        )
    except NotFound:
        raise webhooks.BadWebhook("unknown message: no queue item with that provider_ref or id") from None
    return {"result": result}


class PaymentEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=200)
    payment: dict[str, Any]


@hooks.post("/webhooks/{organization_id}/payments", summary="Payment received (signed; idempotent by event id)")
async def payment_webhook(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> dict[str, Any]:
    now = clock.now()
    event = await signed_event(request, PaymentEvent, secret=org_secret(request, session, organization_id, now), now=now)
    payment_in = webhooks.parse_event(PaymentIn, {k: v for k, v in event.payment.items() if k != "source"})
    if not webhooks.receive_once(session, organization_id=organization_id, source="payment", event_id=event.id, now=now):
        return {"result": "duplicate"}
    payment = ledger.create_payment(session, organization_id=organization_id, data=payment_in, now=now, source="webhook")
    return {"result": "recorded", "payment_id": payment.id}
