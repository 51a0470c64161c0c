"""Campaigns (SPEC §5): fields, lifecycle, membership, delete, KPIs, access."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from duecourse.engine.models import (
    Direction,
    ExecutionLogEntry,
    Interaction,
    InteractionStatus,
    QueueItem,
    QueueStatus,
)
from duecourse.ledger.models import (
    Account,
    AccountStatus,
    AccountTag,
    CollectionTab,
    Payment,
    PaymentSource,
    Promise,
    PromiseSource,
)
from duecourse.strategies.models import ActionType
from duecourse.tenancy.models import AuditEntry

API = "/api/v1"


def _fields(r) -> list[str]:  # type: ignore[no-untyped-def]
    return [f["field"] for f in r.json()["error"]["fields"]]


def _strategy(org, name="Calls", active=True) -> int:  # type: ignore[no-untyped-def]
    r = org.post(
        f"{API}/strategies",
        json={
            "name": name,
            "description": "phone follow-up",
            "active": active,
            "trigger_type": "days_overdue",
            "trigger_days": 0,
            "stages": [{"action_type": "phone_call", "timing_type": "days_from_trigger", "days": 0}],
        },
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _campaign(org, name="Spring push", **kw) -> dict:  # type: ignore[no-untyped-def]
    r = org.post(f"{API}/campaigns", json={"name": name, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def _add_account(s, org_id, now, ext, *, tags=(), **kw) -> int:  # type: ignore[no-untyped-def]
    values = {"balance": Decimal(100), "gross_open": Decimal(100), "currency": "EUR", **kw}
    a = Account(
        organization_id=org_id,
        external_id=ext,
        name=f"Debtor {ext}",
        created_at=now,
        updated_at=now,
        **values,
    )
    s.add(a)
    s.flush()
    for t in tags:
        s.add(AccountTag(account_id=a.id, tag=t, organization_id=org_id))
    return a.id


def _queue_item(
    s, org_id, now, account_id, *, campaign_id=None, strategy_id=None, status=QueueStatus.pending, stage=0
) -> int:  # type: ignore[no-untyped-def]
    q = QueueItem(
        organization_id=org_id,
        account_id=account_id,
        strategy_id=strategy_id,
        campaign_id=campaign_id,
        stage_index=stage,
        action=ActionType.email,
        scheduled_at=now + timedelta(hours=1),
        status=status,
        created_at=now,
        updated_at=now,
    )
    s.add(q)
    s.flush()
    return q.id


def test_create_read_update_and_list(org, clock):
    sid = _strategy(org)
    c = _campaign(
        org, objective="Recover Q1 debts", strategy_id=sid, start_date="2026-03-01", end_date="2026-03-31"
    )
    assert c["status"] == "draft" and c["strategy_id"] == sid and c["end_date"] == "2026-03-31"
    assert c["created_by"] == "api-key:admin key" and c["activated_at"] is None
    assert org.get(f"{API}/campaigns/{c['id']}", role="viewer").json() == c

    clock.advance(hours=1)
    p = org.patch(
        f"{API}/campaigns/{c['id']}",
        role="manager",
        json={"objective": "Recover everything", "end_date": None},
    )
    assert p.status_code == 200, p.text
    assert p.json()["objective"] == "Recover everything" and p.json()["end_date"] is None
    assert p.json()["start_date"] == "2026-03-01" and p.json()["updated_at"] != c["updated_at"]
    put = org.put(f"{API}/campaigns/{c['id']}", json={"name": "Spring push"})
    assert put.status_code == 200
    assert (put.json()["objective"], put.json()["strategy_id"], put.json()["start_date"]) == ("", None, None)

    d = _campaign(org, "Summer VIP_list")
    assert org.post(f"{API}/campaigns/{d['id']}/activate").status_code == 409  # no strategy yet
    org.patch(f"{API}/campaigns/{d['id']}", json={"strategy_id": sid})
    assert org.post(f"{API}/campaigns/{d['id']}/activate").status_code == 200

    def ids(**params):  # type: ignore[no-untyped-def]
        r = org.get(f"{API}/campaigns", role="viewer", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["items"]]

    assert ids() == [c["id"], d["id"]]
    assert ids(status="active") == [d["id"]] and ids(status="draft") == [c["id"]]
    assert ids(search="PUSH") == [c["id"]] and ids(search="r_n") == [] and ids(search="vip_") == [d["id"]]
    assert org.get(f"{API}/campaigns", params={"status": "running"}).status_code == 422
    first = org.get(f"{API}/campaigns", params={"limit": 1}).json()
    assert [x["id"] for x in first["items"]] == [c["id"]]
    second = org.get(f"{API}/campaigns", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert [x["id"] for x in second["items"]] == [d["id"]] and second["next_cursor"] is None


def test_validation_names_the_field_and_changes_nothing(org, other_org):
    foreign = _strategy(other_org, "Theirs")
    cases = [
        ({"name": None}, "name"),
        ({"name": " "}, "name"),
        ({"name": "n" * 201}, "name"),
        ({"objective": "o" * 2001}, "objective"),
        ({"strategy_id": foreign}, "strategy_id"),
        ({"strategy_id": 999999}, "strategy_id"),
        ({"strategy_id": "1"}, "strategy_id"),
        ({"start_date": "2026-03-10", "end_date": "2026-03-09"}, "end_date"),
        ({"start_date": "yesterday"}, "start_date"),
        ({"status": "active"}, "status"),
        ({"owner": "me"}, "owner"),
    ]
    for change, field in cases:
        r = org.post(f"{API}/campaigns", json={"name": "Valid", **change})
        assert r.status_code == 422 and field in _fields(r), (change, r.text)
    assert org.get(f"{API}/campaigns").json()["items"] == []

    c = _campaign(org, start_date="2026-03-10")
    for change, field in cases + [({"end_date": "2026-03-01"}, "end_date")]:
        r = org.patch(f"{API}/campaigns/{c['id']}", json=change)
        assert r.status_code == 422 and field in _fields(r), (change, r.text)
    assert org.get(f"{API}/campaigns/{c['id']}").json() == c

    dup = org.post(f"{API}/campaigns", json={"name": "SPRING PUSH"})
    assert dup.status_code == 409 and _fields(dup) == ["name"]
    other = _campaign(org, "Other")
    r = org.patch(f"{API}/campaigns/{other['id']}", json={"name": "spring push"})
    assert r.status_code == 409 and _fields(r) == ["name"]
    assert [x["name"] for x in org.get(f"{API}/campaigns").json()["items"]] == ["Spring push", "Other"]


def test_lifecycle_transitions(org, clock):
    sid = _strategy(org)
    c = _campaign(org, strategy_id=sid)
    cid = c["id"]

    def act(action, expected_status):  # type: ignore[no-untyped-def]
        r = org.post(f"{API}/campaigns/{cid}/{action}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == expected_status
        return r.json()

    def refused(action, message):  # type: ignore[no-untyped-def]
        before = org.get(f"{API}/campaigns/{cid}").json()
        r = org.post(f"{API}/campaigns/{cid}/{action}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["message"] == message
        assert org.get(f"{API}/campaigns/{cid}").json() == before

    refused("pause", "cannot pause a draft campaign (allowed from: active)")
    refused("complete", "cannot complete a draft campaign (allowed from: active, paused)")
    clock.advance(minutes=1)
    active = act("activate", "active")
    assert active["activated_at"] is not None
    refused("activate", "cannot activate an active campaign (allowed from: draft, paused)")
    act("pause", "paused")
    refused("pause", "cannot pause a paused campaign (allowed from: active)")
    act("activate", "active")
    act("pause", "paused")
    done = act("complete", "completed")
    assert done["completed_at"] is not None
    refused("activate", "cannot activate a completed campaign (allowed from: draft, paused)")
    refused("pause", "cannot pause a completed campaign (allowed from: active)")
    refused("complete", "cannot complete a completed campaign (allowed from: active, paused)")

    # active -> completed directly.
    c2 = _campaign(org, "Second", strategy_id=sid)
    assert org.post(f"{API}/campaigns/{c2['id']}/activate").status_code == 200
    assert org.post(f"{API}/campaigns/{c2['id']}/complete").json()["status"] == "completed"

    log = org.get(f"{API}/campaigns/{cid}/audit-log", role="viewer").json()["items"]
    status_changes = [(e["old_value"], e["new_value"]) for e in log if e["action"] == "status_changed"]
    assert status_changes == [
        ("paused", "completed"),
        ("active", "paused"),
        ("paused", "active"),
        ("active", "paused"),
        ("draft", "active"),
    ]
    assert all(
        e["field"] == "status" and e["actor"] == "api-key:admin key" and e["entity_type"] == "campaign"
        for e in log
    )


def test_activation_needs_an_active_strategy(org):
    inactive = _strategy(org, "Dormant", active=False)
    c = _campaign(org)
    r = org.post(f"{API}/campaigns/{c['id']}/activate")
    assert (
        r.status_code == 409
        and _fields(r) == ["strategy_id"]
        and "without a strategy" in r.json()["error"]["message"]
    )
    org.patch(f"{API}/campaigns/{c['id']}", json={"strategy_id": inactive})
    r = org.post(f"{API}/campaigns/{c['id']}/activate")
    assert (
        r.status_code == 409
        and _fields(r) == ["strategy_id"]
        and "'Dormant' is inactive" in r.json()["error"]["message"]
    )
    assert org.get(f"{API}/campaigns/{c['id']}").json()["status"] == "draft"

    assert org.post(f"{API}/strategies/{inactive}/activate").status_code == 200
    assert org.post(f"{API}/campaigns/{c['id']}/activate").json()["status"] == "active"
    # An active campaign cannot be switched to an inactive strategy, nor lose its strategy.
    other_inactive = _strategy(org, "Also dormant", active=False)
    for change in ({"strategy_id": other_inactive}, {"strategy_id": None}):
        r = org.patch(f"{API}/campaigns/{c['id']}", json=change)
        assert r.status_code == 422 and _fields(r) == ["strategy_id"]
    assert org.get(f"{API}/campaigns/{c['id']}").json()["strategy_id"] == inactive


def test_pause_cancels_the_campaigns_pending_items_with_a_log_entry_each(org, db, clock):
    sid = _strategy(org)
    c = _campaign(org, strategy_id=sid)
    other = _campaign(org, "Other", strategy_id=sid)
    now = clock.now()
    with db.transaction() as s:
        a1 = _add_account(s, org.id, now, "A1", campaign_id=c["id"])
        a2 = _add_account(s, org.id, now, "A2", campaign_id=c["id"])
        b1 = _add_account(s, org.id, now, "B1", campaign_id=other["id"])
        p1 = _queue_item(s, org.id, now, a1, campaign_id=c["id"], stage=0)
        p2 = _queue_item(s, org.id, now, a2, campaign_id=c["id"], stage=2)
        busy = _queue_item(s, org.id, now, a1, campaign_id=c["id"], status=QueueStatus.processing, stage=1)
        theirs = _queue_item(s, org.id, now, b1, campaign_id=other["id"])
    for cc in (c, other):
        assert org.post(f"{API}/campaigns/{cc['id']}/activate").status_code == 200
    clock.advance(minutes=10)
    assert org.post(f"{API}/campaigns/{c['id']}/pause", role="manager").json()["status"] == "paused"

    with db.transaction() as s:
        items = {q.id: q for q in s.scalars(select(QueueItem))}
        for qid in (p1, p2):
            assert items[qid].status == QueueStatus.cancelled and items[qid].reason == "campaign_paused"
            assert items[qid].finished_at == clock.now() and items[qid].updated_at == clock.now()
        assert items[busy].status == QueueStatus.processing and items[theirs].status == QueueStatus.pending
        log = s.scalars(select(ExecutionLogEntry).order_by(ExecutionLogEntry.queue_item_id)).all()
        assert [(e.queue_item_id, e.account_id, e.event, e.reason, e.stage_index) for e in log] == [
            (p1, a1, "cancelled", "campaign_paused", 0),
            (p2, a2, "cancelled", "campaign_paused", 2),
        ]
        assert log[0].at == clock.now() and log[0].details == {"campaign_id": c["id"]}


def _members(org, cid):  # type: ignore[no-untyped-def]
    r = org.get(f"{API}/campaigns/{cid}/accounts", role="viewer", params={"limit": 500})
    assert r.status_code == 200, r.text
    return sorted(a["external_id"] for a in r.json()["items"])


def test_membership_by_ids_external_ids_and_filter(org, db, clock):
    c = _campaign(org)
    cid = c["id"]
    sid = _strategy(org)  # A1 and A2 got it from triggers, not from the campaign: it stays when they leave
    now = clock.now()
    today = now.date()
    with db.transaction() as s:
        ids = {
            "A1": _add_account(
                s,
                org.id,
                now,
                "A1",
                status=AccountStatus.in_auto_management,
                collection_tab=CollectionTab.engaged,
                strategy_id=sid,
                balance=Decimal(500),
                carrying_due_date=today - timedelta(days=40),
                tags=["vip"],
                score=80,
            ),
            "A2": _add_account(
                s,
                org.id,
                now,
                "A2",
                status=AccountStatus.pending_contact,
                collection_tab=CollectionTab.scheduled,
                strategy_id=sid,
                balance=Decimal(50),
                carrying_due_date=today - timedelta(days=5),
            ),
            "A3": _add_account(
                s,
                org.id,
                now,
                "A3",
                collection_tab=CollectionTab.outstanding,
                balance=Decimal(1000),
                carrying_due_date=today - timedelta(days=30),
                tags=["vip", "big"],
            ),
            "A4": _add_account(s, org.id, now, "A4", status=AccountStatus.resolved, balance=Decimal(0)),
        }

    r = org.post(
        f"{API}/campaigns/{cid}/accounts",
        role="manager",
        json={"account_ids": [ids["A1"], ids["A2"], ids["A1"]]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "campaign_id": cid,
        "added": 2,
        "moved": 0,
        "already_members": 0,
        "removed": 0,
        "total_accounts": 2,
    }
    again = org.post(f"{API}/campaigns/{cid}/accounts", json={"external_ids": ["A2", "A3"]}).json()
    assert (again["added"], again["already_members"], again["total_accounts"]) == (1, 1, 3)
    assert _members(org, cid) == ["A1", "A2", "A3"]
    page = org.get(f"{API}/campaigns/{cid}/accounts").json()["items"]
    a1 = next(a for a in page if a["external_id"] == "A1")
    assert a1 == {
        "id": ids["A1"],
        "external_id": "A1",
        "name": "Debtor A1",
        "score": 80,
        "status": "in_auto_management",
        "balance": "500.00",
        "currency": "EUR",
        "last_interaction_at": None,
        "campaign_joined_at": a1["campaign_joined_at"],
    }
    assert a1["campaign_joined_at"].startswith("2026-03-02T09:00")

    # Removing: non-members refused (nothing changes), members removed.
    r = org.request("DELETE", f"{API}/campaigns/{cid}/accounts", json={"account_ids": [ids["A1"], ids["A4"]]})
    assert (
        r.status_code == 422
        and _fields(r) == ["account_ids"]
        and str(ids["A4"]) in r.json()["error"]["message"]
    )
    assert _members(org, cid) == ["A1", "A2", "A3"]
    r = org.request(
        "DELETE",
        f"{API}/campaigns/{cid}/accounts",
        role="manager",
        json={"account_ids": list(ids.values())[:3]},
    )
    assert r.status_code == 200 and r.json()["removed"] == 3 and r.json()["total_accounts"] == 0
    with db.transaction() as s:
        assert (
            s.scalars(select(Account.campaign_joined_at).where(Account.campaign_joined_at.is_not(None))).all()
            == []
        )

    filters = [
        ({"status": "pending_contact"}, ["A2"]),
        ({"collection_tab": "engaged"}, ["A1"]),
        ({"tag": "vip"}, ["A1", "A3"]),
        ({"min_balance": "100"}, ["A1", "A3"]),
        ({"max_balance": 60}, ["A2", "A4"]),
        ({"min_balance": "50", "max_balance": "500"}, ["A1", "A2"]),
        ({"min_days_overdue": 30}, ["A1", "A3"]),
        ({"min_days_overdue": 31}, ["A1"]),
        ({"tag": "vip", "max_balance": "600"}, ["A1"]),
        ({"tag": "nobody"}, []),
    ]
    for flt, expected in filters:
        r = org.post(f"{API}/campaigns/{cid}/accounts", json={"filter": flt})
        assert r.status_code == 200, (flt, r.text)
        assert r.json()["added"] == len(expected) and _members(org, cid) == expected, flt
        if expected:
            org.request(
                "DELETE", f"{API}/campaigns/{cid}/accounts", json={"account_ids": [ids[e] for e in expected]}
            )


def test_membership_bad_requests_change_nothing(org, other_org, db, clock):
    c = _campaign(org)
    cid = c["id"]
    now = clock.now()
    with db.transaction() as s:
        mine = _add_account(s, org.id, now, "A1")
        theirs = _add_account(s, other_org.id, now, "T1")
    bad = [
        ({}, "account_ids"),
        ({"account_ids": [mine], "external_ids": ["A1"]}, "external_ids"),
        ({"account_ids": []}, "account_ids"),
        ({"account_ids": [mine, theirs, 999999]}, "account_ids"),
        ({"external_ids": ["A1", "T1", "NOPE"]}, "external_ids"),
        ({"filter": {}}, "filter"),
        ({"filter": {"min_balance": "10", "max_balance": "5"}}, "filter.max_balance"),
        ({"filter": {"min_balance": "abc"}}, "filter.min_balance"),
        ({"filter": {"status": "sleeping"}}, "filter.status"),
        ({"filter": {"balance": 5}}, "filter.balance"),
        ({"account_ids": ["x"]}, "account_ids[0]"),
        ({"account_ids": [mine], "everyone": True}, "everyone"),
    ]
    for body, field in bad:
        r = org.post(f"{API}/campaigns/{cid}/accounts", json=body)
        assert r.status_code == 422 and field in _fields(r), (body, r.text)
    r = org.post(f"{API}/campaigns/{cid}/accounts", json={"external_ids": ["A1", "T1", "NOPE"]})
    assert "T1, NOPE" in r.json()["error"]["message"]
    r = org.post(f"{API}/campaigns/{cid}/accounts", json={"account_ids": [mine, theirs]})
    assert str(theirs) in r.json()["error"]["message"]
    assert _members(org, cid) == []
    r = org.request("DELETE", f"{API}/campaigns/{cid}/accounts", json={"account_ids": []})
    assert r.status_code == 422 and _fields(r) == ["account_ids"]

    assert org.post(f"{API}/campaigns/{cid}/accounts", json={"account_ids": [mine]}).json()["added"] == 1
    sid = _strategy(org)
    org.patch(f"{API}/campaigns/{cid}", json={"strategy_id": sid})
    org.post(f"{API}/campaigns/{cid}/activate")
    org.post(f"{API}/campaigns/{cid}/complete")
    r = org.post(f"{API}/campaigns/{cid}/accounts", json={"account_ids": [mine]})
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_an_account_is_in_one_campaign_at_most_unless_moved(org, db, clock):
    sid = _strategy(org)
    other_sid = _strategy(org, "Other strategy")
    first = _campaign(org, "First", strategy_id=sid)
    second = _campaign(org, "Second", strategy_id=sid)
    now = clock.now()
    with db.transaction() as s:
        # A1's strategy came from the first campaign; A2 has a strategy of its own; A3 is in no campaign.
        a1 = _add_account(
            s,
            org.id,
            now,
            "A1",
            campaign_id=first["id"],
            campaign_joined_at=now,
            strategy_id=sid,
            status=AccountStatus.in_auto_management,
            case_next_stage=0,
            collection_tab=CollectionTab.engaged,
        )
        a2 = _add_account(
            s,
            org.id,
            now,
            "A2",
            campaign_id=first["id"],
            campaign_joined_at=now,
            strategy_id=other_sid,
            status=AccountStatus.in_auto_management,
            collection_tab=CollectionTab.engaged,
        )
        a3 = _add_account(s, org.id, now, "A3")
        q1 = _queue_item(s, org.id, now, a1, campaign_id=first["id"], strategy_id=sid)
        q2 = _queue_item(s, org.id, now, a2, campaign_id=first["id"], strategy_id=other_sid)

    r = org.post(f"{API}/campaigns/{second['id']}/accounts", json={"account_ids": [a1, a2, a3]})
    assert r.status_code == 409
    assert set(_fields(r)) == {"account_ids", "move"}
    assert "2 accounts are already in another campaign" in r.json()["error"]["message"]
    assert "A1 (in 'First')" in r.json()["error"]["message"]
    assert _members(org, first["id"]) == ["A1", "A2"] and _members(org, second["id"]) == []

    clock.advance(hours=1)
    r = org.post(f"{API}/campaigns/{second['id']}/accounts", json={"account_ids": [a1, a2, a3], "move": True})
    assert r.status_code == 200, r.text
    assert (r.json()["added"], r.json()["moved"], r.json()["total_accounts"]) == (3, 2, 3)
    assert _members(org, first["id"]) == [] and _members(org, second["id"]) == ["A1", "A2", "A3"]
    with db.transaction() as s:
        acc = {a.external_id: a for a in s.scalars(select(Account))}
        # The strategy A1 had from its old campaign is gone: unassigned, back in the Outstanding tab.
        assert (acc["A1"].strategy_id, acc["A1"].status, acc["A1"].case_next_stage) == (
            None,
            AccountStatus.unassigned,
            None,
        )
        assert acc["A1"].collection_tab == CollectionTab.outstanding
        assert (acc["A2"].strategy_id, acc["A2"].status) == (other_sid, AccountStatus.in_auto_management)
        assert acc["A1"].campaign_joined_at == clock.now()
        items = {q.id: q for q in s.scalars(select(QueueItem))}
        assert (items[q1].status, items[q1].reason) == (QueueStatus.cancelled, "campaign_moved")
        assert (items[q2].status, items[q2].reason) == (QueueStatus.cancelled, "campaign_moved")
        events = sorted((e.account_id, e.event, e.reason) for e in s.scalars(select(ExecutionLogEntry)))
        assert events == sorted(
            [
                (a1, "cancelled", "campaign_moved"),
                (a2, "cancelled", "campaign_moved"),
                (a1, "unassigned", "campaign_moved"),
            ]
        )


def test_delete_unassigns_accounts_and_cancels_their_pending_items(org, db, clock):
    sid = _strategy(org)
    other_sid = _strategy(org, "Other strategy")
    c = _campaign(org, strategy_id=sid)
    cid = c["id"]
    keep = _campaign(org, "Keep", strategy_id=sid)
    now = clock.now()
    with db.transaction() as s:
        m1 = _add_account(
            s,
            org.id,
            now,
            "M1",
            campaign_id=cid,
            campaign_joined_at=now,
            strategy_id=sid,
            status=AccountStatus.promise_pending,
            case_next_stage=1,
            collection_tab=CollectionTab.engaged,
        )
        _add_account(
            s,
            org.id,
            now,
            "M2",
            campaign_id=cid,
            campaign_joined_at=now,
            strategy_id=sid,
            status=AccountStatus.resolved,
            balance=Decimal(0),
            gross_open=Decimal(0),
        )
        m3 = _add_account(
            s,
            org.id,
            now,
            "M3",
            campaign_id=cid,
            campaign_joined_at=now,
            strategy_id=other_sid,
            status=AccountStatus.in_auto_management,
            collection_tab=CollectionTab.engaged,
        )
        n1 = _add_account(s, org.id, now, "N1", strategy_id=sid, status=AccountStatus.in_auto_management)
        k1 = _add_account(
            s,
            org.id,
            now,
            "K1",
            campaign_id=keep["id"],
            campaign_joined_at=now,
            strategy_id=sid,
            status=AccountStatus.in_auto_management,
        )
        q_m1 = _queue_item(s, org.id, now, m1, campaign_id=cid, strategy_id=sid)
        q_m1_done = _queue_item(
            s, org.id, now, m1, campaign_id=cid, strategy_id=sid, status=QueueStatus.completed, stage=0
        )
        q_m3 = _queue_item(s, org.id, now, m3, strategy_id=other_sid)
        q_n1 = _queue_item(s, org.id, now, n1, campaign_id=cid, strategy_id=sid)  # left the campaign earlier
        q_k1 = _queue_item(s, org.id, now, k1, campaign_id=keep["id"], strategy_id=sid)
    assert org.post(f"{API}/campaigns/{cid}/activate").status_code == 200
    clock.advance(hours=3)

    assert org.delete(f"{API}/campaigns/{cid}", role="manager").status_code == 204
    assert org.get(f"{API}/campaigns/{cid}").status_code == 404
    with db.transaction() as s:
        acc = {a.external_id: a for a in s.scalars(select(Account))}
        assert all(
            acc[x].campaign_id is None and acc[x].campaign_joined_at is None for x in ("M1", "M2", "M3")
        )
        assert (acc["M1"].strategy_id, acc["M1"].status, acc["M1"].case_next_stage) == (
            None,
            AccountStatus.unassigned,
            None,
        )
        assert acc["M1"].collection_tab == CollectionTab.outstanding and acc["M1"].updated_at == clock.now()
        assert (acc["M2"].strategy_id, acc["M2"].status) == (None, AccountStatus.resolved)
        assert (acc["M3"].strategy_id, acc["M3"].status) == (other_sid, AccountStatus.in_auto_management)
        assert (acc["N1"].strategy_id, acc["N1"].status) == (sid, AccountStatus.in_auto_management)
        assert (acc["K1"].campaign_id, acc["K1"].strategy_id) == (keep["id"], sid)
        items = {q.id: q for q in s.scalars(select(QueueItem))}
        for qid in (q_m1, q_m3, q_n1):
            assert (items[qid].status, items[qid].reason, items[qid].finished_at) == (
                QueueStatus.cancelled,
                "campaign_deleted",
                clock.now(),
            )
        assert items[q_m1_done].status == QueueStatus.completed and items[q_k1].status == QueueStatus.pending
        assert items[q_m1].campaign_id is None  # the campaign row is gone
        events = sorted(
            (e.account_id, e.event, e.queue_item_id) for e in s.scalars(select(ExecutionLogEntry))
        )
        assert events == sorted(
            [
                (m1, "cancelled", q_m1),
                (m3, "cancelled", q_m3),
                (n1, "cancelled", q_n1),
                (m1, "unassigned", None),
            ]
        )
        actions = s.scalars(
            select(AuditEntry.action)
            .where(AuditEntry.entity_type == "campaign", AuditEntry.entity_id == cid)
            .order_by(AuditEntry.id)
        ).all()
        assert actions == ["created", "status_changed", "deleted"]


def test_kpis(org, db, clock):
    c = _campaign(org)
    cid = c["id"]
    empty = org.get(f"{API}/campaigns/{cid}/kpis", role="viewer").json()
    assert empty == {
        "campaign_id": cid,
        "total_accounts": 0,
        "contacted": 0,
        "promises": 0,
        "recovered_amount": "0.00",
        "currency": "EUR",
        "recovered_by_currency": {},
        "contact_rate": 0.0,
        "progress_percent": 0.0,
    }
    other = _campaign(org, "Other")
    now = clock.now()
    joined = now - timedelta(days=10)
    with db.transaction() as s:
        m1 = _add_account(s, org.id, now, "M1", campaign_id=cid, campaign_joined_at=joined)
        m2 = _add_account(s, org.id, now, "M2", campaign_id=cid, campaign_joined_at=joined, currency="USD")
        m3 = _add_account(s, org.id, now, "M3", campaign_id=cid, campaign_joined_at=now - timedelta(days=1))
        n1 = _add_account(s, org.id, now, "N1", campaign_id=other["id"], campaign_joined_at=joined)

        def interaction(account_id, campaign_id=cid, direction=Direction.outbound, channel=ActionType.email,  # type: ignore[no-untyped-def]
                        status=InteractionStatus.sent):
            s.add(
                Interaction(
                    organization_id=org.id,
                    account_id=account_id,
                    campaign_id=campaign_id,
                    channel=channel,
                    direction=direction,
                    status=status,
                    occurred_at=now - timedelta(days=1),
                    created_at=now,
                )
            )

        interaction(m1)
        interaction(m1)
        interaction(m2, direction=Direction.inbound)
        interaction(m3, campaign_id=None)
        interaction(n1)  # in another campaign now
        # Not contacts: a call task just opened for an agent, a stop flag set.
        interaction(m2, channel=ActionType.phone_call, status=InteractionStatus.queued)
        interaction(m3, channel=ActionType.place_on_stop, status=InteractionStatus.completed)

        def promise(account_id, days_ago):  # type: ignore[no-untyped-def]
            s.add(
                Promise(
                    organization_id=org.id,
                    account_id=account_id,
                    amount=Decimal(50),
                    currency="EUR",
                    promised_date=now.date() + timedelta(days=3),
                    source=PromiseSource.agent,
                    created_at=now - timedelta(days=days_ago),
                )
            )

        promise(m1, 5)
        promise(m1, 20)  # before joining
        promise(m3, 2)  # before joining (joined yesterday)
        promise(n1, 1)

        def payment(account_id, amount, paid_on, currency="EUR"):  # type: ignore[no-untyped-def]
            s.add(
                Payment(
                    organization_id=org.id,
                    account_id=account_id,
                    external_id=f"P{account_id}-{paid_on}-{amount}",
                    amount=Decimal(amount),
                    currency=currency,
                    paid_on=paid_on,
                    source=PaymentSource.api,
                    created_at=now,
                )
            )

        payment(m1, "100.50", joined.date())  # the day it joined counts
        payment(m1, "40", joined.date() - timedelta(days=1))
        payment(m2, "20", now.date(), currency="USD")
        payment(m3, "7.25", now.date())
        payment(n1, "999", now.date())

    k = org.get(f"{API}/campaigns/{cid}/kpis").json()
    assert k == {
        "campaign_id": cid,
        "total_accounts": 3,
        "contacted": 1,
        "promises": 1,
        "recovered_amount": "107.75",
        "currency": "EUR",
        "recovered_by_currency": {"EUR": "107.75", "USD": "20.00"},
        "contact_rate": 0.3333,
        "progress_percent": 33.3,
    }
    # The list page asks for many campaigns at once: the same figures, one grouped query per KPI.
    from duecourse.campaigns import service as campaign_service

    with db.transaction() as s:
        both = campaign_service.kpis_for(s, organization_id=org.id, campaign_ids=[cid, other["id"]])
        for campaign_id in (cid, other["id"]):
            assert both[campaign_id] == campaign_service.kpis(s, organization_id=org.id, campaign_id=campaign_id)
    assert (both[other["id"]]["total_accounts"], both[other["id"]]["promises"]) == (1, 1)
    assert str(both[other["id"]]["recovered_amount"]) == "999.0000"


@pytest.mark.parametrize("role", ["viewer", "agent"])
def test_only_managers_and_admins_change_campaigns(org, db, clock, role):
    sid = _strategy(org)
    c = _campaign(org, strategy_id=sid)
    cid = c["id"]
    with db.transaction() as s:
        acc = _add_account(s, org.id, clock.now(), "A1")
    calls = [
        org.post(f"{API}/campaigns", role=role, json={"name": "Mine"}),
        org.put(f"{API}/campaigns/{cid}", role=role, json={"name": "Mine"}),
        org.patch(f"{API}/campaigns/{cid}", role=role, json={"name": "Mine"}),
        org.post(f"{API}/campaigns/{cid}/activate", role=role),
        org.post(f"{API}/campaigns/{cid}/pause", role=role),
        org.post(f"{API}/campaigns/{cid}/complete", role=role),
        org.post(f"{API}/campaigns/{cid}/accounts", role=role, json={"account_ids": [acc]}),
        org.request("DELETE", f"{API}/campaigns/{cid}/accounts", role=role, json={"account_ids": [acc]}),
        org.delete(f"{API}/campaigns/{cid}", role=role),
    ]
    assert [r.status_code for r in calls] == [403] * len(calls)
    assert org.get(f"{API}/campaigns/{cid}", role=role).json() == c
    assert _members(org, cid) == []
    assert org.get(f"{API}/campaigns/{cid}/kpis", role=role).status_code == 200
    # A manager may.
    assert org.post(f"{API}/campaigns/{cid}/activate", role="manager").status_code == 200
    assert org.post(f"{API}/campaigns", role="manager", json={"name": "Theirs"}).status_code == 201


def test_other_organizations_campaigns_are_404(org, other_org, db, clock):
    sid = _strategy(org)
    c = _campaign(org, strategy_id=sid)
    cid = c["id"]
    with db.transaction() as s:
        acc = _add_account(s, org.id, clock.now(), "A1", campaign_id=cid, campaign_joined_at=clock.now())
        their_acc = _add_account(s, other_org.id, clock.now(), "T1")
    calls = [
        other_org.get(f"{API}/campaigns/{cid}"),
        other_org.put(f"{API}/campaigns/{cid}", json={"name": "Taken"}),
        other_org.patch(f"{API}/campaigns/{cid}", json={"name": "Taken"}),
        other_org.delete(f"{API}/campaigns/{cid}"),
        other_org.post(f"{API}/campaigns/{cid}/activate"),
        other_org.post(f"{API}/campaigns/{cid}/pause"),
        other_org.post(f"{API}/campaigns/{cid}/complete"),
        other_org.get(f"{API}/campaigns/{cid}/accounts"),
        other_org.post(f"{API}/campaigns/{cid}/accounts", json={"account_ids": [their_acc]}),
        other_org.request("DELETE", f"{API}/campaigns/{cid}/accounts", json={"account_ids": [acc]}),
        other_org.get(f"{API}/campaigns/{cid}/kpis"),
        other_org.get(f"{API}/campaigns/{cid}/audit-log"),
    ]
    assert [r.status_code for r in calls] == [404] * len(calls)
    assert other_org.get(f"{API}/campaigns").json()["items"] == []
    assert org.get(f"{API}/campaigns/{cid}").json() == c
    assert _members(org, cid) == ["A1"]
    # Their campaign cannot take our accounts or our strategy.
    theirs = _campaign(other_org, "Theirs")
    r = other_org.post(f"{API}/campaigns/{theirs['id']}/accounts", json={"account_ids": [acc]})
    assert r.status_code == 422 and _fields(r) == ["account_ids"]
    r = other_org.patch(f"{API}/campaigns/{theirs['id']}", json={"strategy_id": sid})
    assert r.status_code == 422 and _fields(r) == ["strategy_id"]
