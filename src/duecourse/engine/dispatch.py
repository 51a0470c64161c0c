"""The queue processor (SPEC §4.6) and the dispatch rules (§4.7).

A worker claims due pending items as leases (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has
one writer), then handles each item in its own transaction: re-validation, the dispatch rules, the
send, the interaction and the case's advance commit together or not at all. A lease that expires
(its worker died) makes the item claimable again; the provider sees the same idempotency key, so a
message known to be sent is not sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from duecourse.campaigns.models import Campaign
from duecourse.channels.base import OutboundMessage, Provider, ProviderError
from duecourse.channels.registry import Providers
from duecourse.db.dialect import dialect_name
from duecourse.engine.assign import campaigns_enqueueable
from duecourse.engine.cases import advance, log_event, refresh_account_tab
from duecourse.engine.metrics import DISPATCH_SECONDS, DISPATCHES
from duecourse.engine.models import (
    Direction,
    Interaction,
    InteractionStatus,
    QueueItem,
    QueueStatus,
    Task,
    TaskStatus,
)
from duecourse.engine.timing import earliest_within_limit, into_allowed_hours, is_allowed, local_date
from duecourse.ledger.models import CONTACTABLE_STATUSES, Account, AccountStatus, CollectionTab
from duecourse.messaging import rendering
from duecourse.messaging.models import Template
from duecourse.messaging.service import account_context_for
from duecourse.strategies.models import Strategy
from duecourse.tenancy.models import Organization, OrganizationSettings
from duecourse.tenancy.service import get_settings
from duecourse.tenancy.settings import OrgSettings

CONTACT_CHANNELS = ("email", "sms", "whatsapp", "voice")
ADDRESS = {"email": "email", "sms": "phone", "whatsapp": "whatsapp", "voice": "phone"}
WAITS_FOR_OUTCOME = ("voice", "phone_call", "escalation")

ProviderFactory = Callable[[Session, datetime, int, str], Provider]

# Every channel into the sandbox outbox, whatever the organization configured (tests, simulation).
sandbox_providers = Providers(sandbox_only=True)


def paused_organizations(session: Session) -> list[int]:
    rows = session.execute(select(OrganizationSettings.organization_id, OrganizationSettings.data)).all()
    return [org_id for org_id, data in rows if (data or {}).get("automation", {}).get("engine_paused")]


def claim(
    session: Session, *, now: datetime, worker: str, limit: int, lease_seconds: int = 300, organization_id: int | None = None
) -> list[int]:
    """Claim up to ``limit`` due pending items (oldest schedule first) as leases; returns their ids.
    Items of organizations whose engine is paused stay pending (§4.7)."""
    due = (
        select(QueueItem.id)
        .where(QueueItem.status == QueueStatus.pending.value, QueueItem.scheduled_at <= now)
        .order_by(QueueItem.scheduled_at, QueueItem.stage_index, QueueItem.id)
        .limit(limit)
    )
    if organization_id is not None:
        due = due.where(QueueItem.organization_id == organization_id)
    paused = paused_organizations(session)
    if paused:
        due = due.where(QueueItem.organization_id.not_in(paused))
    if dialect_name(session) == "postgresql":
        due = due.with_for_update(skip_locked=True)
    rows = session.execute(
        update(QueueItem)
        .where(QueueItem.id.in_(due.scalar_subquery()), QueueItem.status == QueueStatus.pending.value)
        .values(
            status=QueueStatus.processing.value,
            claimed_by=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=QueueItem.attempt + 1,
            updated_at=now,
        )
        .returning(QueueItem.id, QueueItem.scheduled_at, QueueItem.stage_index)
        .execution_options(synchronize_session=False)
    ).all()
    # Handled in schedule order, and a case's stages in their order.
    return [r[0] for r in sorted(rows, key=lambda r: (r[1], r[2], r[0]))]


def recover_expired_leases(session: Session, *, now: datetime) -> int:
    """Items whose worker died go back to pending (§4.6); the send is idempotent per item."""
    result = session.execute(
        update(QueueItem)
        .where(QueueItem.status == QueueStatus.processing.value, QueueItem.lease_expires_at < now)
        .values(status=QueueStatus.pending.value, claimed_by=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


@dataclass
class _Ctx:
    session: Session
    item: QueueItem
    account: Account
    org: Organization
    settings: OrgSettings
    strategy: Strategy | None
    now: datetime


def process_item(
    session: Session, *, item_id: int, now: datetime, worker: str, providers: ProviderFactory = sandbox_providers
) -> str:
    """Handle one claimed item as one unit of work. Returns what happened (for counters and tests)."""
    item = session.scalar(
        select(QueueItem)
        .where(QueueItem.id == item_id, QueueItem.status == QueueStatus.processing.value, QueueItem.claimed_by == worker)
        .with_for_update()
    )
    if item is None:
        return "lost"  # the lease expired and another worker has it now
    account = session.scalar(select(Account).where(Account.id == item.account_id).with_for_update())
    org = session.get(Organization, item.organization_id)
    assert account is not None and org is not None
    ctx = _Ctx(session, item, account, org, get_settings(session, org.id), session.get(Strategy, item.strategy_id) if item.strategy_id else None, now)

    if ctx.settings.automation.engine_paused:
        _release(ctx)
        return "released"
    invalid = _revalidate(ctx)
    if invalid is not None:
        return invalid
    if item.action in CONTACT_CHANNELS:
        refused = _dispatch_rules(ctx)
        if refused is not None:
            return refused
    return _dispatch(ctx, providers)


def _release(ctx: _Ctx) -> None:
    ctx.item.status = QueueStatus.pending
    ctx.item.claimed_by = None
    ctx.item.lease_expires_at = None
    ctx.item.attempt = max(0, ctx.item.attempt - 1)
    ctx.item.updated_at = ctx.now


def _finish(ctx: _Ctx, status: QueueStatus, reason: str | None, *, error: str | None = None) -> None:
    item = ctx.item
    item.status = status
    item.reason = reason
    item.error = error
    item.finished_at = ctx.now
    item.updated_at = ctx.now
    item.claimed_by = None
    item.lease_expires_at = None
    ctx.session.flush()


def _cancel(ctx: _Ctx, reason: str) -> str:
    _finish(ctx, QueueStatus.cancelled, reason)
    log_event(ctx.session, ctx.account, at=ctx.now, event="cancelled", stage_index=ctx.item.stage_index,
              queue_item_id=ctx.item.id, reason=reason, cause="revalidation")
    return f"cancelled:{reason}"


def _revalidate(ctx: _Ctx) -> str | None:
    """§4.6: the account must still be eligible (§4.3) and the item must still be its case's next step."""
    a, item, s = ctx.account, ctx.item, ctx.session
    if a.status == AccountStatus.resolved or a.balance <= 0:
        return _cancel(ctx, "resolved")
    if item.case_number != a.case_number or a.strategy_id != item.strategy_id:
        return _cancel(ctx, "superseded")
    if a.blocked or a.collection_tab == CollectionTab.blocked:
        return _cancel(ctx, "account_blocked")
    if a.paused:
        return _cancel(ctx, "account_paused")
    if ctx.strategy is None or not ctx.strategy.active:
        return _cancel(ctx, "strategy_inactive")
    if a.campaign_id is not None:
        today = local_date(ctx.now, ctx.org.timezone)
        ok = s.scalar(select(Campaign.id).where(Campaign.id == a.campaign_id, campaigns_enqueueable(ctx.org.id, today)))
        if ok is None:
            return _cancel(ctx, "campaign_inactive")
    contactable = a.status in CONTACTABLE_STATUSES or (item.is_callback and a.status == AccountStatus.callback_pending)
    if not contactable:
        return _cancel(ctx, f"status_{a.status.value if hasattr(a.status, 'value') else a.status}")
    nxt = a.case_next_stage if a.case_next_stage is not None else 0
    if item.stage_index < nxt:
        return _cancel(ctx, "superseded")
    if item.stage_index > nxt:
        # run_all_in_order: a later stage waits for the earlier one to be dispatched first.
        earlier = s.scalar(
            select(QueueItem.scheduled_at)
            .where(QueueItem.account_id == a.id, QueueItem.case_number == a.case_number,
                   QueueItem.stage_index < item.stage_index,
                   QueueItem.status.in_([QueueStatus.pending.value, QueueStatus.processing.value]))
            .order_by(QueueItem.scheduled_at.desc())
            .limit(1)
        )
        if earlier is None:
            # The earlier stage is out, waiting for its outcome (a call, an agent's task): this item
            # would wait for hours. Withdraw it; the next enqueue after the case advances brings it back.
            return _cancel(ctx, "awaiting_previous_stage")
        _release(ctx)
        item.scheduled_at = max(earlier, ctx.now) + timedelta(minutes=1)
        log_event(s, a, at=ctx.now, event="deferred", stage_index=item.stage_index, queue_item_id=item.id,
                  reason="stage_order", details={"until": item.scheduled_at.isoformat()})
        return "deferred:stage_order"
    return None


