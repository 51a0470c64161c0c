"""SMS and WhatsApp through a Twilio-compatible Messages API (SPEC §7), against a fake Twilio on a real
loopback HTTP server (tests/fake_twilio.py): the adapter's requests and error mapping, request
signatures, and, end to end on both databases, dispatch through ``tick``, signed status callbacks,
forged and replayed callbacks, STOP replies, invalid numbers and outages."""

from __future__ import annotations

import threading
import time
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from duecourse.app import create_app
from duecourse.channels.base import OutboundMessage, ProviderError
from duecourse.channels.models import WebhookReceipt
from duecourse.channels.registry import Providers, ProviderEnv
from duecourse.channels.twilio import TwilioProvider, twilio_signature, verify_twilio_signature
from duecourse.config import Settings
from duecourse.engine import dispatch
from duecourse.engine.cycle import run_scheduled, tick
from duecourse.engine.models import Direction, ExecutionLogEntry, Interaction, QueueItem
from duecourse.ledger.models import Account
from duecourse.messaging.models import Template
from duecourse.tenancy.models import Organization
from tests import fake_twilio
from tests.engine_helpers import debtor, items, log, refresh, strategy
from tests.fake_twilio import FakeTwilio

SID = "AC" + "0123456789abcdef" * 2  # the SMS account
WA_SID = "AC" + "fedcba9876543210" * 2  # WhatsApp through another (sub)account, with its own token
SMS_TOKEN = "sms-token-0123456789abcdef"
WA_TOKEN = "wa-token-fedcba9876543210"
FROM = "+34911222333"
PHONE = "+34600111222"
WHATSAPP = "+34600111333"


