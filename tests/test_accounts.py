"""Accounts API (SPEC §2, §6): fields and their validation, flags, lists, tabs, scope and roles."""

from __future__ import annotations

from datetime import timedelta

from ledger_helpers import account, all_pages, error_fields, make_account, make_invoice, make_payment

from duecourse.engine.models import Direction, ExecutionLogEntry, Interaction, InteractionStatus
from duecourse.strategies.models import ActionType

API = "/api/v1"


def _all_accounts(org):
    return org.get(f"{API}/accounts", params={"limit": 500}).json()["items"]


def test_create_with_every_field_and_read_back(org):
    body = {
        "external_id": "CUST-1",
        "name": "Talleres Pérez",
        "email": "pagos@talleres.example.com",
        "phone": "+34 600 12 34 56",
        "whatsapp": "whatsapp:+34600654321",
        "timezone": "America/Mexico_City",
        "language": "es-MX",
        "currency": "usd",
        "score": 73,
        "tags": ["vip", " retail ", "vip"],
        "opt_out_email": True,
        "opt_out_sms": False,
        "opt_out_whatsapp": True,
        "opt_out_voice": True,
        "blocked": True,
        "blocked_reason": "legal hold",
        "paused": True,
        "on_stop": True,
    }
    r = org.post(f"{API}/accounts", json=body)
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["phone"] == "+34600123456" and a["whatsapp"] == "+34600654321"
    assert a["timezone"] == "America/Mexico_City" and a["timezone_is_default"] is False
    assert a["currency"] == "USD" and a["score"] == 73 and a["language"] == "es-MX"
    assert a["tags"] == ["retail", "vip"]
    assert (a["opt_out_email"], a["opt_out_sms"], a["opt_out_whatsapp"], a["opt_out_voice"]) == (True, False, True, True)
    assert (a["blocked"], a["blocked_reason"], a["paused"], a["on_stop"]) == (True, "legal hold", True, True)
    assert a["balance"] == "0.00" and a["gross_open"] == "0.00" and a["collection_tab"] is None
    assert a["created_at"] == a["updated_at"] == "2026-03-02T09:00:00Z"
    assert account(org, a["id"]) == a


def test_defaults_come_from_the_organization(make_org):
    org = make_org(timezone="Asia/Tokyo", currency="JPY")
    a = make_account(org)
    assert a["timezone"] == "Asia/Tokyo" and a["timezone_is_default"] is True
    assert a["currency"] == "JPY"
    assert a["tags"] == [] and a["blocked"] is False and a["score"] is None
    # The account follows its organization's zone (NULL stored), until it gets its own.
    assert org.patch(f"{API}/organization", json={"timezone": "Europe/Lisbon"}).status_code == 200
    assert account(org, a["id"])["timezone"] == "Europe/Lisbon"
    # The change is audited like a settings change; a refused one changes and records nothing.
    audit = org.get(f"{API}/audit-log", params={"entity_type": "organization"}).json()["items"]
    assert [(e["action"], e["field"], e["old_value"], e["new_value"]) for e in audit] == [
        ("updated", "timezone", "Asia/Tokyo", "Europe/Lisbon")]
    assert org.patch(f"{API}/organization", json={"timezone": None}).status_code == 422
    assert len(org.get(f"{API}/audit-log", params={"entity_type": "organization"}).json()["items"]) == 1
    assert org.patch(f"{API}/accounts/{a['id']}", json={"timezone": "Asia/Tokyo"}).json()["timezone_is_default"] is False
    reset = org.patch(f"{API}/accounts/{a['id']}", json={"timezone": None}).json()
    assert reset["timezone"] == "Europe/Lisbon" and reset["timezone_is_default"] is True