def _skip(ctx: _Ctx, reason: str, *, advance_case: bool, retry_at: datetime | None = None) -> str:
    """§4.7: a refused dispatch is ``skipped`` with its reason; opt-outs advance the case, limits and
    hours re-schedule the same stage."""
    item, a = ctx.item, ctx.account
    _finish(ctx, QueueStatus.skipped, reason)
    details = {"retry_at": retry_at.isoformat()} if retry_at else None
    log_event(ctx.session, a, at=ctx.now, event="skipped", stage_index=item.stage_index, queue_item_id=item.id,
              reason=reason, cause="dispatch_rule", details=details)
    if retry_at is not None:
        again = QueueItem(
            organization_id=item.organization_id, account_id=item.account_id, strategy_id=item.strategy_id,
            campaign_id=item.campaign_id, case_number=item.case_number, stage_index=item.stage_index,
            action=item.action, scheduled_at=retry_at, status=QueueStatus.pending, attempt=0,
            max_attempts=item.max_attempts, retry_of_id=item.id, is_callback=item.is_callback, tone=item.tone,
            created_at=ctx.now, updated_at=ctx.now,
        )
        ctx.session.add(again)
        ctx.session.flush()
        log_event(ctx.session, a, at=ctx.now, event="enqueued", stage_index=item.stage_index, queue_item_id=again.id,
                  reason=reason, cause="deferred")
    if advance_case and ctx.strategy is not None:
        advance(ctx.session, a, completed_stage=item.stage_index, stage_count=len(ctx.strategy.stages),
                org_tz=ctx.org.timezone, now=ctx.now, cause=f"skipped:{reason}")
    return f"skipped:{reason}"


