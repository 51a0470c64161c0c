"""Simulated outcomes for the sandbox (demo mode): the whole engine at work without a real provider.

When an organization's setting ``sandbox.simulate_outcomes`` is on, every message the sandbox
provider recorded in its outbox gets a realistic outcome some minutes after it was "sent", through
the same outcome services a real provider's webhook uses (:mod:`duecourse.engine.outcomes`,
:func:`duecourse.ledger.service.create_payment`):

* email: delivered (~95%) or bounced (~3%); the rest never report;
* SMS and WhatsApp: delivered (~93%) or failed (~4%);
* voice: no_answer (~40%), promise_to_pay (~15%: the balance or part of it, within 14 days),
  refused (~15%), callback_requested (~10%), wrong_party, dropped, dispute, paid_claimed, and a few
  calls that never connect (a delivery failure), with sentiment and willingness to pay;
* payments: ~5% of contacted accounts pay in full 2–5 days after their first message, and ~60% of
  the promises made on simulated calls are kept (paid by the promised date).

Each event is handled exactly once: it is recorded with
:func:`duecourse.channels.webhooks.receive_once` (source ``sandbox-sim``) before it is applied, the
way a provider's webhook would be. Everything is deterministic: each draw comes from a generator
seeded with a hash of the organization's ``sandbox.seed`` and stable facts about the message (the
account's external id, the channel, the message's position among the account's messages), never
from global random state, so the same seed and the same portfolio give the same story.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

from sqlalchemy import String, cast, exists, func, literal, select
from sqlalchemy.orm import Session, aliased

from duecourse.channels.models import SandboxMessage, WebhookReceipt
from duecourse.channels.webhooks import receive_once
from duecourse.engine import outcomes
from duecourse.engine.models import Outcome, QueueItem, QueueStatus, Sentiment
from duecourse.engine.timing import local_date
from duecourse.errors import DomainError
from duecourse.ledger import service as ledger
from duecourse.ledger.models import Account, Invoice, Promise, PromiseSource, PromiseStatus
from duecourse.ledger.schemas import PaymentIn
from duecourse.tenancy.models import Organization
from duecourse.tenancy.service import get_settings
from duecourse.validation import currency_places

SOURCE = "sandbox-sim"
LOOKBACK = timedelta(days=30)  # older outbox messages are left alone
BATCH = 1000

# (outcome, weight); weights are per 1000. "none" = the provider never reports anything.
EMAIL_OUTCOMES = [("delivered", 950), ("bounced", 30), ("none", 20)]
TEXT_OUTCOMES = [("delivered", 930), ("failed", 40), ("none", 30)]
VOICE_OUTCOMES = [
    (Outcome.no_answer, 400),
    (Outcome.promise_to_pay, 150),
    (Outcome.refused, 150),
    (Outcome.callback_requested, 100),
    (Outcome.wrong_party, 50),
    (Outcome.dropped, 50),
    ("failed", 30),  # the call never connects: a delivery failure
    (Outcome.dispute, 20),
    (Outcome.paid_claimed, 20),
]
# When the outcome arrives, after the message's created_at: (min, max) minutes.
DELAY_MINUTES = {"email": (2, 30), "sms": (1, 10), "whatsapp": (1, 10), "voice": (3, 20)}
MIN_DELAY = timedelta(minutes=1)
PAYER_RATE = 0.05  # contacted accounts that pay in full
PAYMENT_DELAY_HOURS = (48, 120)
PROMISE_KEPT_RATE = 0.60

_SUMMARIES = {
    Outcome.no_answer: "No answer.",
    Outcome.dropped: "The call dropped after a few seconds.",
    Outcome.promise_to_pay: "The debtor acknowledged the debt and promised to pay {amount} {currency} by {date}.",
    Outcome.refused: "The debtor refused to pay.",
    Outcome.callback_requested: "The debtor asked to be called back at {callback}.",
    Outcome.wrong_party: "The person who answered is not the debtor.",
    Outcome.dispute: "The debtor disputes invoice {invoice}.",
    Outcome.paid_claimed: "The debtor says the invoice is already paid.",
}


def rng_for(seed: int, *parts: Any) -> random.Random:
    """A generator of its own for one event: a hash of the seed and stable facts, never global state."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(rng: random.Random, table: list[tuple[Any, int]]) -> Any:
    roll = rng.randrange(sum(w for _, w in table))
    for value, weight in table:
        if roll < weight:
            return value
        roll -= weight
    return table[-1][0]


def _not_received(event_id: Any, organization_id: Any) -> Any:
    return ~exists().where(
        WebhookReceipt.organization_id == organization_id,
        WebhookReceipt.source == SOURCE,
        WebhookReceipt.event_id == event_id,
    )


