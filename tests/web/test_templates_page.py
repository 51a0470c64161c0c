"""The Templates page (SPEC §7): errors beside their field, create, tone variants, preview, roles."""

from __future__ import annotations

import re
from datetime import date

from playwright.sync_api import expect

from tests.engine_helpers import debtor, refresh
from tests.web.conftest import LiveServer, WebOrg


def _seed_account(server: LiveServer, org: WebOrg) -> None:
    now = server.clock.now()
    with server.db.transaction() as session:
        debtor(session, org.id, now, "ACC-77", due=date(2026, 2, 1), total="250.00", name="Paula Preview")
        refresh(session, org.id, now)


def test_unknown_variable_error_then_create_and_preview(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    _seed_account(server, web_org)
    page = login_as("admin")
    page.goto("/templates")
    expect(page.get_by_test_id("template-row")).to_have_count(0)
    page.get_by_test_id("new-template").click()
    expect(page.get_by_test_id("variables-help")).to_contain_text("{{ debtor_name }}")
    page.get_by_test_id("f-name").fill("Friendly reminder")
    page.get_by_test_id("f-subject").fill("Invoice {{ carrying_invoice_number }}")
    bad = "Hello {{ debtor_nme }}, you owe {{ balance }} {{ currency }}."
    page.get_by_test_id("f-body-text").fill(bad)
    page.get_by_test_id("save-template").click()
    error = page.locator("[data-error-for=body_text]")
    expect(error).to_contain_text("unknown variable debtor_nme")
    expect(page.get_by_test_id("f-body-text")).to_have_value(bad)
    expect(page.get_by_test_id("f-name")).to_have_value("Friendly reminder")
    # A syntax error in the HTML body is shown beside that field.
    page.get_by_test_id("f-body-text").fill("Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}.")
    page.get_by_test_id("f-body-html").fill("<p>{{ debtor_name </p>")
    page.get_by_test_id("save-template").click()
    expect(page.locator("[data-error-for=body_html]")).to_contain_text("syntax error on line 1")
    expect(page.locator("[data-error-for=body_text]")).to_have_count(0)
    page.get_by_test_id("f-body-html").fill("<p>Dear <b>{{ debtor_name }}</b></p><script>alert(1)</script>")
    page.get_by_test_id("save-template").click()
    expect(page.locator(".flash-success")).to_contain_text("Template 'Friendly reminder' created")
    expect(page).to_have_url(re.compile(r"/templates/\d+$"))
    # Preview against sample values, then against the seeded account (by external id).
    page.get_by_test_id("preview-sample").click()
    expect(page.get_by_test_id("preview-text")).to_contain_text("Hello Jane Doe")
    page.get_by_test_id("preview-account").fill("ACC-77")
    page.get_by_test_id("preview-run").click()
    expect(page.get_by_test_id("preview-text")).to_have_text("Hello Paula Preview, you owe 250.00 EUR.")
    expect(page.get_by_test_id("preview-subject")).to_have_text("Invoice ACC-77-1")
    expect(page.get_by_test_id("preview-html")).to_have_attribute("sandbox", "")
    expect(page.frame_locator("[data-testid=preview-html]").locator("b")).to_have_text("Paula Preview")
    page.get_by_test_id("preview-account").fill("NOPE")
    page.get_by_test_id("preview-run").click()
    expect(page.get_by_test_id("preview-error")).to_contain_text("No account")
    # A firm tone variant via the "tone variant of" drop-down; the list filters by tone.
    page.get_by_test_id("new-variant").click()
    expect(page.get_by_test_id("f-variant-of")).to_have_value(re.compile(r"\d+"))
    page.get_by_test_id("f-name").fill("Firm reminder")
    page.get_by_test_id("f-tone").select_option("firm")
    page.get_by_test_id("save-template").click()
    expect(page.locator(".flash-success")).to_contain_text("created")
    page.goto("/templates?tone=firm")
    expect(page.get_by_test_id("template-row")).to_have_count(1)
    expect(page.get_by_test_id("template-row")).to_contain_text("Firm variant of Friendly reminder")
    page.goto("/templates?channel=sms")
    expect(page.get_by_test_id("template-row")).to_have_count(0)


def test_sms_preview_segments_and_viewer_is_read_only(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("admin")
    page.goto("/templates/new")
    page.get_by_test_id("f-name").fill("Long SMS")
    page.get_by_test_id("f-channel").select_option("sms")
    expect(page.get_by_test_id("f-subject")).to_be_hidden()
    page.get_by_test_id("f-body-text").fill("Hola {{ debtor_name }} " + "€" * 10 + " ñ" * 40 + " 😀")
    page.get_by_test_id("save-template").click()
    expect(page.locator(".flash-success")).to_be_visible()
    template_url = page.url
    page.get_by_test_id("preview-sample").click()
    expect(page.get_by_test_id("preview-sms")).to_contain_text("UCS-2")
    expect(page.get_by_test_id("preview-warning")).to_contain_text("SMS segments")
    viewer = login_as("viewer")
    viewer.goto(template_url)
    expect(viewer.get_by_test_id("f-body-text")).to_be_disabled()
    expect(viewer.get_by_test_id("save-template")).to_have_count(0)
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
    assert viewer.request.post(template_url, form={"csrf_token": token, "name": "x"}).status == 403
    assert viewer.request.get("/templates/new").status == 403
