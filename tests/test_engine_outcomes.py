"""Outcome scenarios (SPEC §4.8) through the API and ``tick``: bounces, calls, callbacks, promises,
adaptive timing, agent tasks. Each asserts the queue, the outbox, the account and the execution log."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, QueueItem, Task
from duecourse.ledger.models import Account, Invoice, Payment, Promise
from duecourse.strategies.models import Stage
from tests.engine_helpers import debtor, items, log, refresh
from tests.test_engine_dispatch import _setup


def utc(*a):
    return datetime(*a, tzinfo=UTC)


def _item(db, account_id, stage, status="completed"):
    with db.transaction() as s:
        return s.scalars(select(QueueItem).where(QueueItem.account_id == account_id, QueueItem.stage_index == stage,
                                                 QueueItem.status == status).order_by(QueueItem.id.desc())).first().id


def _account(db, account_id):
    with db.transaction() as s:
        return s.get(Account, account_id)


def _new(db, org, now, ext, **kw):
    with db.transaction() as s:
        a = debtor(s, org.id, now, ext, due=date(2026, 3, 1), **kw)
        refresh(s, org.id, now)
        return a.id


def test_bounce_cancels_the_queued_next_stage_and_sends_it_at_once(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 5), ("email", "p", 5)])
    aid = _new(db, org, now, "BOUNCE")
    tick(db, now=now)
    clock.advance(days=1)
    tick(db, now=clock.now())  # the SMS is queued for 5 days after the email
    with db.transaction() as s:
        assert [(i[0], i[1]) for i in items(s, aid)] == [(0, "completed"), (1, "pending")]
    r = org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": _item(db, aid, 0), "status": "bounced"})
    assert r.status_code == 200 and r.json() == {"result": "delivery_failure"}
    with db.transaction() as s:
        got = items(s, aid)
        assert [(i[0], i[1], i[3]) for i in got] == [(0, "completed", None), (1, "cancelled", "delivery_failure"), (1, "pending", None)]
        assert got[2][2] == clock.now()  # at once (10:00 Madrid is inside SMS hours)
        events = [e[0] for e in log(s, aid)]
        assert events[-3:] == ["delivery_failed", "cancelled", "enqueued"]
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        assert [m.channel for m in s.scalars(select(SandboxMessage).order_by(SandboxMessage.id))] == ["email", "sms"]


def test_a_late_bounce_after_the_next_stage_went_out_sends_nothing_again(db, org, clock):
    """Bounce notices can arrive days late. By then the case has made its next stage (a call, which
    waits for its outcome); the bounce must not queue that call a second time."""
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("voice", "p", 1), ("email", "p", 5)])
    aid = _new(db, org, now, "LATEBOUNCE")
    tick(db, now=now)
    clock.advance(days=1)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}  # the call
    with db.transaction() as s:
        before = items(s, aid)
    assert [(i[0], i[1]) for i in before] == [(0, "completed"), (1, "completed")]
    assert _account(db, aid).case_next_stage == 1  # waiting for the call's outcome
    clock.advance(days=2)
    r = org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": _item(db, aid, 0), "status": "bounced"})
    assert r.status_code == 200 and r.json() == {"result": "stale"}
    with db.transaction() as s:
        assert items(s, aid) == before
        assert [e[0] for e in log(s, aid)][-2:] == ["contact_invalid", "delivery_failed"]
    assert _account(db, aid).case_next_stage == 1
    assert tick(db, now=clock.now())["dispatch"] == {}
    with db.transaction() as s:
        assert [m.channel for m in s.scalars(select(SandboxMessage).order_by(SandboxMessage.id))] == ["email", "voice"]


def test_a_bounce_for_an_old_address_does_not_flag_the_new_one(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 5)])
    aid = _new(db, org, now, "MOVED")
    tick(db, now=now)
    first = _item(db, aid, 0)
    # The debtor's address is corrected before the old one's bounce comes back.
    r = org.patch(f"/api/v1/accounts/{aid}", role="manager", json={"email": "moved.new@example.com"})
    assert r.status_code == 200, r.text
    r = org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": first, "status": "bounced"})
    assert r.status_code == 200 and r.json() == {"result": "delivery_failure"}
    acct = _account(db, aid)
    assert (acct.email, acct.email_invalid) == ("moved.new@example.com", False)
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert "delivery_failed" in events and "contact_invalid" not in events
    # The next stage goes out (a day later: one contact a day), to the new address.
    clock.advance(days=1)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        assert [m.to for m in s.scalars(select(SandboxMessage).order_by(SandboxMessage.id))] == [
            "moved@example.com", "moved.new@example.com"]


def test_the_same_failure_reported_twice_queues_the_next_stage_once(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 5), ("email", "p", 5)])
    aid = _new(db, org, now, "TWICE")
    tick(db, now=now)
    first = _item(db, aid, 0)
    r = org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": first, "status": "bounced"})
    assert r.json() == {"result": "delivery_failure"}
    with db.transaction() as s:
        after_first = items(s, aid)
        entries = len(log(s, aid))
    # The same bounce again, reported another way (another event id): nothing more happens.
    r = org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": first, "status": "failed"})
    assert r.status_code == 200 and r.json() == {"result": "duplicate"}
    with db.transaction() as s:
        assert items(s, aid) == after_first
        assert len(log(s, aid)) == entries
    assert [(i[0], i[1]) for i in after_first] == [(0, "completed"), (1, "pending")]


def _call_retries(db, *, max_retries):
    """The first stage (a call) retried ``max_retries`` times, four hours apart, a step timing out after 24 hours."""
    with db.transaction() as s:
        st = s.scalars(select(Stage).where(Stage.position == 0)).one()
        st.max_retries, st.retry_delay_hours, st.step_timeout_hours = max_retries, 4, 24


def test_voice_no_answer_retries_then_advances(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 2)])
    _call_retries(db, max_retries=1)
    # Allow two contacts a day, so the retry four hours later is not held by the frequency limit.
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 2}}}})
    aid = _new(db, org, now, "CALL")
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    first = _item(db, aid, 0)
    r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": first, "outcome": "no_answer"})
    assert r.json() == {"result": "retry"}
    with db.transaction() as s:
        assert items(s, aid)[-1][:2] == (0, "pending") and items(s, aid)[-1][2] == now + timedelta(hours=4)
    clock.advance(hours=4)
    tick(db, now=clock.now())
    second = _item(db, aid, 0)
    assert second != first
    # The second call gets no outcome at all: the step timeout counts as unanswered; retries are used up.
    clock.advance(hours=25)
    r = tick(db, now=clock.now())
    assert r["step_timeouts"] == 1
    acct = _account(db, aid)
    assert acct.case_next_stage == 1 and acct.case_retry_count == 0
    with db.transaction() as s:
        assert ("advanced", 1, None) in log(s, aid) and ("step_timeout", 0, None) in log(s, aid)


def test_a_late_no_answer_for_an_attempt_already_retried_changes_nothing(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 2)])
    _call_retries(db, max_retries=2)
    aid = _new(db, org, now, "LATE")
    tick(db, now=now)
    first = _item(db, aid, 0)
    clock.advance(hours=25)
    assert tick(db, now=clock.now())["step_timeouts"] == 1  # no outcome in time: the retry is queued
    with db.transaction() as s:
        before = items(s, aid)
    assert before[-1][:2] == (0, "pending") and _account(db, aid).case_retry_count == 1
    r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": first, "outcome": "no_answer"})
    assert r.status_code == 200 and r.json() == {"result": "stale"}
    with db.transaction() as s:
        assert items(s, aid) == before
    assert _account(db, aid).case_retry_count == 1


def test_callback_fulfilled_and_callback_expired(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 3)])
    kept = _new(db, org, now, "CB-KEPT")
    lapsed = _new(db, org, now, "CB-LAPSED", phone="+34600111333")
    tick(db, now=now)
    at = utc(2026, 3, 3, 15)
    for aid in (kept, lapsed):
        r = org.post("/api/v1/outcomes/call", role="manager",
                     json={"queue_item_id": _item(db, aid, 0), "outcome": "callback_requested", "callback_at": at.isoformat()})
        assert r.json() == {"result": "callback"}
        acct = _account(db, aid)
        assert (acct.status, acct.callback_at) == ("callback_pending", at)
    clock.set(at)
    assert tick(db, now=at)["dispatch"] == {"dispatched": 2}  # both return calls go out at T
    # The first debtor talks on the return call; the second never answers.
    r = org.post("/api/v1/outcomes/call", role="manager",
                 json={"queue_item_id": _item(db, kept, 0), "outcome": "refused", "sentiment": "neutral", "willingness": 3})
    assert r.json() == {"result": "completed"}
    acct = _account(db, kept)
    assert (acct.status, acct.case_next_stage, acct.callback_at) == ("in_auto_management", 1, None)
    clock.set(at + timedelta(hours=24, minutes=1))
    r = tick(db, now=clock.now())
    assert r["callbacks_expired"] == 1
    acct = _account(db, lapsed)
    assert (acct.status, acct.case_next_stage) == ("in_auto_management", 1)
    with db.transaction() as s:
        assert ("callback_expired", 0, None) in log(s, lapsed)


def test_an_unanswered_return_call_waits_for_the_callback_to_expire_and_advances_once(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 3), ("email", "p", 3)])
    aid = _new(db, org, now, "CB-NOANSWER")
    tick(db, now=now)
    at = utc(2026, 3, 3, 15)
    r = org.post("/api/v1/outcomes/call", role="manager",
                 json={"queue_item_id": _item(db, aid, 0), "outcome": "callback_requested", "callback_at": at.isoformat()})
    assert r.json() == {"result": "callback"}
    clock.set(at)
    assert tick(db, now=at)["dispatch"] == {"dispatched": 1}  # the return call
    r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": _item(db, aid, 0), "outcome": "no_answer"})
    assert r.json() == {"result": "callback_unanswered"}
    acct = _account(db, aid)
    assert (acct.status, acct.case_next_stage, acct.callback_at) == ("callback_pending", 0, at)
    clock.set(at + timedelta(hours=24, minutes=1))
    assert tick(db, now=clock.now())["callbacks_expired"] == 1
    acct = _account(db, aid)
    assert (acct.status, acct.case_next_stage) == ("in_auto_management", 1)  # one stage on, not two
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert events.count("advanced") == 1 and "callback_unanswered" in events and "callback_expired" in events


def test_a_callback_asked_for_outside_calling_hours_does_not_expire_before_the_call(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 3)])
    aid = _new(db, org, now, "CB-SUNDAY")
    tick(db, now=now)
    at = utc(2026, 3, 7, 21, 30)  # Saturday 22:30 in Madrid: calls resume on Monday at 08:00 (07:00 UTC)
    r = org.post("/api/v1/outcomes/call", role="manager",
                 json={"queue_item_id": _item(db, aid, 0), "outcome": "callback_requested", "callback_at": at.isoformat()})
    assert r.json() == {"result": "callback"}
    with db.transaction() as s:
        assert items(s, aid)[-1][1:3] == ("pending", utc(2026, 3, 9, 7))
    clock.set(at + timedelta(hours=25))  # past 24 hours after T, before the call could be made
    assert tick(db, now=clock.now())["callbacks_expired"] == 0
    assert _account(db, aid).status == "callback_pending"
    clock.set(utc(2026, 3, 9, 7))
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}  # the return call
    clock.set(utc(2026, 3, 10, 7, 1))  # 24 hours after the call, no conversation
    assert tick(db, now=clock.now())["callbacks_expired"] == 1
    acct = _account(db, aid)
    assert (acct.status, acct.case_next_stage) == ("in_auto_management", 1)


def test_adaptive_timing_after_a_hostile_call_is_logged(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 4)])
    aid = _new(db, org, now, "ADAPT")
    tick(db, now=now)
    org.post("/api/v1/outcomes/call", role="manager",
             json={"queue_item_id": _item(db, aid, 0), "outcome": "refused", "sentiment": "hostile", "willingness": 1})
    acct = _account(db, aid)
    assert (acct.case_next_delay_days, acct.case_tone_override) == (8, "empathetic")
    with db.transaction() as s:
        entry = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.event == "adaptive_timing")).one()
        assert (entry.reason, entry.details["original_delay_days"], entry.details["new_delay_days"]) == ("negative", 4, 8)
        assert entry.details["sentiment"] == "hostile" and entry.details["willingness"] == 1
    # The next stage is enqueued 8 days after the call, with the empathetic tone.
    clock.advance(days=1)
    tick(db, now=clock.now())
    with db.transaction() as s:
        nxt = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.stage_index == 1)).one()
        assert nxt.scheduled_at.date() == date(2026, 3, 10) and nxt.tone == "empathetic"


def test_an_adjusted_delay_and_tone_apply_to_the_next_stage_only(db, org, clock):
    now = clock.now()  # Monday 2026-03-02
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 4), ("email", "p", 7)])
    aid = _new(db, org, now, "ONCE")
    tick(db, now=now)
    org.post("/api/v1/outcomes/call", role="manager",
             json={"queue_item_id": _item(db, aid, 0), "outcome": "refused", "sentiment": "hostile", "willingness": 1})
    clock.advance(days=1)
    tick(db, now=clock.now())
    with db.transaction() as s:
        nxt = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.stage_index == 1)).one()
        assert nxt.scheduled_at.date() == date(2026, 3, 10) and nxt.tone == "empathetic"  # 4 days doubled
    clock.set(utc(2026, 3, 10, 9))
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    acct = _account(db, aid)
    assert (acct.case_next_stage, acct.case_next_delay_days, acct.case_tone_override) == (2, None, None)
    clock.set(utc(2026, 3, 11, 9))
    tick(db, now=clock.now())
    with db.transaction() as s:
        last = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.stage_index == 2)).one()
    # The stage after it keeps its own 7 days and its own tone: not 8 days, not empathetic.
    assert last.scheduled_at.date() == date(2026, 3, 17) and last.tone == "standard"


def test_promise_kept_and_promise_broken_on_a_finished_sequence(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0)])
    payer = _new(db, org, now, "PAYER", total="300.00")
    breaker = _new(db, org, now, "BREAKER", total="300.00", phone="+34600111444")
    tick(db, now=now)
    for aid in (payer, breaker):
        r = org.post("/api/v1/outcomes/call", role="manager", json={
            "queue_item_id": _item(db, aid, 0), "outcome": "promise_to_pay", "promise_amount": "100.00",
            "promise_date": "2026-03-05", "sentiment": "positive", "willingness": 5})
        assert r.json() == {"result": "completed"}
        acct = _account(db, aid)
        assert (acct.status, acct.case_sequence_finished) == ("promise_pending", True)
    clock.set(utc(2026, 3, 4, 12))
    pay = org.post("/api/v1/payments", role="agent", json={"account_id": payer, "amount": "100.00", "paid_on": "2026-03-04"})
    assert pay.status_code == 201, pay.text
    clock.set(utc(2026, 3, 6, 5, 30))  # the day of grace (06:30 in Madrid, before the 07:00 run): not settled yet
    r = tick(db, now=clock.now())
    assert (r["promises_kept"], r["promises_broken"]) == (0, 0)
    clock.set(utc(2026, 3, 7, 9))  # the promised date and its day of grace are over
    r = tick(db, now=clock.now())
    assert (r["promises_kept"], r["promises_broken"]) == (1, 1)
    with db.transaction() as s:
        statuses = {p.account_id: p.status for p in s.scalars(select(Promise))}
        assert statuses == {payer: "kept", breaker: "broken"}
    assert _account(db, payer).status == "sequence_completed"  # kept, 200 still owed, nothing left to run
    # The broken promise on a finished sequence restarts it at stage 0 at the next enqueue: the same
    # cycle's scheduled run (Friday 07:00 had not run yet) resets the case and calls again.
    assert r["strategy_runs"] == 1
    acct = _account(db, breaker)
    assert acct.status == "in_auto_management" and acct.case_sequence_finished is False
    with db.transaction() as s:
        assert ("reset", 0, None) in log(s, breaker)
        # The call is queued again, for Monday: calls are not made on Saturdays.
        assert items(s, breaker)[-1][:3] == (0, "pending", utc(2026, 3, 9, 7))  # 08:00 in Madrid


def test_a_promise_is_settled_by_the_debtors_own_date(db, org, clock):
    """A debtor in Honolulu (11 hours behind Madrid) promised for Thursday. Friday early morning in
    Madrid it is still Thursday in Honolulu: the promise is not broken while its day lasts (§4.11),
    and a grace of 0 days still leaves the whole promised day."""
    org.patch("/api/v1/settings", json={"outcomes": {"promise_grace_days": 0}})
    now = clock.now()
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "HNL", due=date(2026, 3, 1), timezone="Pacific/Honolulu").id
        refresh(s, org.id, now)
    r = org.post("/api/v1/promises", role="agent", json={"account_id": aid, "amount": "50.00", "promised_date": "2026-03-04"})
    assert r.status_code == 201, r.text
    clock.set(utc(2026, 3, 4, 12))  # the promised day itself
    assert tick(db, now=clock.now())["promises_broken"] == 0
    clock.set(utc(2026, 3, 5, 1))  # Thursday 02:00 in Madrid, Wednesday 15:00 in Honolulu
    assert tick(db, now=clock.now())["promises_broken"] == 0
    assert _account(db, aid).status == "promise_pending"
    clock.set(utc(2026, 3, 5, 10, 30))  # Thursday 00:30 in Honolulu: the promised day is over
    assert tick(db, now=clock.now())["promises_broken"] == 1
    assert _account(db, aid).status == "promise_overdue"


def test_a_payment_recorded_before_the_promise_does_not_keep_it(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "EARLYPAY", due=date(2026, 3, 1), total="300.00").id
        refresh(s, org.id, now)
    # Morning: 50 paid. Afternoon: the debtor promises 100 more for Wednesday, and never pays it.
    assert org.post("/api/v1/payments", role="agent", json={"account_id": aid, "amount": "50.00", "paid_on": "2026-03-02"}).status_code == 201
    clock.advance(hours=4)
    org.post("/api/v1/promises", role="agent", json={"account_id": aid, "amount": "50.00", "promised_date": "2026-03-04"})
    clock.set(utc(2026, 3, 6, 9))
    r = tick(db, now=clock.now())
    assert (r["promises_kept"], r["promises_broken"]) == (0, 1)


def test_a_promise_holds_contact_on_an_account_no_strategy_has_taken_yet(db, org, clock):
    """The debtor promised before any strategy took the account (a call logged by hand, the API). The
    strategy's run must not open a case and write to them before the promised date (§4.8)."""
    now = clock.now()  # Monday 2026-03-02 09:00 UTC, after the strategy's 07:00 run
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "EARLY", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    r = org.post("/api/v1/promises", role="agent", json={"account_id": aid, "amount": "100.00", "promised_date": "2026-03-05"})
    assert r.status_code == 201, r.text
    assert _account(db, aid).status == "promise_pending"
    _setup(db, org, now, [("email", "t", 0)])
    for _day in range(3):  # Monday to Wednesday
        assert tick(db, now=clock.now())["dispatch"] == {}
        clock.advance(days=1)
    acct = _account(db, aid)
    assert (acct.status, acct.strategy_id) == ("promise_pending", None)
    with db.transaction() as s:
        assert items(s, aid) == []
    clock.set(utc(2026, 3, 7, 9))  # the promised date and its day of grace are over, nothing paid: broken
    r = tick(db, now=clock.now())
    assert r["promises_broken"] == 1 and r["dispatch"] == {"dispatched": 1}  # now the strategy takes it
    assert _account(db, aid).strategy_id is not None


