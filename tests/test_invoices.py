"""Invoices API (SPEC §2): fields, currency and date rules, disputes, voiding, lists, scope and roles."""

from __future__ import annotations

from ledger_helpers import account, all_pages, error_fields, invoice, make_account, make_invoice, make_payment

API = "/api/v1"


def _invoices(org, **params):
    return org.get(f"{API}/invoices", params={"limit": 500, **params}).json()["items"]


def test_create_by_account_id_or_external_id(org):
    a = make_account(org, external_id="CUST-9")
    r = org.post(
        f"{API}/invoices",
        json={
            "account_external_id": "CUST-9",
            "external_id": "ERP-1",
            "number": "F-2026-001",
            "total": 1234.5,  # a JSON number is taken at its decimal value
            "amount_paid": "200",
            "issue_date": "2026-01-15",
            "due_date": "2026-02-14",
        },
    )
    assert r.status_code == 201, r.text
    inv = r.json()
    assert inv["account_id"] == a["id"] and inv["currency"] == "EUR"
    assert (inv["total"], inv["amount_paid"], inv["unpaid"]) == ("1234.50", "200.00", "1034.50")
    assert inv["status"] == "open" and inv["disputed"] is False
    assert invoice(org, inv["id"]) == inv
    assert account(org, a["id"])["balance"] == "1034.50"

    by_id = make_invoice(org, a["id"], "0.1", currency="EUR")
    assert by_id["total"] == "0.10"
    # fully paid on arrival: paid
    assert make_invoice(org, a["id"], "10", amount_paid="10")["status"] == "paid"


