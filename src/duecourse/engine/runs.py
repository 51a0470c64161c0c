"""Strategy runs (SPEC §3 Run Now, §4.2 trigger-based assignment).

This is the assignment half of a strategy run: set-based, one pass over the organization's
unassigned accounts. Enqueueing the assigned cases' first actions (§4.4, §4.5) is added by the
engine's enqueue module.
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

from sqlalchemy import and_, false, insert, literal, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.db.base import MONEY_PLACES
from duecourse.db.dialect import date_plus_days
from duecourse.engine.models import ExecutionLogEntry
from duecourse.ledger.derived import days_overdue_expr, local_today_expr
from duecourse.ledger.models import Account, AccountStatus, CollectionTab
from duecourse.strategies.models import Strategy, TriggerType
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.service import get_settings


def trigger_condition(
    session: Session, *, strategy: Strategy, org: Organization, rates: dict[str, Decimal], now: datetime
) -> ColumnElement[bool]:
    """SQL condition: the account matches the strategy's trigger (SPEC §3).

    ``amount_threshold`` compares the balance in the organization's base currency; the threshold
    is converted into each currency with a configured rate, so the comparison stays exact.
    Accounts in a currency without a rate never match an amount trigger.
    """
    if strategy.trigger_type == TriggerType.days_overdue:
        overdue = days_overdue_expr(session, organization_id=org.id, org_timezone=org.timezone, now=now)
        return and_(Account.carrying_due_date.is_not(None), overdue >= (strategy.trigger_days or 0))
    threshold = Decimal(strategy.trigger_amount or 0)
    per_currency = {org.base_currency: Decimal(1), **rates}
    conds = []
    for currency, rate in per_currency.items():
        if rate <= 0:
            continue
        local = (threshold / rate).quantize(Decimal(1).scaleb(-MONEY_PLACES), rounding=ROUND_CEILING)
        conds.append(and_(Account.currency == currency, Account.balance >= local))
    return or_(*conds) if conds else false()


def run_strategy_now(session: Session, *, strategy: Strategy, now: datetime, principal: Principal) -> dict[str, Any]:
    """Assign every unassigned, unblocked account with a balance whose trigger matches this strategy
    and for which no better-priority active strategy matches (SPEC §4.2). Returns counts."""
    org = session.get(Organization, strategy.organization_id)
    assert org is not None
    settings = get_settings(session, org.id)
    rates = settings.exchange_rates

    better = session.scalars(
        select(Strategy).where(
            Strategy.organization_id == org.id,
            Strategy.active.is_(True),
            Strategy.id != strategy.id,
            or_(
                Strategy.priority < strategy.priority,
                and_(Strategy.priority == strategy.priority, Strategy.id < strategy.id),
            ),
        )
    ).all()
    candidate = and_(
        Account.organization_id == org.id,
        Account.collection_tab == CollectionTab.outstanding.value,  # balance > 0, no strategy, not blocked/excluded
        Account.strategy_id.is_(None),
        Account.campaign_id.is_(None),
        Account.paused.is_(False),
        trigger_condition(session, strategy=strategy, org=org, rates=rates, now=now),
        *[~trigger_condition(session, strategy=s, org=org, rates=rates, now=now) for s in better],
    )
    if strategy.trigger_type == TriggerType.days_overdue:
        anchor: ColumnElement[Any] = date_plus_days(session, Account.carrying_due_date, strategy.trigger_days or 0)
    else:
        anchor = local_today_expr(session, organization_id=org.id, org_timezone=org.timezone, now=now)

    # Log first (the same condition still selects them), then assign, in one transaction.
    session.execute(
        insert(ExecutionLogEntry).from_select(
            ["organization_id", "account_id", "at", "event", "case_number", "cause", "details"],
            select(
                Account.organization_id,
                Account.id,
                literal(now, type_=ExecutionLogEntry.at.type),
                literal("assigned"),
                Account.case_number + 1,
                literal("strategy_trigger"),
                literal({"strategy_id": strategy.id, "strategy": strategy.name}, type_=ExecutionLogEntry.details.type),
            ).where(candidate),
        )
    )
    result = session.execute(
        update(Account)
        .where(candidate)
        .values(
            strategy_id=strategy.id,
            status=AccountStatus.pending_contact.value,
            collection_tab=CollectionTab.scheduled.value,
            case_number=Account.case_number + 1,
            case_opened_at=now,
            case_anchor_date=anchor,
            case_invoice_id=Account.carrying_invoice_id,
            case_next_stage=None,
            case_prev_completed_at=None,
            case_retry_count=0,
            case_sequence_finished=False,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    strategy.last_run_at = now
    return {"strategy_id": strategy.id, "assigned": result.rowcount or 0, "enqueued": 0}
