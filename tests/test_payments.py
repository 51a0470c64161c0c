"""Payments and their allocation, and promises to pay (SPEC §2, §4.2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from ledger_helpers import account, all_pages, error_fields, invoice, make_account, make_invoice, make_payment
from sqlalchemy import select

from duecourse.engine.models import ExecutionLogEntry, QueueItem, QueueStatus
from duecourse.ledger.allocation import allocate_payments
from duecourse.ledger.models import Account, AccountStatus, Invoice, Payment, PaymentAllocation, PaymentSource
from duecourse.strategies.models import ActionType

API = "/api/v1"


def _payment(org, pid):
    r = org.get(f"{API}/payments/{pid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_payment_settles_invoices_oldest_first(org):
    a = make_account(org)
    # created out of order; ties on due date are broken by the lowest number
    late = make_invoice(org, a["id"], "30.00", due="2026-02-20", number="B-2")
    tie_b = make_invoice(org, a["id"], "20.00", due="2026-01-15", number="B-1")
    tie_a = make_invoice(org, a["id"], "25.00", due="2026-01-15", number="A-9")
    disputed = make_invoice(org, a["id"], "500.00", due="2025-12-01", issue_date="2025-11-01", disputed=True)
    p = make_payment(org, a["id"], "50.00", reference="wire 42")
    assert p["unallocated"] == "0.00" and p["reference"] == "wire 42" and p["source"] == "api"
    assert p["allocations"] == [  # listed by invoice id
        {"invoice_id": late["id"], "amount": "5.00"},
        {"invoice_id": tie_b["id"], "amount": "20.00"},
        {"invoice_id": tie_a["id"], "amount": "25.00"},
    ]
    assert invoice(org, tie_a["id"])["status"] == "paid" and invoice(org, tie_b["id"])["status"] == "paid"
    assert invoice(org, late["id"])["amount_paid"] == "5.00" and invoice(org, late["id"])["status"] == "open"
    assert invoice(org, disputed["id"])["amount_paid"] == "0.00"  # disputed invoices are not settled oldest-first
    acc = account(org, a["id"])
    assert (acc["balance"], acc["gross_open"], acc["carrying_invoice_id"]) == ("25.00", "525.00", late["id"])


def test_payment_naming_an_invoice_settles_it_first(org):
    a = make_account(org)
    old = make_invoice(org, a["id"], "100.00", due="2026-01-01")
    new = make_invoice(org, a["id"], "60.00", due="2026-02-01")
    p = make_payment(org, a["id"], "80.00", invoice_id=new["id"])
    assert p["invoice_id"] == new["id"]
    assert sorted((x["invoice_id"], x["amount"]) for x in p["allocations"]) == sorted(
        [(new["id"], "60.00"), (old["id"], "20.00")]
    )
    assert invoice(org, new["id"])["status"] == "paid"
    assert invoice(org, old["id"])["amount_paid"] == "20.00"
    # by external id too
    third = make_invoice(org, a["id"], "10.00", due="2026-03-01", external_id="ERP-T")
    p2 = make_payment(org, a["id"], "10.00", invoice_external_id="ERP-T")
    assert p2["invoice_id"] == third["id"] and p2["allocations"] == [{"invoice_id": third["id"], "amount": "10.00"}]
    assert account(org, a["id"])["balance"] == "80.00"


def test_overpayment_leaves_credit_that_settles_a_later_invoice(org):
    a = make_account(org)
    i1 = make_invoice(org, a["id"], "40.00")
    p = make_payment(org, a["id"], "100.00")
    assert p["unallocated"] == "60.00" and p["allocations"] == [{"invoice_id": i1["id"], "amount": "40.00"}]
    acc = account(org, a["id"])
    assert acc["balance"] == "0.00" and acc["status"] == "resolved"
    i2 = make_invoice(org, a["id"], "25.00", due="2026-03-20")
    assert invoice(org, i2["id"])["status"] == "paid"
    i3 = make_invoice(org, a["id"], "50.00", due="2026-03-25")
    assert invoice(org, i3["id"])["amount_paid"] == "35.00"
    assert _payment(org, p["id"])["unallocated"] == "0.00"
    acc = account(org, a["id"])
    assert acc["balance"] == "15.00" and acc["status"] == "unassigned"
    # a second credit, then an invoice total corrected upwards: the same payment settles more of it
    extra = make_payment(org, a["id"], "20.00")
    assert extra["allocations"] == [{"invoice_id": i3["id"], "amount": "15.00"}] and extra["unallocated"] == "5.00"
    org.patch(f"{API}/invoices/{i3['id']}", json={"total": "53.00"})
    assert _payment(org, extra["id"])["allocations"] == [{"invoice_id": i3["id"], "amount": "18.00"}]
    assert _payment(org, extra["id"])["unallocated"] == "2.00"
    assert invoice(org, i3["id"])["status"] == "paid" and account(org, a["id"])["balance"] == "0.00"


def test_deleting_a_payment_reverses_its_allocations(org):
    a = make_account(org)
    i1 = make_invoice(org, a["id"], "50.00", due="2026-01-01")
    i2 = make_invoice(org, a["id"], "50.00", due="2026-02-01")
    p1 = make_payment(org, a["id"], "70.00")
    assert account(org, a["id"])["balance"] == "30.00"
    assert org.delete(f"{API}/payments/{p1['id']}").status_code == 204
    assert org.get(f"{API}/payments/{p1['id']}").status_code == 404
    assert (invoice(org, i1["id"])["amount_paid"], invoice(org, i1["id"])["status"]) == ("0.00", "open")
    assert invoice(org, i2["id"])["amount_paid"] == "0.00"
    assert account(org, a["id"])["balance"] == "100.00"
    # a remaining credit is re-applied to what the deleted payment had settled
    credit = make_payment(org, a["id"], "120.00")
    assert credit["unallocated"] == "20.00"
    p3 = make_payment(org, a["id"], "10.00")
    assert p3["unallocated"] == "10.00"
    assert org.delete(f"{API}/payments/{credit['id']}").status_code == 204
    assert _payment(org, p3["id"])["allocations"] == [{"invoice_id": i1["id"], "amount": "10.00"}]
    assert account(org, a["id"])["balance"] == "90.00"
    assert org.delete(f"{API}/payments/{credit['id']}").status_code == 404


def test_zero_balance_resolves_the_account_and_cancels_its_pending_items(org, db, clock):
    a = make_account(org)
    make_invoice(org, a["id"], "75.00")
    with db.transaction() as s:
        acc = s.get(Account, a["id"])
        acc.status = AccountStatus.in_auto_management
        acc.case_number = 1
        acc.case_next_stage = 2
        for stage, status in ((1, QueueStatus.pending), (2, QueueStatus.pending), (0, QueueStatus.completed)):
            s.add(
                QueueItem(
                    organization_id=org.id,
                    account_id=a["id"],
                    case_number=1,
                    stage_index=stage,
                    action=ActionType.email,
                    scheduled_at=clock.now() + timedelta(days=1),
                    status=status,
                    created_at=clock.now(),
                    updated_at=clock.now(),
                )
            )
    clock.advance(hours=2)
    make_payment(org, a["id"], "75.00")
    acc = account(org, a["id"])
    assert (acc["status"], acc["balance"], acc["collection_tab"], acc["case_next_stage"]) == ("resolved", "0.00", None, None)
    with db.transaction() as s:
        items = s.scalars(select(QueueItem).where(QueueItem.account_id == a["id"]).order_by(QueueItem.stage_index)).all()
        assert [(i.stage_index, i.status, i.reason) for i in items] == [
            (0, QueueStatus.completed, None),
            (1, QueueStatus.cancelled, "resolved"),
            (2, QueueStatus.cancelled, "resolved"),
        ]
        assert all(i.finished_at == clock.now() for i in items if i.status == QueueStatus.cancelled)
        log = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == a["id"]).order_by(ExecutionLogEntry.id)).all()
        assert [(e.event, e.stage_index, e.reason, e.at) for e in log] == [
            ("cancelled", 1, "resolved", clock.now()),
            ("cancelled", 2, "resolved", clock.now()),
            ("resolved", None, "balance_zero", clock.now()),
        ]
    shown = org.get(f"{API}/accounts/{a['id']}/execution-log").json()["items"]
    assert [e["event"] for e in shown] == ["resolved", "cancelled", "cancelled"]


def test_payment_rules_name_their_field_and_change_nothing(org, make_org):
    a = make_account(org)
    b = make_account(org)
    jpy = make_account(org, currency="JPY")
    other = make_org()
    foreign = make_account(other)
    inv_b = make_invoice(org, b["id"], "10.00")
    foreign_inv = make_invoice(other, foreign["id"], "10.00")
    inv_a = make_invoice(org, a["id"], "100.00")
    good = {"account_id": a["id"], "amount": "10.00", "paid_on": "2026-03-01"}
    cases = [
        ({**good, "amount": "0"}, "amount"),
        ({**good, "amount": "-5"}, "amount"),
        ({**good, "amount": "1.234"}, "amount"),
        ({**good, "account_id": jpy["id"], "amount": "10.5"}, "amount"),
        ({**good, "amount": None}, "amount"),
        ({**good, "amount": False}, "amount"),
        ({**good, "currency": "USD"}, "currency"),
        ({**good, "invoice_id": inv_b["id"]}, "invoice_id"),  # another account's invoice
        ({**good, "invoice_id": foreign_inv["id"]}, "invoice_id"),
        ({**good, "invoice_external_id": "missing"}, "invoice_external_id"),
        ({**good, "invoice_id": inv_a["id"], "invoice_external_id": inv_a["external_id"]}, "invoice_external_id"),
        ({**good, "paid_on": "2026-03-03"}, "paid_on"),  # Madrid's today is 2026-03-02
        ({**good, "paid_on": "soon"}, "paid_on"),
        ({**good, "source": "import"}, "source"),
        ({**good, "account_id": foreign["id"]}, "account_id"),
        ({**good, "unallocated": "3"}, "unallocated"),
        ({"amount": "1"}, "account_id"),
    ]
    for body, field in cases:
        r = org.post(f"{API}/payments", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in error_fields(r), (body, error_fields(r))
    assert org.get(f"{API}/payments").json()["items"] == []
    assert account(org, a["id"])["balance"] == "100.00"
    assert invoice(org, inv_a["id"])["amount_paid"] == "0.00"


def test_external_id_generated_or_unique(org, clock):
    a = make_account(org, timezone="Pacific/Auckland")  # already 2026-03-02 22:00 there
    make_invoice(org, a["id"], "10.00")
    r = org.post(f"{API}/payments", json={"account_id": a["id"], "amount": "1", "source": "agent"})
    assert r.status_code == 201
    p = r.json()
    assert p["external_id"].startswith("pay_") and p["paid_on"] == "2026-03-02" and p["source"] == "agent"
    second = make_payment(org, a["id"], "1")
    assert second["external_id"] != p["external_id"]
    make_payment(org, a["id"], "1", external_id="BANK-1")
    r = org.post(f"{API}/payments", json={"account_id": a["id"], "amount": "1", "external_id": "BANK-1"})
    assert r.status_code == 409 and error_fields(r) == {"external_id"}
    assert account(org, a["id"])["balance"] == "7.00"
    clock.set(datetime(2026, 3, 2, 12, 0, tzinfo=UTC))  # 01:00 on 2026-03-03 in Auckland
    assert make_payment(org, a["id"], "1", paid_on="2026-03-03")["paid_on"] == "2026-03-03"


def test_list_filters_scope_and_roles(org, other_org, client):
    a = make_account(org)
    b = make_account(org)
    make_invoice(org, a["id"], "100")
    p1 = make_payment(org, a["id"], "1", paid_on="2026-02-01")
    p2 = make_payment(org, b["id"], "2", paid_on="2026-02-15")
    p3 = make_payment(org, a["id"], "3", paid_on="2026-03-01")

    def ids(**params):
        r = org.get(f"{API}/payments", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["items"]]

    assert ids() == [p1["id"], p2["id"], p3["id"]]
    assert ids(account_id=a["id"]) == [p1["id"], p3["id"]]
    assert ids(since="2026-02-15") == [p2["id"], p3["id"]]
    assert ids(until="2026-02-15") == [p1["id"], p2["id"]]
    assert ids(since="2026-02-02", until="2026-02-28") == [p2["id"]]
    assert [x["id"] for x in all_pages(org, f"{API}/payments", limit=2)] == ids()
    r = org.get(f"{API}/payments", params={"cursor": "AAAA"})
    assert r.status_code == 422 and error_fields(r) == {"cursor"}

    # another organization sees nothing and can touch nothing
    assert other_org.get(f"{API}/payments/{p1['id']}").status_code == 404
    assert other_org.delete(f"{API}/payments/{p1['id']}").status_code == 404
    assert other_org.get(f"{API}/payments").json()["items"] == []
    assert _payment(org, p1["id"]) == p1

    # agents record payments; viewers only read
    assert org.post(f"{API}/payments", role="agent", json={"account_id": a["id"], "amount": "4"}).status_code == 201
    assert org.post(f"{API}/payments", role="viewer", json={"account_id": a["id"], "amount": "4"}).status_code == 403
    assert org.delete(f"{API}/payments/{p1['id']}", role="viewer").status_code == 403
    assert org.get(f"{API}/payments/{p1['id']}", role="viewer").status_code == 200
    assert client.get(f"{API}/payments").status_code == 401
    assert client.post(f"{API}/payments", json={"account_id": a["id"], "amount": "4"}).status_code == 401
    # deleting one (it reopens the debt) is for managers, not agents
    assert org.delete(f"{API}/payments/{p1['id']}", role="agent").status_code == 403
    assert org.delete(f"{API}/payments/{p1['id']}", role="manager").status_code == 204
    assert account(org, a["id"])["balance"] == "93.00"


def test_bulk_allocation_is_set_based_and_exact(org, db, clock):
    """allocate_payments over many accounts at once, as an import calls it (payments inserted directly)."""
    accounts = [make_account(org)["id"] for _ in range(3)]
    x, y, z = accounts
    ix1 = make_invoice(org, x, "10.00", due="2026-01-01")
    ix2 = make_invoice(org, x, "10.00", due="2026-01-02")
    ix3 = make_invoice(org, x, "10.00", due="2026-01-03")
    iy1 = make_invoice(org, y, "33.33", due="2026-01-01")
    iy2 = make_invoice(org, y, "0.01", due="2026-01-05")
    iz1 = make_invoice(org, z, "5.00", due="2026-01-01")
    with db.transaction() as s:

        def pay(account_id, amount, paid_on, invoice_id=None, ext=None):
            s.add(
                Payment(
                    organization_id=org.id,
                    account_id=account_id,
                    invoice_id=invoice_id,
                    external_id=ext or f"imp-{account_id}-{amount}-{paid_on}",
                    amount=Decimal(amount),
                    unallocated=Decimal(amount),
                    currency="EUR",
                    paid_on=datetime.fromisoformat(paid_on).date(),
                    source=PaymentSource.import_,
                    created_at=clock.now(),
                )
            )

        # x: two small payments straddle invoice boundaries; one names the newest invoice
        pay(x, "4.00", "2026-02-01")
        pay(x, "12.00", "2026-02-02")
        pay(x, "7.00", "2026-02-03", invoice_id=ix3["id"])
        # y: two payments name the same invoice; together they overpay it
        pay(y, "30.00", "2026-02-01", invoice_id=iy1["id"])
        pay(y, "20.00", "2026-02-02", invoice_id=iy1["id"])
        # z: a payment for a different account must never touch x's invoices
        pay(z, "1.00", "2026-02-01")
    with db.transaction() as s:
        created = allocate_payments(s, organization_id=org.id, account_ids=[x, y, z], now=clock.now())
    with db.transaction() as s:
        allocs = {
            (s.get(Invoice, r.invoice_id).external_id, str(r.amount))
            for r in s.scalars(select(PaymentAllocation))
        }
        assert created == len(allocs)
        ext = {i["id"]: i["external_id"] for i in (ix1, ix2, ix3, iy1, iy2, iz1)}
        assert allocs == {
            (ext[ix3["id"]], "7.0000"),  # named invoice first
            (ext[ix1["id"]], "4.0000"),  # then oldest-first, payments in date order
            (ext[ix1["id"]], "6.0000"),
            (ext[ix2["id"]], "6.0000"),
            (ext[iy1["id"]], "30.0000"),
            (ext[iy1["id"]], "3.3300"),
            (ext[iy2["id"]], "0.0100"),
            (ext[iz1["id"]], "1.0000"),
        }
        paid = {i.id: (i.amount_paid, i.status.value) for i in s.scalars(select(Invoice))}
        assert paid[ix1["id"]] == (Decimal(10), "paid") and paid[ix2["id"]] == (Decimal(6), "open")
        assert paid[ix3["id"]] == (Decimal(7), "open")
        assert paid[iy1["id"]] == (Decimal("33.33"), "paid") and paid[iy2["id"]] == (Decimal("0.01"), "paid")
        assert paid[iz1["id"]] == (Decimal(1), "open")
        left = {p.account_id: p.unallocated for p in s.scalars(select(Payment)) if p.unallocated}
        assert left == {y: Decimal("16.66")}
        balances = {a.id: (a.balance, a.status.value) for a in s.scalars(select(Account))}
        assert balances == {
            x: (Decimal(7), "unassigned"),
            y: (Decimal(0), "resolved"),
            z: (Decimal(4), "unassigned"),
        }
    # running it again changes nothing
    with db.transaction() as s:
        assert allocate_payments(s, organization_id=org.id, account_ids=None, now=clock.now()) == 0
    assert account(org, x)["balance"] == "7.00"


# ---------------------------------------------------------------- promises


def test_promises_create_validate_cancel(org, make_org, clock):
    a = make_account(org, timezone="Asia/Tokyo")
    make_invoice(org, a["id"], "100.00")
    other = make_org()
    foreign = make_account(other)
    clock.set(datetime(2026, 3, 2, 16, 0, tzinfo=UTC))  # 01:00 on 2026-03-03 in Tokyo, 17:00 on 03-02 in Madrid
    good = {"account_id": a["id"], "amount": "50.00", "promised_date": "2026-03-03"}
    cases = [
        ({**good, "promised_date": "2026-03-02"}, "promised_date"),  # yesterday for a Tokyo debtor
        ({**good, "promised_date": "03/10/2026"}, "promised_date"),
        ({**good, "amount": "0"}, "amount"),
        ({**good, "amount": "-1"}, "amount"),
        ({**good, "amount": "1.001"}, "amount"),
        ({**good, "source": "email"}, "source"),
        ({**good, "status": "kept"}, "status"),
        ({**good, "account_id": foreign["id"]}, "account_id"),
        ({**good, "note": "x" * 2001}, "note"),
        ({k: v for k, v in good.items() if k != "promised_date"}, "promised_date"),
    ]
    for body, field in cases:
        r = org.post(f"{API}/promises", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in error_fields(r), (body, error_fields(r))
    assert org.get(f"{API}/promises").json()["items"] == []

    r = org.post(f"{API}/promises", role="agent", json={**good, "source": "voice_call", "note": "will pay Tuesday"})
    assert r.status_code == 201, r.text
    p = r.json()
    assert (p["amount"], p["currency"], p["status"], p["source"], p["note"]) == (
        "50.00",
        "EUR",
        "pending",
        "voice_call",
        "will pay Tuesday",
    )
    assert org.get(f"{API}/promises/{p['id']}").json() == p
    by_ext = org.post(
        f"{API}/promises", json={"account_external_id": a["external_id"], "amount": 20, "promised_date": "2026-04-01"}
    ).json()
    assert by_ext["account_id"] == a["id"] and by_ext["source"] == "api"

    assert org.post(f"{API}/promises/{p['id']}/cancel", role="viewer").status_code == 403
    c = org.post(f"{API}/promises/{p['id']}/cancel", role="agent")
    assert c.status_code == 200 and c.json()["status"] == "cancelled" and c.json()["settled_at"] == "2026-03-02T16:00:00Z"
    again = org.post(f"{API}/promises/{p['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert org.get(f"{API}/promises/{p['id']}").json()["status"] == "cancelled"


def test_promise_lists_scope_and_roles(org, other_org, client):
    a = make_account(org)
    b = make_account(org)
    p1 = org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "1", "promised_date": "2026-03-02"}).json()
    p2 = org.post(f"{API}/promises", json={"account_id": b["id"], "amount": "2", "promised_date": "2026-03-09"}).json()
    p3 = org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "3", "promised_date": "2026-03-09"}).json()
    org.post(f"{API}/promises/{p3['id']}/cancel")

    def ids(**params):
        r = org.get(f"{API}/promises", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["items"]]

    assert ids() == [p1["id"], p2["id"], p3["id"]]
    assert ids(account_id=a["id"]) == [p1["id"], p3["id"]]
    assert ids(status="pending") == [p1["id"], p2["id"]]
    assert ids(status="cancelled", account_id=a["id"]) == [p3["id"]]
    assert [x["id"] for x in all_pages(org, f"{API}/promises", limit=1)] == ids()
    assert org.get(f"{API}/promises", params={"status": "late"}).status_code == 422

    assert other_org.get(f"{API}/promises/{p1['id']}").status_code == 404
    assert other_org.post(f"{API}/promises/{p1['id']}/cancel").status_code == 404
    assert other_org.get(f"{API}/promises").json()["items"] == []
    assert org.get(f"{API}/promises/{p1['id']}").json()["status"] == "pending"

    assert org.post(f"{API}/promises", role="viewer", json={"account_id": a["id"], "amount": "1", "promised_date": "2026-03-02"}).status_code == 403
    assert client.get(f"{API}/promises").status_code == 401
    assert org.get(f"{API}/promises", role="viewer").status_code == 200
    assert len(ids()) == 3
