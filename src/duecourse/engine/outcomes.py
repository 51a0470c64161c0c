"""Outcomes (SPEC §4.8): everything that comes back after a dispatch enters here.

One entry point per kind of news: :func:`record_delivery` (delivery reports: delivered, bounced,
failed), :func:`record_call_outcome` (voice calls), :func:`record_task_outcome` (agents' tasks),
:func:`promise_made` (a promise from any source). The scheduler's duties on outcomes are
:func:`expire_callbacks`, :func:`expire_step_timeouts` and :func:`settle_promises`. Channel
webhooks (later) and the API call these same functions. Each runs inside the caller's transaction
and writes its execution-log entries there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from duecourse.engine.cases import advance, log_event, refresh_account_tab
from duecourse.engine.log import cancel_open_tasks, cancel_pending
from duecourse.engine.models import (
    Direction,
    Interaction,
    InteractionStatus,
    Outcome,
    QueueItem,
    QueueStatus,
    Sentiment,
    Task,
    TaskStatus,
)
from duecourse.engine.stages import scaled_days, waits_for_reply
from duecourse.engine.timing import into_allowed_hours, local_date
from duecourse.errors import Conflict, FieldError, NotFound, ValidationFailed
from duecourse.events.service import account_data, emit, promise_data
from duecourse.ledger.derived import refresh_accounts
from duecourse.ledger.models import (
    CONTACTABLE_STATUSES,
    Account,
    AccountStatus,
    Invoice,
    Payment,
    Promise,
    PromiseSource,
    PromiseStatus,
)
from duecourse.strategies.models import Stage, Strategy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings

NO_CONVERSATION = (Outcome.no_answer, Outcome.dropped)


# Items whose stage stays open after the send, until an outcome (or a timeout) completes it.
CONVERSATIONS = ("voice", "whatsapp")


@dataclass
class CallReport:
    """What a voice provider (or an agent) reports about a call."""

    outcome: Outcome | None = None  # None with failed=True: the call never connected
    failed: bool = False
    promise_amount: Decimal | None = None
    promise_date: date | None = None
    callback_at: datetime | None = None
    sentiment: Sentiment | None = None
    willingness: int | None = None
    summary: str | None = None
    transcript: str | None = None


def _org(session: Session, organization_id: int) -> Organization:
    org = session.get(Organization, organization_id)
    assert org is not None
    return org


def _stages(session: Session, strategy_id: int | None) -> list[Stage]:
    strategy = session.get(Strategy, strategy_id) if strategy_id else None
    return list(strategy.stages) if strategy else []


def _sent_not_recorded(item: QueueItem) -> bool:
    """The provider accepted the message (its reference is written down) and the dispatch is being recorded."""
    return item.status == QueueStatus.processing and item.sent_at is not None and item.provider_ref is not None


def _item(
    session: Session, *, organization_id: int, queue_item_id: int | None = None, provider_ref: str | None = None,
    early_ok: bool = False,
) -> QueueItem:
    stmt = select(QueueItem).where(QueueItem.organization_id == organization_id)
    if queue_item_id is not None:
        stmt = stmt.where(QueueItem.id == queue_item_id)
    elif provider_ref is not None:
        stmt = stmt.where(QueueItem.provider_ref == provider_ref)
    else:
        raise ValidationFailed.on("queue_item_id", "give queue_item_id or provider_ref")
    item = session.scalar(stmt.with_for_update())
    if item is None:
        raise NotFound("Queue item")
    if item.status != QueueStatus.completed and not (early_ok and _sent_not_recorded(item)):
        raise Conflict(f"Queue item {item.id} was not dispatched (it is {item.status}); no outcome can be recorded",
                       [FieldError("queue_item_id", "not dispatched")])
    return item


def _account(session: Session, account_id: int, *, fresh: bool = False) -> Account:
    """The account, locked. ``fresh``: its values as committed now, even if this session read it
    before (another process may have changed it while this one waited for the lock)."""
    stmt = select(Account).where(Account.id == account_id).with_for_update()
    if fresh:
        stmt = stmt.execution_options(populate_existing=True)
    account = session.scalar(stmt)
    assert account is not None
    return account


def _current_stage(account: Account, item: QueueItem) -> bool:
    """The outcome concerns the case's current step (not an old case or an already-passed stage)."""
    return item.case_number == account.case_number and account.case_next_stage == item.stage_index


