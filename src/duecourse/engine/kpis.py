"""Execution KPIs (SPEC §8): what the Execution page and ``GET /engine/kpis`` show."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from duecourse.engine.models import Direction, Interaction, InteractionStatus, QueueItem
from duecourse.ledger.models import Payment, Promise
from duecourse.engine.timing import at_local, local_date
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings


def engine_kpis(session: Session, *, organization_id: int, now: datetime) -> dict[str, Any]:
    """Pending and processing items now; completed, failed and skipped since local midnight of the
    organization's time zone ("today"); and whether the organization's engine is paused."""
    org = session.get(Organization, organization_id)
    assert org is not None
    start = at_local(local_date(now, org.timezone), time(0, 0), org.timezone)
    org_items = QueueItem.organization_id == org.id
    live = dict(
        session.execute(
            select(QueueItem.status, func.count())
            .where(org_items, QueueItem.status.in_(["pending", "processing"]))
            .group_by(QueueItem.status)
        ).all()
    )
    today = dict(
        session.execute(
            select(QueueItem.status, func.count())
            .where(org_items, QueueItem.status.in_(["completed", "failed", "skipped"]), QueueItem.finished_at >= start)
            .group_by(QueueItem.status)
        ).all()
    )
    return {
        "pending": live.get("pending", 0),
        "processing": live.get("processing", 0),
        "completed_today": today.get("completed", 0),
        "failed_today": today.get("failed", 0),
        "skipped_today": today.get("skipped", 0),
        "engine_paused": get_settings(session, org.id).automation.engine_paused,
        "since": start,
    }


SERIES = ("sent", "delivered", "failed", "promises", "payments")
CONTACTS = ("email", "sms", "whatsapp", "voice")


def daily_outcomes(session: Session, *, organization_id: int, now: datetime, days: int = 30) -> dict[str, Any]:
    """Per day of the organization's calendar, the last ``days`` days up to today (SPEC §8 chart):
    messages sent (outbound email, SMS, WhatsApp and calls), of those delivered, failures (dispatches
    that failed and deliveries that bounced or failed), promises made and payments received.
    One grouped query per series; the day is found in SQL from the local midnights' UTC instants, so
    both databases agree and daylight-saving days have their true length."""
    org = session.get(Organization, organization_id)
    assert org is not None
    today = local_date(now, org.timezone)
    dates = [today - timedelta(days=days - 1 - i) for i in range(days)]
    edges = [at_local(d, time(0, 0), org.timezone) for d in dates] + [
        at_local(today + timedelta(days=1), time(0, 0), org.timezone)
    ]

    def day_of(column: Any) -> Any:
        return case(*[(column < edges[i + 1], literal(i)) for i in range(days)], else_=literal(-1))

    def counted(column: Any, *where: Any) -> dict[int, int]:
        day = day_of(column)
        rows = session.execute(
            select(day, func.count()).where(column >= edges[0], column < edges[-1], *where).group_by(day)
        ).all()
        return {int(d): int(n) for d, n in rows}

    outbound = (Interaction.organization_id == org.id, Interaction.direction == Direction.outbound.value,
                Interaction.channel.in_(CONTACTS))
    sent = counted(Interaction.occurred_at, *outbound)
    delivered = counted(Interaction.occurred_at, *outbound, Interaction.status == InteractionStatus.delivered.value)
    bounced = counted(Interaction.occurred_at, *outbound,
                      Interaction.status.in_([InteractionStatus.bounced.value, InteractionStatus.failed.value]))
    failed_items = counted(QueueItem.finished_at, QueueItem.organization_id == org.id, QueueItem.status == "failed")
    promises = counted(Promise.created_at, Promise.organization_id == org.id)
    paid = dict(
        session.execute(
            select(Payment.paid_on, func.count())
            .where(Payment.organization_id == org.id, Payment.paid_on >= dates[0], Payment.paid_on <= today)
            .group_by(Payment.paid_on)
        ).all()
    )
    out = []
    for i, d in enumerate(dates):
        out.append({
            "date": d,
            "sent": sent.get(i, 0),
            "delivered": delivered.get(i, 0),
            "failed": bounced.get(i, 0) + failed_items.get(i, 0),
            "promises": promises.get(i, 0),
            "payments": int(paid.get(d, 0)),
        })
    return {"days": out, "totals": {k: sum(day[k] for day in out) for k in SERIES}}