def _dispatch_rules(ctx: _Ctx) -> str | None:
    """§4.7, in order: opt-out and contact info, frequency limits, allowed hours (debtor's time zone)."""
    a, channel = ctx.account, str(ctx.item.action)
    if getattr(a, f"opt_out_{channel}"):
        return _skip(ctx, "opt_out", advance_case=True)
    if not getattr(a, ADDRESS[channel]):
        return _skip(ctx, "no_contact_info", advance_case=True)
    tz = a.timezone or ctx.org.timezone
    hours = ctx.settings.dispatch.allowed_hours[channel]
    contacts = ctx.session.execute(
        select(Interaction.occurred_at, Interaction.channel).where(
            Interaction.account_id == a.id,
            Interaction.direction == Direction.outbound.value,
            Interaction.channel.in_(CONTACT_CHANNELS),
            Interaction.occurred_at > ctx.now - timedelta(days=7),
        )
    ).all()
    limits = ctx.settings.dispatch.frequency_limits
    overall = limits["overall"]
    own = limits[channel]
    earliest = max(
        earliest_within_limit(ctx.now, [c[0] for c in contacts], per_day=overall.per_day, per_week=overall.per_week),
        earliest_within_limit(ctx.now, [c[0] for c in contacts if str(c[1]) == channel], per_day=own.per_day, per_week=own.per_week),
    )
    # A return call the debtor asked for keeps its time: the limit protects debtors from us, not
    # from the call they requested.
    if earliest > ctx.now and not ctx.item.is_callback:
        retry_at = into_allowed_hours(earliest, tz=tz, start=hours.start, end=hours.end, days=hours.days)
        return _skip(ctx, "frequency_limit", advance_case=False, retry_at=retry_at)
    if not is_allowed(ctx.now, tz=tz, start=hours.start, end=hours.end, days=hours.days):
        retry_at = into_allowed_hours(ctx.now, tz=tz, start=hours.start, end=hours.end, days=hours.days)
        return _skip(ctx, "outside_hours", advance_case=False, retry_at=retry_at)
    return None


