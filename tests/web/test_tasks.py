"""The Tasks page (SPEC §4.8, §8) in a real browser, on SQLite and PostgreSQL: an agent logs a task's
outcome (errors beside the fields, then a promise to pay that completes the stage), and a viewer may not."""

from __future__ import annotations

from decimal import Decimal

from playwright.sync_api import expect
from sqlalchemy import select

from duecourse.engine.models import Task
from duecourse.ledger.models import Account, Promise
from tests.web.conftest import SCREENSHOTS, LiveServer, WebOrg
from tests.web.test_accounts import seed_accounts


def _task_id(server: LiveServer, account_id: int) -> int:
    with server.db.transaction() as session:
        task_id = session.scalar(select(Task.id).where(Task.account_id == account_id))
        assert task_id is not None
        return task_id


def test_logging_a_task_outcome(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = seed_accounts(server, web_org)
    task_id = _task_id(server, ids["maria"])
    page = login_as("agent")
    page.goto("/tasks")
    expect(page.get_by_test_id("task-row")).to_have_count(2)
    row = page.locator(f"#task-{task_id}")
    expect(row).to_contain_text("Maria Lopez")
    expect(row).to_contain_text("Phone call")
    expect(row).to_contain_text("Stage 1")
    row.get_by_test_id("log-outcome-toggle").click()
    form = page.locator(f"#log-{task_id}").get_by_test_id("outcome-form")
    form.get_by_test_id("outcome").select_option("promise_to_pay")
    form.get_by_test_id("sentiment").select_option("positive")
    form.get_by_test_id("willingness").select_option("4")
    form.get_by_test_id("promise-date").fill("2026-03-20")
    form.get_by_test_id("note").fill("Will pay on the 20th")
    # A promise without an amount: the error beside the amount, everything typed kept, nothing changed.
    form.get_by_test_id("submit-outcome").click()
    form = page.locator(f"#log-{task_id}").get_by_test_id("outcome-form")
    expect(form.locator("[data-error-for=promise_amount]")).to_be_visible()
    expect(form.locator("[data-error-for=promise_date]")).to_have_count(0)
    expect(form.get_by_test_id("promise-date")).to_have_value("2026-03-20")
    expect(form.get_by_test_id("note")).to_have_value("Will pay on the 20th")
    expect(form.get_by_test_id("outcome")).to_have_value("promise_to_pay")
    if server.db.dialect == "sqlite":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "tasks.png"), full_page=True)
    with server.db.transaction() as session:
        assert session.get(Task, task_id).status == "open"
    form.get_by_test_id("promise-amount").fill("150.00")
    form.get_by_test_id("submit-outcome").click()
    expect(page.locator(".flash-success")).to_contain_text("Outcome logged for Maria Lopez: promise to pay")
    # The task left the open list; the other one stays.
    expect(page.locator(f"#task-{task_id}")).to_have_count(0)
    expect(page.get_by_test_id("task-row")).to_have_count(1)
    page.get_by_test_id("tab-done").click()
    expect(page.locator(f"#task-{task_id}").get_by_test_id("task-outcome")).to_have_text("Promise to pay")
    # The stage completed and the account waits for the promise.
    page.goto(f"/accounts/{ids['maria']}")
    expect(page.get_by_test_id("account-status")).to_have_text("Promise pending")
    expect(page.get_by_test_id("promise-status").first).to_have_text("Pending")
    expect(page.locator("[data-testid=log-row][data-event=task_outcome]")).to_have_count(1)
    expect(page.get_by_test_id("interaction-row").first).to_contain_text("Will pay on the 20th")
    with server.db.transaction() as session:
        account = session.get(Account, ids["maria"])
        assert account is not None and (account.status, account.case_next_stage) == ("promise_pending", 1)
        promise = session.scalars(select(Promise)).one()
        assert (promise.amount, str(promise.promised_date), promise.source) == (Decimal("150.00"), "2026-03-20", "agent")


def test_callback_needs_a_time_and_a_viewer_cannot_log(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    ids = seed_accounts(server, web_org)
    task_id = _task_id(server, ids["john"])
    viewer = login_as("viewer")
    viewer.goto("/tasks")
    expect(viewer.get_by_test_id("task-row")).to_have_count(2)
    expect(viewer.get_by_test_id("log-outcome-toggle")).to_have_count(0)
    expect(viewer.get_by_test_id("outcome-form")).to_have_count(0)
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    refused = viewer.request.post(f"/tasks/{task_id}/outcome", form={"csrf_token": token, "outcome": "refused"})
    assert refused.status == 403
    with server.db.transaction() as session:
        assert session.get(Task, task_id).status == "open"
    # An agent: a callback without its time is refused beside the field; with it, the account waits.
    agent = login_as("agent")
    agent.goto(f"/tasks#task-{task_id}")  # the account page's link: that task's form is open
    form = agent.locator(f"#log-{task_id}").get_by_test_id("outcome-form")
    expect(form).to_be_visible()
    form.get_by_test_id("outcome").select_option("callback_requested")
    form.get_by_test_id("submit-outcome").click()
    form = agent.locator(f"#log-{task_id}").get_by_test_id("outcome-form")
    expect(form.locator("[data-error-for=callback_at]")).to_be_visible()
    form.get_by_test_id("callback-at").fill("2026-03-03T16:30")
    form.get_by_test_id("submit-outcome").click()
    expect(agent.locator(".flash-success")).to_contain_text("callback requested")
    with server.db.transaction() as session:
        account = session.get(Account, ids["john"])
        assert account is not None and account.status == "callback_pending"
        assert account.callback_at is not None and account.callback_at.isoformat().startswith("2026-03-03T15:30")  # Madrid +1
