"""Property-based checks of the engine's invariants (SPEC §4.5, §4.7) over random strategies, debtors
and event sequences: never two live items for one account and stage; every item that left the
queue ends dispatched, or skipped / cancelled / failed with a reason that the execution log shows."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem
from duecourse.engine.outcomes import CallReport, record_call_outcome, record_delivery
from duecourse.ledger.models import Account, Payment
from duecourse.tenancy import service as tenancy
from tests.engine_helpers import debtor, refresh, strategy

ACTIONS = ["email", "sms", "voice", "phone_call", "place_on_stop"]

stage_lists = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.sampled_from(["t", "p"]), st.integers(0, 4)), min_size=1, max_size=4
).map(lambda stages: [("email", "t", stages[0][2])] + stages[1:])
debtors = st.lists(
    st.fixed_dictionaries({
        "opt_out_email": st.booleans(),
        "phone": st.sampled_from([None, "+34600111222"]),
        "timezone": st.sampled_from([None, "America/New_York", "Asia/Tokyo"]),
        "due_days_ago": st.integers(-3, 20),
    }),
    min_size=1, max_size=3,
)
events = st.lists(st.sampled_from(["day", "hours", "bounce", "no_answer", "promise", "pay"]), min_size=3, max_size=10)


def _check(s, org_id: int) -> None:
    live = s.execute(
        select(QueueItem.account_id, QueueItem.stage_index, func.count())
        .where(QueueItem.organization_id == org_id, QueueItem.status.in_(["pending", "processing"]))
        .group_by(QueueItem.account_id, QueueItem.stage_index)
    ).all()
    assert all(c == 1 for *_, c in live), live
    # A resolved account (nothing owed) is never waiting to be contacted.
    resolved_live = s.scalar(
        select(func.count()).select_from(QueueItem).join(Account, Account.id == QueueItem.account_id)
        .where(QueueItem.organization_id == org_id, Account.status == "resolved", QueueItem.status == "pending")
    )
    assert resolved_live == 0
    finished = s.scalars(select(QueueItem).where(QueueItem.organization_id == org_id,
                                                 QueueItem.status.not_in(["pending", "processing"]))).all()
    logged = {
        (e.queue_item_id, e.event)
        for e in s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.organization_id == org_id))
    }
    for item in finished:
        if item.status == "completed":
            assert (item.id, "dispatched") in logged
            continue
        assert item.reason, f"item {item.id} is {item.status} without a reason"
        event = {"skipped": "skipped", "cancelled": "cancelled", "failed": "failed"}[str(item.status)]
        assert (item.id, event) in logged, f"item {item.id} {item.status} ({item.reason}) is not in the log"


# No shrinking phase: each example is a small simulation, and a failure prints its whole input anyway.
@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stages=stage_lists, people=debtors, steps=events, handling=st.sampled_from(["run_all_in_order", "skip_to_latest", "one_per_run"]))
def test_engine_invariants_hold(db, clock, stages, people, steps, handling):
    start = clock.now()
    now = start
    with db.transaction() as s:
        org = tenancy.create_organization(s, name=f"P{now.timestamp()}-{id(stages)}", timezone="Europe/Madrid", base_currency="EUR", now=now)
        org_id = org.id
        strategy(s, org_id, now, stages, multi_stage_handling=handling, trigger_days=0,
                 automation_days="mon,tue,wed,thu,fri,sat,sun")
        for i, p in enumerate(people):
            debtor(s, org_id, now, f"P{org_id}-{i}", due=now.date() - timedelta(days=p["due_days_ago"]),
                   opt_out_email=p["opt_out_email"], phone=p["phone"], timezone=p["timezone"])
        refresh(s, org_id, now)
    for n, step in enumerate(steps):
        if step == "day":
            now += timedelta(days=1)
        elif step == "hours":
            now += timedelta(hours=5)
        with db.transaction() as s:
            done = s.scalars(select(QueueItem).where(QueueItem.organization_id == org_id, QueueItem.status == "completed")
                             .order_by(QueueItem.id.desc())).all()
            email = next((i for i in done if i.action == "email"), None)
            call = next((i for i in done if i.action == "voice"), None)
            if step == "bounce" and email is not None:
                record_delivery(s, organization_id=org_id, now=now, status="bounced", queue_item_id=email.id)
            elif step in ("no_answer", "promise") and call is not None:
                answered = s.scalar(select(Interaction.outcome).where(Interaction.queue_item_id == call.id))
                if answered is None:
                    report = (CallReport(outcome="no_answer") if step == "no_answer" else
                              CallReport(outcome="promise_to_pay", promise_amount=Decimal("10"), promise_date=now.date() + timedelta(days=2)))
                    record_call_outcome(s, organization_id=org_id, now=now, report=report, queue_item_id=call.id)
            elif step == "pay":
                acct = s.scalars(select(Account).where(Account.organization_id == org_id, Account.balance > 0)).first()
                if acct is not None:
                    s.add(Payment(organization_id=org_id, account_id=acct.id, external_id=f"pay-{n}-{acct.id}",
                                  amount=acct.balance, unallocated=acct.balance, currency=acct.currency, paid_on=now.date(),
                                  source="api", created_at=now))
                    s.flush()
                    from duecourse.ledger.allocation import allocate_payments
                    allocate_payments(s, organization_id=org_id, account_ids=[acct.id], now=now)
        tick(db, now=now)
        with db.transaction() as s:
            _check(s, org_id)
