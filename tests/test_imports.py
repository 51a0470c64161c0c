"""Imports of accounts, invoices and payments (SPEC §2 imports, §10 bad input).

Every test runs on SQLite and PostgreSQL (the ``db`` fixture). Files are small and built inline.
Row numbers in reports: ``row`` is the 1-based data record (header not counted), ``line`` the file
line (the CSV header is line 1).
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from duecourse.ledger.derived import refresh_accounts
from duecourse.ledger.import_rows import parse_email, parse_phone
from duecourse.ledger.imports import ImportRejected, run_import
from duecourse.ledger.models import Account, Payment
from duecourse.tenancy.service import get_settings

ACCOUNTS_HEADER = (
    "external_id,name,email,phone,whatsapp,timezone,language,currency,score,tags,"
    "opt_out_email,opt_out_sms,opt_out_whatsapp,opt_out_voice,blocked,blocked_reason,paused"
)
ACCOUNTS = (
    ACCOUNTS_HEADER + "\n"
    "A1,Ana García,ana@Example.COM,+34600123456,+34600123456,Europe/Madrid,es,EUR,70,vip|retail,"
    "false,false,false,false,false,,false\n"
    "A2,Bob Smith,bob@example.com,+1 202-555-0143,,America/New_York,en,USD,,b2b;legacy,"
    "true,no,0,false,false,,yes\n"
    "A3,Carla Rossi,,,,,,,,,,,,,true,legal hold,\n"
)
INVOICES = (
    "external_id,account_external_id,number,currency,total,amount_paid,issue_date,due_date,status,disputed\n"
    "I1,A1,N-1,EUR,100.50,0,2026-01-01,2026-02-01,open,false\n"
    "I2,A1,N-2,,40,10.25,2026-01-10,2026-03-10,,\n"
    "I3,A2,N-3,USD,300,0,2025-12-01,2026-01-01,open,true\n"
    "I4,A3,N-4,EUR,20,20,2025-11-01,2025-12-01,,false\n"
)
PAYMENTS = (
    "external_id,account_external_id,invoice_external_id,amount,currency,paid_on,reference\n"
    "P1,A1,,50,EUR,2026-02-20,bank 1\n"
    "P2,A1,I2,5.25,,2026-02-21,\n"
)


def post(org: Any, kind: str, content: str | bytes, filename: str = "file.csv", role: str = "admin", **params: Any):
    data = content.encode() if isinstance(content, str) else content
    return org.post(f"/api/v1/imports/{kind}", role=role, files={"file": (filename, data)}, params=params)


def ok(org: Any, kind: str, content: str | bytes, filename: str = "file.csv", **params: Any) -> dict[str, Any]:
    r = post(org, kind, content, filename, **params)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["applied"] is True and report["error_count"] == 0
    return report


def rejected(org: Any, kind: str, content: str | bytes, filename: str = "file.csv") -> dict[str, Any]:
    r = post(org, kind, content, filename)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"]["code"] == "import_rejected"
    assert body["report"]["applied"] is False
    return body["report"]


def snapshot(db: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the ledger tables (ids, values, timestamps), to prove 'nothing changed'."""
    out = {}
    with db.engine.connect() as conn:
        for table, order in (
            ("accounts", "id"),
            ("account_tags", "account_id, tag"),
            ("invoices", "id"),
            ("payments", "id"),
            ("payment_allocations", "payment_id, invoice_id"),
            ("execution_log", "id"),
        ):
            out[table] = [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}"))]
    return out


def accounts_by_ext(db: Any) -> dict[str, Any]:
    with db.transaction() as s:
        rows = s.scalars(select(Account)).all()
        return {a.external_id: a for a in rows}


def tags_of(db: Any, external_id: str) -> list[str]:
    with db.engine.connect() as conn:
        return [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT t.tag FROM account_tags t JOIN accounts a ON a.id = t.account_id "
                    "WHERE a.external_id = :e ORDER BY t.tag"
                ),
                {"e": external_id},
            )
        ]


def invoice_row(db: Any, external_id: str) -> dict[str, Any]:
    with db.engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM invoices WHERE external_id = :e"), {"e": external_id}).mappings().one())


def loaded(org: Any) -> None:
    ok(org, "accounts", ACCOUNTS)
    ok(org, "invoices", INVOICES)


# ---------------------------------------------------------------------------------------------
# Good files


def test_accounts_csv_inserts_with_normalized_values(org, db):
    report = ok(org, "accounts", ACCOUNTS)
    assert report | {"errors": []} == {
        "kind": "accounts", "format": "csv", "rows": 3, "inserted": 3, "updated": 0, "unchanged": 0,
        "applied": True, "error_count": 0, "errors_truncated": False, "errors": [],
    }  # fmt: skip
    accs = accounts_by_ext(db)
    a1, a2, a3 = accs["A1"], accs["A2"], accs["A3"]
    assert a1.name == "Ana García" and a1.email == "ana@example.com"  # domain lower-cased, like the API
    assert a1.phone == "+34600123456" and a1.whatsapp == "+34600123456"
    assert a1.timezone == "Europe/Madrid" and a1.language == "es" and a1.currency == "EUR" and a1.score == 70
    assert a2.phone == "+12025550143"  # formatted input normalized to E.164
    assert (a2.opt_out_email, a2.opt_out_sms, a2.opt_out_whatsapp, a2.paused) == (True, False, False, True)
    assert a3.currency == "EUR"  # the organization's base currency when none is given
    assert a3.blocked and a3.blocked_reason == "legal hold" and a3.timezone is None and a3.score is None
    assert tags_of(db, "A1") == ["retail", "vip"] and tags_of(db, "A2") == ["b2b", "legacy"]
    # nothing owed yet: resolved, in no tab
    assert {a.status for a in accs.values()} == {"resolved"}
    assert {a.collection_tab for a in accs.values()} == {None}
    assert all(a.balance == 0 and a.carrying_invoice_id is None for a in accs.values())


def test_new_accounts_are_stored_as_refresh_accounts_would_leave_them(org, db, clock):
    """The import writes new accounts' derived values directly; refresh_accounts must agree."""
    ok(org, "accounts", ACCOUNTS)
    before = snapshot(db)
    with db.transaction() as s:
        refresh_accounts(
            s, organization_id=org.id, exclusions=get_settings(s, org.id).exclusions, now=clock.now() + timedelta(days=1)
        )
    assert snapshot(db) == before


def test_reimport_changes_nothing(org, db, clock):
    loaded(org)
    ok(org, "payments", PAYMENTS)
    before = snapshot(db)
    clock.advance(days=1)
    for kind, content in (("accounts", ACCOUNTS), ("invoices", INVOICES), ("payments", PAYMENTS)):
        report = ok(org, kind, content)
        n = content.count("\n") - 1
        assert (report["rows"], report["inserted"], report["updated"], report["unchanged"]) == (n, 0, 0, n), kind
    assert snapshot(db) == before  # not even updated_at moved


def test_changed_row_updates_only_that_row(org, db, clock):
    ok(org, "accounts", ACCOUNTS)
    before = accounts_by_ext(db)
    clock.advance(hours=2)
    changed = ACCOUNTS.replace("bob@example.com", "robert@example.com")
    report = ok(org, "accounts", changed)
    assert (report["inserted"], report["updated"], report["unchanged"]) == (0, 1, 2)
    after = accounts_by_ext(db)
    assert after["A2"].email == "robert@example.com"
    assert after["A2"].updated_at == clock.now() and after["A2"].updated_at != before["A2"].updated_at
    assert after["A1"].updated_at == before["A1"].updated_at and after["A3"].updated_at == before["A3"].updated_at
    assert after["A2"].id == before["A2"].id