def utc(*a):
    return datetime(*a, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """The dispatcher keeps a process-wide cool-down per (organization id, channel) after a retryable
    provider failure; ids repeat across tests and databases, so each test starts without one."""
    breakers = getattr(dispatch, "_BREAKERS", None)
    if breakers is not None:
        breakers.clear()
    yield
    if breakers is not None:
        breakers.clear()


@pytest.fixture
def fake():
    server = FakeTwilio().start()
    server.add_account(SID, SMS_TOKEN)
    server.add_account(WA_SID, WA_TOKEN)
    yield server
    server.stop()


def _message(channel="sms", to=PHONE):
    return OutboundMessage(organization_id=1, account_id=1, channel=channel, to=to, body_text="You owe 100.00 EUR",
                           idempotency_key="qi-1")


def _provider(fake, channel="sms", token=SMS_TOKEN, timeout=5.0, **settings):
    env = ProviderEnv(organization_id=7, channel=channel, public_url="https://collect.example.com/", timeout_seconds=timeout)
    return TwilioProvider({"base_url": fake.base_url, "account_sid": SID, "from_number": FROM, **settings},
                          {"auth_token": token}, env)


# --- signatures ---------------------------------------------------------------------------------


def test_signature_matches_twilios_published_vectors():
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234", "From": "+14158675309",
              "To": "+18005551212"}
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    # Repeated names: sorted by name, then value, duplicates once (as Twilio's libraries do).
    repeated = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234"), ("Digits", "1234")]
    assert twilio_signature("12345", url, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert verify_twilio_signature("12345", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    # Proxies add or drop the default port; the signature is accepted either way.
    assert verify_twilio_signature("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", params,
                                   "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not verify_twilio_signature("12345", url + "&x=1", params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not verify_twilio_signature("12345", url, {**params, "Digits": "9999"}, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not verify_twilio_signature("54321", url, params, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not verify_twilio_signature("12345", url, params, None)
    assert not verify_twilio_signature("", url, params, twilio_signature("", url, params))


# --- the adapter against the fake API ------------------------------------------------------------


def test_sms_request_has_the_twilio_form_and_basic_auth(fake):
    result = _provider(fake).send(_message())
    assert result.provider_ref.startswith("SM") and result.status == "queued"
    [req] = fake.requests
    assert req.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert req.auth == (SID, SMS_TOKEN)
    assert req.form == {"To": PHONE, "From": FROM, "Body": "You owe 100.00 EUR",
                        "StatusCallback": "https://collect.example.com/api/v1/webhooks/7/twilio/status"}
    assert fake.sent[0].sid == result.provider_ref


def test_whatsapp_prefixes_and_messaging_service(fake):
    _provider(fake, channel="whatsapp").send(_message("whatsapp", WHATSAPP))
    assert (fake.requests[0].form["To"], fake.requests[0].form["From"]) == (f"whatsapp:{WHATSAPP}", f"whatsapp:{FROM}")
    service = "MG" + "ab" * 16
    _provider(fake, messaging_service_sid=service).send(_message())
    form = fake.requests[1].form
    assert form["MessagingServiceSid"] == service and "From" not in form and form["To"] == PHONE


@pytest.mark.parametrize(
    ("to", "code", "invalid_address"),
    [(fake_twilio.INVALID, "21211", True), ("12345", "21211", True), (fake_twilio.LANDLINE, "21614", True)],
)
def test_invalid_numbers_are_not_retryable_and_flag_the_address(fake, to, code, invalid_address):
    with pytest.raises(ProviderError) as err:
        _provider(fake).send(_message(to=to))
    assert (err.value.retryable, err.value.invalid_address) == (False, invalid_address)
    assert f"Twilio error {code}" in str(err.value)
    assert fake.sent == []


def test_unsubscribed_recipient_is_not_retryable_and_says_opted_out(fake):
    fake.unsubscribed.add(PHONE)
    with pytest.raises(ProviderError) as err:
        _provider(fake).send(_message())
    assert (err.value.retryable, err.value.invalid_address, err.value.opted_out) == (False, False, True)
    assert "21610" in str(err.value) and "opted out" in str(err.value)


def test_a_number_twilio_knows_as_opted_out_is_opted_out_here_too(db, org, clock, app, fake):
    """The debtor opted out with Twilio in a way duecourse never saw (a keyword only Twilio's
    Advanced Opt-Out knows, a reply to another sender). Twilio refuses with 21610: the account is
    opted out of SMS, the stage is skipped as an opt-out, and no later SMS stage is attempted (§4.7)."""
    _configure(org, fake)
    providers = Providers(app.state.settings)
    aid = _scenario(db, org, clock.now(), [("sms", "t", 0), ("sms", "p", 2)])
    fake.unsubscribed.add(PHONE)
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"skipped": 1}
    with db.transaction() as s:
        acct = s.get(Account, aid)
        assert (acct.opt_out_sms, acct.opt_out_whatsapp, acct.case_next_stage) == (True, False, 1)
        assert [(q.stage_index, q.status, q.reason) for q in _queue(db, aid)] == [(0, "skipped", "opt_out")]
        assert ("opted_out", 0, "provider_opt_out") in log(s, aid)
    clock.advance(days=2, hours=1)
    tick(db, now=clock.now(), providers=providers)
    assert len(fake.requests) == 1  # the second SMS stage is skipped without asking Twilio
    assert [(q.stage_index, q.status, q.reason) for q in _queue(db, aid)][-1] == (1, "skipped", "opt_out")


def test_wrong_credentials_are_not_retryable(fake):
    with pytest.raises(ProviderError) as err:
        _provider(fake, token="wrong").send(_message())
    assert err.value.retryable is False and "20003" in str(err.value) and "credentials" in str(err.value)


@pytest.mark.parametrize(("mode", "what"), [("down", "HTTP 500"), ("rate_limited", "HTTP 429")])
def test_outages_and_rate_limits_are_retryable(fake, mode, what):
    fake.mode = mode
    with pytest.raises(ProviderError) as err:
        _provider(fake).send(_message())
    assert err.value.retryable is True and err.value.invalid_address is False and what in str(err.value)


def test_an_unanswered_request_is_not_retried_and_a_refused_connection_is(fake):
    # Twilio received the request and did not answer in time: it may have sent the message, and
    # the Messages API has no idempotency key, so another attempt could send it twice.
    fake.mode, fake.slow_seconds = "slow", 1.5
    started = time.monotonic()
    with pytest.raises(ProviderError) as err:
        _provider(fake, timeout=0.3).send(_message())
    assert time.monotonic() - started < 1.4
    assert err.value.retryable is False and "did not answer within 0.3 s" in str(err.value)
    assert "may have been sent" in str(err.value)
    # The same when the connection is closed after the request, without an answer.
    fake.mode = "drop"
    with pytest.raises(ProviderError) as err:
        _provider(fake).send(_message())
    assert err.value.retryable is False and "without an answer" in str(err.value)
    assert len(fake.requests) == 2
    # Nothing reached Twilio: safe to try again.
    closed = FakeTwilio()  # bound, never serving: then closed, so the port refuses connections
    base = closed.base_url
    closed._server.server_close()
    env = ProviderEnv(organization_id=7, channel="sms", public_url="http://x", timeout_seconds=2)
    with pytest.raises(ProviderError) as err:
        TwilioProvider({"base_url": base, "account_sid": SID, "from_number": FROM}, {"auth_token": SMS_TOKEN}, env).send(_message())
    assert err.value.retryable is True and "unreachable" in str(err.value)


# --- end to end: configuration, dispatch, callbacks, replies -------------------------------------


def _configure(org, fake, channel="sms"):
    sid, token = (WA_SID, WA_TOKEN) if channel == "whatsapp" else (SID, SMS_TOKEN)
    r = org.put(f"/api/v1/channels/{channel}", json={
        "provider": "twilio", "settings": {"base_url": fake.base_url, "account_sid": sid, "from_number": FROM},
        "secrets": {"auth_token": token},
    })
    assert r.status_code == 200, r.text
    assert r.json()["secrets"]["auth_token"] == "••••" + token[-4:]


def _scenario(db, org, now, stages, **debtor_kw):
    """A strategy with an SMS and a WhatsApp template on its message stages, and one debtor due yesterday."""
    with db.transaction() as s:
        ids = {}
        for ch in ("sms", "whatsapp"):
            tpl = Template(organization_id=org.id, name=f"{ch} t", channel=ch, tone="standard",
                           body_text="Hello {{ debtor_name }}, you owe {{ balance }} {{ currency }}.",
                           created_at=now, updated_at=now)
            s.add(tpl)
            s.flush()
            ids[ch] = tpl.id
        st = strategy(s, org.id, now, stages)
        for stage in st.stages:
            stage.template_id = ids.get(str(stage.action_type))
        kw = {"phone": PHONE, "whatsapp": WHATSAPP, **debtor_kw}
        a = debtor(s, org.id, now, "TW", due=date(2026, 3, 1), **kw)
        refresh(s, org.id, now)
        return a.id


def _queue(db, account_id):
    with db.transaction() as s:
        return list(s.scalars(select(QueueItem).where(QueueItem.account_id == account_id).order_by(QueueItem.id)))


def _snapshot(db, account_id):
    """Everything a webhook could change for this account."""
    with db.transaction() as s:
        acct = s.get(Account, account_id)
        return (
            [(q.id, q.stage_index, q.status, q.scheduled_at, q.reason, q.error, q.attempt) for q in _queue(db, account_id)],
            log(s, account_id),
            [(i.id, i.status, i.direction) for i in s.scalars(select(Interaction).where(Interaction.account_id == account_id))],
            (acct.case_next_stage, acct.status, acct.opt_out_sms, acct.opt_out_whatsapp),
            s.scalar(select(func.count()).select_from(WebhookReceipt)),
        )


def test_sms_and_whatsapp_end_to_end_with_status_callbacks(db, org, client, clock, app, fake):
    _configure(org, fake, "sms")
    _configure(org, fake, "whatsapp")
    providers = Providers(app.state.settings)
    now = clock.now()  # Monday 09:00 UTC, 10:00 in Madrid: inside SMS hours
    aid = _scenario(db, org, now, [("sms", "t", 0), ("whatsapp", "p", 1), ("sms", "p", 1)])

    # Monday: the SMS goes out through the fake Twilio.
    assert tick(db, now=now, providers=providers)["dispatch"] == {"dispatched": 1}
    [sms] = fake.sent
    assert fake.requests[0].auth == (SID, SMS_TOKEN)
    assert sms.form == {"To": PHONE, "From": FROM, "Body": "Hello TW, you owe 100.00 EUR.",
                        "StatusCallback": f"http://127.0.0.1:8000/api/v1/webhooks/{org.id}/twilio/status"}
    [first] = _queue(db, aid)
    assert (first.status, first.provider_ref) == ("completed", sms.sid)

    # Twilio reports the SMS sent, then delivered: acknowledged, then the interaction is delivered.
    r = fake.post_callback(client, sms.sid, "sent")
    assert r.status_code == 200 and r.json() == {"result": "acknowledged", "status": "sent"}
    r = fake.post_callback(client, sms.sid, "delivered")
    assert r.status_code == 200 and r.json() == {"result": "delivered"}
    with db.transaction() as s:
        inter = s.scalars(select(Interaction).where(Interaction.queue_item_id == first.id)).one()
        assert (inter.status, inter.provider_ref) == ("delivered", sms.sid)
        assert ("delivered", 0, None) in log(s, aid)

    # Tuesday: the WhatsApp stage, with the whatsapp: prefix on both numbers, signed by its own token.
    clock.advance(days=1, hours=1)
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"dispatched": 1}
    wa = fake.sent[1]
    assert fake.requests[-1].auth == (WA_SID, WA_TOKEN)
    assert fake.requests[-1].path == f"/2010-04-01/Accounts/{WA_SID}/Messages.json"
    assert (wa.form["To"], wa.form["From"]) == (f"whatsapp:{WHATSAPP}", f"whatsapp:{FROM}")
    assert wa.form["StatusCallback"] == sms.form["StatusCallback"]
    second = _queue(db, aid)[-1]
    assert (second.stage_index, second.status, second.provider_ref) == (1, "completed", wa.sid)
    with db.transaction() as s:
        assert s.get(Account, aid).case_next_stage == 2

    # A forged "failed" (signed with the SMS channel's token, not WhatsApp's; or a made-up one): 401, nothing changes.
    before = _snapshot(db, aid)
    for token in (SMS_TOKEN, "forged"):
        r = fake.post_callback(client, wa.sid, "failed", error_code="63016", token=token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    url, form, _ = fake.callback(wa.sid, "failed")
    assert client.post(fake_twilio._path(url), data=form).status_code == 401  # no signature at all
    assert _snapshot(db, aid) == before

    # The genuine "undelivered": a delivery failure; the next stage is enqueued at once.
    r = fake.post_callback(client, wa.sid, "undelivered", error_code="63016")
    assert r.status_code == 200 and r.json() == {"result": "delivery_failure"}
    after = _snapshot(db, aid)
    with db.transaction() as s:
        got = items(s, aid)
        assert got[-1] == (2, "pending", clock.now(), None)
        entry = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.event == "delivery_failed")).one()
        assert (entry.stage_index, entry.reason, entry.details) == (1, "undelivered", {"error": "Twilio error 63016"})
        inter = s.scalars(select(Interaction).where(Interaction.queue_item_id == second.id)).one()
        assert inter.status == "failed"

    # The same callback again (Twilio retried): nothing changes.
    r = fake.post_callback(client, wa.sid, "undelivered", error_code="63016")
    assert r.status_code == 200 and r.json() == {"result": "duplicate"}
    assert _snapshot(db, aid) == after