def simulate_outcomes(session: Session, *, organization_id: int, now: datetime) -> dict[str, int]:
    """Apply the simulated outcomes that have come due by ``now``; returns counts by kind."""
    settings = get_settings(session, organization_id).sandbox
    if not settings.simulate_outcomes:
        return {}
    org = session.get(Organization, organization_id)
    assert org is not None
    counts: Counter[str] = Counter()
    _message_outcomes(session, org=org, seed=settings.seed, now=now, counts=counts)
    _promises_kept(session, org=org, seed=settings.seed, now=now, counts=counts)
    _payers(session, org=org, seed=settings.seed, now=now, counts=counts)
    return {f"simulated_{k}": v for k, v in sorted(counts.items())}


# --- one outcome per outbox message ---------------------------------------------------------------


def _message_outcomes(session: Session, *, org: Organization, seed: int, now: datetime, counts: Counter[str]) -> None:
    earlier = aliased(SandboxMessage)
    ordinal = (
        select(func.count()).select_from(earlier)
        .where(earlier.account_id == SandboxMessage.account_id, earlier.id <= SandboxMessage.id)
        .scalar_subquery()
    )
    rows = session.execute(
        select(SandboxMessage, Account.external_id, ordinal)
        .join(Account, Account.id == SandboxMessage.account_id)
        .where(
            SandboxMessage.organization_id == org.id,
            SandboxMessage.created_at <= now - MIN_DELAY,
            SandboxMessage.created_at > now - LOOKBACK,
            _not_received(cast(SandboxMessage.id, String), SandboxMessage.organization_id),
        )
        .order_by(SandboxMessage.created_at, SandboxMessage.id)
        .limit(BATCH)
    ).all()
    for message, external_id, n in rows:
        rng = rng_for(seed, "message", external_id, message.channel, n)
        low, high = DELAY_MINUTES.get(message.channel, (1, 10))
        if message.created_at + timedelta(seconds=rng.randint(low * 60, high * 60)) > now:
            continue  # not yet: it arrives at a later cycle
        if not receive_once(session, organization_id=org.id, source=SOURCE, event_id=str(message.id), now=now):
            continue
        try:
            with session.begin_nested():
                kind = _apply(session, org=org, message=message, rng=rng, now=now)
        except DomainError:
            kind = "skipped"  # e.g. a manual send: no queue item to report on
        counts[kind] += 1


def _apply(session: Session, *, org: Organization, message: SandboxMessage, rng: random.Random, now: datetime) -> str:
    item = session.scalar(
        select(QueueItem).where(QueueItem.organization_id == org.id, QueueItem.provider_ref == message.provider_ref)
    )
    if item is None or item.status != QueueStatus.completed:
        return "skipped"
    if message.channel == "voice":
        return _call(session, org=org, item=item, rng=rng, now=now)
    table = EMAIL_OUTCOMES if message.channel == "email" else TEXT_OUTCOMES
    status = _pick(rng, table)
    if status == "none":
        return "no_report"
    error = {"bounced": "550 5.1.1 mailbox unavailable (simulated)", "failed": "30003 unreachable handset (simulated)"}
    outcomes.record_delivery(session, organization_id=org.id, now=now, status=status, queue_item_id=item.id,
                             error=error.get(status))
    return status


def _money(value: Decimal, currency: str) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-currency_places(currency)), rounding=ROUND_DOWN)


def _call(session: Session, *, org: Organization, item: QueueItem, rng: random.Random, now: datetime) -> str:
    account = session.get(Account, item.account_id)
    assert account is not None
    picked = _pick(rng, VOICE_OUTCOMES)
    if picked == "failed":
        report = outcomes.CallReport(failed=True, summary="The call could not be connected (simulated).")
        outcomes.record_call_outcome(session, organization_id=org.id, now=now, report=report, queue_item_id=item.id)
        return "call_failed"
    outcome = Outcome(picked)
    balance = account.balance or Decimal(0)
    if outcome == Outcome.promise_to_pay and balance <= 0:
        outcome = Outcome.paid_claimed
    report = outcomes.CallReport(outcome=outcome)
    invoice = session.get(Invoice, account.carrying_invoice_id) if account.carrying_invoice_id else None
    details: dict[str, Any] = {"currency": account.currency, "invoice": invoice.number if invoice else "?"}
    if outcome == Outcome.promise_to_pay:
        share = Decimal(1) if rng.random() < 0.6 else Decimal(rng.choice(["0.25", "0.5", "0.75"]))
        amount = _money(balance * share, account.currency)
        if amount <= 0:
            amount = balance
        report.promise_amount = amount
        report.promise_date = local_date(now, account.timezone or org.timezone) + timedelta(days=rng.randint(1, 14))
        report.sentiment = rng.choice([Sentiment.positive, Sentiment.neutral])
        report.willingness = rng.choice([4, 4, 5])
        details.update(amount=amount, date=report.promise_date.isoformat())
    elif outcome == Outcome.callback_requested:
        report.callback_at = (now + timedelta(hours=rng.randint(2, 48))).replace(minute=0, second=0, microsecond=0)
        report.sentiment = Sentiment.neutral
        report.willingness = 3
        details.update(callback=report.callback_at.isoformat())
    elif outcome == Outcome.refused:
        report.sentiment = rng.choice([Sentiment.negative, Sentiment.negative, Sentiment.hostile])
        report.willingness = rng.choice([1, 2])
    elif outcome == Outcome.dispute:
        report.sentiment = Sentiment.negative
        report.willingness = 2
    elif outcome == Outcome.wrong_party:
        report.sentiment = Sentiment.neutral
    elif outcome == Outcome.paid_claimed:
        report.sentiment = Sentiment.neutral
        report.willingness = 3
    if outcome not in outcomes.NO_CONVERSATION:
        report.summary = _SUMMARIES[outcome].format(**details) + " (simulated)"
        report.transcript = f"Agent: Good morning, may I speak with {account.name}?\nDebtor: ...\n[simulated call: {outcome}]"
    outcomes.record_call_outcome(session, organization_id=org.id, now=now, report=report, queue_item_id=item.id)
    return str(outcome)


