"""The organization's payment link (SPEC §7: the template variable ``payment_link``): the setting and
its validation, dispatch with and without it, previews, the Settings page."""

from __future__ import annotations

import re
from datetime import date
from urllib.parse import quote

import pytest
from sqlalchemy import select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, QueueItem
from duecourse.errors import ValidationFailed
from duecourse.messaging import rendering
from duecourse.messaging.models import Template
from duecourse.tenancy import service as tenancy
from duecourse.tenancy.principal import Principal
from duecourse.tenancy.settings import PAYMENT_LINK_SAMPLE, fill_payment_link, payment_link_problem
from tests.engine_helpers import debtor, refresh, strategy

API = "/api/v1"
LINK = "https://pay.example.com/p/{account_external_id}?invoice={invoice_number}&amount={balance}%20{currency}"
PAY_BODY = "Hello {{ debtor_name }}, pay here: {{ payment_link }}"
PLAIN_BODY = "Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}."


def _fields(r) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {f["field"]: f["message"] for f in r.json()["error"]["fields"]}


def _set_link(org, link):  # type: ignore[no-untyped-def]
    r = org.patch(f"{API}/settings", json={"messages": {"payment_link": link}})
    assert r.status_code == 200, r.text
    return r.json()


# --- the setting -------------------------------------------------------------------------------------


def test_payment_link_setting_saved_audited_and_cleared(org):
    assert org.get(f"{API}/settings", role="viewer").json()["messages"] == {"payment_link": None}
    saved = _set_link(org, f"  {LINK} ")
    assert saved["messages"]["payment_link"] == LINK  # surrounding spaces trimmed
    assert org.get(f"{API}/settings").json()["messages"]["payment_link"] == LINK
    audit = org.get(f"{API}/audit-log", params={"entity_type": "settings"}).json()["items"]
    assert [(e["field"], e["old_value"], e["new_value"]) for e in audit] == [("messages.payment_link", None, LINK)]
    # A link without placeholders is fine (one payment portal for everyone); empty means not configured.
    assert _set_link(org, "http://pay.example.com")["messages"]["payment_link"] == "http://pay.example.com"
    assert _set_link(org, "")["messages"]["payment_link"] is None
    assert _set_link(org, None)["messages"]["payment_link"] is None
    # Only admins change settings.
    assert org.patch(f"{API}/settings", role="manager", json={"messages": {"payment_link": LINK}}).status_code == 403


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pay.example.com/{account_external_id}", "must be an absolute http:// or https:// URL"),
        ("ftp://pay.example.com/{account_external_id}", "must be an absolute http:// or https:// URL"),
        ("javascript:alert(1)", "must be an absolute http:// or https:// URL"),
        ("https:///{account_external_id}", "must be an absolute http:// or https:// URL"),
        ("https://pay.example.com/{account_id}", "unknown placeholder {account_id}; the placeholders are "
                                                 "{account_external_id}, {invoice_number}, {balance}, {currency}"),
        ("https://pay.example.com/{}", "empty placeholder {}"),
        ("https://pay.example.com/{account_external_id", "unmatched { or }"),
        ("https://pay.example.com/x}", "unmatched { or }"),
        ("https://{account_external_id}.example.com/", "not in the host"),
        ("https://pay.example.com/a b", "must not contain spaces"),
        ("https://a.example.com\\@b.example.com/{account_external_id}", "must not contain a backslash"),
        ("https://pay.example.com:99999/", "not a valid URL"),
        ("https://pay.example.com/" + "x" * 2000, "at most 2000 characters"),
    ],
)
def test_bad_payment_links_are_refused_and_change_nothing(org, value, message):
    _set_link(org, "https://pay.example.com/{account_external_id}")
    before = org.get(f"{API}/settings").json()
    audit_before = org.get(f"{API}/audit-log", params={"entity_type": "settings"}).json()["items"]
    r = org.patch(f"{API}/settings", json={"messages": {"payment_link": value},
                                           "automation": {"auto_enqueue": True}})
    assert r.status_code == 422, r.text
    fields = _fields(r)
    assert list(fields) == ["messages.payment_link"] and message in fields["messages.payment_link"]
    assert org.get(f"{API}/settings").json() == before  # the other key in the patch was not saved either
    assert org.get(f"{API}/audit-log", params={"entity_type": "settings"}).json()["items"] == audit_before