def test_every_create_rule_names_its_field_and_creates_nothing(org):
    good = {"external_id": "X-1", "name": "Someone"}
    cases = [
        ({"name": "No id"}, "external_id"),
        ({**good, "external_id": ""}, "external_id"),
        ({**good, "external_id": "x" * 101}, "external_id"),
        ({"external_id": "X-1"}, "name"),
        ({**good, "name": ""}, "name"),
        ({**good, "email": "not-an-email"}, "email"),
        ({**good, "phone": "12345"}, "phone"),
        ({**good, "phone": "+34 123"}, "phone"),
        ({**good, "whatsapp": "call me"}, "whatsapp"),
        ({**good, "timezone": "Mars/Olympus"}, "timezone"),
        ({**good, "language": "klingon"}, "language"),
        ({**good, "currency": "EURO"}, "currency"),
        ({**good, "currency": "XYZ"}, "currency"),
        ({**good, "score": 101}, "score"),
        ({**good, "score": -1}, "score"),
        ({**good, "tags": ["ok", ""]}, "tags"),
        ({**good, "tags": ["t" * 65]}, "tags"),
        ({**good, "tags": "vip"}, "tags"),
        ({**good, "blocked": True}, "blocked_reason"),
        ({**good, "blocked_reason": "no block"}, "blocked_reason"),
        ({**good, "opt_out_sms": "sometimes"}, "opt_out_sms"),
        # engine-owned and derived fields are not writable
        ({**good, "status": "resolved"}, "status"),
        ({**good, "strategy_id": 1}, "strategy_id"),
        ({**good, "case_next_stage": 2}, "case_next_stage"),
        ({**good, "balance": "10"}, "balance"),
        ({**good, "collection_tab": "engaged"}, "collection_tab"),
        ({**good, "colour": "blue"}, "colour"),
    ]
    for body, field in cases:
        r = org.post(f"{API}/accounts", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "validation_error"
        assert any(f == field or f.startswith((field + "[", field + ".")) for f in error_fields(r)), (
            body,
            error_fields(r),
        )
    assert _all_accounts(org) == []


def test_external_id_is_unique_per_organization(org, other_org):
    a = make_account(org, external_id="DUP-1")
    r = org.post(f"{API}/accounts", json={"external_id": "DUP-1", "name": "Again"})
    assert r.status_code == 409 and error_fields(r) == {"external_id"}
    assert len(_all_accounts(org)) == 1
    # another organization may use the same external id
    assert other_org.post(f"{API}/accounts", json={"external_id": "DUP-1", "name": "Mine"}).status_code == 201
    b = make_account(org, external_id="DUP-2")
    r = org.patch(f"{API}/accounts/{b['id']}", json={"external_id": "DUP-1"})
    assert r.status_code == 409 and error_fields(r) == {"external_id"}
    assert account(org, b["id"])["external_id"] == "DUP-2"
    # keeping one's own external id is fine
    assert org.patch(f"{API}/accounts/{a['id']}", json={"external_id": "DUP-1", "name": "Renamed"}).status_code == 200


def test_patch_changes_clears_and_refuses(org, clock):
    a = make_account(org, email="a@example.com", score=10, language="es", tags=["x"])
    clock.advance(hours=1)
    r = org.patch(
        f"{API}/accounts/{a['id']}",
        json={"name": "New name", "email": None, "score": None, "phone": "+1 415 555 2671", "tags": ["y", "z"], "paused": True},
    )
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["name"] == "New name" and b["email"] is None and b["score"] is None and b["paused"] is True
    assert b["phone"] == "+14155552671" and b["tags"] == ["y", "z"]
    assert b["language"] == "es"  # untouched
    assert b["updated_at"] == "2026-03-02T10:00:00Z" and b["created_at"] == "2026-03-02T09:00:00Z"

    before = account(org, a["id"])
    refused = [
        ({"name": None}, "name"),
        ({"external_id": None}, "external_id"),
        ({"blocked": None}, "blocked"),
        ({"tags": None}, "tags"),
        ({"currency": None}, "currency"),
        ({"score": 500}, "score"),
        ({"phone": "0"}, "phone"),
        ({"email": "@@"}, "email"),
        ({"timezone": "Nowhere"}, "timezone"),
        ({"status": "in_auto_management"}, "status"),
        ({"strategy_id": 3}, "strategy_id"),
        ({"campaign_id": 3}, "campaign_id"),
        ({"case_anchor_date": "2026-01-01"}, "case_anchor_date"),
        ({"balance": "0"}, "balance"),
        ({"days_overdue": 3}, "days_overdue"),
    ]
    for body, field in refused:
        r = org.patch(f"{API}/accounts/{a['id']}", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in error_fields(r), (body, error_fields(r))
    assert account(org, a["id"]) == before


def test_currency_can_change_only_without_money(org):
    a = make_account(org)
    assert org.patch(f"{API}/accounts/{a['id']}", json={"currency": "GBP"}).json()["currency"] == "GBP"
    make_invoice(org, a["id"], "10.00")
    r = org.patch(f"{API}/accounts/{a['id']}", json={"currency": "EUR"})
    assert r.status_code == 422 and error_fields(r) == {"currency"}
    assert account(org, a["id"])["currency"] == "GBP"


def test_block_and_unblock(org):
    a = make_account(org)
    make_invoice(org, a["id"], "40.00")
    assert account(org, a["id"])["collection_tab"] == "outstanding"

    r = org.post(f"{API}/accounts/{a['id']}/block", json={})
    assert r.status_code == 422 and error_fields(r) == {"reason"}
    r = org.post(f"{API}/accounts/{a['id']}/block", json={"reason": ""})
    assert r.status_code == 422 and error_fields(r) == {"reason"}
    r = org.patch(f"{API}/accounts/{a['id']}", json={"blocked": True})
    assert r.status_code == 422 and error_fields(r) == {"blocked_reason"}
    assert account(org, a["id"])["blocked"] is False

    b = org.post(f"{API}/accounts/{a['id']}/block", json={"reason": "customer in insolvency"}).json()
    assert b["blocked"] is True and b["blocked_reason"] == "customer in insolvency" and b["collection_tab"] == "blocked"
    # the reason cannot be removed while blocked
    r = org.patch(f"{API}/accounts/{a['id']}", json={"blocked_reason": None})
    assert r.status_code == 422 and error_fields(r) == {"blocked_reason"}

    u = org.post(f"{API}/accounts/{a['id']}/unblock").json()
    assert u["blocked"] is False and u["blocked_reason"] is None and u["collection_tab"] == "outstanding"
    assert org.get(f"{API}/auto-collection/tabs").json()["blocked"] == 0


def test_delete_account_deletes_its_invoices_payments_and_promises(org):
    a = make_account(org)
    keep = make_account(org)
    inv = make_invoice(org, a["id"], "100.00")
    kept_inv = make_invoice(org, keep["id"], "10.00")
    pay = make_payment(org, a["id"], "30.00")
    prom = org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "70", "promised_date": "2026-03-10"}).json()
    assert org.delete(f"{API}/accounts/{a['id']}").status_code == 204
    assert org.get(f"{API}/accounts/{a['id']}").status_code == 404
    assert org.get(f"{API}/invoices/{inv['id']}").status_code == 404
    assert org.get(f"{API}/payments/{pay['id']}").status_code == 404
    assert org.get(f"{API}/promises/{prom['id']}").status_code == 404
    assert org.get(f"{API}/invoices/{kept_inv['id']}").status_code == 200
    assert org.get(f"{API}/auto-collection/tabs").json()["outstanding"] == 1
    assert org.delete(f"{API}/accounts/{a['id']}").status_code == 404


