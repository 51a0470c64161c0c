"""The Import page (SPEC §2): a refused file lists row, line, column and reason and changes nothing;
a good file imports and shows the counts; roles without import rights cannot upload."""

from __future__ import annotations

import time
from pathlib import Path

from playwright.sync_api import expect
from sqlalchemy import func, select

from duecourse.ledger.models import Account
from tests.web.conftest import LiveServer, WebOrg


def _accounts(server: LiveServer, org: WebOrg) -> int:
    with server.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(Account).where(Account.organization_id == org.id)) or 0


def test_bad_csv_is_refused_then_good_csv_imports(server: LiveServer, web_org: WebOrg, login_as, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad_accounts.csv"
    bad.write_text("external_id,name,email,score\nA-1,Ada,ada@example.com,10\nA-2,Bob,bob@example.com,150\n")
    good = tmp_path / "accounts.csv"
    good.write_text("external_id,name,email,score,tags\nA-1,Ada,ada@example.com,10,vip\nA-2,Bob,bob@example.com,50,\n")
    page = login_as("manager")
    page.goto("/import")
    expect(page.get_by_test_id("import-columns")).to_contain_text("external_id*")
    page.get_by_test_id("kind-accounts").check()
    page.get_by_test_id("import-file").set_input_files(str(bad))
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-rejected")).to_contain_text("Nothing was imported")
    error = page.get_by_test_id("import-error")
    expect(error).to_have_count(1)
    expect(error.get_by_test_id("err-row")).to_have_text("2")
    expect(error.get_by_test_id("err-line")).to_have_text("3")
    expect(error.get_by_test_id("err-column")).to_have_text("score")
    expect(error.get_by_test_id("err-message")).not_to_be_empty()
    assert _accounts(server, web_org) == 0
    # The good file: the counts; the same file again changes nothing. While it travels and the
    # server imports, the page shows the progress bar (the request is held here to look at it).
    held = []
    page.route("**/import", lambda route: held.append(route) if route.request.method == "POST" else route.continue_())
    page.get_by_test_id("import-file").set_input_files(str(good))
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-progress")).to_be_visible()
    expect(page.get_by_test_id("import-busy")).to_be_visible()
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)  # Playwright hands the held request to the route handler meanwhile
    assert len(held) == 1
    held[0].continue_()
    page.unroute("**/import")
    expect(page.get_by_test_id("import-inserted")).to_have_text("2")
    expect(page.get_by_test_id("import-rows")).to_have_text("2")
    assert _accounts(server, web_org) == 2
    page.get_by_test_id("import-file").set_input_files(str(good))
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-unchanged")).to_have_text("2")
    expect(page.get_by_test_id("import-inserted")).to_have_text("0")
    # Invoices referencing an unknown account are refused with the column named.
    invoices = tmp_path / "invoices.json"
    invoices.write_text('[{"external_id": "I-1", "account_external_id": "NOPE", "total": "10.00",'
                        ' "issue_date": "2026-01-01", "due_date": "2026-02-01"}]')
    page.get_by_test_id("kind-invoices").check()
    page.get_by_test_id("import-file").set_input_files(str(invoices))
    page.get_by_test_id("import-submit").click()
    expect(page.get_by_test_id("import-error").get_by_test_id("err-column")).to_have_text("account_external_id")
    # A viewer sees no upload form, and the server refuses the POST.
    viewer = login_as("viewer")
    viewer.goto("/import")
    expect(viewer.get_by_test_id("import-form")).to_have_count(0)
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
    response = viewer.request.post("/import", multipart={
        "csrf_token": token, "kind": "accounts",
        "file": {"name": "a.csv", "mimeType": "text/csv", "buffer": good.read_bytes()},
    })
    assert response.status == 403
    assert _accounts(server, web_org) == 2
