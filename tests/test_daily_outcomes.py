"""The daily outcomes series (SPEC §8 chart) through the API and on the Execution page: sent,
delivered, failed, promises and payments per day of the organization's calendar."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import select

from duecourse.engine.cycle import tick
from duecourse.engine.models import Direction, Interaction, InteractionStatus, QueueItem
from tests.engine_helpers import debtor, refresh
from tests.test_engine_dispatch import _setup


def test_daily_outcomes_count_each_kind_on_its_local_day(db, org, other_org, clock):
    now = clock.now()  # Monday 2026-03-02 09:00 UTC = 10:00 in Madrid
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        ids = [debtor(s, org.id, now, f"D{i}", due=date(2026, 3, 1)).id for i in range(3)]
        refresh(s, org.id, now)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 3}
    with db.transaction() as s:
        items = {q.account_id: q.id for q in s.scalars(select(QueueItem))}
        # A call placed at 23:30 UTC on Monday is Tuesday in Madrid.
        s.add(Interaction(organization_id=org.id, account_id=ids[0], channel="voice", direction=Direction.outbound,
                          status=InteractionStatus.sent, occurred_at=datetime(2026, 3, 2, 23, 30, tzinfo=UTC),
                          created_at=now))
    org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": items[ids[0]], "status": "delivered"})
    org.post("/api/v1/outcomes/delivery", role="manager", json={"queue_item_id": items[ids[1]], "status": "bounced"})
    assert org.post("/api/v1/promises", json={"account_id": ids[2], "amount": "50.00", "promised_date": "2026-03-10"}).status_code == 201
    assert org.post("/api/v1/payments", json={"account_id": ids[0], "amount": "100.00", "paid_on": "2026-02-20"}).status_code == 201
    clock.advance(days=1)

    r = org.get("/api/v1/engine/daily-outcomes?days=30", role="viewer")
    assert r.status_code == 200
    days = {d["date"]: d for d in r.json()["days"]}
    assert len(days) == 30 and r.json()["days"][-1]["date"] == "2026-03-03"
    assert {k: days["2026-03-02"][k] for k in ("sent", "delivered", "failed", "promises", "payments")} == {
        "sent": 3, "delivered": 1, "failed": 1, "promises": 1, "payments": 0}
    assert days["2026-03-03"]["sent"] == 1
    assert days["2026-02-20"]["payments"] == 1
    assert r.json()["totals"] == {"sent": 4, "delivered": 1, "failed": 1, "promises": 1, "payments": 1}
    assert org.get("/api/v1/engine/daily-outcomes?days=0").status_code == 422
    assert set(other_org.get("/api/v1/engine/daily-outcomes").json()["totals"].values()) == {0}
    assert org.client.get("/api/v1/engine/daily-outcomes").status_code == 401
