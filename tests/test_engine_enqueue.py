"""Enqueueing scenarios (SPEC §4.2–§4.5): assignment, first action, multi-stage handling, scheduled times."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select

from duecourse.campaigns.models import Campaign
from duecourse.engine.cycle import tick
from duecourse.engine.enqueue import enqueue
from duecourse.engine.models import ExecutionLogEntry, QueueItem
from duecourse.engine.runs import run_strategy_now
from duecourse.ledger.models import Account
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.principal import Principal
from tests.engine_helpers import debtor, items, log, refresh, strategy
from tests.test_engine_dispatch import _setup


def utc(*a):
    return datetime(*a, tzinfo=UTC)


# The organization fixture is in Europe/Madrid (UTC+1 in March until the 29th).
# clock starts Monday 2026-03-02 09:00 UTC = 10:00 Madrid.


def _seed_004(s, org, now, ext):
    """Seed 004: stages at offsets 0, 8, 15, 30, contextualized; a debtor 18 days past the anchor."""
    st = strategy(s, org.id, now, [("email", "t", 0), ("email", "p", 8), ("email", "p", 7), ("email", "t", 30)],
                  first_action_logic="contextualized")
    a = debtor(s, org.id, now, ext, due=date(2026, 3, 2) - timedelta(days=18))
    refresh(s, org.id, now)
    return st, a, run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))


def test_seed_004_contextualized_entry_at_offset_15(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        st, a, r = _seed_004(s, org, now, "D18")
        assert (r["assigned"], r["enqueued"]) == (1, 1)
        # Entered at the stage with offset 15 (index 2), due 15 days after the anchor: already due,
        # so scheduled at that day's 07:00 Madrid slot (in the past: dispatchable at once).
        assert items(s, a.id) == [(2, "pending", utc(2026, 2, 27, 6), None)]
        # The first stage is chosen as the case opens, and recorded on its ``assigned`` entry.
        assert log(s, a.id) == [("assigned", 2, None), ("enqueued", 2, None)]
        assigned = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == a.id)).first()
        assert assigned.details["first_action"] == "contextualized"
        assert s.get(Account, a.id).case_anchor_date == date(2026, 2, 12)


def test_standard_logic_skips_reminder_for_overdue_invoice_and_schedules_future_stage(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", -3), ("email", "t", 0), ("email", "p", 7)], trigger_type="amount_threshold",
                      trigger_amount=1)
        fresh = debtor(s, org.id, now, "FRESH", due=date(2026, 3, 10))
        refresh(s, org.id, now)
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        # Amount trigger: anchor = today; not past the anchor yet, so the first stage (offset -3) applies:
        # due 3 days before today (slot: that Friday 07:00 Madrid); stage 1 (offset 0) is due today too,
        # and run_all_in_order enqueues both, in order.
        assert items(s, fresh.id) == [(0, "pending", utc(2026, 2, 27, 6), None), (1, "pending", utc(2026, 3, 2, 6), None)]

    clock.advance(days=2)
    with db.transaction() as s:
        late = debtor(s, org.id, clock.now(), "LATE", due=date(2026, 2, 1))
        refresh(s, org.id, clock.now())
        st2 = strategy(s, org.id, clock.now(), [("email", "t", -3), ("email", "t", 2), ("email", "p", 7)],
                       name="overdue", trigger_days=5, priority=1)
        run_strategy_now(s, strategy=st2, now=clock.now(), principal=Principal.system(org.id))
        acct = s.get(Account, late.id)
        assert acct.case_anchor_date == date(2026, 2, 6)  # due + 5
        # Past the anchor: the pre-trigger reminder is skipped; stage 1 (offset 2) is the first.
        assert [i[0] for i in items(s, late.id)] == [1]


def test_saturday_due_date_with_weekday_automation_waits_for_monday(db, org, clock):
    clock.set(utc(2026, 3, 6, 12))  # Friday
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 0)], trigger_type="amount_threshold", trigger_amount=1)
        a = debtor(s, org.id, now, "SAT", due=date(2026, 3, 30))
        refresh(s, org.id, now)
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        s.get(Account, a.id).case_anchor_date = date(2026, 3, 7)  # a Saturday
        s.get(Account, a.id).case_next_stage = None
        s.execute(QueueItem.__table__.delete())
        enqueue(s, organization_id=org.id, now=now, strategy_id=st.id, cause="test")
        assert items(s, a.id) == [(0, "pending", utc(2026, 3, 9, 6), None)]  # Monday 07:00 Madrid


def test_sms_to_debtor_in_another_timezone_moves_into_allowed_hours(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("sms", "t", 0)], trigger_type="amount_threshold", trigger_amount=1)
        ny = debtor(s, org.id, now, "NY", due=date(2026, 3, 30), timezone="America/New_York")
        refresh(s, org.id, now)
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        # Slot 07:00 Madrid (06:00 UTC) is 01:00 in New York: SMS waits until 08:00 there (13:00 UTC).
        assert items(s, ny.id) == [(0, "pending", utc(2026, 3, 2, 13), None)]


def test_a_stage_never_reaches_a_debtor_before_its_due_date_in_their_time_zone(db, org, clock):
    """Madrid's 07:00 slot is the evening before in Honolulu: a stage due on the 4th there waits
    for the first slot at which it is the 4th there too."""
    now = clock.now()  # Monday 2026-03-02
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 3)], trigger_type="amount_threshold", trigger_amount=1)
        hnl = debtor(s, org.id, now, "HNL", due=date(2026, 3, 30), timezone="Pacific/Honolulu")
        mad = debtor(s, org.id, now, "MAD", due=date(2026, 3, 30))
        refresh(s, org.id, now)
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        # Anchors are the debtors' own dates: Monday in Madrid, still Sunday in Honolulu.
        assert (s.get(Account, mad.id).case_anchor_date, s.get(Account, hnl.id).case_anchor_date) == (
            date(2026, 3, 2), date(2026, 3, 1))
        assert items(s, mad.id) == [(0, "pending", utc(2026, 3, 5, 6), None)]  # due the 5th: Thursday 07:00 Madrid
        # Due the 4th in Honolulu. Wednesday's 07:00 Madrid slot is Tuesday 20:00 there (a day
        # early); Thursday's is Wednesday 20:00 there, the due date.
        assert items(s, hnl.id) == [(0, "pending", utc(2026, 3, 5, 6), None)]


def _downtime_case(s, org, now, handling, priority):
    # Each new strategy has a better priority, so it takes the new debtor.
    st = strategy(s, org.id, now, [("email", "t", 0), ("email", "p", 2), ("email", "p", 2), ("email", "p", 30)],
                  multi_stage_handling=handling, trigger_type="amount_threshold", trigger_amount=1, name=handling,
                  priority=priority)
    a = debtor(s, org.id, now, f"DOWN-{handling}", due=date(2026, 4, 30))
    refresh(s, org.id, now)
    run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
    return st, a


def test_multi_stage_modes_after_a_week_of_downtime(db, org, clock):
    now = clock.now()
    got = {}
    with db.transaction() as s:
        for priority, handling in ((30, "run_all_in_order"), (20, "skip_to_latest"), (10, "one_per_run")):
            st, a = _downtime_case(s, org, now, handling, priority)
            # The case started a week ago and nothing ran since: stages 0, 1, 2 are all due.
            acct = s.get(Account, a.id)
            acct.case_anchor_date = acct.case_opened_on = date(2026, 2, 23)
            acct.case_next_stage = None
            s.execute(QueueItem.__table__.delete().where(QueueItem.account_id == a.id))
            enqueue(s, organization_id=org.id, now=now, strategy_id=st.id, cause="catch_up")
            got[handling] = ([i[0] for i in items(s, a.id)], [e for e in log(s, a.id) if e[0] == "skipped"],
                             s.get(Account, a.id).case_next_stage)
    assert got["run_all_in_order"] == ([0, 1, 2], [], 0)
    assert got["skip_to_latest"] == ([2], [("skipped", 0, "skip_to_latest"), ("skipped", 1, "skip_to_latest")], 2)
    assert got["one_per_run"] == ([0], [], 0)


def test_enqueue_is_idempotent_and_respects_pause_and_eligibility(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 0), ("email", "p", 3)], trigger_type="amount_threshold", trigger_amount=1)
        a = debtor(s, org.id, now, "A", due=date(2026, 3, 30))
        b = debtor(s, org.id, now, "B", due=date(2026, 3, 30))
        refresh(s, org.id, now)
        run_strategy_now(s, strategy=st, now=now, principal=Principal.system(org.id))
        for _ in range(3):
            assert enqueue(s, organization_id=org.id, now=now, cause="again").enqueued == 0
        assert s.scalar(select(func.count()).select_from(QueueItem)) == 2
        # Paused engine: nothing at all.
        tenancy.update_settings(s, principal=Principal.system(org.id), patch={"automation": {"engine_paused": True}}, now=now)
        s.execute(QueueItem.__table__.delete())
        assert enqueue(s, organization_id=org.id, now=now, cause="paused").paused is True
        assert s.scalar(select(func.count()).select_from(QueueItem)) == 0
        tenancy.update_settings(s, principal=Principal.system(org.id), patch={"automation": {"engine_paused": False}}, now=now)
        # A blocked account and an inactive strategy are not eligible.
        s.get(Account, b.id).blocked = True
        refresh(s, org.id, now)
        assert enqueue(s, organization_id=org.id, now=now, cause="x").enqueued == 1
        assert [i[0] for i in items(s, a.id)] == [0] and items(s, b.id) == []
        s.execute(QueueItem.__table__.delete())
        st.active = False
        s.flush()
        assert enqueue(s, organization_id=org.id, now=now, cause="x").enqueued == 0


def test_campaign_assigns_its_strategy_only_while_active_and_within_dates(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 0)], trigger_days=0)
        c = Campaign(organization_id=org.id, name="C", strategy_id=st.id, status="draft", start_date=date(2026, 3, 1),
                     end_date=date(2026, 3, 31), created_at=now, updated_at=now)
        s.add(c)
        s.flush()
        a = debtor(s, org.id, now, "CAMP", due=date(2026, 2, 20), campaign_id=c.id)
        refresh(s, org.id, now)
        assert enqueue(s, organization_id=org.id, now=now, campaign_id=c.id, cause="x").assigned == 0
        c.status = "active"
        s.flush()
        r = enqueue(s, organization_id=org.id, now=now, campaign_id=c.id, cause="enqueue_campaign")
        assert (r.assigned, r.enqueued) == (1, 1)
        item = s.scalars(select(QueueItem).where(QueueItem.account_id == a.id)).one()
        assert item.campaign_id == c.id and item.strategy_id == st.id
        assert log(s, a.id)[0] == ("assigned", 0, None)
    clock.set(utc(2026, 4, 2, 9))  # after the end date
    with db.transaction() as s:
        s.execute(QueueItem.__table__.delete())
        assert enqueue(s, organization_id=org.id, now=clock.now(), campaign_id=c.id, cause="late").enqueued == 0


def test_two_processes_enqueueing_at_once_create_each_item_once(db, org, clock):
    import threading

    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 0), ("sms", "p", 0), ("email", "p", 0)],
                      trigger_type="amount_threshold", trigger_amount=1)
        for i in range(30):
            debtor(s, org.id, now, f"R{i}", due=date(2026, 3, 30))
        refresh(s, org.id, now)
        from duecourse.engine.assign import assign_by_trigger
        from duecourse.tenancy.models import Organization
        assign_by_trigger(s, strategy=st, org=s.get(Organization, org.id), rates={}, now=now)

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker():
        try:
            with db.transaction() as s:
                barrier.wait()
                enqueue(s, organization_id=org.id, now=now, cause="race")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.transaction() as s:
        rows = s.execute(select(QueueItem.account_id, QueueItem.stage_index)).all()
        # run_all_in_order: all three stages (offsets 0, 0, 0) are due for all 30 accounts, once each.
        assert len(rows) == 90 and len(set(rows)) == 90
        from duecourse.engine.models import ExecutionLogEntry
        enq = s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(ExecutionLogEntry.event == "enqueued"))
        assert enq == 90
        opened = s.scalar(select(func.count()).select_from(ExecutionLogEntry).where(ExecutionLogEntry.event == "assigned"))
        assert opened == 30  # the second pass waited for the first and found nothing left to do


@pytest.mark.parametrize("bulk_from", [1, 10**9], ids=["plain-insert-first", "on-conflict"])
def test_an_item_another_transaction_queues_meanwhile_is_skipped_not_doubled(db, org, clock, monkeypatch, bulk_from):
    """The pass's candidates leave out items already live; one that another transaction (an outcome
    queueing the next stage, say) writes while the pass runs is caught by the unique index: the
    pass waits for that transaction, then skips the item instead of failing or doubling it. Large
    passes insert plainly first and redo the insert with ON CONFLICT on a clash; small ones use
    ON CONFLICT at once: both ways give the same result."""
    import threading
    import time

    from sqlalchemy import text

    from duecourse.engine import enqueue as enqueue_module

    if db.dialect != "postgresql":
        pytest.skip("two writers at once are a PostgreSQL deployment (SQLite has one writer)")
    monkeypatch.setattr(enqueue_module, "BULK_CANDIDATES", bulk_from)
    now = clock.now()
    with db.transaction() as s:
        st = strategy(s, org.id, now, [("email", "t", 0)], trigger_type="amount_threshold", trigger_amount=1)
        ids = [debtor(s, org.id, now, f"RACE{i}", due=date(2026, 3, 30)).id for i in range(3)]
        refresh(s, org.id, now)
        from duecourse.engine.assign import assign_by_trigger
        from duecourse.tenancy.models import Organization
        assign_by_trigger(s, strategy=st, org=s.get(Organization, org.id), rates={}, now=now)
        strategy_id = st.id
    first = ids[0]
    outcome: dict[str, object] = {}

    def enqueue_pass() -> None:
        try:
            with db.transaction() as s:
                outcome["enqueued"] = enqueue(s, organization_id=org.id, now=now, cause="race").enqueued
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    with db.transaction() as other:
        other.add(QueueItem(organization_id=org.id, account_id=first, strategy_id=strategy_id, case_number=1,
                            stage_index=0, action="email", scheduled_at=now, batch_id="other",
                            created_at=now, updated_at=now))
        other.flush()
        thread = threading.Thread(target=enqueue_pass)
        thread.start()
        deadline = time.monotonic() + 20
        with db.engine.connect() as watch:  # until the pass waits for this transaction
            while not watch.execute(text(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )).first():
                assert thread.is_alive() and time.monotonic() < deadline, outcome
                time.sleep(0.02)
    thread.join(20)
    assert outcome == {"enqueued": 2}
    with db.transaction() as s:
        rows = s.execute(select(QueueItem.account_id, QueueItem.batch_id)).all()
        assert sorted(a for a, _ in rows) == sorted(ids)
        assert [b for a, b in rows if a == first] == ["other"]
        logged = s.scalars(select(ExecutionLogEntry.account_id).where(ExecutionLogEntry.event == "enqueued")).all()
        assert sorted(logged) == sorted(ids[1:])


def test_a_case_without_a_next_stage_gets_its_first_action_at_enqueue(db, org, clock):
    # Cases choose their first stage as they open; a case left without one (opened while its strategy
    # had no stages, or written by an older version) gets it at the next enqueue, logged apart.
    now = clock.now()
    with db.transaction() as s:
        st, a, r = _seed_004(s, org, now, "NOSTAGE")
        assert r["assigned"] == 1 and s.get(Account, a.id).case_next_stage == 2
        s.execute(QueueItem.__table__.delete().where(QueueItem.account_id == a.id))
        s.get(Account, a.id).case_next_stage = None
        s.flush()
        enqueue(s, organization_id=org.id, now=now, strategy_id=st.id, cause="test")
        assert s.get(Account, a.id).case_next_stage == 2
        assert log(s, a.id)[-2:] == [("first_action", 2, None), ("enqueued", 2, None)]
        assert [i[0] for i in items(s, a.id)] == [2]


def test_skip_to_latest_after_downtime_withdraws_a_stage_queued_ahead(db, org, clock):
    """The next stage was queued for its due time; the engine was down until two stages were due:
    only the latest goes out, the one queued ahead is cancelled and recorded as skipped."""
    now = clock.now()  # Monday 2026-03-02
    _setup(db, org, now, [("email", "t", 0), ("email", "t", 8), ("email", "t", 15)], multi_stage_handling="skip_to_latest")
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "DOWN", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    tick(db, now=now)
    clock.advance(days=1)
    tick(db, now=clock.now())
    with db.transaction() as s:
        assert [(i[0], i[1]) for i in items(s, aid)] == [(0, "completed"), (1, "pending")]  # stage 1 queued for day 8
    clock.set(datetime(2026, 3, 18, 9, tzinfo=UTC))  # back after two weeks: stages 1 and 2 are both due
    r = tick(db, now=clock.now())
    assert r["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        assert [(i[0], i[1], i[3]) for i in items(s, aid)] == [
            (0, "completed", None), (1, "cancelled", "skip_to_latest"), (2, "completed", None)]
        entries = log(s, aid)
        assert ("cancelled", 1, "skip_to_latest") in entries and ("skipped", 1, "skip_to_latest") in entries
