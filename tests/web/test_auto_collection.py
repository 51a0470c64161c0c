"""The Auto Collection screen (SPEC §6, seed 003) in a real browser, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import date, timedelta

from playwright.sync_api import expect
from sqlalchemy import func, select

from duecourse.ledger import service as ledger
from duecourse.ledger.models import Account, CollectionTab
from duecourse.tenancy.service import get_settings
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import LiveServer, WebOrg

# external id -> (status, has strategy)
LAYOUT = {
    "OUT-1": ("unassigned", False),
    "OUT-2": ("unassigned", False),
    "SCH-1": ("pending_contact", True),
    "SCH-2": ("pending_contact", True),
    "SCH-3": ("pending_contact", True),
    "ENG-1": ("in_auto_management", True),
    "ENG-2": ("promise_pending", True),
    "FUP-1": ("sequence_completed", True),
    "BLK-1": ("unassigned", False),
}


def _seed(server: LiveServer, org: WebOrg) -> dict[str, int]:
    now = server.clock.now()
    ids = {}
    with server.db.transaction() as session:
        st = strategy(session, org.id, now, [("email", "t", 0)], name="Gentle reminders")
        for i, (ext, (status, assigned)) in enumerate(LAYOUT.items()):
            a = debtor(session, org.id, now, ext, due=date(2026, 2, 20) - timedelta(days=10 * i), name=f"Debtor {ext}",
                       status=status, strategy_id=st.id if assigned else None)
            ids[ext] = a.id
        refresh(session, org.id, now)
        ledger.block_account(session, organization_id=org.id, account_id=ids["BLK-1"], reason="Customer in litigation",
                             now=now)
    return ids


def _db_counts(server: LiveServer, org_id: int) -> dict[str, int]:
    with server.db.transaction() as s:
        rows = s.execute(select(Account.collection_tab, func.count()).where(Account.organization_id == org_id)
                         .group_by(Account.collection_tab)).all()
    counts = {t.value: 0 for t in CollectionTab}
    counts.update({CollectionTab(t).value: n for t, n in rows if t is not None})
    return counts


def _expect_counts(page, expected: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    for tab, n in expected.items():
        expect(page.get_by_test_id(f"count-{tab}")).to_have_text(str(n))


def test_tab_counts_match_the_database_and_block_unblock(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = _seed(server, web_org)
    expected = {"outstanding": 2, "scheduled": 3, "engaged": 2, "follow_up": 1, "blocked": 1}
    assert _db_counts(server, web_org.id) == expected
    page = login_as("manager")
    page.goto("/auto-collection")
    _expect_counts(page, expected)
    expect(page.get_by_test_id("tab-outstanding")).to_have_attribute("aria-current", "page")
    expect(page.get_by_test_id("account-row")).to_have_count(2)
    expect(page.get_by_test_id("exclusion-settings")).to_have_attribute("href", "/settings#exclusions")
    page.get_by_test_id("tab-scheduled").click()
    expect(page).to_have_url(re.compile(r"tab=scheduled"))
    rows = page.get_by_test_id("account-row")
    expect(rows).to_have_count(3)
    row = page.locator("[data-testid=account-row][data-external-id=SCH-2]")
    expect(row).to_contain_text("Gentle reminders")
    expect(row).to_contain_text("Pending contact")
    expect(row).to_contain_text("100.00 EUR")
    expect(row.locator("td").nth(2)).to_have_text("40")  # due 2026-01-21, today 2026-03-02 in Madrid
    # Block without a reason: refused beside the field; nothing moved.
    row.get_by_test_id("block-menu").locator("summary").click()
    row.get_by_test_id("block").click()
    row = page.locator("[data-testid=account-row][data-external-id=SCH-2]")
    expect(row.locator("[data-error-for=reason]")).to_have_text("Reason is required")
    _expect_counts(page, expected)
    row.get_by_test_id("block-reason").fill("Asked to be contacted by post only")
    row.get_by_test_id("block").click()
    expect(page.locator(".flash")).to_contain_text("Debtor SCH-2 blocked")
    expect(page).to_have_url(re.compile(r"tab=scheduled"))
    moved = {**expected, "scheduled": 2, "blocked": 2}
    _expect_counts(page, moved)
    assert _db_counts(server, web_org.id) == moved
    expect(page.get_by_test_id("account-row")).to_have_count(2)
    page.get_by_test_id("tab-blocked").click()
    blocked_row = page.locator("[data-testid=account-row][data-external-id=SCH-2]")
    expect(blocked_row).to_contain_text("Asked to be contacted by post only")
    blocked_row.get_by_test_id("unblock").click()
    expect(page.locator(".flash")).to_contain_text("Debtor SCH-2 unblocked. It is now in Scheduled.")
    _expect_counts(page, expected)
    assert _db_counts(server, web_org.id) == expected
    expect(page.get_by_test_id("account-row")).to_have_count(1)
    with server.db.transaction() as s:
        account = s.get(Account, ids["SCH-2"])
        assert account.blocked is False and account.collection_tab == CollectionTab.scheduled


def test_pause_resume_automation_and_viewer_refused(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = _seed(server, web_org)
    page = login_as("manager")
    page.goto("/auto-collection?tab=engaged")
    expect(page.get_by_test_id("account-row")).to_have_count(2)
    page.get_by_test_id("pause").click()
    expect(page.get_by_test_id("engine-paused")).to_be_visible()
    expect(page).to_have_url(re.compile(r"tab=engaged"))
    with server.db.transaction() as s:
        assert get_settings(s, web_org.id).automation.engine_paused is True
    page.goto("/execution")
    expect(page.get_by_test_id("engine-paused")).to_be_visible()
    page.goto("/auto-collection")
    page.get_by_test_id("resume").click()
    expect(page.get_by_test_id("pause")).to_be_visible()
    expect(page.get_by_test_id("engine-paused")).to_have_count(0)
    with server.db.transaction() as s:
        assert get_settings(s, web_org.id).automation.engine_paused is False

    viewer = login_as("viewer")
    viewer.goto("/auto-collection?tab=blocked")
    expect(viewer.get_by_test_id("account-row")).to_have_count(1)
    expect(viewer.get_by_test_id("count-blocked")).to_have_text("1")
    expect(viewer.get_by_test_id("exclusion-settings")).to_be_visible()
    for testid in ("pause", "resume", "unblock", "block-menu"):
        expect(viewer.get_by_test_id(testid)).to_have_count(0)
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    for url, form in (
        ("/auto-collection/pause", {}),
        (f"/auto-collection/accounts/{ids['BLK-1']}/unblock", {}),
        (f"/auto-collection/accounts/{ids['OUT-1']}/block", {"reason": "no"}),
    ):
        response = viewer.request.post(url, form={"csrf_token": token, **form})
        assert response.status == 403, url
    assert _db_counts(server, web_org.id)["blocked"] == 1
    with server.db.transaction() as s:
        assert get_settings(s, web_org.id).automation.engine_paused is False