def test_another_organizations_account_is_not_found_everywhere(org, other_org):
    a = make_account(org)
    make_invoice(org, a["id"], "10.00")
    base = f"{API}/accounts/{a['id']}"
    assert other_org.get(base).status_code == 404
    assert other_org.patch(base, json={"name": "hijack"}).status_code == 404
    assert other_org.post(f"{base}/block", json={"reason": "x"}).status_code == 404
    assert other_org.post(f"{base}/unblock").status_code == 404
    assert other_org.get(f"{base}/execution-log").status_code == 404
    assert other_org.get(f"{base}/interactions").status_code == 404
    assert other_org.delete(base).status_code == 404
    assert other_org.get(f"{API}/accounts").json()["items"] == []
    assert other_org.get(f"{API}/auto-collection/tabs").json()["outstanding"] == 0
    r = other_org.get(f"{API}/accounts/{a['id']}")
    assert r.json()["error"]["code"] == "not_found"
    after = account(org, a["id"])
    assert after["name"] == a["name"] and after["blocked"] is False


def test_roles(org, client):
    a = make_account(org)
    for role in ("viewer", "agent"):
        assert org.post(f"{API}/accounts", role=role, json={"external_id": f"R-{role}", "name": "n"}).status_code == 403
        assert org.patch(f"{API}/accounts/{a['id']}", role=role, json={"name": "n"}).status_code == 403
        assert org.post(f"{API}/accounts/{a['id']}/block", role=role, json={"reason": "r"}).status_code == 403
        assert org.post(f"{API}/accounts/{a['id']}/unblock", role=role).status_code == 403
        assert org.delete(f"{API}/accounts/{a['id']}", role=role).status_code == 403
        assert org.get(f"{API}/accounts/{a['id']}", role=role).status_code == 200
        assert org.get(f"{API}/accounts", role=role).status_code == 200
        assert org.get(f"{API}/auto-collection/tabs", role=role).status_code == 200
    r = org.patch(f"{API}/accounts/{a['id']}", role="manager", json={"name": "by manager"})
    assert r.status_code == 200 and r.json()["name"] == "by manager"
    assert org.post(f"{API}/accounts", role="manager", json={"external_id": "R-m", "name": "n"}).status_code == 201
    assert client.get(f"{API}/accounts").status_code == 401
    assert client.post(f"{API}/accounts", json={"external_id": "R-x", "name": "n"}).status_code == 401
    assert client.get(f"{API}/accounts/{a['id']}").status_code == 401
    assert len(_all_accounts(org)) == 2


