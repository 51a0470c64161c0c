"""The queue processor (SPEC §4.6) and the dispatch rules (§4.7).

A worker claims a batch of due pending items and handles it in one transaction: the claim locks
the items (``FOR NO KEY UPDATE SKIP LOCKED`` on PostgreSQL, so other workers pass them by; SQLite has one
writer) and their accounts, and writes nothing; each item's re-validation, dispatch rules, send,
interaction and case advance are written when the batch commits, together or not at all. A worker
that dies mid-batch leaves its items pending.

Providers that write in the database (the sandbox) send inside the batch. Providers that talk to
the network never do: their messages are rendered in the batch transaction, which commits their
items as ``processing`` with a lease; they are sent afterwards with no transaction open (one thread
per organization and channel, so a slow provider holds up only its own messages), each withheld if
its account changed meanwhile (``_still_sendable``), their provider references journaled at once,
and the interaction and case advance recorded in a second transaction. A lease that expires (its
worker died) makes the item claimable again; an item whose send is journaled is then recorded, never
sent again, and the provider sees the same idempotency key. A provider that fails with a retryable
error stops being called for its organization and channel for a cool-down; its items wait without
spending attempts.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import BigInteger, String, bindparam, column, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from duecourse.campaigns.models import Campaign
from duecourse.channels.base import OutboundMessage, Provider, ProviderError
from duecourse.channels.registry import Providers
from duecourse.clock import Clock
from duecourse.db.base import UTCDateTime
from duecourse.db.dialect import dialect_name, id_in, serialize_on
from duecourse.engine import dispatch_rows
from duecourse.engine.assign import campaigns_enqueueable
from duecourse.engine.cases import advance, log_event, refresh_account_tab, tabs_refreshed_at_end
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
from duecourse.engine.stages import waits_for_reply
from duecourse.engine.timing import NEVER, earliest_within_limit, into_allowed_hours, is_allowed, local_date
from duecourse.ledger.models import CONTACTABLE_STATUSES, Account, AccountStatus, CollectionTab, Invoice
from duecourse.messaging import rendering
from duecourse.messaging.models import Template
from duecourse.messaging.service import account_context_for, variant_for
from duecourse.strategies.models import Strategy
from duecourse.tenancy.models import Organization, OrganizationSettings
from duecourse.tenancy.service import get_settings
from duecourse.tenancy.settings import OrgSettings

log = logging.getLogger("duecourse.engine.dispatch")

CONTACT_CHANNELS = ("email", "sms", "whatsapp", "voice")
INVALID_FLAG = {"email": "email_invalid", "sms": "phone_invalid", "whatsapp": "whatsapp_invalid", "voice": "phone_invalid"}
BREAKER_SECONDS = 60
DEFAULT_BATCH = 1000  # items per claim and transaction (the worker uses ``Settings.dispatch_batch``, same default)
# Messages for network providers per batch: they are sent one after another after the batch commits,
# and each extends its item's lease by one send's worth of time, so a worker that dies mid-batch
# leaves its last items waiting at most ~100 sends (about 50 minutes) before another worker takes
# them. A batch's further messages for the network are released for the next batch.
MAX_NETWORK_SENDS = 100
ADDRESS = {"email": "email", "sms": "phone", "whatsapp": "whatsapp", "voice": "phone"}
WAITS_FOR_OUTCOME = ("voice", "phone_call", "escalation")

ProviderFactory = Callable[[Session, datetime, int, str], Provider]

# Every channel into the sandbox outbox, whatever the organization configured (tests, simulation).
sandbox_providers = Providers(sandbox_only=True)


def paused_organizations(session: Session) -> list[int]:
    rows = session.execute(select(OrganizationSettings.organization_id, OrganizationSettings.data)).all()
    return [org_id for org_id, data in rows if (data or {}).get("automation", {}).get("engine_paused")]


def _due(stmt: Any, now: datetime, paused: list[int], organization_id: int | None) -> Any:
    """``stmt`` narrowed to the due pending items, oldest schedule first (a case's stages in order)."""
    due = (
        stmt.where(QueueItem.status == QueueStatus.pending.value, QueueItem.scheduled_at <= now)
        .order_by(QueueItem.scheduled_at, QueueItem.stage_index, QueueItem.id)
    )
    if organization_id is not None:
        due = due.where(QueueItem.organization_id == organization_id)
    if paused:
        due = due.where(QueueItem.organization_id.not_in(paused))
    return due


def claim(
    session: Session, batch: _Batch, *, now: datetime, worker: str, limit: int, organization_id: int | None = None,
    ids: list[int] | None = None,
) -> list[int]:
    """Claim up to ``limit`` due pending items (``ids``: those of them) with their accounts for this
    transaction and read what the batch needs (``_preload``). Returns the claimed ids in the order to
    handle them. Items of organizations whose engine is paused stay pending (§4.7).

    Nothing is written: the items are marked claimed in memory (``process_item``), and what the batch
    does to them is written once, when it commits. PostgreSQL locks each item together with its
    account, ``FOR NO KEY UPDATE OF accounts, queue_items SKIP LOCKED``: an item is taken only if
    both rows are free, so other workers pass by the items and every other item of the accounts this
    batch holds, and this batch passes by the items of accounts another transaction holds (another
    worker's batch, an import, a request) without locking them. The account is locked first (the
    order of ``OF``, which is the order PostgreSQL locks a row's tables in; a test checks it): an
    item whose account is held is never locked, so a request cancelling it does not wait for this
    batch. The other way round, an account whose item another transaction holds stays locked by
    this batch, unused, until it commits (a row lock is not given back early). SQLite has one
    writer, and the claim takes the database's write lock for the batch up front. A worker that
    dies leaves its items pending (its transaction rolls back, and nothing was sent: network sends
    wait for the commit)."""
    postgres = dialect_name(session) == "postgresql"
    if not postgres:
        serialize_on(session, QueueItem.__table__, 0)  # SQLite: the database's write lock, before reading
    stmt = _due(
        select(QueueItem, Account).select_from(Account).join(QueueItem, QueueItem.account_id == Account.id),
        now, paused_organizations(session), organization_id,
    ).limit(limit)
    if ids is not None:
        stmt = stmt.where(id_in(session, QueueItem.id, ids))
    if postgres:
        # OF's order is the order the rows are locked in (accounts first, see above); FOR NO KEY
        # UPDATE lets foreign-key checks on the account pass (inserting its interactions).
        stmt = stmt.with_for_update(skip_locked=True, key_share=True, of=[Account, QueueItem])
    batch.worker = worker
    rows = session.execute(stmt).all()
    items = [item for item, _ in rows]
    accounts = list({account.id: account for _, account in rows}.values())
    _preload(session, batch, items, accounts, now=now, worker=worker)
    return [i.id for i in items]


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
    batch: _Batch | None = None  # read up front by ``claim``; None when recording network sends


@dataclass
class _Send:
    """A message rendered in the batch transaction, to be sent after it commits."""

    item_id: int
    organization_id: int
    channel: str
    provider: Provider
    message: OutboundMessage
    provider_ref: str | None = None
    error: ProviderError | None = None
    # Not sent: the account changed after the batch decided (``_still_sendable``); decided again
    # when the batch is recorded.
    withheld: bool = False
    worker: str = ""  # whose batch committed the item as ``processing`` (it is sent only while it still is)


@dataclass
class _Batch:
    """What one batch shares: messages waiting for the network, accounts already being written to."""

    sends: list[_Send] = field(default_factory=list)
    busy_accounts: set[int] = field(default_factory=set)
    # Accounts with a message on its way out through another worker (claimed, not yet recorded).
    in_flight_elsewhere: set[int] = field(default_factory=set)
    # The claiming worker: an item handed to a network provider is committed in its name, with a
    # lease (``_dispatch``); every other item leaves ``processing`` before the batch commits.
    worker: str = ""
    items: dict[int, QueueItem] = field(default_factory=dict)
    accounts: dict[int, Account] = field(default_factory=dict)
    contacts: dict[int, list[tuple[datetime, str]]] = field(default_factory=dict)
    # The accounts' carrying invoices, what the templates show of them (plain rows, by id).
    invoices: dict[int, Any] = field(default_factory=dict)
    campaign_open: dict[int, bool] = field(default_factory=dict)
    # (organization, channel, time zone) -> whether the batch's "now" is inside the allowed hours.
    allowed_now: dict[tuple[int, str, str], bool] = field(default_factory=dict)


def _preload(
    session: Session, batch: _Batch, items: list[QueueItem], accounts: list[Account], *, now: datetime, worker: str
) -> None:
    """Read, for the whole batch instead of item by item, the claimed accounts' contacts of the last
    7 days (frequency limits), their sends in other workers' hands, their carrying invoices
    (templates) and whether their campaigns are open."""
    rows = dispatch_rows.current(session)
    batch.items.update((i.id, i) for i in items)
    batch.accounts.update((a.id, a) for a in accounts)
    if rows is not None:  # their changes are written with Core at the end of the batch
        rows.tracked.extend(items)
        rows.tracked.extend(accounts)
    if accounts:
        ids = sorted(a.id for a in accounts)
        for account_id in ids:
            batch.contacts[account_id] = []
        for account_id, at, channel in _recent_contacts(session, ids, since=now - timedelta(days=7)):
            batch.contacts[account_id].append((at, str(channel)))
        batch.in_flight_elsewhere |= _in_flight_elsewhere(session, ids, worker=worker, now=now)
        invoice_ids = {a.carrying_invoice_id for a in accounts if a.carrying_invoice_id is not None}
        if invoice_ids:
            batch.invoices.update((row.id, row) for row in session.execute(
                select(Invoice.id, Invoice.organization_id, Invoice.number, Invoice.total, Invoice.due_date)
                .where(id_in(session, Invoice.id, sorted(invoice_ids)))
            ))
        # The organizations, their settings, the strategies with their stages and templates: read
        # now, while nothing in the session is changed (a read later flushes the changes made so far).
        for org_id in sorted({i.organization_id for i in items}):
            get_settings(session, _get(session, Organization, org_id).id)
        for strategy_id in sorted({i.strategy_id for i in items if i.strategy_id is not None}):
            strategy = _get(session, Strategy, strategy_id)
            for stage in strategy.stages if strategy is not None else ():
                if stage.template_id is not None:
                    _get(session, Template, stage.template_id)
        campaigns: dict[int, set[int]] = defaultdict(set)
        for a in accounts:
            if a.campaign_id is not None:
                campaigns[a.organization_id].add(a.campaign_id)
        for org_id, campaign_ids in campaigns.items():
            today = local_date(now, _get(session, Organization, org_id).timezone)
            open_ids = set(session.scalars(
                select(Campaign.id).where(id_in(session, Campaign.id, sorted(campaign_ids)),
                                          campaigns_enqueueable(org_id, today))
            ))
            batch.campaign_open.update((c, c in open_ids) for c in campaign_ids)


# PostgreSQL: one index probe per account (LATERAL, kept from being flattened by OFFSET 0). As a
# plain ``account_id IN (…)`` the planner scans the whole table whenever its statistics say it is
# small (a fresh or not yet analyzed table), and the table grows with every batch: the dispatch of
# 20,000 items spent a sixth of its time rescanning interactions.
_RECENT_CONTACTS_PG = text(
    "SELECT a.id, i.occurred_at, i.channel FROM unnest(CAST(:ids AS BIGINT[])) AS a(id) CROSS JOIN LATERAL "
    "(SELECT interactions.occurred_at, interactions.channel FROM interactions WHERE interactions.account_id = a.id "
    "AND interactions.occurred_at > :since AND interactions.direction = :outbound "
    "AND interactions.channel IN ('email', 'sms', 'whatsapp', 'voice') OFFSET 0) AS i"
).bindparams(bindparam("since", type_=UTCDateTime)).columns(
    column("id", BigInteger), column("occurred_at", UTCDateTime), column("channel", String)
)
# The status test is written so that no index can serve it: with stale statistics ("nothing is
# processing") the planner otherwise walks the (status, scheduled_at) index for every account.
_IN_FLIGHT_PG = text(
    "SELECT DISTINCT a.id FROM unnest(CAST(:ids AS BIGINT[])) AS a(id) CROSS JOIN LATERAL "
    "(SELECT 1 FROM queue_items WHERE queue_items.account_id = a.id AND queue_items.status || '' = 'processing' "
    "AND queue_items.claimed_by != :worker AND queue_items.lease_expires_at >= :now OFFSET 0) AS q"
).bindparams(bindparam("now", type_=UTCDateTime))
assert set(CONTACT_CHANNELS) == {"email", "sms", "whatsapp", "voice"}


def _recent_contacts(session: Session, account_ids: list[int], *, since: datetime) -> Any:
    """(account, when, channel) of the accounts' outbound contacts after ``since`` (frequency limits)."""
    if dialect_name(session) == "postgresql":
        return session.execute(_RECENT_CONTACTS_PG, {"ids": account_ids, "since": since,
                                                     "outbound": Direction.outbound.value})
    return session.execute(
        select(Interaction.account_id, Interaction.occurred_at, Interaction.channel).where(
            Interaction.account_id.in_(account_ids),
            Interaction.direction == Direction.outbound.value,
            Interaction.channel.in_(CONTACT_CHANNELS),
            Interaction.occurred_at > since,
        )
    )


def _in_flight_elsewhere(session: Session, account_ids: list[int], *, worker: str, now: datetime) -> set[int]:
    """The accounts with an item being sent by another worker right now (a live lease)."""
    if dialect_name(session) == "postgresql":
        return set(session.scalars(_IN_FLIGHT_PG, {"ids": account_ids, "worker": worker, "now": now}))
    return set(session.scalars(
        select(QueueItem.account_id).where(
            QueueItem.account_id.in_(account_ids), QueueItem.status == QueueStatus.processing.value,
            QueueItem.claimed_by != worker, QueueItem.lease_expires_at >= now,
        )
    ))


def _get(session: Session, model: Any, ident: int) -> Any:
    """``session.get`` that holds on to the object for the rest of the session. The identity map
    keeps only objects something refers to, and a batch needs the same organization, strategy and
    template for item after item."""
    keep = session.info.setdefault("dispatch_keep", {})
    key = (model, ident)
    if key not in keep:
        keep[key] = session.get(model, ident)
    return keep[key]


# (organization, channel) -> until when its provider is left alone after a retryable failure.
_BREAKERS: dict[tuple[int, str], datetime] = {}


def process_item(
    session: Session, *, item_id: int, now: datetime, batch: _Batch, providers: ProviderFactory = sandbox_providers,
) -> str:
    """Handle one item that :func:`claim` claimed into ``batch``, in the batch's transaction. Returns
    what happened (for counters and tests). A message for a network provider is rendered and left
    in ``batch.sends`` (outcome ``sending``), to be sent after the transaction commits."""
    item = batch.items.get(item_id)
    if item is None:
        return "lost"  # not claimed here: another worker has it
    # This attempt, counted as the item is handled (a read that flushes the session midway writes
    # the items handled so far and no others). Every way out of here sets the item's status: its
    # outcome, pending again, or ``processing`` for a message handed to the network.
    item.attempt += 1
    account = batch.accounts[item.account_id]
    org = _get(session, Organization, item.organization_id)
    ctx = _Ctx(session, item, account, org, get_settings(session, org.id),
               _get(session, Strategy, item.strategy_id) if item.strategy_id else None, now, batch)

    if item.sent_at is not None and item.provider_ref is not None:
        # Journaled as sent by a worker that died before recording it: record it, never send again.
        return _record_sent(ctx, item.provider_ref)
    if account.id in batch.busy_accounts:
        # Another item of this account is on its way out in this batch: the frequency limits and the
        # stage order must see it first, so this one waits for the next batch.
        _release(ctx)
        return "released"
    if ctx.settings.automation.engine_paused:
        _release(ctx)
        return "released"
    if account.id in batch.in_flight_elsewhere and item.action in CONTACT_CHANNELS:
        # Another worker is sending this account a message right now; its interaction is not written
        # yet, so the frequency limits could not count it. Look again in a minute.
        return _hold(ctx, now + timedelta(minutes=1), reason="in_flight")
    invalid = _revalidate(ctx)
    if invalid is not None:
        return invalid
    if item.action in CONTACT_CHANNELS:
        refused = _dispatch_rules(ctx)
        if refused is not None:
            return refused
    outcome = _dispatch(ctx, providers, batch)
    if outcome == "sending":
        batch.busy_accounts.add(account.id)
    return outcome


def _release(ctx: _Ctx) -> None:
    item = ctx.item
    item.status = QueueStatus.pending
    _clear_lease(item)
    item.attempt = max(0, item.attempt - 1)
    item.updated_at = ctx.now


def _clear_lease(item: QueueItem) -> None:
    # Set only when set: each attribute write is tracked (a microsecond a time), and an item claimed
    # in this batch's transaction never had a worker or lease written.
    if item.claimed_by is not None:
        item.claimed_by = None
    if item.lease_expires_at is not None:
        item.lease_expires_at = None


def _finish(ctx: _Ctx, status: QueueStatus, reason: str | None, *, error: str | None = None) -> None:
    item = ctx.item
    item.status = status
    if item.reason != reason:
        item.reason = reason
    if item.error != error:
        item.error = error
    item.finished_at = ctx.now
    item.updated_at = ctx.now
    _clear_lease(item)


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
    if a.case_invoice_id is not None and a.carrying_invoice_id is not None and a.case_invoice_id != a.carrying_invoice_id:
        # The invoice the case is about was paid, voided or deleted: its next message (a final
        # notice for it, say) must not go out. The strategy's next run restarts the case on the new
        # carrying invoice (§4.2).
        return _cancel(ctx, "carrying_invoice_changed")
    if a.blocked or a.collection_tab == CollectionTab.blocked:
        return _cancel(ctx, "account_blocked")
    if a.paused:
        return _cancel(ctx, "account_paused")
    if ctx.strategy is None or not ctx.strategy.active:
        return _cancel(ctx, "strategy_inactive")
    stages = ctx.strategy.stages
    if item.stage_index >= len(stages) or str(stages[item.stage_index].action_type) != str(item.action):
        # The strategy was edited since the item was enqueued: its stage is gone or is now another
        # action. Never send a stage's new template through the old channel; the next enqueue
        # brings the stage as it is now.
        return _cancel(ctx, "stage_changed")
    if a.campaign_id is not None and not _campaign_open(ctx, a.campaign_id):
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


def _campaign_open(ctx: _Ctx, campaign_id: int) -> bool:
    """Whether the campaign may still contact its accounts today (§5); asked once per batch."""
    known = ctx.batch.campaign_open if ctx.batch is not None else {}
    if campaign_id not in known:
        today = local_date(ctx.now, ctx.org.timezone)
        known[campaign_id] = ctx.session.scalar(
            select(Campaign.id).where(Campaign.id == campaign_id, campaigns_enqueueable(ctx.org.id, today))
        ) is not None
    return known[campaign_id]


def _skip(
    ctx: _Ctx, reason: str, *, advance_case: bool, retry_at: datetime | None = None, details: dict[str, Any] | None = None
) -> str:
    """§4.7: a refused dispatch is ``skipped`` with its reason; opt-outs advance the case, limits and
    hours re-schedule the same stage."""
    item, a = ctx.item, ctx.account
    _finish(ctx, QueueStatus.skipped, reason)
    if retry_at:
        details = {**(details or {}), "retry_at": retry_at.isoformat()}
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
    if getattr(a, INVALID_FLAG[channel]):
        return _skip(ctx, "invalid_contact_info", advance_case=True)
    tz = a.timezone or ctx.org.timezone
    hours = ctx.settings.dispatch.allowed_hours[channel]
    if ctx.batch is not None:
        contacts = ctx.batch.contacts.get(a.id, [])
    else:
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
    if earliest == NEVER and not ctx.item.is_callback:
        # A limit of 0 closes the channel (or all of them): no later time would allow this stage.
        return _skip(ctx, "frequency_limit", advance_case=True, details={"limit": 0})
    if earliest > ctx.now and not ctx.item.is_callback:
        retry_at = into_allowed_hours(earliest, tz=tz, start=hours.start, end=hours.end, days=hours.days)
        return _skip(ctx, "frequency_limit", advance_case=False, retry_at=retry_at)
    key = (ctx.org.id, channel, tz)
    known = ctx.batch.allowed_now if ctx.batch is not None else {}
    if key not in known:
        known[key] = is_allowed(ctx.now, tz=tz, start=hours.start, end=hours.end, days=hours.days)
    if not known[key]:
        retry_at = into_allowed_hours(ctx.now, tz=tz, start=hours.start, end=hours.end, days=hours.days)
        return _skip(ctx, "outside_hours", advance_case=False, retry_at=retry_at)
    return None


def _render(ctx: _Ctx, unsubscribe: str | None) -> tuple[str | None, str, str | None]:
    stage = ctx.strategy.stages[ctx.item.stage_index] if ctx.strategy else None
    template = _get(ctx.session, Template, stage.template_id) if stage and stage.template_id else None
    if template is None:
        return None, "", None
    if ctx.item.tone:
        template = variant_for(ctx.session, template, str(ctx.item.tone))  # §4.8: e.g. empathetic after a hostile call
    known: dict[str, Any] = {}  # the carrying invoice, when the batch read it (else it is looked up)
    invoice_id = ctx.account.carrying_invoice_id
    if invoice_id is None:
        known["invoice"] = None
    elif ctx.batch is not None and invoice_id in ctx.batch.invoices:
        known["invoice"] = ctx.batch.invoices[invoice_id]
    context = account_context_for(ctx.session, organization_id=ctx.org.id, account_id=ctx.account.id, now=ctx.now,
                                  unsubscribe_link=unsubscribe, account=ctx.account, org=ctx.org, **known)
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


def _dispatch(ctx: _Ctx, providers: ProviderFactory, batch: _Batch) -> str:
    item, a, s = ctx.item, ctx.account, ctx.session
    channel = str(item.action)
    provider_ref: str | None = None
    status = InteractionStatus.sent
    if channel in CONTACT_CHANNELS:
        until = _BREAKERS.get((ctx.org.id, channel))
        if until is not None and until > ctx.now:
            return _hold(ctx, until)
        link = getattr(providers, "unsubscribe_link", None)
        unsubscribe = link(organization_id=ctx.org.id, account_id=a.id, channel=channel) if link else None
        try:
            subject, text, html = _render(ctx, unsubscribe)
        except rendering.RenderError as exc:
            return _fail(ctx, f"template: {exc}", retryable=False, reason="template_error")
        message = OutboundMessage(
            organization_id=ctx.org.id, account_id=a.id, channel=channel, to=getattr(a, ADDRESS[channel]),
            body_text=text, subject=subject, body_html=html, tone=item.tone, idempotency_key=f"qi-{item.id}",
            context=_message_context(ctx, unsubscribe),
        )
        try:
            provider = providers(s, ctx.now, ctx.org.id, channel)
        except Exception as exc:  # noqa: BLE001 - unreadable credentials, a broken configuration
            return _fail(ctx, f"provider configuration: {exc}", retryable=False, reason="provider_configuration")
        if not getattr(provider, "in_transaction", False):
            if len(batch.sends) >= MAX_NETWORK_SENDS:
                _release(ctx)
                return "released"
            # Sent after this transaction commits; the lease covers the wait for the network.
            timeout = getattr(getattr(providers, "settings", None), "provider_timeout_seconds", 10.0)
            item.status = QueueStatus.processing
            item.claimed_by = batch.worker
            item.updated_at = ctx.now
            item.lease_expires_at = ctx.now + timedelta(
                seconds=ctx.settings.dispatch.lease_seconds + (len(batch.sends) + 1) * max(30.0, 2 * timeout))
            batch.sends.append(_Send(item.id, ctx.org.id, channel, provider, message, worker=batch.worker))
            return "sending"
        try:
            provider_ref = provider.send(message).provider_ref
        except ProviderError as exc:
            return _provider_failed(ctx, exc)
        return _record_sent(ctx, provider_ref)
    if channel in ("phone_call", "escalation"):
        s.add(Task(organization_id=ctx.org.id, account_id=a.id, queue_item_id=item.id, kind=channel,
                   status=TaskStatus.open, stage_index=item.stage_index, due_at=ctx.now, created_at=ctx.now))
        status = InteractionStatus.queued
    elif channel == "place_on_stop":
        a.on_stop = True
        status = InteractionStatus.completed
    return _record_sent(ctx, None, status=status)


def _record_sent(ctx: _Ctx, provider_ref: str | None, *, status: InteractionStatus = InteractionStatus.sent,
                 address: str | None = None) -> str:
    """The stage's action happened: the interaction, the item completed, the case's advance (§4.6).
    ``address``: where the message went, when it was sent before this transaction (else the
    account's address now)."""
    item, a, s = ctx.item, ctx.account, ctx.session
    channel = str(item.action)
    stage_count = len(ctx.strategy.stages) if ctx.strategy else 0
    if address is None and channel in ADDRESS:
        address = getattr(a, ADDRESS[channel])
    interaction = dict(
        organization_id=ctx.org.id, account_id=a.id, queue_item_id=item.id, strategy_id=item.strategy_id,
        campaign_id=item.campaign_id, stage_index=item.stage_index, channel=channel, direction=Direction.outbound,
        status=status, provider_ref=provider_ref, address=address, occurred_at=ctx.now, created_at=ctx.now,
        is_manual=False,
    )
    rows = dispatch_rows.current(s)
    if rows is not None:
        rows.interactions.append(interaction)  # inserted with the batch's other rows (dispatch_rows)
    else:
        s.add(Interaction(**interaction))
    if ctx.batch is not None and channel in CONTACT_CHANNELS:
        ctx.batch.contacts.setdefault(a.id, []).append((ctx.now, channel))  # the next item's frequency limits
    item.provider_ref = provider_ref
    item.sent_at = item.sent_at or ctx.now
    _finish(ctx, QueueStatus.completed, None)
    a.last_interaction_at = ctx.now
    if a.status in (AccountStatus.pending_contact, AccountStatus.promise_overdue):
        a.status = AccountStatus.in_auto_management
    log_event(s, a, at=ctx.now, event="dispatched", stage_index=item.stage_index, queue_item_id=item.id,
              details={"channel": channel, "provider_ref": provider_ref})
    if channel in ("escalation", "place_on_stop"):
        _emit_stage_event(ctx, channel)
    stage = ctx.strategy.stages[item.stage_index] if ctx.strategy and item.stage_index < stage_count else None
    if channel in WAITS_FOR_OUTCOME or (stage is not None and waits_for_reply(channel, stage.max_retries)):
        refresh_account_tab(s, a)  # the stage completes with its outcome (§4.8)
    else:
        advance(s, a, completed_stage=item.stage_index, stage_count=stage_count, org_tz=ctx.org.timezone, now=ctx.now,
                cause="dispatched")
    if item.early_report:
        from duecourse.engine.outcomes import record_delivery

        report, item.early_report = item.early_report, None
        with dispatch_rows.paused(s):  # the report reads the interaction just recorded, and logs its own way
            s.flush()
            record_delivery(s, organization_id=ctx.org.id, now=ctx.now, status=report["status"], queue_item_id=item.id,
                            error=report.get("error"))
    return "dispatched"


def _emit_stage_event(ctx: _Ctx, channel: str) -> None:
    """§7: escalation and place_on_stop stages tell the organization's systems (outbound events)."""
    from duecourse.events.service import account_data, emit, money

    a = ctx.account
    emit(ctx.session, organization_id=ctx.org.id, now=ctx.now,
         type="account.escalated" if channel == "escalation" else "account.placed_on_stop",
         data={**account_data(a), "balance": money(a.balance, a.currency), "currency": a.currency,
               "strategy_id": ctx.item.strategy_id, "stage_index": ctx.item.stage_index})


def _hold(ctx: _Ctx, until: datetime, *, reason: str = "provider_unavailable") -> str:
    """Wait without spending an attempt: the channel's provider is cooling down after a failure, or
    another worker is sending this account a message right now."""
    _release(ctx)
    ctx.item.scheduled_at = until
    log_event(ctx.session, ctx.account, at=ctx.now, event="deferred", stage_index=ctx.item.stage_index,
              queue_item_id=ctx.item.id, reason=reason, details={"until": until.isoformat()})
    return f"deferred:{reason}"


def _provider_failed(ctx: _Ctx, exc: ProviderError) -> str:
    if exc.opted_out:
        # The debtor opted out in a way we did not see (a keyword only the provider knows, a reply
        # to another sender): honour it here too, and skip the stage as an opt-out (§4.7).
        channel = str(ctx.item.action)
        setattr(ctx.account, f"opt_out_{channel}", True)
        log_event(ctx.session, ctx.account, at=ctx.now, event="opted_out", stage_index=ctx.item.stage_index,
                  queue_item_id=ctx.item.id, reason="provider_opt_out", details={"channel": channel, "error": str(exc)[:500]})
        return _skip(ctx, "opt_out", advance_case=True)
    if exc.invalid_address:
        # The provider says the address does not exist: flag it, so no channel keeps trying it.
        setattr(ctx.account, INVALID_FLAG[str(ctx.item.action)], True)
        log_event(ctx.session, ctx.account, at=ctx.now, event="contact_invalid", stage_index=ctx.item.stage_index,
                  queue_item_id=ctx.item.id, reason=f"{ADDRESS[str(ctx.item.action)]}_invalid",
                  details={"error": str(exc)[:500]})
    elif exc.retryable:
        _BREAKERS[(ctx.org.id, str(ctx.item.action))] = ctx.now + timedelta(seconds=BREAKER_SECONDS)
    return _fail(ctx, str(exc), retryable=exc.retryable)


def _fail(ctx: _Ctx, error: str, *, retryable: bool, reason: str = "provider_error") -> str:
    """§4.6 ``failed``: retried with exponential back-off while attempts remain; then the stage ends
    failed (logged) and the case moves on, so nothing waits forever. Returns ``retry:<reason>`` or
    ``failed:<reason>`` (the metrics count failures by reason, §9)."""
    item, a = ctx.item, ctx.account
    if retryable and item.attempt < item.max_attempts:
        backoff = timedelta(minutes=ctx.settings.dispatch.retry_backoff_minutes * 2 ** (item.attempt - 1))
        _release(ctx)
        item.attempt += 1  # _release undid the claim's count; this attempt did happen
        item.error = error
        item.scheduled_at = ctx.now + backoff
        log_event(ctx.session, a, at=ctx.now, event="retry", stage_index=item.stage_index, queue_item_id=item.id,
                  reason=reason, details={"error": error[:500], "attempt": item.attempt, "next_at": item.scheduled_at.isoformat()})
        return f"retry:{reason}"
    _finish(ctx, QueueStatus.failed, reason, error=error[:2000])
    log_event(ctx.session, a, at=ctx.now, event="failed", stage_index=item.stage_index, queue_item_id=item.id,
              reason=reason, details={"error": error[:500], "attempts": item.attempt})
    if ctx.strategy is not None:
        advance(ctx.session, a, completed_stage=item.stage_index, stage_count=len(ctx.strategy.stages),
                org_tz=ctx.org.timezone, now=ctx.now, cause="failed")
    return f"failed:{reason}"


def run_due(
    db: Any,
    *,
    worker: str,
    now: datetime | None = None,
    clock: Clock | None = None,
    batch: int = DEFAULT_BATCH,
    providers: ProviderFactory = sandbox_providers,
    organization_id: int | None = None,
) -> dict[str, int]:
    """Claim and process due items until none is left, a batch per transaction. Returns counters.

    Give ``clock`` or ``now``. With ``clock`` (a worker) every batch reads the time again: working
    through a backlog can take minutes, and a claim's lease, the allowed hours and the times
    recorded must be those of the batch; with a time taken once, a worker still looping after
    five minutes would claim items whose leases had already expired for every other worker, which
    would take them and send them too. ``now`` handles every batch at that instant (``tick --at``,
    simulations and tests, where time stands still)."""
    if (now is None) == (clock is None):
        raise TypeError("run_due needs exactly one of now and clock")
    counts: dict[str, int] = {}
    while True:
        if clock is not None:
            now = clock.now()
        assert now is not None
        with db.transaction() as session:
            recover_expired_leases(session, now=now)
        with DISPATCH_SECONDS.time():
            outcomes = _run_batch(db, now=now, worker=worker, providers=providers, limit=batch,
                                  organization_id=organization_id)
        for outcome in outcomes:
            key = outcome.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
            DISPATCHES.labels(outcome=outcome).inc()
        if not outcomes:
            # Nothing due any more but items whose accounts are held elsewhere: the next run (the
            # worker's next poll) takes them.
            return counts


def _run_batch(
    db: Any, *, now: datetime, worker: str, providers: ProviderFactory, limit: int = DEFAULT_BATCH,
    organization_id: int | None = None,
) -> list[str]:
    """Claim and handle one batch in one transaction, then send its network messages and record
    them. Returns the outcomes."""
    pending = _Batch()
    ids: list[int] = []
    try:
        with db.transaction() as session, tabs_refreshed_at_end(session), dispatch_rows.collecting(session):
            started = time.monotonic()
            ids = claim(session, pending, now=now, worker=worker, limit=limit, organization_id=organization_id)
            outcomes = [process_item(session, item_id=i, now=now, providers=providers, batch=pending) for i in ids]
            # The network messages' leases run from when the batch commits, not from its start.
            _extend_leases(pending, timedelta(seconds=time.monotonic() - started))
    except Exception:  # noqa: BLE001 - one bad item must not hold the others: redo them one by one
        if not ids:
            raise  # the claim itself failed: nothing was taken
        log.exception("dispatch batch failed; handling its %d items one at a time", len(ids))
        pending = _Batch()
        outcomes = [_one(db, i, now=now, worker=worker, providers=providers, batch=pending) for i in ids]
    if pending.sends:
        _send_all(db, pending.sends, now=now)
        recorded = _record_all(db, pending.sends, now=now, worker=worker)
        outcomes = [o for o in outcomes if o != "sending"] + recorded
    return outcomes


def _one(db: Any, item_id: int, *, now: datetime, worker: str, providers: ProviderFactory, batch: _Batch) -> str:
    sends, busy_accounts = len(batch.sends), set(batch.busy_accounts)
    seen: tuple[int, datetime] | None = None
    try:
        with db.transaction() as session:
            started = time.monotonic()
            if not claim(session, batch, now=now, worker=worker, limit=1, ids=[item_id]):
                return "lost"  # another worker took it meanwhile, or its account is busy
            item = batch.items[item_id]
            seen = (item.attempt, item.updated_at)
            outcome = process_item(session, item_id=item_id, now=now, providers=providers, batch=batch)
            _extend_leases(batch, timedelta(seconds=time.monotonic() - started), first=sends)
            return outcome
    except Exception as exc:  # noqa: BLE001
        # The transaction rolled back: a message it handed to the network must not go out.
        del batch.sends[sends:]
        batch.busy_accounts = busy_accounts
        log.exception("dispatch of queue item %s failed", item_id)
        if seen is None or isinstance(exc, OperationalError):
            return "lost"  # not handled, or a passing database failure (a deadlock, a lost connection): next batch
        with db.transaction() as session:
            item = session.scalar(
                select(QueueItem).where(QueueItem.id == item_id, QueueItem.status == QueueStatus.pending.value)
                .with_for_update(skip_locked=True)
            )
            if item is None or (item.attempt, item.updated_at) != seen:
                return "lost"  # another worker has it, or has handled it since
            # The exception's own text can carry SQL and its parameters: it goes to the worker's
            # log only; the queue (shown to every role) says what kind of failure it was.
            item.status, item.reason = QueueStatus.failed, "internal_error"
            item.error = f"internal error ({type(exc).__name__}); the worker's log has the details"
            item.finished_at = item.updated_at = now
            _clear_lease(item)
        return "failed:internal_error"


def _extend_leases(batch: _Batch, elapsed: timedelta, *, first: int = 0) -> None:
    for send in batch.sends[first:]:
        item = batch.items.get(send.item_id)
        if item is not None and item.lease_expires_at is not None:
            item.lease_expires_at += elapsed


def _send_all(db: Any, sends: list[_Send], *, now: datetime) -> None:
    """Send with no transaction open, one thread per (organization, channel), writing down each
    accepted send at once. After a retryable failure the rest of that group is not tried: the
    provider is struggling."""
    groups: dict[tuple[int, str], list[_Send]] = defaultdict(list)
    for send in sends:
        groups[(send.organization_id, send.channel)].append(send)

    def run(group: list[_Send]) -> None:
        broken: ProviderError | None = None
        for send in group:
            if broken is not None:
                send.error = ProviderError(f"not tried: {broken}", retryable=True)
                continue
            if not _still_sendable(db, send):
                send.withheld = True
                continue
            try:
                send.provider_ref = send.provider.send(send.message).provider_ref
            except ProviderError as exc:
                send.error = exc
                broken = exc if exc.retryable else None
                continue
            except Exception as exc:  # noqa: BLE001 - an adapter bug is a failed send, not a dead worker
                log.exception("provider %s raised", type(send.provider).__name__)
                send.error = ProviderError(f"{type(exc).__name__}: {exc}", retryable=True)
                broken = send.error
                continue
            _journal(db, send, now=now)

    if len(groups) == 1:
        run(next(iter(groups.values())))
        return
    with ThreadPoolExecutor(max_workers=min(8, len(groups)), thread_name_prefix="duecourse-send") as pool:
        list(pool.map(run, groups.values()))


def _still_sendable(db: Any, send: _Send) -> bool:
    """Read the account again just before its message leaves: the batch decided up to a hundred
    sends earlier (minutes, with a slow provider), and meanwhile the debtor may have unsubscribed
    or paid, or someone blocked or paused the account, or the strategy was switched off. Any of
    those withholds the message; recording the batch then decides again with everything stored.
    (A read that fails lets the message go: the batch's own checks passed.)"""
    item = QueueItem.__table__.c
    account = Account.__table__.c
    strategy = Strategy.__table__.c
    try:
        with db.transaction() as session:
            row = session.execute(
                select(account.status, account.balance, account.blocked, account.paused, account.case_number,
                       account.strategy_id, account[f"opt_out_{send.channel}"], account[INVALID_FLAG[send.channel]],
                       item.case_number.label("item_case"), item.strategy_id.label("item_strategy"), strategy.active,
                       item.status.label("item_status"), item.claimed_by)
                .select_from(QueueItem.__table__.join(Account.__table__, account.id == item.account_id)
                             .outerjoin(Strategy.__table__, strategy.id == item.strategy_id))
                .where(item.id == send.item_id)
            ).one_or_none()
    except Exception:  # noqa: BLE001
        log.exception("re-reading the account of queue item %s before its send failed", send.item_id)
        return True
    if row is None:
        return False  # the item (with its account) was deleted
    (status, balance, blocked, paused, case_number, strategy_id, opted_out, invalid, item_case, item_strategy, active,
     item_status, claimed_by) = row
    if item_status != QueueStatus.processing.value or claimed_by != send.worker:
        return False  # not this worker's any more (its lease ran out, another worker has it)
    return not (
        status == AccountStatus.resolved or balance <= 0 or blocked or paused or opted_out or invalid
        or case_number != item_case or strategy_id != item_strategy or not active
    )


def _journal(db: Any, send: _Send, *, now: datetime) -> None:
    """Write down that the provider accepted the message, before anything else can fail: a worker
    that dies now is followed by one that records the send instead of repeating it, and a delivery
    report that arrives now finds its message."""
    try:
        with db.transaction() as session:
            session.execute(
                update(QueueItem).where(QueueItem.id == send.item_id)
                .values(provider_ref=send.provider_ref, sent_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
    except Exception:  # noqa: BLE001 - the record step below still writes it, in its own transaction
        log.exception("journal of queue item %s failed", send.item_id)


def _record_all(db: Any, sends: list[_Send], *, now: datetime, worker: str) -> list[str]:
    try:
        with db.transaction() as session, tabs_refreshed_at_end(session), dispatch_rows.collecting(session):
            return [_record(session, send, now=now, worker=worker) for send in sends]
    except Exception:  # noqa: BLE001
        log.exception("recording %d sends failed; recording them one at a time", len(sends))
        out = []
        for send in sends:
            try:
                with db.transaction() as session:
                    out.append(_record(session, send, now=now, worker=worker))
            except Exception:  # noqa: BLE001 - the journal keeps it; the lease brings it back
                log.exception("recording queue item %s failed", send.item_id)
                out.append("lost")
        return out


def _record(session: Session, send: _Send, *, now: datetime, worker: str) -> str:
    item = session.scalar(
        select(QueueItem)
        .where(QueueItem.id == send.item_id, QueueItem.status == QueueStatus.processing.value, QueueItem.claimed_by == worker)
        .with_for_update()
    )
    if item is None:
        return "lost"
    account = session.scalar(select(Account).where(Account.id == item.account_id).with_for_update())
    org = _get(session, Organization, item.organization_id)
    assert account is not None and org is not None
    ctx = _Ctx(session, item, account, org, get_settings(session, org.id),
               _get(session, Strategy, item.strategy_id) if item.strategy_id else None, now)
    if send.provider_ref is not None:
        return _record_sent(ctx, send.provider_ref, address=send.message.to)
    if send.withheld:
        # The account changed while the batch's messages went out: the same decisions as at the
        # start of a batch, with what is stored now (cancelled or skipped with the reason); if none
        # refuses any more, the item simply waits for the next batch.
        refused = _revalidate(ctx) or (_dispatch_rules(ctx) if item.action in CONTACT_CHANNELS else None)
        if refused is not None:
            return refused
        _release(ctx)
        return "released"
    assert send.error is not None
    if str(send.error).startswith("not tried: "):
        return _hold(ctx, now + timedelta(seconds=BREAKER_SECONDS))
    return _provider_failed(ctx, send.error)
