"""Opening cases (SPEC §4.2): assignment by campaign and by strategy trigger.

An account gets a strategy from its campaign, or, when it is in no campaign, from the triggers of
the active strategies (the lowest priority number wins). Opening a case sets the anchor date, bumps
the case number and chooses the first stage by the strategy's first-action logic (§4.4: "when a
case opens"), in the same ``UPDATE``; the ``assigned`` log entry records that stage and the logic.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

from sqlalchemy import and_, case, false, literal, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.db.base import MONEY_PLACES
from duecourse.db.dialect import date_plus_days
from duecourse.engine.log import log_accounts
from duecourse.engine.stages import StageSpec, first_stage, offsets
from duecourse.engine.timing import local_date
from duecourse.ledger.derived import days_between_expr, days_overdue_expr, local_today_expr
from duecourse.ledger.models import Account, AccountStatus, CollectionTab
from duecourse.strategies.models import Strategy, TriggerType
from duecourse.tenancy.models import Organization


def trigger_condition(
    session: Session, *, strategy: Strategy, org: Organization, rates: dict[str, Decimal], now: datetime
) -> ColumnElement[bool]:
    """SQL condition: the account matches the strategy's trigger (SPEC §3).

    ``amount_threshold`` compares the balance in the organization's base currency; the threshold
    is converted into each currency with a configured rate (rounded up), so the comparison stays
    exact. Accounts in a currency without a rate never match an amount trigger.
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


def anchor_expr(session: Session, *, strategy: Strategy, org: Organization, now: datetime) -> ColumnElement[Any]:
    """The anchor date of a new case: carrying due date + N for ``days_overdue``, else today (§4.2)."""
    if strategy.trigger_type == TriggerType.days_overdue:
        return date_plus_days(session, Account.carrying_due_date, strategy.trigger_days or 0)
    return local_today_expr(session, organization_id=org.id, org_timezone=org.timezone, now=now)


def stage_specs(strategy: Strategy) -> list[StageSpec]:
    return [StageSpec(s.position, str(s.action_type), str(s.timing_type), s.days) for s in strategy.stages]


def first_stage_expr(
    session: Session, *, strategy: Strategy, local_today: ColumnElement[Any], anchor: ColumnElement[Any]
) -> ColumnElement[Any] | None:
    """§4.4 as one CASE over the days from ``anchor`` to ``local_today`` (the step function of
    :func:`duecourse.engine.stages.first_stage`); None for a strategy without stages."""
    offs = offsets(stage_specs(strategy))
    if not offs:
        return None
    logic = str(strategy.first_action_logic)
    days = days_between_expr(session, local_today, anchor)
    # first_stage only changes value at the offsets and at 1, so evaluate it at those breakpoints.
    points = sorted({*offs, 1})
    whens = [(days >= p, literal(first_stage(logic, offs, p))) for p in reversed(points)]
    return case(*whens, else_=literal(first_stage(logic, offs, min(points) - 1)))


def new_case_values(session: Session, *, strategy: Strategy, org: Organization, now: datetime) -> dict[str, Any]:
    """The columns of a fresh case (or a restarted one) for an ``UPDATE accounts``: next case number,
    anchor, the carrying invoice it is opened on, the first stage (§4.4), nothing done yet."""
    return dict(
        status=AccountStatus.pending_contact.value,
        collection_tab=CollectionTab.scheduled.value,
        case_number=Account.case_number + 1,
        case_opened_at=now,
        case_opened_on=local_date(now, org.timezone),
        case_anchor_date=anchor_expr(session, strategy=strategy, org=org, now=now),
        case_invoice_id=Account.carrying_invoice_id,
        case_next_stage=first_case_stage(session, strategy=strategy, org=org, now=now),
        case_prev_completed_at=None,
        case_prev_completed_on=None,
        case_next_delay_days=None,
        case_retry_count=0,
        case_sequence_finished=False,
        case_tone_override=None,
        callback_at=None,
        updated_at=now,
    )