def test_tags_are_replaced_and_count_as_a_change(org, db):
    ok(org, "accounts", ACCOUNTS)
    report = ok(org, "accounts", ACCOUNTS.replace("vip|retail", "retail|payment-plan"))
    assert report["updated"] == 1
    assert tags_of(db, "A1") == ["payment-plan", "retail"]


def test_columns_absent_from_the_file_keep_their_values(org, db):
    ok(org, "accounts", ACCOUNTS)
    report = ok(org, "accounts", "external_id,name,score\nA1,Ana García,95\nA4,New Debtor,\n")
    assert (report["inserted"], report["updated"], report["unchanged"]) == (1, 1, 0)
    accs = accounts_by_ext(db)
    assert accs["A1"].score == 95 and accs["A1"].email == "ana@example.com" and tags_of(db, "A1") == ["retail", "vip"]
    assert accs["A4"].name == "New Debtor" and accs["A4"].opt_out_email is False and accs["A4"].currency == "EUR"


def test_empty_cell_clears_an_optional_value(org, db):
    ok(org, "accounts", ACCOUNTS)
    ok(org, "accounts", "external_id,name,email,tags\nA1,Ana García,,\n")
    a1 = accounts_by_ext(db)["A1"]
    assert a1.email is None and tags_of(db, "A1") == []


def test_an_import_never_takes_back_an_opt_out(org, db):
    """The debtor opted out by a STOP reply or an unsubscribe link: the organization's next export,
    which knows nothing of it, must not opt them back in (§4.7). A file can opt out."""
    ok(org, "accounts", ACCOUNTS)
    with db.transaction() as s:
        a1 = s.scalars(select(Account).where(Account.external_id == "A1")).one()
        a1.opt_out_sms = a1.opt_out_whatsapp = True  # as the STOP reply left it
    before = snapshot(db)
    report = ok(org, "accounts", ACCOUNTS)  # says false for every opt-out of A1
    assert report["updated"] == 0 and snapshot(db) == before
    ok(org, "accounts", "external_id,name,opt_out_sms,opt_out_voice\nA1,Ana García,,true\n")
    a1 = accounts_by_ext(db)["A1"]
    assert (a1.opt_out_email, a1.opt_out_sms, a1.opt_out_whatsapp, a1.opt_out_voice) == (False, True, True, True)


def test_empty_flag_cells_change_nothing_and_explicit_values_apply(org, db):
    ok(org, "accounts", ACCOUNTS)  # A3 is blocked ("legal hold")
    ok(org, "accounts", "external_id,name,blocked,blocked_reason,paused\nA3,Carla Rossi,,legal hold,\n")
    a3 = accounts_by_ext(db)["A3"]
    assert (a3.blocked, a3.blocked_reason, a3.paused) == (True, "legal hold", False)
    ok(org, "accounts", "external_id,name,blocked,blocked_reason\nA3,Carla Rossi,false,\n")
    assert accounts_by_ext(db)["A3"].blocked is False


def test_a_blocked_account_has_a_reason_and_only_a_blocked_one_has_one(org, db):
    """SPEC §2 (and the API's rule): judged on the account as the row leaves it."""
    ok(org, "accounts", ACCOUNTS)  # A3 is blocked ("legal hold"), A1 is not
    before = snapshot(db)
    cases = [
        ("external_id,name,blocked,blocked_reason\nN1,New,true,\n", "is required when the account is blocked"),
        ("external_id,name,blocked\nN1,New,yes\n", "is required when the account is blocked"),
        ("external_id,name,blocked\nA1,Ana García,true\n", "is required when the account is blocked"),
        ("external_id,name,blocked_reason\nA3,Carla Rossi,\n", "is required when the account is blocked"),
        ("external_id,name,blocked,blocked_reason\nN1,New,false,fraud\n", "only a blocked account has a reason"),
        ("external_id,name,blocked_reason\nA1,Ana García,fraud\n", "only a blocked account has a reason"),
    ]
    for content, message in cases:
        report = rejected(org, "accounts", content)
        assert [(e["row"], e["column"], e["message"]) for e in report["errors"]] == [(1, "blocked_reason", message)], content
        assert snapshot(db) == before
    # Blocking with a reason, and a row that leaves the reason out keeps the stored one.
    ok(org, "accounts", "external_id,name,blocked,blocked_reason\nA1,Ana García,true,disputed by lawyer\n")
    ok(org, "accounts", "external_id,name,blocked\nA1,Ana García,true\n")
    assert (accounts_by_ext(db)["A1"].blocked, accounts_by_ext(db)["A1"].blocked_reason) == (True, "disputed by lawyer")
    # Unblocking clears the reason, also when the file has no reason column.
    ok(org, "accounts", "external_id,name,blocked\nA3,Carla Rossi,false\n")
    assert (accounts_by_ext(db)["A3"].blocked, accounts_by_ext(db)["A3"].blocked_reason) == (False, None)
    # A new block needs its own reason, whatever an earlier one left behind (as in the API).
    with db.transaction() as s:
        s.scalars(select(Account).where(Account.external_id == "A3")).one().blocked_reason = "old hold"
    report = rejected(org, "accounts", "external_id,name,blocked\nA3,Carla Rossi,true\n")
    assert [(e["column"], e["message"]) for e in report["errors"]] == [
        ("blocked_reason", "is required when the account is blocked")]


def test_a_new_address_clears_the_invalid_flag_of_the_old_one(org, db):
    ok(org, "accounts", ACCOUNTS)
    with db.transaction() as s:
        for a in s.scalars(select(Account).where(Account.external_id.in_(("A1", "A2")))):
            a.email_invalid = a.phone_invalid = True  # bounced, failed
    # A1 gets a new email (same phone); A2's row repeats its addresses.
    ok(org, "accounts", "external_id,name,email,phone\nA1,Ana García,ana.new@example.com,+34600123456\n"
                        "A2,Bob Smith,bob@example.com,+1 202-555-0143\n")
    accs = accounts_by_ext(db)
    assert (accs["A1"].email, accs["A1"].email_invalid, accs["A1"].phone_invalid) == ("ana.new@example.com", False, True)
    assert (accs["A2"].email_invalid, accs["A2"].phone_invalid) == (True, True)


def test_an_import_never_takes_back_a_dispute(org, db):
    loaded(org)  # I1 undisputed, I3 disputed
    with db.transaction() as s:
        s.execute(text("UPDATE invoices SET disputed = TRUE WHERE external_id = 'I1'"))  # an agent's call recorded it
    before = snapshot(db)
    assert ok(org, "invoices", INVOICES)["updated"] == 0  # the file says I1 is not disputed
    assert snapshot(db) == before
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date,disputed\n"
                        "I2,A1,40,2026-01-10,2026-03-10,true\n")
    assert invoice_row(db, "I1")["disputed"] and invoice_row(db, "I2")["disputed"]


