"""Execution KPIs (SPEC §8): what the Execution page and ``GET /engine/kpis`` show."""

from __future__ import annotations

from datetime import datetime, time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from duecourse.engine.models import QueueItem
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