def _render(ctx: _Ctx, unsubscribe: str | None) -> tuple[str | None, str, str | None]:
    stage = ctx.strategy.stages[ctx.item.stage_index] if ctx.strategy else None
    template = ctx.session.get(Template, stage.template_id) if stage and stage.template_id else None
    if template is None:
        return None, "", None
    context = account_context_for(ctx.session, organization_id=ctx.org.id, account_id=ctx.account.id, now=ctx.now,
                                  unsubscribe_link=unsubscribe)
    subject = rendering.render(template.subject, context, field="subject") if template.subject else None
    text = rendering.render(template.body_text, context, field="body_text")
    html = rendering.render(template.body_html, context, field="body_html", html=True) if template.body_html else None
    return subject, text, html


def _message_context(ctx: _Ctx, unsubscribe: str | None) -> dict[str, Any]:
    """What an adapter may need beyond the rendered text: the voice agent's debtor context (§4.8),
    the email's unsubscribe link (RFC 8058 headers)."""
    a = ctx.account
    return {
        "queue_item_id": ctx.item.id,
        "debtor_name": a.name,
        "account_external_id": a.external_id,
        "balance": str(a.balance),
        "currency": a.currency,
        "carrying_invoice_id": a.carrying_invoice_id,
        "stage_index": ctx.item.stage_index,
        "tone": ctx.item.tone,
        "language": a.language,
        "timezone": a.timezone or ctx.org.timezone,
        "unsubscribe_url": unsubscribe,
    }


