"""Read access to queue items, interactions, tasks and the execution log (organization-scoped)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem, Task
from duecourse.ledger.models import Account


@pytest.fixture
def records(db, org, clock):
    now = clock.now()
    with db.transaction() as s:
        acct = Account(organization_id=org.id, external_id="A1", name="A1", currency="EUR", created_at=now, updated_at=now)
        s.add(acct)
        s.flush()
        items = [
            QueueItem(organization_id=org.id, account_id=acct.id, stage_index=i, action="email", scheduled_at=now + timedelta(hours=i),
                      status=st, created_at=now, updated_at=now)
            for i, st in enumerate(["pending", "completed", "skipped"])
        ]
        s.add_all(items)
        s.flush()
        inter = Interaction(organization_id=org.id, account_id=acct.id, queue_item_id=items[1].id, channel="email",
                            direction="outbound", status="sent", occurred_at=now, created_at=now)
        task = Task(organization_id=org.id, account_id=acct.id, kind="phone_call", status="open", created_at=now)
        logs = [ExecutionLogEntry(organization_id=org.id, account_id=acct.id, at=now, event=e) for e in ("assigned", "enqueued", "dispatched")]
        s.add_all([inter, task, *logs])
        s.flush()
        return {"account": acct.id, "items": [i.id for i in items], "interaction": inter.id, "task": task.id}


def test_lists_filters_and_pages(org, records):
    pending = org.get("/api/v1/queue-items", role="viewer", params={"status": "pending"}).json()["items"]
    assert [i["id"] for i in pending] == records["items"][:1]
    page1 = org.get("/api/v1/queue-items", params={"limit": 2}).json()
    page2 = org.get("/api/v1/queue-items", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [i["id"] for i in page1["items"] + page2["items"]] == records["items"]
    assert page2["next_cursor"] is None
    log = org.get("/api/v1/execution-log", params={"account_id": records["account"]}).json()["items"]
    assert [e["event"] for e in log] == ["dispatched", "enqueued", "assigned"]  # newest first
    assert org.get("/api/v1/tasks", params={"status": "open"}).json()["items"][0]["id"] == records["task"]
    assert org.get("/api/v1/interactions", params={"channel": "email"}).json()["items"][0]["id"] == records["interaction"]
    bad = org.get("/api/v1/queue-items", params={"status": "lost"})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "status"


def test_other_organization_gets_404_and_empty_lists(other_org, org, records):
    for path in (f"/api/v1/queue-items/{records['items'][0]}", f"/api/v1/interactions/{records['interaction']}",
                 f"/api/v1/tasks/{records['task']}"):
        assert org.get(path).status_code == 200
        assert other_org.get(path).status_code == 404
    for path in ("/api/v1/queue-items", "/api/v1/interactions", "/api/v1/tasks", "/api/v1/execution-log"):
        assert other_org.get(path).json()["items"] == []
        assert org.client.get(path).status_code == 401


def test_engine_controls_and_kpis(org, other_org, records, clock):
    k = org.get("/api/v1/engine/kpis", role="viewer").json()
    # The fixture has one pending item; completed/skipped items carry no finished_at, so not "today".
    assert (k["pending"], k["processing"], k["engine_paused"]) == (1, 0, False)
    assert other_org.get("/api/v1/engine/kpis").json()["pending"] == 0
    assert org.post("/api/v1/engine/pause", role="viewer").status_code == 403
    assert org.post("/api/v1/engine/pause", role="manager").json() == {"engine_paused": True}
    assert org.get("/api/v1/settings").json()["automation"]["engine_paused"] is True
    assert other_org.get("/api/v1/settings").json()["automation"]["engine_paused"] is False
    assert org.post("/api/v1/engine/enqueue", json={}).json()["paused"] is True
    assert org.post("/api/v1/engine/resume", role="manager").json() == {"engine_paused": False}
    r = org.post("/api/v1/engine/enqueue", json={"campaign_id": 999999})
    assert r.status_code == 404
    r = org.post("/api/v1/engine/enqueue", json={"campagin_id": 1})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "campagin_id"
    assert org.post("/api/v1/engine/enqueue", json={}).json()["paused"] is False


def test_deleting_an_account_deletes_its_engine_history_only(db, org, records, clock):
    now = clock.now()
    with db.transaction() as s:
        other = Account(organization_id=org.id, external_id="A2", name="A2", currency="EUR", created_at=now, updated_at=now)
        s.add(other)
        s.flush()
        s.add(ExecutionLogEntry(organization_id=org.id, account_id=other.id, at=now, event="assigned"))
        other_id = other.id
    assert org.delete(f"/api/v1/accounts/{records['account']}").status_code == 204
    with db.transaction() as s:
        # The log has no foreign keys (bulk writes); the account's delete removes its entries itself.
        assert s.query(ExecutionLogEntry).filter_by(account_id=records["account"]).count() == 0
        assert s.query(QueueItem).filter_by(account_id=records["account"]).count() == 0
        assert s.query(Interaction).filter_by(account_id=records["account"]).count() == 0
        assert s.query(Task).filter_by(account_id=records["account"]).count() == 0
        assert [e.event for e in s.query(ExecutionLogEntry).filter_by(account_id=other_id)] == ["assigned"]
