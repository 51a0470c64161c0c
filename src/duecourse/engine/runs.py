"""Strategy runs (SPEC §3 Run Now, §4.5 scheduled runs): assign by trigger, then enqueue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from duecourse.engine.assign import assign_by_trigger
from duecourse.engine.enqueue import enqueue
from duecourse.strategies.models import Strategy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.service import get_settings


def run_strategy_now(session: Session, *, strategy: Strategy, now: datetime, principal: Principal) -> dict[str, Any]:
    """Assign matching accounts to the strategy and enqueue the due actions of its cases."""
    org = session.get(Organization, strategy.organization_id)
    assert org is not None
    settings = get_settings(session, org.id)
    assigned = assign_by_trigger(session, strategy=strategy, org=org, rates=settings.exchange_rates, now=now)
    result = enqueue(session, organization_id=org.id, now=now, strategy_id=strategy.id, cause="run_now")
    strategy.last_run_at = now
    return {**result.as_dict(), "strategy_id": strategy.id, "assigned": assigned + result.assigned}