def test_cancelling_the_promise_resumes_contact(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 2)])
    aid = _new(db, org, now, "WITHDRAWN")
    tick(db, now=now)
    r = org.post("/api/v1/promises", role="agent", json={"account_id": aid, "amount": "100.00", "promised_date": "2026-03-20"})
    promise_id = r.json()["id"]
    assert _account(db, aid).status == "promise_pending"
    clock.advance(days=3)
    assert tick(db, now=clock.now())["dispatch"] == {}  # held by the promise
    r = org.post(f"/api/v1/promises/{promise_id}/cancel", role="agent")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    acct = _account(db, aid)
    assert (acct.status, acct.collection_tab) == ("in_auto_management", "engaged")
    with db.transaction() as s:
        assert log(s, aid)[-1] == ("promise_cancelled", None, None)
    clock.advance(days=1)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}  # the second email, no longer held
    with db.transaction() as s:
        assert [(i[0], i[1]) for i in items(s, aid)][-1] == (1, "completed")


def test_a_reset_after_a_broken_promise_counts_its_stages_from_the_reset(db, org, clock):
    now = clock.now()  # Monday 2026-03-02; the invoice fell due the day before
    _setup(db, org, now, [("email", "t", 0), ("email", "t", 8)])
    aid = _new(db, org, now, "AGAIN", total="300.00")
    tick(db, now=now)
    clock.set(utc(2026, 3, 10, 9))
    tick(db, now=clock.now())  # the second email, 8 days after the anchor: the sequence is finished
    assert _account(db, aid).status == "sequence_completed"
    assert org.post("/api/v1/promises", json={"account_id": aid, "amount": "100.00", "promised_date": "2026-03-11"}).status_code == 201
    clock.set(utc(2026, 3, 13, 9))  # promised date + grace passed, nothing paid: broken, then reset
    r = tick(db, now=clock.now())
    assert r["promises_broken"] == 1
    acct = _account(db, aid)
    assert (acct.status, acct.case_anchor_date) == ("in_auto_management", date(2026, 3, 13))
    with db.transaction() as s:
        assert ("reset", 0, None) in log(s, aid)
        new_round = [i for i in s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.case_number == acct.case_number))]
    # Stage 0 goes out at once; stage 1 waits its 8 days from the reset instead of following at once.
    assert [(q.stage_index, q.status.value) for q in new_round] == [(0, "completed")]
    clock.set(utc(2026, 3, 18, 9))
    tick(db, now=clock.now())
    with db.transaction() as s:
        later = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.case_number == acct.case_number,
                                                  QueueItem.stage_index == 1)).one()
    assert later.scheduled_at.date() == date(2026, 3, 23)  # Saturday the 21st, at Monday's slot (Mon–Fri automation)