def _enqueue_now(session: Session, account: Account, *, stage_index: int, org: Organization, now: datetime,
                 reason: str, at: datetime | None = None, is_callback: bool = False) -> QueueItem | None:
    stages = _stages(session, account.strategy_id)
    if stage_index >= len(stages):
        return None
    stage = stages[stage_index]
    when = at or now
    action = str(stage.action_type)
    settings = get_settings(session, org.id)
    if action in settings.dispatch.allowed_hours:
        h = settings.dispatch.allowed_hours[action]
        when = into_allowed_hours(when, tz=account.timezone or org.timezone, start=h.start, end=h.end, days=h.days)
    item = QueueItem(
        organization_id=org.id, account_id=account.id, strategy_id=account.strategy_id, campaign_id=account.campaign_id,
        case_number=account.case_number, stage_index=stage_index, action=action, scheduled_at=when,
        status=QueueStatus.pending, attempt=0, max_attempts=settings.dispatch.max_attempts, is_callback=is_callback,
        tone=account.case_tone_override or str(stage.tone), created_at=now, updated_at=now,
    )
    session.add(item)
    session.flush()
    log_event(session, account, at=now, event="enqueued", stage_index=stage_index, queue_item_id=item.id, cause=reason)
    return item


def _cancel_from_stage(session: Session, account: Account, *, stage_index: int, now: datetime, reason: str) -> int:
    return cancel_pending(
        session,
        organization_id=account.organization_id,
        which=and_(QueueItem.account_id == account.id, QueueItem.stage_index >= stage_index),
        now=now,
        reason=reason,
        cause="outcome",
    )


# --- delivery reports ------------------------------------------------------------------------------


def record_delivery(
    session: Session, *, organization_id: int, now: datetime, status: str,
    queue_item_id: int | None = None, provider_ref: str | None = None, error: str | None = None,
) -> str:
    """A provider's delivery report. ``delivered`` is noted; ``bounced``/``failed``/``undelivered`` is a
    delivery failure (§4.8): the stage is completed with a delivery failure, pending items of the same
    or later stages are cancelled, and the next stage is enqueued at once."""
    item = _item(session, organization_id=organization_id, queue_item_id=queue_item_id, provider_ref=provider_ref,
                 early_ok=True)
    if item.status != QueueStatus.completed:
        # Faster than our own bookkeeping: kept on the item and applied when its dispatch is recorded.
        item.early_report = {"status": status, "error": error}
        return "pending"
    account = _account(session, item.account_id)
    interaction = session.scalar(select(Interaction).where(Interaction.queue_item_id == item.id).order_by(Interaction.id.desc()))
    if status == "delivered":
        if interaction is not None:
            interaction.status = InteractionStatus.delivered
        log_event(session, account, at=now, event="delivered", stage_index=item.stage_index, queue_item_id=item.id)
        return "delivered"
    if status not in ("bounced", "failed", "undelivered"):
        raise ValidationFailed.on("status", "must be delivered, bounced, failed or undelivered")
    if interaction is not None and interaction.status in (InteractionStatus.bounced, InteractionStatus.failed):
        return "duplicate"  # the same failure reported again (another event id, another route)
    if interaction is not None:
        interaction.status = InteractionStatus.bounced if status == "bounced" else InteractionStatus.failed
    sent_to = interaction.address if interaction is not None else None
    still_there = sent_to is None or sent_to.casefold() == (account.email or "").casefold()
    if status == "bounced" and item.action == "email" and not account.email_invalid and still_there:
        # A hard bounce says the address does not exist: flag it (cleared when the address changes).
        # A bounce for an address the account no longer has says nothing about the new one.
        account.email_invalid = True
        log_event(session, account, at=now, event="contact_invalid", stage_index=item.stage_index,
                  queue_item_id=item.id, reason="email_invalid", details={"error": error} if error else None)
    log_event(session, account, at=now, event="delivery_failed", stage_index=item.stage_index, queue_item_id=item.id,
              reason=status, details={"error": error} if error else None)
    emit(session, organization_id=organization_id, type="message.bounced", now=now, data={
        **account_data(account), "queue_item_id": item.id, "stage_index": item.stage_index, "channel": item.action,
        "provider_ref": item.provider_ref, "status": status, "error": error})
    if item.case_number != account.case_number or _moved_past(session, item):
        # A late report (bounce notices can take days): the case has since sent a later stage or
        # another attempt; acting on it would send that stage again.
        return "stale"
    org = _org(session, organization_id)
    nxt = item.stage_index + 1
    _cancel_from_stage(session, account, stage_index=item.stage_index, now=now, reason="delivery_failure")
    if account.case_next_stage == item.stage_index:
        # A stage still waiting for its outcome (a voice call that never connected) completes now.
        advance(session, account, completed_stage=item.stage_index, stage_count=len(_stages(session, account.strategy_id)),
                org_tz=org.timezone, now=now, cause="delivery_failure")
    if account.case_next_stage == nxt and not account.case_sequence_finished:
        account.case_prev_completed_on = local_date(now, org.timezone)
        account.case_next_delay_days = 0
        _enqueue_now(session, account, stage_index=nxt, org=org, now=now, reason="delivery_failure")
    return "delivery_failure"