def test_voiding_or_moving_an_invoice_by_import_gives_its_payment_back(org, db):
    """A payment recorded in duecourse settled invoice X. The ERP then voids X and issues Y instead
    (and moves invoice Z to another account): the payment must settle Y, not stay on X, and the
    debtor must not be dunned for money already paid (§2)."""
    ok(org, "accounts", "external_id,name\nB1,Beatriz\nB2,Bruno\n")
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date\n"
                        "X,B1,100,2026-01-01,2026-02-01\nZ,B1,50,2026-01-05,2026-02-05\n")
    ok(org, "payments", "external_id,account_external_id,amount,paid_on\nP,B1,150,2026-02-10\n")
    assert (invoice_row(db, "X")["status"], invoice_row(db, "Z")["status"]) == ("paid", "paid")
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date,status\n"
                        "X,B1,100,2026-01-01,2026-02-01,void\nY,B1,100,2026-01-01,2026-02-01,open\n"
                        "Z,B2,50,2026-01-05,2026-02-05,open\n")
    x, y, z = invoice_row(db, "X"), invoice_row(db, "Y"), invoice_row(db, "Z")
    assert (x["status"], x["amount_paid"]) == ("void", 0)
    assert (y["status"], y["amount_paid"]) == ("paid", y["total"])
    assert (z["status"], z["amount_paid"]) == ("open", 0)
    accs = accounts_by_ext(db)
    assert (accs["B1"].balance, accs["B2"].balance) == (Decimal(0), Decimal(50))
    with db.transaction() as s:
        payment = s.scalars(select(Payment).where(Payment.external_id == "P")).one()
        assert payment.unallocated == Decimal(50)  # what settled Z is B1's credit again
        allocated_to = s.execute(text(
            "SELECT i.external_id FROM payment_allocations a JOIN invoices i ON i.id = a.invoice_id")).scalars().all()
    assert allocated_to == ["Y"]


def test_invoices_import_sets_balances_and_carrying_invoice(org, db):
    loaded(org)
    accs = accounts_by_ext(db)
    a1 = accs["A1"]
    assert a1.balance == Decimal("130.25")  # 100.50 + (40 - 10.25)
    i1 = invoice_row(db, "I1")
    assert a1.carrying_invoice_id == i1["id"] and a1.status == "unassigned" and a1.collection_tab == "outstanding"
    i2 = invoice_row(db, "I2")
    assert i2["currency"] == "EUR" and i2["status"] == "open" and i2["number"] == "N-2"
    # A2's only invoice is disputed: nothing collectable; A3's is fully paid: status paid, resolved
    assert accs["A2"].balance == 0 and accs["A2"].gross_open > 0
    assert invoice_row(db, "I4")["status"] == "paid" and accs["A3"].status == "resolved"
    assert accs["A3"].collection_tab is None


def test_invoice_changes_update_and_refresh(org, db):
    loaded(org)
    report = ok(org, "invoices", INVOICES.replace("I1,A1,N-1,EUR,100.50,0", "I1,A1,N-1,EUR,100.50,100.50"))
    assert (report["updated"], report["unchanged"]) == (1, 3)
    assert invoice_row(db, "I1")["status"] == "paid"  # open and fully paid: paid, as allocation does
    assert accounts_by_ext(db)["A1"].balance == Decimal("29.75")
    # moving an invoice to another account refreshes both
    ok(org, "invoices", INVOICES.replace("I2,A1,", "I2,A3,"))
    accs = accounts_by_ext(db)
    assert accs["A3"].balance == Decimal("29.75") and accs["A1"].balance == Decimal("100.50")


def test_payments_import_allocates_and_reimports_stay_unchanged(org, db, clock):
    loaded(org)
    report = ok(org, "payments", PAYMENTS)
    assert report["inserted"] == 2
    # P2 names I2 (5.25 of its 29.75); P1 settles the oldest-due open invoice (I1, 100.50) with 50.
    i1, i2 = invoice_row(db, "I1"), invoice_row(db, "I2")
    assert i1["amount_paid"] == 50 * 10_000 and i2["amount_paid"] == (1025 + 525) * 100
    assert accounts_by_ext(db)["A1"].balance == Decimal("75.00")
    before = snapshot(db)
    clock.advance(days=1)
    # the invoices file's amount_paid excludes payments recorded in duecourse: re-import is a no-op
    assert ok(org, "invoices", INVOICES)["unchanged"] == 4
    assert ok(org, "payments", PAYMENTS)["unchanged"] == 2
    assert snapshot(db) == before
    # a reference may change; the money of a recorded payment may not
    assert ok(org, "payments", PAYMENTS.replace("bank 1", "bank one"))["updated"] == 1
    bad = rejected(org, "payments", PAYMENTS.replace("P1,A1,,50,", "P1,A1,,60,"))
    assert bad["errors"][0]["row"] == 1 and bad["errors"][0]["column"] == "amount"


def test_credit_from_earlier_payments_settles_invoices_imported_later(org, db):
    ok(org, "accounts", ACCOUNTS)
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date\nX1,A1,10,2026-01-01,2026-01-31\n")
    ok(org, "payments", "external_id,account_external_id,amount,paid_on\nPX,A1,25,2026-02-01\n")
    assert accounts_by_ext(db)["A1"].balance == 0
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date\nX2,A1,30,2026-02-01,2026-03-01\n")
    assert invoice_row(db, "X2")["amount_paid"] == 15 * 10_000
    assert accounts_by_ext(db)["A1"].balance == Decimal("15.00")


def test_json_array_and_json_lines(org, db):
    rows = [
        {"external_id": "J1", "name": "Jay", "email": "jay@example.com", "score": 40, "tags": ["vip", "b2c"],
         "blocked": False, "currency": "EUR"},
        {"external_id": "J2", "name": "Kay", "opt_out_sms": True, "phone": None},
    ]  # fmt: skip
    report = ok(org, "accounts", json.dumps(rows), filename="accounts.json")
    assert report["format"] == "json" and report["inserted"] == 2
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    report = ok(org, "accounts", lines, filename="accounts.jsonl")
    assert report["format"] == "jsonl" and report["unchanged"] == 2
    accs = accounts_by_ext(db)
    assert accs["J1"].score == 40 and tags_of(db, "J1") == ["b2c", "vip"] and accs["J2"].opt_out_sms is True
    inv = [{"external_id": "JI1", "account_external_id": "J1", "total": 12.5, "issue_date": "2026-01-01",
            "due_date": "2026-01-15", "disputed": False}]  # fmt: skip
    assert ok(org, "invoices", json.dumps(inv), filename="x.json")["inserted"] == 1
    assert accounts_by_ext(db)["J1"].balance == Decimal("12.50")


def test_format_detected_from_content_and_forced_by_parameter(org):
    rows = [{"external_id": "J1", "name": "Jay"}]
    assert ok(org, "accounts", json.dumps(rows), filename="upload")["format"] == "json"
    assert ok(org, "accounts", json.dumps(rows[0]) + "\n", filename="upload")["format"] == "jsonl"
    assert ok(org, "accounts", "external_id,name\nJ1,Jay\n", filename="data.txt", format="csv")["format"] == "csv"


def test_bom_semicolons_and_crlf(org, db):
    content = "\ufeffexternal_id;name;tags\r\nS1;Semi Colon;a|b\r\n\r\nS2;Other;\r\n".encode()
    report = ok(org, "accounts", content)
    assert report["rows"] == 2 and report["inserted"] == 2
    assert tags_of(db, "S1") == ["a", "b"]


def test_header_only_file_imports_nothing(org):
    report = ok(org, "payments", "external_id,account_external_id,amount,paid_on\n")
    assert report["rows"] == 0 and report["inserted"] == 0