# --- payments ---------------------------------------------------------------------------------------


def _pay(session: Session, *, org: Organization, account: Account, amount: Decimal, reference: str, now: datetime) -> bool:
    amount = _money(min(amount, account.balance or Decimal(0)), account.currency)
    if amount <= 0:
        return False
    data = PaymentIn(account_id=account.id, amount=amount, reference=reference)
    try:
        with session.begin_nested():
            ledger.create_payment(session, organization_id=org.id, data=data, now=now, source="webhook")
    except DomainError:
        return False
    return True


def _promises_kept(session: Session, *, org: Organization, seed: int, now: datetime, counts: Counter[str]) -> None:
    """About 60% of the promises made on (simulated) calls are paid, on or shortly before the date."""
    rows = session.execute(
        select(Promise, Account)
        .join(Account, Account.id == Promise.account_id)
        .where(
            Promise.organization_id == org.id,
            Promise.status == PromiseStatus.pending,
            Promise.source == PromiseSource.voice_call,
            Promise.created_at > now - LOOKBACK,
            Promise.promised_date <= local_date(now, org.timezone) + timedelta(days=3),
            _not_received(literal("promise:") + cast(Promise.id, String), Promise.organization_id),
        )
        .order_by(Promise.id)
    ).all()
    for promise, account in rows:
        rng = rng_for(seed, "promise", account.external_id, promise.promised_date.isoformat(),
                      format(promise.amount.normalize(), "f"))  # "60", however the database scales it
        keep = rng.random() < PROMISE_KEPT_RATE
        pay_day = promise.promised_date - timedelta(days=rng.randint(0, 2))
        pay_at = datetime.combine(pay_day, time(9, 0), tzinfo=UTC) + timedelta(minutes=rng.randint(0, 9 * 60))
        pay_at = max(pay_at, promise.created_at + timedelta(hours=2))
        if pay_at > now:
            continue
        if not receive_once(session, organization_id=org.id, source=SOURCE, event_id=f"promise:{promise.id}", now=now):
            continue
        if keep and _pay(session, org=org, account=account, amount=promise.amount,
                         reference=f"Promise {promise.id} kept (simulated)", now=now):
            counts["promise_payments"] += 1
        else:
            counts["promises_not_paid"] += 1


def _payers(session: Session, *, org: Organization, seed: int, now: datetime, counts: Counter[str]) -> None:
    """About 5% of the contacted accounts pay their balance in full, 2 to 5 days after the first message."""
    first = (
        select(SandboxMessage.account_id, func.min(SandboxMessage.created_at, type_=SandboxMessage.created_at.type).label("first_at"))
        .where(
            SandboxMessage.organization_id == org.id,
            SandboxMessage.created_at > now - LOOKBACK,
            SandboxMessage.created_at <= now - timedelta(hours=PAYMENT_DELAY_HOURS[0]),
        )
        .group_by(SandboxMessage.account_id)
        .subquery()
    )
    rows = session.execute(
        select(Account, first.c.first_at)
        .join(first, first.c.account_id == Account.id)
        .where(_not_received(literal("payment:") + cast(Account.id, String), Account.organization_id))
        .order_by(Account.id)
    ).all()
    for account, first_at in rows:
        rng = rng_for(seed, "payer", account.external_id)
        if rng.random() >= PAYER_RATE:
            continue
        first_at = first_at if first_at.tzinfo else first_at.replace(tzinfo=UTC)
        if first_at + timedelta(hours=rng.randint(*PAYMENT_DELAY_HOURS)) > now:
            continue
        if not receive_once(session, organization_id=org.id, source=SOURCE, event_id=f"payment:{account.id}", now=now):
            continue
        if _pay(session, org=org, account=account, amount=account.balance or Decimal(0),
                reference="Paid in full (simulated)", now=now):
            counts["payments"] += 1