def test_a_failure_reported_before_the_send_is_recorded_is_applied_with_it(db, org, client, clock, app, fake):
    """Twilio can report ``undelivered`` within seconds, while the worker is still sending the rest of
    its batch and has not recorded this send. Answering "unknown" (200) would lose the report for
    good: Twilio does not call again."""
    _configure(org, fake, "sms")
    providers = Providers(app.state.settings)
    now = clock.now()
    aid = _scenario(db, org, now, [("sms", "t", 0), ("sms", "p", 3)])
    with db.transaction() as s:  # the scheduler's work (assignment and enqueue), no dispatch
        run_scheduled(s, org=s.get(Organization, org.id), now=now, worker="scheduler")
    batch = dispatch._Batch()
    with db.transaction() as s:
        (item_id,) = dispatch.claim(s, batch, now=now, worker="w1", limit=10)
        assert dispatch.process_item(s, item_id=item_id, now=now, providers=providers, batch=batch) == "sending"
    dispatch._send_all(db, batch.sends, now=now)
    [sms] = fake.sent
    r = fake.post_callback(client, sms.sid, "undelivered", error_code="30003")
    assert r.status_code == 200 and r.json() == {"result": "pending"}
    # The worker records its batch: the send, then the report kept for it.
    dispatch._record_all(db, batch.sends, now=now, worker="w1")
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert events.index("dispatched") < events.index("delivery_failed")
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item_id)).one() == "failed"
        # The next SMS was queued at once, not three days later.
        assert [(i[0], i[1]) for i in items(s, aid)] == [(0, "completed"), (1, "pending")]
        assert items(s, aid)[1][2] == now


