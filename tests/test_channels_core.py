"""Channel configuration (encrypted credentials, never shown in full) and duecourse's own signed
inbound webhooks: delivery reports and payments, with forged, replayed and malformed requests."""

from __future__ import annotations

import json
from datetime import date

from sqlalchemy import select

from duecourse.channels import webhooks
from duecourse.channels.config import inbound_secret
from duecourse.channels.models import ChannelConfig, SandboxMessage
from duecourse.channels.secrets import decrypt, key_from_settings
from duecourse.engine.cycle import tick
from duecourse.engine.models import QueueItem
from duecourse.ledger.models import Account, Payment
from tests.engine_helpers import debtor, items, log, refresh
from tests.test_engine_dispatch import _setup

SMTP = {
    "provider": "smtp",
    "settings": {"host": "smtp.example.com", "port": 587, "security": "starttls", "username": "mailer",
                 "from_address": "billing@example.com", "from_name": "Acme Billing"},
    "secrets": {"password": "s3cret-smtp-password"},
}


def test_channel_config_is_stored_encrypted_and_shown_masked(db, org, app):
    r = org.put("/api/v1/channels/email", json=SMTP)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["provider"] == "smtp" and body["settings"]["host"] == "smtp.example.com"
    assert body["secrets"] == {"password": "••••word"}
    assert "s3cret-smtp-password" not in r.text
    with db.transaction() as s:
        row = s.scalars(select(ChannelConfig).where(ChannelConfig.organization_id == org.id)).one()
        assert "s3cret" not in (row.secrets_encrypted or "") and "s3cret" not in json.dumps(row.settings)
        assert decrypt(key_from_settings(app.state.settings), row.secrets_encrypted) == {"password": "s3cret-smtp-password"}
    # Editing a setting without the secret keeps the stored secret.
    r = org.put("/api/v1/channels/email", json={**SMTP, "settings": {**SMTP["settings"], "port": 2525}, "secrets": {}})
    assert r.json()["settings"]["port"] == 2525 and r.json()["secrets"] == {"password": "••••word"}
    listed = {c["channel"]: c["provider"] for c in org.get("/api/v1/channels").json()}
    assert listed == {"email": "smtp", "sms": "sandbox", "whatsapp": "sandbox", "voice": "sandbox"}
    # The change is audited, without the secret in clear.
    audit = org.get("/api/v1/audit-log").text
    assert "Channel email" in audit and "s3cret" not in audit


def test_changing_where_credentials_go_needs_them_again(db, org, app):
    """An admin (or a leaked admin key) must not be able to point a configured channel at another
    server and collect the stored password on the next send."""
    assert org.put("/api/v1/channels/email", json=SMTP).status_code == 200
    moved = {**SMTP, "settings": {**SMTP["settings"], "host": "mail.attacker.example"}, "secrets": {}}
    r = org.put("/api/v1/channels/email", json=moved)
    assert r.status_code == 422
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["secrets.password"]
    assert org.get("/api/v1/channels/email").json()["settings"]["host"] == "smtp.example.com"  # unchanged
    # With the password given again, the new host is taken.
    r = org.put("/api/v1/channels/email", json={**moved, "secrets": {"password": "another-password"}})
    assert r.status_code == 200 and r.json()["settings"]["host"] == "mail.attacker.example"


def test_bad_channel_configs_are_refused_and_change_nothing(db, org):
    cases = [
        ("/api/v1/channels/fax", SMTP, "channel"),
        ("/api/v1/channels/email", {**SMTP, "provider": "twilio"}, "provider"),
        ("/api/v1/channels/email", {**SMTP, "settings": {**SMTP["settings"], "port": 70000}}, "settings.port"),
        ("/api/v1/channels/email", {**SMTP, "settings": {**SMTP["settings"], "from_address": "nope"}}, "settings.from_address"),
        ("/api/v1/channels/email", {**SMTP, "settings": {**SMTP["settings"], "colour": "red"}}, "settings.colour"),
        ("/api/v1/channels/email", {**SMTP, "secrets": {"api_key": "x"}}, "secrets.api_key"),
        ("/api/v1/channels/sms", {"provider": "twilio", "settings": {"account_sid": "AC" + "0" * 32}}, "secrets.auth_token"),
        ("/api/v1/channels/sms", {"provider": "twilio", "settings": {"account_sid": "AC1", "from_number": "+34600111222"},
                                  "secrets": {"auth_token": "t"}}, "settings.account_sid"),
        ("/api/v1/channels/sms", {"provider": "twilio", "settings": {"account_sid": "AC" + "0" * 32, "from_number": "12"},
                                  "secrets": {"auth_token": "t"}}, "settings.from_number"),
    ]
    for url, body, field in cases:
        r = org.put(url, json=body)
        assert r.status_code == 422, (url, body, r.text)
        assert field in [f["field"] for f in r.json()["error"]["fields"]], (field, r.json())
    with db.transaction() as s:
        assert s.scalars(select(ChannelConfig)).all() == []