def test_agent_task_outcome_completes_the_stage(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("phone_call", "t", 0), ("email", "p", 1)])
    aid = _new(db, org, now, "TASK")
    tick(db, now=now)
    with db.transaction() as s:
        task = s.scalars(select(Task)).one()
        task_id = task.id
    assert _account(db, aid).case_next_stage == 0  # waits for the agent
    assert org.post(f"/api/v1/tasks/{task_id}/outcome", role="viewer", json={"outcome": "refused"}).status_code == 403
    bad = org.post(f"/api/v1/tasks/{task_id}/outcome", role="agent", json={"outcome": "promise_to_pay"})
    assert bad.status_code == 422
    r = org.post(f"/api/v1/tasks/{task_id}/outcome", role="agent", json={
        "outcome": "promise_to_pay", "promise_amount": "50", "promise_date": "2026-03-20", "note": "will pay"})
    assert r.status_code == 200 and r.json()["status"] == "done" and r.json()["outcome"] == "promise_to_pay"
    acct = _account(db, aid)
    assert (acct.case_next_stage, acct.status) == (1, "promise_pending")
    again = org.post(f"/api/v1/tasks/{task_id}/outcome", role="agent", json={"outcome": "refused"})
    assert again.status_code == 409
    with db.transaction() as s:
        assert s.scalars(select(Promise)).one().amount == Decimal("50")