def test_unknown_message_sid_is_acknowledged_and_changes_nothing(db, org, client, clock, fake):
    _configure(org, fake)
    aid = _scenario(db, org, clock.now(), [("sms", "t", 0)])
    before = _snapshot(db, aid)
    url = f"http://127.0.0.1:8000/api/v1/webhooks/{org.id}/twilio/status"
    form = {"MessageSid": "SM" + "f" * 32, "MessageStatus": "failed", "From": FROM, "To": PHONE, "AccountSid": SID}
    r = client.post(f"/api/v1/webhooks/{org.id}/twilio/status", data=form,
                    headers={"X-Twilio-Signature": twilio_signature(SMS_TOKEN, url, form)})
    assert r.status_code == 200 and r.json() == {"result": "unknown_message"}
    assert _snapshot(db, aid) == before
    # An organization without Twilio for the channel cannot be called at all; an unknown one is 404.
    wa_form = {**form, "From": f"whatsapp:{FROM}", "To": f"whatsapp:{WHATSAPP}"}
    r = client.post(f"/api/v1/webhooks/{org.id}/twilio/status", data=wa_form,
                    headers={"X-Twilio-Signature": twilio_signature(SMS_TOKEN, url, wa_form)})
    assert r.status_code == 401
    assert client.post("/api/v1/webhooks/999999/twilio/status", data=form).status_code == 404


