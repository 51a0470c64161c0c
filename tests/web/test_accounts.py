"""The Accounts pages (SPEC §2, §4.9, §8) in a real browser, on SQLite and PostgreSQL: search as you
type, the detail with the carrying invoice and the Strategy Execution card, recording a payment,
blocking, and what a viewer may not do."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal

from playwright.sync_api import expect
from sqlalchemy import select

from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry
from duecourse.ledger.models import Account, Invoice
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import SCREENSHOTS, LiveServer, WebOrg


def seed_accounts(server: LiveServer, org: WebOrg) -> dict[str, int]:
    """A call-first strategy, two overdue debtors (Maria with two invoices), then one engine cycle:
    both are assigned, their first stage (a phone call) is dispatched as an agent task."""
    now = server.clock.now()
    with server.db.transaction() as session:
        strategy(session, org.id, now, [("phone_call", "t", 0), ("email", "p", 1)], name="Calls first")
        maria = debtor(session, org.id, now, "ACC-001", due=date(2026, 2, 1), total="300.00", name="Maria Lopez")
        session.add(Invoice(
            organization_id=org.id, account_id=maria.id, external_id="ACC-001-2", number="ACC-001-2", currency="EUR",
            total=Decimal("200.00"), issue_date=date(2026, 1, 20), due_date=date(2026, 2, 20), created_at=now, updated_at=now,
        ))
        john = debtor(session, org.id, now, "ACC-002", due=date(2026, 2, 10), name="John Smith", phone="+34600111333")
        ids = {"maria": maria.id, "john": john.id}
        refresh(session, org.id, now)
    tick(server.db, now=now)
    return ids


def test_search_detail_and_strategy_execution_card(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = seed_accounts(server, web_org)
    with server.db.transaction() as session:
        for n in range(20):  # enough history for a second page of the log
            session.add(ExecutionLogEntry(
                organization_id=web_org.id, account_id=ids["maria"], at=server.clock.now() + timedelta(minutes=n),
                event="skipped", stage_index=1, reason="outside_hours", cause="dispatch",
            ))
        # An adaptive-timing adjustment, as a voice outcome writes it.
        session.add(ExecutionLogEntry(
            organization_id=web_org.id, account_id=ids["maria"], at=server.clock.now() + timedelta(minutes=5),
            event="adaptive_timing", stage_index=1, reason="negative",
            details={"sentiment": "hostile", "willingness": 1, "factor": "2", "original_delay_days": 4,
                     "new_delay_days": 8, "tone": "empathetic"},
        ))
        session.get(Account, ids["maria"]).email_invalid = True
    page = login_as("viewer")
    page.goto("/accounts")
    rows = page.get_by_test_id("account-row")
    expect(rows).to_have_count(2)
    expect(page.get_by_test_id("account-table")).to_contain_text("Calls first")
    if server.db.dialect == "sqlite":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "accounts.png"))
    # Search as you type: the table is replaced without a page load.
    page.get_by_test_id("account-search").press_sequentially("mari")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Maria Lopez")
    expect(rows.first).to_contain_text("500.00")
    expect(page).to_have_url(re.compile(r"/accounts\?q=mari"))
    page.get_by_test_id("account-search").fill("nobody")
    expect(page.get_by_test_id("no-accounts")).to_be_visible()
    page.get_by_test_id("account-search").fill("acc-002")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("John Smith")
    page.get_by_test_id("account-search").fill("")
    page.get_by_test_id("filter-status").select_option("in_auto_management")
    expect(rows).to_have_count(2)

    page.goto(f"/accounts/{ids['maria']}")
    expect(page.get_by_test_id("balance-amount")).to_have_text("500.00")
    expect(page.get_by_test_id("account-status")).to_have_text("In auto management")
    expect(page.get_by_test_id("email-invalid")).to_be_visible()
    # The carrying invoice (oldest open by due date) is marked; the other is not.
    carrying = page.locator("[data-testid=invoice-row][data-number='ACC-001-1']")
    expect(carrying.get_by_test_id("carrying-invoice")).to_be_visible()
    expect(page.locator("[data-testid=invoice-row][data-number='ACC-001-2']").get_by_test_id("carrying-invoice")).to_have_count(0)
    # Strategy Execution: the cycle's entries, newest first, with the adaptive-timing signals and delays.
    log = page.get_by_test_id("log-row")
    expect(log.first).to_have_attribute("data-event", "adaptive_timing")
    expect(page.get_by_test_id("adaptive-timing")).to_contain_text("Hostile")
    expect(page.get_by_test_id("adaptive-delay")).to_contain_text(re.compile(r"4\s*→\s*8\s*days"))
    expect(log).to_have_count(20)
    expect(page.locator("[data-testid=log-row][data-event=skipped]").first).to_contain_text("Outside hours")
    # Older entries on the next page: the engine cycle's assignment, enqueue and dispatch.
    page.get_by_test_id("strategy-execution").get_by_test_id("next-page").click()
    expect(log.first).to_have_attribute("data-event", "skipped")
    for event in ("assigned", "enqueued", "dispatched"):
        expect(page.locator(f"[data-testid=log-row][data-event={event}]").first).to_be_visible()
    expect(page.get_by_test_id("account-task-row")).to_have_count(1)
    if server.db.dialect == "sqlite":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "account-detail.png"), full_page=True)
    # A viewer reads but cannot record payments or block: no forms, and the server refuses.
    expect(page.get_by_test_id("payment-form")).to_have_count(0)
    expect(page.get_by_test_id("block-menu")).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    refused = page.request.post(f"/accounts/{ids['maria']}/payments", form={"csrf_token": token, "amount": "10"})
    assert refused.status == 403
    assert page.request.post(f"/accounts/{ids['maria']}/block", form={"csrf_token": token, "reason": "x"}).status == 403
    assert page.request.get("/accounts/999999").status == 404


def test_record_payment_and_block(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = seed_accounts(server, web_org)
    page = login_as("manager")
    page.goto(f"/accounts/{ids['maria']}")
    expect(page.get_by_test_id("balance-amount")).to_have_text("500.00")
    # A bad amount: the error beside the field, the other input kept.
    page.get_by_test_id("payment-amount").fill("abc")
    page.get_by_test_id("payment-reference").fill("TRX-77")
    page.get_by_test_id("record-payment").click()
    expect(page.locator("[data-error-for=amount]")).to_be_visible()
    expect(page.get_by_test_id("payment-reference")).to_have_value("TRX-77")
    expect(page.get_by_test_id("balance-amount")).to_have_text("500.00")
    page.get_by_test_id("payment-date").fill("2026-03-09")  # after the account's today
    page.get_by_test_id("payment-amount").fill("120.50")
    page.get_by_test_id("record-payment").click()
    expect(page.locator("[data-error-for=paid_on]")).to_contain_text("future")
    page.get_by_test_id("payment-date").fill("2026-03-01")
    page.get_by_test_id("record-payment").click()
    expect(page.locator(".flash-success")).to_contain_text("Payment of 120.50 EUR recorded")
    expect(page.get_by_test_id("balance-amount")).to_have_text("379.50")
    expect(page.get_by_test_id("payment-row")).to_have_count(1)
    expect(page.get_by_test_id("payment-row").first).to_contain_text("TRX-77")
    # Block needs a reason; then unblock.
    page.locator("[data-testid=block-menu] > summary").click()
    page.get_by_test_id("block").click()
    expect(page.locator("[data-error-for=reason]")).to_be_visible()
    page.get_by_test_id("block-reason").fill("Lawyer letter received")
    page.get_by_test_id("block").click()
    expect(page.get_by_test_id("blocked-banner")).to_contain_text("Lawyer letter received")
    expect(page.get_by_test_id("account-tab")).to_have_text("Blocked")
    page.get_by_test_id("unblock").click()
    expect(page.get_by_test_id("blocked-banner")).to_have_count(0)
    with server.db.transaction() as session:
        account = session.scalar(select(Account).where(Account.id == ids["maria"]))
        assert account is not None and account.balance == Decimal("379.50") and not account.blocked
