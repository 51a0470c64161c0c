"""One engine cycle (SPEC §4.10): scheduled strategy runs, auto-enqueue, then every due dispatch.

``duecourse tick --at`` runs exactly this at a given time; the scheduler runs it every N minutes.
Each scheduled run is claimed through a ``scheduler_claims`` row (unique per organization, job and
slot), so when several schedulers run at once exactly one of them performs it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.campaigns.service import transition
from duecourse.channels.simulated import simulate_outcomes
from duecourse.db import Database
from duecourse.db.dialect import insert_for
from duecourse.engine.assign import assign_by_trigger, campaigns_enqueueable
from duecourse.engine.dispatch import ProviderFactory, run_due, sandbox_providers
from duecourse.engine.enqueue import enqueue
from duecourse.engine.models import SchedulerClaim
from duecourse.engine.outcomes import expire_callbacks, expire_step_timeouts, settle_promises
from duecourse.engine.timing import last_automation_slot, local_date, weekday_set
from duecourse.strategies.models import Strategy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.service import get_settings


def claim_slot(session: Session, *, organization_id: int, job: str, slot: str, worker: str, now: datetime) -> bool:
    """True for exactly one caller per (organization, job, slot), across processes."""
    stmt = (
        insert_for(session, SchedulerClaim.__table__)
        .values(organization_id=organization_id, job=job, slot=slot, claimed_by=worker, claimed_at=now)
        .on_conflict_do_nothing(index_elements=["organization_id", "job", "slot"])
    )
    return (session.execute(stmt.execution_options(preserve_rowcount=True)).rowcount or 0) == 1


def complete_ended_campaigns(session: Session, *, org: Organization, now: datetime, worker: str) -> int:
    """§5: once a night (the first cycle of each local day), campaigns past their end date complete,
    through the same transition as the Complete button (pending items cancelled, audited)."""
    today = local_date(now, org.timezone)
    if not claim_slot(session, organization_id=org.id, job="complete_campaigns", slot=today.isoformat(), worker=worker, now=now):
        return 0
    ended = session.scalars(
        select(Campaign.id).where(
            Campaign.organization_id == org.id,
            Campaign.status.in_([CampaignStatus.active.value, CampaignStatus.paused.value]),
            Campaign.end_date < today,
        )
    ).all()
    for campaign_id in ended:
        transition(session, principal=Principal.system(org.id), campaign_id=campaign_id, action="complete", now=now)
    return len(ended)


def run_scheduled(session: Session, *, org: Organization, now: datetime, worker: str) -> dict[str, int]:
    """The strategies' scheduled runs whose latest slot has passed, and auto-enqueue (§4.5)."""
    counts = {"strategy_runs": 0, "assigned": 0, "enqueued": 0}
    # Outcome bookkeeping (§4.10) runs even while paused: it sends nothing.
    settled = settle_promises(session, organization_id=org.id, now=now)
    counts["promises_kept"], counts["promises_broken"] = settled["kept"], settled["broken"]
    counts["callbacks_expired"] = expire_callbacks(session, organization_id=org.id, now=now)
    counts["step_timeouts"] = expire_step_timeouts(session, organization_id=org.id, now=now)
    counts["campaigns_completed"] = complete_ended_campaigns(session, org=org, now=now, worker=worker)
    settings = get_settings(session, org.id)
    if settings.sandbox.simulate_outcomes:  # demo: the sandbox's messages get outcomes, like webhooks (even while paused)
        counts.update(simulate_outcomes(session, organization_id=org.id, now=now))
    if settings.automation.engine_paused:
        return counts
    strategies = session.scalars(
        select(Strategy).where(Strategy.organization_id == org.id, Strategy.active.is_(True)).order_by(Strategy.priority, Strategy.id)
    ).all()
    for strategy in strategies:
        slot = last_automation_slot(now, tz=org.timezone, at=strategy.automation_time, days=weekday_set(strategy.automation_days))
        if slot is None or (strategy.last_run_at is not None and strategy.last_run_at >= slot):
            continue
        if not claim_slot(session, organization_id=org.id, job=f"strategy:{strategy.id}", slot=slot.isoformat(), worker=worker, now=now):
            continue
        counts["strategy_runs"] += 1
        counts["assigned"] += assign_by_trigger(session, strategy=strategy, org=org, rates=settings.exchange_rates, now=now)
        result = enqueue(session, organization_id=org.id, now=now, strategy_id=strategy.id, cause="scheduled_run")
        counts["assigned"] += result.assigned
        counts["enqueued"] += result.enqueued
        strategy.last_run_at = now
    if settings.automation.auto_enqueue:
        today = local_date(now, org.timezone)
        for campaign_id in session.scalars(select(Campaign.id).where(campaigns_enqueueable(org.id, today))).all():
            result = enqueue(session, organization_id=org.id, now=now, campaign_id=campaign_id, cause="auto_enqueue")
            counts["assigned"] += result.assigned
            counts["enqueued"] += result.enqueued
    return counts


def tick(
    db: Database,
    *,
    now: datetime,
    worker: str = "tick",
    providers: ProviderFactory = sandbox_providers,
    organization_id: int | None = None,
) -> dict[str, Any]:
    """One full cycle at ``now``: scheduler work for every organization (or one), then every due dispatch."""
    totals: dict[str, Any] = {}
    with db.transaction() as session:
        stmt = select(Organization.id).order_by(Organization.id)
        if organization_id is not None:
            stmt = stmt.where(Organization.id == organization_id)
        org_ids = session.scalars(stmt).all()
    for org_id in org_ids:
        with db.transaction() as session:
            org = session.get(Organization, org_id)
            assert org is not None
            for k, v in run_scheduled(session, org=org, now=now, worker=worker).items():
                totals[k] = totals.get(k, 0) + v
    totals["dispatch"] = run_due(db, now=now, worker=worker, providers=providers, organization_id=organization_id)
    return totals
