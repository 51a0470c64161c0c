"""The Campaigns screens (SPEC §5, seed 001) in a real browser, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal

from playwright.sync_api import expect
from sqlalchemy import func, select

from duecourse.campaigns import service as campaigns
from duecourse.campaigns.models import Campaign, CampaignStatus
from duecourse.campaigns.schemas import CampaignIn, MembershipAdd
from duecourse.engine.enqueue import enqueue
from duecourse.engine.models import Direction, Interaction, InteractionStatus, QueueItem, QueueStatus
from duecourse.ledger.models import Account, Payment, PaymentSource, Promise, PromiseSource
from duecourse.strategies.models import ActionType
from duecourse.tenancy.principal import Principal
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import SCREENSHOTS, LiveServer, WebOrg

NAMES = [
    "Harbor Logistics SL", "Nube Verde Cafés", "Talleres Ortega", "Clínica Dental Sur", "Papelería Central",
    "Iberian Tiles SA", "Hostal La Brisa", "Ferretería Molina", "Estudio Lumen", "Panadería San Roque",
    "Auto Recambios Vega", "Bodegas Altamira",
]


def _seed_strategy_and_debtors(server: LiveServer, org: WebOrg, n: int, prefix: str = "ACC") -> tuple[int, list[int]]:
    now = server.clock.now()
    with server.db.transaction() as session:
        st = strategy(session, org.id, now, [("email", "t", 0), ("sms", "p", 3), ("voice", "p", 4)],
                      name="Standard dunning")
        ids = []
        for i in range(n):
            a = debtor(session, org.id, now, f"{prefix}-{i:03d}", due=date(2026, 2, 1) - timedelta(days=7 * i),
                       name=NAMES[i % len(NAMES)], total=f"{180 + 97 * i}.50", score=40 + (i * 7) % 55)
            ids.append(a.id)
        refresh(session, org.id, now)
        return st.id, ids


def _seed_active_campaign(server: LiveServer, org: WebOrg, n: int, *, contacted: int = 0) -> int:
    """An active campaign with ``n`` members, ``contacted`` of them with an outbound email, and items enqueued."""
    sid, ids = _seed_strategy_and_debtors(server, org, n)
    now = server.clock.now()
    principal = Principal.system(org.id)
    with server.db.transaction() as session:
        c = campaigns.create_campaign(
            session, principal=principal, now=now,
            data=CampaignIn(name="Q1 early-stage push", objective="Recover Q4 invoices before quarter close.",
                            strategy_id=sid, start_date=date(2026, 3, 1), end_date=date(2026, 4, 30)),
        )
        joined = now - timedelta(days=6)
        campaigns.add_accounts(session, principal=principal, campaign_id=c.id,
                               body=MembershipAdd(account_ids=ids), now=joined)
        campaigns.transition(session, principal=principal, campaign_id=c.id, action="activate", now=joined)
        enqueue(session, organization_id=org.id, now=now, campaign_id=c.id, cause="test")
        for i, account_id in enumerate(ids[:contacted]):
            at = now - timedelta(days=3, hours=i)
            session.add(Interaction(
                organization_id=org.id, account_id=account_id, campaign_id=c.id, strategy_id=sid, stage_index=0,
                channel=ActionType.email, direction=Direction.outbound, status=InteractionStatus.delivered,
                occurred_at=at, created_at=at,
            ))
            session.query(Account).filter(Account.id == account_id).update(
                {"last_interaction_at": at, "status": "promise_pending" if i == 1 else "in_auto_management"})
        if contacted >= 3:
            session.add(Promise(organization_id=org.id, account_id=ids[1], amount=Decimal("250.00"), currency="EUR",
                                promised_date=date(2026, 3, 9), source=PromiseSource.agent, created_at=now))
            session.add(Payment(organization_id=org.id, account_id=ids[2], external_id="PAY-1", amount=Decimal("120.00"),
                                currency="EUR", paid_on=date(2026, 3, 1), source=PaymentSource.api, created_at=now))
        return c.id


def test_create_activate_enqueue_and_see_the_queue(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    _sid, _ids = _seed_strategy_and_debtors(server, web_org, 3)
    page = login_as("manager")
    page.on("dialog", lambda d: d.accept())
    page.goto("/campaigns")
    expect(page.get_by_test_id("campaign-row")).to_have_count(0)
    page.get_by_test_id("new-campaign").click()
    expect(page).to_have_url(re.compile(r"/campaigns/new$"))
    # A missing name: the error sits beside the field and everything else typed is kept.
    page.get_by_test_id("field-objective").fill("Early-stage reminders")
    page.get_by_test_id("field-strategy").select_option(label="Standard dunning")
    page.get_by_test_id("field-start").fill("2026-03-01")
    page.get_by_test_id("field-end").fill("2026-04-30")
    page.get_by_test_id("save").click()
    name_error = page.locator("[data-error-for=name]")
    expect(name_error).to_have_text("is required")
    expect(page.locator("label.field.has-error", has=page.get_by_test_id("field-name"))).to_contain_text("is required")
    expect(page.get_by_test_id("field-objective")).to_have_value("Early-stage reminders")
    expect(page.get_by_test_id("field-strategy").locator("option:checked")).to_have_text("Standard dunning")
    expect(page.get_by_test_id("field-start")).to_have_value("2026-03-01")
    expect(page.get_by_test_id("field-end")).to_have_value("2026-04-30")
    # End before start: refused beside the end date.
    page.get_by_test_id("field-name").fill("March push")
    page.get_by_test_id("field-end").fill("2026-02-01")
    page.get_by_test_id("save").click()
    expect(page.locator("[data-error-for=end_date]")).to_contain_text("on or after")
    expect(page.get_by_test_id("field-name")).to_have_value("March push")
    page.get_by_test_id("field-end").fill("2026-04-30")
    page.get_by_test_id("save").click()
    expect(page).to_have_url(re.compile(r"/campaigns/\d+$"))
    expect(page.get_by_test_id("campaign-status")).to_have_text("Draft")
    expect(page.get_by_test_id("action-activate")).to_be_visible()
    expect(page.get_by_test_id("action-pause")).to_have_count(0)
    expect(page.get_by_test_id("enqueue")).to_have_count(0)
    # Add accounts by pasted external ids: the unknown one is reported.
    page.get_by_test_id("external-ids").fill("ACC-000, ACC-001\nACC-002\nNOPE-9")
    page.get_by_test_id("add-ids").click()
    expect(page.locator(".flash")).to_contain_text("3 accounts added")
    expect(page.locator(".flash")).to_contain_text("Not found (1): NOPE-9")
    expect(page.get_by_test_id("member-row")).to_have_count(3)
    expect(page.get_by_test_id("kpi-total").locator(".kpi-value")).to_have_text("3")
    # Activate, then Enqueue: the items are in the Execution page's queue table.
    page.get_by_test_id("action-activate").click()
    expect(page.locator(".flash")).to_contain_text("Campaign activated")
    expect(page.get_by_test_id("campaign-status")).to_have_text("Active")
    expect(page.get_by_test_id("action-activate")).to_have_count(0)
    page.get_by_test_id("enqueue").click()
    expect(page.locator(".flash")).to_contain_text("Enqueued campaign 'March push': 3 items added")
    page.goto("/execution")
    expect(page.get_by_test_id("queue-row")).to_have_count(3)
    expect(page.get_by_test_id("queue-table")).to_contain_text("March push")
    expect(page.get_by_test_id("kpi-pending").locator(".kpi-value")).to_have_text("3")
    # The list shows it with its counts.
    page.goto("/campaigns")
    row = page.get_by_test_id("campaign-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("campaign-status")).to_have_text("Active")
    expect(row.get_by_test_id("total-accounts")).to_have_text("3")
    expect(row).to_contain_text("Standard dunning")


def test_pause_cancels_pending_items_then_resume_and_screenshot(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    cid = _seed_active_campaign(server, web_org, 12, contacted=5)
    with server.db.transaction() as s:
        pending = s.scalar(select(func.count()).select_from(QueueItem).where(
            QueueItem.campaign_id == cid, QueueItem.status == QueueStatus.pending))
    assert pending == 12
    page = login_as("manager")
    page.on("dialog", lambda d: d.accept())
    page.goto(f"/campaigns/{cid}")
    expect(page.get_by_test_id("member-row")).to_have_count(12)
    expect(page.get_by_test_id("kpi-contacted").locator(".kpi-value")).to_have_text("5")
    expect(page.get_by_test_id("kpi-promises").locator(".kpi-value")).to_have_text("1")
    expect(page.get_by_test_id("kpi-recovered").locator(".kpi-value")).to_have_text("120.00 EUR")
    expect(page.get_by_test_id("kpi-contact-rate").locator(".kpi-value")).to_have_text("41.7%")
    expect(page.get_by_test_id("progress-label")).to_have_text("5 of 12 accounts contacted (41.7%)")
    expect(page.get_by_test_id("action-resume")).to_have_count(0)
    if server.db.dialect == "sqlite":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "campaign-detail.png"), full_page=True)
    page.get_by_test_id("action-pause").click()
    expect(page.locator(".flash")).to_contain_text("pending queue items were cancelled")
    expect(page.get_by_test_id("campaign-status")).to_have_text("Paused")
    expect(page.get_by_test_id("enqueue")).to_have_count(0)
    with server.db.transaction() as s:
        statuses = dict(s.execute(select(QueueItem.status, func.count()).where(QueueItem.campaign_id == cid)
                                  .group_by(QueueItem.status)).all())
        assert {QueueStatus(k): v for k, v in statuses.items()} == {QueueStatus.cancelled: 12}
        assert s.get(Campaign, cid).status == CampaignStatus.paused
    page.goto(f"/execution?status=cancelled&campaign={cid}")
    expect(page.get_by_test_id("queue-row")).to_have_count(12)
    expect(page.get_by_test_id("kpi-pending").locator(".kpi-value")).to_have_text("0")
    # Resume (paused -> active), remove one account, then complete.
    page.goto(f"/campaigns/{cid}")
    page.get_by_test_id("action-resume").click()
    expect(page.get_by_test_id("campaign-status")).to_have_text("Active")
    page.locator("[data-testid=member-row][data-external-id=ACC-011]").get_by_test_id("remove").click()
    expect(page.locator(".flash")).to_contain_text("removed from the campaign")
    expect(page.get_by_test_id("member-row")).to_have_count(11)
    page.get_by_test_id("action-complete").click()
    expect(page.get_by_test_id("campaign-status")).to_have_text("Completed")
    for action in ("activate", "resume", "pause", "complete"):
        expect(page.get_by_test_id(f"action-{action}")).to_have_count(0)
    expect(page.get_by_test_id("add-by-ids")).to_have_count(0)


def test_edit_add_by_filter_and_delete(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    _seed_strategy_and_debtors(server, web_org, 4)
    now = server.clock.now()
    with server.db.transaction() as session:
        c = campaigns.create_campaign(session, principal=Principal.system(web_org.id), now=now,
                                      data=CampaignIn(name="Old debts"))
        cid = c.id
        taken = campaigns.create_campaign(session, principal=Principal.system(web_org.id), now=now,
                                          data=CampaignIn(name="Taken")).id
    page = login_as("admin")
    page.on("dialog", lambda d: d.accept())
    page.goto(f"/campaigns/{cid}")
    expect(page.locator(".warning")).to_contain_text("Choose a strategy")
    page.get_by_test_id("action-activate").click()
    expect(page.locator(".flash-error")).to_contain_text("Cannot activate a campaign without a strategy")
    expect(page.get_by_test_id("campaign-status")).to_have_text("Draft")
    page.get_by_test_id("edit").click()
    page.get_by_test_id("field-name").fill("taken")
    page.get_by_test_id("field-strategy").select_option(label="Standard dunning")
    page.get_by_test_id("save").click()
    expect(page.locator("[data-error-for=name]")).to_have_text("is already used by another campaign")
    expect(page.get_by_test_id("field-strategy").locator("option:checked")).to_have_text("Standard dunning")
    page.get_by_test_id("field-name").fill("Old debts (60+ days)")
    page.get_by_test_id("save").click()
    expect(page.locator("h1")).to_contain_text("Old debts (60+ days)")
    expect(page.get_by_test_id("campaign-meta")).to_contain_text("Standard dunning")
    # By filter: a bad number is shown beside its field; then ACC-001..003 are >= 35 days overdue on 2026-03-02.
    page.get_by_test_id("filter-min-days").fill("")
    page.get_by_test_id("add-filter").click()
    expect(page.locator("[data-error-for=filter]")).to_contain_text("give at least one criterion")
    page.get_by_test_id("filter-min-days").fill("35")
    page.get_by_test_id("add-filter").click()
    expect(page.locator(".flash")).to_contain_text("3 accounts added")
    expect(page.get_by_test_id("member-row")).to_have_count(3)
    # Accounts of another campaign are refused unless moved; the error names the field.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    form = {"csrf_token": token, "mode": "ids", "external_ids": "ACC-001"}
    refused = page.request.post(f"/campaigns/{taken}/accounts/add", form=form)
    assert refused.status == 409
    assert 'data-error-for="move"' in refused.text() and "already in another campaign" in refused.text()
    moved = page.request.post(f"/campaigns/{taken}/accounts/add", form={**form, "move": "1"})
    assert moved.status == 200 and "1 account added (1 moved from another campaign)" in moved.text()
    page.reload()
    expect(page.get_by_test_id("member-row")).to_have_count(2)
    page.get_by_test_id("delete").click()
    expect(page).to_have_url(re.compile(r"/campaigns$"))
    expect(page.locator(".flash")).to_contain_text("deleted")
    expect(page.get_by_test_id("campaign-row")).to_have_count(1)
    with server.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Account).where(Account.campaign_id.is_not(None))) == 1


def test_viewer_sees_no_buttons_and_is_refused(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    cid = _seed_active_campaign(server, web_org, 2)
    page = login_as("viewer")
    page.goto("/campaigns")
    expect(page.get_by_test_id("campaign-row")).to_have_count(1)
    expect(page.get_by_test_id("new-campaign")).to_have_count(0)
    page.goto(f"/campaigns/{cid}")
    expect(page.get_by_test_id("member-row")).to_have_count(2)
    for testid in ("action-pause", "action-complete", "action-activate", "action-resume", "edit", "delete", "enqueue",
                   "remove", "add-by-ids", "add-by-filter"):
        expect(page.get_by_test_id(testid)).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""
    for url in (f"/campaigns/{cid}/pause", f"/campaigns/{cid}/delete", f"/campaigns/{cid}/enqueue", "/campaigns/new"):
        response = page.request.post(url, form={"csrf_token": token, "name": "x"})
        assert response.status == 403, url
    assert page.request.get("/campaigns/new").status == 403
    with server.db.transaction() as s:
        assert s.get(Campaign, cid).status == CampaignStatus.active
        assert s.scalar(select(func.count()).select_from(QueueItem).where(QueueItem.status == QueueStatus.pending)) == 2
