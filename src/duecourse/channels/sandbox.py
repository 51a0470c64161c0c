"""The sandbox provider: the embedded default for every channel. It sends nothing; it records each
message in the outbox, in the dispatch's own transaction, so the outbox and the queue never disagree."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.channels.base import OutboundMessage, SendResult
from duecourse.channels.models import SandboxMessage


class SandboxProvider:
    in_transaction = True  # writes its outbox row in the dispatch's own transaction

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now

    def send(self, message: OutboundMessage) -> SendResult:
        existing = self.session.scalar(
            select(SandboxMessage).where(SandboxMessage.idempotency_key == message.idempotency_key)
        )
        if existing is not None:  # the same attempt again: never a second message
            return SendResult(existing.provider_ref)
        row = SandboxMessage(
            organization_id=message.organization_id,
            account_id=message.account_id,
            idempotency_key=message.idempotency_key,
            provider_ref=f"sandbox-{message.idempotency_key}",
            channel=message.channel,
            to=message.to,
            subject=message.subject,
            body_text=message.body_text,
            body_html=message.body_html,
            tone=message.tone,
            created_at=self.now,
        )
        self.session.add(row)
        self.session.flush()
        return SendResult(row.provider_ref)