def _inbound(client, org, body, *, sender=PHONE, token=SMS_TOKEN, sid=None, signed_with=None, **extra):
    url = f"http://127.0.0.1:8000/api/v1/webhooks/{org.id}/twilio/inbound"
    form, headers = fake_twilio.inbound(signed_with or token, url, sender=sender, to=FROM, body=body, sid=sid, **extra)
    return client.post(f"/api/v1/webhooks/{org.id}/twilio/inbound", data=form, headers=headers), form["MessageSid"]


def test_stop_reply_opts_out_and_the_next_sms_stage_is_skipped(db, org, client, clock, app, fake):
    _configure(org, fake, "sms")
    _configure(org, fake, "whatsapp")
    providers = Providers(app.state.settings)
    aid = _scenario(db, org, clock.now(), [("sms", "t", 0), ("sms", "p", 1)])
    with db.transaction() as s:  # a second account of the organization with the same mobile number
        other = debtor(s, org.id, clock.now(), "TW2", due=date(2026, 3, 1), phone=PHONE, whatsapp=None).id
        stranger = debtor(s, org.id, clock.now(), "TW3", due=date(2026, 3, 1), phone="+34600999888").id
        refresh(s, org.id, clock.now())
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"dispatched": 3}

    # A forged STOP changes nothing.
    before = _snapshot(db, aid)
    r, _ = _inbound(client, org, "STOP", signed_with="forged")
    assert r.status_code == 401
    assert _snapshot(db, aid) == before

    r, sid = _inbound(client, org, "  stop \n")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/xml") and "<Response/>" in r.text
    with db.transaction() as s:
        for account_id in (aid, other):
            acct = s.get(Account, account_id)
            assert (acct.opt_out_sms, acct.opt_out_whatsapp) == (True, False)
            inter = s.scalars(select(Interaction).where(Interaction.account_id == account_id,
                                                        Interaction.direction == Direction.inbound.value)).one()
            assert (inter.channel, inter.status, inter.provider_ref, inter.transcript) == ("sms", "received", sid, "  stop \n")
            entries = [e for e in log(s, account_id) if e[0] in ("inbound_message", "opted_out")]
            assert entries == [("inbound_message", None, None), ("opted_out", None, "stop_reply")]
        assert s.get(Account, stranger).opt_out_sms is False
    # Twilio retries the same inbound message: nothing more is recorded.
    after = _snapshot(db, aid)
    r, _ = _inbound(client, org, "  stop \n", sid=sid)
    assert r.status_code == 200 and _snapshot(db, aid) == after

    # Tuesday: the second SMS stage is skipped with reason opt_out; Twilio is not called.
    sent_before = len(fake.requests)
    clock.advance(days=1, hours=1)
    tick(db, now=clock.now(), providers=providers)
    with db.transaction() as s:
        stage1 = [i for i in items(s, aid) if i[0] == 1]
        assert [(i[1], i[3]) for i in stage1] == [("skipped", "opt_out")]
    assert [r.form["To"] for r in fake.requests[sent_before:]] == ["+34600999888"]  # only the stranger's
    with db.transaction() as s:
        assert [(i[0], i[1], i[3]) for i in items(s, other) if i[0] == 1] == [(1, "skipped", "opt_out")]

    # START opts back in; a WhatsApp STOP opts out of WhatsApp only.
    r, _ = _inbound(client, org, "Start")
    assert r.status_code == 200
    with db.transaction() as s:
        assert s.get(Account, aid).opt_out_sms is False
        assert ("opted_in", None, "start_reply") in log(s, aid)
    r, _ = _inbound(client, org, "QUIT", sender=f"whatsapp:{WHATSAPP}", token=WA_TOKEN)
    assert r.status_code == 200
    with db.transaction() as s:
        acct = s.get(Account, aid)
        assert (acct.opt_out_sms, acct.opt_out_whatsapp) == (False, True)
        assert s.get(Account, other).opt_out_whatsapp is False  # TW2 has no WhatsApp number
    # An ordinary reply is recorded, and opts nobody out.
    r, _ = _inbound(client, org, "I will pay on Friday")
    with db.transaction() as s:
        inter = s.scalars(select(Interaction).where(Interaction.account_id == aid, Interaction.direction == "inbound")
                          .order_by(Interaction.id.desc())).first()
        assert inter.transcript == "I will pay on Friday" and s.get(Account, aid).opt_out_sms is False
    # A keyword set up in Twilio's Advanced Opt-Out comes with OptOutType=STOP, and counts as STOP.
    r, _ = _inbound(client, org, "Baja", OptOutType="STOP")
    with db.transaction() as s:
        assert s.get(Account, aid).opt_out_sms is True
        entries = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == aid,
                                                            ExecutionLogEntry.event == "opted_out")
                             .order_by(ExecutionLogEntry.id)).all()
        assert [(e.reason, e.details["channel"], e.details["keyword"]) for e in entries] == [
            ("stop_reply", "sms", "STOP"), ("stop_reply", "whatsapp", "QUIT"), ("stop_reply", "sms", "BAJA")]