# --- calls ----------------------------------------------------------------------------------------


def _signals(report: CallReport) -> str:
    w, s = report.willingness, report.sentiment
    if (w is not None and w <= 2) or s in (Sentiment.hostile, Sentiment.crisis):
        return "negative"
    if w is not None and w >= 4 and s in (Sentiment.positive, Sentiment.neutral, None):
        return "positive"
    return "neutral"


def _adaptive_timing(session: Session, account: Account, *, completed_stage: int, report: CallReport, now: datetime) -> None:
    """§4.8: after a voice conversation, shorten or lengthen the next stage's delay; log it. Whatever
    adjusted the stage just completed does not carry over to the next one."""
    account.case_next_delay_days = None
    account.case_tone_override = None
    stages = _stages(session, account.strategy_id)
    nxt = completed_stage + 1
    signal = _signals(report)
    if nxt >= len(stages) or signal == "neutral":
        return
    outcomes = get_settings(session, account.organization_id).outcomes
    factor = outcomes.adaptive_positive_factor if signal == "positive" else outcomes.adaptive_negative_factor
    stage = stages[nxt]
    original = stage.days if str(stage.timing_type) == "days_from_previous" else None
    new = scaled_days(original, float(factor)) if original is not None else None
    account.case_next_delay_days = new
    if signal == "negative":
        account.case_tone_override = "empathetic"
    log_event(session, account, at=now, event="adaptive_timing", stage_index=nxt, reason=signal, details={
        "sentiment": str(report.sentiment) if report.sentiment else None, "willingness": report.willingness,
        "factor": str(factor), "original_delay_days": original, "new_delay_days": new,
        "tone": account.case_tone_override,
    })


def record_call_outcome(
    session: Session, *, organization_id: int, now: datetime, report: CallReport,
    queue_item_id: int | None = None, provider_ref: str | None = None,
) -> str:
    """A voice call's result (§4.8): retries, callbacks, promises, adaptive timing, disputes."""
    if report.failed:
        # A call that never connected is a delivery failure, and may be reported before the
        # worker has recorded the call (record_delivery keeps it for then).
        return record_delivery(session, organization_id=organization_id, now=now, status="failed",
                               queue_item_id=queue_item_id, provider_ref=provider_ref)
    item = _item(session, organization_id=organization_id, queue_item_id=queue_item_id, provider_ref=provider_ref)
    if str(item.action) not in CONVERSATIONS:
        raise ValidationFailed.on("queue_item_id", "is not a voice call or a WhatsApp conversation")
    account = _account(session, item.account_id)
    interaction = session.scalar(select(Interaction).where(Interaction.queue_item_id == item.id).order_by(Interaction.id.desc()))
    if interaction is not None:
        _fill(interaction, report, answered=report.outcome not in NO_CONVERSATION)
    log_event(session, account, at=now, event="outcome", stage_index=item.stage_index, queue_item_id=item.id,
              reason=str(report.outcome) if report.outcome else None,
              details={"sentiment": str(report.sentiment) if report.sentiment else None, "willingness": report.willingness})
    if not _current_stage(account, item):
        return "stale"
    if report.outcome in NO_CONVERSATION and _later_attempt(session, item):
        # A late "nobody answered" for an attempt already followed by another (its step timed out
        # and the retry is queued or made): the retry took care of it.
        return "stale"
    return _apply_conversation(session, account, item=item, report=report, now=now)