def test_every_create_rule_names_its_field_and_creates_nothing(org, make_org):
    a = make_account(org)
    jpy = make_account(org, currency="JPY")
    other = make_org()
    foreign = make_account(other)
    good = {
        "account_id": a["id"],
        "external_id": "E-1",
        "number": "N-1",
        "total": "100.00",
        "issue_date": "2026-01-01",
        "due_date": "2026-01-31",
    }
    cases = [
        ({**good, "currency": "USD"}, "currency"),
        ({**good, "currency": "ZZZ"}, "currency"),
        ({**good, "due_date": "2025-12-31"}, "due_date"),
        ({**good, "amount_paid": "100.01"}, "amount_paid"),
        ({**good, "amount_paid": "-1"}, "amount_paid"),
        ({**good, "total": "-5"}, "total"),
        ({**good, "total": "1.005"}, "total"),  # EUR has 2 decimals
        ({**good, "account_id": jpy["id"], "total": "100.5"}, "total"),  # JPY has none
        ({**good, "total": "ten"}, "total"),
        ({**good, "total": True}, "total"),
        ({**good, "total": "NaN"}, "total"),
        ({**good, "total": "1e20"}, "total"),
        ({**good, "issue_date": "2026-02-30"}, "issue_date"),
        ({**good, "status": "cancelled"}, "status"),
        ({**good, "number": ""}, "number"),
        ({**good, "external_id": "x" * 101}, "external_id"),
        ({k: v for k, v in good.items() if k != "total"}, "total"),
        ({k: v for k, v in good.items() if k != "due_date"}, "due_date"),
        ({k: v for k, v in good.items() if k != "account_id"}, "account_id"),  # neither id
        ({**good, "account_external_id": "X"}, "account_external_id"),  # both ids
        ({**good, "account_id": 999999}, "account_id"),
        ({**good, "account_id": foreign["id"]}, "account_id"),  # another organization's: unknown
        ({**{k: v for k, v in good.items() if k != "account_id"}, "account_external_id": "nope"}, "account_external_id"),
        ({**good, "paid": "1"}, "paid"),
    ]
    for body, field in cases:
        r = org.post(f"{API}/invoices", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in error_fields(r), (body, error_fields(r))
    assert _invoices(org) == []
    assert account(org, a["id"])["balance"] == "0.00"
    assert make_invoice(org, jpy["id"], "1500")["total"] == "1500"


def test_external_id_unique_per_organization(org, other_org):
    a = make_account(org)
    make_invoice(org, a["id"], external_id="ERP-7")
    r = org.post(
        f"{API}/invoices",
        json={"account_id": a["id"], "external_id": "ERP-7", "number": "2", "total": "1", "issue_date": "2026-01-01", "due_date": "2026-01-01"},
    )
    assert r.status_code == 409 and error_fields(r) == {"external_id"}
    assert len(_invoices(org)) == 1
    b = make_account(other_org)
    assert make_invoice(other_org, b["id"], external_id="ERP-7")["external_id"] == "ERP-7"
    second = make_invoice(org, a["id"], external_id="ERP-8")
    r = org.patch(f"{API}/invoices/{second['id']}", json={"external_id": "ERP-7"})
    assert r.status_code == 409 and error_fields(r) == {"external_id"}
    assert invoice(org, second["id"])["external_id"] == "ERP-8"


def test_patch_rules_and_nothing_changes_on_error(org):
    a = make_account(org)
    inv = make_invoice(org, a["id"], "100.00", due="2026-02-01")
    cases = [
        ({"due_date": "2025-10-01"}, "due_date"),
        ({"issue_date": "2026-02-02"}, "due_date"),  # issue after the existing due date
        ({"amount_paid": "150"}, "amount_paid"),
        ({"total": "50", "amount_paid": "60"}, "amount_paid"),
        ({"total": "-1"}, "total"),
        ({"total": "1.001"}, "total"),
        ({"currency": "USD"}, "currency"),
        ({"total": None}, "total"),
        ({"status": None}, "status"),
        ({"status": "closed"}, "status"),
        ({"account_id": 5}, "account_id"),
    ]
    for body, field in cases:
        r = org.patch(f"{API}/invoices/{inv['id']}", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in error_fields(r), (body, error_fields(r))
    assert invoice(org, inv["id"]) == inv
    assert account(org, a["id"])["balance"] == "100.00"

    r = org.patch(f"{API}/invoices/{inv['id']}", json={"total": "120", "number": "N-X", "due_date": "2026-02-10"})
    assert r.status_code == 200
    assert (r.json()["total"], r.json()["number"], r.json()["due_date"]) == ("120.00", "N-X", "2026-02-10")
    assert account(org, a["id"])["balance"] == "120.00"
    paid = org.patch(f"{API}/invoices/{inv['id']}", json={"amount_paid": "120"}).json()
    assert paid["status"] == "paid" and account(org, a["id"])["balance"] == "0.00"
    reopened = org.patch(f"{API}/invoices/{inv['id']}", json={"total": "130"}).json()
    assert reopened["status"] == "open" and account(org, a["id"])["balance"] == "10.00"


def test_dispute_and_undispute_move_the_balance(org):
    a = make_account(org)
    i1 = make_invoice(org, a["id"], "100.00", due="2026-01-01")
    make_invoice(org, a["id"], "40.00", due="2026-02-01")
    d = org.post(f"{API}/invoices/{i1['id']}/dispute")
    assert d.status_code == 200 and d.json()["disputed"] is True
    acc = account(org, a["id"])
    assert (acc["balance"], acc["gross_open"], acc["carrying_due_date"]) == ("40.00", "140.00", "2026-02-01")
    assert org.post(f"{API}/invoices/{i1['id']}/dispute").json()["disputed"] is True  # idempotent
    u = org.post(f"{API}/invoices/{i1['id']}/undispute")
    assert u.status_code == 200 and u.json()["disputed"] is False
    acc = account(org, a["id"])
    assert (acc["balance"], acc["carrying_due_date"]) == ("140.00", "2026-01-01")


def test_void_and_delete_return_settled_money_as_credit(org):
    a = make_account(org)
    i1 = make_invoice(org, a["id"], "100.00", due="2026-01-01")
    i2 = make_invoice(org, a["id"], "60.00", due="2026-02-01")
    pay = make_payment(org, a["id"], "100.00")
    assert invoice(org, i1["id"])["status"] == "paid"

    voided = org.patch(f"{API}/invoices/{i1['id']}", json={"status": "void"}).json()
    assert voided["status"] == "void"
    # the payment's 100 moved to the next open invoice; 40 left as credit
    assert invoice(org, i2["id"])["status"] == "paid"
    p = org.get(f"{API}/payments/{pay['id']}").json()
    assert p["unallocated"] == "40.00" and p["allocations"] == [{"invoice_id": i2["id"], "amount": "60.00"}]
    assert account(org, a["id"])["balance"] == "0.00"

    i3 = make_invoice(org, a["id"], "50.00", due="2026-02-15")
    assert invoice(org, i3["id"])["amount_paid"] == "40.00"
    assert org.delete(f"{API}/invoices/{i2['id']}").status_code == 204
    assert org.get(f"{API}/invoices/{i2['id']}").status_code == 404
    # the 60 that settled i2 now settles the rest of i3; 50 remain as credit
    assert invoice(org, i3["id"])["status"] == "paid"
    assert org.get(f"{API}/payments/{pay['id']}").json()["unallocated"] == "50.00"
    acc = account(org, a["id"])
    assert acc["balance"] == "0.00" and acc["status"] == "resolved"


def test_amount_paid_cannot_drop_below_what_duecourse_payments_settled(org):
    a = make_account(org)
    i1 = make_invoice(org, a["id"], "100.00", due="2026-01-01")
    make_payment(org, a["id"], "60.00")
    assert invoice(org, i1["id"])["amount_paid"] == "60.00"
    # The ERP, which knows nothing of that payment, says nothing was paid: refused, nothing changes.
    r = org.patch(f"{API}/invoices/{i1['id']}", json={"amount_paid": "0"})
    assert r.status_code == 422 and error_fields(r) == {"amount_paid"}
    assert "at least 60.00 EUR" in r.json()["error"]["fields"][0]["message"]
    assert invoice(org, i1["id"])["amount_paid"] == "60.00" and account(org, a["id"])["balance"] == "40.00"
    # Recording what was paid outside duecourse on top of it is fine.
    assert org.patch(f"{API}/invoices/{i1['id']}", json={"amount_paid": "90.00"}).status_code == 200
    assert account(org, a["id"])["balance"] == "10.00"


def test_list_filters_and_pagination(org):
    a = make_account(org)
    b = make_account(org)
    i1 = make_invoice(org, a["id"], "10", due="2026-01-10", number="F-001")
    i2 = make_invoice(org, a["id"], "20", due="2026-02-10", number="F-002", disputed=True)
    i3 = make_invoice(org, b["id"], "30", due="2026-03-10", number="G-001", amount_paid="30")
    i4 = make_invoice(org, b["id"], "40", due="2026-04-10", number="g-100%", status="void")

    def ids(**params):
        r = org.get(f"{API}/invoices", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["items"]]

    assert ids() == [i1["id"], i2["id"], i3["id"], i4["id"]]
    assert ids(account_id=a["id"]) == [i1["id"], i2["id"]]
    assert ids(status="open") == [i1["id"], i2["id"]]
    assert ids(status="paid") == [i3["id"]]
    assert ids(status="void") == [i4["id"]]
    assert ids(disputed="true") == [i2["id"]]
    assert ids(disputed="false", account_id=a["id"]) == [i1["id"]]
    assert ids(due_before="2026-02-10") == [i1["id"]]
    assert ids(due_after="2026-02-10") == [i3["id"], i4["id"]]
    assert ids(due_after="2026-01-10", due_before="2026-03-10") == [i2["id"]]
    assert ids(q="f-00") == [i1["id"], i2["id"]]
    assert ids(q="G-") == [i3["id"], i4["id"]]
    assert ids(q="0%") == [i4["id"]]
    assert [x["id"] for x in all_pages(org, f"{API}/invoices", limit=3)] == ids()
    r = org.get(f"{API}/invoices", params={"due_before": "yesterday"})
    assert r.status_code == 422 and error_fields(r) == {"due_before"}
    r = org.get(f"{API}/invoices", params={"cursor": "xx"})
    assert r.status_code == 422 and error_fields(r) == {"cursor"}


def test_another_organizations_invoice_is_not_found_everywhere(org, other_org):
    a = make_account(org)
    inv = make_invoice(org, a["id"], "10")
    base = f"{API}/invoices/{inv['id']}"
    assert other_org.get(base).status_code == 404
    assert other_org.patch(base, json={"total": "1"}).status_code == 404
    assert other_org.post(f"{base}/dispute").status_code == 404
    assert other_org.post(f"{base}/undispute").status_code == 404
    assert other_org.delete(base).status_code == 404
    assert other_org.get(f"{API}/invoices").json()["items"] == []
    assert other_org.get(f"{API}/invoices", params={"account_id": a["id"]}).json()["items"] == []
    assert invoice(org, inv["id"]) == inv


def test_roles(org, client):
    a = make_account(org)
    inv = make_invoice(org, a["id"], "10")
    body = {"account_id": a["id"], "external_id": "R1", "number": "1", "total": "1", "issue_date": "2026-01-01", "due_date": "2026-01-01"}
    for role in ("viewer", "agent"):
        assert org.post(f"{API}/invoices", role=role, json=body).status_code == 403
        assert org.patch(f"{API}/invoices/{inv['id']}", role=role, json={"total": "1"}).status_code == 403
        assert org.post(f"{API}/invoices/{inv['id']}/dispute", role=role).status_code == 403
        assert org.post(f"{API}/invoices/{inv['id']}/undispute", role=role).status_code == 403
        assert org.delete(f"{API}/invoices/{inv['id']}", role=role).status_code == 403
        assert org.get(f"{API}/invoices/{inv['id']}", role=role).status_code == 200
    assert client.get(f"{API}/invoices").status_code == 401
    assert client.post(f"{API}/invoices", json=body).status_code == 401
    assert invoice(org, inv["id"]) == inv
    assert org.post(f"{API}/invoices", role="manager", json=body).status_code == 201