def _dispatch(ctx: _Ctx, providers: ProviderFactory) -> str:
    item, a, s = ctx.item, ctx.account, ctx.session
    channel = str(item.action)
    stage_count = len(ctx.strategy.stages) if ctx.strategy else 0
    provider_ref: str | None = None
    status = InteractionStatus.sent
    if channel in CONTACT_CHANNELS:
        link = getattr(providers, "unsubscribe_link", None)
        unsubscribe = link(organization_id=ctx.org.id, account_id=a.id, channel=channel) if link else None
        try:
            subject, text, html = _render(ctx, unsubscribe)
        except rendering.RenderError as exc:
            return _fail(ctx, f"template: {exc}", retryable=False)
        message = OutboundMessage(
            organization_id=ctx.org.id, account_id=a.id, channel=channel, to=getattr(a, ADDRESS[channel]),
            body_text=text, subject=subject, body_html=html, tone=item.tone, idempotency_key=f"qi-{item.id}",
            context=_message_context(ctx, unsubscribe),
        )
        try:
            provider_ref = providers(s, ctx.now, ctx.org.id, channel).send(message).provider_ref
        except ProviderError as exc:
            return _fail(ctx, str(exc), retryable=exc.retryable)
    elif channel in ("phone_call", "escalation"):
        s.add(Task(organization_id=ctx.org.id, account_id=a.id, queue_item_id=item.id, kind=channel,
                   status=TaskStatus.open, stage_index=item.stage_index, due_at=ctx.now, created_at=ctx.now))
        status = InteractionStatus.queued
    elif channel == "place_on_stop":
        a.on_stop = True
        status = InteractionStatus.completed

    s.add(Interaction(
        organization_id=ctx.org.id, account_id=a.id, queue_item_id=item.id, strategy_id=item.strategy_id,
        campaign_id=item.campaign_id, stage_index=item.stage_index, channel=channel, direction=Direction.outbound,
        status=status, provider_ref=provider_ref, occurred_at=ctx.now, created_at=ctx.now,
    ))
    item.provider_ref = provider_ref
    item.sent_at = ctx.now
    _finish(ctx, QueueStatus.completed, None)
    a.last_interaction_at = ctx.now
    if a.status in (AccountStatus.pending_contact, AccountStatus.promise_overdue):
        a.status = AccountStatus.in_auto_management
    log_event(s, a, at=ctx.now, event="dispatched", stage_index=item.stage_index, queue_item_id=item.id,
              details={"channel": channel, "provider_ref": provider_ref})
    if channel in WAITS_FOR_OUTCOME:
        refresh_account_tab(s, a)  # the stage completes with its outcome (§4.8)
    else:
        advance(s, a, completed_stage=item.stage_index, stage_count=stage_count, org_tz=ctx.org.timezone, now=ctx.now,
                cause="dispatched")
    return "dispatched"


def _fail(ctx: _Ctx, error: str, *, retryable: bool) -> str:
    """§4.6 ``failed``: retried with exponential back-off while attempts remain; then the stage ends
    failed (logged) and the case moves on, so nothing waits forever."""
    item, a = ctx.item, ctx.account
    if retryable and item.attempt < item.max_attempts:
        backoff = timedelta(minutes=ctx.settings.dispatch.retry_backoff_minutes * 2 ** (item.attempt - 1))
        _release(ctx)
        item.attempt += 1  # _release undid the claim's count; this attempt did happen
        item.error = error
        item.scheduled_at = ctx.now + backoff
        log_event(ctx.session, a, at=ctx.now, event="retry", stage_index=item.stage_index, queue_item_id=item.id,
                  reason="provider_error", details={"error": error[:500], "attempt": item.attempt, "next_at": item.scheduled_at.isoformat()})
        return "retry"
    _finish(ctx, QueueStatus.failed, "provider_error", error=error[:2000])
    log_event(ctx.session, a, at=ctx.now, event="failed", stage_index=item.stage_index, queue_item_id=item.id,
              reason="provider_error", details={"error": error[:500], "attempts": item.attempt})
    if ctx.strategy is not None:
        advance(ctx.session, a, completed_stage=item.stage_index, stage_count=len(ctx.strategy.stages),
                org_tz=ctx.org.timezone, now=ctx.now, cause="failed")
    return "failed"


def run_due(
    db: Any,
    *,
    now: datetime,
    worker: str,
    batch: int = 100,
    providers: ProviderFactory = sandbox_providers,
    organization_id: int | None = None,
) -> dict[str, int]:
    """Claim and process due items until none is left (one transaction per item). Returns counters."""
    counts: dict[str, int] = {}
    while True:
        with db.transaction() as session:
            recover_expired_leases(session, now=now)
            ids = claim(session, now=now, worker=worker, limit=batch, organization_id=organization_id)
        if not ids:
            return counts
        for item_id in ids:
            with DISPATCH_SECONDS.time(), db.transaction() as session:
                outcome = process_item(session, item_id=item_id, now=now, worker=worker, providers=providers)
            key = outcome.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
            DISPATCHES.labels(outcome=outcome).inc()