def _later_attempt(session: Session, item: QueueItem) -> bool:
    """Whether the same stage of the same case has an item after this one (a retry, a callback)."""
    return session.scalar(
        select(QueueItem.id).where(QueueItem.account_id == item.account_id, QueueItem.case_number == item.case_number,
                                   QueueItem.stage_index == item.stage_index, QueueItem.id > item.id).limit(1)
    ) is not None


def _moved_past(session: Session, item: QueueItem) -> bool:
    """Whether the case has dispatched (or is dispatching) something after ``item``: a later stage,
    or another attempt at the same stage."""
    later = or_(QueueItem.stage_index > item.stage_index,
                and_(QueueItem.stage_index == item.stage_index, QueueItem.id > item.id))
    return session.scalar(
        select(QueueItem.id).where(
            QueueItem.account_id == item.account_id, QueueItem.case_number == item.case_number, later,
            QueueItem.status.in_((QueueStatus.completed.value, QueueStatus.processing.value)),
        ).limit(1)
    ) is not None


def _waits_for_callback_expiry(account: Account, item: QueueItem) -> bool:
    """§4.8: the return call the debtor asked for was not answered. That alone does not move the
    case: if no conversation happens within the expiry after the callback time,
    :func:`expire_callbacks` advances it (once)."""
    return bool(item.is_callback) and account.status == AccountStatus.callback_pending


def _fill(interaction: Interaction, report: CallReport, *, answered: bool) -> None:
    interaction.status = InteractionStatus.answered if answered else InteractionStatus.completed
    interaction.outcome = report.outcome
    interaction.promise_amount = report.promise_amount
    interaction.promise_date = report.promise_date
    interaction.callback_at = report.callback_at
    interaction.sentiment = report.sentiment
    interaction.willingness = report.willingness
    interaction.summary = report.summary
    interaction.transcript = report.transcript


def _apply_conversation(session: Session, account: Account, *, item: QueueItem, report: CallReport, now: datetime) -> str:
    org = _org(session, account.organization_id)
    stages = _stages(session, account.strategy_id)
    stage = stages[item.stage_index] if item.stage_index < len(stages) else None
    if report.outcome in NO_CONVERSATION:
        if _waits_for_callback_expiry(account, item):
            log_event(session, account, at=now, event="callback_unanswered", stage_index=item.stage_index,
                      queue_item_id=item.id, reason=str(report.outcome))
            return "callback_unanswered"
        return _retry_or_advance(session, account, item=item, stage=stage, org=org, now=now, reason=str(report.outcome))
    if account.status == AccountStatus.callback_pending:
        account.status = AccountStatus.in_auto_management  # the callback happened
        account.callback_at = None
    if report.outcome == Outcome.callback_requested:
        if report.callback_at is None:
            raise ValidationFailed.on("callback_at", "is required with callback_requested")
        _cancel_from_stage(session, account, stage_index=0, now=now, reason="callback")
        account.status = AccountStatus.callback_pending
        account.callback_at = report.callback_at
        log_event(session, account, at=now, event="callback_requested", stage_index=item.stage_index,
                  details={"callback_at": report.callback_at.isoformat()})
        _enqueue_now(session, account, stage_index=item.stage_index, org=org, now=now, reason="callback",
                     at=report.callback_at, is_callback=True)
        refresh_account_tab(session, account)
        return "callback"
    if report.outcome == Outcome.dispute:
        _dispute_carrying_invoice(session, account, stage_index=item.stage_index, now=now)
    _adaptive_timing(session, account, completed_stage=item.stage_index, report=report, now=now)
    advance(session, account, completed_stage=item.stage_index, stage_count=len(stages), org_tz=org.timezone, now=now,
            keep_adjustment=True,
            cause=str(report.outcome) if report.outcome else "call_completed")
    if report.outcome == Outcome.promise_to_pay:
        assert report.promise_amount is not None and report.promise_date is not None
        promise = Promise(organization_id=org.id, account_id=account.id, amount=report.promise_amount,
                          currency=account.currency, promised_date=report.promise_date, status=PromiseStatus.pending,
                          source=PromiseSource.voice_call, created_at=now)
        session.add(promise)
        session.flush()
        promise_made(session, account=account, promise=promise, now=now)
    if report.outcome == Outcome.dispute:
        _refresh_after_dispute(session, account, now=now)
    return "completed"


