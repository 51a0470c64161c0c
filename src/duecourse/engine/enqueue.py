"""Enqueueing (SPEC §4.4, §4.5): from eligible cases to pending queue items with scheduled times.

Everything is set-based. Per active strategy (there are few) the stage plan is known in Python, so
each step is a handful of ``UPDATE``/``INSERT … SELECT`` statements over the strategy's accounts;
only the distinct (due date, time zone) pairs travel to Python, where the automation slot and the
channel's allowed hours are worked out with real time-zone rules (:mod:`duecourse.engine.timing`).

Idempotency: a stage of a case is never enqueued twice (``NOT EXISTS`` over the case's live and
dispatched items), and two processes racing are stopped by the partial unique index on live items
(``ON CONFLICT DO NOTHING``, or on PostgreSQL a plain insert that falls back to it: ``_plain_first``).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    MetaData,
    String,
    Table,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    not_,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from duecourse.campaigns.models import Campaign
from duecourse.db.dialect import date_plus_days, dialect_name, insert_for, roomy_joins, serialize_on
from duecourse.engine.assign import (
    assign_campaign_accounts,
    campaigns_enqueueable,
    first_case_stage,
    first_stage_expr,
    new_case_values,
    stage_specs,
)
from duecourse.engine.log import can_change_and_log, cancel_open_tasks, cancel_pending, change_and_log, log_accounts, log_items
from duecourse.engine.models import LIVE_ITEM_INDEX, LIVE_ITEM_PREDICATE, QueueItem, QueueStatus
from duecourse.engine.stages import StageSpec, offsets
from duecourse.engine.timing import (
    at_local,
    into_allowed_hours,
    local_date,
    next_automation_slot,
    weekday_set,
)
from duecourse.ledger.derived import local_today_expr, tab_expr
from duecourse.ledger.models import CONTACTABLE_STATUSES, Account, AccountStatus, CollectionTab
from duecourse.strategies.models import MultiStageHandling, Strategy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings
from duecourse.tenancy.settings import OrgSettings

# Stages of a case that already have an item in one of these statuses are not enqueued again.
_TAKEN = (QueueStatus.pending.value, QueueStatus.processing.value, QueueStatus.completed.value)
_HOURS_CHANNELS = ("email", "sms", "whatsapp", "voice")

_slots = Table(
    "dc_enqueue_slots",
    MetaData(),
    Column("due_date", Date, nullable=False),
    Column("tz", String(64), nullable=False),
    Column("scheduled_at", DateTime, nullable=False),
)
_SLOTS_DDL = "(due_date DATE NOT NULL, tz VARCHAR(64) NOT NULL, scheduled_at TIMESTAMP NOT NULL)"
_candidates = Table(
    "dc_enqueue_candidates",
    MetaData(),
    Column("account_id", BigInteger, primary_key=True),
    Column("due_date", Date, nullable=False),
    Column("tz", String(64), nullable=False),
)
_CANDIDATES_DDL = "(account_id BIGINT PRIMARY KEY, due_date DATE NOT NULL, tz VARCHAR(64) NOT NULL)"


@dataclass
class EnqueueResult:
    paused: bool = False
    assigned: int = 0
    restarted: int = 0
    reset: int = 0
    enqueued: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    """One strategy's constants for the statements of a pass."""

    org: Organization
    settings: OrgSettings
    strategy: Strategy
    stages: list[StageSpec]
    offsets: list[int]
    local_today: ColumnElement[Any]
    now: datetime
    cause: str