def _second_invoice(db, org, aid, now):
    with db.transaction() as s:
        a = s.get(Account, aid)
        inv = Invoice(organization_id=org.id, account_id=aid, external_id=f"{a.external_id}-2", number=f"{a.external_id}-2",
                      currency=a.currency, total=Decimal("40.00"), issue_date=date(2026, 2, 15), due_date=date(2026, 3, 15),
                      created_at=now, updated_at=now)
        s.add(inv)
        s.flush()
        first = a.carrying_invoice_id
        refresh(s, org.id, now)
        return first, inv.id


@pytest.mark.parametrize("action", ["voice", "phone_call"])
def test_a_dispute_from_a_call_or_an_agent_task_takes_the_invoice_out_of_collection(db, org, clock, action):
    now = clock.now()
    _setup(db, org, now, [(action, "t", 0), ("email", "p", 3)])
    aid = _new(db, org, now, "DISPUTE")
    tick(db, now=now)
    first, second = _second_invoice(db, org, aid, now)
    if action == "voice":
        r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": _item(db, aid, 0), "outcome": "dispute"})
        assert r.json() == {"result": "completed"}
    else:
        with db.transaction() as s:
            task_id = s.scalars(select(Task.id).where(Task.account_id == aid)).one()
        assert org.post(f"/api/v1/tasks/{task_id}/outcome", role="agent", json={"outcome": "dispute"}).status_code == 200
    with db.transaction() as s:
        assert s.get(Invoice, first).disputed is True and s.get(Invoice, second).disputed is False
        acct = s.get(Account, aid)
        assert acct.carrying_invoice_id == second and acct.balance == Decimal("40.00")
        assert ("dispute", 0, None) in log(s, aid)
        case_number = acct.case_number
    # The case continues on the next invoice: the next enqueue does not restart it from stage 0.
    clock.advance(days=1)
    tick(db, now=clock.now())
    with db.transaction() as s:
        acct = s.get(Account, aid)
        assert (acct.case_number, acct.case_next_stage, acct.case_invoice_id) == (case_number, 1, second)
        assert "restarted" not in [e[0] for e in log(s, aid)]


