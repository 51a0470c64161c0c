"""Message templates (SPEC §7): validation at save time, sandboxed rendering, preview, usage, access."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from duecourse.ledger.models import Account, Invoice
from duecourse.messaging import rendering

API = "/api/v1"

EMAIL = {
    "name": "Friendly reminder",
    "channel": "email",
    "tone": "empathetic",
    "subject": "Invoice {{ carrying_invoice_number }} for {{ debtor_name }}",
    "body_text": "Dear {{ debtor_name }},\nyou owe {{ balance }} {{ currency }}.\nPay: {{ payment_link }}",
    "body_html": "<p>Dear {{ debtor_name }}</p><a href='{{ unsubscribe_link }}'>unsubscribe</a>",
}
SMS = {
    "name": "SMS nudge",
    "channel": "sms",
    "body_text": "{{ organization_name }}: {{ balance }} {{ currency }} due. {{ payment_link }}",
}


def _fields(r) -> list[str]:  # type: ignore[no-untyped-def]
    return [f["field"] for f in r.json()["error"]["fields"]]


def _create(org, body=None, **kw):  # type: ignore[no-untyped-def]
    r = org.post(f"{API}/templates", json={**(body or EMAIL), **kw})
    assert r.status_code == 201, r.text
    return r.json()


def test_create_read_list_and_filter(org):
    email = _create(org)
    assert (
        email["subject"] == EMAIL["subject"] and email["tone"] == "empathetic" and email["channel"] == "email"
    )
    sms = _create(org, SMS)
    assert sms["subject"] is None and sms["body_html"] is None and sms["tone"] == "standard"
    assert org.get(f"{API}/templates/{email['id']}", role="viewer").json() == email

    listed = org.get(f"{API}/templates", role="viewer").json()
    assert [t["id"] for t in listed["items"]] == [email["id"], sms["id"]] and listed["next_cursor"] is None
    assert [t["id"] for t in org.get(f"{API}/templates", params={"channel": "sms"}).json()["items"]] == [
        sms["id"]
    ]
    assert [t["id"] for t in org.get(f"{API}/templates", params={"tone": "empathetic"}).json()["items"]] == [
        email["id"]
    ]
    assert [t["id"] for t in org.get(f"{API}/templates", params={"search": "NUDGE"}).json()["items"]] == [
        sms["id"]
    ]
    assert org.get(f"{API}/templates", params={"search": "%"}).json()["items"] == []
    page = org.get(f"{API}/templates", params={"limit": 1}).json()
    assert [t["id"] for t in page["items"]] == [email["id"]]
    page2 = org.get(f"{API}/templates", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [t["id"] for t in page2["items"]] == [sms["id"]] and page2["next_cursor"] is None
    assert org.get(f"{API}/templates", params={"channel": "fax"}).status_code == 422
    variables = org.get(f"{API}/templates/variables", role="viewer").json()["variables"]
    assert set(variables) == set(rendering.VARIABLES)


CREATE_ERRORS = [
    ({"name": None}, "name", None),
    ({"name": ""}, "name", None),
    ({"name": "   "}, "name", None),
    ({"name": "x" * 201}, "name", "200"),
    ({"channel": "fax"}, "channel", None),
    ({"tone": "angry"}, "tone", None),
    ({"subject": None}, "subject", "required"),
    ({"subject": "  "}, "subject", "required"),
    ({"body_text": None}, "body_text", None),
    ({"body_text": " \n "}, "body_text", "required"),
    ({"body_text": "Hello\n{{ debtor_name }\nbye"}, "body_text", "line 2"),
    ({"subject": "Pay {% if balance %}now"}, "subject", "line 1"),
    ({"body_html": "<p>\n\n{{ balance | }}</p>"}, "body_html", "line 3"),
    (
        {"body_text": "Hi {{ debtor_name }}, {{ secret_key }} and {{ password }}"},
        "body_text",
        "password, secret_key",
    ),
    ({"body_html": "{{ cycler.__init__.__globals__ }}"}, "body_html", "cannot be rendered"),
    ({"body_text": "{{ debtor_name.__class__.__mro__ }}"}, "body_text", "cannot be rendered"),
    ({"body_text": "{{ 'x' * 1000000000 }}"}, "body_text", "cannot be rendered"),
    ({"body_text": "{% for i in range(100000000) %}x{% endfor %}"}, "body_text", "cannot be rendered"),
    ({"colour": "red"}, "colour", None),
]


def test_create_validation_names_the_field_and_creates_nothing(org):
    for change, field, words in CREATE_ERRORS:
        r = org.post(f"{API}/templates", json={**EMAIL, **change})
        assert r.status_code == 422, (change, r.text)
        assert field in _fields(r), (change, r.text)
        if words:
            assert words in r.json()["error"]["message"], (change, r.text)
    assert org.get(f"{API}/templates").json()["items"] == []


def test_channel_rules_subject_and_html_are_email_only(org):
    for change, field in (({"subject": "Hi"}, "subject"), ({"body_html": "<b>hi</b>"}, "body_html")):
        r = org.post(f"{API}/templates", json={**SMS, **change})
        assert r.status_code == 422 and _fields(r) == [field]
        assert "only for email" in r.json()["error"]["fields"][0]["message"]
    for channel in ("whatsapp", "voice"):
        r = org.post(f"{API}/templates", json={**SMS, "channel": channel, "subject": "x"})
        assert r.status_code == 422 and _fields(r) == ["subject"]
    assert org.get(f"{API}/templates").json()["items"] == []


def test_name_unique_per_organization(org, other_org):
    _create(org)
    dup = org.post(f"{API}/templates", json={**SMS, "name": "FRIENDLY reminder"})
    assert dup.status_code == 409 and _fields(dup) == ["name"]
    assert len(org.get(f"{API}/templates").json()["items"]) == 1
    # Another organization may use the same name.
    assert other_org.post(f"{API}/templates", json=EMAIL).status_code == 201


def test_update_put_and_patch(org, clock):
    t = _create(org)
    clock.advance(hours=1)
    bad_cases = [
        ({"body_text": "{{ nope }}"}, "body_text"),
        ({"name": None}, "name"),
        ({"body_text": None}, "body_text"),
        ({"channel": None}, "channel"),
        ({"subject": ""}, "subject"),
        ({"body_html": "{% endif %}"}, "body_html"),
        ({"status": "x"}, "status"),
    ]
    for change, field in bad_cases:
        r = org.patch(f"{API}/templates/{t['id']}", json=change)
        assert r.status_code == 422 and field in _fields(r), (change, r.text)
    other = _create(org, SMS)
    r = org.patch(f"{API}/templates/{t['id']}", json={"name": "sms NUDGE"})
    assert r.status_code == 409 and _fields(r) == ["name"]
    assert org.get(f"{API}/templates/{t['id']}").json() == t

    ok = org.patch(f"{API}/templates/{t['id']}", json={"tone": "firm", "body_text": "Now: {{ balance }}"})
    assert ok.status_code == 200
    assert ok.json()["tone"] == "firm" and ok.json()["body_text"] == "Now: {{ balance }}"
    assert ok.json()["subject"] == EMAIL["subject"] and ok.json()["updated_at"] != t["updated_at"]

    # email -> sms drops the subject and the HTML body unless they are sent.
    moved = org.patch(f"{API}/templates/{t['id']}", json={"channel": "sms"})
    assert moved.status_code == 200
    assert moved.json()["subject"] is None and moved.json()["body_html"] is None
    # sms -> email needs a subject again.
    back = org.patch(f"{API}/templates/{t['id']}", json={"channel": "email"})
    assert back.status_code == 422 and _fields(back) == ["subject"]

    put = org.put(
        f"{API}/templates/{other['id']}",
        json={"name": "WA", "channel": "whatsapp", "body_text": "Hi {{ debtor_name }}"},
    )
    assert put.status_code == 200
    assert (
        put.json()["channel"] == "whatsapp"
        and put.json()["tone"] == "standard"
        and put.json()["name"] == "WA"
    )
    bad_put = org.put(f"{API}/templates/{other['id']}", json={"name": "WA", "channel": "whatsapp"})
    assert bad_put.status_code == 422 and _fields(bad_put) == ["body_text"]
    assert org.get(f"{API}/templates/{other['id']}").json() == put.json()


def _strategy_using(org, template_id, name="Uses template"):  # type: ignore[no-untyped-def]
    r = org.post(
        f"{API}/strategies",
        json={
            "name": name,
            "description": "d",
            "trigger_type": "days_overdue",
            "trigger_days": 0,
            "stages": [
                {
                    "action_type": "email",
                    "timing_type": "days_from_trigger",
                    "days": 0,
                    "template_id": template_id,
                }
            ],
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


def test_template_in_use_cannot_be_deleted_or_change_channel(org):
    t = _create(org)
    _strategy_using(org, t["id"], "Alpha plan")
    _strategy_using(org, t["id"], "Beta plan")
    r = org.delete(f"{API}/templates/{t['id']}")
    assert r.status_code == 409
    assert "'Alpha plan'" in r.json()["error"]["message"] and "'Beta plan'" in r.json()["error"]["message"]
    assert org.get(f"{API}/templates/{t['id']}").status_code == 200
    ch = org.patch(f"{API}/templates/{t['id']}", json={"channel": "sms", "subject": None, "body_html": None})
    assert (
        ch.status_code == 409 and _fields(ch) == ["channel"] and "Alpha plan" in ch.json()["error"]["message"]
    )
    assert org.get(f"{API}/templates/{t['id']}").json()["channel"] == "email"

    unused = _create(org, SMS)
    assert org.delete(f"{API}/templates/{unused['id']}").status_code == 204
    assert org.get(f"{API}/templates/{unused['id']}").status_code == 404


def test_preview_with_sample_values_escapes_html(org):
    t = _create(org)
    r = org.post(f"{API}/templates/{t['id']}/preview", role="viewer", json={})
    assert r.status_code == 200, r.text
    p = r.json()
    s = rendering.SAMPLE_CONTEXT
    assert p["subject"] == f"Invoice {s['carrying_invoice_number']} for {s['debtor_name']}"
    assert (
        p["text"]
        == f"Dear {s['debtor_name']},\nyou owe {s['balance']} {s['currency']}.\nPay: {s['payment_link']}"
    )
    assert p["html"].startswith("<p>Dear Jane Doe</p>") and p["sms"] is None
    # No body at all is the same as no account.
    assert org.post(f"{API}/templates/{t['id']}/preview").json() == p


def _account(
    db, org_id, clock, *, name="Ana <b>Ruiz</b>", currency="EUR", due=None, total="800.00", balance="1250.00"
):  # type: ignore[no-untyped-def]
    now = clock.now()
    with db.transaction() as s:
        a = Account(
            organization_id=org_id,
            external_id="ACC-1",
            name=name,
            currency=currency,
            created_at=now,
            updated_at=now,
            balance=Decimal(balance),
            gross_open=Decimal(balance),
        )
        s.add(a)
        s.flush()
        if due is not None:
            inv = Invoice(
                organization_id=org_id,
                account_id=a.id,
                external_id="INV-9",
                number="F-2026-009",
                currency=currency,
                total=Decimal(total),
                issue_date=due - timedelta(days=30),
                due_date=due,
                created_at=now,
                updated_at=now,
            )
            s.add(inv)
            s.flush()
            a.carrying_invoice_id = inv.id
            a.carrying_due_date = due
        return a.id


def test_preview_against_an_account(org, other_org, db, clock):
    due = clock.now().date() - timedelta(days=12)
    acc = _account(db, org.id, clock, due=due)
    t = _create(
        org,
        body_text="{{ debtor_name }}|{{ balance }}|{{ currency }}|{{ carrying_invoice_number }}|"
        "{{ carrying_invoice_amount }}|{{ carrying_invoice_due_date }}|{{ days_overdue }}|{{ organization_name }}",
        body_html="<p>{{ debtor_name }}</p>",
    )
    p = org.post(f"{API}/templates/{t['id']}/preview", json={"account_id": acc}).json()
    assert p["text"] == f"Ana <b>Ruiz</b>|1250.00|EUR|F-2026-009|800.00|{due.isoformat()}|12|Acme Receivables"
    assert p["html"] == "<p>Ana &lt;b&gt;Ruiz&lt;/b&gt;</p>"
    assert p["account_id"] == acc

    # Another organization's account is unknown here, and so is a missing one.
    other_acc = _account(db, other_org.id, clock)
    for bad in (other_acc, 999999):
        r = org.post(f"{API}/templates/{t['id']}/preview", json={"account_id": bad})
        assert r.status_code == 422 and _fields(r) == ["account_id"]
    r = org.post(f"{API}/templates/{t['id']}/preview", json={"account_id": "x"})
    assert r.status_code == 422 and _fields(r) == ["account_id"]


def test_preview_account_without_carrying_invoice_renders_empty_values(org, db, clock):
    acc = _account(db, org.id, clock, currency="JPY", balance="5000")
    t = _create(
        org, SMS, body_text="[{{ carrying_invoice_number }}][{{ days_overdue }}] {{ balance }} {{ currency }}"
    )
    p = org.post(f"{API}/templates/{t['id']}/preview", json={"account_id": acc}).json()
    assert p["text"] == "[][] 5000 JPY"  # yen have no minor units


def test_sms_preview_counts_segments_and_warns(org):
    one = _create(org, SMS, body_text="x" * 160)
    p = org.post(f"{API}/templates/{one['id']}/preview").json()
    assert (
        p["sms"] == {"encoding": "GSM-7", "characters": 160, "units": 160, "segments": 1}
        and p["warnings"] == []
    )

    two = _create(org, {**SMS, "name": "long"}, body_text="{{ debtor_name }} " + "y" * 200)
    p = org.post(f"{API}/templates/{two['id']}/preview").json()
    assert p["sms"]["segments"] == 2 and p["sms"]["encoding"] == "GSM-7"
    assert len(p["warnings"]) == 1 and "2 SMS segments" in p["warnings"][0]

    uni = _create(org, {**SMS, "name": "unicode"}, body_text="Zażółć " + "a" * 70)
    p = org.post(f"{API}/templates/{uni['id']}/preview").json()
    assert p["sms"] == {"encoding": "UCS-2", "characters": 77, "units": 77, "segments": 2}
    assert "outside GSM-7" in p["warnings"][0] and "ż" in p["warnings"][0]

    email = _create(org)
    assert org.post(f"{API}/templates/{email['id']}/preview").json()["sms"] is None


def test_sms_size_rules():
    assert rendering.sms_size("a" * 160).segments == 1
    assert rendering.sms_size("a" * 161).segments == 2
    assert rendering.sms_size("a" * 306).segments == 2
    assert rendering.sms_size("a" * 307).segments == 3
    euro = rendering.sms_size("€" * 80)  # extension table: two septets each
    assert (euro.encoding, euro.units, euro.segments) == ("GSM-7", 160, 1)
    assert rendering.sms_size("€" * 81).segments == 2
    assert rendering.sms_size("ñ" * 160).encoding == "GSM-7"
    assert rendering.sms_size("é" * 70 + "ł").segments == 2
    assert rendering.sms_size("ł" * 70).segments == 1
    emoji = rendering.sms_size("😀" * 35)  # outside the BMP: two UTF-16 units each
    assert (emoji.encoding, emoji.characters, emoji.units, emoji.segments) == ("UCS-2", 35, 70, 1)
    assert rendering.sms_size("ł" * 134).segments == 2 and rendering.sms_size("ł" * 135).segments == 3
    assert rendering.sms_size("").segments == 0


@pytest.mark.parametrize("role", ["viewer", "agent", "manager"])
def test_only_admins_change_templates(org, role):
    t = _create(org)
    assert org.post(f"{API}/templates", role=role, json={**SMS}).status_code == 403
    assert org.patch(f"{API}/templates/{t['id']}", role=role, json={"tone": "firm"}).status_code == 403
    assert org.put(f"{API}/templates/{t['id']}", role=role, json={**EMAIL, "tone": "firm"}).status_code == 403
    r = org.delete(f"{API}/templates/{t['id']}", role=role)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    # Reading and previewing are open to every role; nothing changed.
    assert org.get(f"{API}/templates/{t['id']}", role=role).json() == t
    assert [x["id"] for x in org.get(f"{API}/templates", role=role).json()["items"]] == [t["id"]]
    assert org.post(f"{API}/templates/{t['id']}/preview", role=role).status_code == 200


def test_other_organizations_templates_are_404(org, other_org):
    t = _create(org)
    tid = t["id"]
    assert other_org.get(f"{API}/templates/{tid}").status_code == 404
    assert other_org.put(f"{API}/templates/{tid}", json={**EMAIL, "name": "stolen"}).status_code == 404
    assert other_org.patch(f"{API}/templates/{tid}", json={"name": "stolen"}).status_code == 404
    assert other_org.delete(f"{API}/templates/{tid}").status_code == 404
    assert other_org.post(f"{API}/templates/{tid}/preview").status_code == 404
    assert other_org.get(f"{API}/templates").json()["items"] == []
    assert org.get(f"{API}/templates/{tid}").json() == t
    # A stage of another organization cannot use it either.
    r = other_org.post(
        f"{API}/strategies",
        json={
            "name": "x",
            "description": "d",
            "trigger_type": "days_overdue",
            "trigger_days": 0,
            "stages": [
                {"action_type": "email", "timing_type": "days_from_trigger", "days": 0, "template_id": tid}
            ],
        },
    )
    assert r.status_code == 422 and [f["field"] for f in r.json()["error"]["fields"]] == [
        "stages[0].template_id"
    ]