def enqueue(
    session: Session,
    *,
    organization_id: int,
    now: datetime,
    strategy_id: int | None = None,
    campaign_id: int | None = None,
    cause: str,
) -> EnqueueResult:
    """Evaluate eligible accounts and place their next actions in the queue (SPEC §4.5).

    Scope: one strategy's accounts (a strategy run), one campaign's accounts (Enqueue Campaign), or
    the whole organization. Nothing is enqueued while the organization's engine is paused (§4.3).
    """
    org = session.get(Organization, organization_id)
    if org is None:
        raise ValueError(f"organization {organization_id} does not exist")
    # One pass per organization at a time: a second process waits here, then finds the work done.
    serialize_on(session, Organization.__table__, org.id)
    settings = get_settings(session, org.id)
    result = EnqueueResult()
    if settings.automation.engine_paused:
        result.paused = True
        return result
    today = local_date(now, org.timezone)
    session.flush()
    if strategy_id is None:
        result.assigned += assign_campaign_accounts(session, org=org, today=today, now=now, campaign_id=campaign_id)

    stmt = select(Strategy).where(Strategy.organization_id == org.id, Strategy.active.is_(True))
    if strategy_id is not None:
        stmt = stmt.where(Strategy.id == strategy_id)
    if campaign_id is not None:
        stmt = stmt.where(Strategy.id == select(Campaign.strategy_id).where(Campaign.id == campaign_id).scalar_subquery())
    local_today = local_today_expr(session, organization_id=org.id, org_timezone=org.timezone, now=now)
    _prepare_slots(session)
    for strategy in session.scalars(stmt.order_by(Strategy.id)).all():
        stages = stage_specs(strategy)
        if not stages:
            continue
        plan = _Plan(org, settings, strategy, stages, offsets(stages), local_today, now, cause)
        eligible = _eligible(plan, today=today, campaign_id=campaign_id)
        result.restarted += _restart_on_new_carrying_invoice(session, plan, campaign_id=campaign_id)
        result.reset += _reset_broken_promises(session, plan, eligible)
        _complete_cases_past_the_last_stage(session, plan, eligible)
        _choose_first_stage(session, plan, eligible)
        if strategy.multi_stage_handling == MultiStageHandling.skip_to_latest:
            result.skipped += _skip_to_latest(session, plan, eligible)
        result.enqueued += _enqueue_stages(session, plan, eligible)
    session.expire_all()
    return result


def _eligible(plan: _Plan, *, today: date, campaign_id: int | None) -> ColumnElement[bool]:
    """SPEC §4.3 for the plan's strategy (its being active is checked by the caller)."""
    org_id = plan.org.id
    cond = and_(
        Account.organization_id == org_id,
        Account.strategy_id == plan.strategy.id,
        Account.paused.is_(False),
        Account.blocked.is_(False),
        Account.collection_tab != CollectionTab.blocked.value,  # exclusion rules (§6)
        Account.status.in_([s.value for s in CONTACTABLE_STATUSES]),
        Account.balance > 0,
        (Account.campaign_id.is_(None))
        | Account.campaign_id.in_(select(Campaign.id).where(campaigns_enqueueable(org_id, today))),
    )
    if campaign_id is not None:
        cond = and_(cond, Account.campaign_id == campaign_id)
    return cond


_RESTARTABLE = (
    AccountStatus.pending_contact.value,
    AccountStatus.in_auto_management.value,
    AccountStatus.promise_overdue.value,
    AccountStatus.sequence_completed.value,
)