def test_an_agents_open_call_task_is_cancelled_when_the_debtor_pays_or_promises(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("phone_call", "t", 0), ("email", "p", 3)])
    payer = _new(db, org, now, "TASK-PAID")
    promiser = _new(db, org, now, "TASK-PROMISE", phone="+34600111666")
    tick(db, now=now)
    with db.transaction() as s:
        assert {t.account_id: t.status for t in s.scalars(select(Task))} == {payer: "open", promiser: "open"}
    assert org.post("/api/v1/payments", role="agent", json={"account_id": payer, "amount": "100.00", "paid_on": "2026-03-02"}).status_code == 201
    assert org.post("/api/v1/promises", json={"account_id": promiser, "amount": "50.00", "promised_date": "2026-03-10"}).status_code == 201
    with db.transaction() as s:
        tasks = {t.account_id: t for t in s.scalars(select(Task))}
        assert {a: (t.status, t.completed_at) for a, t in tasks.items()} == {payer: ("cancelled", now), promiser: ("cancelled", now)}
        entries = {e.account_id: (e.reason, e.queue_item_id) for e in s.scalars(
            select(ExecutionLogEntry).where(ExecutionLogEntry.event == "task_cancelled"))}
        assert entries == {payer: ("resolved", tasks[payer].queue_item_id), promiser: ("promise_pending", tasks[promiser].queue_item_id)}
    # A cancelled task takes no outcome.
    r = org.post(f"/api/v1/tasks/{tasks[payer].id}/outcome", role="agent", json={"outcome": "refused"})
    assert r.status_code == 409


