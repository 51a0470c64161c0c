"""The Settings page (SPEC §4.7, §4.10, §7, §1): dispatch rules saved and shown, errors beside their
field, channel credentials never shown back, API keys shown once, subscriptions, read-only roles."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from duecourse.tenancy import service as tenancy
from tests.web.conftest import LiveServer, WebOrg

SMTP_PASSWORD = "sup3r-s3cret-smtp-pw"


def test_dispatch_rules_saved_shown_and_errors(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("admin")
    page.goto("/settings")
    start = page.get_by_test_id("dispatch.allowed_hours.sms.start")
    expect(start).to_have_value("08:00")
    start.fill("09:30")
    page.get_by_test_id("dispatch.allowed_hours.sms.end").fill("19:00")
    page.get_by_test_id("dispatch.allowed_hours.sms.days.sat").uncheck()
    page.get_by_test_id("dispatch.frequency_limits.sms.per_week").fill("3")
    page.get_by_test_id("save-dispatch").click()
    expect(page.locator(".flash-success")).to_contain_text("Dispatch rules saved")
    expect(page.get_by_test_id("dispatch.allowed_hours.sms.start")).to_have_value("09:30")
    expect(page.get_by_test_id("dispatch.allowed_hours.sms.days.sat")).not_to_be_checked()
    expect(page.get_by_test_id("dispatch.frequency_limits.sms.per_week")).to_have_value("3")
    with server.db.transaction() as session:
        sms = tenancy.get_settings(session, web_org.id).dispatch
        assert (sms.allowed_hours["sms"].start, sms.allowed_hours["sms"].end) == ("09:30", "19:00")
        assert "sat" not in sms.allowed_hours["sms"].days and sms.frequency_limits["sms"].per_week == 3
    # A bad time: the error beside the field, what was typed kept, nothing saved.
    page.get_by_test_id("dispatch.allowed_hours.sms.start").fill("25:00")
    page.get_by_test_id("save-dispatch").click()
    expect(page.locator("[data-error-for='dispatch.allowed_hours.sms.start']")).to_contain_text("HH:MM")
    expect(page.get_by_test_id("dispatch.allowed_hours.sms.start")).to_have_value("25:00")
    # Start after end is an error of the row.
    page.get_by_test_id("dispatch.allowed_hours.sms.start").fill("20:00")
    page.get_by_test_id("dispatch.allowed_hours.sms.end").fill("10:00")
    page.get_by_test_id("save-dispatch").click()
    expect(page.locator("[data-error-for='dispatch.allowed_hours.sms']")).to_contain_text("start must be before end")
    page.goto("/settings")
    expect(page.get_by_test_id("dispatch.allowed_hours.sms.start")).to_have_value("09:30")
    # Exclusions and automation.
    page.goto("/settings#exclusions")
    page.get_by_test_id("exclusions.excluded_tags").fill("vip, legal")
    page.get_by_test_id("exclusions.min_balance").fill("25")
    page.get_by_test_id("save-exclusions").click()
    expect(page.locator(".flash-success")).to_contain_text("Exclusions saved")
    expect(page.get_by_test_id("exclusions.excluded_tags")).to_have_value("vip, legal")
    page.get_by_test_id("automation.auto_enqueue").check()
    page.get_by_test_id("automation.scheduler_interval_minutes").fill("10")
    page.get_by_test_id("save-automation").click()
    expect(page.get_by_test_id("automation.auto_enqueue")).to_be_checked()
    expect(page.get_by_test_id("automation.scheduler_interval_minutes")).to_have_value("10")
    # Messages: the payment link; a bad one is refused beside the field.
    page.get_by_test_id("messages.payment_link").fill("pay.example.com/{x}")
    page.get_by_test_id("save-messages").click()
    expect(page.locator("[data-error-for='messages.payment_link']")).to_contain_text("unknown placeholder {x}")
    page.get_by_test_id("messages.payment_link").fill("https://pay.example.com/{account_external_id}")
    page.get_by_test_id("save-messages").click()
    expect(page.locator(".flash-success")).to_contain_text("Messages saved")
    expect(page.get_by_test_id("payment-link-example")).to_contain_text("https://pay.example.com/ACC-1001")


def test_smtp_secret_never_shown_and_viewer_is_refused(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("admin")
    page.goto("/settings/channels")
    card = page.get_by_test_id("channel-email")
    expect(card.get_by_test_id("email-host")).to_be_hidden()
    card.get_by_test_id("channel-email-provider-select").select_option("smtp")
    card.get_by_test_id("email-host").fill("smtp.example.com")
    card.get_by_test_id("email-from_address").fill("not-an-email")
    card.get_by_test_id("email-secret-password").fill(SMTP_PASSWORD)
    card.get_by_test_id("save-channel-email").click()
    card = page.get_by_test_id("channel-email")
    expect(card.locator("[data-error-for='settings.from_address']")).to_be_visible()
    expect(card.get_by_test_id("email-host")).to_have_value("smtp.example.com")
    assert SMTP_PASSWORD not in page.content()
    card.get_by_test_id("email-from_address").fill("billing@example.com")
    card.get_by_test_id("email-secret-password").fill(SMTP_PASSWORD)
    card.get_by_test_id("save-channel-email").click()
    expect(page.locator(".flash-success")).to_contain_text("Email channel saved")
    card = page.get_by_test_id("channel-email")
    expect(card.get_by_test_id("channel-email-provider")).to_have_text("smtp")
    expect(card.get_by_test_id("email-secret-password")).to_have_value("")
    expect(card).to_contain_text("••••p-pw")
    assert SMTP_PASSWORD not in page.content()
    # Saving again with the password left empty keeps it.
    card.get_by_test_id("email-port").fill("2525")
    card.get_by_test_id("save-channel-email").click()
    expect(page.get_by_test_id("channel-email")).to_contain_text("Stored (••••p-pw)")
    assert page.request.get("/api/v1/channels/email").json()["secrets"] == {"password": "••••p-pw"}
    # Inbound webhooks: URLs and a rotation that shows the new secret once.
    expect(page.get_by_test_id("inbound-delivery-url")).to_contain_text(f"/api/v1/webhooks/{web_org.id}/delivery")
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("rotate-inbound").click()
    expect(page.get_by_test_id("inbound-secret-new")).to_contain_text("whsec_")
    # A viewer: read-only, no save buttons, and the server refuses the POST.
    viewer = login_as("viewer")
    viewer.goto("/settings/channels")
    expect(viewer.get_by_test_id("read-only")).to_be_visible()
    expect(viewer.locator("button[type=submit]", has_text="Save")).to_have_count(0)
    assert SMTP_PASSWORD not in viewer.content()
    token = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
    refused = viewer.request.post("/settings/channels/email", form={"csrf_token": token, "provider": "sandbox"})
    assert refused.status == 403
    assert viewer.request.post("/settings/rules/dispatch", form={"csrf_token": token}).status == 403
    viewer.goto("/settings")
    expect(viewer.get_by_test_id("save-dispatch")).to_have_count(0)
    expect(viewer.get_by_test_id("dispatch.allowed_hours.sms.start")).to_be_disabled()


def test_api_key_shown_once_users_and_subscriptions(server: LiveServer, web_org: WebOrg, login_as) -> None:  # type: ignore[no-untyped-def]
    page = login_as("admin")
    page.goto("/settings/api-keys")
    page.get_by_test_id("new-key-name").fill("ERP sync")
    page.get_by_test_id("new-key-role").select_option("manager")
    page.get_by_test_id("create-key").click()
    key = page.get_by_test_id("new-key-value").inner_text().strip()
    assert len(key) > 20
    assert page.request.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).json()["role"] == "manager"
    page.goto("/settings/api-keys")
    expect(page.get_by_test_id("key-row")).to_have_count(1)
    assert key not in page.content()
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("revoke-key").click()
    expect(page.get_by_test_id("key-row")).to_contain_text("Revoked")
    assert page.request.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status == 401
    # Users: add one, change a role, deactivate.
    page.goto("/settings/users")
    page.get_by_test_id("new-user-email").fill("newbie@example.com")
    page.get_by_test_id("new-user-password").fill("short")
    page.get_by_test_id("create-user").click()
    expect(page.locator("[data-error-for=password]")).to_be_visible()
    expect(page.get_by_test_id("new-user-email")).to_have_value("newbie@example.com")
    page.get_by_test_id("new-user-password").fill("long enough password")
    page.get_by_test_id("new-user-role").select_option("agent")
    page.get_by_test_id("create-user").click()
    expect(page.locator(".flash-success")).to_contain_text("newbie@example.com created")
    row = page.get_by_test_id("user-row").filter(has_text="newbie@example.com")
    row.get_by_test_id("user-role-select").select_option("viewer")
    row.get_by_test_id("user-role-save").click()
    expect(page.locator(".flash-success")).to_contain_text("now viewer")
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("user-row").filter(has_text="newbie@example.com").get_by_test_id("user-toggle-active").click()
    expect(page.get_by_test_id("user-row").filter(has_text="newbie@example.com")).to_contain_text("Deactivated")
    # Webhook subscriptions: the secret shown once, then masked.
    page.goto("/settings/webhooks")
    page.get_by_test_id("new-subscription-url").fill("https://erp.example.com/hooks")
    page.get_by_test_id("create-subscription").click()
    expect(page.locator("[data-error-for=event_types]")).to_be_visible()
    page.get_by_test_id("event-payment.received").check()
    page.get_by_test_id("create-subscription").click()
    secret = page.get_by_test_id("new-subscription-secret").inner_text().strip()
    assert secret.startswith("whsec_")
    page.goto("/settings/webhooks")
    expect(page.get_by_test_id("subscription-row")).to_have_count(1)
    assert secret not in page.content()
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("delete-subscription").click()
    expect(page.get_by_test_id("subscription-row")).to_have_count(0)
    expect(page).to_have_url(re.compile(r"/settings/webhooks$"))