def test_list_filters(org, db):
    a = make_account(org, name="Alpha Foods", email="ALPHA@example.com", tags=["vip"])
    b = make_account(org, name="Beta 100% Ltd", external_id="beta_1", tags=["retail"])
    c = make_account(org, name="Gamma")
    make_invoice(org, a["id"], "500.00", due="2026-01-01")  # 60 days overdue
    make_invoice(org, b["id"], "50.00", due="2026-02-27")  # 3 days overdue
    org.post(f"{API}/accounts/{c['id']}/block", json={"reason": "r"})
    make_invoice(org, c["id"], "10.00", due="2026-03-12")  # due in 10 days

    def ids(**params):
        r = org.get(f"{API}/accounts", params=params)
        assert r.status_code == 200, r.text
        return {x["id"] for x in r.json()["items"]}

    assert ids() == {a["id"], b["id"], c["id"]}
    assert ids(collection_tab="outstanding") == {a["id"], b["id"]}
    assert ids(collection_tab="blocked") == {c["id"]}
    assert ids(collection_tab="engaged") == set()
    assert ids(status="unassigned") == {a["id"], b["id"], c["id"]}
    assert ids(status="resolved") == set()
    assert ids(tag="vip") == {a["id"]}
    assert ids(blocked="true") == {c["id"]}
    assert ids(blocked="false") == {a["id"], b["id"]}
    assert ids(min_balance="50") == {a["id"], b["id"]}
    assert ids(min_balance="50.01") == {a["id"]}
    assert ids(max_balance="50.00") == {b["id"], c["id"]}
    assert ids(min_days_overdue=3) == {a["id"], b["id"]}
    assert ids(min_days_overdue=4) == {a["id"]}
    assert ids(max_days_overdue=3) == {b["id"], c["id"]}
    assert ids(max_days_overdue=-10) == {c["id"]}
    assert ids(max_days_overdue=-11) == set()
    assert ids(q="alpha") == {a["id"]}  # name and email, any case
    assert ids(q="EXAMPLE.COM") == {a["id"]}
    assert ids(q="BETA_") == {b["id"]}  # external id; _ is not a wildcard
    assert ids(q="e_a") == set()  # would match "eta" if _ were a wildcard
    assert ids(q="100%") == {b["id"]}  # % is not a wildcard
    assert ids(q="%") == {b["id"]}
    assert ids(external_id=a["external_id"]) == {a["id"]}
    assert ids(campaign_id=1) == set() and ids(strategy_id=1) == set()
    assert ids(collection_tab="outstanding", min_days_overdue=10, tag="vip") == {a["id"]}

    r = org.get(f"{API}/accounts", params={"min_balance": "abc"})
    assert r.status_code == 422 and error_fields(r) == {"min_balance"}
    r = org.get(f"{API}/accounts", params={"collection_tab": "nowhere"})
    assert r.status_code == 422 and error_fields(r) == {"collection_tab"}
    r = org.get(f"{API}/accounts", params={"min_days_overdue": "x"})
    assert r.status_code == 422 and error_fields(r) == {"min_days_overdue"}


