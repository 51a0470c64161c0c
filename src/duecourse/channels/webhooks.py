"""Inbound webhooks (SPEC §7): signatures, replay protection, and the shared answers.

duecourse's own webhook contract (delivery reports, bounces, call outcomes, payments) is signed
like this, with the secret of the source (the organization's inbound secret, or the voice
provider's webhook secret)::

    X-Duecourse-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

A signature older or newer than five minutes is refused, so a captured request cannot be replayed
later; each event carries an ``id``, and an id already handled changes nothing (``receive_once``).
Twilio's callbacks carry Twilio's own signature instead (see :mod:`duecourse.channels.twilio`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sqlalchemy.orm import Session

from duecourse.channels.models import WebhookReceipt
from duecourse.db.dialect import insert_for
from duecourse.errors import DomainError, Unauthorized

SIGNATURE_HEADER = "X-Duecourse-Signature"
M = TypeVar("M", bound=BaseModel)
TOLERANCE_SECONDS = 300


class BadWebhook(DomainError):
    """A malformed webhook body: 400, nothing changed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400, code="bad_webhook")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The header value for ``body`` sent at ``timestamp`` (providers and tests use this)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str | None, *, now: datetime) -> None:
    """Raise :class:`Unauthorized` unless ``header`` is a fresh, valid signature of ``body``."""
    if not header:
        raise Unauthorized(f"Missing {SIGNATURE_HEADER} header")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        raise Unauthorized("Malformed signature header") from None
    if abs(now.timestamp() - timestamp) > TOLERANCE_SECONDS:
        raise Unauthorized("Signature timestamp outside the allowed window")
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    given = [v for k, v in (p.split("=", 1) for p in header.split(",") if "=" in p) if k == "v1"]
    if not any(hmac.compare_digest(expected, g) for g in given):
        raise Unauthorized("Invalid webhook signature")


def receive_once(session: Session, *, organization_id: int, source: str, event_id: str, now: datetime) -> bool:
    """Record that this event is being handled; False when it already was (a replay)."""
    if not event_id or len(event_id) > 200:
        raise BadWebhook("event id missing or longer than 200 characters")
    stmt = (
        insert_for(session, WebhookReceipt)
        .values(organization_id=organization_id, source=source, event_id=event_id, received_at=now)
        .on_conflict_do_nothing(index_elements=["organization_id", "source", "event_id"])
    )
    return (session.execute(stmt.execution_options(preserve_rowcount=True)).rowcount or 0) == 1


def signed_json(secret: str, body: bytes, header: str | None, *, now: datetime) -> dict[str, Any]:
    """Check the signature (401), then read the body as a JSON object (400): before anything changes."""
    verify(secret, body, header, now=now)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadWebhook("body is not JSON") from None
    if not isinstance(data, dict):
        raise BadWebhook("body must be a JSON object")
    return data


def parse_event(model: type[M], data: dict[str, Any]) -> M:
    """The event as ``model``; the first problem, with its field path, as a 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadWebhook(f"{where + ': ' if where else ''}{first['msg']}") from None