def _dispute_carrying_invoice(session: Session, account: Account, *, stage_index: int | None, now: datetime) -> None:
    """§4.8 dispute (a call or an agent's task): the carrying invoice is marked disputed and leaves
    collection; :func:`_refresh_after_dispute` then moves the case to the next undisputed invoice."""
    if account.carrying_invoice_id is None:
        return
    invoice = session.get(Invoice, account.carrying_invoice_id)
    if invoice is not None:
        invoice.disputed = True
        log_event(session, account, at=now, event="dispute", stage_index=stage_index,
                  details={"invoice_id": invoice.id, "number": invoice.number})


def _refresh_after_dispute(session: Session, account: Account, *, now: datetime) -> None:
    """The balances without the disputed invoice; the case continues on the next undisputed one
    (§4.8): it becomes the case's invoice, so the next enqueue does not take the change of carrying
    invoice for a restart (which would start the sequence again from its first stage). With no
    undisputed invoice left the balance is zero and the account resolves: the case stops."""
    org_id = account.organization_id
    refresh_accounts(session, organization_id=org_id, exclusions=get_settings(session, org_id).exclusions, now=now,
                     account_ids=[account.id])
    session.execute(
        update(Account).where(Account.id == account.id, Account.carrying_invoice_id.is_not(None))
        .values(case_invoice_id=Account.carrying_invoice_id).execution_options(synchronize_session=False)
    )
    session.expire(account)


def _retry_or_advance(session: Session, account: Account, *, item: QueueItem, stage: Stage | None, org: Organization,
                      now: datetime, reason: str) -> str:
    """§4.8 retries: the same stage again after ``retry_delay_hours`` while retries remain, then advance."""
    max_retries = (stage.max_retries if stage is not None else 0) or 0
    if account.case_retry_count < max_retries:
        account.case_retry_count += 1
        delay = timedelta(hours=(stage.retry_delay_hours if stage is not None else None) or 24)
        log_event(session, account, at=now, event="retry", stage_index=item.stage_index, queue_item_id=item.id, reason=reason,
                  details={"retry": account.case_retry_count, "of": max_retries})
        _enqueue_now(session, account, stage_index=item.stage_index, org=org, now=now, reason="retry", at=now + delay)
        return "retry"
    advance(session, account, completed_stage=item.stage_index, stage_count=len(_stages(session, account.strategy_id)),
            org_tz=org.timezone, now=now, cause=f"retries_exhausted:{reason}")
    return "advanced"


# --- agents' tasks ----------------------------------------------------------------------------------