def test_outcome_inputs_are_validated_and_scoped(db, org, other_org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    aid = _new(db, org, now, "VAL")
    tick(db, now=now)
    item = _item(db, aid, 0)
    assert other_org.post("/api/v1/outcomes/delivery", json={"queue_item_id": item, "status": "bounced"}).status_code == 404
    assert org.post("/api/v1/outcomes/delivery", json={"queue_item_id": item, "status": "lost"}).status_code == 422
    both = org.post("/api/v1/outcomes/delivery", json={"queue_item_id": item, "provider_ref": "x", "status": "bounced"})
    assert both.status_code == 422
    not_voice = org.post("/api/v1/outcomes/call", json={"queue_item_id": item, "outcome": "refused"})
    assert not_voice.status_code == 422
    with db.transaction() as s:
        assert [i[1] for i in items(s, aid)] == ["completed"]
        assert s.scalar(select(Payment.id)) is None


def _two_invoices(db, org, now, ext):
    """A debtor owing two invoices: ``{ext}-1`` (100, the older due date, carrying) and ``{ext}-2`` (80).
    Returns the account id and the carrying invoice's id."""
    from duecourse.ledger.models import Invoice

    with db.transaction() as s:
        a = debtor(s, org.id, now, ext, due=date(2026, 2, 20), total="100.00")
        s.add(Invoice(organization_id=org.id, account_id=a.id, external_id=f"{ext}-2", number=f"{ext}-2", currency="EUR",
                      total=Decimal("80.00"), issue_date=date(2026, 2, 1), due_date=date(2026, 3, 2), created_at=now, updated_at=now))
        s.flush()
        refresh(s, org.id, now)
        return a.id, a.carrying_invoice_id


def test_paying_the_carrying_invoice_restarts_the_case_on_the_next_invoice(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 7)])
    aid, first_invoice = _two_invoices(db, org, now, "TWO")
    tick(db, now=now)
    clock.advance(days=1)
    tick(db, now=clock.now())  # stage 1 is queued for a week later
    before = _account(db, aid)
    assert (before.case_invoice_id, before.case_next_stage, before.case_number) == (first_invoice, 1, 1)
    pay = org.post("/api/v1/payments", role="agent", json={"account_id": aid, "amount": "100.00", "paid_on": "2026-03-03"})
    assert pay.status_code == 201
    acct = _account(db, aid)
    assert acct.carrying_invoice_id != first_invoice and acct.balance == Decimal("80")
    clock.advance(days=1)  # Wednesday: the scheduled run restarts the case on invoice TWO-2
    r = tick(db, now=clock.now())
    acct = _account(db, aid)
    assert (acct.case_number, acct.case_invoice_id) == (2, acct.carrying_invoice_id)
    with db.transaction() as s:
        events = log(s, aid)
        # The restart records the new case's first stage (§4.4 applied again as it opens).
        assert ("cancelled", 1, "carrying_invoice_changed") in events and ("restarted", 0, None) in events
        # The new case starts from the beginning: stage 0 is sent again (a new case number).
        last = s.scalars(select(QueueItem).where(QueueItem.account_id == aid).order_by(QueueItem.id.desc())).first()
        assert (last.case_number, last.stage_index, last.status) == (2, 0, "completed")
    assert r["dispatch"] == {"dispatched": 1}