def _restart_on_new_carrying_invoice(session: Session, plan: _Plan, *, campaign_id: int | None) -> int:
    """§4.2: when the carrying invoice changes (the old one paid while others remain, or an older one
    arrived), the case starts again on the new one: pending items cancelled, a new anchor, and the
    first-action logic applied again at this same pass."""
    where = and_(
        Account.organization_id == plan.org.id,
        Account.strategy_id == plan.strategy.id,
        Account.status.in_(_RESTARTABLE),
        Account.carrying_invoice_id.is_not(None),
        Account.case_invoice_id.is_not(None),
        Account.case_invoice_id != Account.carrying_invoice_id,
    )
    if campaign_id is not None:
        where = and_(where, Account.campaign_id == campaign_id)
    cancel_pending(
        session,
        organization_id=plan.org.id,
        which=QueueItem.account_id.in_(select(Account.id).where(where)),
        now=plan.now,
        reason="carrying_invoice_changed",
        cause="restart",
    )
    cancel_open_tasks(session, organization_id=plan.org.id, accounts=select(Account.id).where(where), now=plan.now,
                      reason="carrying_invoice_changed")
    log_accounts(
        session, where=where, at=plan.now, event="restarted", cause="carrying_invoice_changed",
        stage_index=first_case_stage(session, strategy=plan.strategy, org=plan.org, now=plan.now),
        details={"strategy_id": plan.strategy.id, "first_action": str(plan.strategy.first_action_logic)},
    )
    result = session.execute(
        update(Account).where(where).values(**new_case_values(session, strategy=plan.strategy, org=plan.org, now=plan.now))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def _reset_broken_promises(session: Session, plan: _Plan, eligible: ColumnElement[bool]) -> int:
    """§4.8: a ``promise_overdue`` account whose sequence had finished starts again at the first stage
    (a new round of the case, so the earlier round's items do not count as taken). The round counts
    its stages' days from the reset: with the old anchor every ``days_from_trigger`` stage would be
    long due, and the whole sequence would go out again within days."""
    where = and_(eligible, Account.status == AccountStatus.promise_overdue.value, Account.case_sequence_finished.is_(True))
    today = local_date(plan.now, plan.org.timezone)
    log_accounts(session, where=where, at=plan.now, event="reset", cause="broken_promise", stage_index=0)
    result = session.execute(
        update(Account)
        .where(where)
        .values(
            status=AccountStatus.in_auto_management.value,
            collection_tab=CollectionTab.engaged.value,
            case_number=Account.case_number + 1,
            case_next_stage=0,
            case_opened_at=plan.now,
            case_opened_on=literal(today),
            case_anchor_date=literal(today),
            case_sequence_finished=False,
            case_prev_completed_at=None,
            case_prev_completed_on=None,
            case_next_delay_days=None,
            case_tone_override=None,
            case_retry_count=0,
            callback_at=None,
            updated_at=plan.now,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def _complete_cases_past_the_last_stage(session: Session, plan: _Plan, eligible: ColumnElement[bool]) -> None:
    """A case whose next stage no longer exists (stages were removed from the strategy since) has
    finished its sequence: completed as :func:`~duecourse.engine.cases.advance` would have, instead
    of waiting forever for a stage that will never be enqueued."""
    where = and_(eligible, Account.case_next_stage >= len(plan.stages), Account.case_sequence_finished.is_(False))
    log_accounts(session, where=where, at=plan.now, event="sequence_completed", cause="stages_removed")
    done = cast(literal(AccountStatus.sequence_completed.value), String(32))
    session.execute(
        update(Account)
        .where(where)
        .values(status=done, case_sequence_finished=True, updated_at=plan.now,
                collection_tab=tab_expr(plan.settings.exclusions, status=done))
        .execution_options(synchronize_session=False)
    )


def _choose_first_stage(session: Session, plan: _Plan, eligible: ColumnElement[bool]) -> None:
    """§4.4 for an eligible case without a next stage. Cases get their first stage when they open
    (:func:`duecourse.engine.assign.new_case_values`); this covers a case whose strategy had no
    stages then."""
    where = and_(eligible, Account.case_next_stage.is_(None))
    first = first_stage_expr(session, strategy=plan.strategy, local_today=plan.local_today, anchor=Account.case_anchor_date)
    assert first is not None  # the caller skips strategies without stages
    cause = str(plan.strategy.first_action_logic)
    if can_change_and_log(session):
        change = (
            update(Account.__table__)
            .where(where)
            .values(case_next_stage=first, updated_at=plan.now)
            .returning(Account.organization_id, Account.id, Account.case_number, Account.case_next_stage)
        )
        change_and_log(session, change, at=plan.now, event="first_action", cause=cause)
        return
    log_accounts(
        session,
        where=where,
        at=plan.now,
        event="first_action",
        cause=cause,
        stage_index=first,
    )
    session.execute(
        update(Account).where(where).values(case_next_stage=first, updated_at=plan.now).execution_options(synchronize_session=False)
    )


def _due_exprs(session: Session, plan: _Plan, k: int) -> list[ColumnElement[Any]]:
    """Due dates of stages k, k+1, … for cases whose next stage is k (see stages.due_dates)."""
    stages, offs = plan.stages, plan.offsets
    anchor = Account.case_anchor_date
    out: list[ColumnElement[Any]] = []
    for j in range(k, len(stages)):
        s = stages[j]
        if s.timing == "days_from_trigger" or j == 0:
            due = date_plus_days(session, anchor, s.days)
        elif j == k:
            due = case(
                (
                    Account.case_prev_completed_on.is_not(None),
                    date_plus_days(session, Account.case_prev_completed_on, func.coalesce(Account.case_next_delay_days, s.days)),
                ),
                else_=date_plus_days(session, anchor, offs[j]),
            )
        else:
            prev = out[-1]
            base = case((Account.case_opened_on > prev, Account.case_opened_on), else_=prev)
            due = date_plus_days(session, base, s.days)
        out.append(type_coerce(due, Date))
    return out


def _all_due(dues: list[ColumnElement[Any]], upto: int, today: ColumnElement[Any]) -> ColumnElement[bool]:
    return and_(*[d <= today for d in dues[: upto + 1]])


def _not_taken(stage_index: int) -> ColumnElement[bool]:
    return ~exists().where(
        QueueItem.account_id == Account.id,
        QueueItem.case_number == Account.case_number,
        QueueItem.stage_index == stage_index,
        QueueItem.status.in_(_TAKEN),
    )


def _not_started(stage_index: int) -> ColumnElement[bool]:
    """No item of the case's stage is being sent or was sent (a pending one may still be withdrawn).
    Over an alias: it also runs inside statements on ``queue_items`` (:func:`_skip_to_latest`'s
    cancellation), where the table itself would be correlated to the outer row."""
    other = QueueItem.__table__.alias("started")
    return ~exists().where(
        other.c.account_id == Account.id,
        other.c.case_number == Account.case_number,
        other.c.stage_index == stage_index,
        other.c.status.in_([QueueStatus.processing.value, QueueStatus.completed.value]),
    )


def _skip_to_latest(session: Session, plan: _Plan, eligible: ColumnElement[bool]) -> int:
    """§4.5 ``skip_to_latest``: when several stages are due, move the case to the latest and record the
    others as skipped in the execution log. A stage already queued ahead for its due time but not
    yet sent (the scheduler or the workers were down since) is skipped too: its item is cancelled
    (``skip_to_latest``), so after downtime only the latest stage goes out."""
    skipped = 0
    n = len(plan.stages)
    for k in range(n - 1):
        dues = _due_exprs(session, plan, k)
        group = and_(eligible, Account.case_next_stage == k, _not_started(k))
        for j in range(k + 1, n):
            latest = _all_due(dues, j - k, plan.local_today)
            if j + 1 < n:
                latest = and_(latest, not_(_all_due(dues, j + 1 - k, plan.local_today)))
            where = and_(group, latest)
            if session.execute(select(literal(1)).where(where).limit(1)).first() is None:
                continue  # the usual case: nothing to skip (it happens after downtime)
            # (From the accounts that skip to their items, not every pending item of the
            # organization tested against them.)
            queued_ahead = tuple_(QueueItem.account_id, QueueItem.case_number).in_(
                select(Account.id, Account.case_number).where(where)
            )
            cancel_pending(session, organization_id=plan.org.id, now=plan.now, reason="skip_to_latest", cause=plan.cause,
                           which=and_(QueueItem.stage_index >= k, QueueItem.stage_index < j, queued_ahead))
            for i in range(k, j):
                log_accounts(session, where=where, at=plan.now, event="skipped", cause=plan.cause, reason="skip_to_latest", stage_index=i)
            result = session.execute(
                update(Account).where(where).values(case_next_stage=j, updated_at=plan.now).execution_options(synchronize_session=False)
            )
            skipped += (result.rowcount or 0) * (j - k)
    return skipped


def _enqueue_stages(session: Session, plan: _Plan, eligible: ColumnElement[bool]) -> int:
    """Insert the items: the next stage (due now or for its future due date) and, for
    ``run_all_in_order``, every following stage that is also due."""
    total = 0
    n = len(plan.stages)
    run_all = plan.strategy.multi_stage_handling == MultiStageHandling.run_all_in_order
    for k in range(n):
        dues = _due_exprs(session, plan, k)
        group = and_(eligible, Account.case_next_stage == k)
        last = n - 1 if run_all else k
        for j in range(k, last + 1):
            where = and_(group, _not_taken(j))
            if j > k:
                # Not while stage k is out waiting for its outcome (a call, an agent's task): the
                # dispatch would only withdraw the item again (``awaiting_previous_stage``), pass
                # after pass; the stage is enqueued once the case has moved on to it.
                where = and_(where, _all_due(dues, j - k, plan.local_today), _not_started(k))
            total += _insert_items(session, plan, where=where, stage_index=j, due=dues[j - k])
    return total


def _prepare_slots(session: Session) -> None:
    suffix = " ON COMMIT DELETE ROWS" if dialect_name(session) == "postgresql" else ""
    session.execute(text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {_slots.name} {_SLOTS_DDL}{suffix}"))
    session.execute(text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {_candidates.name} {_CANDIDATES_DDL}{suffix}"))


def _scheduled_at(plan: _Plan, due: date, tz: str, action: str) -> datetime:
    """§4.5: the first automation slot (organization time zone) at which the due date has begun
    both for the organization and in the debtor's time zone (a stage due on the 5th never reaches a
    debtor on their 4th), moved into the channel's allowed hours in the debtor's time zone (§4.7)."""
    org_tz = plan.org.timezone
    slot = next_automation_slot(
        max(at_local(due, time(0, 0), org_tz), at_local(due, time(0, 0), tz)),
        tz=org_tz,
        at=plan.strategy.automation_time,
        days=weekday_set(plan.strategy.automation_days),
    )
    if action in _HOURS_CHANNELS:
        hours = plan.settings.dispatch.allowed_hours[action]
        slot = into_allowed_hours(slot, tz=tz, start=hours.start, end=hours.end, days=hours.days)
    return slot


# From this many candidates on, an item insert is a bulk one (PostgreSQL): its joins may use more
# memory for the rest of the transaction (``roomy_joins``: a hash join that spills to disk hands on
# its rows out of account order, and the inserts it feeds then touch index pages at random), and it
# is tried as a plain insert first (``_plain_first``).
BULK_CANDIDATES = 10_000


def _plain_first(session: Session, run: Any, plain: Any, guarded: Any) -> int:
    """``run(plain)`` in a savepoint, and ``run(guarded)`` (``ON CONFLICT DO NOTHING``) instead if
    another transaction queued one of the same live items meanwhile (PostgreSQL).

    ``ON CONFLICT`` is a speculative insertion: each row checks the unique index before it is
    written and is confirmed after (an enqueue pass over a million accounts spends about a tenth
    more with it). The candidates already leave out every (account, stage) with a live item, so
    the plain insert is the common case; the unique index still decides a race: the plain insert
    waits for the other transaction and fails on the index if it committed the same item, and the
    guarded insert then skips that row. Used for large inserts only (``BULK_CANDIDATES``): each
    savepoint is a subtransaction, and PostgreSQL slows every other session's snapshots down once
    a transaction holds more than 64 of them (a scheduler cycle runs every strategy and campaign
    of an organization in one transaction)."""
    try:
        with session.begin_nested():
            return int(run(plain))
    except IntegrityError as exc:
        if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != LIVE_ITEM_INDEX:
            raise
    return int(run(guarded))


def _insert_items(session: Session, plan: _Plan, *, where: ColumnElement[bool], stage_index: int, due: ColumnElement[Any]) -> int:
    stage = plan.strategy.stages[stage_index]
    action = str(stage.action_type)
    tz = func.coalesce(Account.timezone, plan.org.timezone)
    # The candidates first, in their own statement: their NOT EXISTS over the queue then reads the
    # queue as it was, not the rows this pass is inserting (which, on PostgreSQL with the planner
    # expecting few candidates, made the insert quadratic).
    session.execute(delete(_candidates))
    candidates = session.execute(
        insert(_candidates).from_select(["account_id", "due_date", "tz"], select(Account.id, due, tz).where(where))
        .execution_options(preserve_rowcount=True)
    ).rowcount
    bulk = candidates >= BULK_CANDIDATES
    if bulk:
        roomy_joins(session)
    if dialect_name(session) == "postgresql":
        # Temporary tables have no statistics; without them PostgreSQL joins by nested loop.
        session.execute(text(f"ANALYZE {_candidates.name}"))
    pairs = session.execute(select(_candidates.c.due_date, _candidates.c.tz).distinct()).all()
    if not pairs:
        return 0
    session.execute(delete(_slots))
    rows = []
    for due_value, tz_value in pairs:
        due_date = due_value if isinstance(due_value, date) else date.fromisoformat(str(due_value))
        at = _scheduled_at(plan, due_date, tz_value, action)
        rows.append({"due_date": due_date, "tz": tz_value, "scheduled_at": at.replace(tzinfo=None)})
    session.execute(insert(_slots), rows)
    if dialect_name(session) == "postgresql":
        session.execute(text(f"ANALYZE {_slots.name}"))

    now = plan.now
    batch = uuid.uuid4().hex  # marks exactly this statement's rows, for their log entries
    select_rows = (
        select(
            Account.organization_id,
            Account.id,
            literal(plan.strategy.id),
            Account.campaign_id,
            Account.case_number,
            literal(stage_index),
            literal(action),
            _slots.c.scheduled_at,
            literal(QueueStatus.pending.value),
            literal(0),
            literal(plan.settings.dispatch.max_attempts),
            literal(batch),
            func.coalesce(Account.case_tone_override, literal(str(stage.tone))),
            literal(False),
            literal(now, type_=QueueItem.created_at.type),
            literal(now, type_=QueueItem.updated_at.type),
        )
        .select_from(_candidates)
        .join(Account, Account.id == _candidates.c.account_id)
        .join(_slots, and_(_slots.c.due_date == _candidates.c.due_date, _slots.c.tz == _candidates.c.tz))
    )
    columns = [
        "organization_id",
        "account_id",
        "strategy_id",
        "campaign_id",
        "case_number",
        "stage_index",
        "action",
        "scheduled_at",
        "status",
        "attempt",
        "max_attempts",
        "batch_id",
        "tone",
        "is_callback",
        "created_at",
        "updated_at",
    ]
    stmt = (
        insert_for(session, QueueItem.__table__)
        .from_select(columns, select_rows)
        .on_conflict_do_nothing(
            index_elements=["account_id", "stage_index"],
            # Literal, as in the index: PostgreSQL infers a partial index only from a matching predicate.
            index_where=text(LIVE_ITEM_PREDICATE),
        )
    )
    if can_change_and_log(session):
        returning = (QueueItem.organization_id, QueueItem.account_id, QueueItem.case_number, QueueItem.stage_index, QueueItem.id)

        def run(insert_stmt: Any) -> int:
            return change_and_log(session, insert_stmt.returning(*returning), at=now, event="enqueued", cause=plan.cause)

        if not bulk:
            return run(stmt)
        return _plain_first(session, run, insert(QueueItem.__table__).from_select(columns, select_rows), stmt)
    # SQLite: the statement's rows are the ones with its batch mark, all above the highest id before
    # it (a range of the primary key, so no index on the mark is needed).
    before = session.scalar(select(func.coalesce(func.max(QueueItem.id), 0)))
    inserted = session.execute(stmt.execution_options(preserve_rowcount=True)).rowcount or 0
    if inserted:
        log_items(
            session,
            where=and_(QueueItem.id > before, QueueItem.batch_id == batch),
            at=now,
            event="enqueued",
            cause=plan.cause,
        )
    return inserted


