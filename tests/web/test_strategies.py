"""The Strategies list and editor (SPEC §3, seed 002) in a real browser, on SQLite and PostgreSQL."""

from __future__ import annotations

import re

from playwright.sync_api import expect
from sqlalchemy import select

from duecourse.demo import DEMO_EMAIL, load_demo
from duecourse.engine.cycle import tick
from duecourse.strategies import service as strategies
from duecourse.strategies.models import Strategy
from duecourse.tenancy.models import User
from duecourse.tenancy.principal import Principal
from tests.engine_helpers import strategy
from tests.web.conftest import SCREENSHOTS, LiveServer, WebOrg


def _seed_strategy(server: LiveServer, org: WebOrg, stages=(("email", "t", 0), ("phone_call", "p", 7)), **kw) -> int:  # type: ignore[no-untyped-def]
    with server.db.transaction() as session:
        return strategy(session, org.id, server.clock.now(), list(stages),
                        **{"name": "Friendly reminders", "description": "Two gentle emails", **kw}).id


def _error(page, field: str):  # type: ignore[no-untyped-def]
    return page.locator(f'[data-error-for="{field}"]')


def test_viewer_sees_no_edit_buttons_and_posts_are_refused(server: LiveServer, web_org: WebOrg, viewer_page) -> None:  # type: ignore[no-untyped-def]
    sid = _seed_strategy(server, web_org, active=False)
    page = viewer_page
    page.goto("/strategies")
    expect(page.get_by_test_id("strategy-row")).to_have_count(1)
    expect(page.get_by_test_id("create-strategy")).to_have_count(0)
    expect(page.get_by_test_id("toggle")).to_have_count(0)
    page.get_by_test_id("row-menu").locator("summary").click()
    menu = page.get_by_test_id("row-menu")
    expect(menu).to_contain_text("View Performance")
    expect(menu.get_by_role("button")).to_have_count(0)  # no Activate, Run Now or Delete
    page.goto(f"/strategies/{sid}")
    expect(page.get_by_test_id("name")).to_be_disabled()
    expect(page.get_by_test_id("save")).to_have_count(0)
    expect(page.get_by_test_id("toggle-active")).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    for url in (f"/strategies/{sid}/activate", f"/strategies/{sid}/delete", "/strategies/new", f"/strategies/{sid}"):
        response = page.request.post(url, form={"csrf_token": token, "name": "hacked"})
        assert response.status == 403, url
        assert "cannot manage strategies" in response.text()
    page.goto("/strategies/new")
    expect(page.get_by_test_id("error")).to_contain_text("cannot manage strategies")
    page.goto(f"/strategies/{sid}/performance")  # read-only tabs stay open to viewers
    expect(page.get_by_test_id("perf-warning")).to_contain_text("The strategy is inactive")
    with server.db.transaction() as session:
        assert session.get(Strategy, sid).active is False


def test_invalid_stage_shows_the_error_beside_the_field_and_keeps_the_input(server: LiveServer, web_org: WebOrg, admin_page) -> None:  # type: ignore[no-untyped-def]
    page = admin_page
    page.goto("/strategies")
    page.get_by_test_id("create-strategy").click()
    expect(page).to_have_url(re.compile(r"/strategies/new$"))
    page.get_by_test_id("name").fill("Gentle start")
    page.get_by_test_id("description").fill("Reminders for small balances")
    page.get_by_test_id("trigger-days").fill("3")
    page.get_by_test_id("add-stage").click()
    stages = page.get_by_test_id("stage")
    expect(stages).to_have_count(2)
    stages.nth(0).get_by_test_id("stage-timing").select_option("days_from_previous")
    stages.nth(0).get_by_test_id("stage-days").fill("-2")
    stages.nth(1).get_by_test_id("stage-days").fill("ten")
    page.get_by_test_id("save").click()
    # The shape errors first (a number that is not one) ...
    expect(page.get_by_test_id("form-errors")).to_be_visible()
    expect(_error(page, "stages[1].days")).to_have_text("must be a whole number")
    expect(page.get_by_test_id("stage").nth(1)).to_have_class(re.compile("has-error"))
    # ... with everything the user typed still there.
    expect(page.get_by_test_id("name")).to_have_value("Gentle start")
    expect(page.get_by_test_id("description")).to_have_value("Reminders for small balances")
    expect(page.get_by_test_id("trigger-days")).to_have_value("3")
    expect(stages.nth(0).get_by_test_id("stage-timing")).to_have_value("days_from_previous")
    expect(stages.nth(0).get_by_test_id("stage-days")).to_have_value("-2")
    expect(stages.nth(1).get_by_test_id("stage-days")).to_have_value("ten")
    # Then the strategy rules of the service, each beside its field.
    stages.nth(1).get_by_test_id("stage-days").fill("10")
    page.get_by_test_id("save").click()
    expect(_error(page, "stages[0].timing_type")).to_have_text("the first stage must use days_from_trigger")
    expect(_error(page, "stages[0].days")).to_contain_text("must be 0 or more")
    expect(_error(page, "stages[1].days")).to_have_count(0)
    expect(stages.nth(0).get_by_test_id("stage-days")).to_have_value("-2")
    expect(stages.nth(1).get_by_test_id("stage-days")).to_have_value("10")
    expect(page.get_by_test_id("name")).to_have_value("Gentle start")
    with server.db.transaction() as session:
        assert session.scalar(select(Strategy.id)) is None