def test_unknown_and_mistyped_message_settings_are_refused(org):
    r = org.patch(f"{API}/settings", json={"messages": {"payment_url": LINK}})
    assert r.status_code == 422 and "messages.payment_url" in _fields(r)
    r = org.patch(f"{API}/settings", json={"messages": {"payment_link": 42}})
    assert r.status_code == 422 and "messages.payment_link" in _fields(r)
    assert org.get(f"{API}/settings").json()["messages"] == {"payment_link": None}


def test_service_names_the_field(db, org, clock):
    with db.transaction() as s, pytest.raises(ValidationFailed) as exc:
        tenancy.update_settings(s, principal=Principal.system(org.id), now=clock.now(),
                                patch={"messages": {"payment_link": "https://pay.example.com/{nope}"}})
    assert [(f.field, f.message) for f in exc.value.fields] == [
        ("messages.payment_link", "unknown placeholder {nope}; the placeholders are {account_external_id}, "
                                  "{invoice_number}, {balance}, {currency}")
    ]


def test_openapi_documents_the_section(client):
    schemas = client.get("/api/openapi.json").json()["components"]["schemas"]
    assert "messages" in schemas["OrgSettings"]["properties"]
    described = schemas["MessageSettings"]["properties"]["payment_link"]["description"]
    assert "{account_external_id}" in described and "{invoice_number}" in described


def test_fill_encodes_every_value():
    values = {"account_external_id": "A/B C&é", "invoice_number": "INV#1?x=1", "balance": "1.00", "currency": "EUR"}
    assert fill_payment_link(LINK, values) == (
        "https://pay.example.com/p/A%2FB%20C%26%C3%A9?invoice=INV%231%3Fx%3D1&amount=1.00%20EUR"
    )
    assert payment_link_problem(LINK) is None
    assert fill_payment_link(LINK, PAYMENT_LINK_SAMPLE).startswith("https://pay.example.com/p/ACC-1001?invoice=INV-1001")


def test_unavailable_variable_fails_only_where_used():
    ctx = {**rendering.SAMPLE_CONTEXT, "payment_link": rendering.unavailable("payment_link", "not configured here")}
    with pytest.raises(rendering.RenderError) as exc:
        rendering.render("Pay: {{ payment_link }}", ctx, field="body_text")
    assert str(exc.value) == "body_text: not configured here"
    for source in ('<a href="{{ payment_link }}">pay</a>', "{% if payment_link %}x{% endif %}", "{{ payment_link|upper }}"):
        with pytest.raises(rendering.RenderError):
            rendering.render(source, ctx, field="body_html", html=True)
    assert rendering.render("Hi {{ debtor_name }}", ctx, field="body_text") == "Hi Jane Doe"
    # An author may offer an explicit fallback.
    assert rendering.render("{{ payment_link | default('call us') }}", ctx, field="body_text") == "call us"


# --- dispatch ----------------------------------------------------------------------------------------


def _scenario(db, org, clock, body, *, externals=("PL-1",), html=None):  # type: ignore[no-untyped-def]
    now = clock.now()
    with db.transaction() as s:
        tpl = Template(organization_id=org.id, name="pay", channel="email", tone="standard",
                       subject="Invoice {{ carrying_invoice_number }}", body_text=body, body_html=html,
                       created_at=now, updated_at=now)
        s.add(tpl)
        s.flush()
        st = strategy(s, org.id, now, [("email", "t", 0)])
        st.stages[0].template_id = tpl.id
        ids = [debtor(s, org.id, now, ext, due=date(2026, 3, 1), email=f"d{i}@example.com").id
               for i, ext in enumerate(externals)]
        refresh(s, org.id, now)
    return ids