def record_task_outcome(session: Session, *, organization_id: int, task_id: int, now: datetime, report: CallReport,
                        note: str | None, user_id: int | None) -> Task:
    """An agent logs the outcome of a ``phone_call`` or ``escalation`` task: the stage completes (§4.8)."""
    task = session.scalar(select(Task).where(Task.id == task_id, Task.organization_id == organization_id).with_for_update())
    if task is None:
        raise NotFound("Task")
    if task.status != TaskStatus.open:
        raise Conflict(f"Task {task.id} is {task.status}; its outcome is already recorded", [FieldError("status", str(task.status))])
    if report.outcome is None:
        raise ValidationFailed.on("outcome", "is required")
    # Checked before anything changes, whether or not the task is still its case's current stage.
    if report.outcome == Outcome.promise_to_pay and (report.promise_amount is None or report.promise_date is None):
        raise ValidationFailed("promise_to_pay needs an amount and a date", [
            FieldError(f, "is required for a promise to pay")
            for f, v in (("promise_amount", report.promise_amount), ("promise_date", report.promise_date)) if v is None])
    if report.outcome == Outcome.callback_requested and report.callback_at is None:
        raise ValidationFailed.on("callback_at", "is required with callback_requested")
    account = _account(session, task.account_id)
    task.status = TaskStatus.done
    task.outcome = str(report.outcome)
    task.note = note
    task.completed_at = now
    task.assigned_user_id = task.assigned_user_id or user_id
    interaction = Interaction(
        organization_id=organization_id, account_id=account.id, queue_item_id=task.queue_item_id,
        strategy_id=account.strategy_id, campaign_id=account.campaign_id, stage_index=task.stage_index,
        channel=str(task.kind), direction=Direction.outbound, status=InteractionStatus.completed,
        occurred_at=now, created_at=now, user_id=user_id, summary=note,
    )
    _fill(interaction, report, answered=report.outcome not in NO_CONVERSATION)
    interaction.summary = report.summary or note  # the agent's note is the summary unless one is given
    session.add(interaction)
    account.last_interaction_at = now
    item = session.get(QueueItem, task.queue_item_id) if task.queue_item_id else None
    log_event(session, account, at=now, event="task_outcome", stage_index=task.stage_index, queue_item_id=task.queue_item_id,
              reason=str(report.outcome), details={"task_id": task.id})
    if item is None or not _current_stage(account, item):
        return task
    org = _org(session, organization_id)
    stages = _stages(session, account.strategy_id)
    if report.outcome == Outcome.callback_requested:
        account.status = AccountStatus.callback_pending
        account.callback_at = report.callback_at
        _cancel_from_stage(session, account, stage_index=0, now=now, reason="callback")
        _enqueue_now(session, account, stage_index=item.stage_index, org=org, now=now, reason="callback",
                     at=report.callback_at, is_callback=True)
        refresh_account_tab(session, account)
        return task
    if account.status == AccountStatus.callback_pending:
        account.status = AccountStatus.in_auto_management
        account.callback_at = None
    if report.outcome == Outcome.dispute:
        _dispute_carrying_invoice(session, account, stage_index=item.stage_index, now=now)
    advance(session, account, completed_stage=item.stage_index, stage_count=len(stages), org_tz=org.timezone, now=now,
            cause=f"task:{report.outcome}")
    if report.outcome == Outcome.dispute:
        _refresh_after_dispute(session, account, now=now)
    if report.outcome == Outcome.promise_to_pay:
        assert report.promise_amount is not None and report.promise_date is not None
        promise = Promise(organization_id=org.id, account_id=account.id, amount=report.promise_amount, currency=account.currency,
                          promised_date=report.promise_date, status=PromiseStatus.pending, source=PromiseSource.agent,
                          created_by_user_id=user_id, created_at=now)
        session.add(promise)
        session.flush()
        promise_made(session, account=account, promise=promise, now=now)
    return task


# --- promises -------------------------------------------------------------------------------------


def promise_made(session: Session, *, account: Account, promise: Promise, now: datetime) -> None:
    """§4.8: the account becomes ``promise_pending``; contact holds until the promised date."""
    emit(session, organization_id=account.organization_id, type="promise.created", data=promise_data(promise, account), now=now)
    if account.status == AccountStatus.resolved:
        return
    _cancel_from_stage(session, account, stage_index=0, now=now, reason="promise_pending")
    cancel_open_tasks(session, organization_id=account.organization_id, accounts=[account.id], now=now,
                      reason="promise_pending", kinds=("phone_call",))
    account.status = AccountStatus.promise_pending
    log_event(session, account, at=now, event="promise", details={
        "promise_id": promise.id, "amount": str(promise.amount), "date": promise.promised_date.isoformat()})
    refresh_account_tab(session, account)


def promise_cancelled(session: Session, *, account: Account, promise: Promise, now: datetime) -> None:
    """A pending promise was withdrawn: unless another one is still pending, contact resumes where
    the sequence stands (what a kept promise with money still owed does)."""
    account = _account(session, account.id)
    log_event(session, account, at=now, event="promise_cancelled", details={"promise_id": promise.id})
    if account.status != AccountStatus.promise_pending:
        return
    other = session.scalar(select(Promise.id).where(
        Promise.account_id == account.id, Promise.status == PromiseStatus.pending, Promise.id != promise.id).limit(1))
    if other is not None:
        return
    if account.strategy_id is None:
        account.status = AccountStatus.unassigned
    else:
        account.status = (
            AccountStatus.sequence_completed if account.case_sequence_finished else AccountStatus.in_auto_management
        )
    refresh_account_tab(session, account)


