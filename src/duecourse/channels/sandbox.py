"""The sandbox provider: the embedded default for every channel. It sends nothing; it records each
message in the outbox, in the dispatch's own transaction, so the outbox and the queue never disagree."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from duecourse.channels.base import OutboundMessage, SendResult
from duecourse.channels.models import SandboxMessage
from duecourse.engine import dispatch_rows


class SandboxProvider:
    in_transaction = True  # writes its outbox row in the dispatch's own transaction

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now

    def send(self, message: OutboundMessage) -> SendResult:
        # The row is written in the dispatch's transaction: if it rolls back, there is no row and the
        # item is still to do; if it commits, the item is completed and never sent again. The unique
        # idempotency key is the last guard against a second row for the same attempt.
        provider_ref = f"sandbox-{message.idempotency_key}"
        row = dict(
            organization_id=message.organization_id,
            account_id=message.account_id,
            idempotency_key=message.idempotency_key,
            provider_ref=provider_ref,
            channel=message.channel,
            to=message.to,
            subject=message.subject,
            body_text=message.body_text,
            body_html=message.body_html,
            tone=message.tone,
            created_at=self.now,
        )
        batch = dispatch_rows.current(self.session)
        if batch is not None:
            batch.outbox.append(row)  # inserted with the batch's other rows, before its commit
        else:
            self.session.add(SandboxMessage(**row))
        return SendResult(provider_ref)