def _outbox(db):  # type: ignore[no-untyped-def]
    with db.transaction() as s:
        return [(m.account_id, m.body_text, m.body_html) for m in s.scalars(select(SandboxMessage).order_by(SandboxMessage.account_id))]


def test_dispatch_fills_in_the_configured_link_for_each_account(db, org, clock):
    _set_link(org, LINK)
    a, b = _scenario(db, org, clock, PAY_BODY, externals=("ACME/42 Ü", "PL-2"),
                     html='<p><a href="{{ payment_link }}">Pay now</a></p>')
    r = tick(db, now=clock.now())
    assert r["dispatch"] == {"dispatched": 2}
    sent = _outbox(db)
    link_a = ("https://pay.example.com/p/ACME%2F42%20%C3%9C?invoice=ACME%2F42%20%C3%9C-1&amount=100.00%20EUR")
    link_b = "https://pay.example.com/p/PL-2?invoice=PL-2-1&amount=100.00%20EUR"
    assert [(m[0], m[1]) for m in sent] == [(a, f"Hello ACME/42 Ü, pay here: {link_a}"), (b, f"Hello PL-2, pay here: {link_b}")]
    assert f'href="{link_b.replace("&", "&amp;")}"' in sent[1][2]  # HTML-escaped in the HTML body
    assert "example.invalid" not in "".join(m[1] + m[2] for m in sent)


def test_dispatch_without_a_link_fails_the_item_and_sends_nothing(db, org, clock):
    (a,) = _scenario(db, org, clock, PAY_BODY)
    r = tick(db, now=clock.now())
    assert r["dispatch"] == {"failed": 1}, r
    assert _outbox(db) == []
    with db.transaction() as s:
        item = s.scalars(select(QueueItem).where(QueueItem.account_id == a)).one()
        assert (item.status.value, item.reason, item.attempt) == ("failed", "template_error", 1)
        assert item.error == (
            "template: body_text: uses payment_link, but the payment link is not configured; set it on the Settings "
            "page (Rules tab, Messages section) or through PATCH /api/v1/settings as messages.payment_link"
        )
        failed = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == a,
                                                           ExecutionLogEntry.event == "failed")).one()
        assert failed.reason == "template_error" and failed.details["error"] == item.error
    # Through the API too: the queue shows why.
    queue = org.get(f"{API}/queue-items", params={"status": "failed"}).json()["items"]
    assert [(q["reason"], "payment link is not configured" in q["error"]) for q in queue] == [("template_error", True)]


def test_template_without_payment_link_is_unaffected(db, org, clock):
    (a,) = _scenario(db, org, clock, PLAIN_BODY)
    assert tick(db, now=clock.now())["dispatch"] == {"dispatched": 1}
    assert _outbox(db) == [(a, "Hello PL-1, you owe 100.00 EUR.", None)]


# --- preview -----------------------------------------------------------------------------------------


def _template(org, body=PAY_BODY):  # type: ignore[no-untyped-def]
    r = org.post(f"{API}/templates", json={"name": f"t{len(body)}", "channel": "sms", "body_text": body})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _preview(org, tid, account_id=None):  # type: ignore[no-untyped-def]
    r = org.post(f"{API}/templates/{tid}/preview", role="viewer", json={"account_id": account_id})
    assert r.status_code == 200, r.text
    return r.json()


