"""Trigger-based assignment on a strategy run (SPEC §3 Run Now, §4.2)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

from sqlalchemy import select

from duecourse.engine.models import ExecutionLogEntry
from duecourse.engine.runs import run_strategy_now
from duecourse.ledger.derived import refresh_accounts
from duecourse.ledger.models import Account, AccountStatus, Invoice
from duecourse.strategies.models import (
    ActionType,
    FirstActionLogic,
    MultiStageHandling,
    Stage,
    Strategy,
    StrategyType,
    TimingType,
    TriggerType,
)
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.principal import Principal


def _strategy(org_id, now, name, **kw):
    s = Strategy(
        organization_id=org_id,
        name=name,
        type=StrategyType.standard,
        description="d",
        active=True,
        multi_stage_handling=MultiStageHandling.run_all_in_order,
        first_action_logic=FirstActionLogic.standard,
        created_at=now,
        updated_at=now,
        **kw,
    )
    s.stages = [Stage(position=0, action_type=ActionType.phone_call, timing_type=TimingType.days_from_trigger, days=0)]
    return s


def _account(session, org_id, now, ext, *, due: date, total="100.00", currency="EUR", **kw):
    a = Account(organization_id=org_id, external_id=ext, name=ext, currency=currency, created_at=now, updated_at=now, **kw)
    session.add(a)
    session.flush()
    session.add(
        Invoice(
            organization_id=org_id, account_id=a.id, external_id=f"{ext}-1", number=f"{ext}-1", currency=currency,
            total=Decimal(total), issue_date=due - timedelta(days=30), due_date=due, created_at=now, updated_at=now,
        )
    )
    return a


def test_days_overdue_trigger_assigns_with_anchor_and_log(db, org, clock):
    now = clock.now()
    today = now.date()
    with db.transaction() as s:
        strat = _strategy(org.id, now, "Overdue 10", trigger_type=TriggerType.days_overdue, trigger_days=10)
        s.add(strat)
        late = _account(s, org.id, now, "LATE", due=today - timedelta(days=12))
        early = _account(s, org.id, now, "EARLY", due=today - timedelta(days=9))
        blocked = _account(s, org.id, now, "BLOCKED", due=today - timedelta(days=40), blocked=True, blocked_reason="x")
        s.flush()
        refresh_accounts(s, organization_id=org.id, exclusions=tenancy.get_settings(s, org.id).exclusions, now=now)
        result = run_strategy_now(s, strategy=strat, now=now, principal=Principal.system(org.id))
        ids = (late.id, early.id, blocked.id, strat.id)
    assert result["assigned"] == 1
    with db.transaction() as s:
        late, early, blocked = (s.get(Account, i) for i in ids[:3])
        assert late.strategy_id == ids[3] and late.status == AccountStatus.pending_contact
        assert late.case_anchor_date == today - timedelta(days=2)  # due date + N
        assert late.collection_tab == "scheduled" and late.case_number == 1
        assert early.strategy_id is None and early.status == AccountStatus.unassigned
        assert blocked.strategy_id is None
        log = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == late.id).order_by(ExecutionLogEntry.id)).all()
        assert (log[0].event, log[0].cause, log[0].details["strategy_id"]) == ("assigned", "strategy_trigger", ids[3])
        # Run Now also enqueues the new case's first action.
        assert log[0].stage_index == 0 and log[0].details["first_action"] == "standard"
        assert [(e.event, e.stage_index) for e in log[1:]] == [("enqueued", 0)]
        # A second run changes nothing: the account is no longer unassigned.
        again = run_strategy_now(s, strategy=s.get(Strategy, ids[3]), now=now, principal=Principal.system(org.id))
        assert again["assigned"] == 0


def test_amount_threshold_uses_exchange_rates_and_priority(db, org, clock):
    now = clock.now()
    today = now.date()
    with db.transaction() as s:
        tenancy.update_settings(s, principal=Principal.system(org.id), patch={"exchange_rates": {"USD": "0.5"}}, now=now)
        big = _strategy(org.id, now, "Big", trigger_type=TriggerType.amount_threshold, trigger_amount=Decimal("1000"), priority=1)
        any_overdue = _strategy(org.id, now, "Any", trigger_type=TriggerType.days_overdue, trigger_days=0, priority=50)
        s.add_all([big, any_overdue])
        eur = _account(s, org.id, now, "EUR-1000", due=today - timedelta(days=3), total="1000.00")
        usd_low = _account(s, org.id, now, "USD-1999", due=today - timedelta(days=3), total="1999.99", currency="USD")
        usd_high = _account(s, org.id, now, "USD-2000", due=today - timedelta(days=3), total="2000.00", currency="USD")
        gbp = _account(s, org.id, now, "GBP-9999", due=today - timedelta(days=3), total="9999.00", currency="GBP")
        s.flush()
        refresh_accounts(s, organization_id=org.id, exclusions=tenancy.get_settings(s, org.id).exclusions, now=now)
        # The lower-priority strategy runs first but must leave the accounts the better one matches.
        r_any = run_strategy_now(s, strategy=any_overdue, now=now, principal=Principal.system(org.id))
        r_big = run_strategy_now(s, strategy=big, now=now, principal=Principal.system(org.id))
        ids = {a.external_id: a.id for a in (eur, usd_low, usd_high, gbp)}
        sid = {"big": big.id, "any": any_overdue.id}
    assert (r_any["assigned"], r_big["assigned"]) == (2, 2)
    with db.transaction() as s:
        got = {ext: s.get(Account, i).strategy_id for ext, i in ids.items()}
    assert got == {"EUR-1000": sid["big"], "USD-2000": sid["big"], "USD-1999": sid["any"], "GBP-9999": sid["any"]}