def settle_promises(session: Session, *, organization_id: int, now: datetime) -> dict[str, int]:
    """§4.8: once the promised date and the grace days after it are over, in the debtor's own time
    zone (§4.11), a pending promise is kept (payments recorded since it was made cover it) or broken
    (the account becomes ``promise_overdue``). With a grace of 0 the debtor still has the whole
    promised day."""
    org = _org(session, organization_id)
    grace = timedelta(days=get_settings(session, organization_id).outcomes.promise_grace_days)
    # Time zones put a debtor's date at most two days ahead of the organization's (UTC-12 against
    # UTC+14): read the candidates by that, then decide each by its debtor's own date.
    latest = local_date(now, org.timezone) + timedelta(days=2)
    candidates = session.scalars(
        select(Promise).where(Promise.organization_id == organization_id, Promise.status == PromiseStatus.pending,
                              Promise.promised_date < latest - grace).order_by(Promise.id).with_for_update()
    ).all()
    counts = {"kept": 0, "broken": 0}
    for promise in candidates:
        account = _account(session, promise.account_id)
        zone = account.timezone or org.timezone
        if promise.promised_date + grace >= local_date(now, zone):
            continue  # the debtor's promised day (or grace) is not over yet
        made_on = local_date(promise.created_at, zone)
        paid = session.scalar(
            select(func.coalesce(func.sum(Payment.amount), 0)).where(
                Payment.account_id == promise.account_id, Payment.paid_on >= made_on,
                Payment.created_at >= promise.created_at)
        ) or Decimal(0)
        promise.settled_at = now
        if Decimal(paid) >= promise.amount:
            promise.status = PromiseStatus.kept
            counts["kept"] += 1
            log_event(session, account, at=now, event="promise_kept", details={"promise_id": promise.id, "paid": str(paid)})
            emit(session, organization_id=organization_id, type="promise.kept", data=promise_data(promise, account, paid=Decimal(paid)), now=now)
            if account.status == AccountStatus.promise_pending:
                # Kept but money still owed: back to where the sequence stands.
                account.status = (
                    AccountStatus.sequence_completed if account.case_sequence_finished else AccountStatus.in_auto_management
                )
        else:
            promise.status = PromiseStatus.broken
            counts["broken"] += 1
            log_event(session, account, at=now, event="promise_broken", details={"promise_id": promise.id, "paid": str(paid)})
            emit(session, organization_id=organization_id, type="promise.broken", data=promise_data(promise, account, paid=Decimal(paid)), now=now)
            if account.status == AccountStatus.promise_pending:
                account.status = AccountStatus.promise_overdue
        refresh_account_tab(session, account)
    return counts


# --- scheduler duties -----------------------------------------------------------------------------


def expire_callbacks(session: Session, *, organization_id: int, now: datetime) -> int:
    """§4.8: a callback with no conversation within the expiry after its time advances the case.
    The expiry counts from the later of the time asked for and the time the return call is
    scheduled (a call asked for on Saturday night waits for Monday's allowed hours, and must not
    expire before it is made)."""
    org = _org(session, organization_id)
    hours = get_settings(session, organization_id).outcomes.callback_expiry_hours
    since = now - timedelta(hours=hours)
    call_within = select(QueueItem.id).where(
        QueueItem.account_id == Account.id, QueueItem.case_number == Account.case_number, QueueItem.is_callback.is_(True),
        QueueItem.status.in_([QueueStatus.pending.value, QueueStatus.processing.value, QueueStatus.completed.value]),
        QueueItem.scheduled_at > since,
    ).exists()
    accounts = session.scalars(
        select(Account).where(Account.organization_id == organization_id, Account.status == AccountStatus.callback_pending,
                              Account.callback_at <= since, ~call_within).with_for_update()
    ).all()
    for account in accounts:
        _cancel_from_stage(session, account, stage_index=0, now=now, reason="callback_expired")
        stage = account.case_next_stage or 0
        log_event(session, account, at=now, event="callback_expired", stage_index=stage,
                  details={"callback_at": account.callback_at.isoformat() if account.callback_at else None})
        account.status = AccountStatus.in_auto_management
        account.callback_at = None
        advance(session, account, completed_stage=stage, stage_count=len(_stages(session, account.strategy_id)),
                org_tz=org.timezone, now=now, cause="callback_expired")
    return len(accounts)


