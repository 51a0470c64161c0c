"""Several schedulers and workers on one database (SPEC §4.10, §9): every contact exactly once."""

from __future__ import annotations

import threading
from datetime import date, timedelta

import pytest
from sqlalchemy import func, select

from duecourse.channels.models import SandboxMessage
from duecourse.db import Database
from duecourse.engine.cycle import run_scheduled
from duecourse.engine.dispatch import run_due
from duecourse.engine.models import QueueItem
from duecourse.tenancy.models import Organization
from tests.engine_helpers import debtor, refresh
from tests.test_engine_dispatch import _setup


def _run_concurrently(url: str, org_id: int, now, schedulers: int = 2, workers: int = 4) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(schedulers + workers)
    scheduled = threading.Event()

    def scheduler(n: int) -> None:
        db = Database(url)
        try:
            start.wait()
            with db.transaction() as s:
                run_scheduled(s, org=s.get(Organization, org_id), now=now, worker=f"scheduler-{n}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            scheduled.set()
            db.dispose()

    def worker(n: int) -> None:
        db = Database(url)
        try:
            start.wait()
            scheduled.wait(30)
            for _ in range(3):  # several passes, racing each other and the other scheduler
                run_due(db, now=now, worker=f"worker-{n}", batch=7)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=scheduler, args=(i,)) for i in range(schedulers)]
    threads += [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_two_schedulers_and_four_workers_send_every_contact_once(db, org, clock):
    if db.dialect != "postgresql":
        pytest.skip("several writer processes are a PostgreSQL deployment (SQLite has one writer)")
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 1)])
    with db.transaction() as s:
        for i in range(60):
            debtor(s, org.id, now, f"C{i:02d}", due=date(2026, 3, 1))
        refresh(s, org.id, now)

    assert _run_concurrently(db.url, org.id, now) == []
    # A last pass picks up anything a racing worker released, then nothing may be left due.
    run_due(db, now=now, worker="sweeper")
    with db.transaction() as s:
        sent = s.execute(select(SandboxMessage.account_id, func.count()).group_by(SandboxMessage.account_id)).all()
        assert len(sent) == 60 and {c for _, c in sent} == {1}  # stage 0 once each; stage 1 waits for the limit
        assert s.scalar(select(func.count()).select_from(QueueItem).where(QueueItem.status == "processing")) == 0

    tomorrow = now + timedelta(days=1)
    assert _run_concurrently(db.url, org.id, tomorrow) == []
    run_due(db, now=tomorrow, worker="sweeper")
    with db.transaction() as s:
        per_stage = s.execute(
            select(QueueItem.account_id, QueueItem.stage_index, func.count())
            .where(QueueItem.status == "completed")
            .group_by(QueueItem.account_id, QueueItem.stage_index)
        ).all()
        assert len(per_stage) == 120 and {c for *_, c in per_stage} == {1}
        assert s.scalar(select(func.count()).select_from(SandboxMessage)) == 120


def test_two_schedulers_time_out_a_waiting_call_once(db, org, clock):
    """§4.10: a step timeout is handled by one scheduler. The second one, which read the same
    waiting call before the first committed, waits for the account and then finds nothing to do
    (it used to queue a second retry, or advance the case a second time)."""
    if db.dialect != "postgresql":
        pytest.skip("two schedulers at once are a PostgreSQL deployment (SQLite has one writer)")
    from sqlalchemy import text

    from duecourse.engine.cycle import tick
    from duecourse.engine.outcomes import expire_step_timeouts
    from duecourse.strategies.models import Stage

    now = clock.now()
    _setup(db, org, now, [("voice", "t", 0), ("email", "p", 2)])
    with db.transaction() as s:
        st = s.scalars(select(Stage).where(Stage.position == 0)).one()
        st.max_retries, st.retry_delay_hours, st.step_timeout_hours = 1, 4, 24
        aid = debtor(s, org.id, now, "RACE", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    later = now + timedelta(hours=25)
    results: dict[str, object] = {}

    def second() -> None:
        other = Database(db.url)
        try:
            with other.transaction() as s:
                results["second"] = expire_step_timeouts(s, organization_id=org.id, now=later)
        except BaseException as exc:  # noqa: BLE001
            results["second"] = exc
        finally:
            other.dispose()

    with db.transaction() as s:
        results["first"] = expire_step_timeouts(s, organization_id=org.id, now=later)
        thread = threading.Thread(target=second)
        thread.start()
        with db.engine.connect() as watcher:  # wait until the second scheduler waits for the account
            for _ in range(200):
                waiting = watcher.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )).scalar()
                if waiting or not thread.is_alive():
                    break
                threading.Event().wait(0.05)
    thread.join(30)
    assert results == {"first": 1, "second": 0}
    with db.transaction() as s:
        retries = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.status == "pending")).all()
        assert [(q.stage_index, q.scheduled_at) for q in retries] == [(0, later + timedelta(hours=4))]