def test_invalid_number_fails_the_item_without_retry(db, org, clock, app, fake):
    _configure(org, fake)
    providers = Providers(app.state.settings)
    aid = _scenario(db, org, clock.now(), [("sms", "t", 0), ("sms", "p", 2)], phone=fake_twilio.INVALID)
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"failed": 1}
    [item] = _queue(db, aid)
    assert (item.status, item.reason, item.attempt, item.provider_ref) == ("failed", "provider_error", 1, None)
    assert "Twilio error 21211" in item.error
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert "retry" not in events and "failed" in events
    assert fake.sent == [] and len(fake.requests) == 1
    # Later cycles do not try the same stage again.
    clock.advance(hours=2)
    tick(db, now=clock.now(), providers=providers)
    assert [(q.stage_index, q.status) for q in _queue(db, aid) if q.stage_index == 0] == [(0, "failed")]


def test_twilio_down_is_retried_with_backoff(db, org, clock, app, fake):
    _configure(org, fake)
    providers = Providers(app.state.settings)
    aid = _scenario(db, org, clock.now(), [("sms", "t", 0)])
    fake.mode = "down"
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"retry": 1}
    [item] = _queue(db, aid)
    assert (item.status, item.attempt, item.scheduled_at) == ("pending", 1, clock.now() + timedelta(minutes=15))
    assert "HTTP 500" in item.error
    with db.transaction() as s:
        assert ("retry", 0, "provider_error") in log(s, aid)
    # Twilio is back: the next cycle after the back-off sends it.
    fake.mode = "ok"
    clock.advance(minutes=15)
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"dispatched": 1}
    [item] = _queue(db, aid)
    assert (item.status, item.provider_ref) == ("completed", fake.sent[0].sid)
    assert len(fake.requests) == 2


