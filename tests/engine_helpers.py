"""Builders for engine scenarios: strategies, debtors and invoices written straight to the database."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.engine.models import ExecutionLogEntry, QueueItem
from duecourse.ledger.derived import refresh_accounts
from duecourse.ledger.models import Account, Invoice
from duecourse.strategies.models import Stage, Strategy
from duecourse.tenancy import service as tenancy


def strategy(session: Session, org_id: int, now: datetime, stages: list[tuple[str, str, int]], **kw: Any) -> Strategy:
    """``stages``: (action, timing, days) with timing ``t`` (days_from_trigger) or ``p`` (days_from_previous)."""
    fields: dict[str, Any] = dict(
        name=f"S{now.timestamp()}-{len(stages)}-{kw.get('name', '')}",
        type="standard",
        description="scenario",
        active=True,
        multi_stage_handling="run_all_in_order",
        first_action_logic="standard",
        trigger_type="days_overdue",
        trigger_days=0,
        priority=10,
        automation_time="07:00",
        automation_days="mon,tue,wed,thu,fri",
        created_at=now,
        updated_at=now,
    )
    fields.update(kw)
    s = Strategy(organization_id=org_id, **fields)
    s.stages = [
        Stage(
            position=i,
            action_type=a,
            timing_type="days_from_trigger" if t == "t" else "days_from_previous",
            days=d,
        )
        for i, (a, t, d) in enumerate(stages)
    ]
    session.add(s)
    session.flush()
    return s


def debtor(
    session: Session, org_id: int, now: datetime, ext: str, *, due: date, total: str = "100.00", **kw: Any
) -> Account:
    fields: dict[str, Any] = dict(name=ext, currency="EUR", email=f"{ext.lower()}@example.com", phone="+34600111222")
    fields.update(kw)
    a = Account(organization_id=org_id, external_id=ext, created_at=now, updated_at=now, **fields)
    session.add(a)
    session.flush()
    session.add(
        Invoice(
            organization_id=org_id, account_id=a.id, external_id=f"{ext}-1", number=f"{ext}-1", currency=a.currency,
            total=Decimal(total), issue_date=due - timedelta(days=30), due_date=due, created_at=now, updated_at=now,
        )
    )
    session.flush()
    return a


def refresh(session: Session, org_id: int, now: datetime) -> None:
    refresh_accounts(session, organization_id=org_id, exclusions=tenancy.get_settings(session, org_id).exclusions, now=now)


def items(session: Session, account_id: int) -> list[tuple[int, str, datetime, str | None]]:
    rows = session.scalars(select(QueueItem).where(QueueItem.account_id == account_id).order_by(QueueItem.id)).all()
    return [(q.stage_index, q.status.value, q.scheduled_at, q.reason) for q in rows]


def log(session: Session, account_id: int) -> list[tuple[str, int | None, str | None]]:
    rows = session.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == account_id).order_by(ExecutionLogEntry.id)).all()
    return [(e.event, e.stage_index, e.reason) for e in rows]