def first_case_stage(session: Session, *, strategy: Strategy, org: Organization, now: datetime) -> ColumnElement[Any] | None:
    """The first stage of a case opened (or restarted) at ``now``, as a SQL expression over the row.

    SQL evaluates every ``SET`` expression of an ``UPDATE`` on the row as it was, so this counts from
    the new anchor's expression, not from the ``case_anchor_date`` column."""
    return first_stage_expr(
        session,
        strategy=strategy,
        local_today=local_today_expr(session, organization_id=org.id, org_timezone=org.timezone, now=now),
        anchor=anchor_expr(session, strategy=strategy, org=org, now=now),
    )


def open_cases(
    session: Session,
    *,
    where: ColumnElement[bool],
    strategy: Strategy,
    org: Organization,
    now: datetime,
    cause: str,
) -> int:
    """Assign ``strategy`` to the accounts matching ``where`` and open their cases. Returns how many."""
    log_accounts(
        session,
        where=where,
        at=now,
        event="assigned",
        cause=cause,
        stage_index=first_case_stage(session, strategy=strategy, org=org, now=now),
        details={"strategy_id": strategy.id, "strategy": strategy.name, "first_action": str(strategy.first_action_logic)},
    )
    result = session.execute(
        update(Account)
        .where(where)
        .values(strategy_id=strategy.id, **new_case_values(session, strategy=strategy, org=org, now=now))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def _assignable(org_id: int) -> ColumnElement[bool]:
    # The Outstanding tab is exactly: money owed, no strategy, not blocked, not excluded (§6). An
    # account waiting for a promised payment or a callback it asked for is left alone until then
    # (§4.8), strategy or not: opening a case would contact the debtor before the promised date.
    return and_(
        Account.organization_id == org_id,
        Account.collection_tab == CollectionTab.outstanding.value,
        Account.strategy_id.is_(None),
        Account.paused.is_(False),
        Account.status.not_in((AccountStatus.promise_pending.value, AccountStatus.callback_pending.value)),
    )


def assign_by_trigger(
    session: Session, *, strategy: Strategy, org: Organization, rates: dict[str, Decimal], now: datetime
) -> int:
    """Assign the strategy to every assignable account outside campaigns that matches its trigger and
    matches no better-priority active strategy (ties: the older strategy wins)."""
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
    where = and_(
        _assignable(org.id),
        Account.campaign_id.is_(None),
        trigger_condition(session, strategy=strategy, org=org, rates=rates, now=now),
        *[~trigger_condition(session, strategy=s, org=org, rates=rates, now=now) for s in better],
    )
    return open_cases(session, where=where, strategy=strategy, org=org, now=now, cause="strategy_trigger")


def campaigns_enqueueable(org_id: int, today: date) -> ColumnElement[bool]:
    """Campaign condition: active and today within its dates (§5)."""
    return and_(
        Campaign.organization_id == org_id,
        Campaign.status == CampaignStatus.active.value,
        or_(Campaign.start_date.is_(None), Campaign.start_date <= today),
        or_(Campaign.end_date.is_(None), Campaign.end_date >= today),
    )


def assign_campaign_accounts(
    session: Session, *, org: Organization, today: date, now: datetime, campaign_id: int | None = None
) -> int:
    """Give the unassigned members of active campaigns (within their dates) the campaign's strategy."""
    stmt = select(Campaign).where(campaigns_enqueueable(org.id, today), Campaign.strategy_id.is_not(None))
    if campaign_id is not None:
        stmt = stmt.where(Campaign.id == campaign_id)
    total = 0
    for campaign in session.scalars(stmt).all():
        strategy = session.get(Strategy, campaign.strategy_id)
        if strategy is None or not strategy.active:
            continue
        where = and_(_assignable(org.id), Account.campaign_id == campaign.id)
        total += open_cases(session, where=where, strategy=strategy, org=org, now=now, cause="campaign")
    return total