def test_create_a_valid_strategy_then_find_toggle_and_audit_it(server: LiveServer, web_org: WebOrg, admin_page) -> None:  # type: ignore[no-untyped-def]
    nine = _seed_strategy(server, web_org, stages=[("phone_call", "t", 0)] + [("phone_call", "p", d) for d in range(1, 9)])
    page = admin_page
    # At most 10 stages: the Add Stage button is disabled at 10 and enabled again after a removal.
    page.goto(f"/strategies/{nine}")
    expect(page.get_by_test_id("stage")).to_have_count(9)
    page.get_by_test_id("add-stage").click()
    expect(page.get_by_test_id("stage")).to_have_count(10)
    expect(page.get_by_test_id("add-stage")).to_be_disabled()
    page.get_by_test_id("stage").nth(3).get_by_test_id("remove-stage").click()
    expect(page.get_by_test_id("stage")).to_have_count(9)
    expect(page.get_by_test_id("add-stage")).to_be_enabled()
    expect(page.get_by_test_id("stage").nth(3).get_by_test_id("stage-days")).to_have_value("4")  # days kept
    page.goto("/strategies/new")
    page.get_by_test_id("name").fill("VIP courtesy")
    page.get_by_test_id("type").select_option("vip")
    page.get_by_test_id("description").fill("A call before any email for our best customers")
    page.get_by_test_id("trigger-type").select_option("amount_threshold")
    expect(page.get_by_test_id("trigger-days")).to_be_hidden()
    page.get_by_test_id("trigger-amount").fill("2500")
    page.get_by_test_id("stage").nth(0).get_by_test_id("stage-action").select_option("phone_call")
    expect(page.get_by_test_id("stage").nth(0).get_by_test_id("stage-template")).to_be_hidden()
    page.get_by_test_id("add-stage").click()
    stages = page.get_by_test_id("stage")
    expect(stages).to_have_count(2)
    stages.nth(1).get_by_test_id("stage-action").select_option("escalation")
    stages.nth(1).get_by_test_id("stage-days").fill("4")
    stages.nth(1).get_by_role("button", name="Move stage 2 up").click()  # scripted: no round trip
    expect(stages.nth(0).get_by_test_id("stage-action")).to_have_value("escalation")
    expect(stages.nth(0).get_by_test_id("stage-days")).to_have_value("4")
    stages.nth(0).get_by_role("button", name="Move stage 1 down").click()
    expect(stages.nth(1).get_by_test_id("stage-action")).to_have_value("escalation")
    page.get_by_test_id("save").click()
    expect(page.locator(".flash")).to_contain_text("Strategy 'VIP courtesy' created")
    expect(page.get_by_test_id("tab-settings")).to_have_class(re.compile("active"))
    with server.db.transaction() as session:
        saved = session.scalar(select(Strategy).where(Strategy.name == "VIP courtesy"))
        assert saved is not None and str(saved.trigger_amount) == "2500.0000"
        assert [(s.action_type.value, s.timing_type.value, s.days) for s in saved.stages] == [
            ("phone_call", "days_from_trigger", 0), ("escalation", "days_from_previous", 4)]

    page.goto("/strategies")
    expect(page.get_by_test_id("strategy-row")).to_have_count(2)
    page.get_by_test_id("search").press_sequentially("vip")
    expect(page.get_by_test_id("strategy-row")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"q=vip"))
    row = page.get_by_test_id("strategy-row")
    expect(row.locator(".badge.type-vip")).to_have_text("VIP")
    row.get_by_test_id("toggle").click()  # a phone call and an escalation need no template: activation works
    expect(page.locator(".flash")).to_contain_text("activated")
    page.get_by_test_id("filter-status").select_option("inactive")
    expect(page.get_by_test_id("strategy-row")).to_have_count(0)
    page.get_by_test_id("filter-status").select_option("active")
    page.get_by_test_id("search").fill("")
    expect(page.get_by_test_id("strategy-row")).to_have_count(2)
    page.get_by_test_id("filter-type").select_option("vip")
    expect(page.get_by_test_id("strategy-row")).to_have_count(1)
    # The live filter swaps the table in when its fetch answers: open the menu on the final table.
    expect(page).to_have_url(re.compile(r"type=vip"))
    page.wait_for_load_state("networkidle")
    page.get_by_test_id("row-menu").locator("summary").click()
    expect(page.get_by_test_id("run-now")).to_be_visible()
    expect(page.get_by_test_id("delete")).to_have_count(0)  # active: no Delete

    page.get_by_test_id("row-menu").locator("summary").click()  # close the menu again
    page.get_by_role("link", name="VIP courtesy").click()
    expect(page).to_have_url(re.compile(r"/strategies/\d+"))
    page.get_by_test_id("tab-audit").click()
    expect(page.get_by_test_id("audit-row")).to_have_count(2)
    expect(page.get_by_test_id("audit-table")).to_contain_text("activated")
    expect(page.get_by_test_id("audit-table")).to_contain_text(web_org.users["admin"].email)