def record_reply(session: Session, account: Account, *, channel: str, now: datetime, provider_ref: str | None) -> str | None:
    """An inbound message from the debtor. A reply on WhatsApp while the case waits on a WhatsApp
    conversation stage (:func:`waits_for_reply`) completes that stage: the conversation happened.
    Returns ``"completed"`` then, else None (the message is only recorded by the caller)."""
    if channel != "whatsapp" or account.case_next_stage is None or account.status not in _WAITING_STATUSES:
        return None
    item = session.scalar(
        select(QueueItem)
        .where(QueueItem.account_id == account.id, QueueItem.case_number == account.case_number,
               QueueItem.stage_index == account.case_next_stage, QueueItem.action == "whatsapp",
               QueueItem.status == QueueStatus.completed)
        .order_by(QueueItem.id.desc())
        .with_for_update()
    )
    if item is None:
        return None
    stages = _stages(session, account.strategy_id)
    stage = stages[item.stage_index] if item.stage_index < len(stages) else None
    if stage is None or not waits_for_reply("whatsapp", stage.max_retries):
        return None
    interaction = session.scalar(select(Interaction).where(Interaction.queue_item_id == item.id).order_by(Interaction.id.desc()))
    if interaction is not None:
        interaction.status = InteractionStatus.answered
    log_event(session, account, at=now, event="outcome", stage_index=item.stage_index, queue_item_id=item.id,
              reason="replied", details={"channel": channel, "provider_ref": provider_ref})
    org = _org(session, account.organization_id)
    advance(session, account, completed_stage=item.stage_index, stage_count=len(stages), org_tz=org.timezone, now=now,
            cause="replied")
    return "completed"


# A stage waits for its answer only while the case is contactable (§4.3).
_WAITING_STATUSES = tuple(s.value for s in CONTACTABLE_STATUSES)


def expire_step_timeouts(session: Session, *, organization_id: int, now: datetime) -> int:
    """§4.8: a voice call, or a WhatsApp conversation (:func:`waits_for_reply`), with no outcome after
    ``step_timeout_hours`` counts as unanswered: retried while retries remain, then the case advances."""
    org = _org(session, organization_id)
    waiting = session.execute(
        select(QueueItem, Stage.step_timeout_hours, Stage)
        .join(Account, and_(Account.id == QueueItem.account_id, Account.case_number == QueueItem.case_number,
                            Account.case_next_stage == QueueItem.stage_index))
        .join(Stage, and_(Stage.strategy_id == QueueItem.strategy_id, Stage.position == QueueItem.stage_index))
        .where(QueueItem.organization_id == organization_id, QueueItem.action.in_(CONVERSATIONS),
               QueueItem.status == QueueStatus.completed, Account.status.in_(_WAITING_STATUSES))
    ).all()
    n = 0
    for item, timeout_hours, stage in waiting:
        if str(item.action) == "whatsapp" and not waits_for_reply("whatsapp", stage.max_retries):
            continue
        if item.sent_at is None or item.sent_at + timedelta(hours=timeout_hours or 24) > now:
            continue
        # Decide with the account locked, and everything read again: another scheduler may have
        # handled this timeout (or an outcome arrived) since the list above was read; it held the
        # lock until it committed (§4.10: only one process does each piece of work).
        account = _account(session, item.account_id, fresh=True)
        if (account.case_number != item.case_number or account.case_next_stage != item.stage_index
                or account.status not in _WAITING_STATUSES):
            continue
        answered = session.scalar(select(Interaction.id).where(Interaction.queue_item_id == item.id, Interaction.outcome.is_not(None)))
        if answered is not None:
            continue
        # A later item for the same stage (a retry already scheduled) means this timeout was handled.
        if session.scalar(select(QueueItem.id).where(QueueItem.account_id == item.account_id, QueueItem.case_number == item.case_number,
                                                      QueueItem.stage_index == item.stage_index, QueueItem.id > item.id)):
            continue
        if _waits_for_callback_expiry(account, item):
            continue  # the callback's own expiry decides
        log_event(session, account, at=now, event="step_timeout", stage_index=item.stage_index, queue_item_id=item.id)
        _retry_or_advance(session, account, item=item, stage=stage, org=org, now=now, reason="step_timeout")
        n += 1
    return n
