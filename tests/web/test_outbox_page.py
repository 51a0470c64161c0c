"""The Sandbox outbox page (SPEC §7): messages the sandbox would have sent, after a real engine tick."""

from __future__ import annotations

import re
from datetime import date

from playwright.sync_api import expect

from duecourse.engine.cycle import tick
from duecourse.messaging.models import Template
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import LiveServer, WebOrg


def _seed_and_tick(server: LiveServer, org: WebOrg) -> int:
    """An email strategy due now and one overdue debtor; one tick sends the email through the sandbox."""
    now = server.clock.now()
    with server.db.transaction() as session:
        tpl = Template(
            organization_id=org.id, name="First reminder", channel="email", tone="standard",
            subject="Invoice {{ carrying_invoice_number }} is overdue",
            body_text="Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}.",
            body_html="<p>Hello <b>{{ debtor_name }}</b></p>", created_at=now, updated_at=now,
        )
        session.add(tpl)
        session.flush()
        st = strategy(session, org.id, now, [("email", "t", 0)], trigger_type="days_overdue", trigger_days=0)
        st.stages[0].template_id = tpl.id
        account = debtor(session, org.id, now, "OUT-1", due=date(2026, 3, 1), name="Olga Outbox")
        account_id = account.id
        refresh(session, org.id, now)
    result = tick(server.db, now=now, organization_id=org.id)
    assert result["dispatch"] == {"dispatched": 1}, result
    return account_id


def test_outbox_lists_a_message_after_a_tick(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("viewer")
    page.goto("/outbox")
    expect(page.get_by_test_id("outbox-row")).to_have_count(0)
    account_id = _seed_and_tick(server, web_org)
    page.goto("/outbox")
    row = page.get_by_test_id("outbox-row")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("out-1@example.com")
    expect(row).to_contain_text("Invoice OUT-1-1 is overdue")
    expect(row.get_by_test_id("outbox-account")).to_have_attribute("href", f"/accounts/{account_id}")
    # The channel filter.
    page.get_by_test_id("filter-channel").select_option("sms")
    expect(page).to_have_url(re.compile(r"/outbox\?channel=sms$"))
    expect(page.get_by_test_id("outbox-row")).to_have_count(0)
    page.get_by_test_id("filter-channel").select_option("email")
    expect(page.get_by_test_id("outbox-row")).to_have_count(1)
    # The detail: text and the HTML body in a sandboxed frame.
    page.get_by_test_id("outbox-open").click()
    expect(page.get_by_test_id("message-text")).to_contain_text("Hello Olga Outbox, you owe")
    frame = page.get_by_test_id("message-html")
    expect(frame).to_have_attribute("sandbox", "")
    expect(page.frame_locator("[data-testid=message-html]").locator("b")).to_have_text("Olga Outbox")
    # Another organization's message is not found.
    assert page.request.get("/outbox/999999").status == 404
