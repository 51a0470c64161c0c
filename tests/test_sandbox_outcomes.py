"""Simulated sandbox outcomes (demo mode): with ``sandbox.simulate_outcomes`` on, what the sandbox
"sent" comes back as deliveries, bounces, call outcomes, promises and payments, through the engine's
own outcome services, each exactly once, the same for the same seed; with it off, nothing happens."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date

from sqlalchemy import func, select

from duecourse.channels.models import SandboxMessage, WebhookReceipt
from duecourse.channels.simulated import rng_for, simulate_outcomes
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, Interaction
from duecourse.ledger.models import Account, Payment, Promise
from duecourse.messaging.models import Template
from tests.engine_helpers import debtor, refresh, strategy

N_ACCOUNTS = 20
STAGES = [("email", "t", 0), ("voice", "p", 1), ("sms", "p", 1), ("voice", "p", 1), ("email", "p", 2)]


def _portfolio(db, org_id, now):
    with db.transaction() as s:
        tpl = {}
        for ch in ("email", "sms", "voice"):
            t = Template(organization_id=org_id, name=f"{ch} t", channel=ch, tone="standard",
                         subject="Invoice {{ carrying_invoice_number }}" if ch == "email" else None,
                         body_text="Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}.",
                         created_at=now, updated_at=now)
            s.add(t)
            s.flush()
            tpl[ch] = t.id
        st = strategy(s, org_id, now, STAGES, automation_days="mon,tue,wed,thu,fri,sat,sun")
        for stage in st.stages:
            stage.template_id = tpl[str(stage.action_type)]
            if str(stage.action_type) == "voice":
                stage.max_retries, stage.retry_delay_hours = 1, 5
        for i in range(N_ACCOUNTS):
            debtor(s, org_id, now, f"D{i:03d}", due=date(2026, 3, 1), total=f"{100 + 37 * i}.00",
                   phone=f"+346001{i:05d}")
        refresh(s, org_id, now)


def _configure(org, *, on=True, seed=7):
    r = org.patch("/api/v1/settings", json={
        "sandbox": {"simulate_outcomes": on, "seed": seed},
        "dispatch": {"frequency_limits": {"overall": {"per_day": 2}}},
    })
    assert r.status_code == 200, r.text
    assert r.json()["sandbox"] == {"simulate_outcomes": on, "seed": seed}


def _run(db, clock, *, days=7, step_hours=4):
    totals: Counter[str] = Counter()
    for _ in range(days * 24 // step_hours):
        result = tick(db, now=clock.now())
        totals.update({k: v for k, v in result.items() if k.startswith("simulated_")})
        clock.advance(hours=step_hours)
    return totals


def _story(db, org_id):
    """What happened to each debtor, by external id (no database ids): comparable across organizations."""
    with db.transaction() as s:
        ext = dict(s.execute(select(Account.id, Account.external_id).where(Account.organization_id == org_id)).all())
        story: dict[str, list] = defaultdict(list)
        for e in s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.organization_id == org_id)
                           .order_by(ExecutionLogEntry.at, ExecutionLogEntry.id)):
            story[ext[e.account_id]].append((e.at.isoformat(), e.event, e.stage_index, e.reason))
        for i in s.scalars(select(Interaction).where(Interaction.organization_id == org_id).order_by(Interaction.id)):
            story[ext[i.account_id]].append(("interaction", str(i.channel), str(i.status), str(i.outcome), str(i.sentiment),
                                             i.willingness, i.promise_date, i.callback_at))
        for p in s.scalars(select(Promise).where(Promise.organization_id == org_id).order_by(Promise.id)):
            story[ext[p.account_id]].append(("promise", p.amount, p.promised_date, str(p.status)))
        for p in s.scalars(select(Payment).where(Payment.organization_id == org_id).order_by(Payment.id)):
            story[ext[p.account_id]].append(("payment", p.amount, p.paid_on, str(p.source)))
        return dict(story)


def test_simulated_outcomes_drive_the_engine_once_each_and_repeat_for_the_same_seed(db, make_org, clock):
    a, b, c, off = make_org("Sim A"), make_org("Sim B"), make_org("Sim C"), make_org("Sim off")
    now = clock.now()
    for org, on, seed in ((a, True, 7), (b, True, 7), (c, True, 8), (off, False, 7)):
        _configure(org, on=on, seed=seed)
        _portfolio(db, org.id, now)
    totals = _run(db, clock)

    assert totals["simulated_delivered"] > 0 and totals["simulated_no_answer"] > 0
    with db.transaction() as s:
        # Through the engine: delivery failures are logged as such, for every bounced or failed message.
        failed = s.scalars(select(Interaction).where(Interaction.organization_id == a.id,
                                                     Interaction.status.in_(["bounced", "failed"]))).all()
        assert failed, "the seed gives some bounces or failures"
        for i in failed:
            assert s.scalar(select(ExecutionLogEntry.id).where(ExecutionLogEntry.queue_item_id == i.queue_item_id,
                                                               ExecutionLogEntry.event == "delivery_failed")) is not None
        assert s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(
            ExecutionLogEntry.organization_id == a.id, ExecutionLogEntry.event == "delivered")) > 0
        # Promises from calls, and payments (in full, and promises kept).
        promises = s.scalars(select(Promise).where(Promise.organization_id == a.id)).all()
        assert promises and all(str(p.source) == "voice_call" and p.amount > 0 for p in promises)
        assert all(0 < (p.promised_date - p.created_at.date()).days <= 15 for p in promises)
        payments = s.scalars(select(Payment).where(Payment.organization_id == a.id)).all()
        assert payments and all(str(p.source) == "webhook" for p in payments)
        assert s.scalar(select(func.count()).select_from(Interaction).where(
            Interaction.organization_id == a.id, Interaction.outcome == "callback_requested")) > 0
        # Each outbox message is simulated at most once: one receipt each, at most one outcome per item.
        receipts = s.scalars(select(WebhookReceipt.event_id).where(WebhookReceipt.organization_id == a.id,
                                                                   WebhookReceipt.source == "sandbox-sim")).all()
        message_ids = set(s.scalars(select(SandboxMessage.id).where(SandboxMessage.organization_id == a.id)).all())
        simulated = [int(r) for r in receipts if r.isdigit()]
        assert len(simulated) == len(set(simulated)) and set(simulated) <= message_ids
        assert len(simulated) >= len(message_ids) - 5  # all but the very latest have come back
        per_item = Counter(s.scalars(select(ExecutionLogEntry.queue_item_id).where(
            ExecutionLogEntry.organization_id == a.id,
            ExecutionLogEntry.event.in_(["delivered", "delivery_failed", "outcome"]))).all())
        assert per_item and max(per_item.values()) == 1

    # The same seed tells the same story; another seed another one.
    story_a, story_b, story_c = _story(db, a.id), _story(db, b.id), _story(db, c.id)
    assert story_a == story_b
    assert story_a != story_c

    # Setting off: nothing simulated at all.
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(WebhookReceipt).where(WebhookReceipt.organization_id == off.id)) == 0
        assert s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(
            ExecutionLogEntry.organization_id == off.id,
            ExecutionLogEntry.event.in_(["delivered", "delivery_failed", "outcome", "promise"]))) == 0
        assert s.scalar(select(func.count()).select_from(Payment).where(Payment.organization_id == off.id)) == 0
        assert s.scalar(select(func.count()).select_from(SandboxMessage).where(SandboxMessage.organization_id == off.id)) > 0


def test_outcomes_wait_for_their_delay_and_are_never_applied_twice(db, org, clock):
    _configure(org)
    _portfolio(db, org.id, clock.now())
    tick(db, now=clock.now())  # stage 0: one email per debtor
    with db.transaction() as s:
        sent = s.scalar(select(func.count()).select_from(SandboxMessage).where(SandboxMessage.organization_id == org.id))
        assert sent == N_ACCOUNTS
        # Nothing has come back at the moment of sending.
        assert simulate_outcomes(s, organization_id=org.id, now=clock.now()) == {}
    clock.advance(hours=1)
    with db.transaction() as s:
        first = simulate_outcomes(s, organization_id=org.id, now=clock.now())
    assert sum(first.values()) == N_ACCOUNTS and first["simulated_delivered"] >= N_ACCOUNTS * 0.8
    with db.transaction() as s:
        assert simulate_outcomes(s, organization_id=org.id, now=clock.now()) == {}  # a second pass: nothing again
        log_entries = s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(
            ExecutionLogEntry.organization_id == org.id, ExecutionLogEntry.event.in_(["delivered", "delivery_failed"])))
        assert log_entries == first.get("simulated_delivered", 0) + first.get("simulated_bounced", 0)


def test_the_setting_is_off_by_default_and_validated(db, org, clock):
    s = org.get("/api/v1/settings").json()
    assert s["sandbox"] == {"simulate_outcomes": False, "seed": 7}
    r = org.patch("/api/v1/settings", json={"sandbox": {"seed": -1}})
    assert r.status_code == 422
    r = org.patch("/api/v1/settings", json={"sandbox": {"simulate": True}})
    assert r.status_code == 422
    _portfolio(db, org.id, clock.now())
    tick(db, now=clock.now())
    clock.advance(hours=2)
    result = tick(db, now=clock.now())
    assert not any(k.startswith("simulated_") for k in result)


def test_draws_depend_on_the_seed_and_the_facts_only():
    assert rng_for(7, "message", "D001", "email", 1).random() == rng_for(7, "message", "D001", "email", 1).random()
    assert rng_for(7, "message", "D001", "email", 1).random() != rng_for(8, "message", "D001", "email", 1).random()
    assert rng_for(7, "promise", "D001", "2026-03-10", "10").random() == \
        rng_for(7, "promise", "D001", "2026-03-10", "10").random()


def test_a_message_without_a_dispatched_item_is_marked_and_left_alone(db, org, clock):
    _configure(org)
    now = clock.now()
    with db.transaction() as s:
        acct = debtor(s, org.id, now, "MANUAL", due=date(2026, 3, 1))
        s.add(SandboxMessage(organization_id=org.id, account_id=acct.id, idempotency_key="manual-1",
                             provider_ref="sandbox-manual-1", channel="email", to="manual@example.com",
                             body_text="Hello", created_at=now))
    clock.advance(hours=1)
    with db.transaction() as s:
        assert simulate_outcomes(s, organization_id=org.id, now=clock.now()) == {"simulated_skipped": 1}
    with db.transaction() as s:
        assert simulate_outcomes(s, organization_id=org.id, now=clock.now()) == {}
        assert s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(ExecutionLogEntry.organization_id == org.id)) == 0