# --- over real HTTP both ways: the fake posts its callback to the app served by uvicorn ----------


def test_fake_twilio_posts_a_signed_callback_over_http(db, clock, fake, make_org):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(database_url=db.url, secret_key="test-secret", public_url=f"http://127.0.0.1:{port}")
    served = create_app(settings, clock=clock, db=db)
    server = uvicorn.Server(uvicorn.Config(served, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        org = make_org("Served")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {org.keys['admin']}"}) as http:
            r = http.put("/api/v1/channels/sms", json={
                "provider": "twilio", "settings": {"base_url": fake.base_url, "account_sid": SID, "from_number": FROM},
                "secrets": {"auth_token": SMS_TOKEN}})
            assert r.status_code == 200, r.text
            aid = _scenario(db, org, clock.now(), [("sms", "t", 0), ("sms", "p", 3)])
            assert tick(db, now=clock.now(), providers=Providers(settings))["dispatch"] == {"dispatched": 1}
            [sent] = fake.sent
            assert sent.form["StatusCallback"] == f"http://127.0.0.1:{port}/api/v1/webhooks/{org.id}/twilio/status"
            with httpx.Client() as twilio_side:  # no API key: only the signature authenticates
                r = fake.post_callback(twilio_side, sent.sid, "failed", error_code="30003")
            assert r.status_code == 200 and r.json() == {"result": "delivery_failure"}
        with db.transaction() as s:
            assert ("delivery_failed", 0, "failed") in log(s, aid)
            assert items(s, aid)[-1] == (1, "pending", clock.now(), None)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_whatsapp_reply_completes_a_whatsapp_conversation_stage(db, org, client, clock, app, fake):
    _configure(org, fake, "sms")
    _configure(org, fake, "whatsapp")
    providers = Providers(app.state.settings)
    aid = _scenario(db, org, clock.now(), [("whatsapp", "t", 0), ("sms", "p", 1)])
    with db.transaction() as s:  # retries make the WhatsApp stage a conversation that waits for a reply
        from duecourse.strategies.models import Stage
        stage = s.scalars(select(Stage).where(Stage.position == 0, Stage.action_type == "whatsapp")).one()
        stage.max_retries, stage.step_timeout_hours = 1, 24
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        assert s.get(Account, aid).case_next_stage == 0
    # An SMS reply is recorded but is not the WhatsApp conversation's answer.
    r, _ = _inbound(client, org, "ok")
    assert r.status_code == 200
    with db.transaction() as s:
        assert s.get(Account, aid).case_next_stage == 0
    clock.advance(hours=2)
    r, sid = _inbound(client, org, "Hola, pago el viernes", sender=f"whatsapp:{WHATSAPP}", token=WA_TOKEN)
    assert r.status_code == 200
    with db.transaction() as s:
        acct = s.get(Account, aid)
        assert (acct.case_next_stage, acct.status) == (1, "in_auto_management")
        entries = [e for e in log(s, aid) if e[0] in ("inbound_message", "outcome", "advanced")]
        assert entries == [("inbound_message", None, None), ("inbound_message", None, None), ("outcome", 0, "replied"),
                           ("advanced", 1, None)]
        sent = s.scalars(select(Interaction).where(Interaction.account_id == aid, Interaction.direction == "outbound")).one()
        assert sent.status == "answered"
    # The timeout has nothing left to expire, and the same reply delivered again changes nothing.
    before = _snapshot(db, aid)
    r, _ = _inbound(client, org, "Hola, pago el viernes", sender=f"whatsapp:{WHATSAPP}", token=WA_TOKEN, sid=sid)
    clock.advance(hours=30)
    assert tick(db, now=clock.now(), providers=providers)["step_timeouts"] == 0
    after = _snapshot(db, aid)
    assert after[1][: len(before[1])] == before[1] and "step_timeout" not in [e[0] for e in after[1]]