def test_only_admins_configure_channels(db, org):
    assert org.put("/api/v1/channels/email", role="manager", json=SMTP).status_code == 403
    assert org.get("/api/v1/channels/email", role="viewer").json()["provider"] == "sandbox"
    assert org.client.get("/api/v1/channels").status_code == 401


def test_voice_webhook_secret_is_generated_and_shown_once(db, org):
    body = {"provider": "voice_http", "settings": {"endpoint_url": "http://127.0.0.1:9/calls"}, "secrets": {"api_key": "k" * 20}}
    first = org.put("/api/v1/channels/voice", json=body).json()
    secret = first["generated_secrets"]["webhook_secret"]
    assert secret.startswith("whsec_") and first["secrets"]["webhook_secret"] == "••••" + secret[-4:]
    again = org.put("/api/v1/channels/voice", json=body).json()
    assert again["generated_secrets"] == {} and again["secrets"]["webhook_secret"] == "••••" + secret[-4:]


def _signed(org, app, db, clock, path, payload, *, secret=None, at=None):
    if secret is None:
        with db.transaction() as s:
            secret = inbound_secret(s, organization_id=org.id, key=key_from_settings(app.state.settings), now=clock.now())
    raw = json.dumps(payload).encode()
    ts = int((at or clock.now()).timestamp())
    return org.client.post(path, content=raw, headers={webhooks.SIGNATURE_HEADER: webhooks.sign(secret, raw, ts),
                                                        "Content-Type": "application/json"})