def test_organizations_are_isolated(org, other_org, db):
    ok(org, "accounts", ACCOUNTS)
    assert ok(other_org, "accounts", ACCOUNTS)["inserted"] == 3  # same external ids, another organization
    ok(other_org, "invoices", INVOICES)
    with db.engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM invoices WHERE organization_id = :o"), {"o": org.id}).scalar()
    assert n == 0
    # an invoice cannot refer to another organization's account
    ok(org, "accounts", "external_id,name\nONLY-MINE,x\n")
    bad = rejected(other_org, "invoices", "external_id,account_external_id,total,issue_date,due_date\nZ,ONLY-MINE,1,2026-01-01,2026-01-02\n")
    assert bad["errors"][0]["column"] == "account_external_id"


def test_deleting_an_organization_deletes_its_ledger_through_its_accounts(org, other_org, db):
    """invoices, account_tags, payments and payment_allocations have no foreign key to organizations
    (ledger.models.tenant_of_account): an organization's delete reaches them through its accounts."""
    for o in (org, other_org):
        ok(o, "accounts", ACCOUNTS)
        ok(o, "invoices", INVOICES)
        ok(o, "payments", PAYMENTS)
    tables = ("accounts", "account_tags", "invoices", "payments", "payment_allocations")

    def counts(org_id: int) -> dict[str, int]:
        with db.engine.connect() as conn:
            return {
                t: conn.execute(text(f"SELECT COUNT(*) FROM {t} WHERE organization_id = :o"), {"o": org_id}).scalar()
                for t in tables
            }

    before = counts(other_org.id)
    assert all(before.values()), before  # every table has rows of both organizations
    assert counts(org.id) == before
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM organizations WHERE id = :o"), {"o": org.id})
    assert counts(org.id) == dict.fromkeys(tables, 0)
    assert counts(other_org.id) == before


def test_tags_of_new_and_changed_accounts(org, db):
    """New accounts get their tags (ids drawn at staging on PostgreSQL); a changed account's tags
    become the file's; an account whose row gives no tags column keeps its tags."""
    ok(org, "accounts", "external_id,name,tags\nT1,One,a|b\nT2,Two,c\nT3,Three,\n")
    report = ok(org, "accounts", "external_id,name,tags\nT1,One,b|d\nT2,Two,c\nT3,Three,e\nT4,Four,f|g\n")
    assert (report["inserted"], report["updated"], report["unchanged"]) == (1, 2, 1)
    ok(org, "accounts", "external_id,name\nT2,Two renamed\n")

    with db.engine.connect() as conn:
        rows = conn.execute(
            text(
                """SELECT a.external_id, g.tag, g.organization_id FROM account_tags g
                   JOIN accounts a ON a.id = g.account_id ORDER BY a.external_id, g.tag"""
            )
        ).all()
    assert [(r[0], r[1]) for r in rows] == [
        ("T1", "b"), ("T1", "d"), ("T2", "c"), ("T3", "e"), ("T4", "f"), ("T4", "g"),
    ]  # fmt: skip
    assert {r[2] for r in rows} == {org.id}


# ---------------------------------------------------------------------------------------------
# Bad input: the right row, column and reason, and nothing changes

INV_HEAD = "external_id,account_external_id,number,currency,total,amount_paid,issue_date,due_date,status,disputed\n"
PAY_HEAD = "external_id,account_external_id,invoice_external_id,amount,currency,paid_on,reference\n"