def test_cursor_pagination_has_no_gaps_or_duplicates(org):
    created = [make_account(org)["id"] for _ in range(7)]
    seen = all_pages(org, f"{API}/accounts", limit=3)
    assert [x["id"] for x in seen] == sorted(created)
    # an account added between pages still appears once, later
    first = org.get(f"{API}/accounts", params={"limit": 3}).json()
    late = make_account(org)["id"]
    second = org.get(f"{API}/accounts", params={"limit": 100, "cursor": first["next_cursor"]}).json()
    assert [x["id"] for x in first["items"]] + [x["id"] for x in second["items"]] == sorted([*created, late])
    assert second["next_cursor"] is None
    for bad in ("garbage", "eyJhZnRlciI6ICJ4In0", "!!!"):
        r = org.get(f"{API}/accounts", params={"cursor": bad})
        assert r.status_code == 422 and error_fields(r) == {"cursor"}
    r = org.get(f"{API}/accounts", params={"limit": 0})
    assert r.status_code == 422 and error_fields(r) == {"limit"}


def test_execution_log_and_interactions_are_read_only_newest_first(org, db, clock):
    a = make_account(org)
    b = make_account(org)
    with db.transaction() as s:
        for n in range(5):
            s.add(
                ExecutionLogEntry(
                    organization_id=org.id, account_id=a["id"], at=clock.now() + timedelta(minutes=n), event=f"e{n}"
                )
            )
            s.add(
                Interaction(
                    organization_id=org.id,
                    account_id=a["id"],
                    channel=ActionType.email,
                    direction=Direction.outbound,
                    status=InteractionStatus.sent,
                    occurred_at=clock.now() + timedelta(minutes=n),
                    created_at=clock.now(),
                    summary=f"i{n}",
                )
            )
        s.add(ExecutionLogEntry(organization_id=org.id, account_id=b["id"], at=clock.now(), event="other"))
    log = all_pages(org, f"{API}/accounts/{a['id']}/execution-log", limit=2)
    assert [e["event"] for e in log] == ["e4", "e3", "e2", "e1", "e0"]
    inter = all_pages(org, f"{API}/accounts/{a['id']}/interactions", limit=3)
    assert [i["summary"] for i in inter] == ["i4", "i3", "i2", "i1", "i0"]
    assert inter[0]["channel"] == "email" and inter[0]["promise_amount"] is None
    assert [e["event"] for e in org.get(f"{API}/accounts/{b['id']}/execution-log").json()["items"]] == ["other"]
    r = org.get(f"{API}/accounts/{a['id']}/execution-log", params={"cursor": "nope"})
    assert r.status_code == 422
    assert org.post(f"{API}/accounts/{a['id']}/execution-log", json={}).status_code == 405
    assert org.get(f"{API}/accounts/{a['id']}/execution-log", role="viewer").status_code == 200
