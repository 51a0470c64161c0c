"""Twilio's callbacks (SPEC §7): delivery status of our messages, and the debtors' replies.

Both routes are form-encoded POSTs signed by Twilio with ``X-Twilio-Signature`` (see
:mod:`duecourse.channels.twilio`), verified with the organization's auth token of the channel the
message belongs to (``whatsapp`` when the numbers carry the ``whatsapp:`` prefix, else ``sms``)
over the *public* URL (``DUECOURSE_PUBLIC_URL`` + path), so verification works behind proxies.
A missing or wrong signature answers 401 and changes nothing.

``POST /api/v1/webhooks/{organization_id}/twilio/status``
    ``MessageSid``, ``MessageStatus``, ``ErrorCode``, ``ErrorMessage``. ``delivered``, ``failed`` and
    ``undelivered`` go to :func:`duecourse.engine.outcomes.record_delivery` (a failure completes the
    stage with a delivery failure and enqueues the next stage); every other status (``queued``,
    ``sent``, ``read``…) is acknowledged and changes nothing. Idempotent by (MessageSid, MessageStatus).
    An unknown MessageSid (not a message this organization sent) is logged and answered 200
    ``{"result": "unknown_message"}`` without changing anything: Twilio treats any other answer as a
    failure of our endpoint, and no retry could make the SID known.

``POST /api/v1/webhooks/{organization_id}/twilio/inbound``
    ``From``, ``To``, ``Body``, ``MessageSid``. Every message is recorded as an inbound interaction of
    each account whose number (``phone`` for SMS, ``whatsapp`` for WhatsApp) is ``From``, and in the
    execution log (``inbound_message``). STOP, STOPALL, UNSUBSCRIBE, CANCEL, END and QUIT opt those
    accounts out of the channel (``opted_out``, reason ``stop_reply``); START and UNSTOP opt them back
    in (``opted_in``, reason ``start_reply``); so does Twilio's ``OptOutType`` (Advanced Opt-Out) when
    present. Idempotent by MessageSid. Answers empty TwiML.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from duecourse.channels import config as channel_config
from duecourse.channels import webhooks
from duecourse.channels.secrets import key_from_settings
from duecourse.channels.twilio import SIGNATURE_HEADER, WHATSAPP_PREFIX, verify_twilio_signature
from duecourse.deps import AppClock, DbSession
from duecourse.engine import outcomes
from duecourse.engine.cases import log_event
from duecourse.engine.models import Direction, Interaction, InteractionStatus, QueueItem
from duecourse.errors import NotFound, Unauthorized
from duecourse.ledger.models import Account
from duecourse.tenancy.models import Organization
from duecourse.validation import phone_e164

log = logging.getLogger(__name__)

router = APIRouter(tags=["inbound webhooks"])

FINAL_STATUSES = ("delivered", "failed", "undelivered")
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP"})
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


def _form_doc(fields: dict[str, str], required: list[str]) -> dict[str, Any]:
    """The OpenAPI description of a Twilio form body (the route reads the raw body to check the signature)."""
    schema = {"type": "object", "required": required,
              "properties": {name: {"type": "string", "description": text} for name, text in fields.items()}}
    return {"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}},
            "parameters": [{"name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
                            "description": "Twilio's request signature (HMAC-SHA1 with the channel's auth token)"}]}


STATUS_FORM = _form_doc({
    "MessageSid": "The message SID (SM…) returned when it was sent",
    "MessageStatus": "queued | sent | delivered | failed | undelivered | read …",
    "ErrorCode": "Twilio's error code for failed / undelivered",
    "ErrorMessage": "Optional error text",
    "From": "Sender (whatsapp:+… for WhatsApp)",
    "To": "Recipient (whatsapp:+… for WhatsApp)",
}, ["MessageSid", "MessageStatus"])
INBOUND_FORM = _form_doc({
    "MessageSid": "The incoming message's SID",
    "From": "The debtor's number (whatsapp:+… for WhatsApp)",
    "To": "Your Twilio number",
    "Body": "The text; STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT opt out; START, UNSTOP opt back in",
    "OptOutType": "Set by Twilio's Advanced Opt-Out: STOP | START | HELP",
}, ["MessageSid", "From"])


def _public_url(request: Request, organization_id: int, kind: str) -> str:
    """The URL Twilio was given (and signed): the public address, not the one the proxy forwarded to."""
    base = request.app.state.settings.public_url.rstrip("/")
    url = f"{base}/api/v1/webhooks/{organization_id}/twilio/{kind}"
    return f"{url}?{request.url.query}" if request.url.query else url


def _channel_of(*numbers: str | None) -> str:
    return "whatsapp" if any((n or "").startswith(WHATSAPP_PREFIX) for n in numbers) else "sms"


async def _verified_form(
    request: Request, session: Session, *, organization_id: int, kind: str
) -> tuple[dict[str, str], str]:
    """Parse the form and check Twilio's signature; returns (fields, channel). 404 for an unknown
    organization, 401 for a missing or wrong signature or a channel not configured for Twilio."""
    if session.get(Organization, organization_id) is None:
        raise NotFound("No such organization")
    body = await request.body()
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise webhooks.BadWebhook("body is not a form") from None
    fields = dict(pairs)
    channel = _channel_of(fields.get("From"), fields.get("To"))
    config = channel_config.get_config(session, organization_id=organization_id, channel=channel)
    if config is None or config.provider != "twilio":
        raise Unauthorized(f"{channel} is not configured for Twilio in this organization")
    token = channel_config.read_secrets(config, key_from_settings(request.app.state.settings)).get("auth_token", "")
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise Unauthorized(f"Missing {SIGNATURE_HEADER} header")
    if not verify_twilio_signature(token, _public_url(request, organization_id, kind), pairs, signature):
        raise Unauthorized("Invalid Twilio signature")
    return fields, channel


@router.post(
    "/webhooks/{organization_id}/twilio/status",
    summary="Twilio message status callback (signed by Twilio; idempotent by MessageSid and status)",
    openapi_extra=STATUS_FORM,
)
async def twilio_status(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> dict[str, Any]:
    fields, channel = await _verified_form(request, session, organization_id=organization_id, kind="status")
    now = clock.now()
    sid = (fields.get("MessageSid") or fields.get("SmsSid") or "").strip()
    status = (fields.get("MessageStatus") or fields.get("SmsStatus") or "").strip().lower()
    if not sid or not status:
        raise webhooks.BadWebhook("MessageSid and MessageStatus are required")
    if status not in FINAL_STATUSES:
        return {"result": "acknowledged", "status": status}
    # Any item with this message: a report can arrive before the worker has recorded the send
    # (record_delivery keeps it for then), and Twilio never sends again a callback answered 200.
    item = session.scalar(
        select(QueueItem.id).where(QueueItem.organization_id == organization_id, QueueItem.provider_ref == sid)
        .order_by(QueueItem.id.desc()).limit(1)
    )
    if item is None:
        log.warning("Twilio status %s for unknown message %s (organization %s, %s): ignored",
                    status, sid, organization_id, channel)
        return {"result": "unknown_message"}
    if not webhooks.receive_once(session, organization_id=organization_id, source="twilio_status",
                                 event_id=f"{sid}:{status}", now=now):
        return {"result": "duplicate"}
    error = None
    if status != "delivered":
        code, text = fields.get("ErrorCode"), fields.get("ErrorMessage")
        error = " ".join(p for p in (f"Twilio error {code}" if code else f"Twilio {status}", f"({text})" if text else "") if p)
    result = outcomes.record_delivery(
        session, organization_id=organization_id, now=now, status=status, queue_item_id=item, error=error,
    )
    return {"result": result}


def _matching_accounts(session: Session, *, organization_id: int, channel: str, number: str) -> list[Account]:
    column = Account.whatsapp if channel == "whatsapp" else Account.phone
    raw = number[len(WHATSAPP_PREFIX):] if number.startswith(WHATSAPP_PREFIX) else number
    candidates = {raw.strip()}
    try:
        candidates.add(phone_e164(raw))
    except ValueError:
        pass
    return list(session.scalars(
        select(Account).where(Account.organization_id == organization_id, or_(*(column == c for c in candidates)))
        .order_by(Account.id).with_for_update()
    ))


def _twiml() -> Response:
    return Response(EMPTY_TWIML, media_type="text/xml")


@router.post(
    "/webhooks/{organization_id}/twilio/inbound",
    summary="Incoming SMS or WhatsApp message (signed by Twilio): STOP / START replies, inbound interactions",
    response_class=Response,
    responses={200: {"content": {"text/xml": {}}, "description": "Empty TwiML: no automatic reply"}},
    openapi_extra=INBOUND_FORM,
)
async def twilio_inbound(organization_id: int, request: Request, session: DbSession, clock: AppClock) -> Response:
    fields, channel = await _verified_form(request, session, organization_id=organization_id, kind="inbound")
    now = clock.now()
    sid = (fields.get("MessageSid") or fields.get("SmsSid") or "").strip()
    sender = (fields.get("From") or "").strip()
    if not sid or not sender:
        raise webhooks.BadWebhook("MessageSid and From are required")
    if not webhooks.receive_once(session, organization_id=organization_id, source="twilio_inbound", event_id=sid, now=now):
        return _twiml()
    body = fields.get("Body") or ""
    keyword = body.strip().upper()
    accounts = _matching_accounts(session, organization_id=organization_id, channel=channel, number=sender)
    if not accounts:
        log.info("Twilio %s message %s from a number no account has (organization %s)", channel, sid, organization_id)
    flag = f"opt_out_{channel}"
    # Twilio's Advanced Opt-Out adds OptOutType (STOP, START, HELP) for the keywords configured there.
    opt_type = (fields.get("OptOutType") or "").strip().upper()
    opt: bool | None = None
    if keyword in STOP_WORDS or opt_type == "STOP":
        opt = True
    elif keyword in START_WORDS or opt_type == "START":
        opt = False
    summary = None
    if opt is True:
        summary = f"{keyword[:40]} reply: opted out of {channel}"
    elif opt is False:
        summary = f"{keyword[:40]} reply: opted back in to {channel}"
    for account in accounts:
        session.add(Interaction(
            organization_id=organization_id, account_id=account.id, strategy_id=account.strategy_id,
            campaign_id=account.campaign_id, channel=channel, direction=Direction.inbound,
            status=InteractionStatus.received, provider_ref=sid, summary=summary, transcript=body,
            occurred_at=now, created_at=now,
        ))
        log_event(session, account, at=now, event="inbound_message", cause="twilio",
                  details={"channel": channel, "message_sid": sid, "from": sender, "body": body[:500]})
        # A reply completes a WhatsApp conversation stage that waits for one (§4.8).
        outcomes.record_reply(session, account, channel=channel, now=now, provider_ref=sid)
        if opt is None:
            continue
        if getattr(account, flag) != opt:
            setattr(account, flag, opt)
            account.updated_at = now
        log_event(session, account, at=now, event="opted_out" if opt else "opted_in",
                  reason="stop_reply" if opt else "start_reply", cause="twilio",
                  details={"channel": channel, "message_sid": sid, "keyword": keyword[:40]})
    return _twiml()
