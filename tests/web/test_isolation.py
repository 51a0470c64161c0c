"""Organization isolation and server-side permissions of the web UI (SPEC §1), on SQLite and PostgreSQL.

Organization A owns an account, a strategy, a template, a campaign, a task, a sandbox message, an API
key and a webhook subscription. A user of organization B gets 404 for every one of their ids (and
never sees their names, not even in a drop-down), and a POST carrying B's own valid CSRF token against
A's ids changes nothing. Within A, a role without the permission is refused 403 by the server.
Requests go through ``page.request`` (the browser context's cookies) to stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from duecourse.campaigns import service as campaigns
from duecourse.campaigns.models import Campaign
from duecourse.campaigns.schemas import CampaignIn
from duecourse.channels.models import SandboxMessage
from duecourse.channels.secrets import key_from_settings
from duecourse.engine.models import Task
from duecourse.events import service as events
from duecourse.events.models import EventSubscription
from duecourse.ledger.models import Account, Payment
from duecourse.messaging import service as messaging
from duecourse.messaging.models import Template
from duecourse.messaging.schemas import TemplateIn
from duecourse.strategies.models import Strategy
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.models import ApiKey, Role, User
from duecourse.tenancy.principal import Principal
from tests.engine_helpers import debtor, refresh, strategy
from tests.web.conftest import LiveServer, WebOrg, create_web_org

SECRET_NAMES = ("Zeta Secret Debtor", "Zeta Secret Strategy", "Zeta Secret Template", "Zeta Secret Campaign",
                "Zeta secret subject")
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class OrgA:
    org: WebOrg
    account: int
    strategy: int
    template: int
    campaign: int
    task: int
    message: int
    api_key: int
    subscription: int


def _seed_org_a(server: LiveServer) -> OrgA:
    org = create_web_org(server.db, server.clock, "Organization A")
    now = server.clock.now()
    with server.db.transaction() as s:
        acct = debtor(s, org.id, now, "ZETA-1", due=now.date() - timedelta(days=20), name=SECRET_NAMES[0])
        strat = strategy(s, org.id, now, [("phone_call", "t", 0)], name=SECRET_NAMES[1], active=False)
        tpl = messaging.create_template(s, organization_id=org.id, now=now, data=TemplateIn.model_validate(
            {"name": SECRET_NAMES[2], "channel": "email", "subject": "Hello", "body_text": "Dear {{ debtor_name }}"}))
        camp = campaigns.create_campaign(s, principal=Principal.system(org.id), now=now, data=CampaignIn.model_validate(
            {"name": SECRET_NAMES[3], "strategy_id": strat.id}))
        task = Task(organization_id=org.id, account_id=acct.id, kind="phone_call", status="open", stage_index=0,
                    created_at=now)
        msg = SandboxMessage(organization_id=org.id, account_id=acct.id, idempotency_key="zeta-1", provider_ref="sb-1",
                             channel="email", to="zeta-1@example.com", subject=SECRET_NAMES[4], body_text="A's body",
                             created_at=now)
        s.add_all([task, msg])
        s.flush()
        acct.campaign_id = camp.id
        key = tenancy.create_api_key(s, organization_id=org.id, name="A ERP sync", role=Role.manager, now=now)
        sub, _secret = events.create_subscription(
            s, organization_id=org.id, url="https://hooks.example.com/a", event_types=[events.EVENT_TYPES[0]],
            key=key_from_settings(server.app.state.settings), now=now)
        refresh(s, org.id, now)
        return OrgA(org, acct.id, strat.id, tpl.id, camp.id, task.id, msg.id, key.api_key.id, sub.id)


def _snapshot(server: LiveServer, a: OrgA) -> dict[str, Any]:
    """Everything a refused POST could have changed."""
    with server.db.transaction() as s:
        acct = s.get(Account, a.account)
        strat = s.get(Strategy, a.strategy)
        tpl = s.get(Template, a.template)
        camp = s.get(Campaign, a.campaign)
        task = s.get(Task, a.task)
        admin = s.get(User, a.org.users["admin"].id)
        key = s.get(ApiKey, a.api_key)
        return {
            "account": (acct.blocked, acct.blocked_reason, acct.campaign_id, str(acct.balance)) if acct else None,
            "payments": s.scalar(select(func.count()).select_from(Payment)),
            "strategy": (strat.name, strat.active, strat.updated_at) if strat else None,
            "template": (tpl.name, tpl.body_text, tpl.updated_at) if tpl else None,
            "campaign": (camp.name, camp.status, camp.updated_at) if camp else None,
            "task": (task.status, task.outcome) if task else None,
            "admin": (admin.role, admin.active) if admin else None,
            "api_key": key.revoked_at if key else "deleted",
            "subscription": s.get(EventSubscription, a.subscription) is not None,
            "message": s.get(SandboxMessage, a.message) is not None,
            "campaigns": s.scalar(select(func.count()).select_from(Campaign)),
            "templates": s.scalar(select(func.count()).select_from(Template)),
        }


def _csrf(page: Any) -> str:
    m = CSRF.search(page.request.get("/tasks").text())
    assert m, "no CSRF token on the page"
    return m.group(1)


def _no_secrets(text: str, where: str) -> None:
    for name in SECRET_NAMES:
        assert name not in text, f"{where} shows organization A's {name!r}"


def _object_pages(a: OrgA) -> list[str]:
    return [
        f"/accounts/{a.account}",
        f"/campaigns/{a.campaign}",
        f"/campaigns/{a.campaign}/edit",
        f"/strategies/{a.strategy}",
        f"/strategies/{a.strategy}/performance",
        f"/strategies/{a.strategy}/audit",
        f"/templates/{a.template}",
        f"/templates/{a.template}?preview=1",
        f"/templates/new?variant_of={a.template}",
        f"/outbox/{a.message}",
    ]


def test_another_organizations_pages_answer_404(server: LiveServer, web_org: WebOrg, new_page) -> None:  # type: ignore[no-untyped-def]
    a = _seed_org_a(server)
    # Control: A's own admin sees every one of these pages.
    own = new_page(a.org.users["admin"].id)
    for url in _object_pages(a):
        r = own.request.get(url)
        assert r.status == 200, f"{url}: {r.status} for organization A itself"
    assert SECRET_NAMES[0] in own.request.get(f"/accounts/{a.account}").text()
    # B's admin: 404 for every id of A, and A's names nowhere.
    page = new_page(web_org.users["admin"].id)
    for url in _object_pages(a):
        r = page.request.get(url)
        assert r.status == 404, f"{url}: {r.status}, expected 404"
        assert "text/html" in r.headers["content-type"], f"{url}: not the domain's 404 page (no such route?)"
        _no_secrets(r.text(), url)
    # Lists, filters and drop-downs list B's objects only (even when filtered by A's ids).
    for url in ("/accounts", f"/accounts?campaign={a.campaign}&strategy={a.strategy}", "/campaigns", "/strategies",
                "/templates", "/tasks", "/tasks?status=done", "/outbox", f"/outbox?account={a.account}",
                "/execution", f"/execution?campaign={a.campaign}", "/auto-collection?tab=scheduled",
                "/auto-collection?tab=outstanding", "/campaigns/new", "/strategies/new", "/templates/new",
                "/settings/users", "/settings/api-keys", "/settings/webhooks",
                f"/templates/new?variant_of={a.template}"):
        r = page.request.get(url)
        assert r.status in (200, 404), f"{url}: {r.status}"
        _no_secrets(r.text(), url)
    users = page.request.get("/settings/users").text()
    assert a.org.users["admin"].email not in users and web_org.users["admin"].email in users
    assert "A ERP sync" not in page.request.get("/settings/api-keys").text()
    assert "hooks.example.com/a" not in page.request.get("/settings/webhooks").text()


def test_posts_against_another_organizations_ids_change_nothing(  # type: ignore[no-untyped-def]
    server: LiveServer, web_org: WebOrg, new_page
) -> None:
    a = _seed_org_a(server)
    before = _snapshot(server, a)
    page = new_page(web_org.users["admin"].id)  # B's admin: every permission, in the wrong organization
    token = _csrf(page)
    a_admin = a.org.users["admin"].id
    refused_404 = [
        (f"/accounts/{a.account}/payments", {"amount": "10.00", "reference": "x"}),
        (f"/accounts/{a.account}/block", {"reason": "hijacked"}),
        (f"/accounts/{a.account}/unblock", {}),
        (f"/auto-collection/accounts/{a.account}/block", {"reason": "hijacked", "return_to": "/auto-collection"}),
        (f"/tasks/{a.task}/outcome", {"outcome": "no_answer", "note": "hijacked"}),
        (f"/campaigns/{a.campaign}/edit", {"name": "Hijacked", "objective": "", "strategy_id": ""}),
        (f"/campaigns/{a.campaign}/activate", {}),
        (f"/campaigns/{a.campaign}/resume", {}),
        (f"/campaigns/{a.campaign}/complete", {}),
        (f"/campaigns/{a.campaign}/enqueue", {}),
        (f"/campaigns/{a.campaign}/accounts/add", {"mode": "ids", "external_ids": "ZETA-1"}),
        (f"/campaigns/{a.campaign}/accounts/{a.account}/remove", {}),
        (f"/campaigns/{a.campaign}/delete", {}),
        ("/execution/enqueue", {"campaign_id": str(a.campaign)}),
        (f"/strategies/{a.strategy}", {"op": "save", "name": "Hijacked", "type": "standard",
                                       "trigger_type": "days_overdue", "trigger_days": "0",
                                       "stages[0].action_type": "phone_call", "stages[0].timing_type":
                                       "days_from_trigger", "stages[0].days": "0"}),
        (f"/strategies/{a.strategy}/activate", {}),
        (f"/strategies/{a.strategy}/toggle", {}),
        (f"/strategies/{a.strategy}/run", {}),
        (f"/strategies/{a.strategy}/delete", {}),
        (f"/templates/{a.template}", {"name": "Hijacked", "channel": "email", "tone": "standard", "subject": "x",
                                      "body_text": "pwned"}),
        (f"/templates/{a.template}/delete", {}),
        (f"/settings/users/{a_admin}/role", {"role": "viewer"}),
        (f"/settings/users/{a_admin}/active", {"active": "0"}),
        (f"/settings/api-keys/{a.api_key}/revoke", {}),
        (f"/settings/webhooks/{a.subscription}/delete", {}),
    ]
    for url, data in refused_404:
        r = page.request.post(url, form={"csrf_token": token, **data}, max_redirects=0)
        assert r.status == 404, f"POST {url}: {r.status}, expected 404"
        assert "text/html" in r.headers["content-type"], f"POST {url}: not the domain's 404 page (no such route?)"
        _no_secrets(r.text(), url)
    # A's ids inside B's own forms are refused like unknown ids (422 beside the field), nothing is created.
    r = page.request.post("/campaigns/new", form={"csrf_token": token, "name": "B campaign",
                                                  "strategy_id": str(a.strategy)}, max_redirects=0)
    assert r.status == 422 and f"strategy {a.strategy} not found" in r.text()
    r = page.request.post("/templates/new", form={"csrf_token": token, "name": "B variant", "channel": "email",
                                                  "tone": "firm", "subject": "s", "body_text": "b",
                                                  "variant_of_id": str(a.template)}, max_redirects=0)
    assert r.status == 422 and f"template {a.template} not found" in r.text()
    assert _snapshot(server, a) == before


def test_roles_without_the_permission_are_refused_by_the_server(  # type: ignore[no-untyped-def]
    server: LiveServer, new_page
) -> None:
    a = _seed_org_a(server)
    before = _snapshot(server, a)
    viewer = new_page(a.org.users["viewer"].id)
    agent = new_page(a.org.users["agent"].id)
    manager = new_page(a.org.users["manager"].id)
    a_agent = a.org.users["agent"].id
    cases = [
        (viewer, f"/tasks/{a.task}/outcome", {"outcome": "no_answer"}),
        (viewer, f"/accounts/{a.account}/payments", {"amount": "10.00"}),
        (agent, f"/accounts/{a.account}/block", {"reason": "x"}),
        (agent, f"/auto-collection/accounts/{a.account}/block", {"reason": "x"}),
        (agent, f"/campaigns/{a.campaign}/delete", {}),
        (agent, f"/campaigns/{a.campaign}/accounts/{a.account}/remove", {}),
        (agent, "/execution/pause", {}),
        (agent, f"/strategies/{a.strategy}/run", {}),
        (manager, f"/strategies/{a.strategy}/delete", {}),
        (manager, f"/templates/{a.template}", {"name": "x", "channel": "email", "subject": "x", "body_text": "x"}),
        (manager, f"/templates/{a.template}/delete", {}),
        (manager, "/settings/rules/automation", {"automation.engine_paused": "1"}),
        (manager, f"/settings/users/{a_agent}/role", {"role": "admin"}),
        (manager, f"/settings/api-keys/{a.api_key}/revoke", {}),
        (manager, f"/settings/webhooks/{a.subscription}/delete", {}),
        (viewer, "/import", {"kind": "accounts"}),
    ]
    tokens = {id(p): _csrf(p) for p in (viewer, agent, manager)}
    for page, url, data in cases:
        r = page.request.post(url, form={"csrf_token": tokens[id(page)], **data}, max_redirects=0)
        assert r.status == 403, f"POST {url}: {r.status}, expected 403"
        assert " role cannot " in r.text(), f"POST {url}: refused, but not for the role"
    # And without a valid CSRF token even the admin is refused.
    admin = new_page(a.org.users["admin"].id)
    r = admin.request.post(f"/campaigns/{a.campaign}/delete", form={"csrf_token": tokens[id(viewer)]},
                           max_redirects=0)
    assert r.status == 403
    assert _snapshot(server, a) == before
    with server.db.transaction() as s:
        assert s.get(User, a_agent).role == Role.agent
        assert not tenancy.get_settings(s, a.org.id).automation.engine_paused