def test_a_queued_stage_about_a_paid_invoice_is_withdrawn_before_the_restart(db, org, clock):
    """The debtor pays the case's invoice after the day's run queued its next stage (waiting for the
    allowed hours) but before it goes out. That message is about a paid invoice: it is withdrawn,
    and the next run restarts the case on the other invoice (§4.2)."""
    now = clock.now()  # Monday 09:00 UTC
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 1)])
    org.patch("/api/v1/settings", json={"dispatch": {"allowed_hours": {"email": {"start": "10:00", "end": "18:00"}}}})
    aid, _ = _two_invoices(db, org, now, "PAIDFIRST")
    clock.set(utc(2026, 3, 2, 9, 30))  # 10:30 in Madrid: stage 0 goes out
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    clock.set(utc(2026, 3, 3, 7, 0))  # Tuesday 08:00 Madrid: the run queues stage 1 for 10:00
    tick(db, now=clock.now())
    with db.transaction() as s:
        pending = [i for i in items(s, aid) if i[1] == "pending"]
    assert [(i[0], i[2]) for i in pending] == [(1, utc(2026, 3, 3, 9, 0))]
    pay = org.post("/api/v1/payments", role="agent", json={"account_id": aid, "amount": "100.00", "paid_on": "2026-03-03"})
    assert pay.status_code == 201
    clock.set(utc(2026, 3, 3, 9, 35))  # a day after the first email: no limit holds it back
    assert tick(db, now=clock.now())["dispatch"] == {"cancelled": 1}
    with db.transaction() as s:
        assert ("cancelled", 1, "carrying_invoice_changed") in log(s, aid)
        assert [m.subject for m in s.scalars(select(SandboxMessage).order_by(SandboxMessage.id))] == ["Invoice PAIDFIRST-1"]
    clock.set(utc(2026, 3, 4, 9, 5))  # Wednesday: the run restarts the case on the other invoice
    tick(db, now=clock.now())
    acct = _account(db, aid)
    assert acct.case_number == 2 and acct.case_invoice_id == acct.carrying_invoice_id