def test_signed_delivery_webhook_fails_the_delivery_once(db, org, app, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 5)])
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "HOOK", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    assert tick(db, now=now)["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        ref = s.scalars(select(QueueItem.provider_ref).where(QueueItem.account_id == aid)).one()
    path = f"/api/v1/webhooks/{org.id}/delivery"
    event = {"id": "evt-1", "status": "bounced", "provider_ref": ref, "error": "550 mailbox unknown"}

    forged = _signed(org, app, db, clock, path, event, secret="whsec_wrong")
    assert forged.status_code == 401
    stale = _signed(org, app, db, clock, path, event, at=clock.now().replace(hour=8))
    assert stale.status_code == 401
    unsigned = org.client.post(path, json=event)
    assert unsigned.status_code == 401
    malformed = _signed(org, app, db, clock, path, {"id": "evt-2", "status": "exploded", "provider_ref": ref})
    assert malformed.status_code == 400 and "status" in malformed.json()["error"]["message"]
    unknown = _signed(org, app, db, clock, path, {"id": "evt-3", "status": "bounced", "provider_ref": "nope"})
    assert unknown.status_code == 400, unknown.text
    with db.transaction() as s:
        assert [i[1] for i in items(s, aid)] == ["completed"]  # nothing changed so far
        assert "delivery_failed" not in [e[0] for e in log(s, aid)]

    ok = _signed(org, app, db, clock, path, event)
    assert ok.status_code == 200 and ok.json() == {"result": "delivery_failure"}
    replay = _signed(org, app, db, clock, path, event)
    assert replay.json() == {"result": "duplicate"}
    with db.transaction() as s:
        assert [e[0] for e in log(s, aid)].count("delivery_failed") == 1
        assert s.get(Account, aid).email_invalid  # a hard bounce flags the address
        assert [(i[0], i[1]) for i in items(s, aid)] == [(0, "completed"), (1, "pending")]
    # Another organization's secret does not open this organization's webhook.
    assert org.client.post("/api/v1/webhooks/999999/delivery", json=event).status_code in (401, 404)


def test_signed_payment_webhook_records_the_payment_once(db, org, app, clock):
    with db.transaction() as s:
        aid = debtor(s, org.id, clock.now(), "PAYER", due=date(2026, 3, 1), total="80.00").id
        refresh(s, org.id, clock.now())
    path = f"/api/v1/webhooks/{org.id}/payments"
    event = {"id": "pay-evt-1", "payment": {"account_external_id": "PAYER", "amount": "80.00", "reference": "bank 123"}}
    bad = _signed(org, app, db, clock, path, {"id": "pay-evt-0", "payment": {"account_external_id": "PAYER", "amount": "-5"}})
    assert bad.status_code == 400 and "amount" in bad.json()["error"]["message"]
    r = _signed(org, app, db, clock, path, event)
    assert r.status_code == 200 and r.json()["result"] == "recorded"
    assert _signed(org, app, db, clock, path, event).json() == {"result": "duplicate"}
    with db.transaction() as s:
        payments = s.scalars(select(Payment).where(Payment.account_id == aid)).all()
        assert [(str(p.amount), p.source.value) for p in payments] == [("80.0000", "webhook")]
        assert s.get(Account, aid).balance == 0


def test_inbound_settings_show_urls_and_rotate_the_secret(db, org, app, clock):
    shown = org.get("/api/v1/channels-inbound").json()
    assert shown["urls"]["delivery"].endswith(f"/api/v1/webhooks/{org.id}/delivery")
    assert shown["signing_secret"].startswith("••••")
    rotated = org.post("/api/v1/channels-inbound/rotate-secret").json()["signing_secret"]
    assert rotated.startswith("whsec_") and rotated[-4:] == org.get("/api/v1/channels-inbound").json()["signing_secret"][-4:]
    assert org.get("/api/v1/channels-inbound", role="viewer").status_code == 403


def test_sandbox_outbox_lists_sent_messages_newest_first(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        for ext in ("OUT-A", "OUT-B"):
            debtor(s, org.id, now, ext, due=date(2026, 3, 1))
        refresh(s, org.id, now)
    tick(db, now=now)
    page = org.get("/api/v1/sandbox/outbox", role="viewer").json()
    assert [m["to"] for m in page["items"]] == ["out-b@example.com", "out-a@example.com"]
    assert org.get("/api/v1/sandbox/outbox?channel=sms").json()["items"] == []
    with db.transaction() as s:
        assert s.scalars(select(SandboxMessage)).all()[0].body_text  # rendered template text


def test_unsubscribe_tokens_are_the_serializers_own_and_read_back():
    """The fast token builder writes what itsdangerous' serializer writes (links already sent keep
    working), except that the serializer compresses payloads that shrink; the serializer reads both,
    and only the right key does."""
    from itsdangerous import URLSafeSerializer

    from duecourse.channels.links import read_unsubscribe_token, unsubscribe_token

    serializer = URLSafeSerializer("k3y", salt="duecourse-unsubscribe")
    cases = ((1, 2, "email"), (7, 123456789, "sms"), (3, 4, "whatsapp"), (100000, 1111111111, "email"),
             (100000, 10**12, "sms"), (5, 6, "émail"))
    compressed = 0
    for org_id, account_id, channel in cases:
        token = unsubscribe_token("k3y", organization_id=org_id, account_id=account_id, channel=channel)
        theirs = serializer.dumps([org_id, account_id, channel])
        if theirs.startswith("."):  # the serializer compressed this payload
            compressed += 1
            assert serializer.loads(token) == serializer.loads(theirs) == [org_id, account_id, channel]
        else:
            assert token == theirs
        target = read_unsubscribe_token("k3y", token)
        assert (target.organization_id, target.account_id, target.channel) == (org_id, account_id, channel)
        assert read_unsubscribe_token("other-key", token) is None
        assert read_unsubscribe_token("k3y", token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]) is None
    assert compressed >= 1  # the cases include a payload the serializer compresses