def test_performance_tab_and_screenshots_with_demo_data(server: LiveServer, new_page) -> None:  # type: ignore[no-untyped-def]
    now = server.clock.now()
    with server.db.transaction() as session:
        org = load_demo(session, now=now)
        user_id = session.scalar(select(User.id).where(User.email == DEMO_EMAIL))
        standard = session.scalar(select(Strategy).where(Strategy.organization_id == org.id, Strategy.name == "Standard dunning"))
        strategies.run_now(session, principal=Principal.system(org.id), strategy_id=standard.id, now=now)
        sid, org_id = standard.id, org.id
    tick(server.db, now=now, organization_id=org_id)
    page = new_page(user_id)
    page.goto(f"/strategies/{sid}/performance")
    expect(page.get_by_test_id("status-overview")).to_be_visible()
    expect(page.get_by_test_id("funnel-chart").locator("g")).to_have_count(6)
    assert int(page.get_by_test_id("perf-open-cases").inner_text()) > 0
    page.goto(f"/strategies/{sid}")
    expect(page.get_by_test_id("stage")).to_have_count(5)
    if server.db.dialect == "sqlite":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        _screenshot(page, "strategy-editor.png")
        page.goto("/execution")
        expect(page.get_by_test_id("queue-row").first).to_be_visible()
        _screenshot(page, "execution.png")


def _screenshot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    """The whole page in one viewport, so the sticky save bar sits at the bottom where it belongs."""
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(int(height), 4000)})
    page.screenshot(path=str(SCREENSHOTS / name))


def test_stage_edits_work_without_scripting(server: LiveServer, web_org: WebOrg, admin_page) -> None:  # type: ignore[no-untyped-def]
    """The up/down/remove/add buttons are plain submit buttons: the server re-renders the form, saving nothing."""
    sid = _seed_strategy(server, web_org, stages=[("email", "t", 0), ("sms", "p", 3), ("phone_call", "p", 9)])
    page = admin_page
    page.goto(f"/strategies/{sid}")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    form = {"csrf_token": token, "name": "Friendly reminders", "description": "Two gentle emails", "type": "standard",
            "multi_stage_handling": "run_all_in_order", "first_action_logic": "standard",
            "trigger_type": "days_overdue", "trigger_days": "0", "priority": "10", "automation_time": "07:00",
            "automation_days": "mon"}
    for i, (action, timing, days) in enumerate([("email", "days_from_trigger", "0"), ("sms", "days_from_previous", "3"),
                                                ("phone_call", "days_from_previous", "9")]):
        form |= {f"stages[{i}].action_type": action, f"stages[{i}].timing_type": timing, f"stages[{i}].days": days}
    html = page.request.post(f"/strategies/{sid}", form={**form, "op": "up:2"}).text()
    order = re.findall(r'name="stages\[(\d)\]\.days" value="(\d+)"', html)
    assert order == [("0", "0"), ("1", "9"), ("2", "3")]  # the phone call moved up with its 9 days
    html = page.request.post(f"/strategies/{sid}", form={**form, "op": "remove:0"}).text()
    assert re.findall(r'name="stages\[(\d)\]\.days" value="(\d+)"', html) == [("0", "3"), ("1", "9")]
    html = page.request.post(f"/strategies/{sid}", form={**form, "op": "add"}).text()
    assert len(re.findall(r'name="stages\[\d\]\.days"', html)) == 4
    with server.db.transaction() as session:  # nothing saved
        assert [s.days for s in session.get(Strategy, sid).stages] == [0, 3, 9]