def test_preview_with_a_configured_link_shows_the_real_link(db, org, clock):
    _set_link(org, LINK)
    (a,) = _scenario(db, org, clock, PLAIN_BODY, externals=("ACC 7",))
    tid = _template(org)
    p = _preview(org, tid, a)
    assert p["text"] == "Hello ACC 7, pay here: https://pay.example.com/p/ACC%207?invoice=ACC%207-1&amount=100.00%20EUR"
    assert p["warnings"] == []
    sample = _preview(org, tid)
    assert sample["text"] == f"Hello Jane Doe, pay here: {fill_payment_link(LINK, PAYMENT_LINK_SAMPLE)}"
    assert sample["warnings"] == []


def test_preview_without_a_link_shows_the_stand_in_and_warns(db, org, clock):
    (a,) = _scenario(db, org, clock, PLAIN_BODY)
    tid = _template(org)
    p = _preview(org, tid, a)
    assert p["text"] == "Hello PL-1, pay here: https://example.invalid/pay/PL-1"
    assert len(p["warnings"]) == 1
    assert "No payment link is configured" in p["warnings"][0]
    assert "Real messages using payment_link will fail" in p["warnings"][0]
    sample = _preview(org, tid)
    assert sample["text"] == f"Hello Jane Doe, pay here: {rendering.SAMPLE_CONTEXT['payment_link']}"
    assert sample["warnings"] == p["warnings"]
    # A template that does not use the link gets no warning.
    plain = _template(org, PLAIN_BODY)
    assert _preview(org, plain, a)["warnings"] == [] and _preview(org, plain)["warnings"] == []


# --- the Settings page -------------------------------------------------------------------------------


def _csrf(html: str) -> str:
    m = re.search(r'<form method="post" action="/settings/rules/messages".*?name="csrf_token" value="([^"]+)"', html, re.S)
    assert m, "the Messages form is on the page"
    return m.group(1)


def test_settings_page_saves_the_link_and_shows_errors(org, client):
    assert client.post(f"{API}/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 200
    page = client.get("/settings")
    assert page.status_code == 200
    assert 'data-testid="payment-link-missing"' in page.text and "{account_external_id}" in page.text
    token = _csrf(page.text)
    bad = client.post("/settings/rules/messages", data={"csrf_token": token, "messages.payment_link": "pay.example.com/{x}"})
    assert bad.status_code == 422
    assert 'data-error-for="messages.payment_link"' in bad.text and "unknown placeholder {x}" in bad.text
    assert 'value="pay.example.com/{x}"' in bad.text  # what was typed is kept
    assert org.get(f"{API}/settings").json()["messages"]["payment_link"] is None  # nothing saved
    ok = client.post("/settings/rules/messages", data={"csrf_token": token, "messages.payment_link": LINK},
                     follow_redirects=True)
    assert ok.status_code == 200 and "Messages saved" in ok.text
    assert org.get(f"{API}/settings").json()["messages"]["payment_link"] == LINK
    assert quote("ACC-1001") in ok.text and 'data-testid="payment-link-example"' in ok.text
    cleared = client.post("/settings/rules/messages", data={"csrf_token": token, "messages.payment_link": ""},
                          follow_redirects=True)
    assert cleared.status_code == 200
    assert org.get(f"{API}/settings").json()["messages"]["payment_link"] is None


def test_templates_page_preview_warns_until_a_link_is_configured(org, client):
    assert client.post(f"{API}/auth/login", json={"email": org.admin_email, "password": org.admin_password}).status_code == 200
    tid = _template(org)
    page = client.get(f"/templates/{tid}", params={"preview": "1"})
    assert page.status_code == 200
    assert 'data-testid="preview-warning"' in page.text and "Real messages using payment_link will fail" in page.text
    assert "https://pay.example.invalid/sample" in page.text and "Not configured yet" in page.text
    _set_link(org, LINK)
    page = client.get(f"/templates/{tid}", params={"preview": "1"})
    assert 'data-testid="preview-warning"' not in page.text
    assert "https://pay.example.com/p/ACC-1001?invoice=INV-1001&amp;amount=1250.00%20EUR" in page.text
