"""Engine scenarios through ``tick`` (SPEC §4.5–§4.7, §4.10): the clock moves, the queue, the outbox,
the account and the execution log are asserted."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.cycle import run_scheduled, tick
from duecourse.engine.dispatch import _Batch, claim, process_item, recover_expired_leases, run_due
from duecourse.engine.enqueue import enqueue
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem, Task
from duecourse.ledger.models import Account
from duecourse.messaging.models import Template
from duecourse.strategies.models import Strategy
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import Organization
from duecourse.tenancy.principal import Principal
from tests.engine_helpers import debtor, items, log, refresh, strategy


def utc(*a):
    return datetime(*a, tzinfo=UTC)


def _templates(s, org_id, now):
    t = {}
    for ch in ("email", "sms"):
        tpl = Template(organization_id=org_id, name=f"{ch} t", channel=ch, tone="standard",
                       subject="Invoice {{ carrying_invoice_number }}" if ch == "email" else None,
                       body_text="Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}.",
                       created_at=now, updated_at=now)
        s.add(tpl)
        s.flush()
        t[ch] = tpl.id
    return t


def _setup(db, org, now, stages, **kw):
    with db.transaction() as s:
        t = _templates(s, org.id, now)
        st = strategy(s, org.id, now, stages, trigger_type="days_overdue", trigger_days=0, **kw)
        for stage in st.stages:
            if stage.action_type in ("email", "sms"):
                stage.template_id = t[stage.action_type]
        return st.id


def outbox(db, account_id=None):
    with db.transaction() as s:
        q = select(SandboxMessage).order_by(SandboxMessage.id)
        if account_id:
            q = q.where(SandboxMessage.account_id == account_id)
        return [(m.channel, m.to, m.subject, m.created_at) for m in s.scalars(q)]


def test_a_living_sequence_day_by_day(db, org, clock):
    now = clock.now()  # Monday 2026-03-02 09:00 UTC, 10:00 Madrid
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 3)])
    with db.transaction() as s:
        a = debtor(s, org.id, now, "LIVE", due=date(2026, 3, 1))
        a_id = a.id
        refresh(s, org.id, now)
    # Monday: the 07:00 run has passed -> assign, enqueue stage 0 (due yesterday, slot Monday 07:00), send.
    r = tick(db, now=clock.now())
    assert (r["strategy_runs"], r["assigned"], r["enqueued"]) == (1, 1, 1) and r["dispatch"] == {"dispatched": 1}
    assert outbox(db) == [("email", "live@example.com", "Invoice LIVE-1", clock.now())]
    with db.transaction() as s:
        acct = s.get(Account, a_id)
        assert (acct.status, acct.case_next_stage, acct.collection_tab) == ("in_auto_management", 1, "engaged")
        assert [e[0] for e in log(s, a_id)] == ["assigned", "enqueued", "dispatched", "advanced"]
    # Tuesday: the run enqueues the SMS for Thursday (3 days after Monday), nothing is sent.
    clock.advance(days=1)
    r = tick(db, now=clock.now())
    assert r["enqueued"] == 1 and r["dispatch"] == {}
    with db.transaction() as s:
        assert items(s, a_id)[-1] == (1, "pending", utc(2026, 3, 5, 7), None)  # Thu 08:00 Madrid: SMS hours
    clock.advance(days=1)
    assert tick(db, now=clock.now())["dispatch"] == {}
    clock.advance(days=1)  # Thursday 09:00 UTC
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    assert [m[0] for m in outbox(db)] == ["email", "sms"]
    with db.transaction() as s:
        acct = s.get(Account, a_id)
        assert (acct.status, acct.collection_tab, acct.case_sequence_finished) == ("sequence_completed", "follow_up", True)
        assert log(s, a_id)[-1] == ("sequence_completed", 1, None)
    # Friday: nothing more happens.
    clock.advance(days=1)
    r = tick(db, now=clock.now())
    assert r["enqueued"] == 0 and r["dispatch"] == {}


def test_opt_out_skips_and_advances(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 0)])
    with db.transaction() as s:
        a = debtor(s, org.id, now, "OPT", due=date(2026, 3, 1), opt_out_email=True, phone=None)
        a_id = a.id
        refresh(s, org.id, now)
    tick(db, now=now)
    assert outbox(db) == []
    with db.transaction() as s:
        got = items(s, a_id)
        assert [(i[0], i[1], i[3]) for i in got] == [(0, "skipped", "opt_out"), (1, "skipped", "no_contact_info")]
        events = [(e[0], e[1], e[2]) for e in log(s, a_id) if e[0] in ("skipped", "advanced", "sequence_completed")]
        assert events == [("skipped", 0, "opt_out"), ("advanced", 1, None), ("skipped", 1, "no_contact_info"),
                          ("sequence_completed", 1, None)]


def test_frequency_limit_defers_instead_of_dropping(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 0)])
    with db.transaction() as s:
        a = debtor(s, org.id, now, "FREQ", due=date(2026, 3, 1))
        a_id = a.id
        refresh(s, org.id, now)
    tick(db, now=now)  # both stages are due today; the first is sent, the second waits for the limit
    with db.transaction() as s:
        got = items(s, a_id)
    assert [(i[0], i[1], i[3]) for i in got] == [(0, "completed", None), (1, "skipped", "frequency_limit"), (1, "pending", None)]
    assert got[2][2] == now + timedelta(days=1)  # one contact a day: 24 h after the first
    clock.advance(days=1)
    r = tick(db, now=clock.now())
    assert r["dispatch"] == {"dispatched": 1}
    assert len(outbox(db)) == 2


def test_outside_hours_in_debtor_timezone_reschedules(db, org, clock):
    clock.set(utc(2026, 3, 2, 23))  # Monday 23:00 UTC = 18:00 in New York, 00:00 Madrid
    now = clock.now()
    _setup(db, org, now, [("sms", "t", 0)], automation_time="00:00", automation_days="mon,tue,wed,thu,fri,sat,sun")
    with db.transaction() as s:
        tokyo = debtor(s, org.id, now, "TOKYO", due=date(2026, 3, 1), timezone="Asia/Tokyo")  # 08:00 Tuesday there
        tokyo_id = tokyo.id
        refresh(s, org.id, now)
    with db.transaction() as s:
        from duecourse.engine.runs import run_strategy_now
        from duecourse.strategies.models import Strategy
        st = s.scalars(select(Strategy)).one()
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        # Put the item at a time outside Tokyo's hours (02:00 there) to exercise the dispatch rule.
        s.execute(QueueItem.__table__.update().values(scheduled_at=utc(2026, 3, 2, 17)))
    clock.set(utc(2026, 3, 2, 17))
    tick(db, now=clock.now())
    with db.transaction() as s:
        got = items(s, tokyo_id)
    assert [(i[0], i[1], i[3]) for i in got] == [(0, "skipped", "outside_hours"), (0, "pending", None)]
    assert got[1][2] == utc(2026, 3, 2, 23)  # 08:00 Tuesday in Tokyo


def test_engine_pause_keeps_items_and_resume_sends(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        a = debtor(s, org.id, now, "PAUSE", due=date(2026, 3, 1))
        a_id = a.id
        refresh(s, org.id, now)
        from duecourse.strategies.models import Strategy
        st = s.scalars(select(Strategy)).one()
        enqueue(s, organization_id=org.id, now=now, strategy_id=None, cause="test")  # no trigger run: nothing assigned
        from duecourse.engine.assign import assign_by_trigger
        from duecourse.tenancy.models import Organization
        assign_by_trigger(s, strategy=st, org=s.get(Organization, org.id), rates={}, now=now)
        enqueue(s, organization_id=org.id, now=now, strategy_id=st.id, cause="test")
        st.last_run_at = now
        tenancy.update_settings(s, principal=Principal.system(org.id), patch={"automation": {"engine_paused": True}}, now=now)
    r = tick(db, now=now)
    assert r["dispatch"] == {} and outbox(db) == []
    with db.transaction() as s:
        assert [i[1] for i in items(s, a_id)] == ["pending"]
        tenancy.update_settings(s, principal=Principal.system(org.id), patch={"automation": {"engine_paused": False}}, now=now)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}


def test_blocked_after_enqueue_is_cancelled_not_sent(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)], automation_time="23:00")
    with db.transaction() as s:
        a = debtor(s, org.id, now, "BLOCK", due=date(2026, 3, 20))
        a_id = a.id
        refresh(s, org.id, now)
        from duecourse.engine.runs import run_strategy_now
        from duecourse.strategies.models import Strategy
        st = s.scalars(select(Strategy)).one()
        st.trigger_type, st.trigger_amount = "amount_threshold", 1
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        acct = s.get(Account, a_id)
        acct.blocked, acct.blocked_reason = True, "legal"
    clock.set(utc(2026, 3, 2, 23))
    r = tick(db, now=clock.now())
    assert r["dispatch"] == {"cancelled": 1} and outbox(db) == []
    with db.transaction() as s:
        assert [(i[1], i[3]) for i in items(s, a_id)] == [("cancelled", "account_blocked")]
        assert ("cancelled", 0, "account_blocked") in log(s, a_id)


def test_a_worker_that_dies_mid_batch_leaves_its_items_to_the_next_run_and_nothing_sent(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        a = debtor(s, org.id, now, "LEASE", due=date(2026, 3, 1))
        a_id = a.id
        refresh(s, org.id, now)
        from duecourse.engine.runs import run_strategy_now
        from duecourse.strategies.models import Strategy
        run_strategy_now(s, strategy=s.scalars(select(Strategy)).one(), now=now, principal=Principal.system(org.id))
    # Worker 1 handles its batch (the sandbox send included), then dies before committing.
    try:
        with db.transaction() as s:
            batch = _Batch()
            (item_id,) = claim(s, batch, now=now, worker="w1", limit=10)
            assert process_item(s, item_id=item_id, now=now, batch=batch) == "dispatched"
            raise RuntimeError("worker killed")
    except RuntimeError:
        pass
    with db.transaction() as s:  # nothing of it remains: no lease to wait for
        assert (s.get(QueueItem, item_id).status, s.get(QueueItem, item_id).attempt) == ("pending", 0)
        assert recover_expired_leases(s, now=now + timedelta(minutes=5)) == 0
    assert outbox(db, a_id) == []
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    assert len(outbox(db, a_id)) == 1
    with db.transaction() as s:
        item = s.get(QueueItem, item_id)
        assert (item.status, item.attempt, item.provider_ref) == ("completed", 1, f"sandbox-qi-{item_id}")


def test_metrics_show_queue_depth_and_dispatch_outcomes(db, org, clock, client):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 0)])
    with db.transaction() as s:
        debtor(s, org.id, now, "MET", due=date(2026, 3, 1))
        refresh(s, org.id, now)
    before = client.get("/metrics").text
    tick(db, now=now)  # one sent, one deferred by the frequency limit
    text = client.get("/metrics").text
    assert 'duecourse_queue_items{status="completed"} 1.0' in text
    assert 'duecourse_queue_items{status="pending"} 1.0' in text
    assert 'duecourse_queue_items{status="skipped"} 1.0' in text

    def count(body, outcome):
        for line in body.splitlines():
            if line.startswith(f'duecourse_dispatch_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    assert count(text, "dispatched") == count(before, "dispatched") + 1
    assert count(text, "skipped:frequency_limit") == count(before, "skipped:frequency_limit") + 1


def test_campaign_past_its_end_date_completes_overnight_once(db, org, clock):
    from duecourse.campaigns.models import Campaign
    from duecourse.tenancy.models import AuditEntry

    now = clock.now()
    st_id = _setup(db, org, now, [("email", "t", 30)])
    with db.transaction() as s:
        c = Campaign(organization_id=org.id, name="Ends Tuesday", strategy_id=st_id, status="active",
                     start_date=date(2026, 2, 1), end_date=date(2026, 3, 3), created_at=now, updated_at=now)
        s.add(c)
        s.flush()
        cid = c.id
        a = debtor(s, org.id, now, "ENDS", due=date(2026, 3, 1), campaign_id=cid)
        a_id = a.id
        refresh(s, org.id, now)
    from duecourse.engine.enqueue import enqueue as run_enqueue
    with db.transaction() as s:
        run_enqueue(s, organization_id=org.id, now=now, campaign_id=cid, cause="test")
    assert tick(db, now=utc(2026, 3, 3, 22))["campaigns_completed"] == 0  # still Tuesday in Madrid (23:00)
    r = tick(db, now=utc(2026, 3, 3, 23, 30))  # 00:30 Wednesday in Madrid
    assert r["campaigns_completed"] == 1
    assert tick(db, now=utc(2026, 3, 4, 5))["campaigns_completed"] == 0  # once a night
    with db.transaction() as s:
        assert s.get(Campaign, cid).status == "completed"
        assert [(i[1], i[3]) for i in items(s, a_id)] == [("cancelled", "campaign_completed")]
        entry = s.scalars(select(AuditEntry).where(AuditEntry.entity_type == "campaign")).all()[-1]
        assert (entry.field, entry.old_value, entry.new_value, entry.actor) == ("status", "active", "completed", "system")


def test_a_later_stage_never_overtakes_one_waiting_for_its_outcome(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("phone_call", "t", 0), ("email", "p", 0)])
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 5}}}})
    with db.transaction() as s:
        a = debtor(s, org.id, now, "ORDER", due=date(2026, 3, 1))
        a_id = a.id
        refresh(s, org.id, now)
    tick(db, now=now)  # both due: the call task opens; the email must not go before the task is done
    with db.transaction() as s:
        assert [(i[0], i[1], i[3]) for i in items(s, a_id)] == [(0, "completed", None), (1, "cancelled", "awaiting_previous_stage")]
        task_id = s.scalars(select(Task.id)).one()
    assert outbox(db) == []
    # Later passes leave the waiting email alone instead of queueing and withdrawing it each time.
    for minutes in (5, 10):
        with db.transaction() as s:
            enqueue(s, organization_id=org.id, now=now + timedelta(minutes=minutes), cause="test")
        tick(db, now=now + timedelta(minutes=minutes))
    with db.transaction() as s:
        assert [(i[0], i[1]) for i in items(s, a_id)] == [(0, "completed"), (1, "cancelled")]
    org.post(f"/api/v1/tasks/{task_id}/outcome", role="agent", json={"outcome": "refused"})
    clock.advance(hours=1)
    with db.transaction() as s:
        enqueue(s, organization_id=org.id, now=clock.now(), cause="test")
    tick(db, now=clock.now())
    assert [m[0] for m in outbox(db, a_id)] == ["email"]


def test_a_frequency_limit_of_zero_closes_the_channel_and_the_case_moves_on(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("sms", "t", 0), ("email", "p", 0)])
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 5}, "sms": {"per_day": 0}}}})
    with db.transaction() as s:
        a_id = debtor(s, org.id, now, "ZERO", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    r = tick(db, now=now)
    # No time would ever allow the SMS: skipped with its reason (no retry item), and the case advances.
    # (The email stage, due too, waits behind it: stage order.)
    assert r["dispatch"] == {"skipped": 1, "deferred": 1}
    with db.transaction() as s:
        assert [(i[0], i[1], i[3]) for i in items(s, a_id) if i[0] == 0] == [(0, "skipped", "frequency_limit")]
        assert s.get(Account, a_id).case_next_stage == 1
        assert ("skipped", 0, "frequency_limit") in log(s, a_id) and ("advanced", 1, None) in log(s, a_id)
        entry = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == a_id,
                                                          ExecutionLogEntry.event == "skipped")).one()
        assert entry.details == {"limit": 0}
    clock.advance(minutes=5)
    with db.transaction() as s:
        enqueue(s, organization_id=org.id, now=clock.now(), cause="test")
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    assert [m[0] for m in outbox(db, a_id)] == ["email"]


def _edit_stage(db, strategy_id, index, *, action=None, template=None, remove=False):
    """What editing the strategy does to its stage rows (strategies.service._apply): kept by position."""
    with db.transaction() as s:
        st = s.get(Strategy, strategy_id)
        stage = st.stages[index]
        if remove:
            st.stages.remove(stage)
        else:
            stage.action_type, stage.template_id = action, template


def test_a_stage_edited_after_enqueue_is_never_sent_through_its_old_channel(db, org, clock):
    now = clock.now()
    sid = _setup(db, org, now, [("sms", "t", 0)])
    with db.transaction() as s:
        a_id = debtor(s, org.id, now, "EDIT", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
        email_template = s.scalars(select(Template.id).where(Template.channel == "email")).one()
    with db.transaction() as s:
        run_scheduled(s, org=s.get(Organization, org.id), now=now, worker="scheduler")  # the SMS item, not sent yet
    _edit_stage(db, sid, 0, action="email", template=email_template)
    r = tick(db, now=now)
    with db.transaction() as s:
        got = [(i[0], i[1], i[3]) for i in items(s, a_id)]
        assert got[0] == (0, "cancelled", "stage_changed")
        assert ("cancelled", 0, "stage_changed") in log(s, a_id)
    assert r["dispatch"].get("cancelled") == 1
    # The email template never went out as an SMS; the stage comes back as it is now.
    with db.transaction() as s:
        enqueue(s, organization_id=org.id, now=now, cause="test")
    tick(db, now=now)
    assert [m[0] for m in outbox(db, a_id)] == ["email"]


def test_a_stage_removed_after_enqueue_is_cancelled_not_a_failed_batch(db, org, clock):
    now = clock.now()
    sid = _setup(db, org, now, [("email", "t", 0), ("email", "p", 0)])
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 5}}}})
    with db.transaction() as s:
        a_id = debtor(s, org.id, now, "GONE", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    with db.transaction() as s:
        run_scheduled(s, org=s.get(Organization, org.id), now=now, worker="scheduler")
        assert [i[0] for i in items(s, a_id)] == [0, 1]
    _edit_stage(db, sid, 1, remove=True)
    r = tick(db, now=now)
    assert r["dispatch"] == {"dispatched": 1, "cancelled": 1}
    with db.transaction() as s:
        assert [(i[0], i[1], i[3]) for i in items(s, a_id)] == [(0, "completed", None), (1, "cancelled", "stage_changed")]
    assert len(outbox(db, a_id)) == 1


class _MovingClock:
    """A clock that moves on by seven minutes each time it is read (a worker's backlog takes time)."""

    def __init__(self, at):
        self.at = at

    def now(self):
        self.at += timedelta(minutes=7)
        return self.at


def test_a_worker_reads_the_clock_again_for_every_batch(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        ids = [debtor(s, org.id, now, f"CLK{i}", due=date(2026, 3, 1)).id for i in range(3)]
        refresh(s, org.id, now)
    with db.transaction() as s:
        run_scheduled(s, org=s.get(Organization, org.id), now=now, worker="scheduler")
    with pytest.raises(TypeError):
        run_due(db, worker="w")  # neither a time nor a clock
    moving = _MovingClock(now)
    assert run_due(db, clock=moving, worker="w", batch=1) == {"dispatched": 3}
    with db.transaction() as s:
        sent = s.execute(select(Interaction.occurred_at, QueueItem.finished_at).join(
            QueueItem, QueueItem.id == Interaction.queue_item_id).where(Interaction.account_id.in_(ids))
            .order_by(Interaction.occurred_at)).all()
    # Each batch at the time it ran (7, 14 and 21 minutes on), not the loop's first reading.
    assert [at for at, _ in sent] == [now + timedelta(minutes=7 * k) for k in (1, 2, 3)]
    assert all(at == finished for at, finished in sent)


def test_a_case_left_past_the_last_stage_by_an_edit_completes_its_sequence(db, org, clock):
    now = clock.now()
    sid = _setup(db, org, now, [("email", "t", 0), ("email", "p", 3)])
    with db.transaction() as s:
        a_id = debtor(s, org.id, now, "CUT", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    tick(db, now=now)  # stage 0 sent; the case waits for stage 1, three days on
    _edit_stage(db, sid, 1, remove=True)
    with db.transaction() as s:
        acct = s.get(Account, a_id)
        assert (acct.case_next_stage, acct.case_sequence_finished) == (1, False)  # a stage that no longer exists
        enqueue(s, organization_id=org.id, now=now, cause="test")
    with db.transaction() as s:
        acct = s.get(Account, a_id)
        assert (acct.status, acct.case_sequence_finished, acct.collection_tab) == ("sequence_completed", True, "follow_up")
        assert log(s, a_id)[-1] == ("sequence_completed", None, None)
        assert [i for i in items(s, a_id) if i[0] == 1] == []  # nothing was queued for it