def test_deleting_the_cases_invoice_restarts_the_case(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 7)])
    aid, first = _two_invoices(db, org, now, "GONE")
    tick(db, now=now)
    assert _account(db, aid).case_invoice_id == first
    r = org.delete(f"/api/v1/invoices/{first}", role="manager")
    assert r.status_code == 204, r.text
    clock.advance(days=1)
    tick(db, now=clock.now())
    acct = _account(db, aid)
    assert acct.case_number == 2 and acct.case_invoice_id == acct.carrying_invoice_id != first
    with db.transaction() as s:
        assert ("restarted", 0, None) in log(s, aid)


def test_a_requested_callback_is_not_held_by_the_daily_limit(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0)])
    aid = _new(db, org, now, "SAMEDAY")
    tick(db, now=now)  # the first call today uses the one contact a day
    at = now + timedelta(hours=4)
    org.post("/api/v1/outcomes/call", role="manager",
             json={"queue_item_id": _item(db, aid, 0), "outcome": "callback_requested", "callback_at": at.isoformat()})
    assert tick(db, now=at)["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        calls = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.status == "completed")).all()
        assert [(c.is_callback, c.sent_at) for c in calls] == [(False, now), (True, at)]


def _whatsapp_conversation(db, org, now, ext, *, max_retries):
    """A WhatsApp stage (with a template) then an email 3 days later; one debtor due yesterday."""
    from duecourse.messaging.models import Template

    _setup(db, org, now, [("whatsapp", "t", 0), ("email", "p", 3)])
    with db.transaction() as s:
        tpl = Template(organization_id=org.id, name="wa t", channel="whatsapp", tone="standard",
                       body_text="Hello {{ debtor_name }}, can we talk about {{ balance }} {{ currency }}?",
                       created_at=now, updated_at=now)
        s.add(tpl)
        s.flush()
        st = s.scalars(select(Stage).where(Stage.position == 0)).one()
        st.template_id = tpl.id
        st.max_retries, st.retry_delay_hours, st.step_timeout_hours = max_retries, 4, 24
    # Allow two contacts a day, so a retry four hours later is not held by the frequency limit.
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 2}}}})
    return _new(db, org, now, ext, whatsapp="+34600111444")


def test_whatsapp_conversation_waits_for_an_answer_and_retries_on_timeout_and_no_answer(db, org, clock):
    # §3 gives WhatsApp stages retries and a step timeout; §4.8 retries them after no answer or a
    # timeout. Such a stage is a conversation: it stays open after the send, unlike a one-shot message.
    now = clock.now()
    aid = _whatsapp_conversation(db, org, now, "WA", max_retries=2)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    acct = _account(db, aid)
    assert (acct.case_next_stage, acct.case_retry_count) == (0, 0)  # waiting for the debtor
    with db.transaction() as s:
        assert "advanced" not in [e[0] for e in log(s, aid)]
    # Nothing back within the 24 h step timeout: unanswered, retried 4 hours later.
    clock.advance(hours=23)
    assert tick(db, now=clock.now())["step_timeouts"] == 0
    clock.advance(hours=2)
    r = tick(db, now=clock.now())
    assert r["step_timeouts"] == 1
    with db.transaction() as s:
        assert items(s, aid)[-1][:3] == (0, "pending", clock.now() + timedelta(hours=4))
        assert [e for e in log(s, aid) if e[0] in ("step_timeout", "retry")] == [("step_timeout", 0, None), ("retry", 0, "step_timeout")]
    clock.advance(hours=4)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    # A WhatsApp agent reports "no answer" through the outcome API: the last retry.
    r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": _item(db, aid, 0), "outcome": "no_answer"})
    assert r.json() == {"result": "retry"}
    clock.advance(hours=4)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    # Retries used up: the next timeout advances the case to the email, due 3 days later.
    clock.advance(hours=25)
    r = tick(db, now=clock.now())
    assert r["step_timeouts"] == 1
    acct = _account(db, aid)
    assert (acct.case_next_stage, acct.case_retry_count) == (1, 0)
    with db.transaction() as s:
        assert [m.channel for m in s.scalars(select(SandboxMessage).where(SandboxMessage.account_id == aid))] == ["whatsapp"] * 3
        assert ("advanced", 1, None) in log(s, aid)
        assert [i[:2] for i in items(s, aid)][-1] == (1, "pending")


def test_whatsapp_without_retries_completes_when_accepted(db, org, clock):
    now = clock.now()
    aid = _whatsapp_conversation(db, org, now, "WA1", max_retries=0)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    acct = _account(db, aid)
    assert acct.case_next_stage == 1
    clock.advance(hours=25)
    assert tick(db, now=clock.now())["step_timeouts"] == 0
    # An outcome reported for it changes nothing in the case: the stage is already complete.
    r = org.post("/api/v1/outcomes/call", role="manager", json={"queue_item_id": _item(db, aid, 0), "outcome": "no_answer"})
    assert r.json() == {"result": "stale"}
    assert _account(db, aid).case_next_stage == 1
