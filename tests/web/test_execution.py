"""The Execution page (SPEC §8) and logging in, in a real browser, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import date, timedelta

from playwright.sync_api import expect

from duecourse.campaigns import service as campaigns
from duecourse.campaigns.schemas import CampaignIn, MembershipAdd
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.service import update_settings
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import LiveServer, WebOrg


def _seed_campaign(server: LiveServer, org: WebOrg, n: int = 3) -> None:
    """An active strategy, an active campaign on it and ``n`` overdue debtors in the campaign."""
    now = server.clock.now()
    principal = Principal.system(org.id)
    with server.db.transaction() as session:
        st = strategy(session, org.id, now, [("email", "t", 0), ("sms", "p", 3)], name="Standard dunning")
        ids = [
            debtor(session, org.id, now, f"ACC-{i:03d}", due=date(2026, 2, 1) - timedelta(days=i), name=f"Debtor {i}").id
            for i in range(n)
        ]
        refresh(session, org.id, now)
        campaign = campaigns.create_campaign(
            session, principal=principal, now=now,
            data=CampaignIn(name="March push", strategy_id=st.id, start_date=date(2026, 3, 1), end_date=date(2026, 4, 30)),
        )
        campaigns.add_accounts(session, principal=principal, campaign_id=campaign.id, body=MembershipAdd(account_ids=ids), now=now)
        campaigns.transition(session, principal=principal, campaign_id=campaign.id, action="activate", now=now)


def test_login_form_and_logout(server: LiveServer, web_org: WebOrg, new_page) -> None:  # type: ignore[no-untyped-def]
    page = new_page()
    page.goto("/strategies")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fstrategies$"))
    page.fill("input[name=email]", web_org.users["manager"].email)
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    expect(page.locator(".flash-error")).to_contain_text("Wrong email or password")
    expect(page.locator("input[name=email]")).to_have_value(web_org.users["manager"].email)
    page.fill("input[name=password]", web_org.password)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/strategies$"))
    expect(page.get_by_test_id("user-name")).to_have_text("Marco Manager")
    expect(page.get_by_test_id("user-role")).to_have_text("Manager")
    page.get_by_test_id("logout").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/execution")
    expect(page).to_have_url(re.compile(r"/login"))


def test_pause_and_resume_from_the_execution_page(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("manager")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/execution$"))
    expect(page.get_by_test_id("engine-running")).to_be_visible()
    page.get_by_test_id("pause").click()
    expect(page.get_by_test_id("engine-paused")).to_be_visible()
    expect(page.locator(".flash")).to_contain_text("Automation paused")
    api = page.request.get("/api/v1/engine/kpis")
    assert api.json()["engine_paused"] is True
    page.get_by_test_id("resume").click()
    expect(page.get_by_test_id("engine-running")).to_be_visible()
    assert page.request.get("/api/v1/engine/kpis").json()["engine_paused"] is False


def test_enqueue_fills_the_queue_table(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    _seed_campaign(server, web_org, 3)
    page = login_as("manager")
    page.goto("/execution")
    expect(page.get_by_test_id("queue-row")).to_have_count(0)
    expect(page.get_by_test_id("enqueue-campaign").locator("option").first).to_have_text("All eligible accounts")
    expect(page.get_by_test_id("enqueue-campaign").locator("option")).to_have_text(["All eligible accounts", "March push"])
    page.get_by_test_id("enqueue-campaign").select_option(label="March push")
    page.get_by_test_id("enqueue").click()
    expect(page.locator(".flash")).to_contain_text("Enqueued campaign 'March push': 3 items added")
    expect(page.get_by_test_id("queue-row")).to_have_count(3)
    expect(page.get_by_test_id("kpi-pending").locator(".kpi-value")).to_have_text("3")
    expect(page.get_by_test_id("queue-table")).to_contain_text("Debtor 0")
    # Filters: no completed items yet.
    page.get_by_test_id("filter-status").select_option("completed")
    expect(page).to_have_url(re.compile(r"status=completed"))
    expect(page.get_by_test_id("queue-row")).to_have_count(0)


def test_the_live_part_refreshes_while_the_page_is_open(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("viewer")
    page.clock.install()
    page.goto("/execution")
    expect(page.get_by_test_id("engine-running")).to_be_visible()
    with server.db.transaction() as session:  # someone else pauses the engine
        update_settings(session, principal=Principal.system(web_org.id), patch={"automation": {"engine_paused": True}},
                        now=server.clock.now())
    page.clock.run_for(5100)
    expect(page.get_by_test_id("engine-paused")).to_be_visible()


def test_viewer_sees_no_controls_and_is_refused(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("viewer")
    page.goto("/execution")
    expect(page.get_by_test_id("kpi-pending")).to_be_visible()
    expect(page.get_by_test_id("pause")).to_have_count(0)
    expect(page.get_by_test_id("enqueue")).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    response = page.request.post("/execution/pause", form={"csrf_token": token or ""})
    assert response.status == 403
    assert "cannot operate engine" in response.text()
    assert page.request.get("/api/v1/engine/kpis").json()["engine_paused"] is False
    # Without a valid CSRF token even an admin's POST is refused.
    admin = login_as("admin")
    assert admin.request.post("/execution/pause", form={"csrf_token": "forged"}).status == 403


def test_daily_outcomes_chart_shows_what_was_sent(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    from duecourse.engine.cycle import tick
    from duecourse.engine.enqueue import enqueue

    _seed_campaign(server, web_org, 3)
    with server.db.transaction() as session:
        enqueue(session, organization_id=web_org.id, now=server.clock.now(), cause="test")
    tick(server.db, now=server.clock.now())  # the campaign's first emails go out
    page = login_as("viewer")
    page.goto("/execution")
    chart = page.get_by_test_id("daily-chart")
    expect(chart.locator("polyline")).to_have_count(5)
    expect(page.get_by_test_id("daily-sent")).to_contain_text("Sent 3")
    expect(page.get_by_test_id("daily-promises")).to_contain_text("Promises 0")
    # The last point of the "sent" line is above the baseline; the promises line stays on it.
    sent = chart.locator("polyline[data-series=sent]").get_attribute("points") or ""
    promises = chart.locator("polyline[data-series=promises]").get_attribute("points") or ""
    assert sent.split()[-1] != promises.split()[-1] and sent.split()[0] == promises.split()[0]