BAD_FILES = [
    # (id, kind, content, [(row, line, column, words in the message)])
    ("wrong type", "accounts", "external_id,name,score\nB1,x,high\n", [(1, 2, "score", "whole number")]),
    ("score range", "accounts", "external_id,name,score\nB1,x,101\n", [(1, 2, "score", "0 to 100")]),
    ("bad boolean", "accounts", "external_id,name,blocked\nB1,x,maybe\n", [(1, 2, "blocked", "yes/no")]),
    ("unknown column", "accounts", "external_id,name,nickname\nB1,x,y\n", [(None, 1, "nickname", "unknown column")]),
    ("missing required header", "accounts", "external_id,email\nB1,a@example.com\n", [(None, 1, "name", "missing from the header")]),
    ("duplicate header", "accounts", "external_id,name,name\nB1,x,y\n", [(None, 1, "name", "twice")]),
    ("required value empty", "accounts", "external_id,name\nB1,\n", [(1, 2, "name", "is required")]),
    ("too many fields", "accounts", "external_id,name\nB1,x\nB2,y,z\n", [(2, 3, None, "too many fields")]),
    ("too few fields", "accounts", "external_id,name,email\nB1,x\n", [(1, 2, None, "too few fields")]),
    ("empty file", "accounts", "", [(None, None, None, "empty")]),
    ("blank file", "accounts", "\n\n", [(None, None, None, "empty")]),
    ("invalid phone", "accounts", "external_id,name,phone\nB1,x,+3412\n", [(1, 2, "phone", "invalid phone")]),
    ("invalid whatsapp", "accounts", "external_id,name,whatsapp\nB1,x,600123456\n", [(1, 2, "whatsapp", "invalid phone")]),
    ("invalid email", "accounts", "external_id,name,email\nB1,x,not-an-email\n", [(1, 2, "email", "invalid email")]),
    ("invalid time zone", "accounts", "external_id,name,timezone\nB1,x,Mars/Olympus\n", [(1, 2, "timezone", "time zone")]),
    ("unknown currency", "accounts", "external_id,name,currency\nB1,x,XYZ\n", [(1, 2, "currency", "unknown currency")]),
    ("bad language", "accounts", "external_id,name,language\nB1,x,english!\n", [(1, 2, "language", "language tag")]),
    ("too long", "accounts", "external_id,name\nB1," + "x" * 201 + "\n", [(1, 2, "name", "longer than 200")]),
    ("duplicate external_id", "accounts", "external_id,name\nB1,x\nB2,y\nB1,z\n", [(3, 4, "external_id", "first on row 1")]),
    ("negative amount", "invoices", INV_HEAD + "I9,A1,N,EUR,-5,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, "total", "negative")]),
    ("not a number", "invoices", INV_HEAD + "I9,A1,N,EUR,1.234,56,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, None, "too many fields")]),
    ("thousands separator", "invoices", INV_HEAD.replace(",", ";") + "I9;A1;N;EUR;1,234.56;0;2026-01-01;2026-02-01;open;false\n", [(1, 2, "total", "not a number")]),
    ("bad date", "invoices", INV_HEAD + "I9,A1,N,EUR,5,0,01/02/2026,2026-02-01,open,false\n", [(1, 2, "issue_date", "YYYY-MM-DD")]),
    ("impossible date", "invoices", INV_HEAD + "I9,A1,N,EUR,5,0,2026-02-30,2026-03-01,open,false\n", [(1, 2, "issue_date", "not a valid date")]),
    ("due before issue", "invoices", INV_HEAD + "I9,A1,N,EUR,5,0,2026-02-01,2026-01-01,open,false\n", [(1, 2, "due_date", "before issue_date")]),
    ("paid over total", "invoices", INV_HEAD + "I9,A1,N,EUR,5,6,2026-01-01,2026-02-01,open,false\n", [(1, 2, "amount_paid", "greater than total")]),
    ("bad status", "invoices", INV_HEAD + "I9,A1,N,EUR,5,0,2026-01-01,2026-02-01,overdue,false\n", [(1, 2, "status", "open, paid, void")]),
    ("unknown account", "invoices", INV_HEAD + "I9,NOPE,N,EUR,5,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, "account_external_id", "no account")]),
    ("currency differs from account", "invoices", INV_HEAD + "I9,A1,N,USD,5,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, "currency", "account's currency (EUR)")]),
    ("too many decimals for EUR", "invoices", INV_HEAD + "I9,A1,N,EUR,5.005,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, "total", "more than 2 decimal places for EUR")]),
    ("too many decimals at all", "invoices", INV_HEAD + "I9,A1,N,EUR,5.00001,0,2026-01-01,2026-02-01,open,false\n", [(1, 2, "total", "more than 4 decimal places")]),
    ("duplicate invoice", "invoices", INV_HEAD + "I9,A1,N,EUR,5,0,2026-01-01,2026-02-01,open,false\nI9,A1,N,EUR,6,0,2026-01-01,2026-02-01,open,false\n", [(2, 3, "external_id", "duplicate")]),
    ("payment zero", "payments", PAY_HEAD + "P9,A1,,0,EUR,2026-02-01,\n", [(1, 2, "amount", "greater than zero")]),
    ("payment unknown invoice", "payments", PAY_HEAD + "P9,A1,NOPE,5,EUR,2026-02-01,\n", [(1, 2, "invoice_external_id", "no invoice")]),
    ("payment invoice of another account", "payments", PAY_HEAD + "P9,A2,I1,5,USD,2026-02-01,\n", [(1, 2, "invoice_external_id", "another account")]),
    ("payment currency", "payments", PAY_HEAD + "P9,A2,,5,EUR,2026-02-01,\n", [(1, 2, "currency", "account's currency (USD)")]),
    ("payment decimals", "payments", PAY_HEAD + "P9,A1,,5.001,,2026-02-01,\n", [(1, 2, "amount", "more than 2 decimal places for EUR")]),
    ("missing required column in payments", "payments", "external_id,account_external_id,amount\nP9,A1,5\n", [(None, 1, "paid_on", "missing")]),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["accounts", "invoices", "payments"])
def test_bad_input_is_reported_and_changes_nothing(org, db, kind):
    """One test per kind looping over its cases (one organization set up per kind keeps the suite fast)."""
    loaded(org)
    ok(org, "payments", PAYMENTS)
    before = snapshot(db)
    for name, case_kind, content, expected in BAD_FILES:
        if case_kind != kind:
            continue
        report = rejected(org, kind, content)
        got = [(e["row"], e["line"], e["column"], e["message"]) for e in report["errors"]]
        assert report["error_count"] == len(expected), (name, got)
        for (row, line, column, words), (grow, gline, gcolumn, gmessage) in zip(expected, got, strict=True):
            assert (grow, gline, gcolumn) == (row, line, column), (name, got)
            assert words in gmessage, (name, got)
        assert snapshot(db) == before, name


def test_wrong_encoding_names_the_line(org, db):
    content = "external_id,name\nB1,Ana\nB2,Jos\xe9\n".encode("latin-1")
    report = rejected(org, "accounts", content)
    (e,) = report["errors"]
    assert e["line"] == 3 and "not UTF-8" in e["message"]
    assert snapshot(db)["accounts"] == []


def test_one_bad_row_among_good_ones_changes_nothing(org, db):
    loaded(org)
    before = snapshot(db)
    lines = [ACCOUNTS_HEADER] + [f"N{i},Name {i},n{i}@example.com,,,,,,,,,,,,,," for i in range(1, 50)]
    lines[30] = "N30,Name 30,n30@example.com,,,Nowhere/City,,,,,,,,,,,"
    changed = ACCOUNTS.splitlines()[1].replace("Ana García", "Ana Changed")
    report = rejected(org, "accounts", "\n".join(lines + [changed]) + "\n")
    assert report["rows"] == 50 and report["error_count"] == 1
    assert (report["errors"][0]["row"], report["errors"][0]["column"]) == (30, "timezone")
    assert snapshot(db) == before


def test_every_bad_row_is_reported_in_row_order(org):
    ok(org, "accounts", ACCOUNTS)
    content = INV_HEAD + (
        "I1,A1,N,EUR,5,0,2026-01-01,2026-02-01,open,false\n"
        "I2,NOPE,N,EUR,5,0,2026-01-01,2026-02-01,open,false\n"
        "I3,A1,N,EUR,x,0,2026-01-01,2026-02-01,open,false\n"
        "I1,A1,N,EUR,5,0,2026-01-01,2026-02-01,open,false\n"
    )
    report = rejected(org, "invoices", content)
    assert [(e["row"], e["column"]) for e in report["errors"]] == [
        (2, "account_external_id"),
        (3, "total"),
        (4, "external_id"),
    ]


def test_json_bad_input(org, db):
    ok(org, "accounts", ACCOUNTS)
    before = snapshot(db)
    rows = [{"external_id": "J1", "name": "x"}, {"external_id": "J2", "name": "y", "nick": "z"},
            {"external_id": "J3", "name": {"first": "a"}}, ["not", "an", "object"], {"name": "no id"}]  # fmt: skip
    report = rejected(org, "accounts", json.dumps(rows), filename="a.json")
    got = [(e["row"], e["column"]) for e in report["errors"]]
    assert got == [(2, "nick"), (3, "name"), (4, None), (5, "external_id")]
    assert "single value" in report["errors"][1]["message"]
    report = rejected(org, "accounts", '{"external_id": "J1", "name": "x"}\n{"external_id": "J2",\n', filename="a.jsonl")
    assert [(e["row"], e["line"]) for e in report["errors"]] == [(2, 2)] and "invalid JSON" in report["errors"][0]["message"]
    report = rejected(org, "accounts", '[{"external_id": "J1", "name": "x"}, {"external_id": ', filename="a.json")
    assert report["errors"][0]["row"] == 2 and "invalid JSON" in report["errors"][0]["message"]
    assert rejected(org, "accounts", "", filename="a.json")["errors"][0]["message"].startswith("the file is empty")
    assert snapshot(db) == before


def test_error_report_is_capped(org, db):
    lines = ["external_id,name,score"] + [f"E{i},x,bad" for i in range(1, 1501)]
    report = rejected(org, "accounts", "\n".join(lines) + "\n")
    assert report["error_count"] == 1500 and len(report["errors"]) == 1000 and report["errors_truncated"] is True
    assert report["errors"][0]["row"] == 1 and report["errors"][-1]["row"] == 1000


def test_currency_of_an_account_with_invoices_cannot_change(org, db):
    loaded(org)
    report = rejected(org, "accounts", "external_id,name,currency\nA1,Ana García,GBP\nA4,New,GBP\n")
    assert [(e["row"], e["column"]) for e in report["errors"]] == [(1, "currency")]


def test_jpy_has_no_decimals(org, db):
    ok(org, "accounts", "external_id,name,currency\nJP1,Yamada,JPY\n")
    ok(org, "invoices", "external_id,account_external_id,total,issue_date,due_date\nJ1,JP1,1500,2026-01-01,2026-02-01\n")
    report = rejected(org, "invoices", "external_id,account_external_id,total,issue_date,due_date\nJ2,JP1,15.5,2026-01-01,2026-02-01\n")
    assert "more than 0 decimal places for JPY" in report["errors"][0]["message"]


# ---------------------------------------------------------------------------------------------
# The endpoint and the CLI


def test_upload_requires_credentials_and_permission(org, client):
    r = client.post("/api/v1/imports/accounts", files={"file": ("a.csv", ACCOUNTS.encode())})
    assert r.status_code == 401
    assert post(org, "accounts", ACCOUNTS, role="viewer").status_code == 403
    assert post(org, "accounts", ACCOUNTS, role="agent").status_code == 403
    assert post(org, "accounts", ACCOUNTS, role="manager").status_code == 200
    assert post(org, "debtors", ACCOUNTS).status_code == 422  # unknown kind
    r = org.post("/api/v1/imports/accounts")  # no file
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "file"


def test_rejected_upload_uses_the_error_format(org):
    body = post(org, "accounts", "external_id,name,score\nB1,x,high\n").json()
    assert body["error"]["fields"] == [{"field": "row 1.score", "message": "must be a whole number from 0 to 100 (value 'high')"}]
    assert body["report"]["errors"] == [
        {"row": 1, "line": 2, "column": "score", "message": "must be a whole number from 0 to 100", "value": "high"}
    ]


@pytest.fixture
def cli_env(db, monkeypatch):
    from duecourse.config import get_settings

    monkeypatch.setenv("DUECOURSE_DATABASE_URL", db.url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_import(org, db, cli_env, tmp_path):
    from duecourse.cli import app as cli

    runner = CliRunner()
    path = tmp_path / "accounts.csv"
    path.write_text(ACCOUNTS)
    r = runner.invoke(cli, ["import", "accounts", str(path), "--organization", str(org.id), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "inserted" in r.output and "3" in r.output
    r = runner.invoke(cli, ["import", "accounts", str(path), "--organization", str(org.id)])
    assert r.exit_code == 0, r.output
    assert "unchanged" in r.output

    bad = tmp_path / "invoices.jsonl"
    bad.write_text(json.dumps({"external_id": "I1", "account_external_id": "NOPE", "total": "5",
                               "issue_date": "2026-01-01", "due_date": "2026-02-01"}) + "\n")  # fmt: skip
    before = snapshot(db)
    r = runner.invoke(cli, ["import", "invoices", str(bad), "--organization", str(org.id), "--no-progress"])
    assert r.exit_code == 2
    assert "1 error" in r.output and "row 1" in r.output and "account_external_id" in r.output
    assert snapshot(db) == before
    r = runner.invoke(cli, ["import", "loans", str(bad), "--organization", str(org.id)])
    assert r.exit_code == 2 and "unknown kind" in r.output


def test_service_call_never_commits(org, db, clock):
    with db.transaction() as s:
        report = run_import(s, organization_id=org.id, kind="accounts", stream=io.BytesIO(ACCOUNTS.encode()), now=clock.now())
        assert report.inserted == 3
        s.rollback()
    assert snapshot(db)["accounts"] == []
    with pytest.raises(ImportRejected), db.transaction() as s:
        run_import(s, organization_id=org.id, kind="accounts", stream=io.BytesIO(b"external_id\nX\n"), now=clock.now())


# ---------------------------------------------------------------------------------------------
# The fast paths agree with the libraries


@pytest.mark.parametrize(
    "value",
    ["+34600123456", "+12025550143", "+447911123456", "+390612345678", "+5511987654321", "+81312345678",
     "+34 600 12 34 56", "0034600123456", "+3460012345", "+1202555014", "+999123456789", "+12345", "+390012345678"],
)  # fmt: skip
def test_phone_fast_path_agrees_with_phonenumbers(value):
    from duecourse.validation import phone_e164

    try:
        expected: str | None = phone_e164(value)
    except ValueError:
        expected = None
    try:
        got: str | None = parse_phone(value)
    except ValueError:
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "value",
    ["a@example.com", "A.B+c@Sub.Example.COM", "x@foo.test", "x@localhost", "a..b@example.com", ".a@example.com",
     "a@-example.com", "a@example.c", "a@example.123", "üser@exämple.com", "a" * 65 + "@example.com", "a@b.co"],
)  # fmt: skip
def test_email_fast_path_agrees_with_email_validator(value):
    from email_validator import EmailNotValidError, validate_email

    try:
        expected: str | None = validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = parse_email(value)
    except ValueError:
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "value",
    ["0", "0.00", "5", "5.", "5.5", ".5", ".", "-5", "-0.5", "1.2345", "1.23450000", "1.23456", "00012.10",
     "99999999999999.9999", "100000000000000", "1e5", "1,5", "5.5.5", "+5", "5_0", "5.0_0", "١٢٣.٤"],
)  # fmt: skip
def test_money_fast_path_agrees_with_the_rule(value):
    """parse_money's shortcut for plain digits gives what the regular-expression rule gives."""
    import re

    from duecourse.ledger.import_rows import MONEY_MAX_UNITS, parse_money

    m = re.fullmatch(r"(-?)(\d*)(?:\.(\d*))?", value)
    expected: int | None = None
    if m and (m.group(2) or m.group(3)) and not m.group(1):
        frac = (m.group(3) or "").rstrip("0")
        if len(frac) <= 4:
            units = int(m.group(2) or "0") * 10_000 + int(frac.ljust(4, "0"))
            expected = units if units < MONEY_MAX_UNITS else None
    try:
        got: int | None = parse_money(value)
    except ValueError:
        got = None
    assert got == expected


def test_csv_records_as_lists_validate_like_dicts():
    """The CSV fast path (fields by header position) stages and reports exactly what the
    dict path (used for JSON) does, bad rows included."""
    from duecourse.ledger.import_rows import ErrorLog, FileFormat, ImportKind, RowValidator, read_records

    files = {
        ImportKind.accounts: ACCOUNTS + "A4,,bad@,+1,,Mars/Base,e,XXX,101,a|b,maybe,,,,,,\nA5,Eve,,,,,,,,,,,,,,,\n",
        ImportKind.invoices: INVOICES + "I5,A1,,,1.00001,2,2026-01-02,2026-01-01,closed,x\nI6,,,JPY,1.5,,2026-13-01,,,\n",
        ImportKind.payments: PAYMENTS + "P3,A1,,0,EUR,2026-02-30,\nP4,A1,,1.005,JPY,2026-02-01,r\n",
    }
    for kind, content in files.items():
        out = []
        for lists in (False, True):
            errors = ErrorLog()
            validate = RowValidator(kind, errors)
            hook = validate.use_header if lists else None
            stream = io.BufferedReader(io.BytesIO(content.encode()))  # type: ignore[arg-type]
            staged = [validate(r, line, rec) for r, line, rec in read_records(stream, kind, FileFormat.csv, errors, hook)]
            out.append((staged, errors.errors))
        assert out[0] == out[1], kind
        assert out[0][1], kind  # the bad rows were reported


def test_phone_validity_shortcut_agrees_with_phonenumbers_everywhere():
    """Every region's example numbers of every type, and random variations of them: the compiled
    metadata shortcut gives exactly phonenumbers.is_valid_number's answer."""
    import random

    import phonenumbers

    from duecourse.ledger.import_rows import _valid_e164

    rng = random.Random(1)
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for numtype in range(12):
            ex = phonenumbers.example_number_for_type(region, numtype)
            if ex is None:
                continue
            nsn = phonenumbers.national_significant_number(ex)
            variants = {nsn, nsn[:-1], nsn + "7"}
            for _ in range(6):
                k = rng.randint(1, min(6, len(nsn)))
                variants.add(nsn[:-k] + "".join(rng.choice("0123456789") for _ in range(k)))
            for v in variants:
                if not v:
                    continue
                num = phonenumbers.PhoneNumber(country_code=ex.country_code, national_number=int(v))
                zeros = len(v) - len(v.lstrip("0"))
                if zeros:
                    num.italian_leading_zero = True
                    num.number_of_leading_zeros = zeros
                got = _valid_e164(ex.country_code, v)
                if got is not None:
                    assert got == phonenumbers.is_valid_number(num), (region, v)
                    checked += 1
    assert checked > 5000


def _account_rows(s: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in s.execute(text("SELECT * FROM accounts ORDER BY id"))]


@pytest.mark.parametrize(
    "exclusions",
    [
        {},
        {"min_balance": Decimal(50), "excluded_tags": ["vip"], "exclude_only_disputed": False},
        {"min_balance": Decimal(0), "excluded_tags": ["b2b"], "exclude_only_disputed": True},
    ],
)
def test_single_pass_refresh_matches_refresh_accounts(org, db, clock, exclusions):
    """The imports' one-UPDATE refresh leaves every account exactly as refresh_accounts does."""
    from duecourse.ledger.derived import refresh_accounts_single_pass
    from duecourse.tenancy.settings import ExclusionSettings

    if db.engine.dialect.name != "postgresql":
        pytest.skip("the single-pass refresh is PostgreSQL only")
    loaded(org)
    excl = ExclusionSettings(**exclusions)
    messy = [
        # stale derived values and every status the fast path accepts, on accounts with and without debt
        (
            "UPDATE accounts SET balance = 7, gross_open = 9, carrying_invoice_id = NULL, collection_tab = 'blocked'"
            " WHERE external_id = 'A1'"
        ),
        "UPDATE accounts SET status = 'resolved', collection_tab = NULL WHERE external_id IN ('A1', 'A2')",
        "UPDATE accounts SET status = 'unassigned', collection_tab = 'outstanding', balance = 5 WHERE external_id = 'A3'",
        "UPDATE invoices SET disputed = FALSE WHERE external_id = 'I3'",
        "UPDATE invoices SET status = 'void' WHERE external_id = 'I2'",
    ]
    now = clock.now() + timedelta(days=3)
    results = []
    for fast in (True, False):
        s = db.sessionmaker()
        try:
            for stmt in messy:
                s.execute(text(stmt))
            ids = [r[0] for r in s.execute(text("SELECT id FROM accounts ORDER BY id"))]
            for scope in (ids[:2], None):
                if fast:
                    assert refresh_accounts_single_pass(
                        s, organization_id=org.id, exclusions=excl, now=now, account_ids=scope
                    )
                else:
                    refresh_accounts(s, organization_id=org.id, exclusions=excl, now=now, account_ids=scope)
                results.append(_account_rows(s))
        finally:
            s.rollback()
            s.close()
    assert results[:2] == results[2:]


def test_single_pass_refresh_declines_accounts_with_a_case(org, db, clock):
    from duecourse.ledger.derived import refresh_accounts_single_pass

    loaded(org)
    with db.transaction() as s:
        s.execute(text("UPDATE accounts SET status = 'in_auto_management' WHERE external_id = 'A1'"))
        before = _account_rows(s)
        assert not refresh_accounts_single_pass(
            s, organization_id=org.id, exclusions=get_settings(s, org.id).exclusions, now=clock.now()
        )
        assert _account_rows(s) == before


# ---------------------------------------------------------------------------------------------
# The pipelined path (PostgreSQL): new rows written chunk by chunk while the file is read

MORE_ACCOUNTS = ACCOUNTS + "A4,Dan,,,,,,JPY,,x,,,,,,,\nA5,Eve,,,,,,,,,,,,,,,\n"
MORE_INVOICES = INVOICES + (
    "I5,A4,,,1000,0,2026-01-01,2026-02-01,,\n"  # JPY taken from the account
    "I6,A5,N-6,EUR,5,5,2026-01-01,2026-02-01,open,\n"  # paid in full: status paid
    "I7,A2,,,7.5,1,2026-01-01,2026-02-01,void,true\n"
)


def _ledger_state(db: Any, org_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """An organization's ledger rows by external ids (no surrogate ids, no timestamps)."""
    queries = {
        "accounts": """SELECT external_id, name, email, phone, whatsapp, timezone, language, currency, score,
                opt_out_email, opt_out_sms, opt_out_whatsapp, opt_out_voice, blocked, blocked_reason, paused,
                on_stop, status, strategy_id, case_number, balance, gross_open, carrying_due_date, collection_tab,
                (SELECT i.external_id FROM invoices i WHERE i.id = a.carrying_invoice_id)
            FROM accounts a WHERE organization_id = :o ORDER BY a.external_id""",
        "tags": """SELECT a.external_id, g.tag, g.organization_id = a.organization_id FROM account_tags g
            JOIN accounts a ON a.id = g.account_id WHERE g.organization_id = :o ORDER BY 1, 2""",
        "invoices": """SELECT i.external_id, a.external_id, i.number, i.currency, i.total, i.amount_paid,
                i.issue_date, i.due_date, i.status, i.disputed, i.organization_id = a.organization_id
            FROM invoices i JOIN accounts a ON a.id = i.account_id WHERE i.organization_id = :o ORDER BY 1""",
        "id_order": """SELECT external_id FROM accounts WHERE organization_id = :o ORDER BY id""",
    }
    with db.engine.connect() as conn:
        return {k: [tuple(r) for r in conn.execute(text(q), {"o": org_id})] for k, q in queries.items()}


@pytest.fixture
def pipelined_calls(monkeypatch):
    """Chunks of two rows, and a record of what the pipelined path decided each time."""
    from duecourse.ledger import imports

    calls: list[bool] = []
    real = imports._run_pipelined

    def spy(*args: Any, **kwargs: Any) -> bool:
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(imports, "PIPELINE_CHUNK_ROWS", 2)
    monkeypatch.setattr(imports, "_run_pipelined", spy)
    return calls


def _run(db: Any, org_id: int, kind: str, content: str, now: Any, **kw: Any) -> dict[str, Any]:
    with db.transaction() as s:
        stream = io.BytesIO(content.encode())
        return run_import(s, organization_id=org_id, kind=kind, stream=stream, now=now, batch_rows=1, **kw).as_dict()


def _fast_then_general(db, org, other_org, clock, pipelined_calls, monkeypatch, accounts, invoices):  # type: ignore[no-untyped-def]
    """Import the two files into ``org`` (the pipelined path on PostgreSQL), then into ``other_org``
    with the pipelined path off; both reports must be the same. Returns the first reports."""
    from duecourse.ledger import imports

    files = (("accounts", accounts), ("invoices", invoices))
    fast = [_run(db, org.id, kind, content, clock.now()) for kind, content in files]
    assert pipelined_calls == ([True, True] if db.engine.dialect.name == "postgresql" else [])
    monkeypatch.setattr(imports, "_PIPELINED", ())
    general = [_run(db, other_org.id, kind, content, clock.now()) for kind, content in files]
    assert fast == general
    return fast


def test_pipelined_path_writes_what_the_general_path_writes(org, other_org, db, clock, pipelined_calls, monkeypatch):
    fast = _fast_then_general(db, org, other_org, clock, pipelined_calls, monkeypatch, MORE_ACCOUNTS, MORE_INVOICES)
    assert fast[0]["inserted"] == 5 and fast[1]["inserted"] == 7
    assert _ledger_state(db, org.id) == _ledger_state(db, other_org.id)
    # and the derived values are what a full refresh gives
    with db.transaction() as s:
        refresh_accounts(s, organization_id=org.id, exclusions=get_settings(s, org.id).exclusions, now=clock.now())
    assert _ledger_state(db, org.id) == _ledger_state(db, other_org.id)


@pytest.mark.parametrize(
    ("kind", "content", "column"),
    [
        ("accounts", MORE_ACCOUNTS + "A1,Again,,,,,,,,,,,,,,,\n", "external_id"),  # duplicate three chunks later
        ("accounts", MORE_ACCOUNTS + "A6,,,,,,,,,,,,,,,,\n", "name"),  # a bad row after chunks were written
        ("accounts", MORE_ACCOUNTS + "A6,Blocked,,,,,,,,,,,,,true,,\n", "blocked_reason"),  # blocked, no reason
        ("invoices", MORE_INVOICES + "I8,NOPE,,,1,0,2026-01-01,2026-02-01,,\n", "account_external_id"),
        ("invoices", MORE_INVOICES + "I9,A4,,,1.5,0,2026-01-01,2026-02-01,,\n", "total"),  # JPY has no decimals
        ("invoices", MORE_INVOICES + "I10,A1,,USD,1,0,2026-01-01,2026-02-01,,\n", "currency"),
        ("invoices", MORE_INVOICES + "I1,A1,N-1,EUR,1,0,2026-01-01,2026-02-01,,\n", "external_id"),
    ],
)
def test_pipelined_path_falls_back_and_reports_like_the_general_path(org, db, clock, pipelined_calls, kind, content, column):
    """A bad row anywhere: whatever chunks were written are rolled back, the general path reports."""
    if kind == "invoices":
        _run(db, org.id, "accounts", MORE_ACCOUNTS, clock.now())
    before = snapshot(db)
    with pytest.raises(ImportRejected) as exc:
        _run(db, org.id, kind, content, clock.now())
    report = exc.value.report
    assert report.error_count == 1 and report.errors[0].column == column, report.as_dict()
    assert report.errors[0].row == content.count("\n") - 1
    assert snapshot(db) == before
    if db.engine.dialect.name == "postgresql":
        assert pipelined_calls[-1] is False


def test_pipelined_path_hands_updates_to_the_general_path(org, db, clock, pipelined_calls):
    """Re-importing (or changing) existing rows is the general path's work; the result is the same."""
    _run(db, org.id, "accounts", MORE_ACCOUNTS, clock.now())
    _run(db, org.id, "invoices", MORE_INVOICES, clock.now())
    before = snapshot(db)
    again = [_run(db, org.id, k, c, clock.now()) for k, c in (("accounts", MORE_ACCOUNTS), ("invoices", MORE_INVOICES))]
    assert [(r["inserted"], r["updated"], r["unchanged"]) for r in again] == [(0, 0, 5), (0, 0, 7)]
    assert snapshot(db) == before
    changed = _run(db, org.id, "accounts", MORE_ACCOUNTS.replace("Eve", "Eva") + "A7,New,,,,,,,,,,,,,,,\n", clock.now())
    assert (changed["inserted"], changed["updated"], changed["unchanged"]) == (1, 1, 4)
    if db.engine.dialect.name == "postgresql":
        assert pipelined_calls[-3:] == [False, False, False]


# Text the COPY format must escape (tab, line breaks, backslashes, a literal \N) and non-ASCII.
AWKWARD_ACCOUNTS = (
    ACCOUNTS_HEADER + "\n"
    'B1,"Tab\there",,,,,,,,"a\\b|c\td",,,,,true,"line one\nline two\r\nthree",\n'
    'B2,\\N,,,,,,,,\\N,,,,,true,"back\\\\slash \\t not a tab",\n'
    "B3,Zoë Ñandú 東京,,,,,,,,ü|ß,,,,,,,\n"
)
AWKWARD_INVOICES = (
    "external_id,account_external_id,number,currency,total,amount_paid,issue_date,due_date,status,disputed\n"
    'J1,B1,"N\t1\\x",,10,0,2026-01-01,2026-02-01,,\n'
    "J2,B2,\\N,,20,5,2026-01-01,2026-02-01,,\n"
    "J3,B3,№ 3,,30,0,2026-01-01,2026-02-01,,\n"
)


@pytest.mark.parametrize("formatter", [True, False], ids=["copy-text-from-reader", "rows-to-writer"])
def test_pipelined_path_stages_awkward_text_exactly(org, other_org, db, clock, pipelined_calls, monkeypatch, formatter):
    """The reading thread formats each batch as COPY text (psycopg's formatter); without that
    formatter the writer thread copies the rows. Either way every value arrives unchanged."""
    from duecourse.ledger import imports

    if not formatter:
        monkeypatch.setattr(imports, "_CopyFormatter", None)
    _fast_then_general(db, org, other_org, clock, pipelined_calls, monkeypatch, AWKWARD_ACCOUNTS, AWKWARD_INVOICES)
    state = _ledger_state(db, org.id)
    assert state == _ledger_state(db, other_org.id)
    names = {r[0]: (r[1], r[14]) for r in state["accounts"]}
    assert names == {
        "B1": ("Tab\there", "line one\nline two\r\nthree"),
        "B2": ("\\N", "back\\\\slash \\t not a tab"),
        "B3": ("Zoë Ñandú 東京", None),
    }
    assert [(r[0], r[1]) for r in state["tags"]] == [("B1", "a\\b"), ("B1", "c\td"), ("B2", "\\N"), ("B3", "ß"), ("B3", "ü")]
    assert [r[2] for r in state["invoices"]] == ["N\t1\\x", "\\N", "№ 3"]


def test_account_indexes_on_tab_strategy_and_campaign_are_partial(db):
    """Accounts without a tab, strategy or campaign (a fresh import) have no entries in these
    indexes; the queries that use them always name a value, which implies NOT NULL."""
    with db.engine.connect() as conn:
        if db.engine.dialect.name == "postgresql":
            rows = conn.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'accounts'")
            ).all()
        else:
            rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'accounts'")).all()
    defs = {name: (sql or "") for name, sql in rows}
    for name, column in (
        ("ix_accounts_org_tab_id", "collection_tab"),
        ("ix_accounts_strategy_stage", "strategy_id"),
        ("ix_accounts_campaign_id", "campaign_id"),
    ):
        assert f"WHERE {column} IS NOT NULL" in defs[name].replace("(", "").replace(")", ""), defs[name]


def test_the_pipelined_path_hands_the_gil_over_quickly_and_restores_the_interval(org, db, clock, pipelined_calls):
    """The reading thread gives the writer thread the GIL every half millisecond while the pipelined
    path runs (the database otherwise waits for the writer; docs/benchmarks.md), and the process's
    own interval is back once the last pipelined import ends, also when two overlap."""
    import sys
    import threading

    from duecourse.ledger import imports

    before = sys.getswitchinterval()
    seen: list[float] = []
    with db.transaction() as s:
        run_import(s, organization_id=org.id, kind="accounts", stream=io.BytesIO(MORE_ACCOUNTS.encode()),
                   now=clock.now(), batch_rows=1, progress=lambda _b, _r: seen.append(sys.getswitchinterval()))
    pipelined = db.engine.dialect.name == "postgresql"
    assert pipelined_calls == ([True] if pipelined else [])
    during = imports.PIPELINE_SWITCH_INTERVAL if pipelined else before
    assert seen and all(x == during for x in seen[:-1])  # (the last call comes after the writer is done)
    assert sys.getswitchinterval() == before
    # Two at once (an upload while a CLI-like import runs in the same process): restored by the last.
    first_in, release = threading.Event(), threading.Event()

    def other() -> None:
        with imports._quick_gil_handoff():
            first_in.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    first_in.wait(10)
    with imports._quick_gil_handoff():
        assert sys.getswitchinterval() == imports.PIPELINE_SWITCH_INTERVAL
    assert sys.getswitchinterval() == imports.PIPELINE_SWITCH_INTERVAL  # the other is still running
    release.set()
    thread.join(10)
    assert sys.getswitchinterval() == before
