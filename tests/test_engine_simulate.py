"""Simulation (SPEC §4.12): the engine's next days, computed by the same code, changing nothing."""

from __future__ import annotations

from datetime import date

from sqlalchemy import func, select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.models import ExecutionLogEntry, QueueItem, SchedulerClaim
from duecourse.engine.simulate import simulate
from duecourse.ledger.models import Account
from duecourse.strategies.models import Strategy
from tests.engine_helpers import debtor, refresh
from tests.test_engine_dispatch import _setup


def _snapshot(db):
    with db.transaction() as s:
        return (
            tuple(s.scalar(select(func.count()).select_from(m)) for m in (QueueItem, ExecutionLogEntry, SandboxMessage, SchedulerClaim)),
            tuple(s.execute(select(Account.id, Account.status, Account.case_next_stage, Account.case_number).order_by(Account.id)).all()),
            tuple(s.execute(select(Strategy.id, Strategy.last_run_at)).all()),
        )


def test_simulation_shows_the_coming_days_and_changes_nothing(db, org, clock):
    now = clock.now()
    st_id = _setup(db, org, now, [("email", "t", 0), ("sms", "p", 2)])
    with db.transaction() as s:
        debtor(s, org.id, now, "SIM-A", due=date(2026, 3, 1))
        debtor(s, org.id, now, "SIM-B", due=date(2026, 3, 1), opt_out_sms=True)
        refresh(s, org.id, now)
    before = _snapshot(db)
    result = simulate(db, organization_id=org.id, start=now, days=4)
    assert _snapshot(db) == before
    sends = sorted((e["at"].date(), e["external_id"], e["stage_index"], e["channel"]) for e in result["events"] if e["event"] == "dispatched")
    # Both get the email on Monday; SIM-A gets the SMS on Wednesday (2 days later); SIM-B is opted out.
    assert sends == [(date(2026, 3, 2), "SIM-A", 0, "email"), (date(2026, 3, 2), "SIM-B", 0, "email"),
                     (date(2026, 3, 4), "SIM-A", 1, "sms")]
    assert result["summary"]["skipped:opt_out"] == 1
    assert [e["external_id"] for e in result["events"] if e["event"] == "skipped"] == ["SIM-B"]
    only = simulate(db, organization_id=org.id, start=now, days=1, strategy_id=st_id + 999)
    assert only["events"] == []


def test_simulation_through_the_api_validates_and_is_scoped(db, org, other_org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        debtor(s, org.id, now, "SIM-API", due=date(2026, 3, 1))
        refresh(s, org.id, now)
    r = org.post("/api/v1/engine/simulate", role="manager", json={"days": 2})
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["dispatched"] == 1
    assert other_org.post("/api/v1/engine/simulate", json={"days": 2}).json()["events"] == []
    assert org.post("/api/v1/engine/simulate", json={"days": 40}).status_code == 422
    assert org.post("/api/v1/engine/simulate", role="viewer", json={"days": 2}).status_code == 403
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(QueueItem)) == 0
